"""Turning non-2xx responses and transport failures into llmstream errors (sans-IO)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

import httpx

from ._config import EnvProxy
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
    ProtocolError,
    RateLimitError,
    UnprocessableEntityError,
)
from ._json import loads as loads_json
from ._result import StreamResult

__all__ = [
    "MAX_ERROR_BODY_BYTES",
    "SendFailure",
    "connection_error",
    "send_failure_error",
    "not_an_openai_answer",
    "not_json_error",
    "status_error",
]

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
    status_code: int,
    reason: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    method: str | None = None,
    url: str | None = None,
) -> APIStatusError:
    """Build the error for a non-2xx response from its status, headers and (capped) body.

    Understands OpenAI/vLLM ``{"error": {...}}``, ``{"error": "text"}``, the flat
    ``{"object": "error", "message": ...}``, FastAPI's ``{"detail": ...}``, HTML
    error pages and plain text. ``method`` and ``url``, the request that got the
    answer, start the message and make its advice precise: a 404 for a base URL
    without ``/v1``, a server without ``/tokenize``.

    Example::

        exc = status_error(404, "Not Found", {}, b'{"error": {"message": "no such model"}}',
                           method="POST", url="http://gpu-1:8000/v1/chat/completions")
        assert isinstance(exc, NotFoundError) and "no such model" in str(exc)
        assert str(exc).startswith("POST http://gpu-1:8000/v1/chat/completions: HTTP 404")
    """
    text = body[:MAX_ERROR_BODY_BYTES].decode("utf-8", errors="replace")
    said, error_type, error_code = _server_message(text, headers.get("content-type", ""))
    what = f"HTTP {status_code} {reason}".rstrip()
    if url is not None:
        what = f"{method} {url}: {what}" if method else f"{url}: {what}"
    message = f"{what}: {said}" if said else f"{what} (empty body)"
    hint = (
        _url_hint(status_code, url)
        or _redirect_hint(status_code, headers, url)
        or _HINTS.get(status_code)
        or ("The server failed; retry." if status_code >= 500 else "")
    )
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
        method=method,
        url=url,
    )


# The paths the client requests under the base URL, longest first.
_ENDPOINTS = ("/chat/completions", "/completions", "/models")


def _base_of(url: str) -> str | None:
    """The base URL a request URL was made from; None when it is not an API path."""
    for endpoint in _ENDPOINTS:
        if url.endswith(endpoint):
            return url[: -len(endpoint)]
    return None


def _with_v1(base: str) -> str:
    """What the base URL most likely should be: up to its /v1, or with /v1 added."""
    parsed = httpx.URL(base)
    parts = parsed.path.rstrip("/").split("/")
    path = "/".join(parts[: parts.index("v1") + 1]) if "v1" in parts else "/".join([*parts, "v1"])
    return str(parsed.copy_with(path=path, query=None, fragment=None))


def _url_hint(status_code: int, url: str | None) -> str | None:
    if url is None or status_code not in (404, 405):
        return None
    if url.endswith("/tokenize"):
        # vLLM serves /tokenize at its root, beside /v1; servers without one (Ollama,
        # hosted APIs) answer 404, or 405 when a catch-all route takes only GET.
        return (
            'The server has no tokenize endpoint, which count_prompt="server" needs (vLLM '
            "serves /tokenize beside /v1). Count the prompt locally instead: "
            'count_prompt="estimate", or a tokenizer\'s counter '
            "(llmstream.counter_from_text_tokenizer)."
        )
    base = _base_of(url)
    if status_code != 404 or base is None:
        return None
    if not httpx.URL(base).path.rstrip("/").endswith("/v1"):
        return f"Check the base URL: it usually ends in /v1; try {_with_v1(base)}"
    if url.endswith("/models"):
        # Every OpenAI-compatible server lists its models: this is another service.
        return "No OpenAI-compatible server answers at this base URL: check its host and port."
    return "Check the model name (GET /models lists them) and the base URL."


def _redirect_hint(status_code: int, headers: Mapping[str, str], url: str | None) -> str | None:
    """Where a 3xx answer points, and the base URL to use instead.

    Redirects are not followed: a POST's body may be dropped on the way, and the API key
    would go on to whatever host the answer names. A gateway that redirects http to
    https, or to another path, is answered by giving the client the URL it wants.
    """
    if not 300 <= status_code < 400:
        return None
    location = headers.get("location", "").strip()
    if not location:
        return "Redirects are not followed; check the base URL."
    try:
        target = httpx.URL(url).join(location) if url else httpx.URL(location)
        # Never the query, fragment or credentials: they may hold a gateway's tokens.
        target = target.copy_with(query=None, fragment=None, userinfo=b"")
    except (httpx.InvalidURL, TypeError, ValueError):
        return "Redirects are not followed; check the base URL."
    shown = str(target)
    base = _base_of(shown.rstrip("/"))
    if base is None:
        advice = "check the base URL"
    elif url is not None and base == _base_of(url):
        # Only the path's ending changes (a trailing slash): a gateway's rule.
        advice = "the same base URL, so point base_url at the server behind the gateway"
    else:
        advice = f"try base_url={base!r}"
    return (
        f"The server redirects to {shown}; redirects are not followed (the request's body "
        f"and API key would go on to it): {advice}."
    )


def not_json_error(
    method: str, url: str, status_code: int, content_type: str, body: bytes
) -> ProtocolError:
    """The error for a 2xx answer to a JSON request (``GET /models``...) that is not JSON.

    A web app, a notebook server or another service on the port answers HTML or
    text: the message quotes what it sent (an HTML page's title) and points at the
    base URL and port.

    Example::

        not_json_error("GET", "http://localhost:8888/v1/models", 200, "text/html",
                       b"<title>Jupyter Server</title>")
        # ProtocolError("GET http://localhost:8888/v1/models: the server at
        #   http://localhost:8888 does not speak the OpenAI API: it answered text/html
        #   ('Jupyter Server') ...")
    """
    text = body[:MAX_ERROR_BODY_BYTES].decode("utf-8", errors="replace").strip()
    kind = content_type.split(";")[0].strip() or "a body without a content type"
    if not text:
        answered = f"it answered {status_code} with an empty body"
    elif "html" in kind or text[:1] == "<":
        answered = f"it answered {kind} ({_html_message(text)!r})"
    else:
        answered = f"it answered {kind} ({_clip(_SPACES.sub(' ', text), 200)!r})"
    return not_an_openai_answer(method, url, answered)


def not_an_openai_answer(method: str, url: str, answered: str) -> ProtocolError:
    """The error for an answer no OpenAI-compatible server gives; ``answered`` says what came.

    Example::

        not_an_openai_answer("GET", "http://localhost:8080/v1/models",
                             "its JSON is not a model list ({'status': 'ok'})")
    """
    origin = httpx.URL(url).copy_with(path="/", query=None, fragment=None)
    return ProtocolError(
        f"{method} {url}: the server at {str(origin).rstrip('/')} does not speak the "
        f"OpenAI API: {answered}. Check the base URL and its port (vLLM serves the API "
        "under /v1, by default at http://localhost:8000/v1)."
    )


# What a failure before any response was, whatever the HTTP library: each transport sorts
# its own exceptions into these (the httpx one below, the aiohttp one in its module).
SendFailure = Literal["connect", "connect_timeout", "timeout", "proxy", "bad_url", "other"]


def connection_error(
    exc: httpx.HTTPError,
    url: str,
    connect_timeout: float | None = None,
    *,
    proxy: EnvProxy | None = None,
) -> LLMStreamError:
    """Map an httpx failure that happened before a response into our error tree.

    ``proxy`` is the environment's proxy for ``url`` when the client uses it: a
    failure to connect is then the proxy's, and the message names it.

    Example::

        except httpx.HTTPError as exc:
            raise connection_error(exc, url, proxy=env_proxy(url)) from exc
    """
    return send_failure_error(_httpx_failure(exc), exc, url, connect_timeout, proxy=proxy)


def _httpx_failure(exc: httpx.HTTPError) -> SendFailure:
    if isinstance(exc, httpx.ProxyError):
        return "proxy"
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return "connect_timeout"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return "bad_url"
    if isinstance(exc, httpx.ConnectError):
        return "connect"
    return "other"


def send_failure_error(
    kind: SendFailure,
    exc: BaseException,
    url: str,
    connect_timeout: float | None = None,
    *,
    proxy: EnvProxy | None = None,
) -> LLMStreamError:
    """The error for a request that got no response, ``exc`` being the library's own.

    ``kind`` is what the transport found the failure to be; ``exc`` gives the words
    (its type's name and text, and its causes for the TLS hint).

    Example::

        except aiohttp.ClientConnectorError as exc:
            raise send_failure_error("connect", exc, url) from exc
    """
    if proxy is not None and kind in ("connect", "connect_timeout", "proxy"):
        return _proxy_error(kind, exc, url, proxy, connect_timeout)
    if kind == "connect_timeout":
        limit = f" within connect={connect_timeout:g} s" if connect_timeout else ""
        return ConnectTimeout(
            f"Could not connect to {url}{limit} ({type(exc).__name__}). The server may be "
            "down or unreachable; check the base URL, or raise Timeouts.connect.",
            partial=StreamResult(status="interrupted"),
        )
    if kind == "timeout":
        return APITimeoutError(
            f"Timed out ({type(exc).__name__}) talking to {url}. The server may be overloaded or "
            "unreachable; raise the timeout or retry."
        )
    if kind == "bad_url":
        return APIConnectionError(f"Cannot request {url}: {exc}. Check the base URL.")
    if kind == "connect" and url.startswith("https://") and _plain_http(exc):
        plain = "http://" + url.removeprefix("https://")
        return APIConnectionError(
            f"Could not open a TLS connection to {url}: {exc}. The server speaks plain "
            f"HTTP: use http:// ({_base_of(plain) or plain})."
        )
    return APIConnectionError(
        f"Could not get a response from {url}: {type(exc).__name__}: {exc or 'connection failed'}. "
        "Is the server running, and is the base URL right?"
    )


# What OpenSSL says when the "TLS" server answered in plain text (an HTTP 400): up to 3.1
# WRONG_VERSION_NUMBER (or "packet length too long"), from 3.2 "record layer failure";
# urllib3 reads the first and the last the same way (urllib3#3271).
_PLAIN_HTTP_SIGNS = (
    "wrong_version_number",
    "wrong version number",
    "record layer failure",
    "packet length too long",
)


def _plain_http(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen).lower()
        if any(sign in text for sign in _PLAIN_HTTP_SIGNS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _proxy_error(
    kind: SendFailure,
    exc: BaseException,
    url: str,
    proxy: EnvProxy,
    connect_timeout: float | None,
) -> LLMStreamError:
    where = f"the proxy {proxy.shown} (from {proxy.variable})"
    advice = (
        f"Fix or unset {proxy.variable}, or add the server's host to NO_PROXY to connect "
        "to it directly."
    )
    if kind == "proxy":
        return APIConnectionError(
            f"The proxy {proxy.shown} (from {proxy.variable}) would not forward the request "
            f"to {url}: {exc}. {advice}"
        )
    if kind == "connect_timeout":
        limit = f" within connect={connect_timeout:g} s" if connect_timeout else ""
        return ConnectTimeout(
            f"Could not reach {where}{limit} to request {url}. {advice}",
            partial=StreamResult(status="interrupted"),
        )
    return APIConnectionError(
        f"Could not reach {where} to request {url}: {type(exc).__name__}: "
        f"{exc or 'connection failed'}. {advice}"
    )


def _server_message(text: str, content_type: str) -> tuple[str, str | None, int | str | None]:
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        try:
            data = loads_json(stripped)
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
