"""The default transport: httpx, with the fast body reader where it applies.

Implements :mod:`llmstream._transport` on an ``httpx.AsyncClient`` / ``httpx.Client``
(the client's own, or one the caller brings). Bodies are read with
:func:`~llmstream._body.aiter_body` / :func:`~llmstream._body.iter_body`, which take the
fast path where it is on and httpx's public iterators elsewhere. Aborting shuts the
socket down (``shutdown()`` wakes a blocked read and sends the FIN at once; closing the
file descriptor does neither).

Misuse that httpx reports with a bare ``RuntimeError`` or ``ImportError`` becomes an
:class:`~llmstream.InvalidRequestError` that says what to do: a closed client, a client
carried from one event loop to the next (its pool is remade instead when it is the
client's own), a SOCKS proxy in the environment without ``socksio``.

Example::

    transport = HttpxAsyncTransport(own_async_client(None), owns_client=True)
    response = await transport.send(request)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from urllib.parse import urlsplit

import anyio
import httpx

from . import _fastpath
from ._body import aiter_body, iter_body
from ._call import ReadFailure
from ._config import DEFAULT_LIMITS, EnvProxy, env_proxy, missing_socks_error
from ._errors import InvalidRequestError
from ._header_wait import HeaderWait, connect_tracer, shut_down, waiting_for_headers, watch_pool
from ._http_errors import connection_error
from ._transport import (
    HeaderTimeout,
    HTTPRequest,
    InFlight,
    no_limit,
    proxy_port,
    request_headers,
)

__all__ = [
    "HttpxAsyncTransport",
    "HttpxSyncTransport",
    "closed_error",
    "own_async_client",
    "own_async_transport",
    "own_cuttable_sync_client",
    "own_sync_client",
]


def own_async_client(transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
    """The httpx client an :class:`~llmstream.AsyncClient` makes for itself.

    Redirects are not followed: one to another host would carry the API key.

    Example::

        http = own_async_client(None)
    """
    try:
        return httpx.AsyncClient(follow_redirects=False, transport=transport, limits=DEFAULT_LIMITS)
    except ImportError as exc:  # a SOCKS proxy in the environment, without socksio
        raise missing_socks_error(exc) from exc


def own_async_transport(
    http_client: httpx.AsyncClient | None, transport: httpx.AsyncBaseTransport | None
) -> HttpxAsyncTransport:
    """An :class:`~llmstream.AsyncClient`'s httpx transport: on the caller's client, or its own.

    A pool of its own is remade in a new event loop; a client or transport passed in
    keeps its own.

    Example::

        transport = own_async_transport(None, None)
    """
    if http_client is not None:
        return HttpxAsyncTransport(http_client, owns_client=False)
    if transport is not None:
        return HttpxAsyncTransport(own_async_client(transport), owns_client=True)
    return HttpxAsyncTransport(
        own_async_client(None), owns_client=True, remake=lambda: own_async_client(None)
    )


def own_sync_client(
    transport: httpx.BaseTransport | None, *, keep_alive: bool = True
) -> httpx.Client:
    """The httpx client a :class:`~llmstream.Client` makes for itself (as :func:`own_async_client`).

    ``keep_alive=False``: no connection is kept idle, each request opens its own.

    Example::

        http = own_sync_client(None)
    """
    limits = DEFAULT_LIMITS if keep_alive else _NO_KEEP_ALIVE
    try:
        return httpx.Client(follow_redirects=False, transport=transport, limits=limits)
    except ImportError as exc:
        raise missing_socks_error(exc) from exc


_NO_KEEP_ALIVE = httpx.Limits(
    max_connections=DEFAULT_LIMITS.max_connections, max_keepalive_connections=0
)


def own_cuttable_sync_client() -> tuple[httpx.Client, bool]:
    """The sync client's own httpx client, whose requests can be cut while they wait.

    With the fast path on, its pools hand out sockets a :class:`HeaderWait` can reach
    (:func:`~llmstream._header_wait.watch_pool`): ``(client, False)``. Off, nothing below
    httpx's public API is touched: the client keeps no idle connection, so every request
    opens one of its own, which httpx's ``trace`` request extension hands to the wait
    (:func:`~llmstream._header_wait.connect_tracer`): ``(client, True)``, and each request
    must carry that extension. The cost is a new connection per stream.

    Example::

        http, traced = own_cuttable_sync_client()
    """
    if _fastpath.enabled():
        http = own_sync_client(None)
        if watch_pool(http):
            return http, False
        http.close()  # the gate closed while it looked: the public way
    return own_sync_client(None, keep_alive=False), True


# Sending a chat request's body: small, so a long wait means a dead peer.
_WRITE_TIMEOUT = 30.0


def _build(
    http: httpx.AsyncClient | httpx.Client, request: HTTPRequest, in_flight: InFlight
) -> httpx.Request:
    headers = request_headers(request, in_flight)
    connect = request.connect_timeout
    timeout = httpx.Timeout(
        connect=connect, read=request.read_timeout, write=_WRITE_TIMEOUT, pool=connect
    )
    return http.build_request(
        request.method, request.url, json=request.json, headers=headers, timeout=timeout
    )


def _send_error(
    exc: BaseException, request: HTTPRequest, http: httpx.AsyncClient | httpx.Client, block: str
) -> BaseException:
    """What a failed send raises: ``exc`` itself when it is not the transport's to explain."""
    if isinstance(exc, httpx.HTTPError):
        if request.stream and isinstance(exc, httpx.ReadTimeout):
            return HeaderTimeout(str(exc))  # no headers in time: a deadline of the call
        # httpx takes proxies from the environment unless told not to (trust_env).
        proxy = env_proxy(request.url) if http.trust_env else None
        if proxy is not None:
            invalid = _invalid_proxy(proxy)
            if invalid is not None:
                return invalid
        return connection_error(exc, request.url, request.connect_timeout, proxy=proxy)
    if http.trust_env and isinstance(exc, Exception):
        # A proxy port out of range: httpx takes the URL, asyncio's socket refuses it.
        proxy = env_proxy(request.url)
        invalid = _invalid_proxy(proxy) if proxy is not None else None
        if invalid is not None:
            return invalid
    if isinstance(exc, RuntimeError):
        if http.is_closed:
            return closed_error(block)
        if "Event loop is closed" in str(exc):
            return InvalidRequestError(
                "This client's connection pool holds connections of an event loop that has "
                "ended (each asyncio.run() makes a new one); a client belongs to one event "
                "loop. Make the client inside the loop that uses it (in the function "
                "asyncio.run() runs), or use a new http_client in each loop."
            )
    return exc


