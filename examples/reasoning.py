"""Reasoning models: show the model's thinking as it streams, apart from its answer.

Shows: ``stream.chunks()`` to read ``delta.reasoning`` (older vLLM: ``reasoning_content``)
as it arrives, and ``result.reasoning`` / ``result.text`` kept apart in the result.
Iterating a stream for text yields the answer only.

A real vLLM server needs a reasoning parser, e.g.
``vllm serve Qwen/Qwen3-8B --reasoning-parser qwen3``. Run it:

    python examples/reasoning.py
    LLMSTREAM_BASE_URL=http://localhost:8000/v1 python examples/reasoning.py
"""

from __future__ import annotations

import asyncio
import os

import llmstream
from llmstream.testing import FakeVLLM

PROMPT = "What is 17 * 23? Answer with the number."


async def main() -> None:
    base_url = os.environ.get("LLMSTREAM_BASE_URL")
    fake = (
        None
        if base_url
        else FakeVLLM(
            "391", reasoning="17 * 23 = 17 * 20 + 17 * 3 = 340 + 51 = 391.", token_delay=0.01
        )
    )  # the built-in emulator
    transport = fake.transport() if fake else None

    async with llmstream.AsyncClient(base_url, transport=transport) as client:
        async with client.stream(PROMPT, max_tokens=1024) as stream:
            section = None
            async for chunk in stream.chunks():
                for choice in chunk.choices:
                    delta = choice.delta
                    thinking = delta.reasoning or delta.reasoning_content
                    if thinking:
                        if section != "thinking":
                            print("--- thinking ---")
                            section = "thinking"
                        print(thinking, end="", flush=True)
                    if delta.content:
                        if section != "answer":
                            print("\n--- answer ---")
                            section = "answer"
                        print(delta.content, end="", flush=True)
    print()

    result = stream.result
    if result.reasoning is None:
        print("(the server sent no reasoning: is it started with --reasoning-parser?)")
    else:
        print(f"reasoning: {len(result.reasoning)} characters; answer: {result.text!r}")
    if result.usage is not None and result.usage.completion_tokens_details is not None:
        print("reasoning tokens:", result.usage.completion_tokens_details.reasoning_tokens)


if __name__ == "__main__":
    asyncio.run(main())
