"""Token budgets, sans-IO: counting, planning, metering and the shared budget's books."""

from __future__ import annotations

import math
import random
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from types import TracebackType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmstream._budget import CallBudget, CompletionMeter, exhausted_error, plan_call
from llmstream._errors import BudgetExceeded, InvalidRequestError, LLMStreamError, ProtocolError
from llmstream._prompt_count import (
    PromptCount,
    count_prompt_tokens,
    counter_from_text_tokenizer,
    estimate_prompt_tokens,
)
from llmstream._token_budget import Reservation, TokenBudget
from llmstream._tokenize import (
    parse_tokenize_max_model_len,
    parse_tokenize_response,
    tokenize_request_body,
)

USER_HI = [{"role": "user", "content": "Hi"}]


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- CallBudget ---------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["prompt_tokens", "completion_tokens", "total_tokens"])
@pytest.mark.parametrize("value", [0, -1, True, 1.5, "10"])
def test_call_budget_rejects_limits_that_are_not_positive_integers(
    field: str, value: object
) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        CallBudget(**{field: value})  # type: ignore[arg-type]


def test_call_budget_rejects_an_unknown_on_exhausted() -> None:
    with pytest.raises(InvalidRequestError, match="on_exhausted"):
        CallBudget(on_exhausted="warn")  # type: ignore[arg-type]


def test_call_budget_defaults_to_no_limits_and_stop() -> None:
    budget = CallBudget()
    assert (budget.prompt_tokens, budget.completion_tokens, budget.total_tokens) == (
        None,
        None,
        None,
    )
    assert budget.on_exhausted == "stop"


def test_budget_exceeded_is_an_llmstream_error() -> None:
    assert issubclass(BudgetExceeded, LLMStreamError)


# -- counting a prompt --------------------------------------------------------------------------


def test_estimate_is_utf8_bytes_over_three_plus_message_framing_and_reply_priming() -> None:
    # "user" is 4 bytes -> 2 tokens, "Hello there" 11 bytes -> 4; + 4 framing + 3 priming.
    assert estimate_prompt_tokens([{"role": "user", "content": "Hello there"}]) == 13


def test_estimate_counts_every_message() -> None:
    two = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    # system: 2 + 3 + 4; user: 2 + 1 + 4; + 3.
    assert estimate_prompt_tokens(two) == 19


def test_estimate_counts_each_digit_as_a_token() -> None:
    # Qwen and Llama 2 split numbers into single digits.
    assert estimate_prompt_tokens([{"role": "user", "content": "1234567890"}]) == 2 + 10 + 4 + 3


def test_estimate_counts_cjk_by_bytes_not_characters() -> None:
    # Two characters, six UTF-8 bytes: two tokens, where characters / 3 would say one.
    assert estimate_prompt_tokens([{"role": "user", "content": "你好"}]) == 2 + 2 + 4 + 3


def test_estimate_counts_content_parts_and_tool_call_arguments() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "abcdef"}]}]
    # "user" 2, "text" 2, "abcdef" 2.
    assert estimate_prompt_tokens(parts) == 2 + 2 + 2 + 4 + 3
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": '{"a":1}'}}],
    }
    assert estimate_prompt_tokens([call]) > estimate_prompt_tokens([{"role": "assistant"}])


def test_estimate_counts_tool_schemas() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    assert estimate_prompt_tokens(USER_HI, tools=tools) > estimate_prompt_tokens(USER_HI)


def test_estimate_counts_numbers_and_other_values_by_their_text() -> None:
    plain = {"role": "tool", "content": "ok"}
    # 12345 is five digits, 1.5 two digits and a byte; None and booleans count nothing.
    extra = {**plain, "seq": 12345, "score": 1.5, "cached": True, "note": None}
    assert estimate_prompt_tokens([extra]) - estimate_prompt_tokens([plain]) == 5 + 3


def test_estimate_overestimates_plain_english() -> None:
    # About 4 characters a token for English on common vocabularies; the estimate must be above.
    text = "The quick brown fox jumps over the lazy dog. " * 40
    assert estimate_prompt_tokens([{"role": "user", "content": text}]) > len(text) / 4 + 7


