"""The call-level core, driven directly with timestamps: no sockets, no event loop.

Each test feeds :class:`CallCore` what a shell would (a request begun, headers, bytes,
the end of a body, a failure, the clock) and checks the step it returns.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import tenacity

import llmstream
from llmstream._accounting import BudgetOptions
from llmstream._call import (
    TRAILER_WAIT,
    Attempt,
    CallCore,
    Drop,
    Fail,
    Finish,
    NeedContextLength,
    NeedModel,
    NeedPromptCount,
    ReadFailure,
    Retry,
)
from llmstream._call_route import CallRoute
from llmstream._events import CallFailed, CallFinished, FirstToken, RequestSent, ResponseHeaders
from llmstream._fleet_state import EndpointState, FleetState, Pick
from llmstream._flow import StreamOptions
from llmstream._session import StreamSession
from llmstream._vllm_metrics import LoadReport

SSE = {"content-type": "text/event-stream"}
NO_JITTER = llmstream.RetryPolicy(max_retries=2, initial_backoff=0.0, max_backoff=0.0)


def _chunk(text: str | None = None, finish: str | None = None, **extra: Any) -> bytes:
    delta = {"content": text} if text is not None else {}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    body = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    body["choices"] = [choice]
    body.update(extra)
    return f"data: {json.dumps(body)}\n\n".encode()


DONE = b"data: [DONE]\n\n"


def _core(
    *,
    retry: llmstream.RetryPolicy = NO_JITTER,
    timeouts: llmstream.Timeouts | None = None,
    options: StreamOptions | None = None,
    budget: BudgetOptions | None = None,
    body: dict[str, object] | None = None,
    events: list[object] | None = None,
) -> CallCore:
    return CallCore(
        body or {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": True},
        options or StreamOptions(),
        timeouts or llmstream.Timeouts(first_token=5.0, idle=2.0),
        retry,
        budget,
        observer=events.append if events is not None else None,
    )


def _streaming(core: CallCore, now: float = 0.0) -> Attempt:
    attempt = core.begin_attempt(now)
    assert core.response(attempt, 200, SSE, now + 0.01) is None
    return attempt


def test_a_complete_stream_finishes_with_the_assembled_result_and_its_events() -> None:
    events: list[object] = []
    core = _core(events=events)
    attempt = _streaming(core)
    items = core.feed(attempt, _chunk("Hel") + _chunk("lo"), 0.1)
    assert [text for _, text in items] == ["Hel", "lo"]
    core.feed(attempt, _chunk(finish="stop") + DONE, 0.2)
    assert core.step is None
    step = core.body_ended(attempt, 0.3)
    assert isinstance(step, Finish) and step.result.complete and step.result.text == "Hello"
    assert core.result is step.result
    kinds = [type(e) for e in events]
    assert kinds == [RequestSent, ResponseHeaders, FirstToken, CallFinished]


def _count_assemblies(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The times each StreamSession.result() was asked for (assembling a result)."""
    calls: list[float] = []
    assemble = StreamSession.result

    def counted(session: StreamSession, now: float) -> llmstream.StreamResult:
        calls.append(now)
        return assemble(session, now)

    monkeypatch.setattr(StreamSession, "result", counted)
    return calls


def test_a_complete_result_is_assembled_only_when_first_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assemblies = _count_assemblies(monkeypatch)
    core = _core()
    attempt = _streaming(core)
    core.feed(attempt, _chunk("Hel") + _chunk("lo") + _chunk(finish="stop") + DONE, 0.1)
    step = core.body_ended(attempt, 0.3)
    assert isinstance(step, Finish) and core.ended and core.has_result
    assert assemblies == []  # a relay that never reads the result does not pay for it
    result = core.result
    assert result is not None and result.complete and result.text == "Hello"
    assert result.metrics.duration == pytest.approx(0.3)  # as of the end, not of the read
    assert step.result is result and core.snapshot(9.0) is result
    core.stop("closed", 10.0)  # closing after the end changes nothing
    assert core.result is result and result.status == "complete"
    assert assemblies == [0.3]  # once


def test_a_result_is_assembled_at_the_end_when_a_hook_or_a_budget_needs_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assemblies = _count_assemblies(monkeypatch)
    events: list[object] = []
    hooked = _core(events=events)  # CallFinished carries the result
    attempt = _streaming(hooked)
    hooked.feed(attempt, _chunk("Hi", finish="stop") + DONE, 0.1)
    hooked.body_ended(attempt, 0.2)
    assert assemblies == [0.2] and isinstance(events[-1], CallFinished)
    budgeted = _core(budget=BudgetOptions(budget=llmstream.CallBudget(completion_tokens=100)))
    for _ in budgeted.plan():
        pass
    attempt = _streaming(budgeted)
    budgeted.feed(attempt, _chunk("Hi", finish="stop") + DONE, 0.1)
    budgeted.body_ended(attempt, 0.3)  # its token report reads the account, settled next
    assert assemblies == [0.2, 0.3]


