"""Typed chunks and several choices: ``n=2`` read with ``stream.chunks()``.

Shows: ``ChatCompletionChunk`` objects as they arrive (choices interleaved, each with its
``index``; the last chunk carries ``usage`` and no choices), then ``result.choices``.
Iterating the stream for text would yield choice 0 only.

Run it against the built-in vLLM emulator, or against a real server:

    python examples/typed_chunks.py
    LLMSTREAM_BASE_URL=http://localhost:8000/v1 python examples/typed_chunks.py
"""

from __future__ import annotations

import asyncio
import os

import llmstream
from llmstream.testing import FakeVLLM

PROMPT = "Suggest a name for a small tabby cat. One word."


async def main() -> None:
    base_url = os.environ.get("LLMSTREAM_BASE_URL")
    fake = None if base_url else FakeVLLM("Biscuit", token_delay=0.01)  # the built-in emulator
    transport = fake.transport() if fake else None

    async with llmstream.AsyncClient(base_url, transport=transport) as client:
        async with client.stream(PROMPT, n=2, temperature=1.0, max_tokens=16) as stream:
            async for chunk in stream.chunks():
                for choice in chunk.choices:
                    delta = choice.delta
                    print(
                        f"chunk: choice {choice.index}"
                        f" role={delta.role!r} content={delta.content!r}"
                        f" finish_reason={choice.finish_reason!r}"
                    )
                if chunk.usage is not None:
                    print(f"chunk: usage {chunk.usage.completion_tokens} completion tokens")

    for answer in stream.result.choices:
        print(f"choice {answer.index}: {answer.text.strip()!r} ({answer.finish_reason})")


if __name__ == "__main__":
    asyncio.run(main())
