"""Stream a chat completion with the async client, then print what the result holds.

Shows: ``llmstream.AsyncClient``, ``client.stream()`` with ``async with`` and ``async for``,
and ``stream.result`` (text, finish reason, usage and timing metrics).

Run it against the built-in vLLM emulator, or against a real server:

    python examples/quickstart_async.py
    LLMSTREAM_BASE_URL=http://localhost:8000/v1 python examples/quickstart_async.py
"""

from __future__ import annotations

import asyncio
import os

import llmstream
from llmstream.testing import FakeVLLM

PROMPT = "Explain PagedAttention in one sentence."
FAKE_ANSWER = (
    "PagedAttention stores the KV cache in fixed-size blocks, like pages of virtual memory, "
    "so many requests can share GPU memory without fragmenting it."
)


async def main() -> None:
    base_url = os.environ.get("LLMSTREAM_BASE_URL")
    fake = None if base_url else FakeVLLM(FAKE_ANSWER, token_delay=0.01)  # the built-in emulator
    transport = fake.transport() if fake else None

    async with llmstream.AsyncClient(base_url, transport=transport) as client:
        async with client.stream(PROMPT, max_tokens=128) as stream:
            async for text in stream:
                print(text, end="", flush=True)
    print()

    result = stream.result
    metrics = result.metrics
    print(f"model:          {result.model}")
    print(f"finish reason:  {result.finish_reason}")
    if result.usage is not None:
        print(
            f"tokens:         {result.usage.prompt_tokens} in, {result.usage.completion_tokens} out"
        )
    if metrics.time_to_first_token is not None:
        print(f"first token:    {metrics.time_to_first_token * 1000:.1f} ms")
    if metrics.inter_token_latency is not None:
        itl = metrics.inter_token_latency
        print(f"between tokens: p50 {itl.p50 * 1000:.1f} ms, p99 {itl.p99 * 1000:.1f} ms")
    if metrics.tokens_per_second is not None:
        print(f"decode speed:   {metrics.tokens_per_second:.1f} tokens/s")


if __name__ == "__main__":
    asyncio.run(main())