def test_a_503_is_retried_with_the_same_body_then_counted_in_the_result() -> None:
    core = _core()
    first = core.begin_attempt(0.0)
    assert core.response(first, 503, {}, 0.01) is None  # the shell reads the error body
    step = core.error_response(first, 503, "Service Unavailable", {}, b"busy", 0.02)
    assert isinstance(step, Retry) and step.event.kind == "retry" and step.event.attempt == 2
    second = core.begin_attempt(0.03)
    assert second.number == 2 and second.body is first.body
    core.response(second, 200, SSE, 0.04)
    core.feed(second, _chunk("ok", finish="stop") + DONE, 0.05)
    result = core.body_ended(second, 0.06)
    assert isinstance(result, Finish) and result.result.retries == 1


def test_a_404_is_not_retried() -> None:
    core = _core()
    attempt = core.begin_attempt(0.0)
    step = core.error_response(attempt, 404, "Not Found", {}, b"{}", 0.01)
    assert isinstance(step, Fail) and isinstance(step.error, llmstream.NotFoundError)
    assert core.error is step.error


def test_retries_stop_at_max_retries() -> None:
    core = _core(retry=llmstream.RetryPolicy(max_retries=1, initial_backoff=0, max_backoff=0))
    first = core.begin_attempt(0.0)
    assert isinstance(core.error_response(first, 500, "", {}, b"", 0.0), Retry)
    second = core.begin_attempt(0.0)
    step = core.error_response(second, 500, "", {}, b"", 0.0)
    assert isinstance(step, Fail) and isinstance(step.error, llmstream.InternalServerError)


def test_a_body_that_is_not_an_event_stream_is_a_protocol_error() -> None:
    core = _core()
    attempt = core.begin_attempt(0.0)
    step = core.response(attempt, 200, {"content-type": "application/json"}, 0.01)
    assert isinstance(step, Fail) and isinstance(step.error, llmstream.ProtocolError)


@pytest.mark.parametrize(
    "bad",
    [_chunk("\udcff").replace(b"\\udcff", b"\xff"), b"data: " + b"a" * 2000],
    ids=["invalid-utf-8", "a-line-over-max_line_bytes"],
)
def test_bad_bytes_in_the_last_read_of_a_body_are_a_protocol_error_not_a_cut(bad: bytes) -> None:
    # The good events before them in the same read are delivered; the end of the body
    # that follows must not pass for a connection cut (StreamInterrupted, retried).
    core = CallCore(
        {"model": "m", "messages": [], "stream": True},
        StreamOptions(),
        llmstream.Timeouts(),
        NO_JITTER,
        None,
        max_line_bytes=1000,
    )
    attempt = _streaming(core)
    items = core.feed(attempt, _chunk("Hi") + bad, 0.1)
    assert [text for _, text in items] == ["Hi"]
    step = core.body_ended(attempt, 0.2)
    assert isinstance(step, Fail) and isinstance(step.error, llmstream.ProtocolError)
    partial = step.error.partial
    assert partial is not None and partial.status == "error" and partial.text == "Hi"


def test_headers_that_never_come_are_a_first_token_timeout_retried_before_output() -> None:
    core = _core(timeouts=llmstream.Timeouts(first_token=5.0, idle=2.0))
    attempt = core.begin_attempt(10.0)
    assert attempt.header_deadline == (15.0, "first_token")
    step = core.send_failed(attempt, None, 15.0)
    assert isinstance(step, Retry)
    assert isinstance(step.event.error, llmstream.FirstTokenTimeout)


def test_the_first_event_moves_the_deadline_from_first_token_to_idle() -> None:
    core = _core(timeouts=llmstream.Timeouts(first_token=5.0, idle=2.0))
    attempt = _streaming(core)
    assert core.deadline() == (5.0, "first_token")
    core.feed(attempt, _chunk("a"), 1.0)
    core.feed(attempt, _chunk("b"), 1.5)
    assert core.deadline() == (3.5, "idle")


