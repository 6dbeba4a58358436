"""Which HTTP library a client sends with: httpx (the default), aiohttp, or none (asyncio).

An :class:`~llmstream.AsyncClient` uses aiohttp when given
``transport=AiohttpTransport()``, and HTTP/1.1 straight on asyncio when given
``transport=AsyncioTransport()``; with neither ``http_client`` nor ``transport``,
``LLMSTREAM_HTTP_BACKEND=aiohttp`` or ``=asyncio`` chooses. An argument always wins over
the environment. The blocking :class:`~llmstream.Client` always uses httpx (the others
have no blocking API): it ignores the variable, and refuses either transport.

Example::

    transport = async_transport(None, None)  # httpx, unless the environment says aiohttp
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import httpx

from ._aiohttp_transport import AiohttpTransport
from ._asyncio_transport import AsyncioTransport
from ._errors import InvalidRequestError
from ._httpx_transport import own_async_transport
from ._transport import AsyncTransport

__all__ = ["BACKEND_VARIABLE", "async_transport", "check_sync_transport"]

BACKEND_VARIABLE = "LLMSTREAM_HTTP_BACKEND"
_BACKENDS = ("httpx", "aiohttp", "asyncio")


def _env_backend(environ: Mapping[str, str]) -> str:
    value = environ.get(BACKEND_VARIABLE, "").strip().lower()
    if value and value not in _BACKENDS:
        raise InvalidRequestError(
            f"{BACKEND_VARIABLE}={environ[BACKEND_VARIABLE]!r} is not an HTTP backend "
            f"llmstream knows: use {', '.join(_BACKENDS[:-1])} or {_BACKENDS[-1]} (or unset it "
            "for httpx)."
        )
    return value or "httpx"


def async_transport(
    http_client: httpx.AsyncClient | None,
    transport: httpx.AsyncBaseTransport | AiohttpTransport | AsyncioTransport | None,
    environ: Mapping[str, str] = os.environ,
) -> AsyncTransport:
    """The transport an :class:`~llmstream.AsyncClient` made with these arguments uses.

    Example::

        async_transport(None, AiohttpTransport())  # that AiohttpTransport
    """
    if isinstance(transport, AiohttpTransport | AsyncioTransport):
        if http_client is not None:
            raise InvalidRequestError(
                f"Pass http_client (an httpx client) or transport={type(transport).__name__}(), "
                "not both."
            )
        return transport
    if http_client is None and transport is None:
        backend = _env_backend(environ)
        if backend == "aiohttp":
            return AiohttpTransport()
        if backend == "asyncio":
            return AsyncioTransport()
    return own_async_transport(http_client, transport)


def check_sync_transport(transport: object) -> None:
    """Refuse an :class:`AiohttpTransport` or :class:`AsyncioTransport` for the blocking client.

    Example::

        check_sync_transport(httpx.HTTPTransport())  # fine
    """
    if isinstance(transport, AiohttpTransport):
        raise InvalidRequestError(
            "AiohttpTransport is for llmstream.AsyncClient only: aiohttp has no blocking "
            "API. The blocking llmstream.Client sends with httpx; drop transport=."
        )
    if isinstance(transport, AsyncioTransport):
        raise InvalidRequestError(
            "AsyncioTransport is for llmstream.AsyncClient only: it runs on asyncio's event "
            "loop. The blocking llmstream.Client sends with httpx; drop transport=."
        )
