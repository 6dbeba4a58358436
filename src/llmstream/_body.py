"""Reading a response body a network read at a time instead of an HTTP chunk at a time.

vLLM sends one HTTP chunk per SSE event. httpx hands a body over one HTTP chunk per
iteration, through five generator layers and a context manager each (httpx's bound and
transport streams, httpcore's pool, connection and h11 event loop), which costs more per
token than everything llmstream does with the token itself. On a plain HTTP/1.1
connection from httpx's own transport, :func:`async_body_reader` / :func:`sync_body_reader`
read the socket directly through the connection's h11 state machine instead and return
every chunk that one read completed, joined: the same bytes, with one pass per read.
Once h11 is between two chunks, plain chunk framing is decoded by the fast lane in
:mod:`llmstream._chunked` (h11 costs ~3 us a chunk) until a chunk header that h11 should
judge: the last one, extensions, anything malformed.

The h11 state stays authoritative, so the connection is left exactly as httpcore's own
reader would leave it: a body read to its end returns the connection to the pool when the
response is closed, anything else closes it. Whenever the response is not of that shape
(HTTP/2, a proxy, a mock or custom transport, a content-encoded body, a trace hook), the
functions return None and the caller keeps httpx's iterator.

Example::

    reader = async_body_reader(response) or response.aiter_raw()
    async for data in reader:  # b"data: {...}\\n\\ndata: {...}\\n\\n..."
        events = decoder.feed(data)
"""

from __future__ import annotations

import functools
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

import anyio
import anyio.abc
import httpx

from ._chunked import ChunkedDecoder, ChunkedFramingError

if TYPE_CHECKING:
    import h11

__all__ = ["aiter_body", "async_body_reader", "iter_body", "sync_body_reader"]

# httpcore reads this much per call; the same size keeps syscalls and buffers alike.
READ_SIZE = 64 * 1024


class _Internals(NamedTuple):
    """httpx's and httpcore's layers a body passes through, and what maps their errors."""

    h11: ModuleType
    httpcore: ModuleType
    async_layers: tuple[type, ...]
    async_connection: type
    anyio_stream: type
    sync_layers: tuple[type, ...]
    sync_connection: type
    map_errors: Callable[[], Any]
    chunked_reader: type | None


@functools.cache
def _internals() -> _Internals | None:
    # Imported on first use: httpx itself imports httpcore (and h11, and trio when it is
    # installed) only when a client is made, and `import llmstream` should not either.
    try:  # These are httpx's and httpcore's internals; any change turns this path off.
        import h11
        import httpcore
        from httpcore._async.connection_pool import PoolByteStream as AsyncPoolStream
        from httpcore._async.http11 import AsyncHTTP11Connection, HTTP11ConnectionByteStream
        from httpcore._backends.anyio import AnyIOStream
        from httpcore._sync.connection_pool import PoolByteStream as SyncPoolStream
        from httpcore._sync.http11 import HTTP11Connection
        from httpcore._sync.http11 import HTTP11ConnectionByteStream as SyncH11Stream
        from httpx._client import BoundAsyncStream, BoundSyncStream
        from httpx._transports.default import (
            AsyncResponseStream,
            ResponseStream,
            map_httpcore_exceptions,
        )
    except ImportError:  # pragma: no cover - an httpx or httpcore this was not written for
        return None
    return _Internals(
        h11=h11,
        httpcore=httpcore,
        async_layers=(
            BoundAsyncStream,
            AsyncResponseStream,
            AsyncPoolStream,
            HTTP11ConnectionByteStream,
        ),
        async_connection=AsyncHTTP11Connection,
        anyio_stream=AnyIOStream,
        sync_layers=(BoundSyncStream, ResponseStream, SyncPoolStream, SyncH11Stream),
        sync_connection=HTTP11Connection,
        map_errors=map_httpcore_exceptions,
        chunked_reader=_h11_chunked_reader(),
    )


def _loaded_internals() -> _Internals | None:
    """:func:`_internals`, once httpx has imported httpcore; None before.

    Only httpx's own transport reads a body through httpcore, and httpx imports httpcore
    when it makes that transport: until then no response can be httpcore's. Checking first
    keeps a client on a transport of its own (the emulator's, a mock) from importing
    httpcore, h11 and trio when installed (~70 ms, the bulk of ``llmstream chat --fake``'s
    time to first token) on its first body read.
    """
    return _internals() if "httpcore" in sys.modules else None


def _h11_chunked_reader() -> type | None:
    # h11's own chunked reader, whose state the fast lane takes over (see _chunked.py);
    # without it the lane stays off and h11 decodes every chunk.
    try:
        from h11._readers import ChunkedReader
    except ImportError:  # pragma: no cover - an h11 this was not written for
        return None
    return ChunkedReader