def _invalid_proxy(proxy: EnvProxy) -> InvalidRequestError | None:
    """The error for the environment's ``proxy`` when its port is out of range.

    httpx takes such a URL; the socket then refuses it (``OverflowError`` on asyncio, a
    connection refused to another port with blocking sockets).
    """
    try:
        proxy_port(proxy, urlsplit(proxy.url))
    except InvalidRequestError as exc:
        return exc
    except ValueError:
        pass  # not a URL at all: httpx said so
    return None


def closed_error(block: str) -> InvalidRequestError:
    """The error for a request sent through a client that was closed.

    Example::

        raise closed_error("async with")
    """
    return InvalidRequestError(
        "The client (or the http_client it was given) was closed: make a new one, or don't "
        f"use it after its `{block}` block ended."
    )


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None  # trio: a pool's connections work from one trio.run() to the next


def _read_failure(exc: Exception) -> ReadFailure | None:
    if isinstance(exc, httpx.TimeoutException):
        return ReadFailure("timeout", f"{type(exc).__name__}: {exc}")
    if isinstance(exc, httpx.DecodingError):
        return ReadFailure("decode", str(exc))
    if isinstance(exc, httpx.HTTPError):
        return ReadFailure("broken", f"{type(exc).__name__}: {exc}")
    return None


_NO_BODY = httpx.ByteStream(b"")


def unbind(response: httpx.Response) -> None:
    """Free a closed response's body stream from it.

    httpx's response and its body stream refer to each other: a cycle that outlives the
    call until the collector's next full pass, and with many calls in flight makes
    those passes longer and more frequent. Closed, the body is never read again; an
    empty one (as httpx itself leaves after ``read()``) breaks the cycle.

    Example::

        with http.stream("GET", url) as response:
            page = response.read()
        unbind(response)
    """
    response.stream = _NO_BODY