def test_deadlines_are_checked_at_least_once_per_the_shorter_of_first_token_and_idle() -> None:
    # A deadline that starts later (the idle one after the first event, a new request's
    # first token) then never comes before the check timed now: shells never re-time it.
    core = _core(timeouts=llmstream.Timeouts(first_token=300.0, idle=60.0))
    attempt = _streaming(core)
    assert core.deadline_due(0.0) == 60.0  # the first token's deadline is at 300
    core.feed(attempt, _chunk("a"), 10.0)
    assert core.deadline() == (70.0, "idle")  # after the check timed at 60
    assert core.deadline_due(60.0) == 10.0


def test_a_new_requests_first_token_deadline_is_never_before_the_timed_check() -> None:
    # The idle deadline of a request that streamed is 5 s away, but the request that
    # resumes it must get its first token within 0.3 s: the check comes by then.
    core = _core(
        timeouts=llmstream.Timeouts(first_token=0.3, idle=5.0),
        retry=llmstream.RetryPolicy(initial_backoff=0.0, max_backoff=0.0, resume=True),
    )
    attempt = _streaming(core)
    core.feed(attempt, _chunk("Hel"), 1.0)
    due = core.deadline_due(1.0)
    assert due == 0.3  # not 5.0, the idle deadline's distance
    step = core.read_failed(attempt, ReadFailure("broken", "cut"), 1.1)
    assert isinstance(step, Retry)
    resumed = core.begin_attempt(1.1)
    assert core.response(resumed, 200, SSE, 1.1) is None
    assert core.deadline() == pytest.approx((1.4, "first_token"))
    assert 1.0 + due <= 1.4 + 1e-9  # the check timed before the resume is not late


def test_a_deadline_cuts_only_a_read_in_progress_and_becomes_the_timeout_error() -> None:
    core = _core(timeouts=llmstream.Timeouts(first_token=5.0, idle=2.0))
    attempt = _streaming(core)
    core.feed(attempt, _chunk("partial"), 1.0)
    assert core.deadline_due(2.0) == pytest.approx(1.0)
    assert core.deadline_due(3.5) == 0.05  # passed, but nothing is being read
    attempt.reading = True
    assert core.deadline_due(3.5) is attempt  # cut this attempt's connection
    step = core.read_failed(attempt, None, 3.6)
    assert isinstance(step, Fail) and isinstance(step.error, llmstream.IdleTimeout)
    assert step.error.partial is not None and step.error.partial.text == "partial"


@pytest.mark.parametrize("ending", ["finish", "done"])
def test_a_whole_answer_waits_briefly_for_the_bodys_end_then_completes_without_resume(
    ending: str,
) -> None:
    # The server finished the answer (or said [DONE]) and never ends the body: the
    # answer is complete after a short wait, not an idle timeout, and never resumed.
    core = _core(
        timeouts=llmstream.Timeouts(first_token=5.0, idle=60.0),
        retry=llmstream.RetryPolicy(resume=True, initial_backoff=0, max_backoff=0),
    )
    attempt = _streaming(core)
    core.feed(attempt, _chunk("Hello"), 1.0)
    assert core.deadline() == (61.0, "idle")
    last = _chunk(finish="stop") if ending == "finish" else _chunk(finish="stop") + DONE
    core.feed(attempt, last, 1.5)
    assert core.deadline() == (1.5 + TRAILER_WAIT, "idle")
    attempt.reading = True
    assert core.deadline_due(1.5 + TRAILER_WAIT) is attempt
    step = core.read_failed(attempt, None, 1.6 + TRAILER_WAIT)
    assert isinstance(step, Finish) and step.result.complete and step.result.text == "Hello"


def test_done_before_every_finish_then_a_stall_is_cut_short_not_an_idle_timeout() -> None:
    core = _core(timeouts=llmstream.Timeouts(first_token=5.0, idle=60.0))
    attempt = _streaming(core)
    core.feed(attempt, _chunk("Hel") + DONE, 1.0)
    attempt.reading = True
    assert core.deadline_due(1.0 + TRAILER_WAIT) is attempt
    step = core.read_failed(attempt, None, 1.1 + TRAILER_WAIT)
    assert isinstance(step, Fail) and isinstance(step.error, llmstream.StreamInterrupted)
    assert "[DONE] before every choice had a finish_reason" in str(step.error)


def test_time_held_back_by_the_consumer_is_not_idleness() -> None:
    core = _core(timeouts=llmstream.Timeouts(first_token=5.0, idle=2.0))
    attempt = _streaming(core)
    core.feed(attempt, _chunk("a"), 1.0)
    core.reading_resumed(10.0)  # the buffer was full from 1.0 to 10.0
    assert core.deadline() == (12.0, "idle")


