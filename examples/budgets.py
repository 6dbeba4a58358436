"""Token budgets: what one call, and several calls together, may spend.

Shows: a ``CallBudget`` refusing a prompt before anything is sent, ``max_tokens`` clamped
to what the budget leaves, a stream the client stops at its budget (``status == "budget"``),
a ``TokenBudget`` shared by concurrent calls, and ``result.tokens`` (each count, and where
it came from).

Run it against the built-in vLLM emulator, or against a real vLLM server:

    python examples/budgets.py
    LLMSTREAM_BASE_URL=http://localhost:8000/v1 python examples/budgets.py
"""

from __future__ import annotations

import asyncio
import os

import llmstream
from llmstream.testing import FakeVLLM

FAKE_ANSWER = (
    "PagedAttention stores the KV cache in fixed-size blocks, like pages of virtual memory, "
    "so a sequence's cache need not be contiguous. Blocks are allocated as the sequence "
    "grows and freed as soon as it ends, which leaves almost no memory wasted and lets the "
    "server batch many more requests at once."
)
QUESTION = "How does PagedAttention manage the KV cache?"


def describe(tokens: llmstream.TokenReport) -> str:
    return (
        f"prompt {tokens.prompt_tokens} ({tokens.prompt_source}) + completion"
        f" {tokens.completion_tokens} ({tokens.completion_source}) = {tokens.total_tokens}"
    )


async def refused_before_sending(client: llmstream.AsyncClient) -> None:
    print("1. a prompt over its budget:")
    long_prompt = "Summarise this: " + "lorem ipsum dolor sit amet " * 40
    try:
        async with client.stream(long_prompt, budget=llmstream.CallBudget(prompt_tokens=200)):
            pass
    except llmstream.BudgetExceeded as exc:
        print(f"  refused before sending: limit={exc.limit}, allowed={exc.allowed},")
        print(f"  requested={exc.requested} (estimated; nothing was sent)")


async def clamped(client: llmstream.AsyncClient) -> None:
    print("2. max_tokens clamped to what the budget leaves:")
    budget = llmstream.CallBudget(total_tokens=40)
    # count_prompt="server" counts the prompt with vLLM's POST /tokenize: exact.
    async with client.stream(QUESTION, max_tokens=500, budget=budget, count_prompt="server") as s:
        async for text in s:
            print(text, end="", flush=True)
    print()
    result = s.result
    print(f"  asked for max_tokens=500, sent max_tokens={s.request_body['max_tokens']}")
    print(f"  status={result.status}, finish_reason={result.finish_reason}")
    print(f"  tokens: {describe(result.tokens)} (budget 40)")


async def stopped_by_the_budget(client: llmstream.AsyncClient) -> None:
    print("3. a stream stopped at its budget:")
    # max_tokens applies to each of the n choices; the budget to all of them together, so
    # the server would go on past it: the client stops the stream and closes the connection.
    budget = llmstream.CallBudget(completion_tokens=12)
    async with client.stream(QUESTION, n=2, budget=budget) as s:
        async for text in s:
            print(text, end="", flush=True)
    print()
    result = s.result
    sent = s.request_body["max_tokens"]
    print(f"  status={result.status}, complete={result.complete}, max_tokens={sent} per choice")
    print(f"  tokens: {describe(result.tokens)}")

    strict = llmstream.CallBudget(completion_tokens=12, on_exhausted="error")
    try:
        async with client.stream(QUESTION, n=2, budget=strict) as s:
            async for _ in s:
                pass
    except llmstream.BudgetExceeded as exc:
        assert exc.partial is not None
        print(f"  on_exhausted='error': BudgetExceeded after {exc.requested} tokens,")
        print(f"  partial: status={exc.partial.status}, text={exc.partial.text!r}")


async def shared_budget(client: llmstream.AsyncClient) -> None:
    print("4. one TokenBudget shared by four concurrent calls:")
    shared = llmstream.TokenBudget(250)
    outcomes: list[tuple[int, str]] = []
    totals: list[int] = []

    async def one(i: int) -> None:
        try:
            prompt = f"Question {i}: {QUESTION}"
            async with client.stream(prompt, max_tokens=60, token_budget=shared) as s:
                async for _ in s:
                    pass
        except llmstream.BudgetExceeded as exc:
            outcomes.append((0, f"refused: {exc.limit} budget had {exc.allowed} tokens left"))
            return
        sent = s.request_body["max_tokens"]
        assert isinstance(sent, int) and s.result.tokens.total_tokens is not None
        totals.append(s.result.tokens.total_tokens)
        note = "" if sent == 60 else " (clamped to what the budget had left)"
        outcomes.append((sent, f"ran: max_tokens={sent}{note}, {s.result.finish_reason}"))

    await asyncio.gather(*(one(i) for i in range(4)))
    for _, line in sorted(outcomes, reverse=True):
        print("  " + line)
    print(f"  charged {shared.spent} = the calls' result.tokens.total_tokens, {sum(totals)}")
    print(f"  {shared!r}")


async def main() -> None:
    base_url = os.environ.get("LLMSTREAM_BASE_URL")
    fake = None if base_url else FakeVLLM(FAKE_ANSWER, token_delay=0.005)  # the emulator
    transport = fake.transport() if fake else None
    async with llmstream.AsyncClient(base_url, transport=transport) as client:
        await refused_before_sending(client)
        await clamped(client)
        await stopped_by_the_budget(client)
        await shared_budget(client)


if __name__ == "__main__":
    asyncio.run(main())