def test_counter_from_text_tokenizer_counts_strings_plus_framing() -> None:
    def by_words(text: str) -> list[int]:
        return [0] * len(text.split())

    count = counter_from_text_tokenizer(by_words)
    # "user" 1 + "one two three" 3 + 4 + 3.
    assert count([{"role": "user", "content": "one two three"}]) == 11
    lean = counter_from_text_tokenizer(by_words, tokens_per_message=0, reply_priming=0)
    assert lean([{"role": "user", "content": "one two three"}]) == 4


def test_counter_from_text_tokenizer_rejects_negative_overheads() -> None:
    with pytest.raises(InvalidRequestError, match="reply_priming"):
        counter_from_text_tokenizer(lambda text: [], reply_priming=-1)


def test_count_prompt_tokens_estimates_without_a_counter() -> None:
    assert count_prompt_tokens(USER_HI) == PromptCount(estimate_prompt_tokens(USER_HI), "estimate")


def test_count_prompt_tokens_uses_the_callers_counter() -> None:
    assert count_prompt_tokens(USER_HI, lambda messages: 7) == PromptCount(7, "tokenizer")


@pytest.mark.parametrize("bad", [-1, 2.5, None, "7", True])
def test_count_prompt_tokens_rejects_a_counter_that_returns_no_count(bad: object) -> None:
    with pytest.raises(InvalidRequestError, match="token counter"):
        count_prompt_tokens(USER_HI, lambda messages: bad)  # type: ignore[arg-type,return-value]


def test_tokenize_request_body_matches_the_chat_request() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    body = tokenize_request_body(
        "Qwen/Qwen2.5-0.5B-Instruct", USER_HI, tools=tools, chat_template_kwargs={"x": 1}
    )
    assert body == {
        "model": "Qwen/Qwen2.5-0.5B-Instruct",
        "messages": USER_HI,
        "add_generation_prompt": True,
        "continue_final_message": False,
        "tools": tools,
        "chat_template_kwargs": {"x": 1},
    }


def test_tokenize_request_body_leaves_out_an_unknown_model() -> None:
    assert "model" not in tokenize_request_body(None, USER_HI)


def test_tokenize_request_body_refuses_both_template_flags() -> None:
    with pytest.raises(InvalidRequestError, match="add_generation_prompt=False"):
        tokenize_request_body("m", USER_HI, continue_final_message=True)
    body = tokenize_request_body(
        "m", USER_HI, continue_final_message=True, add_generation_prompt=False
    )
    assert body["continue_final_message"] is True


def test_parse_tokenize_response_reads_vllms_count() -> None:
    body = {"count": 30, "max_model_len": 32768, "tokens": list(range(30))}
    assert parse_tokenize_response(body) == 30
    assert parse_tokenize_max_model_len(body) == 32768


@pytest.mark.parametrize(
    "body",
    [[], {"tokens": [1, 2]}, {"count": "30"}, {"count": -1}, {"count": True}, "<html>502</html>"],
)
def test_parse_tokenize_response_rejects_a_body_without_a_count(body: object) -> None:
    with pytest.raises(ProtocolError, match=r"POST /tokenize .*'count'"):
        parse_tokenize_response(body)


def test_parse_tokenize_max_model_len_is_none_when_absent() -> None:
    assert parse_tokenize_max_model_len({"count": 3}) is None
    assert parse_tokenize_max_model_len("nope") is None


# -- planning a call ----------------------------------------------------------------------------


def test_plan_without_limits_sends_the_callers_max_tokens() -> None:
    plan = plan_call(None, prompt_tokens=10, prompt_source="server", max_tokens=50)
    assert (plan.max_tokens, plan.limited_by, plan.clamped) == (50, "max_tokens", False)
    assert plan.completion_limit is None


def test_plan_without_any_limit_sends_no_max_tokens() -> None:
    plan = plan_call(None, prompt_tokens=10, prompt_source="server")
    assert (plan.max_tokens, plan.limited_by, plan.clamped) == (None, None, False)


