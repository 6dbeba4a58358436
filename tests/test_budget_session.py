"""A budget on a stream, sans-IO: a StreamSession fed bytes, with a CallAccount."""

from __future__ import annotations

import json

import pytest

from llmstream._accounting import CallAccount
from llmstream._budget import CallBudget, CallPlan, plan_call
from llmstream._chunks import ChatCompletionChunk
from llmstream._errors import BudgetExceeded
from llmstream._result import StreamResult
from llmstream._session import StreamSession
from llmstream._token_budget import TokenBudget

PROMPT_ESTIMATE = 12  # what the call was planned with
SERVER_USAGE = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}


def _event(data: object) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n\n"


def _content(text: str, index: int = 0) -> dict[str, object]:
    return {"choices": [{"index": index, "delta": {"content": text}, "finish_reason": None}]}


def _finish(index: int = 0, reason: str = "length") -> dict[str, object]:
    # OpenAI and llama.cpp send the finish reason in a chunk of its own, after the last token.
    return {"choices": [{"index": index, "delta": {}, "finish_reason": reason}]}


def _usage(usage: dict[str, int]) -> dict[str, object]:
    return {"choices": [], "usage": usage}


ROLE = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
DONE = b"[DONE]"


def _budgeted(
    budget: CallBudget, *, max_tokens: int | None = None
) -> tuple[StreamSession, TokenBudget]:
    """A session whose account reserved on a shared budget and planned like the client does."""
    shared = TokenBudget(1_000)
    reservation = shared.reserve(100, minimum=PROMPT_ESTIMATE + 1)
    plan = plan_call(
        budget,
        prompt_tokens=PROMPT_ESTIMATE,
        prompt_source="estimate",
        shared_allowance=reservation.amount,
        max_tokens=max_tokens,
    )
    session = StreamSession(started=0.0)
    session.account = CallAccount(plan, reservation)
    return session, shared


def _feed(session: StreamSession, events: list[object], *, one_read: bool) -> list[str]:
    """Feed the body as one read, or one read per event; the texts delivered."""
    reads = [b"".join(_event(e) for e in events)] if one_read else [_event(e) for e in events]
    delivered: list[str] = []
    for i, data in enumerate(reads):
        delivered += [text for _, text in session.feed(data, now=0.01 * (i + 1))]
        if session.budget_stopped or session.error is not None:
            break  # what the shells do: read no further
    return delivered


def _end(session: StreamSession) -> StreamResult:
    if session.budget_stopped:
        return session.result(now=1.0)
    return session.end_of_body(now=1.0)


READS = pytest.mark.parametrize("one_read", [False, True], ids=["read-per-event", "one-read"])

# -- the server stops on its own: max_tokens is within the budget -------------------------------


@READS
def test_a_separate_finish_chunk_at_the_budget_completes_the_answer(one_read: bool) -> None:
    session, _ = _budgeted(CallBudget(completion_tokens=5))
    plan = session.account.plan if session.account is not None else None
    assert plan is not None and plan.max_tokens == plan.completion_limit == 5
    events = [ROLE, *(_content(c) for c in "abcde"), _finish(), _usage(SERVER_USAGE), DONE]

    delivered = _feed(session, events, one_read=one_read)
    result = _end(session)

    assert "".join(delivered) == result.text == "abcde"
    assert (result.status, result.finish_reason) == ("complete", "length")
    assert result.usage is not None and result.usage.total_tokens == 14
    assert result.tokens.completion_tokens == 5 and result.tokens.prompt_source == "server"


@READS
def test_a_shared_budget_is_charged_the_servers_usage_after_a_separate_finish_chunk(
    one_read: bool,
) -> None:
    session, shared = _budgeted(CallBudget(completion_tokens=5))
    events = [ROLE, *(_content(c) for c in "abcde"), _finish(), _usage(SERVER_USAGE), DONE]

    _feed(session, events, one_read=one_read)
    _end(session)
    assert session.account is not None
    session.account.settle(sent=True)

    # The server's 9 + 5, not the estimate's 12 + 5 (or + 6 with the finish chunk counted).
    assert (shared.spent, shared.reserved, shared.balance) == (14, 0, 1_000 - 14)


