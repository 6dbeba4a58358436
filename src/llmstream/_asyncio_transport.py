"""The transport seam straight on asyncio's sockets: HTTP/1.1, no HTTP library.

With hundreds of streams on one event loop, what a stream costs to open decides the tail
of every other stream's delays (docs/many-streams.md): the HTTP library's share of that
cost is the larger part. This transport does what a chat stream needs with one
:class:`asyncio.Protocol` per connection: the request written in one piece, the response
head and body parsed by :mod:`llmstream._http11` as bytes arrive, body bytes handed to
the reading task a network read at a time, and connections kept for reuse in a pool.

What it keeps the same as the other transports:

- a request that got no response fails with the error the same failure gets on httpx
  (:func:`~llmstream._http_errors.send_failure_error`), and a body read that fails is
  described by :meth:`_AsyncioResponse.read_failure`;
- :meth:`_AsyncioResponse.abort` shuts the socket down before returning, so the server
  sees the close at once (vLLM aborts the generation and frees its KV cache); a body read
  to its end gives the connection back to the pool;
- reading is bounded: past ``_HIGH_WATER`` bytes not yet taken by the stream, the
  connection stops reading from the socket until the stream catches up, so a slow
  consumer holds the server back (TCP flow control) instead of filling memory;
- the environment's proxies are read by the same rules (``HTTP_PROXY``, ``HTTPS_PROXY``,
  ``ALL_PROXY``, ``NO_PROXY``): an ``http://`` proxy forwards plain HTTP requests and
  tunnels HTTPS ones (``CONNECT``), as aiohttp does.

What it does not do: HTTP/2, SOCKS proxies, redirects (the API key must not follow one to
another host: the other transports do not follow them either). asyncio only (and
uvloop): under trio a request raises :class:`~llmstream.InvalidRequestError`.

Example::

    async with llmstream.AsyncClient(transport=llmstream.AsyncioTransport()) as client:
        ...
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import anyio
import httpx

from ._call import ReadFailure
from ._config import EnvProxy, env_proxy, http_proxy_settings
from ._errors import InvalidRequestError
from ._header_wait import shut_down
from ._http11 import (
    ContentDecodingError,
    HTTPProtocolError,
    ResponseHead,
    ResponseParser,
    request_bytes,
)
from ._http_errors import send_failure_error
from ._httpx_transport import closed_error
from ._read_cut import cut_after
from ._transport import (
    CountedResponse,
    HeaderTimeout,
    HTTPRequest,
    InFlight,
    PooledTransport,
    asyncio_loop,
    json_body,
    proxy_port,
)

__all__ = ["AsyncioTransport"]

# Below uvicorn's (vLLM's server) 5 s keep-alive, as httpx's: a pooled connection is not
# reused just as the server closes it.
_KEEPALIVE_SECONDS = 4.0
# Body bytes held for the stream before the socket is no longer read (until the stream
# takes them): a few hundred chunks of a chat stream, far beyond what one read brings.
_HIGH_WATER = 256 * 1024
# How long a host name's addresses are used before it is looked up again (aiohttp's TTL):
# a burst of new connections to one name makes one lookup, not one each in the executor.
_DNS_SECONDS = 10.0


class ConnectionBroken(Exception):
    """The connection ended, or the server sent what is not HTTP, before the body ended."""


class BodyNotDecoded(ConnectionBroken):
    """The body's ``Content-Encoding`` would not decode."""


