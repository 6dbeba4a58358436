"""Stream a chat completion with the sync client: ``with`` and ``for``, no event loop.

Shows: ``llmstream.Client``, ``client.models()``, a system message, and ``stream.result``.

Run it against the built-in vLLM emulator, or against a real server:

    python examples/quickstart_sync.py
    LLMSTREAM_BASE_URL=http://localhost:8000/v1 python examples/quickstart_sync.py
"""

from __future__ import annotations

import os

import llmstream
from llmstream.testing import FakeVLLM

MESSAGES = [
    {"role": "system", "content": "You answer in one short paragraph."},
    {"role": "user", "content": "Why do LLM servers stream their answers?"},
]
FAKE_ANSWER = (
    "Streaming shows the first words as soon as the model produces them, instead of after "
    "the whole answer is generated, so people start reading within a fraction of a second."
)


def main() -> None:
    base_url = os.environ.get("LLMSTREAM_BASE_URL")
    fake = None if base_url else FakeVLLM(FAKE_ANSWER, token_delay=0.01)  # the built-in emulator
    transport = fake.transport() if fake else None

    with llmstream.Client(base_url, transport=transport) as client:
        print("models:", ", ".join(client.models()))
        with client.stream(MESSAGES, max_tokens=200, temperature=0.2) as stream:
            for text in stream:
                print(text, end="", flush=True)
    print()

    result = stream.result
    print(f"[{result.status}, finish_reason={result.finish_reason}, {len(result.text)} chars]")


if __name__ == "__main__":
    main()