@pytest.mark.parametrize(
    ("kwargs", "expected", "limit"),
    [
        ({"budget": CallBudget(completion_tokens=40)}, 40, "completion_tokens"),
        ({"budget": CallBudget(total_tokens=130)}, 30, "total_tokens"),
        ({"shared_allowance": 125}, 25, "shared"),
        ({"max_model_len": 120}, 20, "max_model_len"),
    ],
)
def test_plan_clamps_max_tokens_to_the_smallest_limit(
    kwargs: dict[str, object], expected: int, limit: str
) -> None:
    budget = kwargs.pop("budget", None)
    plan = plan_call(
        budget,  # type: ignore[arg-type]
        prompt_tokens=100,
        prompt_source="server",
        **kwargs,  # type: ignore[arg-type]
    )
    assert (plan.max_tokens, plan.limited_by, plan.clamped) == (expected, limit, True)


def test_plan_takes_the_smallest_of_all_limits() -> None:
    plan = plan_call(
        CallBudget(completion_tokens=500, total_tokens=1_000),
        prompt_tokens=900,
        prompt_source="server",
        shared_allowance=950,
        max_tokens=800,
        max_model_len=4_096,
    )
    assert (plan.max_tokens, plan.limited_by) == (50, "shared")
    assert (plan.completion_limit, plan.completion_limited_by) == (50, "shared")


def test_plan_keeps_a_smaller_explicit_max_tokens_unclamped() -> None:
    plan = plan_call(
        CallBudget(completion_tokens=100), prompt_tokens=10, prompt_source="server", max_tokens=30
    )
    assert (plan.max_tokens, plan.limited_by, plan.clamped) == (30, "max_tokens", False)
    # The client still enforces the budget's own cap while streaming.
    assert (plan.completion_limit, plan.completion_limited_by) == (100, "completion_tokens")


def test_plan_names_the_callers_max_tokens_on_a_tie() -> None:
    plan = plan_call(
        CallBudget(completion_tokens=30), prompt_tokens=10, prompt_source="server", max_tokens=30
    )
    assert (plan.limited_by, plan.clamped) == ("max_tokens", False)


def test_plan_sets_max_tokens_to_the_room_left_when_the_caller_set_none() -> None:
    plan = plan_call(None, prompt_tokens=1_000, prompt_source="server", max_model_len=4_096)
    assert (plan.max_tokens, plan.limited_by) == (3_096, "max_model_len")
    # The context is the server's limit, not a budget: nothing for the client to enforce.
    assert plan.completion_limit is None


def test_plan_carries_the_budgets_on_exhausted() -> None:
    budget = CallBudget(completion_tokens=5, on_exhausted="error")
    assert plan_call(budget, prompt_tokens=1, prompt_source="server").on_exhausted == "error"
    assert plan_call(None, prompt_tokens=1, prompt_source="server").on_exhausted == "stop"


def test_plan_refuses_a_prompt_over_the_prompt_limit_with_the_numbers() -> None:
    with pytest.raises(BudgetExceeded) as info:
        plan_call(CallBudget(prompt_tokens=1_000), prompt_tokens=1_234, prompt_source="server")
    exc = info.value
    assert (exc.limit, exc.allowed, exc.requested, exc.prompt_tokens) == (
        "prompt_tokens",
        1_000,
        1_234,
        1_234,
    )
    assert "1,234 tokens (counted by the server)" in str(exc)
    assert "prompt_tokens limit of 1,000" in str(exc)
    assert "Shorten the prompt" in str(exc)


def test_plan_allows_a_prompt_exactly_at_the_prompt_limit() -> None:
    plan = plan_call(CallBudget(prompt_tokens=100), prompt_tokens=100, prompt_source="server")
    assert plan.prompt_tokens == 100


@pytest.mark.parametrize("prompt", [1_000, 1_200])
def test_plan_refuses_a_prompt_that_leaves_no_room_in_the_total(prompt: int) -> None:
    with pytest.raises(BudgetExceeded) as info:
        plan_call(CallBudget(total_tokens=1_000), prompt_tokens=prompt, prompt_source="tokenizer")
    exc = info.value
    assert (exc.limit, exc.allowed, exc.requested) == ("total_tokens", 1_000, prompt + 1)
    assert f"{prompt:,} tokens (counted by your tokenizer)" in str(exc)
    assert "total_tokens limit of 1,000" in str(exc)


def test_plan_leaves_one_token_when_the_prompt_nearly_fills_the_total() -> None:
    plan = plan_call(CallBudget(total_tokens=1_000), prompt_tokens=999, prompt_source="server")
    assert (plan.max_tokens, plan.limited_by) == (1, "total_tokens")