@READS
def test_n_choices_that_fit_the_budget_exactly_complete(one_read: bool) -> None:
    # max_tokens=3 for each of 2 choices: 6 tokens at most, the budget's 6.
    session, _ = _budgeted(CallBudget(completion_tokens=6), max_tokens=3)
    usage = {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15}
    events: list[object] = [ROLE]
    for a, b in zip("abc", "xyz", strict=True):
        events += [_content(a, 0), _content(b, 1)]
    events += [_finish(0), _finish(1), _usage(usage), DONE]

    _feed(session, events, one_read=one_read)
    result = _end(session)

    assert result.status == "complete"
    assert [c.text for c in result.choices] == ["abc", "xyz"]
    assert result.usage is not None and result.usage.completion_tokens == 6


# -- the server goes past the budget: the client cuts -------------------------------------------


@READS
def test_a_server_that_ignores_max_tokens_is_cut_before_the_first_token_past_the_budget(
    one_read: bool,
) -> None:
    session, shared = _budgeted(CallBudget(completion_tokens=5))
    events = [ROLE, *(_content(c) for c in "abcdefgh"), _finish(), DONE]

    delivered = _feed(session, events, one_read=one_read)
    result = _end(session)

    assert "".join(delivered) == result.text == "abcde"
    assert (result.status, result.finish_reason) == ("budget", None)
    assert result.tokens.completion_tokens == 5
    assert session.account is not None
    session.account.settle(sent=True)
    assert shared.spent == PROMPT_ESTIMATE + 5  # no usage arrived: the planned prompt count


@READS
def test_a_server_that_ignores_max_tokens_raises_with_on_exhausted_error(one_read: bool) -> None:
    session, _ = _budgeted(CallBudget(completion_tokens=5, on_exhausted="error"))
    events = [ROLE, *(_content(c) for c in "abcdefgh"), _finish(), DONE]

    delivered = _feed(session, events, one_read=one_read)

    error = session.error
    assert isinstance(error, BudgetExceeded)
    assert (error.limit, error.allowed, error.requested) == ("completion_tokens", 5, 5)
    assert error.partial is not None and error.partial.status == "budget"
    assert "".join(delivered) == error.partial.text == "abcde"


@READS
def test_n_choices_that_can_exceed_the_budget_are_cut_at_it(one_read: bool) -> None:
    # max_tokens=4 applies to each of 2 choices: only the client can hold them to 4 together.
    session, _ = _budgeted(CallBudget(completion_tokens=4))
    events: list[object] = [ROLE]
    for a, b in zip("abcd", "wxyz", strict=True):
        events += [_content(a, 0), _content(b, 1)]
    events += [_finish(0), _finish(1), DONE]

    _feed(session, events, one_read=one_read)
    result = _end(session)

    assert result.status == "budget"
    assert [c.text for c in result.choices] == ["ab", "wx"]


@READS
def test_without_max_tokens_the_stream_is_cut_at_the_budget(one_read: bool) -> None:
    plan = CallPlan(
        prompt_tokens=PROMPT_ESTIMATE,
        prompt_source="estimate",
        max_tokens=None,  # sent without max_tokens: nothing stops the server at the budget
        limited_by=None,
        completion_limit=3,
        completion_limited_by="completion_tokens",
    )
    session = StreamSession(started=0.0)
    session.account = CallAccount(plan, None)
    events = [ROLE, *(_content(c) for c in "abcdef"), _finish(), DONE]

    delivered = _feed(session, events, one_read=one_read)

    assert "".join(delivered) == "abc" and session.budget_stopped
    assert _end(session).status == "budget"


# -- the account's two questions, chunk by chunk -------------------------------------------------