def _outcome_seen(task: asyncio.Task[list[str]]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: asyncio does not log it as never seen


class _ProxyRefused(Exception):
    """The proxy answered a CONNECT with something other than 2xx."""


# What a pooled connection leads to: (scheme, host, port, the proxy it goes through).
_Key = tuple[str, str, int, str]


@dataclass(frozen=True, slots=True)
class _Route:
    """How a URL is reached: where to connect, what to send, through which proxy."""

    key: _Key
    address: tuple[str, int]  # where the TCP connection goes: the server, or the proxy
    target: str  # the request target: a path, or the whole URL for a forwarding proxy
    host_header: str
    tls_host: str | None  # the server's name for TLS; None: plain HTTP
    tunnel: bytes | None  # the CONNECT request to send the proxy first (https through it)
    proxy_headers: dict[str, str]  # credentials for a proxy that forwards plain HTTP
    proxy: EnvProxy | None
    named: bool = False  # the host connected to is a name to look up, not an address

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.address[0])
        except ValueError:
            object.__setattr__(self, "named", True)


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: parses what arrives, wakes the task waiting on it."""

    __slots__ = (
        "_buffered",
        "_parts",
        "_paused",
        "_stand_in",
        "_waiter",
        "broken",
        "closed",
        "counted",
        "head",
        "idle_since",
        "key",
        "loop",
        "parser",
        "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, key: _Key) -> None:
        self.loop = loop
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser: ResponseParser | None = None
        self.head: ResponseHead | None = None
        self._parts: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._stand_in: asyncio.Future[None] | None = None  # see wait_in_place()
        self.broken: Exception | None = None
        """What ended the body before its end (a read raises it)."""
        self.closed = False
        """The server closed the connection, or sent what it should not: never reused."""
        self.idle_since = 0.0
        self.counted = False  # among the transport's open connections

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A socket transport (uvloop's is not an asyncio.Transport subclass, but has its API).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None or parser.ended:
            # Bytes with no request waiting (a server closing an idle connection may say
            # so with a 408): the connection is not reused.
            self.close()
            return
        try:
            if self.head is None:
                head = parser.feed_head(data)
                if head is None:
                    return
                self.head = head
                data = b""
            parts = parser.feed_body(data)
        except ContentDecodingError as exc:
            self.fail(BodyNotDecoded(str(exc)))
            return
        except HTTPProtocolError as exc:
            self.fail(ConnectionBroken(str(exc)))
            return
        for part in parts:
            self._parts.append(part)
            self._buffered += len(part)
        # A compressed body's bytes not yet decoded count too: they come out in steps
        # as the stream takes what is held (take()).
        held = self._buffered + parser.backlog
        if held > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self.wake()

    def eof_received(self) -> bool:
        self._ended_by_server()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.fail(ConnectionBroken(f"{type(exc).__name__}: {exc}"))
        else:
            self._ended_by_server()

    # -- what the transport and the response use ----------------------------------------

    def _ended_by_server(self) -> None:
        parser = self.parser
        if parser is None or parser.ended:
            self.closed = True  # after a whole response, or idle: not an error
            return
        if self.head is None:
            self.fail(ConnectionBroken("the server closed the connection without a response"))
            return
        try:
            parts = parser.feed_eof()
        except HTTPProtocolError as exc:
            self.fail(ConnectionBroken(str(exc)))
            return
        for part in parts:
            self._parts.append(part)
            self._buffered += len(part)
        self.wake()

    def fail(self, exc: Exception) -> None:
        """End the connection; the body being read (if any) ends with ``exc``."""
        parser = self.parser
        whole = parser is not None and parser.complete and not isinstance(exc, BodyNotDecoded)
        if self.broken is None and not whole:  # a body read whole stays whole
            self.broken = exc
        self.closed = True
        self.wake()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.abort()

    def wake(self) -> None:
        """Wake the task waiting on this connection: the one waiting in place, if any."""
        stand_in = self._stand_in
        if stand_in is not None:
            # The task in wait() sleeps on: whoever waits in its place reads for it.
            self._stand_in = None
            if not stand_in.done():
                stand_in.set_result(None)
            return
        self.wake_waiter()

    def wake_waiter(self) -> None:
        """Wake the task in :meth:`wait`, even while another waits in its place."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self) -> None:
        """Until something arrives (head, body bytes, the end, a failure)."""
        waiter = self._waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    async def wait_in_place(self) -> None:
        """Until something arrives, in place of the task in :meth:`wait`, not woken meanwhile."""
        stand_in = self._stand_in = self.loop.create_future()
        try:
            await stand_in
        except BaseException:
            if self._stand_in is stand_in:
                self._stand_in = None
            elif self._parts or self.broken is not None or (self.parser and self.parser.ended):
                self.wake_waiter()  # it came as this wait was cut: the reader's to read
            raise

    async def tunnel(self, connect: bytes) -> None:
        """Ask the proxy for a tunnel (``CONNECT``); raises unless it answers 2xx."""
        self.start(connect, head_request=True)  # a CONNECT's answer has no body
        while self.head is None and self.broken is None:
            await self.wait()
        head = self.head
        if head is None:
            raise self.broken or ConnectionBroken("the proxy closed the connection")
        if not 200 <= head.status < 300:
            raise _ProxyRefused(f"{head.status} {head.reason}".strip())
        self.parser = None
        self.head = None

    def start(self, data: bytes, head_request: bool) -> None:
        """Send one request on this connection."""
        self.parser = ResponseParser(head_request=head_request)
        self.head = None
        assert self.transport is not None
        self.transport.write(data)

    def take(self) -> bytes:
        """Every body byte held, joined; b"" when none.

        With none held, the next step of a compressed body's output, if one waits.
        """
        parts = self._parts
        parser = self.parser
        if not parts and parser is not None and parser.pending and self.broken is None:
            self._decode_step(parser)
        data = b""
        if parts:
            data = parts.popleft() if len(parts) == 1 else b"".join(parts)
            parts.clear()
            self._buffered = 0
        backlog = parser.backlog if parser is not None else 0
        if self._paused and self.transport is not None and backlog <= _HIGH_WATER:
            self._paused = False
            self.transport.resume_reading()
        return data

    def _decode_step(self, parser: ResponseParser) -> None:
        try:
            parts = parser.feed_body(b"")
        except ContentDecodingError as exc:
            self.fail(BodyNotDecoded(str(exc)))
            return
        for part in parts:
            self._parts.append(part)
            self._buffered += len(part)

    @property
    def body_ended(self) -> bool:
        parser = self.parser
        return parser is not None and parser.ended and not self._parts and self.broken is None

    @property
    def reusable(self) -> bool:
        parser = self.parser
        transport = self.transport
        return (
            self.broken is None
            and not self.closed
            and parser is not None
            and parser.reusable
            and not self._parts
            and transport is not None
            and not transport.is_closing()
        )

    @property
    def idle_usable(self) -> bool:
        """A pooled connection that can carry a request: the server has not closed it."""
        transport = self.transport
        return (
            self.broken is None
            and not self.closed
            and transport is not None
            and not transport.is_closing()
        )

    def close(self) -> None:
        self.closed = True
        transport = self.transport
        if transport is not None:
            transport.abort()