def test_a_broken_stream_after_output_fails_with_the_partial_without_resume() -> None:
    core = _core()
    attempt = _streaming(core)
    core.feed(attempt, _chunk("Once"), 0.1)
    step = core.read_failed(attempt, ReadFailure("broken", "ReadError: reset"), 0.2)
    assert isinstance(step, Fail) and isinstance(step.error, llmstream.StreamInterrupted)
    assert core.result is not None and core.result.text == "Once"


def test_a_broken_stream_is_resumed_with_a_continuation_body() -> None:
    core = _core(retry=llmstream.RetryPolicy(resume=True, initial_backoff=0, max_backoff=0))
    core.body["max_tokens"] = 10
    attempt = _streaming(core)
    core.feed(attempt, _chunk("Once") + _chunk(" upon"), 0.1)
    step = core.read_failed(attempt, ReadFailure("broken", "ReadError"), 0.2)
    assert isinstance(step, Retry) and step.event.kind == "resume"
    second = core.begin_attempt(0.3)
    messages = second.body["messages"]
    assert isinstance(messages, list) and messages[-1] == {
        "role": "assistant",
        "content": "Once upon",
    }
    assert second.body["continue_final_message"] is True and second.body["max_tokens"] == 8
    core.response(second, 200, SSE, 0.31)
    core.feed(second, _chunk(" a time", finish="stop") + DONE, 0.4)
    done = core.body_ended(second, 0.5)
    assert isinstance(done, Finish) and done.result.text == "Once upon a time"
    assert done.result.resumes == 1


def test_a_retry_that_would_end_after_the_total_deadline_is_not_made() -> None:
    policy = llmstream.RetryPolicy(wait=lambda state: 5.0)
    core = _core(retry=policy, timeouts=llmstream.Timeouts(total=3.0))
    attempt = core.begin_attempt(0.0)
    step = core.error_response(attempt, 503, "", {}, b"", 1.0)
    assert isinstance(step, Fail)


def test_an_error_event_mid_stream_delivers_what_came_before_then_fails() -> None:
    core = _core()
    attempt = _streaming(core)
    error = b'data: {"error": {"message": "boom", "type": "x", "code": 400}}\n\n'
    items = core.feed(attempt, _chunk("a") + error, 0.1)
    assert [text for _, text in items] == ["a"]
    assert isinstance(core.step, Fail)
    assert isinstance(core.step.error, llmstream.ServerStreamError)


def test_a_stop_freezes_a_cancelled_result_and_swallows_later_failures() -> None:
    events: list[object] = []
    core = _core(events=events)
    attempt = _streaming(core)
    core.feed(attempt, _chunk("a"), 0.1)
    assert core.stop("cancelled", 0.2) is True
    assert core.stop("closed", 0.3) is False
    assert core.result is not None and core.result.status == "cancelled"
    step = core.read_failed(attempt, ReadFailure("broken", "ReadError"), 0.4)
    assert isinstance(step, Finish) and core.error is None
    assert not any(isinstance(e, CallFailed) for e in events)


def test_a_stop_before_any_response_is_a_cancelled_result_not_a_missing_one() -> None:
    core = _core()
    core.begin_attempt(0.0)
    core.stop("cancelled", 0.1)
    assert core.result is not None and core.result.status == "cancelled"


def test_a_pause_past_max_pause_aborts_the_call() -> None:
    core = _core(options=StreamOptions(max_pause=1.0))
    _streaming(core)
    core.pause_clock.pause(1.0)
    assert core.pause_expired(1.5) is None
    step = core.pause_expired(2.0)
    assert step is not None and isinstance(step.error, llmstream.PauseTimeout)
    assert core.result is not None and core.result.status == "aborted"


def test_the_total_deadline_ends_a_call_whose_reader_is_held_back() -> None:
    # No read is in progress (a pause, a full buffer): the deadline cannot cut one, so
    # the check itself ends the call and asks the shell to cut the connection.
    core = _core(timeouts=llmstream.Timeouts(total=3.0, idle=1.0))
    attempt = _streaming(core)
    core.feed(attempt, _chunk("Hel") + _chunk("lo"), 0.1)
    core.reading_resumed(2.5)  # held back until now: not idleness
    assert core.held_expired(2.9) is None and core.held_wait(2.9) == pytest.approx(0.1)
    assert core.deadline_due(2.9) == pytest.approx(0.1)
    assert core.deadline_due(3.0) is attempt
    assert isinstance(core.error, llmstream.TotalTimeout) and core.error.partial is not None
    assert core.error.partial.text == "Hello"
    # The reader that wakes, or a read that completes late, reports that error only.
    assert core.feed(attempt, _chunk("late"), 3.1) == []
    step = core.read_failed(attempt, ReadFailure("broken", "ReadError"), 3.1)
    assert isinstance(step, Fail) and step.error is core.error
    assert isinstance(core.body_ended(attempt, 3.2), Fail)
    held = core.held_expired(3.2)
    assert held is not None and held.error is core.error
    assert core.deadline_due(3.3) == 0.05  # told once


