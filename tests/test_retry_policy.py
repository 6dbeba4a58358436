"""RetryPolicy on tenacity: one call state per call, before_sleep honoured, nothing dropped.

The decisions are sans-IO: fed errors and timestamps, they return delays, so most tests
here need no server. The last ones run a call end to end on both clients.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import tenacity

import llmstream
from llmstream.testing import FakeVLLM, Fault

from .drivers import MODES, collect

DOWN = llmstream.APIConnectionError("connection refused")


def _status(code: int, **headers: str) -> llmstream.APIStatusError:
    return llmstream.InternalServerError(
        f"HTTP {code}", status_code=code, body="", headers=dict(headers)
    )


class Seen:
    """A tenacity strategy that records what each call state said, then answers."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.states: list[dict[str, Any]] = []

    def __call__(self, state: tenacity.RetryCallState) -> Any:
        assert state.outcome is not None
        self.states.append(
            {
                "attempt": state.attempt_number,
                "since_start": state.seconds_since_start,
                "idle_for": state.idle_for,
                "error": state.outcome.exception(),
            }
        )
        return self.answer


# -- one call state per call ---------------------------------------------------------------


def test_strategies_see_the_real_attempt_number_start_time_idle_time_and_error() -> None:
    wait = Seen(1.5)
    retries = llmstream.RetryPolicy(max_retries=5, wait=wait).start_call(started=100.0)
    errors = [llmstream.APIConnectionError(f"refused {i}") for i in range(3)]
    assert [retries.retry_delay(e, now=100.0 + 2 * i) for i, e in enumerate(errors)] == [1.5] * 3
    assert wait.states == [
        {"attempt": 1, "since_start": 0.0, "idle_for": 0.0, "error": errors[0]},
        {"attempt": 2, "since_start": 2.0, "idle_for": 1.5, "error": errors[1]},
        {"attempt": 3, "since_start": 4.0, "idle_for": 3.0, "error": errors[2]},
    ]
    assert retries.state.idle_for == 4.5


def test_stop_after_delay_counts_from_the_start_of_the_call() -> None:
    policy = llmstream.RetryPolicy(stop=tenacity.stop_after_delay(10), wait=tenacity.wait_fixed(1))
    retries = policy.start_call(started=50.0)
    assert retries.retry_delay(DOWN, now=55.0) == 1.0
    assert retries.retry_delay(DOWN, now=59.0) == 1.0
    assert retries.retry_delay(DOWN, now=61.0) is None  # 11 s into the call


def test_stop_after_attempt_and_wait_exponential_follow_the_attempts() -> None:
    policy = llmstream.RetryPolicy(
        stop=tenacity.stop_after_attempt(4), wait=tenacity.wait_exponential(multiplier=1, max=60)
    )
    retries = policy.start_call(started=0.0)
    assert [retries.retry_delay(DOWN, now=float(t)) for t in range(4)] == [1.0, 2.0, 4.0, None]


def test_max_retries_is_a_stop_after_attempt() -> None:
    retries = llmstream.RetryPolicy(max_retries=2, wait=tenacity.wait_fixed(0)).start_call(0.0)
    assert [retries.retry_delay(DOWN, now=0.0) for _ in range(3)] == [0.0, 0.0, None]


def test_a_retry_after_is_the_wait_and_counts_as_time_slept() -> None:
    retries = llmstream.RetryPolicy(wait=tenacity.wait_fixed(9)).start_call(started=0.0)
    assert retries.retry_delay(_status(503, **{"retry-after": "2"}), now=0.0) == 2.0
    assert retries.state.idle_for == 2.0
    assert retries.retry_delay(_status(503, **{"retry-after": "3600"}), now=3.0) is None


def test_errors_that_are_never_retried_are_not_whatever_the_strategies_say() -> None:
    policy = llmstream.RetryPolicy(stop=tenacity.stop_never, wait=tenacity.wait_fixed(0))
    not_found = llmstream.NotFoundError("no model", status_code=404, body="", headers={})
    assert policy.start_call(0.0).retry_delay(not_found, now=0.0) is None


def test_a_wait_that_would_reach_the_deadline_is_not_started() -> None:
    hook = Seen(None)
    policy = llmstream.RetryPolicy(wait=tenacity.wait_fixed(2), before_sleep=hook)
    retries = policy.start_call(started=0.0, deadline=10.0)
    assert retries.retry_delay(DOWN, now=7.0) == 2.0
    assert retries.retry_delay(DOWN, now=8.0) is None  # 8 + 2 reaches the deadline
    assert [s["attempt"] for s in hook.states] == [1]


def test_resumes_are_attempts_counted_by_max_resumes_not_by_stop() -> None:
    wait = Seen(0.25)
    policy = llmstream.RetryPolicy(
        resume=True, max_resumes=2, stop=tenacity.stop_after_attempt(1), wait=wait
    )
    retries = policy.start_call(started=0.0)
    broke = llmstream.StreamInterrupted("the connection broke", partial=llmstream.StreamResult())
    assert [retries.resume_delay(broke, now=float(t)) for t in range(3)] == [0.25, 0.25, None]
    assert retries.resumes == 2
    assert [s["attempt"] for s in wait.states] == [1, 2]
    assert retries.retry_delay(DOWN, now=5.0) is None  # stop_after_attempt(1) still rules retries


def test_resume_is_refused_when_it_is_off() -> None:
    broke = llmstream.StreamInterrupted("the connection broke", partial=llmstream.StreamResult())
    assert llmstream.RetryPolicy().start_call(0.0).resume_delay(broke, now=0.0) is None


