"""Ctrl-C and the benchmark's child processes: the parent stops them, they never report it.

A terminal sends SIGINT to the whole process group, so the emulator and the workers get
it too. Left to Python, each would print a ``KeyboardInterrupt`` traceback (or, once the
parent has gone, a ``BrokenPipeError`` one). The children ignore it instead; the parent
reports the stop (exit 130) and ends them.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

__all__ = ["ignore_sigint", "sigint_blocked"]


@contextlib.contextmanager
def sigint_blocked() -> Iterator[None]:
    """Start child processes in this block: they are born with SIGINT blocked.

    A spawned child imports for a while before its own code can ignore the signal; the
    blocked mask is inherited, so a Ctrl-C in that window cannot reach it. The parent
    gets a Ctrl-C sent meanwhile as soon as the block ends.

    Example::

        with sigint_blocked():
            process.start()
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no process-group SIGINT
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_sigint() -> None:
    """In a child process: leave Ctrl-C to the parent, which stops this process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
