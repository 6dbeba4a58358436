"""Child processes that a test stops with Ctrl-C, started as a terminal starts them."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def as_at_a_terminal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that gives the child SIGINT at its default action (None off POSIX).

    A shell runs a background job (``cmd &``) with SIGINT ignored, and its children inherit
    that: Python then installs no ``KeyboardInterrupt`` handler, and the Ctrl-C a test
    sends does nothing. A terminal starts a command with SIGINT at its default, so the
    tests see what a user sees, however the test run itself was started.

    Example::

        subprocess.Popen([...], preexec_fn=as_at_a_terminal())
    """
    return _default_sigint if os.name == "posix" else None
