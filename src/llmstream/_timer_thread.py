"""One daemon thread that fires timed work for the blocking client.

A thread blocked in a send or a read cannot watch its own deadline, and a consumer busy
with its own work does not call back: the sync client's deadlines that must be kept
whatever the threads are doing (a request's wait for headers, a call's total) are fired
from here. One thread serves every stream of the process; what it fires must be quick
(cut a socket, end a buffer) and must never block.

Example::

    class Reminder:
        over = False

        def fire(self) -> None:
            print("time is up")

    fire_after(Reminder(), 5.0)
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Protocol

__all__ = ["Timed", "fire_after"]

logger = logging.getLogger("llmstream")


class Timed(Protocol):
    """Work the timer thread fires once its time comes, unless it is :attr:`over` by then."""

    @property
    def over(self) -> bool:
        """True once the work is no longer needed (the timer then drops it)."""
        ...

    def fire(self) -> None:
        """Do the work: quick, and never blocking (the thread serves every stream)."""
        ...


class _TimerThread:
    """The thread and its heap of due times. Work that ended first is dropped when its
    time comes, or sooner when many entries have piled up."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, Timed]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, work: Timed, at: float) -> None:
        with self._cond:
            if len(self._due) > 1024 and len(self._due) % 1024 == 0:
                # Long deadlines of work long over: kept, they would pile up.
                self._due = [entry for entry in self._due if not entry[2].over]
                heapq.heapify(self._due)
            heapq.heappush(self._due, (at, next(self._order), work))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="llmstream deadlines", daemon=True
                )
                self._thread.start()
            elif self._due[0][2] is work:
                self._cond.notify()  # sooner than the one the thread waits for

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due or self._due[0][0] > time.perf_counter():
                    left = self._due[0][0] - time.perf_counter() if self._due else None
                    self._cond.wait(left if left is None else min(left, threading.TIMEOUT_MAX))
                work = heapq.heappop(self._due)[2]
            if not work.over:
                try:
                    work.fire()
                except Exception:  # one stream's failure must not stop every other's timers
                    logger.exception("llmstream: a timed deadline check failed")


_timers = _TimerThread()


def fire_after(work: Timed, seconds: float) -> None:
    """Fire ``work`` in ``seconds`` from the shared timer thread, unless it is over by then.

    Example::

        fire_after(header_wait, 5.0)  # cuts the wait in 5 s if it has not ended
    """
    _timers.add(work, time.perf_counter() + max(seconds, 0.0))