def _drain(state: h11.Connection, h: ModuleType) -> tuple[list[bytes], bool]:
    """Every body byte h11 (the module ``h``) holds now, and whether the body has ended."""
    parts: list[bytes] = []
    next_event = state.next_event
    data_type = h.Data
    while True:
        event = next_event()
        if type(event) is data_type:
            parts.append(event.data)  # type: ignore[union-attr]
        elif event is h.NEED_DATA:
            return parts, False
        elif type(event) is h.EndOfMessage or event is h.PAUSED:
            return parts, True
        # Anything else (none is expected mid-body) carries no body bytes.


def _raise_as_httpx(exc: Exception) -> NoReturn:
    """Raise ``exc`` as httpx would have, so callers see one error vocabulary."""
    internals = _internals()
    assert internals is not None  # a reader exists only when they loaded
    if isinstance(exc, internals.h11.RemoteProtocolError):
        exc = internals.httpcore.RemoteProtocolError(str(exc))
    elif isinstance(exc, anyio.BrokenResourceError | anyio.ClosedResourceError):
        exc = internals.httpcore.ReadError(str(exc) or type(exc).__name__)
    with internals.map_errors():
        raise exc
    raise exc  # pragma: no cover - the mapping always raises


class _BodyState:
    """What both readers share: the h11 state, the socket and the read timeout."""

    __slots__ = (
        "_chunked_reader",
        "_ended",
        "_extensions",
        "_h11",
        "_lane",
        "_network",
        "_receive",
        "_state",
    )

    def __init__(
        self,
        state: h11.Connection,
        network: Any,
        extensions: dict[str, Any],
        h: ModuleType,
        chunked_reader: type | None,
    ) -> None:
        self._state = state
        self._network = network
        self._extensions = extensions
        self._h11 = h
        self._chunked_reader = chunked_reader
        self._lane: ChunkedDecoder | None = None
        self._ended = False
        # The socket's own receive, when reads need no timeout scope (async, watched).
        self._receive: Callable[[int], Awaitable[bytes]] | None = None

    @property
    def ended(self) -> bool:
        """True once the whole body was read: the connection can be reused.

        Example::

            if reader.ended: ...  # no need to cut the connection
        """
        return self._ended

    def _take(self) -> bytes | None:
        """The body bytes h11 has completed; None when a network read is needed."""
        parts, ended = _drain(self._state, self._h11)
        if ended:
            self._ended = True
        if parts:
            # h11 hands out bytearrays; callers are promised bytes.
            return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
        return b"" if ended else None

    def _next_data(self) -> bytes | None:
        """Body bytes already received; None when a network read is needed."""
        return None if self._lane is not None else self._take()

    def _absorb(self, read: bytes) -> bytes | None:
        """Body bytes in one network read (b"" for none yet at the end); None: read more."""
        lane = self._lane
        state = self._state
        if lane is None:
            state.receive_data(read)
            data = self._take()
            if not self._ended:
                self._adopt()  # h11 waits for more: the lane can go on from here
            return data
        if not read:  # the connection ended: h11 tells how (a cut body is an error)
            self._lane = None
            state.receive_data(lane.partial)
            state.receive_data(b"")
            return self._take()
        try:
            parts, rest = lane.feed(read)
        except ChunkedFramingError as exc:
            raise self._h11.RemoteProtocolError(str(exc)) from None
        if rest is not None:  # a chunk header the lane leaves to h11, at a chunk boundary
            self._lane = None
            state.receive_data(rest)
            more = self._take()
            if more:
                parts.append(more)
        if parts:
            return parts[0] if len(parts) == 1 else b"".join(parts)
        return b"" if self._ended else None

    def _adopt(self) -> None:
        """Take the chunked framing over from h11, which is left between two chunks.

        Only from h11's own chunked reader, with nothing in its buffer and no trailer
        being read: its state is then the chunk data still to come and the rest of the
        chunk's CRLF, which the lane continues from.
        """
        reader = getattr(self._state, "_reader", None)
        if (
            self._chunked_reader is None
            or type(reader) is not self._chunked_reader
            or getattr(reader, "_reading_trailer", True)
            or getattr(self._state, "_receive_buffer", True)
        ):
            return
        left = getattr(reader, "_bytes_in_chunk", None)
        discard = getattr(reader, "_bytes_to_discard", None)
        if not isinstance(left, int) or not isinstance(discard, bytes):
            return
        self._lane = ChunkedDecoder(left, discard)
        reader._bytes_in_chunk = 0  # type: ignore[attr-defined]
        reader._bytes_to_discard = b""  # type: ignore[attr-defined]

    def _read_timeout(self) -> float | None:
        # Read each time: the stream moves it from the header wait to the body backstop.
        timeout = self._extensions.get("timeout")
        return timeout.get("read") if isinstance(timeout, dict) else None