def test_a_pause_wakes_for_the_sooner_of_max_pause_and_the_total_deadline() -> None:
    core = _core(options=StreamOptions(max_pause=10.0), timeouts=llmstream.Timeouts(total=3.0))
    _streaming(core)
    assert core.held_wait(1.0) == pytest.approx(2.0)
    core.pause_clock.pause(1.0)
    assert core.held_wait(1.0) == pytest.approx(2.0)
    step = core.held_expired(3.0)
    assert step is not None and isinstance(step.error, llmstream.TotalTimeout)
    untimed = _core(options=StreamOptions(max_pause=10.0), timeouts=llmstream.Timeouts())
    _streaming(untimed)
    assert untimed.held_wait(1.0) is None
    untimed.pause_clock.pause(1.0)
    assert untimed.held_wait(2.0) == pytest.approx(9.0)
    expired = untimed.held_expired(11.0)
    assert expired is not None and isinstance(expired.error, llmstream.PauseTimeout)


def test_a_whole_answer_held_back_past_the_total_deadline_keeps_its_result() -> None:
    core = _core(timeouts=llmstream.Timeouts(total=3.0))
    attempt = _streaming(core)
    core.feed(attempt, _chunk("Hi", finish="stop"), 0.1)
    assert core.held_expired(5.0) is None and core.error is None
    assert isinstance(core.body_ended(attempt, 5.1), Finish)


def test_a_consumer_too_far_behind_overflows_only_with_on_full_error() -> None:
    waiting = _core(options=StreamOptions(buffer=2))
    _streaming(waiting)
    assert waiting.overflowed(10, 0.1) is None and waiting.waits_for_room
    core = _core(options=StreamOptions(buffer=2, on_full="error"))
    _streaming(core)
    assert core.overflowed(2, 0.1) is None
    step = core.overflowed(3, 0.1)
    assert step is not None and isinstance(step.error, llmstream.BufferOverflow)


def test_events_from_an_attempt_that_is_no_longer_current_are_ignored() -> None:
    core = _core()
    first = _streaming(core)
    core.begin_attempt(1.0)
    assert core.feed(first, _chunk("late"), 1.1) == []


# -- budgets ------------------------------------------------------------------------------


def _planned(core: CallCore, answers: dict[type, object]) -> list[object]:
    """Drive the planner, answering each need from ``answers``; returns the needs."""
    needs: list[object] = []
    planner = core.plan()
    answer: object = None
    while True:
        try:
            need = planner.send(answer)
        except StopIteration:
            return needs
        needs.append(need)
        answer = answers[type(need)]


def test_a_prompt_over_its_budget_is_refused_before_any_request() -> None:
    body: dict[str, object] = {"messages": [{"role": "user", "content": "word " * 400}]}
    core = _core(body=body, budget=BudgetOptions(budget=llmstream.CallBudget(prompt_tokens=10)))
    with pytest.raises(llmstream.BudgetExceeded):
        next(core.plan())  # refused before asking for the model or the context length


def test_planning_asks_for_the_model_only_when_the_body_has_none() -> None:
    budget = BudgetOptions(budget=llmstream.CallBudget(completion_tokens=50))
    core = _core(budget=budget)
    needs = _planned(core, {NeedContextLength: 4096})
    assert needs == [NeedContextLength("m")]
    assert core.body["max_tokens"] == 50 and core.account is not None
    anonymous = _core(body={"messages": [{"role": "user", "content": "Hi"}]}, budget=budget)
    needs = _planned(anonymous, {NeedModel: "qwen", NeedContextLength: None})
    assert needs == [NeedModel(), NeedContextLength("qwen")]
    assert anonymous.body["model"] == "qwen"


def test_a_server_count_is_asked_for_before_the_context_length() -> None:
    budget = BudgetOptions(budget=llmstream.CallBudget(total_tokens=100), count_prompt="server")
    core = _core(budget=budget)
    needs = _planned(core, {NeedPromptCount: 30, NeedContextLength: 4096})
    assert [type(n) for n in needs] == [NeedPromptCount, NeedContextLength]
    assert core.body["max_tokens"] == 70


