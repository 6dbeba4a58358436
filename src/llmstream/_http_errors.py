"""Turning non-2xx responses and transport failures into llmstream errors (sans-IO)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import httpx

from ._errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConnectTimeout,
    InternalServerError,
    LLMStreamError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    UnprocessableEntityError,
)
from ._result import StreamResult

__all__ = ["MAX_ERROR_BODY_BYTES", "connection_error", "status_error"]

MAX_ERROR_BODY_BYTES = 64 * 1024
"""An error body is read up to this size: a hostile server cannot make us buffer more."""

_STATUS_CLASSES: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}

_HINTS = {
    401: "Check the API key (api_key=..., or LLMSTREAM_API_KEY / OPENAI_API_KEY).",
    403: "The API key is not allowed to use this model or endpoint.",
    404: "Check the model name and the base URL (it usually ends in /v1).",
    408: "The server timed out reading the request; retry.",
    409: "Retry the request.",
    429: "The server is rate limiting; retry after the time its retry-after header gives.",
    502: "A gateway in front of the model server failed; retry.",
    503: "The server is overloaded or not ready; retry later.",
    504: "A gateway timed out waiting for the model server; retry.",
}

_TAGS = re.compile(r"<[^>]+>")
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_SPACES = re.compile(r"\s+")


def status_error(
    status_code: int, reason: str, headers: Mapping[str, str], body: bytes
) -> APIStatusError:
    """Build the error for a non-2xx response from its status, headers and (capped) body.

    Understands OpenAI/vLLM ``{"error": {...}}``, ``{"error": "text"}``, the flat
    ``{"object": "error", "message": ...}``, FastAPI's ``{"detail": ...}``, HTML
    error pages and plain text.

    Example::

        exc = status_error(404, "Not Found", {}, b'{"error": {"message": "no such model"}}')
        assert isinstance(exc, NotFoundError) and "no such model" in str(exc)
    """
    text = body[:MAX_ERROR_BODY_BYTES].decode("utf-8", errors="replace")
    said, error_type, error_code = _server_message(text, headers.get("content-type", ""))
    what = f"HTTP {status_code} {reason}".rstrip()
    message = f"{what}: {said}" if said else f"{what} (empty body)"
    hint = _HINTS.get(status_code) or ("The server failed; retry." if status_code >= 500 else "")
    if hint:
        message = f"{message}. {hint}" if not message.endswith(".") else f"{message} {hint}"
    cls = _STATUS_CLASSES.get(status_code) or (
        InternalServerError if status_code >= 500 else APIStatusError
    )
    return cls(
        message,
        status_code=status_code,
        body=text,
        headers=dict(headers),
        error_type=error_type,
        error_code=error_code,
        request_id=headers.get("x-request-id"),
    )


def connection_error(
    exc: httpx.HTTPError, url: str, connect_timeout: float | None = None
) -> LLMStreamError:
    """Map an httpx failure that happened before a response into our error tree.

    Example::

        except httpx.HTTPError as exc:
            raise connection_error(exc, url) from exc
    """
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        limit = f" within connect={connect_timeout:g} s" if connect_timeout else ""
        return ConnectTimeout(
            f"Could not connect to {url}{limit} ({type(exc).__name__}). The server may be "
            "down or unreachable; check the base URL, or raise Timeouts.connect.",
            partial=StreamResult(status="interrupted"),
        )
    if isinstance(exc, httpx.TimeoutException):
        kind = type(exc).__name__
        return APITimeoutError(
            f"Timed out ({kind}) talking to {url}. The server may be overloaded or "
            "unreachable; raise the timeout or retry."
        )
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return APIConnectionError(f"Cannot request {url}: {exc}. Check the base URL.")
    return APIConnectionError(
        f"Could not get a response from {url}: {type(exc).__name__}: {exc or 'connection failed'}. "
        "Is the server running, and is the base URL right?"
    )


def _server_message(text: str, content_type: str) -> tuple[str, str | None, int | str | None]:
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        try:
            data = json.loads(stripped)
        except ValueError:
            pass
        else:
            found = _json_message(data)
            if found is not None:
                return found
    if "html" in content_type or stripped[:1] == "<":
        return _html_message(stripped), None, None
    return _clip(_SPACES.sub(" ", stripped)), None, None


def _json_message(data: object) -> tuple[str, str | None, int | str | None] | None:
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    if isinstance(error, dict):
        return _fields(error)
    if isinstance(error, str):
        return _clip(error), None, None
    if data.get("object") == "error" or "message" in data:
        return _fields(data)
    detail = data.get("detail")
    if detail is not None:
        return _clip(_detail_text(detail)), None, None
    return None


def _fields(error: Mapping[str, object]) -> tuple[str, str | None, int | str | None]:
    code = error.get("code")
    etype = error.get("type")
    return (
        _clip(str(error.get("message") or "")),
        str(etype) if etype is not None else None,
        code if isinstance(code, (int, str)) else None,
    )


def _detail_text(detail: object) -> str:
    # FastAPI validation errors: [{"loc": ["body", "messages"], "msg": "Field required"}, ...]
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []))
                msg = item.get("msg", "")
                parts.append(f"{loc}: {msg}" if loc else str(msg))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


def _html_message(html: str) -> str:
    title = _TITLE.search(html)
    if title:
        return _clip(_SPACES.sub(" ", title.group(1)).strip())
    return _clip(_SPACES.sub(" ", _TAGS.sub(" ", html)).strip())


def _clip(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