def test_plan_refuses_a_prompt_that_fills_the_context() -> None:
    with pytest.raises(BudgetExceeded) as info:
        plan_call(None, prompt_tokens=32_768, prompt_source="server", max_model_len=32_768)
    exc = info.value
    assert (exc.limit, exc.allowed, exc.requested) == ("max_model_len", 32_768, 32_769)
    assert "32,768 tokens (counted by the server)" in str(exc)
    assert "context of 32,768 tokens (max_model_len)" in str(exc)


def test_plan_refuses_an_explicit_max_tokens_that_cannot_fit_beside_the_prompt() -> None:
    with pytest.raises(BudgetExceeded) as info:
        plan_call(
            None, prompt_tokens=3_000, prompt_source="server", max_tokens=2_000, max_model_len=4_096
        )
    exc = info.value
    assert (exc.limit, exc.allowed, exc.requested) == ("max_model_len", 4_096, 5_000)
    message = str(exc)
    assert "max_tokens=2,000" in message and "3,000 tokens" in message and "5,000" in message
    assert "at most 1,096" in message
    assert "rejects" not in message


def test_plan_says_the_server_rejects_max_tokens_over_the_context() -> None:
    with pytest.raises(BudgetExceeded, match="server rejects max_tokens > max_model_len"):
        plan_call(
            None, prompt_tokens=10, prompt_source="server", max_tokens=5_000, max_model_len=4_096
        )


def test_plan_refuses_a_shared_allowance_smaller_than_the_prompt() -> None:
    with pytest.raises(BudgetExceeded) as info:
        plan_call(None, prompt_tokens=60, prompt_source="server", shared_allowance=60)
    exc = info.value
    assert (exc.limit, exc.allowed, exc.requested) == ("shared", 60, 61)
    assert "allowed 60 tokens" in str(exc)


def test_plan_reports_a_permanent_refusal_before_the_shared_budget() -> None:
    with pytest.raises(BudgetExceeded) as info:
        plan_call(
            CallBudget(prompt_tokens=10),
            prompt_tokens=50,
            prompt_source="server",
            shared_allowance=0,
        )
    assert info.value.limit == "prompt_tokens"


def test_plan_suggests_exact_counting_only_for_an_estimate() -> None:
    budget = CallBudget(prompt_tokens=5)
    with pytest.raises(BudgetExceeded, match="conservative estimate") as estimated:
        plan_call(budget, prompt_tokens=10, prompt_source="estimate")
    assert "(estimated)" in str(estimated.value)
    with pytest.raises(BudgetExceeded) as counted:
        plan_call(budget, prompt_tokens=10, prompt_source="server")
    assert "estimate" not in str(counted.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prompt_tokens": -1},
        {"prompt_tokens": 1.5},
        {"prompt_source": "guess"},
        {"max_tokens": 0},
        {"max_model_len": 0},
        {"shared_allowance": -5},
    ],
)
def test_plan_rejects_invalid_arguments(kwargs: dict[str, object]) -> None:
    arguments: dict[str, object] = {"prompt_tokens": 10, "prompt_source": "server", **kwargs}
    with pytest.raises(InvalidRequestError):
        plan_call(None, **arguments)  # type: ignore[arg-type]


# -- metering a stream --------------------------------------------------------------------------


def test_meter_counts_one_token_per_output_chunk_without_server_counts() -> None:
    meter = CompletionMeter()
    meter.observe(None, output_chunk=False)  # the role chunk
    for _ in range(3):
        meter.observe(None, output_chunk=True)
    assert (meter.used, meter.source) == (3, "chunks")


def test_meter_takes_the_servers_running_count_including_jumps() -> None:
    meter = CompletionMeter()
    for count in (0, 1, 2, 6, 11):  # merged engine steps jump by several tokens
        meter.observe(count, output_chunk=count > 0)
    assert (meter.used, meter.source) == (11, "server")


def test_meter_lets_a_server_count_replace_the_chunk_estimate() -> None:
    meter = CompletionMeter()
    for _ in range(5):
        meter.observe(None, output_chunk=True)
    meter.observe(3, output_chunk=True)
    assert (meter.used, meter.source) == (3, "server")


