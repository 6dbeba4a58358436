"""Retry decisions (sans-IO): which failures to retry, how long to wait, when to stop.

Built on tenacity's strategies: the default wait is
``tenacity.wait_random_exponential`` (exponential backoff with full jitter) and
the default stop ``tenacity.stop_after_attempt``; a caller may pass any tenacity
``stop``/``wait``/``retry`` strategy, or a whole ``tenacity.Retrying`` to take them
from. What is never retried, whatever the strategy says: 400/401/403/404/422,
protocol violations, limits the caller set, and (unless resume is on) a stream
that already delivered text.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import tenacity
from pydantic import ConfigDict

from ._errors import (
    APIConnectionError,
    APIStatusError,
    InvalidRequestError,
    LLMStreamError,
    ServerStreamError,
    StreamInterrupted,
    TotalTimeout,
)

__all__ = [
    "DEFAULT_RETRY_STATUSES",
    "NEVER_RETRY_STATUSES",
    "RetryEvent",
    "RetryPolicy",
    "logger",
    "retry_after_seconds",
]

logger = logging.getLogger("llmstream")

StopStrategy = Callable[[tenacity.RetryCallState], bool]
"""A tenacity stop strategy, e.g. ``tenacity.stop_after_delay(30)``."""
WaitStrategy = Callable[[tenacity.RetryCallState], float]
"""A tenacity wait strategy, e.g. ``tenacity.wait_random_exponential(max=8)``."""
RetryPredicate = Callable[[tenacity.RetryCallState], bool]
"""A tenacity retry predicate, e.g. ``tenacity.retry_if_exception_type(...)``."""

DEFAULT_RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
NEVER_RETRY_STATUSES = frozenset({400, 401, 403, 404, 422})


@dataclass(frozen=True)
class RetryEvent:
    """One retry or resume, as passed to ``on_retry`` hooks and logged.

    ``attempt`` is the number of the attempt about to start (2 for the first
    retry), ``delay`` the seconds waited before it, ``error`` what failed.

    Example::

        def on_retry(event: llmstream.RetryEvent) -> None:
            print(f"{event.kind} #{event.attempt} in {event.delay:.2f}s: {event.error}")
    """

    # pydantic (TypeAdapter(RetryEvent), or a model with a RetryEvent field) has no schema
    # for an exception: it checks `error` with isinstance.
    __pydantic_config__ = ConfigDict(arbitrary_types_allowed=True)

    kind: Literal["retry", "resume"]
    attempt: int
    delay: float
    error: LLMStreamError


@dataclass(frozen=True)
class RetryPolicy:
    """When and how a call is tried again.

    ``max_retries`` retries (2 by default, as other SDKs do) with exponential
    backoff from ``initial_backoff`` up to ``max_backoff`` seconds and full
    jitter. Connect errors, timeouts before the first token, broken streams
    before any text, and HTTP 408/409/429/500/502/503/504 are retried. A
    server's ``Retry-After`` (seconds or HTTP-date) or ``retry-after-ms`` is
    honoured up to ``max_retry_after`` seconds; a longer one is not waited for:
    the error is raised at once (with the header in ``exc.headers``), since a
    call blocked for minutes is worse than a clear error the caller can
    schedule around.

    ``resume`` continues a stream that broke after delivering text, on a new
    request that sends the partial answer with vLLM's
    ``continue_final_message`` (at most ``max_resumes`` times); the consumer
    sees every character exactly once. ``stop``, ``wait`` and ``retry`` take
    tenacity strategies in place of the defaults; ``on_retry`` is called
    before each retry or resume (each is also logged on the ``llmstream``
    logger at INFO).

    Example::

        policy = llmstream.RetryPolicy(max_retries=4, max_backoff=4.0, resume=True)
        client = llmstream.AsyncClient(retry=policy)
        # or with tenacity's own strategies:
        llmstream.RetryPolicy(stop=tenacity.stop_after_delay(30),
                              wait=tenacity.wait_fixed(1))
    """

    max_retries: int = 2
    initial_backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 60.0
    retry_statuses: frozenset[int] = DEFAULT_RETRY_STATUSES
    resume: bool = False
    max_resumes: int = 3
    stop: StopStrategy | None = None
    wait: WaitStrategy | None = None
    retry: RetryPredicate | None = None
    on_retry: Callable[[RetryEvent], object] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise InvalidRequestError(f"max_retries must be >= 0, got {self.max_retries!r}")
        if not isinstance(self.max_resumes, int) or self.max_resumes < 0:
            raise InvalidRequestError(f"max_resumes must be >= 0, got {self.max_resumes!r}")
        for name in ("initial_backoff", "max_backoff", "max_retry_after"):
            if not getattr(self, name) >= 0:
                raise InvalidRequestError(f"{name} must be >= 0 seconds")

    @classmethod
    def from_tenacity(cls, retrying: tenacity.BaseRetrying, **options: object) -> RetryPolicy:
        """Take ``stop``, ``wait`` and ``retry`` from a tenacity ``Retrying``/``AsyncRetrying``.

        Example::

            RetryPolicy.from_tenacity(tenacity.Retrying(stop=tenacity.stop_after_attempt(5)))
        """
        # tenacity's default predicate retries on any exception; ours is narrower.
        predicate = retrying.retry
        default = isinstance(predicate, tenacity.retry_if_exception_type) and getattr(
            predicate, "exception_types", None
        ) in (Exception, (Exception,))
        return cls(
            stop=retrying.stop,
            wait=retrying.wait,
            retry=None if default else retrying.retry,
            **options,  # type: ignore[arg-type]
        )

    def retryable(self, error: LLMStreamError) -> bool:
        """Whether ``error`` is of a kind that may succeed on another try.

        Example::

            RetryPolicy().retryable(error)  # True for a 503, False for a 404
        """
        if isinstance(error, TotalTimeout):
            return False  # the whole call's time is spent: no try can fit in it
        if isinstance(error, APIStatusError):
            status = error.status_code
            return status not in NEVER_RETRY_STATUSES and status in self.retry_statuses
        if isinstance(error, ServerStreamError):
            code = error.error_code
            return not (isinstance(code, int) and code in NEVER_RETRY_STATUSES)
        return isinstance(error, APIConnectionError | StreamInterrupted)

    def delay_before(
        self, attempt: int, error: LLMStreamError, *, started: float, now: float
    ) -> float | None:
        """Seconds to wait before attempt number ``attempt`` (2, 3...), or None: do not retry.

        Example::

            RetryPolicy().delay_before(2, error, started=0.0, now=1.0)  # e.g. 0.31
        """
        if not self.retryable(error):
            return None
        state = _call_state(attempt - 1, error, started=started, now=now)
        if self.retry is not None and not self.retry(state):
            return None
        stop = self.stop or tenacity.stop_after_attempt(self.max_retries + 1)
        if stop(state):
            return None
        return self._wait(state, error)

    def resume_delay(
        self, resume: int, error: LLMStreamError, *, started: float, now: float
    ) -> float | None:
        """Seconds to wait before resume number ``resume`` (1, 2...), or None: do not resume.

        Resumes are counted by ``max_resumes``, not by ``stop``; the ``retry``
        predicate and a server's ``Retry-After`` apply as they do to retries.

        Example::

            RetryPolicy(resume=True).resume_delay(1, error, started=0.0, now=0.0)
        """
        state = _call_state(resume, error, started=started, now=now)
        if self.retry is not None and not self.retry(state):
            return None
        return self._wait(state, error)

    def _wait(self, state: tenacity.RetryCallState, error: LLMStreamError) -> float | None:
        """The server's Retry-After (None above the cap), else the wait strategy."""
        if isinstance(error, APIStatusError):
            asked = retry_after_seconds(error.headers, now=time.time())
            if asked is not None:
                return asked if asked <= self.max_retry_after else None
        wait = self.wait or tenacity.wait_random_exponential(
            multiplier=self.initial_backoff, max=self.max_backoff
        )
        return float(wait(state))

    def announce(self, event: RetryEvent) -> None:
        """Log the retry and call the ``on_retry`` hook."""
        logger.info(
            "llmstream: %s, attempt %d in %.2f s after %s: %s",
            event.kind,
            event.attempt,
            event.delay,
            type(event.error).__name__,
            event.error,
        )
        if self.on_retry is not None:
            self.on_retry(event)


def _call_state(
    attempts_done: int, error: BaseException, *, started: float, now: float
) -> tenacity.RetryCallState:
    """A tenacity call state, so its stop/wait/retry strategies can judge our attempts."""
    state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
    state.attempt_number = max(attempts_done, 1)
    state.start_time = started
    state.set_exception((type(error), error, None))
    state.outcome_timestamp = now
    return state


def retry_after_seconds(headers: Mapping[str, str], *, now: float) -> float | None:
    """What ``retry-after-ms`` or ``retry-after`` (seconds or HTTP-date) asks, in seconds.

    Example::

        retry_after_seconds({"retry-after": "2"}, now=time.time())  # 2.0
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    raw_ms = lowered.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return max(float(raw_ms) / 1000.0, 0.0)
        except ValueError:
            pass
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        return max(float(raw), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    return max(when.timestamp() - now, 0.0)
