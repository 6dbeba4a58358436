"""Retries, the four deadlines, and resuming an answer that broke mid-stream.

Shows: a ``RetryPolicy`` with an ``on_retry`` hook, ``Timeouts(connect, first_token, idle,
total)``, ``RetryPolicy(resume=True)`` continuing a stream after its connection dropped
(every character arrives exactly once), ``result.retries`` / ``result.resumes``, and what the
same failure raises without resume (``StreamInterrupted``) or when a deadline passes
(``FirstTokenTimeout``, ``IdleTimeout``).

Against the built-in emulator, faults are queued so each call meets the failure it is about;
against a real server the calls usually just succeed (0 retries, 0 resumes). Run it:

    python examples/retries_and_resume.py
    LLMSTREAM_BASE_URL=http://localhost:8000/v1 python examples/retries_and_resume.py
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import llmstream
from llmstream.testing import FakeVLLM, Fault

PROMPT = "List the planets of the solar system, in order."
FAKE_ANSWER = "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune."


EVENTS: list[llmstream.RetryEvent] = []


def on_retry(event: llmstream.RetryEvent) -> None:
    """Called before every retry and resume (each is also logged on the llmstream logger).

    It runs in the stream's reader as soon as a failure is seen, which may be before the
    loop has printed the text already received; so this one only records the event.
    """
    EVENTS.append(event)


POLICY = llmstream.RetryPolicy(
    max_retries=3,  # attempts that fail before any text: 1 + 3 at most
    initial_backoff=0.05,  # full-jitter exponential backoff: 0-0.05 s, 0-0.1 s, 0-0.2 s...
    max_backoff=1.0,
    resume=True,  # after text arrived: continue the answer on a new request
    max_resumes=3,
    on_retry=on_retry,
)
TIMEOUTS = llmstream.Timeouts(
    connect=5,  # to open the connection
    first_token=120,  # request sent -> first token (a long prefill on a busy server is slow)
    idle=2,  # between two events mid-answer (keep-alive comments do not count)
    total=300,  # the whole call, retries and their waits included
)


async def stream_and_report(client: llmstream.AsyncClient, title: str, **options: Any) -> None:
    """One call: print the text as it arrives, then how it went."""
    print(f"{title}:")
    EVENTS.clear()
    try:
        async with client.stream(PROMPT, max_tokens=128, **options) as stream:
            async for text in stream:
                print(text, end="", flush=True)
        result = stream.result
        print(f"\n  -> {result.status}, retries={result.retries}, resumes={result.resumes}")
        if result.usage is not None:
            print(f"  -> completion tokens over every request: {result.usage.completion_tokens}")
    except llmstream.StreamInterrupted as exc:  # IdleTimeout and friends are subclasses
        partial = exc.partial
        print(f"\n  -> {type(exc).__name__}: kept {len(partial.text)} chars ({partial.status})")
    for event in EVENTS:
        name = type(event.error).__name__
        print(f"  on_retry: {event.kind}, attempt {event.attempt}, after {name}")


async def main() -> None:
    logging.basicConfig(level=logging.WARNING)  # INFO on "llmstream" logs every retry too
    base_url = os.environ.get("LLMSTREAM_BASE_URL")
    fake = None if base_url else FakeVLLM(FAKE_ANSWER, token_delay=0.01)
    transport = fake.transport() if fake else None

    async with llmstream.AsyncClient(
        base_url, transport=transport, retry=POLICY, timeout=TIMEOUTS
    ) as client:
        # 1. A 503 before any text is retried; the connection then drops after five
        #    events (four tokens): the answer is resumed where it stopped.
        if fake:
            fake.add_fault(Fault.http_status(503))
            fake.add_fault(Fault.disconnect(after_chunks=5))
        await stream_and_report(client, "1. 503, then a dropped connection mid-answer")
        if fake:
            chat = [r for r in fake.requests if r.path.endswith("/chat/completions")]
            body = chat[-1].json or {}
            print(
                f"  resume request: continue_final_message={body['continue_final_message']}, "
                f"add_generation_prompt={body['add_generation_prompt']}, "
                f"max_tokens={body['max_tokens']}"
            )

        # 2. The same drop without resume (per-call retry=): the error keeps the text.
        if fake:
            fake.add_fault(Fault.disconnect(after_chunks=5))
        await stream_and_report(
            client, "2. the same drop, resume off", retry=llmstream.RetryPolicy(max_retries=3)
        )

        # 3. The server stalls mid-answer: the idle deadline cuts it, resume carries on.
        #    A per-call timeout= replaces the client's Timeouts for this call.
        if fake:
            fake.add_fault(Fault.stall(after_chunks=4))
        await stream_and_report(
            client, "3. a stall mid-answer", timeout=llmstream.Timeouts(idle=0.3)
        )

        # 4. No first token in time, and no retries: FirstTokenTimeout.
        if fake:
            fake.add_fault(Fault.stall(after_chunks=0))
        await stream_and_report(
            client,
            "4. no first token, retry=0",
            timeout=llmstream.Timeouts(first_token=0.3),
            retry=0,
        )


if __name__ == "__main__":
    asyncio.run(main())
