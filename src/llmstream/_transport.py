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
import re
import ssl
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable
from urllib.parse import SplitResult

from ._call import ReadFailure
from ._config import KEEP_ALIVE_BELOW, EnvProxy, shown_url
from ._errors import InvalidRequestError
from ._header_wait import HeaderWait
from ._request import json_body

__all__ = [
    "AsyncResponse",
    "AsyncTransport",
    "CountedResponse",
    "HTTPRequest",
    "HeaderTimeout",
    "InFlight",
    "LendableBody",
    "PooledTransport",
    "asyncio_loop",
    "json_body",
    "no_limit",
    "proxy_port",
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
    that is not a stream, for its body); ``None`` (or infinity): no limit. The headers
    are checked when the request is made, for every transport alike: a name that is not
    an HTTP token, or a value with a line break, a control character or a character
    that is not ASCII, is an :class:`~llmstream.InvalidRequestError` naming the header
    (never quoting its value: it may hold the API key). They are not in the repr.

    Example::

        HTTPRequest("GET", "http://localhost:8000/v1/models", {}, None, 10.0, 30.0)
    """

    method: str
    url: str
    headers: Mapping[str, str] = field(repr=False)  # Authorization holds the API key
    json: object | None
    connect_timeout: float | None
    read_timeout: float | None
    stream: bool = True

    def __post_init__(self) -> None:
        check_headers(self.url, self.headers)
        # inf (or centuries) means no limit; socket.settimeout() and aiohttp's timers
        # refuse it.
        object.__setattr__(self, "connect_timeout", no_limit(self.connect_timeout))
        object.__setattr__(self, "read_timeout", no_limit(self.read_timeout))


def no_limit(timeout: float | None) -> float | None:
    """``timeout`` as an HTTP library takes it: infinity, or centuries (no limit), is None.

    Example::

        no_limit(float("inf"))  # None
    """
    if timeout is not None and timeout >= threading.TIMEOUT_MAX:
        # Beyond what a socket or a lock can wait (~292 years): OverflowError, not a wait.
        return None
    return timeout


# RFC 9110 5.1: a field name is a token; 5.5: a value is visible ASCII, spaces and tabs
# (obs-text, bytes above 0x7E, is not sent: HTTP libraries encode it each their own way).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKENS = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+)*")
_NOT_TOKEN = re.compile(r"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")
_SPACE = frozenset(" \t")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def check_headers(url: str, headers: Mapping[str, str]) -> None:
    """Refuse a header HTTP/1.1 cannot carry, naming it but never showing its value.

    Example::

        check_headers("http://localhost:8000/v1", {"Authorization": "Bearer sk-1"})
    """
    try:
        # Every header at once, the common case: one pass of each check over the lot.
        names, values = "\n".join(headers), "".join(headers.values())
        if (
            _TOKENS.fullmatch(names)
            and values.isascii()
            and _CONTROL.search(values) is None
            and not any(v[:1] in _SPACE or v[-1:] in _SPACE for v in headers.values())
        ):
            return
    except TypeError:
        pass  # a name or value that is not a string: found below
    for name, value in headers.items():
        if not isinstance(name, str) or _TOKEN.fullmatch(name) is None:
            raise InvalidRequestError(
                f"Cannot send to {shown_url(url)}: {_bad_name(name)}. A header name is "
                "letters, digits and !#$%&'*+-.^_`|~ only: give the value separately."
            )
        if not isinstance(value, str):
            raise InvalidRequestError(
                f"Cannot send to {shown_url(url)}: the header {name!r} has a value of type "
                f"{type(value).__name__}; header values are strings."
            )
        if value.isascii() and _CONTROL.search(value) is None:
            if value[:1] not in _SPACE and value[-1:] not in _SPACE:
                continue
            # HTTP drops it (RFC 9110 5.5), so a key would not be sent as given: h11
            # refuses it, a server may not. A key pasted from somewhere often has it.
            raise InvalidRequestError(
                f"Cannot send to {shown_url(url)}: the value of the header {name!r} starts or "
                "ends with whitespace, which HTTP does not keep. Strip the value (an API key "
                "copied with a space, or read from a file with a newline, has it)."
            )
        if "\r" in value or "\n" in value or "\0" in value:
            what = "a line break or NUL, which would end the header and start another"
        elif not value.isascii():
            what = "a character that is not ASCII, which HTTP headers cannot carry"
        else:
            what = "a control character, which HTTP headers cannot carry"
        raise InvalidRequestError(
            f"Cannot send to {shown_url(url)}: the value of the header {name!r} holds {what}. "
            "Fix the value (an API key read from a file often ends with a newline)."
        )


def _bad_name(name: object) -> str:
    if not isinstance(name, str):
        return f"a header name of type {type(name).__name__}"
    if not name:
        return "a header has an empty name"
    # Shown only up to the first character refused: a name like "Authorization: Bearer
    # sk-..." (a whole header line given as its name) must not show the key after it.
    found = _NOT_TOKEN.search(name)
    assert found is not None
    return (
        f"the header name {name[: found.start()]!r}... holds {found.group()!r} "
        f"(at position {found.start()}), which header names cannot hold"
    )


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


@runtime_checkable
class LendableBody(Protocol):
    """A body iterator whose pending read another task can take over (optional).

    With read-ahead, a reader task awaits the body while the consumer awaits the reader:
    every chunk wakes one, then the other. A body that can hand the read it is waiting
    on to another task lets a consumer that is already waiting read for itself, woken
    once, while the reader task stays asleep. :class:`~llmstream.AsyncioTransport`'s
    body can (the bytes wait in its protocol whoever reads them); a body that loses
    bytes when a read is given up cannot.

    Example::

        if isinstance(reader, LendableBody):
            data = reader.take_ready() or b""
    """

    @property
    def settled(self) -> bool:
        """The body ended or broke: only the task awaiting ``__anext__`` should see it."""

    def take_ready(self) -> bytes:
        """The body bytes that arrived and were not read yet (``b""``: none); never waits."""

    def wait_instead(self) -> Awaitable[None]:
        """Wait for the next arrival in place of the task awaiting ``__anext__``.

        That task is not woken by what arrives meanwhile; once this wait ends, it is
        again (by what arrives next).
        """

    def wake_reader(self) -> None:
        """Wake the task awaiting ``__anext__``: it returns ``b""`` if nothing arrived."""


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


class CountedResponse:
    """A response counted among its transport's streams in flight until released, once.

    Example::

        class MyResponse(CountedResponse):
            def abort(self) -> None:
                if self._release():
                    ...  # cut the connection, once
    """

    __slots__ = ("_in_flight", "_released")

    def __init__(self, in_flight: InFlight | None) -> None:
        self._in_flight = in_flight  # None: not counted (a request that is not a stream)
        self._released = False

    def _release(self) -> bool:
        """Count the response as released; False when it already was."""
        if self._released:
            return False
        self._released = True
        if self._in_flight is not None:
            self._in_flight.add(-1)
        return True


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


def proxy_port(proxy: EnvProxy, parts: SplitResult) -> int:
    """The port of ``proxy`` (``parts`` is its URL, split), 80 when it names none.

    A port that is not a number from 0 to 65535 is an
    :class:`~llmstream.InvalidRequestError` naming the variable that set it (credentials
    in the URL masked).

    Example::

        proxy_port(proxy, urlsplit("http://proxy:3128"))  # 3128
    """
    try:
        return parts.port or 80
    except ValueError:
        raise InvalidRequestError(
            f"{proxy.variable}={proxy.shown} is not a valid proxy URL: its port is not a "
            "number from 0 to 65535. Fix it, add the server's host to NO_PROXY, or unset it."
        ) from None


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
