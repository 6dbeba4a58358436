"""Flow control: how far a reader may run ahead, pausing, and the limits on a stream.

:class:`StreamOptions` is plain data, checked once. :class:`PauseClock` is the
sans-IO pause state. :class:`AsyncReadAhead` and :class:`ThreadReadAhead` are
the bounded hand-offs between the network reader and the consumer: the same
logic over anyio events and over a thread condition.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

import anyio

from ._counts import require_count
from ._deadlines import blocking_wait
from ._errors import InvalidRequestError, LLMStreamError

__all__ = [
    "DEFAULT_BUFFER",
    "DEFAULT_MAX_PAUSE",
    "AsyncReadAhead",
    "OnFull",
    "PauseClock",
    "StreamOptions",
    "ThreadReadAhead",
]

OnFull = Literal["wait", "error"]
"""What a full read-ahead buffer does: ``wait`` (stop reading the socket, so TCP
pushes back on the server) or ``error`` (fail fast with BufferOverflow)."""

DEFAULT_BUFFER = 64
"""Chunks a reader may run ahead: a second or two of tokens at vLLM's speeds."""

DEFAULT_MAX_PAUSE = 60.0
"""Seconds a stream may stay paused; vLLM keeps the request's KV cache meanwhile."""

_T = TypeVar("_T")


@dataclass(frozen=True)
class StreamOptions:
    """How one stream reads: read-ahead, pausing and limits.

    ``buffer`` is how many chunks a background reader may run ahead of the
    consumer (``0``: nothing is read until the consumer asks). ``on_full``
    chooses what happens when it is full. ``max_pause`` caps a pause, in
    seconds. ``max_chunks`` / ``max_bytes`` cap what one stream may receive.

    Example::

        StreamOptions(buffer=16, on_full="error", max_chunks=10_000)
    """

    buffer: int = DEFAULT_BUFFER
    on_full: OnFull = "wait"
    max_pause: float = DEFAULT_MAX_PAUSE
    max_chunks: int | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        require_count("buffer", self.buffer, minimum=0)
        if self.on_full not in ("wait", "error"):
            raise InvalidRequestError(f'on_full must be "wait" or "error", got {self.on_full!r}')
        pause = self.max_pause
        # The type first: a string would make the comparison itself raise TypeError.
        if isinstance(pause, bool) or not isinstance(pause, int | float) or not pause > 0:
            raise InvalidRequestError(
                f"max_pause must be a number of seconds > 0 (int or float), got {pause!r}"
            )
        for name in ("max_chunks", "max_bytes"):
            value = getattr(self, name)
            if value is not None:
                require_count(name, value)


class PauseClock:
    """Whether a stream is paused, and for how long it may stay so.

    Example::

        clock = PauseClock(max_pause=30.0)
        clock.pause(now=100.0)
        clock.remaining(now=110.0)  # 20.0
    """

    __slots__ = ("_paused_at", "max_pause")

    def __init__(self, max_pause: float) -> None:
        self.max_pause = max_pause
        self._paused_at: float | None = None

    @property
    def paused(self) -> bool:
        """True between pause() and resume()."""
        return self._paused_at is not None

    def pause(self, now: float) -> None:
        """Start a pause (a second pause() keeps the first start time)."""
        if self._paused_at is None:
            self._paused_at = now

    def resume(self) -> None:
        """End the pause."""
        self._paused_at = None

    def remaining(self, now: float) -> float:
        """Seconds left before the pause limit (0 when it has passed)."""
        if self._paused_at is None:
            return self.max_pause
        return max(0.0, self._paused_at + self.max_pause - now)


class _ReadAheadState(Generic[_T]):
    """The buffer's bookkeeping, shared by the async and the thread version."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: deque[_T] = deque()
        self.ended = False
        self.error: LLMStreamError | None = None
        # With limit 0 the reader reads only while the consumer waits for an item.
        self.wanted = False

    @property
    def full(self) -> bool:
        if self.limit == 0:
            return bool(self.items) or not self.wanted
        return len(self.items) >= self.limit

    def take_now(self) -> _T:
        """Pop an item known to be there, and let the reader know there is room."""
        raise NotImplementedError

    def take(self) -> _T | None:
        """The next item; None when there is none now. Raises the error once drained."""
        if self.items:
            return self.items.popleft()
        if self.error is not None:
            raise self.error
        return None


class _Signal(Protocol):
    """What a waiting side of :class:`AsyncReadAhead` is woken by: set once, awaited once."""

    def set(self) -> object: ...

    def wait(self) -> Awaitable[object]: ...


class _FutureSignal:
    """An ``anyio.Event`` for one waiter, as a bare asyncio future.

    The hand-off from the reader task to a waiting consumer happens once per chunk: an
    ``anyio.Event`` costs about 3.5 µs more per hand-off than a future on asyncio
    (``benchmarks/bench_concurrency.py``: 12.8 µs per chunk between read-ahead and
    ``buffer=0``, of which this was the largest part). A cancel scope of anyio cancels
    the task awaiting it as it would one awaiting the event.
    """

    __slots__ = ("_future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._future: asyncio.Future[None] = loop.create_future()

    def set(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    def wait(self) -> asyncio.Future[None]:
        return self._future  # awaited directly: no coroutine frame per wait


def _signal_maker() -> Callable[[], _Signal]:
    """Futures on an asyncio loop, ``anyio.Event`` elsewhere (trio)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return anyio.Event
    return functools.partial(_FutureSignal, loop)