class _Body:
    """A response's body by network read.

    Its pending read can be taken over by another task (a :class:`LendableBody`): the
    bytes wait in the connection, whichever task takes them.
    """

    __slots__ = ("_connection", "_poked", "ended")

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self._poked = False
        self.ended = False

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        connection = self._connection
        while True:
            data = connection.take()
            if data:
                return data
            if connection.broken is not None:  # a body that would not decode ends too
                raise connection.broken
            parser = connection.parser
            if parser is not None and parser.ended:
                self.ended = True
                raise StopAsyncIteration
            if self._poked:
                self._poked = False
                return b""  # woken by wake_reader() to look at its call again
            await connection.wait()

    # -- LendableBody --------------------------------------------------------------

    @property
    def settled(self) -> bool:
        connection = self._connection
        parser = connection.parser
        return connection.broken is not None or (parser is not None and parser.ended)

    def take_ready(self) -> bytes:
        return self._connection.take()

    def wait_instead(self) -> Awaitable[None]:
        return self._connection.wait_in_place()

    def wake_reader(self) -> None:
        self._poked = True
        self._connection.wake_waiter()


class _AsyncioResponse(CountedResponse):
    """A response whose headers arrived, on a connection of :class:`AsyncioTransport`."""

    __slots__ = (
        "_connection",
        "_ended",
        "_headers",
        "_pool",
        "_read_timeout",
        "_reader",
        "_status",
    )

    def __init__(
        self,
        connection: _Connection,
        head: ResponseHead,
        pool: AsyncioTransport,
        in_flight: InFlight | None,
        read_timeout: float | None,
    ) -> None:
        super().__init__(in_flight)
        self._connection = connection
        self._read_timeout = read_timeout
        self._status = head
        self._headers = httpx.Headers(head.headers)
        self._pool = pool
        self._reader: _Body | None = None
        self._ended = False

    @property
    def status_code(self) -> int:
        return self._status.status

    @property
    def reason_phrase(self) -> str:
        return self._status.reason

    @property
    def headers(self) -> Mapping[str, str]:
        return self._headers

    @property
    def body_done(self) -> bool:
        return self._ended or self._connection.body_ended

    async def read(self, limit: int) -> bytes:
        body = bytearray()
        reader = _Body(self._connection)
        # As the header wait: a body that stalls ends the read (what arrived is returned).
        with cut_after(self._read_timeout):
            try:
                while len(body) < limit:
                    body += await reader.__anext__()
            except StopAsyncIteration:
                self._ended = True
            except ConnectionBroken:
                pass  # the status is the error; a body cut short still tells what it can
        return bytes(body[:limit])

    def stream(self, body_timeout: float | None) -> AsyncIterator[bytes]:
        # body_timeout is not armed: the shell watches the call's deadlines beside every
        # read and cancels the read a deadline ends.
        reader = self._reader = _Body(self._connection)
        return reader

    def read_failure(self, exc: Exception) -> ReadFailure | None:
        if isinstance(exc, BodyNotDecoded):
            return ReadFailure("decode", str(exc))
        if isinstance(exc, ConnectionBroken):
            return ReadFailure("broken", f"{type(exc).__name__}: {exc}")
        return None

    def body_ended(self) -> None:
        self._ended = True

    def abort(self) -> None:
        # Once released, the connection may carry another request: it is not this one's.
        if self._released or self.body_done:
            return
        self._cut()
        # A stream dropped unclosed is aborted and never closed: its pool slot and its
        # place in the in-flight count are given back now (a later aclose() does nothing).
        self._release()
        self._pool.forget(self._connection)

    def _cut(self) -> None:
        connection = self._connection
        if connection.transport is not None:
            # asyncio closes a transport's socket on the loop's next turn; shutdown() sends
            # the FIN now, even if the loop is held up.
            shut_down(connection.transport)
        connection.fail(ConnectionBroken("the connection was closed by the client"))

    async def aclose(self) -> None:
        if not self._release():
            return
        connection = self._connection
        if self.body_done and connection.reusable:
            self._ended = True
            self._pool.give_back(connection)
            return
        if self.body_done:
            connection.close()  # read whole, but the server asked to close it
        else:
            self._cut()  # an unread body: the server must see the close now
        self._pool.forget(connection)