def test_a_budget_stop_ends_the_call_at_once_with_status_budget() -> None:
    budget = BudgetOptions(budget=llmstream.CallBudget(completion_tokens=2))
    core = _core(budget=budget)
    _planned(core, {NeedContextLength: None})
    core.body.pop("max_tokens")  # a server that ignores max_tokens keeps generating
    assert core.account is not None
    attempt = _streaming(core)
    items = core.feed(attempt, _chunk("a") + _chunk("b") + _chunk("c"), 0.1)
    assert [text for _, text in items] == ["a", "b"]
    assert isinstance(core.step, Finish) and core.step.result.status == "budget"


def test_retries_of_a_call_share_one_tenacity_state() -> None:
    import tenacity

    seen: list[tuple[int, float]] = []
    policy = llmstream.RetryPolicy(
        max_retries=5,
        wait=tenacity.wait_fixed(1.0),
        stop=tenacity.stop_after_delay(2.5),  # judged on the call's real elapsed time
        before_sleep=lambda state: seen.append((state.attempt_number, state.idle_for)),
    )
    core = _core(retry=policy)
    now = 100.0
    steps = []
    for _ in range(4):
        attempt = core.begin_attempt(now)
        step = core.error_response(attempt, 503, "", {}, b"", now + 0.1)
        steps.append(step)
        if not isinstance(step, Retry):
            break
        now += 0.1 + step.delay
    assert [type(s) for s in steps] == [Retry, Retry, Retry, Fail]
    assert seen == [(1, 1.0), (2, 2.0), (3, 3.0)]


# -- over a fleet: moves, rounds, fallback ---------------------------------------------


def _fleet_core(retry: llmstream.RetryPolicy, total: float | None = None) -> CallCore:
    fleet = llmstream.Fleet(
        [llmstream.Endpoint("http://a:8000/v1"), llmstream.Endpoint("http://b:8000/v1")],
        fallback=[llmstream.Endpoint("http://c:8000/v1", model="small")],
        model="big",
        breaker=llmstream.CircuitBreaker(failures=100),  # this test is not about breakers
    )
    route = CallRoute(FleetState(fleet, rng=random.Random(0)), session=None)
    core = _core(retry=retry, timeouts=llmstream.Timeouts(first_token=5.0, total=total))
    core.route = route
    return core


def _failing_calls(core: CallCore) -> list[tuple[str, str, float]]:
    """Every request of a call whose endpoints all answer 503: (host, model, wait before)."""
    sent: list[tuple[str, str, float]] = []
    now, wait = 0.0, 0.0
    while True:
        assert core.admit(now) is None
        attempt = core.begin_attempt(now)
        sent.append((attempt.endpoint or "", str(attempt.body["model"]), wait))
        step = core.error_response(attempt, 503, "", {}, b"", now + 0.1)
        if not isinstance(step, Retry):
            assert isinstance(step, Fail)
            return sent
        now, wait = now + 0.1 + step.delay, step.delay


def test_a_failing_call_moves_through_the_fleet_then_the_fallback_then_backs_off() -> None:
    policy = llmstream.RetryPolicy(max_retries=2, wait=tenacity.wait_exponential(multiplier=1))
    sent = _failing_calls(_fleet_core(policy))
    hosts = [host.split("/")[2].split(":")[0] for host, _, _ in sent]
    rounds = [hosts[i : i + 3] for i in range(0, len(hosts), 3)]
    # Each round tries both primaries (in either order), then the fallback model; the
    # policy's backoff comes only between rounds, and its retries count rounds.
    assert [sorted(r[:2]) + r[2:] for r in rounds] == [["a", "b", "c"]] * 3
    assert [model for _, model, _ in sent] == ["big", "big", "small"] * 3
    assert [wait for _, _, wait in sent] == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 2.0, 0.0, 0.0]


def test_one_total_deadline_bounds_every_round_of_a_call_over_a_fleet() -> None:
    policy = llmstream.RetryPolicy(max_retries=10, wait=tenacity.wait_fixed(1.0))
    sent = _failing_calls(_fleet_core(policy, total=2.5))
    # Round one (0.3 s), a 1 s wait, round two (to 1.6 s); a 1 s wait would end past 2.5 s.
    assert len(sent) == 6


# -- several attempts in flight (hedging, fleets) -------------------------------------------


def test_a_hedge_that_answers_first_takes_the_call_and_the_first_attempt_is_lost() -> None:
    events: list[object] = []
    core = _core(events=events)
    primary = core.begin_attempt(0.0, endpoint="http://a/v1")
    hedge = core.begin_attempt(1.0, endpoint="http://b/v1", hedge=True)
    assert core.current is primary and hedge.hedge
    assert core.response(primary, 200, SSE, 1.1) is None
    assert core.response(hedge, 200, SSE, 1.2) is None
    items = core.feed(hedge, _chunk("from b"), 1.3)
    assert [text for _, text in items] == ["from b"]
    assert core.current is hedge and primary.lost and not hedge.lost
    assert core.feed(primary, _chunk("from a"), 1.4) == []  # the loser is ignored
    core.feed(hedge, _chunk(finish="stop") + DONE, 1.5)
    step = core.body_ended(hedge, 1.6)
    assert isinstance(step, Finish) and step.result.text == "from b"
    sent = [e for e in events if isinstance(e, RequestSent)]
    assert [(e.endpoint, e.hedge) for e in sent] == [("http://a/v1", False), ("http://b/v1", True)]


