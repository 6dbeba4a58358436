"""What a failed stream tells you: the error's type, and ``exc.partial``, the answer so far.

Shows: catching ``ServerStreamError`` (an error event inside a 200 stream),
``StreamInterrupted`` (the connection broke, or the body ended early) and
``APIStatusError`` (a non-2xx answer), and using ``exc.partial`` (a ``StreamResult``).

Against the built-in emulator, faults are queued so the first three requests fail in
different ways and the fourth succeeds; against a real server they will usually all succeed.
Run it:

    python examples/errors_and_partials.py
    LLMSTREAM_BASE_URL=http://localhost:8000/v1 python examples/errors_and_partials.py
"""

from __future__ import annotations

import asyncio
import os

import llmstream
from llmstream.testing import FakeVLLM, Fault

PROMPT = "List the planets of the solar system, in order."
FAKE_ANSWER = "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune."


async def ask(client: llmstream.AsyncClient, prompt: str) -> str:
    """Stream an answer; on failure, say what happened and return what arrived."""
    try:
        async with client.stream(prompt, max_tokens=128) as stream:
            async for text in stream:
                print(text, end="", flush=True)
        print()
        return stream.result.text
    except llmstream.ServerStreamError as exc:
        # Subclass of StreamInterrupted: catch it first to tell the two apart.
        print(f"\n  server error mid-stream: code {exc.error_code} ({exc.error_type})")
        partial = exc.partial
    except llmstream.StreamInterrupted as exc:
        print("\n  stream cut off:", exc.message.split(".")[0])
        partial = exc.partial
    except llmstream.APIStatusError as exc:
        # Nothing was streamed: exc.partial is None.
        retry_after = exc.headers.get("retry-after")
        print(f"  HTTP {exc.status_code}, retry after {retry_after} s: {exc.message}")
        return ""
    print(f"  partial: status={partial.status!r}, {len(partial.text)} chars: {partial.text!r}")
    return partial.text


async def main() -> None:
    base_url = os.environ.get("LLMSTREAM_BASE_URL")
    fake = None if base_url else FakeVLLM(FAKE_ANSWER, token_delay=0.01)  # the built-in emulator
    if fake:
        fake.add_fault(Fault.inband_error(after_chunks=4, code=503, message="engine paused"))
        fake.add_fault(Fault.disconnect(after_chunks=6))
        fake.add_fault(Fault.http_status(503, retry_after=2))
    transport = fake.transport() if fake else None

    # retry=0 so each failure shows here; by default the client retries failures that
    # happen before any text (and, with RetryPolicy(resume=True), resumes broken streams).
    async with llmstream.AsyncClient(base_url, transport=transport, retry=0) as client:
        for attempt in range(1, 5):
            print(f"attempt {attempt}:")
            await ask(client, PROMPT)


if __name__ == "__main__":
    asyncio.run(main())
