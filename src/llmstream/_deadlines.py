"""The four deadlines of a stream (sans-IO): connect, first token, idle, total.

An HTTP read timeout is the wrong tool for a token stream: it restarts with every
byte, so SSE keep-alive comments keep a stalled generation alive forever, and it
cannot tell a slow prefill (long prompts take minutes before the first token) from
a stall mid-answer. These deadlines count in *events* instead: comments and
keep-alive bytes do not reset them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

from ._errors import InvalidRequestError

__all__ = ["DeadlineKind", "Timeouts", "blocking_wait", "next_deadline"]

DeadlineKind = Literal["first_token", "idle", "total"]


@dataclass(frozen=True)
class Timeouts:
    """How long each phase of a stream may take, in seconds (``None``: no limit).

    ``connect``: to open the connection. ``first_token``: from sending the
    request to the first generated token (prefill of a long prompt on a busy
    server can take minutes). ``idle``: between two events once streaming
    (keep-alive comments do not count as events). ``total``: the whole call,
    retries and their waits included, and the time the consumer holds the
    stream back (a pause, a full buffer) too.

    Example::

        llmstream.AsyncClient(timeout=llmstream.Timeouts(first_token=60, idle=15, total=300))
        client.stream("Hi", timeout=llmstream.Timeouts(total=10))
    """

    connect: float | None = 10.0
    first_token: float | None = 300.0
    idle: float | None = 60.0
    total: float | None = None

    def __post_init__(self) -> None:
        for name in ("connect", "first_token", "idle", "total"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
            ):
                raise InvalidRequestError(
                    f"Timeouts.{name} must be a positive number of seconds or None, got {value!r}"
                )


def next_deadline(
    timeouts: Timeouts,
    *,
    started: float,
    attempt_started: float,
    last_event_at: float | None,
) -> tuple[float, DeadlineKind] | None:
    """The earliest deadline now in force, and its kind; None when there is none.

    ``started`` is when the call began (the total deadline counts from there);
    ``attempt_started`` when the current request was sent: until its first
    event (vLLM sends the first with the first token) the first-token deadline
    applies, counted per request, since a retry or a resume prefills again;
    after it, the idle deadline, from ``last_event_at`` (the last event, or the
    moment the reader last resumed reading after being held back).

    Example::

        next_deadline(Timeouts(first_token=5, idle=2, total=None), started=0.0,
                      attempt_started=0.0, last_event_at=None)
        # (5.0, "first_token")
    """
    found: tuple[float, DeadlineKind] | None = None
    if timeouts.total is not None:
        found = (started + timeouts.total, "total")
    candidate: tuple[float, DeadlineKind] | None = None
    if last_event_at is None:
        if timeouts.first_token is not None:
            candidate = (attempt_started + timeouts.first_token, "first_token")
    elif timeouts.idle is not None:
        candidate = (last_event_at + timeouts.idle, "idle")
    if candidate is not None and (found is None or candidate[0] < found[0]):
        found = candidate
    return found


def blocking_wait(seconds: float | None) -> float | None:
    """``seconds`` as a thread's blocking wait takes it: ``None`` (no limit) for infinity.

    ``threading`` refuses a timeout beyond ``threading.TIMEOUT_MAX`` (``OverflowError``),
    and a deadline set to ``inf`` means no limit; a negative one is no wait.

    Example::

        event.wait(blocking_wait(float("inf")))  # waits until set
    """
    if seconds is None or seconds >= threading.TIMEOUT_MAX:
        return None
    return max(seconds, 0.0)