class _AsyncBody(_BodyState):
    __slots__ = ()

    def __aiter__(self) -> _AsyncBody:
        return self

    async def __anext__(self) -> bytes:
        try:
            while not self._ended:
                data = self._next_data()
                if data is None:
                    data = self._absorb(await self._read())
                if data:
                    return data
        except Exception as exc:  # the read, or h11 finding the body cut short
            _raise_as_httpx(exc)
        raise StopAsyncIteration

    async def _read(self) -> bytes:
        receive = self._receive
        if receive is None:
            return bytes(await self._network.read(READ_SIZE, timeout=self._read_timeout()))
        try:
            return await receive(READ_SIZE)
        except anyio.EndOfStream:
            return b""


class _SyncBody(_BodyState):
    __slots__ = ()

    def __iter__(self) -> _SyncBody:
        return self

    def __next__(self) -> bytes:
        try:
            while not self._ended:
                data = self._next_data()
                if data is None:
                    read = self._network.read(READ_SIZE, timeout=self._read_timeout())
                    data = self._absorb(read)
                if data:
                    return data
        except Exception as exc:  # the read, or h11 finding the body cut short
            _raise_as_httpx(exc)
        raise StopIteration


def _connection_of(
    response: httpx.Response, internals: _Internals | None, blocking: bool
) -> tuple[h11.Connection, Any] | None:
    """Walk httpx's stream down to httpcore's HTTP/1.1 connection: its h11 state and socket."""
    if not (
        internals is not None
        and response.http_version == "HTTP/1.1"
        and "content-encoding" not in response.headers
        and "trace" not in response.request.extensions
    ):
        return None
    if blocking:
        layers, connection_type = internals.sync_layers, internals.sync_connection
    else:
        layers, connection_type = internals.async_layers, internals.async_connection
    stream: object = response.stream
    attributes = ("_stream", "_httpcore_stream", "_stream", "_connection")
    for layer, attribute in zip(layers, attributes, strict=True):
        if type(stream) is not layer:
            return None
        stream = getattr(stream, attribute, None)
    if type(stream) is not connection_type:
        return None
    h = internals.h11
    state = getattr(stream, "_h11_state", None)
    network = getattr(stream, "_network_stream", None)
    if not isinstance(state, h.Connection) or network is None:
        return None
    if state.their_state is not h.SEND_BODY:
        return None
    return state, network


def async_body_reader(
    response: httpx.Response, *, watched: bool = False
) -> AsyncIterator[bytes] | None:
    """An iterator over ``response``'s body by network read, or None if it can't be had.

    ``watched=True`` says the caller enforces its own deadlines on the reads (by
    cancelling them): each read then skips httpcore's per-read timeout scope, which
    costs ~8 us a read, as much as parsing a chunk, when every token is its own read.

    Example::

        reader = async_body_reader(response) or response.aiter_raw()
    """
    internals = _loaded_internals()
    found = _connection_of(response, internals, blocking=False)
    if found is None or internals is None:
        return None
    state, network = found
    receive = None
    if watched and type(network) is internals.anyio_stream:
        raw = getattr(network, "_stream", None)
        if isinstance(raw, anyio.abc.ByteReceiveStream):
            receive = raw.receive
    extensions = response.request.extensions
    body = _AsyncBody(state, network, extensions, internals.h11, internals.chunked_reader)
    body._receive = receive
    return body


def sync_body_reader(response: httpx.Response) -> Iterator[bytes] | None:
    """The blocking twin of :func:`async_body_reader`.

    Example::

        reader = sync_body_reader(response) or response.iter_raw()
    """
    internals = _loaded_internals()
    found = _connection_of(response, internals, blocking=True)
    if found is None or internals is None:
        return None
    return _SyncBody(*found, response.request.extensions, internals.h11, internals.chunked_reader)


def aiter_body(response: httpx.Response, *, watched: bool = False) -> AsyncIterator[bytes]:
    """The cheapest iterator over ``response``'s body bytes that is correct for it.

    By network read when :func:`async_body_reader` can (``watched``: see there); else
    httpx's own body stream, one layer below ``aiter_raw()`` (its download counter and
    chunker are unused here); else, for a content-encoded body, ``aiter_bytes()``.

    Example::

        async for data in aiter_body(response):
            events = decoder.feed(data)
    """
    reader = async_body_reader(response, watched=watched)
    if reader is not None:
        return reader
    if "content-encoding" in response.headers:
        return response.aiter_bytes()
    return response.stream.__aiter__()  # type: ignore[union-attr]


def iter_body(response: httpx.Response) -> Iterator[bytes]:
    """The blocking twin of :func:`aiter_body`.

    Example::

        for data in iter_body(response):
            events = decoder.feed(data)
    """
    reader = sync_body_reader(response)
    if reader is not None:
        return reader
    if "content-encoding" in response.headers:
        return response.iter_bytes()
    return response.stream.__iter__()  # type: ignore[union-attr]
