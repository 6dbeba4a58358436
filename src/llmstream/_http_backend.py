"""Which HTTP library a client sends with: httpx (the default), or aiohttp when asked.

An :class:`~llmstream.AsyncClient` uses aiohttp when given
``transport=AiohttpTransport()``, or, with neither ``http_client`` nor ``transport``,
when ``LLMSTREAM_HTTP_BACKEND=aiohttp``. An argument always wins over the environment.
The blocking :class:`~llmstream.Client` always uses httpx (aiohttp has no blocking
API): it ignores the variable, and refuses an ``AiohttpTransport``.

Example::

    transport = async_transport(None, None)  # httpx, unless the environment says aiohttp
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import httpx

from ._aiohttp_transport import AiohttpTransport
from ._errors import InvalidRequestError
from ._httpx_transport import own_async_transport
from ._transport import AsyncTransport

__all__ = ["BACKEND_VARIABLE", "async_transport", "check_sync_transport"]

BACKEND_VARIABLE = "LLMSTREAM_HTTP_BACKEND"
_BACKENDS = ("httpx", "aiohttp")


def _env_backend(environ: Mapping[str, str]) -> str:
    value = environ.get(BACKEND_VARIABLE, "").strip().lower()
    if value and value not in _BACKENDS:
        raise InvalidRequestError(
            f"{BACKEND_VARIABLE}={environ[BACKEND_VARIABLE]!r} is not an HTTP backend "
            f"llmstream knows: use {' or '.join(_BACKENDS)} (or unset it for httpx)."
        )
    return value or "httpx"


def async_transport(
    http_client: httpx.AsyncClient | None,
    transport: httpx.AsyncBaseTransport | AiohttpTransport | None,
    environ: Mapping[str, str] = os.environ,
) -> AsyncTransport:
    """The transport an :class:`~llmstream.AsyncClient` made with these arguments uses.

    Example::

        async_transport(None, AiohttpTransport())  # that AiohttpTransport
    """
    if isinstance(transport, AiohttpTransport):
        if http_client is not None:
            raise InvalidRequestError(
                "Pass http_client (an httpx client) or transport=AiohttpTransport(), not both."
            )
        return transport
    if http_client is None and transport is None and _env_backend(environ) == "aiohttp":
        return AiohttpTransport()
    return own_async_transport(http_client, transport)


def check_sync_transport(transport: object) -> None:
    """Refuse an :class:`AiohttpTransport` for the blocking client.

    Example::

        check_sync_transport(httpx.HTTPTransport())  # fine
    """
    if isinstance(transport, AiohttpTransport):
        raise InvalidRequestError(
            "AiohttpTransport is for llmstream.AsyncClient only: aiohttp has no blocking "
            "API. The blocking llmstream.Client sends with httpx; drop transport=."
        )