def _own_headers(request: HTTPRequest, host: str) -> tuple[dict[str, str], str]:
    """The request's headers to send, and the Host header: the caller's, if it set one.

    The body's framing is this transport's: a caller's ``Content-Length`` or
    ``Transfer-Encoding`` would contradict it (and the server would read the next
    request from the body), so it is refused.
    """
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        lower = name.lower()
        if lower == "host":
            host = value  # as httpx lets a caller set it: sent once, in place of ours
        elif lower in ("content-length", "transfer-encoding"):
            raise InvalidRequestError(
                f"Cannot send to {request.url}: the {name} header is the transport's to set "
                "(it frames the body it sends). Remove it from the headers."
            )
        else:
            headers[name] = value
    return headers, host


class AsyncioTransport(PooledTransport):
    """Sends an :class:`~llmstream.AsyncClient`'s requests over HTTP/1.1 on asyncio itself.

    The cheapest transport to open a stream and to read one: for hundreds of streams on
    one event loop (see the many-streams guide). Pass it as ``transport=``; the client
    closes it with itself. Up to ``max_connections`` connections at a time (a request
    beyond them waits for one, up to its connect timeout), kept for reuse 4 s; a host
    name is looked up once per 10 s.
    ``trust_env`` takes ``http://`` proxies from the environment as the httpx transport
    does; ``verify`` is ``True`` (the system's CA certificates), ``False``, or an
    :class:`ssl.SSLContext`. Under trio, a request raises
    :class:`~llmstream.InvalidRequestError`.

    ``LLMSTREAM_HTTP_BACKEND=asyncio`` in the environment makes an ``AsyncClient``
    without ``http_client`` or ``transport`` use one with the defaults.

    Example::

        async with llmstream.AsyncClient(transport=llmstream.AsyncioTransport()) as client:
            async with client.stream("Hi") as stream:
                async for text in stream:
                    print(text, end="")
    """

    def _set_up(self) -> None:
        self._ssl: ssl.SSLContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Idle connections by where they lead, the most recently used last: a request takes
        # the warmest one, and the oldest are closed first once they expire.
        self._idle: dict[_Key, collections.deque[_Connection]] = {}
        self._open = 0
        self._slots: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False
        self._routes: dict[str, _Route] = {}
        # Each host name's addresses and when they expire, and the lookups under way.
        self._addresses: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._lookups: dict[tuple[str, int], asyncio.Task[list[str]]] = {}

    def _route(self, url: str) -> _Route:
        try:
            return self._routes[url]
        except KeyError:
            pass
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidRequestError(f"Cannot request {url}: not an http:// or https:// URL.")
        default = 443 if parts.scheme == "https" else 80
        try:
            port = parts.port or default
        except ValueError as exc:
            raise InvalidRequestError(f"Cannot request {url}: {exc}.") from None
        try:
            # The target percent-encoded and the host IDNA-encoded, as httpx sends them:
            # a path with a space or a non-ASCII character is sent as one request line.
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise InvalidRequestError(f"Cannot request {url}: {exc}.") from None
        host = parsed.raw_host.decode("ascii")
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if port == default else f"{shown}:{port}"
        path = parsed.raw_path.decode("ascii")
        tls_host = host if parts.scheme == "https" else None
        proxy = env_proxy(url) if self.trust_env else None
        if proxy is None:
            route = _Route(
                (parts.scheme, host, port, ""),
                (host, port),
                path,
                host_header,
                tls_host,
                None,
                {},
                None,
            )
        else:
            proxy_url, credentials = http_proxy_settings(proxy, "asyncio")
            through = urlsplit(proxy_url)
            address = (through.hostname or "", proxy_port(proxy, through))
            if tls_host is None:  # plain HTTP: the proxy forwards the request itself
                route = _Route(
                    ("http", *address, proxy_url),
                    address,
                    f"http://{host_header}{path}",
                    host_header,
                    None,
                    None,
                    credentials,
                    proxy,
                )
            else:  # HTTPS: a tunnel through the proxy, TLS with the server inside it
                connect = request_bytes(
                    "CONNECT", f"{shown}:{port}", f"{shown}:{port}", credentials, None
                )
                route = _Route(
                    ("https", host, port, proxy_url),
                    address,
                    path,
                    host_header,
                    tls_host,
                    connect,
                    {},
                    proxy,
                )
        self._routes[url] = route
        return route

    def _check_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio_loop("AsyncioTransport", "it speaks HTTP on asyncio's sockets")
        if self._loop is not loop:
            if self._loop is not None and self._loop.is_running():
                raise InvalidRequestError(
                    "This client is in use in another event loop (another thread's); a "
                    "client belongs to one event loop: make one in each."
                )
            # The loop the pooled connections belong to has ended (a second
            # asyncio.run()): they cannot be used here.
            self._idle.clear()
            self._open = 0
            self._slots.clear()
            self._loop = loop
        return loop

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            verify = self._verify
            if isinstance(verify, ssl.SSLContext):
                self._ssl = verify
            else:
                context = ssl.create_default_context()
                if not verify:
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                self._ssl = context
        return self._ssl

    def _pooled(self, key: _Key) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.idle_usable and now - connection.idle_since < _KEEPALIVE_SECONDS:
                return connection
            self._drop(connection)
        return None

    def give_back(self, connection: _Connection) -> None:
        if self._closed or connection.loop is not self._loop:
            connection.close()
            return
        connection.parser = None
        now = connection.idle_since = time.monotonic()
        idle = self._idle.get(connection.key)
        if idle is None:
            idle = self._idle[connection.key] = collections.deque()
        idle.append(connection)
        # The oldest idle connections are the first to expire: close them now, not when
        # the pool happens to reach them (after a burst, hundreds may wait there).
        while idle and (not idle[0].idle_usable or now - idle[0].idle_since >= _KEEPALIVE_SECONDS):
            self._drop(idle.popleft())
        self._release_slot()

    def forget(self, connection: _Connection) -> None:
        if not connection.counted:
            return
        connection.counted = False
        if connection.loop is self._loop:
            self._open -= 1
            self._release_slot()

    def _release_slot(self) -> None:
        while self._slots:
            waiter = self._slots.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _acquire(
        self, loop: asyncio.AbstractEventLoop, route: _Route, request: HTTPRequest
    ) -> _Connection:
        """A pooled connection on ``route``, or a new one once the pool has room for it.

        Waiting for room and connecting share the connect timeout, as in httpx's pool.
        """
        pooled = self._pooled(route.key)
        if pooled is not None:
            return pooled
        connection: _Connection | None = None
        proxy = route.proxy
        try:
            with cut_after(request.connect_timeout) as cut:
                connection = await self._room(loop, route.key)
                if connection is None:
                    connection = _Connection(loop, route.key)
                    self._open += 1
                    connection.counted = True
                    await self._connect(loop, connection, route)
        except BaseException as exc:
            if connection is not None:
                self._drop(connection)
            if isinstance(exc, _ProxyRefused):
                raise send_failure_error("proxy", exc, request.url, proxy=proxy) from exc
            if isinstance(exc, OSError | ssl.SSLError | ConnectionBroken):
                # Refused, unreachable, DNS, TLS; or a proxy that hung up on the CONNECT.
                raise send_failure_error("connect", exc, request.url, proxy=proxy) from exc
            raise
        if cut.cancelled_caught or connection is None:
            if connection is not None:
                self._drop(connection)
            waited = TimeoutError("no connection within the connect timeout")
            raise send_failure_error(
                "connect_timeout", waited, request.url, request.connect_timeout, proxy=proxy
            )
        return connection

    async def _room(self, loop: asyncio.AbstractEventLoop, key: _Key) -> _Connection | None:
        """A connection to ``key`` given back meanwhile, or None once one may be opened."""
        while True:
            pooled = self._pooled(key)
            if pooled is not None:
                return pooled
            if self._open < self.max_connections:
                return None
            for idle in self._idle.values():
                if idle:  # full, with idle connections to another host: close the oldest
                    self._drop(idle.popleft())
                    return None
            waiter: asyncio.Future[None] = loop.create_future()
            self._slots.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._release_slot()  # woken, but leaving: pass the wake-up on
                raise

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, connection: _Connection, route: _Route
    ) -> None:
        host, port = route.address
        addresses = await self._resolve(loop, host, port) if route.named else [host]
        context = self._ssl_context() if route.tls_host is not None else None
        direct = route.tunnel is None
        failure: OSError | None = None
        for address in addresses:  # in the resolver's order, as asyncio itself does
            try:
                await loop.create_connection(
                    lambda: connection,
                    address,
                    port,
                    ssl=context if direct else None,
                    server_hostname=route.tls_host if direct else None,
                )
                break
            except OSError as exc:
                failure = exc
        else:
            raise failure or OSError(f"no address for {host}")
        if direct:
            return
        assert route.tunnel is not None  # to the proxy: ask it for a tunnel
        await connection.tunnel(route.tunnel)
        assert connection.transport is not None and context is not None
        connection.transport = await loop.start_tls(
            connection.transport, connection, context, server_hostname=route.tls_host
        )

    async def _resolve(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> list[str]:
        """``host``'s addresses: known for ``_DNS_SECONDS``, one lookup at a time per name."""
        key = (host, port)
        known = self._addresses.get(key)
        if known is not None and known[0] > time.monotonic():
            return known[1]
        lookup = self._lookups.get(key)
        if lookup is None:
            lookup = self._lookups[key] = loop.create_task(self._look_up(loop, host, port))
            # Every waiter may have left (a deadline): its outcome is then nobody's.
            lookup.add_done_callback(_outcome_seen)
        # Shielded: one request's deadline must not end the lookup others wait for.
        return await asyncio.shield(lookup)

    async def _look_up(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> list[str]:
        try:
            found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except UnicodeError as exc:
            # The resolver IDNA-encodes the name first: an empty label (a..b) or one
            # over 63 characters fails there. A name that cannot be resolved, as httpx
            # reports it (a connection error naming the URL).
            raise socket.gaierror(
                socket.EAI_NONAME, f"{host!r} is not a valid host name ({exc})"
            ) from None
        finally:
            del self._lookups[(host, port)]
        addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
        self._addresses[(host, port)] = (time.monotonic() + _DNS_SECONDS, addresses)
        return addresses

    async def send(self, request: HTTPRequest) -> _AsyncioResponse:
        """Send ``request``; returns once the response headers arrived."""
        if self._closed:
            raise closed_error("async with")
        loop = self._check_loop()
        route = self._route(request.url)
        # Kept alive however many streams are in flight: taking a pooled connection is a
        # list's pop here, not a scan of the pool as in httpcore.
        # The headers were checked when the request was made (HTTPRequest).
        headers, host = _own_headers(request, route.host_header)
        if route.proxy_headers:
            headers.update(route.proxy_headers)
        body = None
        if request.json is not None:
            body = json_body(request.json)
            headers["Content-Type"] = "application/json"
        headers.setdefault("Accept", "*/*")
        data = request_bytes(request.method, route.target, host, headers, body)
        counted = self._in_flight if request.stream else None
        if counted is not None:
            counted.add(1)
        try:
            return await self._exchange(loop, route, request, data, counted)
        except BaseException:
            if counted is not None:
                counted.add(-1)
            raise

    async def _exchange(
        self,
        loop: asyncio.AbstractEventLoop,
        route: _Route,
        request: HTTPRequest,
        data: bytes,
        counted: InFlight | None,
    ) -> _AsyncioResponse:
        # A pooled connection the server closes just as it is reused fails the request as
        # any connection failure before a response does, for the retry policy to resend
        # (as httpx does): a resend here would hide it from the policy and its counts.
        connection = await self._acquire(loop, route, request)
        response = await self._on(connection, request, data, counted)
        if response is None:
            broken = connection.broken or ConnectionBroken("the server closed the connection")
            raise send_failure_error("other", broken, request.url, proxy=route.proxy)
        return response

    async def _on(
        self,
        connection: _Connection,
        request: HTTPRequest,
        data: bytes,
        counted: InFlight | None,
    ) -> _AsyncioResponse | None:
        """The response to ``data`` sent on ``connection``; None if it closed first."""
        with cut_after(request.read_timeout) as header_wait:
            try:
                connection.start(data, request.method == "HEAD")
                while connection.head is None and connection.broken is None:
                    await connection.wait()
            except BaseException:
                self._drop(connection)
                raise
        head = connection.head
        if header_wait.cancelled_caught:
            self._drop(connection)
            if request.stream:  # a deadline of the call: the shell decides what it means
                raise HeaderTimeout(f"no response headers within {request.read_timeout:g} s")
            waited = TimeoutError(f"no response within {request.read_timeout:g} s")
            raise send_failure_error("timeout", waited, request.url)
        if head is None:
            self._drop(connection)
            return None
        return _AsyncioResponse(connection, head, self, counted, request.read_timeout)

    def _drop(self, connection: _Connection) -> None:
        connection.close()
        self.forget(connection)

    async def aclose(self) -> None:
        """Close the pooled connections.

        Example::

            await transport.aclose()
        """
        self._closed = True
        idle, self._idle = self._idle, {}
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # its loop has ended (a second asyncio.run()): asyncio closes the sockets
        for connections in idle.values():
            for connection in connections:
                connection.close()
        await anyio.lowlevel.checkpoint()
