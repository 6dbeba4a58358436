"""Retry decisions (sans-IO): which failures to retry, how long to wait, when to stop.

Built on tenacity: the default wait is ``tenacity.wait_random_exponential``
(exponential backoff with full jitter) and the default stop
``tenacity.stop_after_attempt``; a caller may pass any tenacity
``stop``/``wait``/``retry``/``before_sleep`` strategy, or a whole
``tenacity.Retrying`` to take them from. A call keeps one
``tenacity.RetryCallState`` for all its attempts (:class:`CallRetries`), updated
with each outcome as tenacity's own loop does, so the strategies see the real
attempt number, start time, time slept and last error. What is never retried,
whatever the strategy says: 400/401/403/404/422, protocol violations, limits the
caller set, and (unless resume is on) a stream that already delivered text.

tenacity decides; llmstream waits. The wait itself is not tenacity's ``sleep``:
it runs on the stream's own clock, so that ``cancel()``, closing and the
deadlines end it at once.
"""

from __future__ import annotations

import email.utils
import inspect
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import tenacity
from pydantic import ConfigDict

from ._call_info import CallInfo
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
    "CallRetries",
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
SleepHook = Callable[[tenacity.RetryCallState], object]
"""A tenacity ``before_sleep`` hook, e.g. ``tenacity.before_sleep_log(logger, logging.INFO)``."""

DEFAULT_RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
NEVER_RETRY_STATUSES = frozenset({400, 401, 403, 404, 422})


@dataclass(frozen=True)
class RetryEvent:
    """One retry or resume, as passed to ``on_retry`` and to a client's hooks, and logged.

    ``kind`` is ``"retry"`` (the request starts over: nothing had arrived) or
    ``"resume"`` (a new request continues an answer that broke off). ``attempt``
    is the number of the attempt about to start (2 for the first retry),
    ``delay`` the seconds waited before it, ``error`` what failed; ``call`` names
    the call and ``at`` is when it was decided (``time.perf_counter()``).

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
    call: CallInfo
    at: float


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
    tenacity strategies in place of the defaults; ``before_sleep`` is called
    with the call's ``tenacity.RetryCallState`` before each wait, as tenacity
    calls it; ``on_retry`` is called before each retry or resume (each is also
    logged on the ``llmstream`` logger at INFO).

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
    before_sleep: SleepHook | None = field(default=None, compare=False)

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
        """Take ``stop``, ``wait``, ``retry`` and ``before_sleep`` from a tenacity ``Retrying``.

        ``reraise`` may be either value: llmstream raises the call's last error
        when it stops retrying, never a ``tenacity.RetryError``, which is what
        ``reraise=True`` does. A custom ``sleep``, ``before``, ``after``,
        ``retry_error_callback`` or ``retry_error_cls``, or an async strategy,
        is refused with :class:`~llmstream.InvalidRequestError` saying why,
        rather than ignored.

        Example::

            RetryPolicy.from_tenacity(tenacity.Retrying(stop=tenacity.stop_after_attempt(5)))
        """
        refused = _unsupported(retrying)
        if refused:
            raise InvalidRequestError(
                "RetryPolicy.from_tenacity cannot use this tenacity "
                f"{type(retrying).__name__}: " + "; ".join(refused) + "."
            )
        # tenacity's default predicate retries on any exception; ours is narrower.
        predicate = retrying.retry
        default = isinstance(predicate, tenacity.retry_if_exception_type) and getattr(
            predicate, "exception_types", None
        ) in (Exception, (Exception,))
        return cls(
            stop=retrying.stop,
            wait=retrying.wait,
            retry=None if default else retrying.retry,
            before_sleep=retrying.before_sleep,
            **options,  # type: ignore[arg-type]
        )

    def start_call(self, started: float, *, deadline: float | None = None) -> CallRetries:
        """The retry state of one call that starts at ``started`` (any clock, used throughout).

        ``deadline`` is when the whole call must end, on the same clock: a
        wait that would reach it is not started.

        Example::

            retries = policy.start_call(time.monotonic())
            delay = retries.retry_delay(error, time.monotonic())  # None: give up
        """
        return CallRetries(self, started, deadline)

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

        One decision on its own; :meth:`start_call` keeps the state of a whole
        call instead (the time already slept, the outcome of every attempt).

        Example::

            RetryPolicy().delay_before(2, error, started=0.0, now=1.0)  # e.g. 0.31
        """
        retries = self.start_call(started)
        retries.state.attempt_number = max(attempt - 1, 1)
        return retries.retry_delay(error, now)

    def resume_delay(
        self, resume: int, error: LLMStreamError, *, started: float, now: float
    ) -> float | None:
        """Seconds to wait before resume number ``resume`` (1, 2...), or None: do not resume.

        Resumes are counted by ``max_resumes``, not by ``stop``; the ``retry``
        predicate and a server's ``Retry-After`` apply as they do to retries.
        The caller checks ``resume``, ``max_resumes`` and :meth:`retryable`
        (:meth:`CallRetries.resume_delay` checks them itself).

        Example::

            RetryPolicy(resume=True).resume_delay(1, error, started=0.0, now=0.0)
        """
        retries = self.start_call(started)
        retries.state.attempt_number = max(resume, 1)
        state = retries._record(error, now)
        if self.retry is not None and not self.retry(state):
            return None
        return retries._plan_wait(error, now, stop=None)

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

    def _stop(self) -> StopStrategy:
        return self.stop or tenacity.stop_after_attempt(self.max_retries + 1)

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