@pytest.mark.parametrize("winner", ["hedge", "first"])
def test_a_shared_budget_is_charged_for_the_prompt_of_the_request_that_lost(winner: str) -> None:
    shared = llmstream.TokenBudget(1_000)
    budget = BudgetOptions(shared=shared, count_prompt="server")
    core = _core(budget=budget)
    _planned(core, {NeedPromptCount: 30, NeedContextLength: 4096})
    primary = core.begin_attempt(0.0)
    hedge = core.begin_attempt(0.5, hedge=True)
    core.response(primary, 200, SSE, 0.6)
    core.response(hedge, 200, SSE, 0.6)
    answering = hedge if winner == "hedge" else primary
    core.feed(answering, _chunk("ab"), 0.7)
    core.feed(answering, _chunk(finish="stop") + DONE, 0.8)
    assert isinstance(core.body_ended(answering, 0.9), Finish)
    core.settle()
    # Both servers prefilled the 30-token prompt; the winner's two chunks count a token each.
    assert shared.spent == 30 + 30 + 2


def test_a_first_attempt_that_answers_first_makes_the_hedge_lost() -> None:
    core = _core()
    primary = core.begin_attempt(0.0)
    hedge = core.begin_attempt(0.5, hedge=True)
    core.response(primary, 200, SSE, 0.6)
    core.response(hedge, 200, SSE, 0.6)
    assert [t for _, t in core.feed(primary, _chunk("a"), 0.7)] == ["a"]
    assert hedge.lost and core.current is primary
    assert core.feed(hedge, _chunk("b"), 0.8) == []


def test_a_failing_hedge_is_dropped_and_the_call_goes_on() -> None:
    core = _core()
    primary = core.begin_attempt(0.0)
    hedge = core.begin_attempt(0.5, hedge=True)
    step = core.error_response(hedge, 503, "", {}, b"", 0.6)
    assert isinstance(step, Drop) and step.attempt is hedge and core.error is None
    core.response(primary, 200, SSE, 0.7)
    core.feed(primary, _chunk("ok", finish="stop") + DONE, 0.8)
    assert isinstance(core.body_ended(primary, 0.9), Finish)


def test_a_failing_first_attempt_hands_the_call_to_the_hedge_instead_of_retrying() -> None:
    core = _core()
    primary = core.begin_attempt(0.0)
    hedge = core.begin_attempt(0.5, hedge=True)
    step = core.send_failed(primary, llmstream.APIConnectionError("refused"), 0.6)
    assert isinstance(step, Drop) and primary.lost and core.current is hedge
    assert core.attempts == 2  # no retry was begun
    core.response(hedge, 200, SSE, 0.7)
    core.feed(hedge, _chunk("ok", finish="stop") + DONE, 0.8)
    done = core.body_ended(hedge, 0.9)
    assert isinstance(done, Finish) and done.result.text == "ok"


def _hedged_pair() -> FleetState:
    """Endpoints a and b, hedged after 0.1 s."""
    fleet = llmstream.Fleet(
        [llmstream.Endpoint("http://a:8000/v1"), llmstream.Endpoint("http://b:8000/v1")],
        model="big",
        hedging=llmstream.Hedging(delay=0.1),
    )
    return FleetState(fleet, rng=random.Random(0))


def test_a_hedge_is_due_early_when_the_endpoint_turned_slow() -> None:
    # Two calls on endpoint a, one on b; b's answer, sent after a's first request, shows
    # that a is slow: the second call on a is due its hedge with the first one's.
    state = _hedged_pair()
    a, b = state.endpoints

    def call_on(endpoint: EndpointState, now: float) -> tuple[CallCore, Attempt]:
        core = _core()
        core.route = CallRoute(state, session=None)
        core._pick = Pick(endpoint, False)  # as admit() would have chosen it
        attempt = core.begin_attempt(now)
        assert attempt.target is endpoint
        assert core.response(attempt, 200, SSE, now) is None
        return core, attempt

    first, _ = call_on(a, 0.0)
    second, _ = call_on(a, 0.03)
    other, on_b = call_on(b, 0.02)
    assert second.hedge_due(0.05) == pytest.approx(0.05)  # look again when the first is due
    other.feed(on_b, _chunk("from b"), 0.07)
    assert second.hedge_due(0.1) == 0.0
    assert first.hedge_due(0.1) == pytest.approx(0.0)