def test_meter_adds_chunks_that_arrive_after_the_last_server_count() -> None:
    meter = CompletionMeter()
    meter.observe(4, output_chunk=True)
    meter.observe(None, output_chunk=True)
    assert meter.used == 5
    meter.observe(9, output_chunk=True)
    assert meter.used == 9


def test_meter_sums_the_per_choice_counts_of_n_choices() -> None:
    # vLLM's running count is per choice; the final usage sums them.
    meter = CompletionMeter()
    meter.observe(3, output_chunk=True, choice=0)
    meter.observe(2, output_chunk=True, choice=1)
    meter.observe(4, output_chunk=True, choice=0)
    assert meter.used == 6


def test_meter_final_usage_replaces_the_running_count_and_freezes_it() -> None:
    meter = CompletionMeter()
    for _ in range(7):
        meter.observe(None, output_chunk=True)
    meter.final_usage(prompt_tokens=30, completion_tokens=10)
    meter.observe(None, output_chunk=True)
    assert (meter.used, meter.source, meter.final) == (10, "server", True)
    assert meter.tokens_to_charge(prompt_tokens=8) == 40


def test_meter_charges_the_servers_prompt_count_once_it_is_known() -> None:
    meter = CompletionMeter()
    meter.observe(None, output_chunk=True)
    assert meter.tokens_to_charge(prompt_tokens=8) == 9
    meter.observe(2, output_chunk=True, usage_prompt_tokens=30)
    assert (meter.server_prompt_tokens, meter.tokens_to_charge(prompt_tokens=8)) == (30, 32)


def test_meter_is_exhausted_at_the_limit_and_never_without_one() -> None:
    meter = CompletionMeter()
    meter.observe(9, output_chunk=True)
    assert not meter.exhausted(10)
    assert not meter.exhausted(None)
    meter.observe(12, output_chunk=True)
    assert meter.exhausted(10)


def test_exhausted_error_names_the_limit_and_the_numbers() -> None:
    plan = plan_call(
        CallBudget(total_tokens=120, on_exhausted="error"), prompt_tokens=20, prompt_source="server"
    )
    exc = exhausted_error(plan, 103)
    assert (exc.limit, exc.allowed, exc.requested, exc.partial) == ("total_tokens", 100, 103, None)
    assert "budget of 100 completion tokens (set by total_tokens) after 103" in str(exc)


# -- TokenBudget: books -------------------------------------------------------------------------


def test_reserve_then_charge_keeps_exact_books() -> None:
    budget = TokenBudget(1_000)
    reservation = budget.reserve(300)
    assert (reservation.amount, budget.balance, budget.reserved, budget.spent) == (300, 700, 300, 0)
    reservation.charge(120)
    assert (budget.balance, budget.reserved, budget.spent) == (880, 0, 120)
    assert (reservation.settled, reservation.charged) == (True, 120)


def test_release_gives_the_whole_reservation_back() -> None:
    budget = TokenBudget(1_000)
    reservation = budget.reserve(300)
    reservation.release()
    assert (budget.balance, budget.reserved, budget.spent) == (1_000, 0, 0)
    assert reservation.charged == 0


def test_a_second_charge_raises_and_changes_nothing() -> None:
    budget = TokenBudget(1_000)
    reservation = budget.reserve(300)
    reservation.charge(100)
    with pytest.raises(RuntimeError, match="charged once"):
        reservation.charge(100)
    assert (budget.balance, budget.spent) == (900, 100)


def test_release_after_charge_does_nothing() -> None:
    budget = TokenBudget(1_000)
    reservation = budget.reserve(300)
    reservation.charge(100)
    reservation.release()
    assert (budget.balance, budget.spent, reservation.charged) == (900, 100, 100)


def test_charge_after_release_raises() -> None:
    budget = TokenBudget(1_000)
    reservation = budget.reserve(300)
    reservation.release()
    with pytest.raises(RuntimeError):
        reservation.charge(10)
    assert budget.spent == 0


def test_leaving_a_with_block_releases_an_unsettled_reservation() -> None:
    budget = TokenBudget(1_000)
    with pytest.raises(KeyError), budget.reserve(400):
        raise KeyError("the call failed before sending")
    assert (budget.balance, budget.reserved) == (1_000, 0)
    with budget.reserve(400) as reservation:
        reservation.charge(50)
    assert (budget.balance, budget.spent) == (950, 50)