class CallRetries:
    """The retries of one call: one ``tenacity.RetryCallState`` across all its attempts.

    Each failed attempt is recorded as tenacity's own loop records it (the
    attempt number, the outcome and when it came, the time slept so far), so
    ``stop_after_delay``, ``stop_after_attempt``, ``wait_exponential`` and any
    custom strategy judge the call as it really went. Sans-IO: it is given
    timestamps and returns delays; the caller waits. Made by
    :meth:`RetryPolicy.start_call`.

    Example::

        retries = policy.start_call(started=now())
        delay = retries.retry_delay(error, now())  # seconds to wait, or None: give up
        retries.state.attempt_number  # 1: the attempt that failed
    """

    __slots__ = ("_deadline", "_policy", "_started", "_state", "resumes")

    def __init__(self, policy: RetryPolicy, started: float, deadline: float | None = None) -> None:
        self._policy = policy
        self._deadline = deadline
        self._started = started
        # Made at the first failure: most calls never fail, and building tenacity's
        # state costs more than the rest of a call's set-up together.
        self._state: tenacity.RetryCallState | None = None
        self.resumes = 0
        """Resumes granted so far (bounded by ``max_resumes``)."""

    @property
    def state(self) -> tenacity.RetryCallState:
        """tenacity's view of the call, as its strategies and hooks receive it."""
        state = self._state
        if state is None:
            state = self._state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
            state.start_time = self._started
        return state

    def retry_delay(self, error: LLMStreamError, now: float) -> float | None:
        """The attempt in progress failed with ``error`` at ``now``: seconds to wait, or None.

        None when the error is not retryable, the ``retry`` predicate or the
        ``stop`` strategy says no, a server's ``Retry-After`` is above
        ``max_retry_after``, or the wait would reach the call's deadline. A
        retry calls ``before_sleep`` with :attr:`state` before returning.

        Example::

            delay = retries.retry_delay(error, now())
        """
        policy = self._policy
        state = self._record(error, now)
        if not policy.retryable(error):
            return None
        if policy.retry is not None and not policy.retry(state):
            return None
        return self._plan_wait(error, now, stop=policy._stop())

    def resume_delay(self, error: LLMStreamError, now: float) -> float | None:
        """The attempt in progress broke off after delivering text: seconds to wait, or None.

        A resume is an attempt like any other for the strategies, but it is
        counted by ``max_resumes``, not by ``stop``. None when resume is off,
        the resumes are spent, or (as for a retry) the error, the ``retry``
        predicate, ``Retry-After`` or the deadline rule it out.

        Example::

            delay = retries.resume_delay(error, now())
        """
        policy = self._policy
        state = self._record(error, now)
        if not policy.resume or self.resumes >= policy.max_resumes:
            return None
        if not policy.retryable(error):
            return None
        if policy.retry is not None and not policy.retry(state):
            return None
        delay = self._plan_wait(error, now, stop=None)
        if delay is not None:
            self.resumes += 1
        return delay

    def _record(self, error: LLMStreamError, now: float) -> tenacity.RetryCallState:
        """The outcome of the attempt in progress, on the caller's clock."""
        state = self.state
        if state.outcome is not None:
            # Recorded lazily, where tenacity does it after its sleep: the next attempt began.
            state.prepare_for_next_attempt()
        state.set_exception((type(error), error, error.__traceback__))
        state.outcome_timestamp = now
        return state

    def _plan_wait(
        self, error: LLMStreamError, now: float, *, stop: StopStrategy | None
    ) -> float | None:
        """tenacity's order after a retry is allowed: wait, stop, then before_sleep."""
        policy = self._policy
        state = self.state
        delay = policy._wait(state, error)
        if delay is None:
            return None
        # tenacity >= 9 tells the stop strategy what is about to be slept
        # (stop_before_delay); earlier versions ignore the attribute.
        state.upcoming_sleep = delay
        if stop is not None and stop(state):
            return None
        if self._deadline is not None and now + delay >= self._deadline:
            return None
        state.next_action = tenacity.RetryAction(delay)
        state.idle_for += delay
        if policy.before_sleep is not None:
            policy.before_sleep(state)
        return delay