class AsyncReadAhead(_ReadAheadState[_T]):
    """A bounded hand-off from one reader task to one consumer task (anyio).

    The reader :meth:`put` s the items of each network read, then waits in
    :meth:`wait_for_room` while the buffer is full: that wait is the
    backpressure, since no one reads the socket meanwhile. One network read
    can overshoot the limit by the chunks it held (at most one read's worth).

    Example::

        buffer = AsyncReadAhead[str](limit=2)
        buffer.put(["a", "b"])
        await buffer.get()  # "a"
    """

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        # Made when a side first waits (many streams never fill their buffer).
        self._readable: _Signal | None = None
        self._room: _Signal | None = None
        self._signal = _signal_maker()
        # Events are set only for a side that waits: setting one costs a few
        # microseconds a chunk, which the hot path does not pay.
        self._room_wanted = False

    def put(self, items: Sequence[_T]) -> None:
        """Add the items of one network read (never waits)."""
        if items:
            self.items.extend(items)
            if self.wanted and self._readable is not None:
                self._readable.set()

    def take_now(self) -> _T:
        """Pop an item known to be there, and let the reader know there is room."""
        item = self.items.popleft()
        self.wanted = False
        if self._room_wanted and not self.full and self._room is not None:
            self._room.set()
        return item

    def end(self, error: LLMStreamError | None = None) -> None:
        """No more items will come; ``error`` is raised once the items are drained."""
        self.ended = True
        if error is not None and self.error is None:
            self.error = error
        if self._readable is not None:
            self._readable.set()
        if self._room is not None:
            self._room.set()

    async def wait_for_room(self) -> None:
        """Wait while the buffer is full (returns at once when it is not)."""
        while self.full and not self.ended:
            self._room = room = self._signal()
            self._room_wanted = True
            try:
                await room.wait()
            finally:
                self._room_wanted = False

    async def get(self) -> _T | None:
        """The next item, waiting for one; None at the end."""
        while True:
            if self.items:
                return self.take_now()
            item = self.take()  # raises the error once drained
            if self.ended:
                return None
            del item
            self._readable = readable = self._signal()
            self.wanted = True
            if self._room_wanted and self._room is not None:
                self._room.set()  # with limit 0 the reader reads only for a waiting consumer
            await readable.wait()


class ThreadReadAhead(_ReadAheadState[_T]):
    """A bounded hand-off from one reader thread to one consumer thread.

    The same contract as :class:`AsyncReadAhead`, over a ``threading.Condition``.

    Example::

        buffer = ThreadReadAhead[str](limit=2)
        buffer.put(["a"])
        buffer.get()  # "a"
    """

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self._cond = threading.Condition()

    def put(self, items: Sequence[_T]) -> None:
        """Add the items of one network read (never waits)."""
        if items:
            with self._cond:
                self.items.extend(items)
                self._cond.notify_all()

    def end(self, error: LLMStreamError | None = None) -> None:
        """No more items will come; ``error`` is raised once the items are drained."""
        with self._cond:
            self.ended = True
            if error is not None and self.error is None:
                self.error = error
            self._cond.notify_all()

    def wait_for_room(self, timeout: float | None = None) -> bool:
        """Wait while the buffer is full; False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.full and not self.ended:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(blocking_wait(left))
        return True

    def get(self, watch: Callable[[], float | None] | None = None) -> _T | None:
        """The next item, waiting for one; None at the end.

        ``watch`` is called whenever the wait wakes up empty-handed and returns
        how long to wait at most before calling it again (None: no limit). It
        lets the consumer enforce the stream's deadlines while it waits.
        """
        with self._cond:
            while True:
                item = self.take()
                if item is not None:
                    self.wanted = False
                    self._cond.notify_all()
                    return item
                if self.ended:
                    return None
                if not self.wanted:
                    self.wanted = True
                    self._cond.notify_all()
                self._cond.wait(blocking_wait(watch() if watch is not None else None))
