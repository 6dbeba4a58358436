"""One call, one stream of text: ``stream_llm_request`` and its sync twin.

Code built around a helper like ``streamLLMRequest(prompt, maxTokens)`` that yields text can
use these directly: each makes a client for the call and closes the connection when the loop
ends, breaks or raises. Errors are the clients' (``APIStatusError``, ``StreamInterrupted``...).

They take a base URL rather than a client, so without a server this example serves the
built-in emulator on a real loopback socket. Run it:

    python examples/one_call_port.py
    LLMSTREAM_BASE_URL=http://localhost:8000/v1 python examples/one_call_port.py
"""

from __future__ import annotations

import asyncio
import os
from contextlib import aclosing

import llmstream
from llmstream.testing import FakeVLLM

PROMPT = "Give three tips for writing clear error messages."
FAKE_ANSWER = "1. Say what happened.\n2. Say why.\n3. Say what to do next."


async def ask_async(base_url: str) -> None:
    print("stream_llm_request:")
    async for text in llmstream.stream_llm_request(PROMPT, 128, base_url=base_url):
        print(text, end="", flush=True)
    print()


def ask_sync(base_url: str) -> None:
    print("stream_llm_request_sync:")
    for text in llmstream.stream_llm_request_sync(PROMPT, 128, base_url=base_url, temperature=0):
        print(text, end="", flush=True)
    print()


async def first_line(base_url: str) -> str:
    """Stop early: aclosing() closes the connection, so the server stops generating."""
    received = ""
    async with aclosing(llmstream.stream_llm_request(PROMPT, 128, base_url=base_url)) as texts:
        async for text in texts:
            received += text
            if "\n" in received.lstrip():
                break
    return received.lstrip().split("\n")[0]


def run(base_url: str) -> None:
    asyncio.run(ask_async(base_url))
    ask_sync(base_url)
    print("first line only:", asyncio.run(first_line(base_url)))


def main() -> None:
    base_url = os.environ.get("LLMSTREAM_BASE_URL")
    if base_url:
        run(base_url)
    else:
        with FakeVLLM(FAKE_ANSWER, token_delay=0.01).serve() as server:  # the built-in emulator
            run(server.base_url)


if __name__ == "__main__":
    main()
