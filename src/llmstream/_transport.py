"""The transport seam: what the stream shells need from an HTTP library, and no more.

A transport sends a request and hands back a response whose headers arrived; the
response reads its body a network read at a time, says whether it was read to its end,
and can be aborted at once (the server sees the connection close: vLLM then aborts the
generation and frees its KV cache). :mod:`llmstream._httpx_transport` implements it on
httpx; another HTTP library plugs in by implementing these protocols, without touching
the call core or the shells.

Failures: :meth:`AsyncTransport.send` raises an :class:`~llmstream.LLMStreamError` for a
request that got no response (connection refused, TLS, proxy...), and
:class:`HeaderTimeout` when the response headers did not arrive within the request's
``read_timeout``. A body read raises whatever the library raises;
:meth:`AsyncResponse.read_failure` says what it means, so the hot path wraps nothing.

Example::

    response = await transport.send(HTTPRequest("POST", url, headers, body, 10.0, 300.0))
    async for data in response.stream(body_timeout=None):
        ...
    await response.aclose()
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from ._call import ReadFailure
from ._config import KEEP_ALIVE_BELOW
from ._errors import InvalidRequestError
from ._header_wait import HeaderWait
from ._request import json_body

__all__ = [
    "AsyncResponse",
    "AsyncTransport",
    "HTTPRequest",
    "HeaderTimeout",
    "InFlight",
    "PooledTransport",
    "asyncio_loop",
    "json_body",
    "SyncResponse",
    "SyncTransport",
    "request_headers",
]


class HeaderTimeout(Exception):
    """The response headers did not arrive within the request's ``read_timeout``."""


@dataclass(frozen=True, slots=True)
class HTTPRequest:
    """One HTTP request: what to send and how long its phases may take.

    ``read_timeout`` bounds the wait for the response headers (and, for a request
    that is not a stream, for its body); ``None``: no limit.

    Example::

        HTTPRequest("GET", "http://localhost:8000/v1/models", {}, None, 10.0, 30.0)
    """

    method: str
    url: str
    headers: Mapping[str, str]
    json: object | None
    connect_timeout: float | None
    read_timeout: float | None
    stream: bool = True


class AsyncResponse(Protocol):
    """A response whose headers arrived (async)."""

    @property
    def status_code(self) -> int:
        """The HTTP status."""

    @property
    def reason_phrase(self) -> str:
        """The HTTP reason phrase (may be empty)."""

    @property
    def headers(self) -> Mapping[str, str]:
        """The response headers, with case-insensitive lookup."""

    @property
    def body_done(self) -> bool:
        """True once the body was read to its end: the connection can be reused."""

    async def read(self, limit: int) -> bytes:
        """The body, up to ``limit`` bytes (a body cut short returns what arrived)."""

    def stream(self, body_timeout: float | None) -> AsyncIterator[bytes]:
        """The body a network read at a time; ``body_timeout`` is a backstop per read."""

    def read_failure(self, exc: Exception) -> ReadFailure | None:
        """What a failed body read means; None when ``exc`` is not a transport failure."""

    def body_ended(self) -> None:
        """The body's iterator ended: it was read whole, and the connection may be reused."""

    def abort(self) -> None:
        """Cut the connection now, from the event loop's thread; no-op once the body ended."""

    async def aclose(self) -> None:
        """Release the response (cutting the connection if its body was not read).

        It must release the response even when the calling task is cancelled: where it
        awaits, it shields itself. The shell does not shield this call for it.
        """


class AsyncTransport(Protocol):
    """Sends requests (async)."""

    @property
    def requests_in_flight(self) -> int:
        """Streams sent and not yet released."""

    async def send(self, request: HTTPRequest) -> AsyncResponse:
        """Send ``request``; returns once the response headers arrived."""

    async def aclose(self) -> None:
        """Close the connection pool, if the transport owns it."""