class _Response:
    """What both response wrappers share: status, headers, the end of the body, abort."""

    __slots__ = ("_ended", "_in_flight", "_reader", "_released", "_response")

    def __init__(self, response: httpx.Response, in_flight: InFlight | None) -> None:
        self._response = response
        self._in_flight = in_flight  # None: not counted (a request that is not a stream)
        self._reader: object = None
        self._ended = False
        self._released = False

    @property
    def status_code(self) -> int:
        return self._response.status_code

    @property
    def reason_phrase(self) -> str:
        return self._response.reason_phrase

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    @property
    def body_done(self) -> bool:
        return self._ended or getattr(self._reader, "ended", False)

    def read_failure(self, exc: Exception) -> ReadFailure | None:
        return _read_failure(exc)

    def body_ended(self) -> None:
        self._ended = True

    def _shut_down(self) -> bool:
        """Shut the socket down; False when there is none (an in-process transport)."""
        return shut_down(self._response.extensions.get("network_stream"))

    def _set_body_timeout(self, body_timeout: float | None) -> None:
        # httpcore reads this when the body's first read starts, which is after now.
        timeout = self._response.request.extensions.get("timeout")
        if isinstance(timeout, dict):
            timeout["read"] = no_limit(body_timeout)  # socket.settimeout() refuses inf

    def _unbind(self) -> None:
        unbind(self._response)

    def _release(self) -> bool:
        """Count the response as released; False when it already was."""
        if self._released:
            return False
        self._released = True
        self._uncount()
        return True

    def _uncount(self) -> None:
        """Take the response out of the in-flight count, once."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.add(-1)


# Closes of dropped responses under way (_AsyncResponse.__del__).
_closing: set[asyncio.Task[None]] = set()


def _closed(task: asyncio.Task[None]) -> None:
    _closing.discard(task)
    if not task.cancelled():
        task.exception()  # a connection already broken may fail to close: nobody to tell


class _AsyncResponse(_Response):
    __slots__ = ("_loop",)

    def __init__(
        self,
        response: httpx.Response,
        in_flight: InFlight | None,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        super().__init__(response, in_flight)
        self._loop = loop  # the asyncio loop its connection belongs to; None: trio

    async def read(self, limit: int) -> bytes:
        body = bytearray()
        try:
            async for part in self._response.aiter_bytes():
                body += part
                if len(body) >= limit:
                    break
        except httpx.HTTPError:
            pass  # the status is the error; a body cut short still tells what it can
        self._ended = len(body) < limit  # read whole: the connection can be reused
        return bytes(body)

    def stream(self, body_timeout: float | None) -> AsyncIterator[bytes]:
        self._set_body_timeout(body_timeout)
        # The shell enforces the call's deadlines itself, by cancelling reads.
        reader = aiter_body(self._response, watched=True)
        self._reader = reader
        return reader

    def abort(self) -> None:
        if not self.body_done:
            self._shut_down()
            # A stream dropped unclosed is aborted and never closed: its place in the
            # in-flight count goes now (once), or every request would soon be sent
            # Connection: close. httpcore gives the pool slot back only in its async
            # close: see __del__.
            self._uncount()

    def __del__(self) -> None:
        # Dropped without aclose() (a stream dropped unclosed): httpcore's pool keeps the
        # request's slot until the response is closed, and closing it must be awaited.
        # On asyncio it is closed in a task of the loop; nothing can be started here
        # under trio, where the slot stays taken until the client is closed.
        if self._released:
            return
        self._uncount()
        loop = _running_loop()
        if loop is None or loop is not self._loop:
            return  # another thread's loop (or none) cannot close this connection
        task = loop.create_task(self._response.aclose())
        _closing.add(task)  # a task only the loop refers to may be collected mid-way
        task.add_done_callback(_closed)

    async def aclose(self) -> None:
        if not self._release():
            return
        if not self.body_done:
            self._shut_down()  # an unread body: the server must see the close now
        with anyio.CancelScope(shield=True):
            reader = self._reader
            close = getattr(reader, "aclose", None)
            if close is not None:
                await close()
            await self._response.aclose()
        self._unbind()


class _SyncResponse(_Response):
    __slots__ = ()

    def read(self, limit: int) -> bytes:
        body = bytearray()
        try:
            for part in self._response.iter_bytes():
                body += part
                if len(body) >= limit:
                    break
        except httpx.HTTPError:
            pass
        self._ended = len(body) < limit
        return bytes(body)

    def stream(self, body_timeout: float | None) -> Iterator[bytes]:
        self._set_body_timeout(body_timeout)
        reader = iter_body(self._response)
        self._reader = reader
        return reader

    def abort(self) -> None:
        # Shutting the socket down wakes a thread blocked in recv(); an in-process
        # transport is woken by closing the response.
        if not self.body_done and not self._shut_down():
            self._response.close()

    def close(self) -> None:
        if not self._release():
            return
        if not self.body_done:
            self._shut_down()
        self._response.close()
        self._unbind()


class HttpxAsyncTransport:
    """The async transport on an ``httpx.AsyncClient``.

    ``remake`` makes a new client like this one: when the client is used in a new
    event loop after the one it was used in ended (a second ``asyncio.run()``), its
    pooled connections belong to the old loop, and a new client replaces it.

    Example::

        transport = HttpxAsyncTransport(httpx.AsyncClient(), owns_client=True)
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        owns_client: bool,
        remake: Callable[[], httpx.AsyncClient] | None = None,
    ) -> None:
        self.http = http
        self._owns_client = owns_client
        self._remake = remake
        self._in_flight = InFlight()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def requests_in_flight(self) -> int:
        """Streams sent and not yet released."""
        return self._in_flight.count

    def _follow_loop(self) -> None:
        """Remake our own client when the loop its connections belong to has stopped."""
        loop = _running_loop()
        previous, self._loop = self._loop, loop
        if previous is None or loop is None or previous is loop or previous.is_running():
            return
        if self._remake is not None:
            # The old client is left unclosed: closing its connections needs the loop they
            # were opened in, which is gone (asyncio's own cleanup closes their sockets).
            self.http = self._remake()

    async def send(self, request: HTTPRequest) -> _AsyncResponse:
        """Send ``request``; returns once the response headers arrived."""
        if self.http.is_closed:
            raise closed_error("async with")
        self._follow_loop()
        http = self.http
        built = _build(http, request, self._in_flight)
        counted = self._in_flight if request.stream else None
        if counted is not None:
            counted.add(1)
        try:
            response = await http.send(built, stream=request.stream)
        except BaseException as exc:
            if counted is not None:
                counted.add(-1)
            error = _send_error(exc, request, http, "async with")
            if error is exc:
                raise
            raise error from exc
        return _AsyncResponse(response, counted, self._loop)

    async def aclose(self) -> None:
        """Close the connection pool (not a client the caller passed in)."""
        if self._owns_client:
            # In a later event loop (asyncio.run(client.aclose())), the pool's connections
            # cannot be closed: a new, empty pool is made, and that one closed.
            self._follow_loop()
            with anyio.CancelScope(shield=True):
                await self.http.aclose()


