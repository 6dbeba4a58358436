"""Token budgets enforced by the client: per call, shared, and checked before sending."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import httpx
import pytest

import llmstream
from llmstream.testing import FakeVLLM

from .conftest import DATA
from .drivers import MODES, SOCKET_MODES, collect

pytestmark = pytest.mark.anyio

ANSWER = " ".join(f"word{i}" for i in range(60))


def _chats(fake: FakeVLLM) -> list[dict[str, Any]]:
    return [r.json for r in fake.requests if r.path.endswith("/chat/completions") and r.json]


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_prompt_over_budget_fails_without_a_request(mode: str) -> None:
    fake = FakeVLLM(ANSWER)
    budget = llmstream.CallBudget(prompt_tokens=10)
    outcome = await collect(mode, transport=fake.transport(), prompt="long " * 50, budget=budget)
    error = outcome.error
    assert isinstance(error, llmstream.BudgetExceeded)
    assert error.limit == "prompt_tokens" and error.allowed == 10 and error.requested > 10
    assert "prompt" in str(error) and "10" in str(error)
    assert _chats(fake) == []


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_max_tokens_is_clamped_to_what_the_budget_leaves(mode: str) -> None:
    fake = FakeVLLM(ANSWER)
    budget = llmstream.CallBudget(total_tokens=40)
    outcome = await collect(
        mode,
        transport=fake.transport(),
        budget=budget,
        count_prompt="server",
        max_tokens=500,
    )
    assert outcome.error is None
    sent = _chats(fake)[0]
    prompt = outcome.final.tokens.prompt_tokens
    assert prompt is not None and sent["max_tokens"] == 40 - prompt
    assert outcome.final.finish_reason == "length"
    assert outcome.final.usage is not None and outcome.final.usage.total_tokens <= 40


def _endless_sse() -> httpx.MockTransport:
    """A server that ignores max_tokens: the budget must be enforced by the client."""
    body = (DATA / "vllm" / "basic.sse").read_bytes()
    closed: list[bool] = []

    class Body(httpx.ByteStream):
        def close(self) -> None:
            closed.append(True)

        async def aclose(self) -> None:
            closed.append(True)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Body(body))

    transport = httpx.MockTransport(handler)
    transport.closed = closed  # type: ignore[attr-defined]
    return transport


@pytest.mark.parametrize("mode", MODES)
async def test_completion_budget_stops_the_stream_with_a_budget_state(mode: str) -> None:
    transport = _endless_sse()
    budget = llmstream.CallBudget(completion_tokens=5)
    outcome = await collect(
        mode,
        transport=transport,
        client_kwargs={"model": "m", "include_usage": False},
        budget=budget,
    )
    assert outcome.error is None
    result = outcome.final
    assert result.status == "budget" and not result.complete
    assert len(outcome.pieces) == 5  # one token per chunk: stopped right at the budget
    assert result.tokens.completion_tokens == 5
    assert transport.closed  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", MODES)
async def test_budget_can_raise_instead(mode: str) -> None:
    budget = llmstream.CallBudget(completion_tokens=5, on_exhausted="error")
    outcome = await collect(
        mode, transport=_endless_sse(), client_kwargs={"model": "m"}, budget=budget
    )
    error = outcome.error
    assert isinstance(error, llmstream.BudgetExceeded)
    assert error.partial is not None and error.partial.status == "budget"
    assert error.partial.text == outcome.text and len(outcome.pieces) == 5


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_context_length_known_from_models_fails_before_sending(mode: str) -> None:
    fake = FakeVLLM(ANSWER, max_model_len=64)
    outcome = await collect(
        mode,
        transport=fake.transport(),
        prompt="word " * 40,
        count_prompt="server",
        max_tokens=40,
    )
    error = outcome.error
    assert isinstance(error, llmstream.BudgetExceeded)
    assert error.limit == "max_model_len" and "64" in str(error)
    assert _chats(fake) == []


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_prompt_counted_by_a_tokenizer(mode: str) -> None:
    fake = FakeVLLM("ok")
    calls: list[int] = []

    def counter(messages: list[Any]) -> int:
        calls.append(len(messages))
        return 7

    outcome = await collect(
        mode,
        transport=fake.transport(),
        count_prompt=counter,
        budget=llmstream.CallBudget(total_tokens=1000),
        client_kwargs={"include_usage": False},
    )
    assert calls == [1]
    report = outcome.final.tokens
    assert (report.prompt_tokens, report.prompt_source) == (7, "tokenizer")


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_result_reports_where_each_count_came_from(mode: str) -> None:
    outcome = await collect(mode, transport=FakeVLLM("a b c").transport())
    report = outcome.final.tokens
    assert report.prompt_source == "server" and report.completion_source == "server"
    usage = outcome.final.usage
    assert usage is not None
    assert (report.prompt_tokens, report.completion_tokens, report.total_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
    )


@pytest.mark.usefixtures("async_http_backend")
async def test_shared_budget_books_match_server_usage_over_200_concurrent_calls() -> None:
    fake = FakeVLLM(None, token_delay=0.001)  # echoes each prompt
    shared = llmstream.TokenBudget(1_000_000)
    usages: list[int] = []
    with fake.serve() as server:
        async with llmstream.AsyncClient(server.base_url, token_budget=shared) as client:

            async def one(i: int) -> None:
                prompt = " ".join(f"w{i}" for _ in range(1 + i % 7))
                async with client.stream(prompt, max_tokens=20) as stream:
                    async for _ in stream:
                        pass
                assert stream.result.usage is not None
                usages.append(stream.result.usage.total_tokens)

            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(one, i)
    assert len(usages) == 200
    assert shared.reserved == 0
    assert shared.spent == sum(usages)  # exactly what the server reported
    assert shared.balance == 1_000_000 - sum(usages)


@pytest.mark.usefixtures("async_http_backend")
async def test_shared_budget_stops_each_call_at_its_allowance_with_at_most_one_chunk_over() -> None:
    fake = FakeVLLM(ANSWER)
    shared = llmstream.TokenBudget(2_000)
    results: list[llmstream.StreamResult] = []
    with fake.serve() as server:
        async with llmstream.AsyncClient(server.base_url, token_budget=shared) as client:

            async def one() -> None:
                try:
                    async with client.stream("Hi") as stream:
                        async for _ in stream:
                            pass
                    results.append(stream.result)
                except llmstream.BudgetExceeded:
                    pass  # the budget was empty for this call

            async with anyio.create_task_group() as tg:
                for _ in range(60):
                    tg.start_soon(one)
    assert shared.reserved == 0
    assert shared.spent <= 2_000 + len(results)  # at most one chunk over per call
    assert sum(r.tokens.total_tokens or 0 for r in results) == shared.spent


def test_shared_budget_rejects_at_once_or_waits_for_refill() -> None:
    fake = FakeVLLM("a b")
    shared = llmstream.TokenBudget(30, refill_per_window=30, window=0.2)
    with llmstream.Client(
        "http://f.test/v1", transport=fake.transport(), token_budget=shared
    ) as client:
        with client.stream("Hi", max_tokens=5) as stream:
            list(stream)
        spent_first = shared.spent
        assert spent_first > 0
        big = "Hi " * 20  # fits the budget's limit, not what is left of it now
        requests = len(_chats(fake))
        with pytest.raises(llmstream.BudgetExceeded) as info:
            with client.stream(big, max_tokens=5) as stream:
                list(stream)
        assert info.value.retry_after is not None and info.value.retry_after > 0
        assert len(_chats(fake)) == requests  # rejected before sending
        started = time.monotonic()
        with client.stream(big, max_tokens=5, budget_wait=True) as stream:
            # What refilled is all it may use: max_tokens is clamped to that.
            assert "a b".startswith("".join(stream))
        assert stream.result.complete
        assert time.monotonic() - started >= info.value.retry_after * 0.5


def test_budget_settings_are_checked() -> None:
    with pytest.raises(llmstream.InvalidRequestError):
        llmstream.CallBudget(total_tokens=0)
    with pytest.raises(llmstream.InvalidRequestError):
        llmstream.TokenBudget(0)


def test_budget_exceeded_is_an_llmstream_error() -> None:
    assert issubclass(llmstream.BudgetExceeded, llmstream.LLMStreamError)
    assert json.dumps({"ok": True})