class SyncResponse(Protocol):
    """A response whose headers arrived (blocking); see :class:`AsyncResponse`."""

    @property
    def status_code(self) -> int:
        """The HTTP status."""

    @property
    def reason_phrase(self) -> str:
        """The HTTP reason phrase (may be empty)."""

    @property
    def headers(self) -> Mapping[str, str]:
        """The response headers, with case-insensitive lookup."""

    @property
    def body_done(self) -> bool:
        """True once the body was read to its end."""

    def read(self, limit: int) -> bytes:
        """The body, up to ``limit`` bytes."""

    def stream(self, body_timeout: float | None) -> Iterator[bytes]:
        """The body a network read at a time."""

    def read_failure(self, exc: Exception) -> ReadFailure | None:
        """What a failed body read means; None when ``exc`` is not a transport failure."""

    def body_ended(self) -> None:
        """The body's iterator ended: it was read whole, and the connection may be reused."""

    def abort(self) -> None:
        """Cut the connection now, from any thread: a blocked read returns at once."""

    def close(self) -> None:
        """Release the response (cutting the connection if its body was not read)."""


class SyncTransport(Protocol):
    """Sends requests (blocking); safe to use from many threads."""

    @property
    def requests_in_flight(self) -> int:
        """Streams sent and not yet released."""

    def send(self, request: HTTPRequest, header_wait: HeaderWait | None = None) -> SyncResponse:
        """Send ``request``; ``header_wait.cut()`` from another thread stops the wait."""

    def close(self) -> None:
        """Close the connection pool, if the transport owns it."""


# -- what every transport does alike ----------------------------------------------------


class InFlight:
    """Streams sent and not yet released; a lock because sync streams end on many threads.

    Example::

        in_flight = InFlight()
        in_flight.add(1)
    """

    __slots__ = ("_lock", "count")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def add(self, n: int) -> None:
        """Count ``n`` more streams (negative: released)."""
        with self._lock:
            self.count += n


class PooledTransport:
    """What the async client's own transports share: their options and in-flight count.

    ``max_connections`` bounds the pool (llmstream's default, 1,000, as for httpx);
    ``trust_env`` takes proxies from the environment; ``verify`` is ``True`` (the
    system's CA certificates), ``False``, or an :class:`ssl.SSLContext`.

    Example::

        class MyTransport(PooledTransport):
            def _set_up(self) -> None:
                self._pool = {}
    """

    def __init__(
        self,
        *,
        max_connections: int = 1000,  # the httpx pool's (_config.DEFAULT_LIMITS)
        trust_env: bool = True,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        if max_connections < 1:
            raise InvalidRequestError(f"max_connections must be positive, got {max_connections}")
        self.max_connections = max_connections
        self.trust_env = trust_env
        self._verify = verify
        self._in_flight = InFlight()
        self._set_up()

    def _set_up(self) -> None:
        """The transport's own state, made after the shared options."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_connections={self.max_connections})"

    @property
    def requests_in_flight(self) -> int:
        """Streams sent and not yet released."""
        return self._in_flight.count


def request_headers(request: HTTPRequest, in_flight: InFlight) -> dict[str, str]:
    """The headers to send for ``request``, with the client's keep-alive rule applied.

    Example::

        headers = request_headers(request, in_flight)
    """
    headers = dict(request.headers)
    if request.stream and in_flight.count >= KEEP_ALIVE_BELOW:
        # Many streams at once: this connection is not kept for reuse. httpcore's pool
        # scans all its connections for each idle one on every request it opens or
        # closes; hundreds of pooled connections made opening a stream take seconds
        # under load (benchmarks/PROFILE.md). A quiet client keeps its connections.
        headers["Connection"] = "close"
    return headers


def asyncio_loop(transport: str, built_on: str) -> asyncio.AbstractEventLoop:
    """The running asyncio loop, for a transport that runs only on asyncio.

    Under trio (or no loop) an :class:`~llmstream.InvalidRequestError` that names the
    transport and says what to use instead.

    Example::

        loop = asyncio_loop("AiohttpTransport", "aiohttp is built on it")
    """
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise InvalidRequestError(
            f"The {transport} runs only on asyncio ({built_on}), and this code runs under "
            f"{_event_loop_name()}. Use the default httpx transport, which runs on trio too: "
            f"drop transport={transport}(), or unset LLMSTREAM_HTTP_BACKEND."
        ) from None


def _event_loop_name() -> str:
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass
        else:
            return "trio"
    return "another event loop"