# -- before_sleep ---------------------------------------------------------------------------


def test_before_sleep_gets_the_call_state_before_each_wait_and_not_when_giving_up() -> None:
    calls: list[tuple[int, float, float]] = []

    def before_sleep(state: tenacity.RetryCallState) -> None:
        assert state.next_action is not None
        calls.append((state.attempt_number, state.next_action.sleep, state.idle_for))

    policy = llmstream.RetryPolicy(
        max_retries=2, wait=tenacity.wait_exponential(multiplier=1), before_sleep=before_sleep
    )
    retries = policy.start_call(started=0.0)
    assert [retries.retry_delay(DOWN, now=0.0) for _ in range(3)] == [1.0, 2.0, None]
    assert calls == [(1, 1.0, 1.0), (2, 2.0, 3.0)]


def test_from_tenacity_takes_before_sleep_and_tenacitys_own_hooks_work(
    caplog: pytest.LogCaptureFixture,
) -> None:
    retrying = tenacity.Retrying(
        wait=tenacity.wait_fixed(0.5),
        before_sleep=tenacity.before_sleep_log(logging.getLogger("app"), logging.WARNING),
    )
    policy = llmstream.RetryPolicy.from_tenacity(retrying)
    assert policy.before_sleep is retrying.before_sleep
    with caplog.at_level(logging.WARNING, logger="app"):
        assert policy.start_call(0.0).retry_delay(DOWN, now=0.0) == 0.5
    assert caplog.messages == [
        "Retrying <unknown> in 0.5 seconds as it raised APIConnectionError: connection refused."
    ]


def test_the_one_decision_methods_call_before_sleep_too() -> None:
    hook = Seen(None)
    policy = llmstream.RetryPolicy(wait=tenacity.wait_fixed(0.1), before_sleep=hook)
    assert policy.delay_before(3, DOWN, started=0.0, now=4.0) == 0.1
    # One decision knows nothing of the call's earlier waits: idle_for is this one only.
    assert hook.states == [{"attempt": 2, "since_start": 4.0, "idle_for": 0.1, "error": DOWN}]


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_before_sleep_runs_before_each_retry_of_a_real_call(mode: str) -> None:
    fake = FakeVLLM("fine")
    fake.add_fault(Fault.http_status(503))
    fake.add_fault(Fault.http_status(503))
    hook = Seen(None)
    retrying = tenacity.Retrying(wait=tenacity.wait_fixed(0), before_sleep=hook)
    outcome = await collect(mode, transport=fake.transport(), client_kwargs={"retry": retrying})
    assert outcome.text == "fine" and outcome.final.retries == 2
    assert [s["attempt"] for s in hook.states] == [1, 2]
    assert all(isinstance(s["error"], llmstream.InternalServerError) for s in hook.states)


# -- nothing dropped silently ----------------------------------------------------------------


def _no_sleep(seconds: float) -> None:
    pass


async def _no_async_sleep(seconds: float) -> None:
    pass


async def _async_stop(state: tenacity.RetryCallState) -> bool:
    return False


@pytest.mark.parametrize(
    ("retrying", "named"),
    [
        (tenacity.Retrying(sleep=_no_sleep), "sleep="),
        (tenacity.AsyncRetrying(sleep=_no_async_sleep), "sleep="),
        (tenacity.Retrying(before=tenacity.before_log(logging.getLogger(), 10)), "before="),
        (tenacity.Retrying(after=tenacity.after_log(logging.getLogger(), 10)), "after="),
        (tenacity.Retrying(retry_error_callback=lambda state: None), "retry_error_callback="),
        (tenacity.Retrying(retry_error_cls=type("Gave", (tenacity.RetryError,), {})), "_cls="),
        # AsyncRetrying awaits an async strategy, though its stubs do not say so.
        (tenacity.AsyncRetrying(stop=_async_stop), "stop= is an async strategy"),  # type: ignore[arg-type]
    ],
    ids=["sleep", "async-sleep", "before", "after", "callback", "error-cls", "async-stop"],
)
def test_what_llmstream_cannot_do_is_refused_with_the_reason(
    retrying: tenacity.BaseRetrying, named: str
) -> None:
    with pytest.raises(llmstream.InvalidRequestError, match=named) as caught:
        llmstream.RetryPolicy.from_tenacity(retrying)
    assert "from_tenacity" in str(caught.value)
    with pytest.raises(llmstream.InvalidRequestError, match=named):
        llmstream.Client("http://x.test/v1", retry=retrying)


def test_sleep_is_refused_because_llmstream_waits_on_its_own_clock() -> None:
    with pytest.raises(llmstream.InvalidRequestError, match="own clock") as caught:
        llmstream.RetryPolicy.from_tenacity(tenacity.Retrying(sleep=_no_sleep))
    assert "cancel()" in str(caught.value)


@pytest.mark.parametrize("reraise", [True, False])
@pytest.mark.parametrize("kind", [tenacity.Retrying, tenacity.AsyncRetrying])
def test_default_sleeps_and_either_reraise_are_accepted(
    kind: type[tenacity.BaseRetrying], reraise: bool
) -> None:
    policy = llmstream.RetryPolicy.from_tenacity(
        kind(stop=tenacity.stop_after_attempt(2), reraise=reraise)
    )
    assert policy.start_call(0.0).retry_delay(DOWN, now=0.0) is not None