class HttpxSyncTransport:
    """The blocking transport on an ``httpx.Client``; safe to share between threads.

    Example::

        transport = HttpxSyncTransport(httpx.Client(), owns_client=True)
    """

    def __init__(
        self, http: httpx.Client, *, owns_client: bool, trace_connects: bool = False
    ) -> None:
        self.http = http
        self._owns_client = owns_client
        # A header wait learns of each request's connection through httpx's public trace
        # extension (see own_cuttable_sync_client): only a pool that keeps none idle.
        self._trace_connects = trace_connects
        self._in_flight = InFlight()

    @property
    def requests_in_flight(self) -> int:
        """Streams sent and not yet released."""
        return self._in_flight.count

    def send(self, request: HTTPRequest, header_wait: HeaderWait | None = None) -> _SyncResponse:
        """Send ``request``; ``header_wait.cut()`` from another thread stops the wait."""
        if self.http.is_closed:
            raise closed_error("with")
        built = _build(self.http, request, self._in_flight)
        if header_wait is not None and self._trace_connects:
            built.extensions["trace"] = connect_tracer(header_wait)
        counted = self._in_flight if request.stream else None
        if counted is not None:
            counted.add(1)
        try:
            if header_wait is None:
                response = self.http.send(built, stream=request.stream)
            else:
                with waiting_for_headers(header_wait):
                    response = self.http.send(built, stream=request.stream)
        except BaseException as exc:
            if counted is not None:
                counted.add(-1)
            error = _send_error(exc, request, self.http, "with")
            if error is exc:
                raise
            raise error from exc
        return _SyncResponse(response, counted)

    def close(self) -> None:
        """Close the connection pool (not a client the caller passed in)."""
        if self._owns_client:
            self.http.close()