@pytest.mark.parametrize("winner", ["hedge", "first"])
def test_only_a_request_overtaken_by_its_hedge_counts_against_its_endpoint(winner: str) -> None:
    # The first request is late: its endpoint takes no new calls meanwhile. If its hedge
    # answers first, the cut first request keeps showing its endpoint slow; if the first
    # answers, the cut hedge says nothing of the endpoint it was sent to.
    state = _hedged_pair()
    a, b = state.endpoints
    core = _core()
    core.route = CallRoute(state, session=None)
    core._pick = Pick(a, False)
    first = core.begin_attempt(0.0)
    assert core.response(first, 200, SSE, 0.0) is None
    assert core.hedge_due(0.1) == 0.0
    hedge = core.begin_hedge(0.1)
    assert hedge is not None and hedge.target is b
    assert state._stalled(a)  # late: new calls go elsewhere
    core.response(hedge, 200, SSE, 0.11)
    answering = hedge if winner == "hedge" else first
    core.feed(answering, _chunk("x"), 0.15)
    loser = first if winner == "hedge" else hedge
    assert loser.lost
    if winner == "hedge":
        assert list(a.rescued) == [(0.0, 0.15)] and not b.rescued
    else:
        assert not a.rescued and not b.rescued and not state._stalled(a)


def test_no_hedge_once_output_arrived() -> None:
    core = _core()
    attempt = _streaming(core)
    core.feed(attempt, _chunk("a"), 0.1)
    with pytest.raises(RuntimeError):
        core.begin_attempt(0.2, hedge=True)


def test_a_call_ends_with_exactly_one_end_event_whatever_follows() -> None:
    events: list[object] = []
    core = _core(events=events)
    attempt = _streaming(core)
    core.feed(attempt, _chunk("a"), 0.1)
    core.stop("cancelled", 0.2)
    core.fail(llmstream.LLMStreamError("late"), 0.3)  # e.g. a reader that died afterwards
    core.stop("closed", 0.4)
    ends = [e for e in events if isinstance(e, CallFinished | CallFailed)]
    assert len(ends) == 1 and isinstance(ends[0], CallFinished)
    assert ends[0].status == "cancelled" and ends[0].attempt == 1
    assert all(e.call is ends[0].call for e in events)  # type: ignore[attr-defined]


def test_a_failure_then_a_close_ends_once_with_the_failure() -> None:
    events: list[object] = []
    core = _core(events=events)
    attempt = core.begin_attempt(0.0)
    core.response(attempt, 404, {}, 0.01)
    step = core.error_response(attempt, 404, "Not Found", {}, b"no", 0.02)
    assert isinstance(step, Fail)
    core.stop("closed", 0.03)
    ends = [e for e in events if isinstance(e, CallFinished | CallFailed)]
    assert len(ends) == 1 and isinstance(ends[0], CallFailed)
    assert ends[0].error is step.error and ends[0].result.status == "error"


def test_the_total_deadline_bounds_a_wait_for_room_before_the_first_request() -> None:
    # Every endpoint saturated and Admission(wait=3): the call may wait for room, but not
    # past its total deadline, which counts from when it first asked for an endpoint.
    fleet = llmstream.Fleet(
        [llmstream.Endpoint("http://a:8000/v1")],
        model="big",
        admission=llmstream.Admission(wait=3.0),
    )
    state = FleetState(fleet, rng=random.Random(0))
    state.record_load(state.endpoints[0], LoadReport(running=1, waiting=500, kv_cache=0.1), 0.0)
    core = _core(timeouts=llmstream.Timeouts(first_token=5.0, total=0.3))
    core.route = CallRoute(state, session=None)
    wait = core.admit(0.0)
    assert wait is not None and 0 < wait <= 0.3
    with pytest.raises(llmstream.OverloadedError):
        core.admit(0.31)


def test_a_read_that_completes_after_the_call_stopped_delivers_nothing() -> None:
    # cancel() from another thread while the reader's read is in flight: the result is
    # final at the stop, so the consumer must not get text the result does not hold.
    core = _core()
    attempt = _streaming(core)
    assert [t for _, t in core.feed(attempt, _chunk("Hel"), 0.1)] == ["Hel"]
    core.stop("cancelled", 0.2)
    assert core.feed(attempt, _chunk("lo"), 0.3) == []
    assert core.result is not None and core.result.text == "Hel"