def _chunk(data: dict[str, object]) -> ChatCompletionChunk:
    return ChatCompletionChunk.model_validate(data)


def _account(budget: CallBudget, *, max_tokens: int | None = None) -> CallAccount:
    plan = plan_call(
        budget, prompt_tokens=PROMPT_ESTIMATE, prompt_source="estimate", max_tokens=max_tokens
    )
    return CallAccount(plan, None)


def _observe(account: CallAccount, data: dict[str, object]) -> None:
    chunk = _chunk(data)
    account.observe(chunk, output=bool(chunk.choices and chunk.choices[0].delta.content))


def test_plan_names_the_max_tokens_that_keeps_the_server_within_the_budget() -> None:
    plan = plan_call(CallBudget(completion_tokens=100), prompt_tokens=20, prompt_source="server")
    assert (plan.server_limit(), plan.server_limit(choices=2)) == (100, None)
    fits_twice = plan_call(
        CallBudget(completion_tokens=100), prompt_tokens=20, prompt_source="server", max_tokens=50
    )
    assert (fits_twice.server_limit(2), fits_twice.server_limit(3)) == (50, None)
    unbudgeted = plan_call(None, prompt_tokens=20, prompt_source="server", max_tokens=50)
    assert unbudgeted.server_limit() is None


def test_account_at_a_budget_the_server_keeps_refuses_only_more_output() -> None:
    account = _account(CallBudget(completion_tokens=3))
    for text in "abc":
        assert not account.refuses(_chunk(_content(text)))
        _observe(account, _content(text))
    assert account.used == 3 and not account.must_stop
    assert account.refuses(_chunk(_content("d")))
    assert not account.refuses(_chunk(_finish()))
    assert not account.refuses(_chunk(_usage(SERVER_USAGE)))
    assert not account.refuses(_chunk(ROLE))


def test_account_must_stop_at_a_budget_nothing_else_keeps() -> None:
    plan = CallPlan(
        prompt_tokens=PROMPT_ESTIMATE,
        prompt_source="estimate",
        max_tokens=None,
        limited_by=None,
        completion_limit=3,
        completion_limited_by="completion_tokens",
    )
    account = CallAccount(plan, None)
    for text in "ab":
        _observe(account, _content(text))
    assert not account.must_stop
    _observe(account, _content("c"))
    assert account.must_stop


def test_account_holds_each_choice_to_max_tokens_when_the_choices_fit_the_budget() -> None:
    account = _account(CallBudget(completion_tokens=6), max_tokens=3)
    for a, b in zip("abc", "xy", strict=False):
        _observe(account, _content(a, 0))
        _observe(account, _content(b, 1))
    _observe(account, _content("c", 0))
    assert account.used == 5 and not account.must_stop
    assert account.refuses(_chunk(_content("d", 0)))  # choice 0 is past max_tokens
    assert not account.refuses(_chunk(_content("z", 1)))


def test_account_cuts_at_the_budget_once_a_new_choice_shows_the_choices_do_not_fit() -> None:
    account = _account(CallBudget(completion_tokens=3))  # max_tokens=3 for each choice
    for text in "ab":
        _observe(account, _content(text, 0))
    assert not account.must_stop
    _observe(account, _content("x", 1))
    assert account.used == 3 and account.must_stop


def test_a_resumed_call_counts_only_completion_tokens_against_its_budget() -> None:
    account = _account(CallBudget(completion_tokens=5))
    for text in "abc":
        _observe(account, _content(text))
    account.new_request()  # the first request broke; a continuation is sent
    _observe(account, _content("d"))
    assert account.used == 4 and not account.must_stop
    assert not account.refuses(_chunk(_content("e")))
    _observe(account, _content("e"))
    assert account.refuses(_chunk(_content("f")))
    # Each request is charged its own prompt and completion.
    assert account.tokens_to_charge() == (PROMPT_ESTIMATE + 3) + (PROMPT_ESTIMATE + 2)
