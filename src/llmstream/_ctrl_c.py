"""Ctrl-C that stops a blocked stream: the command line's answer to a lost signal.

Python raises ``KeyboardInterrupt`` when the main thread next runs Python code. A SIGINT
that lands just before the main thread enters a blocking system call (reading the
response headers, say) is noted but does not interrupt the call, which then blocks until
it returns on its own: with a server that never answers, for ever. The C-level handler
still writes the signal's number to the wakeup fd at once, so a thread waiting on that
fd sees every Ctrl-C. If the main thread has not dealt with it after a short grace, the
thread cancels the stream in flight (:meth:`ChatStream.cancel` shuts its socket down),
the blocked call returns, and the pending ``KeyboardInterrupt`` is raised as usual.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from types import TracebackType
from typing import Protocol

__all__ = ["CtrlCWatch"]

_GRACE = 0.25
"""Seconds the main thread has to act on Ctrl-C itself before its stream is cut for it."""


class _Cancellable(Protocol):
    def cancel(self) -> None: ...


class CtrlCWatch:
    """While entered (on the main thread, POSIX), Ctrl-C reaches ``current`` even if lost.

    Set ``current`` to the stream in flight and back to ``None`` once the main thread has
    dealt with it; anywhere else, or where Python gives no wakeup fd, it does nothing.

    Example::

        with CtrlCWatch() as watch:
            watch.current = stream
            try:
                with stream:
                    ...
            finally:
                watch.current = None
    """

    def __init__(self) -> None:
        self.current: _Cancellable | None = None
        self._read_fd = -1
        self._write_fd = -1
        self._previous = -1
        self._thread: threading.Thread | None = None

    def __enter__(self) -> CtrlCWatch:
        if os.name != "posix" or threading.current_thread() is not threading.main_thread():
            return self  # set_wakeup_fd is the main thread's alone
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # the C handler must never block on it
        try:
            self._previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except (ValueError, OSError):
            os.close(read_fd)
            os.close(write_fd)
            return self
        self._read_fd, self._write_fd = read_fd, write_fd
        self._thread = threading.Thread(target=self._watch, name="llmstream-ctrl-c", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread is None:
            return
        # The handler writes to the fd until it is given back: only then may it close.
        signal.set_wakeup_fd(self._previous)
        os.close(self._write_fd)  # the watching thread reads the end of the pipe and ends
        self._thread.join()
        os.close(self._read_fd)
        self._thread = None

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._read_fd, 64)
            except OSError:
                return
            if not data:
                return
            if signal.SIGINT not in data:
                continue
            stream = self.current
            if stream is None:
                continue
            # Normally the main thread is interrupted and lets go of the stream at once;
            # only a stream still held after the grace is stuck in a call.
            threading.Event().wait(_GRACE)
            if self.current is stream:
                with contextlib.suppress(Exception):
                    stream.cancel()