def test_reserve_with_a_minimum_takes_what_is_available() -> None:
    budget = TokenBudget(1_000)
    budget.reserve(800)
    partial = budget.reserve(500, minimum=100)
    assert (partial.amount, partial.requested, budget.balance) == (200, 500, 0)


def test_reserve_is_all_or_nothing_by_default() -> None:
    budget = TokenBudget(1_000)
    budget.reserve(800)
    with pytest.raises(BudgetExceeded) as info:
        budget.reserve(500)
    exc = info.value
    assert (exc.limit, exc.allowed, exc.requested, exc.retry_after) == ("shared", 200, 500, None)
    assert "200 of 1,000 tokens available (800 reserved" in str(exc)
    assert "does not refill" in str(exc)
    assert budget.reserved == 800


def test_reserve_says_when_a_request_can_never_fit() -> None:
    budget = TokenBudget(1_000, refill_per_window=1_000)
    with pytest.raises(BudgetExceeded, match="more than the budget can ever hold") as info:
        budget.reserve(2_000)
    assert info.value.retry_after is None


def test_reserve_grants_at_most_the_limit_when_the_minimum_fits() -> None:
    budget = TokenBudget(1_000)
    assert budget.reserve(5_000, minimum=10).amount == 1_000


def test_an_overrun_is_charged_in_full_and_leaves_a_debt() -> None:
    budget = TokenBudget(1_000)
    reservation = budget.reserve(1_000)
    reservation.charge(1_004)  # a stream stopped by its budget overran by one chunk
    snap = budget.snapshot()
    assert (snap.spent, snap.balance, snap.reserved, snap.overspent) == (1_004, -4, 0, 4)
    with pytest.raises(BudgetExceeded) as info:
        budget.reserve(1)
    assert info.value.allowed == 0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 10, "refill_per_window": 0}, "refill_per_window"),
        ({"limit": 10, "window": 0}, "window"),
        ({"limit": 10, "window": float("nan")}, "window"),
        ({"limit": 10, "window": float("inf")}, "window"),
    ],
)
def test_token_budget_rejects_invalid_settings(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(InvalidRequestError, match=name):
        TokenBudget(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("window", ["60", True, None])
def test_token_budget_rejects_a_window_that_is_not_a_number(window: object) -> None:
    with pytest.raises(InvalidRequestError, match="window must be a number of seconds"):
        TokenBudget(10, window=window)  # type: ignore[arg-type]


def test_token_budget_reports_its_settings() -> None:
    bucket = TokenBudget(100, refill_per_window=10, window=6)
    assert (bucket.limit, bucket.refill_per_window, bucket.window) == (100, 10, 6.0)
    quota = TokenBudget(5)
    assert (quota.limit, quota.refill_per_window, quota.window) == (5, None, 60.0)


def test_reserve_and_charge_reject_invalid_amounts() -> None:
    budget = TokenBudget(100)
    with pytest.raises(InvalidRequestError, match="amount"):
        budget.reserve(0)
    with pytest.raises(InvalidRequestError, match="minimum"):
        budget.reserve(10, minimum=20)
    with pytest.raises(InvalidRequestError, match="actual"):
        budget.reserve(10).charge(-1)


def test_repr_shows_the_books() -> None:
    budget = TokenBudget(100, refill_per_window=100, window=60.0, clock=FakeClock())
    budget.reserve(10)
    assert repr(budget) == (
        "TokenBudget(limit=100, refill_per_window=100, window=60.0, balance=90,"
        " reserved=10, spent=0)"
    )
    assert repr(budget.reserve(5)) == "Reservation(amount=5, requested=5, open)"


# -- TokenBudget: refill ------------------------------------------------------------------------


def _refilling(
    limit: int = 600, per_window: int = 600, window: float = 60.0
) -> tuple[TokenBudget, FakeClock]:
    clock = FakeClock()
    return TokenBudget(limit, refill_per_window=per_window, window=window, clock=clock), clock


def test_refill_adds_tokens_at_the_windows_rate() -> None:
    budget, clock = _refilling()  # 10 tokens a second
    budget.reserve(600).charge(600)
    clock.advance(15.0)
    assert budget.balance == 150
    assert budget.snapshot().refilled == 150


def test_refill_stops_at_the_limit() -> None:
    budget, clock = _refilling()
    budget.reserve(100).charge(100)
    clock.advance(3_600.0)
    assert (budget.balance, budget.snapshot().refilled) == (600, 100)


def test_refill_does_not_fill_over_tokens_in_flight() -> None:
    budget, clock = _refilling()
    held = budget.reserve(400)
    budget.reserve(200).charge(200)
    clock.advance(3_600.0)
    # The bucket holds at most its limit, counting the 400 still reserved.
    assert (budget.balance, budget.reserved) == (200, 400)
    held.release()
    assert budget.balance == 600


def test_refill_accumulates_fractions_of_a_token() -> None:
    budget, clock = _refilling(limit=20, per_window=20, window=60.0)  # one token every 3 s
    budget.reserve(20).charge(20)
    for _ in range(2):
        clock.advance(1.0)
        assert budget.balance == 0
    clock.advance(1.0)
    assert budget.balance == 1


def test_refill_ignores_a_timestamp_older_than_the_last() -> None:
    budget, clock = _refilling()
    budget.reserve(600).charge(600)
    clock.advance(10.0)
    assert budget.balance == 100
    assert budget.snapshot(now=clock.now - 5.0).balance == 100
    assert budget.balance == 100


def test_refill_repays_an_overrun_first() -> None:
    budget, clock = _refilling()
    budget.reserve(600).charge(610)
    clock.advance(2.0)
    assert budget.balance == 10


def test_seconds_until_available_is_zero_when_available_and_inf_without_refill() -> None:
    assert TokenBudget(100).seconds_until_available(100) == 0.0
    spent = TokenBudget(100)
    spent.reserve(100).charge(100)
    assert spent.seconds_until_available(1) == math.inf


def test_seconds_until_available_is_inf_for_more_than_the_limit() -> None:
    budget, _ = _refilling()
    assert budget.seconds_until_available(601) == math.inf


def test_seconds_until_available_is_the_deficit_over_the_rate() -> None:
    budget, clock = _refilling()  # 10 tokens a second
    budget.reserve(600).charge(600)
    clock.advance(0.25)  # 2.5 tokens: 2 whole, half a token carried
    assert budget.seconds_until_available(100) == pytest.approx(9.75)


def test_reserving_after_the_computed_wait_succeeds() -> None:
    budget, clock = _refilling(limit=1_000, per_window=700, window=60.0)
    budget.reserve(1_000).charge(1_000)
    clock.advance(1.3)
    wait = budget.seconds_until_available(333)
    clock.advance(wait)
    assert budget.reserve(333).amount == 333


def test_a_refusal_carries_the_retry_time() -> None:
    budget, clock = _refilling()
    budget.reserve(600).charge(600)
    with pytest.raises(BudgetExceeded) as info:
        budget.reserve(50)
    exc = info.value
    assert exc.retry_after == pytest.approx(5.0)
    assert "Retry in 5.0 s (it refills 600 tokens every 60 s)" in str(exc)
    clock.advance(exc.retry_after or 0.0)
    assert budget.reserve(50).amount == 50


def test_now_overrides_the_clock() -> None:
    clock = FakeClock(0.0)
    budget = TokenBudget(100, refill_per_window=100, window=10.0, clock=clock)
    budget.reserve(100, now=0.0).charge(100)
    assert budget.reserve(50, now=5.0).amount == 50
    assert budget.seconds_until_available(10, now=5.0) == pytest.approx(1.0)


# -- TokenBudget: concurrency and the invariant -------------------------------------------------


class CheckingLock:
    """Wraps the budget's own lock and checks the protected state just before each release."""

    def __init__(self, lock: AbstractContextManager[object], check: Callable[[], None]) -> None:
        self._lock = lock
        self._check = check

    def __enter__(self) -> CheckingLock:
        self._lock.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._check()
        finally:
            self._lock.__exit__(exc_type, exc, tb)


class SteppingClock:
    """A thread-safe clock that moves one millisecond each time it is read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._now = 0.0

    def __call__(self) -> float:
        with self._lock:
            self._now += 0.001
            return self._now


def _books_hold(budget: TokenBudget, violations: list[str]) -> Callable[[], None]:
    def check() -> None:
        # Runs inside the budget's lock: the private fields are the books at that instant.
        spent, reserved = budget._spent, budget._reserved
        refilled, level = budget._refilled, budget._level
        if spent + reserved > budget.limit + refilled:
            violations.append(f"spent {spent} + reserved {reserved} > {budget.limit} + {refilled}")
        if level + reserved > budget.limit:
            violations.append(f"level {level} + reserved {reserved} > limit {budget.limit}")
        if level != budget.limit + refilled - spent - reserved:
            violations.append("balance does not match the books")

    return check


@pytest.fixture
def frequent_thread_switches() -> Iterator[None]:
    # Switch threads every microsecond rather than every 5 ms, so races show up in a short run.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


@pytest.mark.usefixtures("frequent_thread_switches")
def test_threads_reserving_and_charging_keep_exact_books() -> None:
    threads_count, cycles = 32, 200
    budget = TokenBudget(2_000, refill_per_window=2_000, window=1.0, clock=SteppingClock())
    violations: list[str] = []
    checking = CheckingLock(budget._lock, _books_hold(budget, violations))
    budget._lock = checking  # type: ignore[assignment]
    charged = [0] * threads_count
    refused = [0] * threads_count
    start = threading.Barrier(threads_count)

    def worker(index: int) -> None:
        rng = random.Random(index)
        start.wait()
        for _ in range(cycles):
            try:
                amount = rng.randint(5, 200)
                reservation = budget.reserve(amount, minimum=rng.randint(1, 5))
            except BudgetExceeded:
                refused[index] += 1
                continue
            if rng.random() < 0.1:
                reservation.release()
                continue
            actual = rng.randint(0, reservation.amount)
            reservation.charge(actual)
            charged[index] += actual

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads_count)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()

    snap = budget.snapshot()
    assert violations == []
    assert snap.spent == sum(charged)
    assert (snap.reserved, snap.overspent) == (0, 0)
    assert snap.balance == snap.limit + snap.refilled - snap.spent
    assert 0 < sum(refused) < threads_count * cycles  # both paths ran


_operation = st.one_of(
    st.tuples(st.just("reserve"), st.integers(1, 400), st.integers(1, 400)),
    st.tuples(st.just("charge"), st.integers(0, 50), st.floats(0.0, 1.2)),
    st.tuples(st.just("release"), st.integers(0, 50), st.just(0.0)),
    st.tuples(st.just("wait"), st.integers(0, 30_000), st.just(0.0)),
)


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(1, 1_000),
    refill=st.one_of(st.none(), st.integers(1, 2_000)),
    operations=st.lists(_operation, max_size=60),
)
def test_the_books_balance_after_any_sequence_of_operations(
    limit: int, refill: int | None, operations: list[tuple[str, int, float]]
) -> None:
    clock = FakeClock(0.0)
    budget = TokenBudget(limit, refill_per_window=refill, window=60.0, clock=clock)
    open_reservations: list[Reservation] = []
    total_charged = 0
    for name, number, fraction in operations:
        if name == "reserve":
            amount, minimum = max(number, int(fraction)), min(number, int(fraction))
            try:
                open_reservations.append(budget.reserve(amount, minimum=minimum))
            except BudgetExceeded as exc:
                assert exc.allowed < minimum
        elif name == "wait":
            clock.advance(number / 1_000)
        elif open_reservations:
            reservation = open_reservations.pop(number % len(open_reservations))
            if name == "release":
                reservation.release()
            else:
                # Up to 20% over the reservation: the overrun of a stream stopped mid-chunk.
                actual = int(reservation.amount * fraction)
                reservation.charge(actual)
                total_charged += actual
        snap = budget.snapshot()
        assert snap.spent == total_charged
        assert snap.reserved == sum(r.amount for r in open_reservations)
        assert snap.balance == limit + snap.refilled - snap.spent - snap.reserved
        assert snap.spent + snap.reserved <= limit + snap.refilled + snap.overspent
        assert snap.balance + snap.reserved <= limit
        if snap.overspent == 0:
            assert snap.spent + snap.reserved <= limit + snap.refilled
