"""A cancel scope for one read on asyncio, at a tenth of an anyio scope's cost.

A stream that reads without a reader task (``buffer=0``) awaits one read per chunk, and a
deadline must be able to cut that read. An ``anyio.CancelScope`` entered around each read
costs about 4 µs on asyncio, close to a tenth of everything else done for a chunk.
Deadlines are watched by a timer of the loop, so all a read needs is a way for that timer
to cancel the task awaiting it and for the read to tell that cancellation from any other:
the same counting of ``Task.cancelling()`` and ``Task.uncancel()`` that ``asyncio.timeout``
does. Those methods came in Python 3.11; before that, :func:`read_cut` returns ``None``
and the caller keeps an anyio scope.

A wait with a deadline of its own (a request's wait for its response headers) gets a
:class:`TimedCut` from :func:`cut_after`: the same cut, armed with one timer of the loop
for as long as the wait lasts, at about a third of ``anyio.move_on_after``'s cost. Off
asyncio (trio), or before 3.11, :func:`cut_after` gives that anyio scope instead.
"""

from __future__ import annotations

import asyncio
import math
import sys
from types import TracebackType

import anyio

__all__ = ["ReadCut", "TimedCut", "cut_after", "read_cut"]


class ReadCut:
    """Cut the read in progress when :meth:`cancel` is called; reusable, one per stream.

    Used like the ``anyio.CancelScope`` it stands for: ``with cut: await read()``, then
    ``cut.cancelled_caught`` says whether :meth:`cancel` ended the read. A cancellation
    from anywhere else (the caller's own scope, a task group) passes through unchanged.

    Example::

        cut = ReadCut()
        with cut:
            data = await reader.__anext__()  # a timer may call cut.cancel()
        if cut.cancelled_caught:
            ...  # the deadline passed during the read
    """

    __slots__ = ("_cancelling", "_fired", "_task", "cancelled_caught")

    def __init__(self) -> None:
        self._task: asyncio.Task[object] | None = None  # the task awaiting the read
        self._fired: asyncio.Task[object] | None = None  # the task cancel() cancelled
        self._cancelling = 0
        self.cancelled_caught = False

    def __enter__(self) -> ReadCut:
        task = asyncio.current_task()
        assert task is not None, "a read is awaited by a task"
        self._task, self._fired = task, None
        self.cancelled_caught = False
        if sys.version_info >= (3, 11):
            # Cancellations already requested belong to others, as in asyncio.timeout().
            self._cancelling = task.cancelling()
        return self

    def cancel(self) -> None:
        """Cancel the task awaiting the read; once per read, and a no-op outside one."""
        task = self._task
        if task is not None and self._fired is None:
            self._fired = task
            task.cancel()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self._task = None
        fired, self._fired = self._fired, None
        if fired is None:
            return False
        if sys.version_info >= (3, 11):
            # Undo our own request; any left was asked for by someone else.
            if fired.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                self.cancelled_caught = True
                return True
        return False


def read_cut() -> ReadCut | None:
    """A :class:`ReadCut` where asyncio counts cancellations (3.11+); else ``None``."""
    return ReadCut() if sys.version_info >= (3, 11) else None


class TimedCut(ReadCut):
    """A :class:`ReadCut` that also cuts the wait ``delay`` seconds after it began.

    One use: the timer is armed on entering and disarmed on leaving. ``delay=None``
    arms none (only :meth:`cancel` cuts).

    Example::

        with TimedCut(asyncio.get_running_loop(), 5.0) as cut:
            response = await transport.send(request)
        if cut.cancelled_caught:
            ...  # no response within 5 s, or cancel() was called
    """

    __slots__ = ("_delay", "_loop", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float | None) -> None:
        super().__init__()
        self._loop = loop
        self._delay = delay
        self._timer: asyncio.TimerHandle | None = None

    def __enter__(self) -> TimedCut:
        super().__enter__()
        if self._delay is not None:
            self._timer = self._loop.call_later(max(self._delay, 0.0), self.cancel)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        return super().__exit__(exc_type, exc, tb)


def cut_after(delay: float | None) -> TimedCut | anyio.CancelScope:
    """A scope whose wait ends ``delay`` seconds on (None: never) or at ``cancel()``.

    A :class:`TimedCut` on asyncio (3.11+); elsewhere ``anyio.move_on_after``. Either
    way, ``cancelled_caught`` afterwards says whether it cut the wait, and any other
    cancellation passes through.

    Example::

        with cut_after(5.0) as scope:
            response = await transport.send(request)
        if scope.cancelled_caught:
            ...
    """
    if sys.version_info >= (3, 11):
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            pass  # not on asyncio: trio
        else:
            return TimedCut(loop, delay)
    return anyio.move_on_after(math.inf if delay is None else delay)
