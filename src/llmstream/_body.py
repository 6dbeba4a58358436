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
(HTTP/2, a proxy, a mock or custom transport, a content-encoded body, a trace hook), or
the fast path is off, the functions return None and the caller keeps httpx's iterator.

This is part of the fast path: every private attribute of httpx, httpcore and h11 it
needs is found (and its presence checked) by :mod:`llmstream._fastpath`; this module uses
only the public API of what it is handed (h11's ``Connection``, httpcore's network
stream, httpcore's and httpx's exceptions).

Example::

    reader = async_body_reader(response) or response.aiter_raw()
    async for data in reader:  # b"data: {...}\\n\\ndata: {...}\\n\\n..."
        events = decoder.feed(data)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
import httpx

from . import _fastpath
from ._chunked import ChunkedDecoder, ChunkedFramingError

if TYPE_CHECKING:
    import h11

__all__ = ["aiter_body", "async_body_reader", "iter_body", "sync_body_reader"]

# httpcore reads this much per call; the same size keeps syscalls and buffers alike.
READ_SIZE = 64 * 1024

# httpcore's public exceptions and httpx's of the same name, which httpx's transport maps
# them to (the most specific first, as it does).
_MAPPED = (
    "ConnectTimeout",
    "ReadTimeout",
    "WriteTimeout",
    "PoolTimeout",
    "TimeoutException",
    "ConnectError",
    "ReadError",
    "WriteError",
    "NetworkError",
    "ProxyError",
    "UnsupportedProtocol",
    "LocalProtocolError",
    "RemoteProtocolError",
    "ProtocolError",
)


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
    """Raise ``exc`` as httpx's transport would have, so callers see one error vocabulary."""
    import h11
    import httpcore

    if isinstance(exc, h11.RemoteProtocolError):
        exc = httpcore.RemoteProtocolError(str(exc))
    elif isinstance(exc, anyio.BrokenResourceError | anyio.ClosedResourceError):
        exc = httpcore.ReadError(str(exc) or type(exc).__name__)
    for name in _MAPPED:
        if isinstance(exc, getattr(httpcore, name)):
            raise getattr(httpx, name)(str(exc)) from exc
    raise exc


class _BodyState:
    """What both readers share: the h11 state, the socket and the read timeout."""

    __slots__ = (
        "_can_adopt",
        "_ended",
        "_extensions",
        "_h11",
        "_lane",
        "_network",
        "_receive",
        "_state",
    )

    def __init__(
        self, state: h11.Connection, network: Any, extensions: dict[str, Any], *, lane: bool
    ) -> None:
        import h11  # loaded by httpcore by now; not at `import llmstream`

        self._h11 = h11
        self._state = state
        self._network = network  # httpcore's (Async)NetworkStream: only its public read()
        self._extensions = extensions
        # Whether h11's chunked framing may be taken over (see _fastpath.take_over_chunked).
        self._can_adopt = lane
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
            if not self._ended and self._can_adopt:
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
        """Take the chunked framing over from h11, if it is left between two chunks."""
        taken = _fastpath.take_over_chunked(self._state)
        if taken is not None:
            self._lane = ChunkedDecoder(*taken)

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


def async_body_reader(
    response: httpx.Response, *, watched: bool = False
) -> AsyncIterator[bytes] | None:
    """An iterator over ``response``'s body by network read, or None if it can't be had.

    None when the fast path is off (see :mod:`llmstream._fastpath`) or the response is not
    read from httpx's own HTTP/1.1 connection. ``watched=True`` says the caller enforces
    its own deadlines on the reads (by cancelling them): each read then skips httpcore's
    per-read timeout scope, which costs ~8 us a read, as much as parsing a chunk, when
    every token is its own read.

    Example::

        reader = async_body_reader(response) or response.aiter_raw()
    """
    found = _fastpath.body_connection(response, blocking=False)
    if found is None:
        return None
    body = _AsyncBody(found.state, found.network, response.request.extensions, lane=found.lane)
    if watched:
        body._receive = _fastpath.raw_receive(found.network)
    return body


def sync_body_reader(response: httpx.Response) -> Iterator[bytes] | None:
    """The blocking twin of :func:`async_body_reader`.

    Example::

        reader = sync_body_reader(response) or response.iter_raw()
    """
    found = _fastpath.body_connection(response, blocking=True)
    if found is None:
        return None
    return _SyncBody(found.state, found.network, response.request.extensions, lane=found.lane)


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
        return _HttpxBody(response.aiter_bytes())
    return _HttpxBody(response.stream.__aiter__())  # type: ignore[union-attr]


class _HttpxBody:
    """httpx's own body iterator, whose ``aclose()`` may come from another task mid-read.

    A stream closes its reader from whichever task stops it, perhaps while its reading
    task is still inside the generator: closing a running async generator raises
    RuntimeError. That read is being cancelled and ends the generator itself, and the
    response's own ``aclose()`` releases the connection either way.
    """

    __slots__ = ("_iterator",)

    def __init__(self, iterator: AsyncIterator[bytes]) -> None:
        self._iterator = iterator

    def __aiter__(self) -> _HttpxBody:
        return self

    def __anext__(self) -> Awaitable[bytes]:
        return self._iterator.__anext__()  # no frame of ours per chunk

    async def aclose(self) -> None:
        """Close httpx's iterator, unless a read is running in it (see the class).

        Example::

            await reader.aclose()
        """
        iterator = self._iterator
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None and not getattr(iterator, "ag_running", False):
            await aclose()


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