def _unsupported(retrying: tenacity.BaseRetrying) -> list[str]:
    """What a tenacity ``Retrying`` asks that llmstream cannot do, and why."""
    refused = []
    if retrying.sleep is not _default_sleep(type(retrying)):
        refused.append(
            "sleep= is not used: llmstream waits on its own clock, so that cancel(), "
            "closing the stream and its deadlines end a wait at once (the wait strategy "
            "still sets how long); drop sleep="
        )
    if retrying.before is not tenacity.before_nothing:
        refused.append(
            "before= has no equivalent (attempts are started by the stream); "
            "use on_retry=, called before each retry or resume"
        )
    if retrying.after is not tenacity.after_nothing:
        refused.append("after= has no equivalent; use before_sleep= or on_retry=")
    if retrying.retry_error_callback is not None:
        refused.append(
            "retry_error_callback= cannot replace the error: llmstream raises the call's "
            "last error when it stops retrying; catch that instead"
        )
    if retrying.retry_error_cls is not tenacity.RetryError:
        refused.append(
            "retry_error_cls= is not used: llmstream raises the call's last error, "
            "never a RetryError"
        )
    hooks = {
        "stop": retrying.stop,
        "wait": retrying.wait,
        "retry": retrying.retry,
        "before_sleep": retrying.before_sleep,
    }
    for name, hook in hooks.items():
        if _is_async(hook):
            refused.append(
                f"{name}= is an async strategy: llmstream decides without awaiting; "
                "pass a plain tenacity strategy"
            )
    return refused


def _default_sleep(retrying_class: type[tenacity.BaseRetrying]) -> object:
    """The ``sleep`` a tenacity class uses when none is given (it differs by class and version)."""
    for cls in retrying_class.__mro__:
        init = vars(cls).get("__init__")
        if init is None:
            continue
        parameter = inspect.signature(init).parameters.get("sleep")
        if parameter is not None:
            return parameter.default
    return None


def _is_async(hook: object) -> bool:
    if hook is None:
        return False
    # An async function, or a strategy object with an async __call__ (tenacity.asyncio's).
    return inspect.iscoroutinefunction(hook) or inspect.iscoroutinefunction(type(hook).__call__)


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
