"""Several vLLM replicas behind one client: routing, failover and mid-answer continuation.

For N replicas of one model and no router in front of them. Shows a small ``Fleet`` built on
the public API, one ``llmstream.AsyncClient`` per replica:

- a call goes to the replica with the fewest streams in flight from this process, but a
  conversation stays on one replica (rendezvous hashing on its key) while that replica is
  healthy and not much busier than the others: vLLM's prefix cache lives in each replica;
- a replica that fails before the first token (connection refused, connect timeout, 429,
  5xx) is left out for a cooldown and the call goes to the next one; a request the server
  rejects (400, 404) is not sent to another replica, which would reject it too;
- a replica that breaks mid-answer: the answer continues on another replica, which gets the
  partial answer with vLLM's ``continue_final_message``; every character arrives once.

Against the built-in emulator it starts three replicas on loopback sockets: replica-b is down
(its port is closed) and replica-c drops the connection in the middle of one answer. Against
real servers, list them in ``LLMSTREAM_BASE_URLS`` (comma-separated), or give one in
``LLMSTREAM_BASE_URL``; the same calls run, and usually succeed on their first replica:

    python examples/fleet_routing.py
    LLMSTREAM_BASE_URLS=http://gpu1:8000/v1,http://gpu2:8000/v1 python examples/fleet_routing.py
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import llmstream
from llmstream.testing import FakeVLLM, Fault

COOLDOWN = 30.0  # seconds a replica that failed is left out of the choice
MAX_IMBALANCE = 4  # streams a conversation's replica may have above the least busy one
# Fail fast: another replica is the retry, and a replica that does not accept in 2 s is down.
TIMEOUTS = llmstream.Timeouts(connect=2, first_token=120, idle=30)
# Statuses that say the replica is unwell or overloaded; any other status is the request's fault.
FAILOVER_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
logger = logging.getLogger(__name__)


@dataclass
class Replica:
    """One server: its client, and what this process knows of its load and health."""

    name: str
    client: llmstream.AsyncClient
    in_flight: int = 0  # streams open on it now
    started: int = 0  # streams ever started on it
    down_until: float = 0.0  # time.monotonic() before which it is left out

    @property
    def healthy(self) -> bool:
        """Not in a cooldown after a failure."""
        return time.monotonic() >= self.down_until


def replica_failed(error: llmstream.LLMStreamError) -> bool:
    """Whether ``error`` is the replica's failure, so that another replica may succeed.

    Not failed over: a request the server rejected (every replica would reject it), the
    caller's own limits (``StreamAborted``, ``TotalTimeout``), and ``ProtocolError`` (not
    an OpenAI-compatible server: a configuration error to fix, not to route around).
    """
    if isinstance(error, llmstream.APIStatusError):
        return error.status_code in FAILOVER_STATUSES
    if isinstance(error, llmstream.ServerStreamError):  # vLLM's error event inside a 200
        return error.error_code not in (400, 401, 403, 404, 422)
    if isinstance(error, llmstream.TotalTimeout):
        return False
    return isinstance(error, llmstream.APIConnectionError | llmstream.StreamInterrupted)


def rendezvous_score(key: str, replica: str) -> int:
    """The key's score on a replica: the highest score wins.

    Every process ranks the replicas alike for a key, and when a replica leaves, only the
    keys it held move (each to its own second choice).
    """
    digest = hashlib.sha256(f"{key}/{replica}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


class Fleet:
    """Replicas of one model: picks one per call, fails over, continues broken answers.

    ``urls`` maps replica names to base URLs; ``client_options`` go to every
    ``llmstream.AsyncClient`` (``model``, ``api_key``...). ``on_event`` is told of each
    routing decision and failure (default: the log at INFO).
    """

    def __init__(
        self,
        urls: Mapping[str, str],
        *,
        on_event: Callable[[str], object] = logger.info,
        **client_options: Any,
    ) -> None:
        # retry=0: a failure goes to another replica at once instead of waiting for this one.
        self.replicas = [
            Replica(name, llmstream.AsyncClient(url, retry=0, timeout=TIMEOUTS, **client_options))
            for name, url in urls.items()
        ]
        self.on_event = on_event

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for replica in self.replicas:
            await replica.client.aclose()

    def choose(self, key: str | None, tried: set[str]) -> Replica:
        """The replica for a call's next request; ``tried``: replicas this call already used.

        With a ``key`` (a conversation, or a shared system prompt), its preferred healthy
        replica, unless that one has ``MAX_IMBALANCE`` more streams than the least busy;
        without, the least busy (ties: the one that started fewest, so an idle fleet takes
        turns). When every replica left is down, they are tried anyway.
        """
        untried = [r for r in self.replicas if r.name not in tried]
        candidates = [r for r in untried if r.healthy] or untried
        least = min(r.in_flight for r in candidates)
        if key is not None:
            ranked = sorted(candidates, key=lambda r: rendezvous_score(key, r.name), reverse=True)
            return next(r for r in ranked if r.in_flight <= least + MAX_IMBALANCE)
        return min(candidates, key=lambda r: (r.in_flight, r.started))

    async def stream(
        self,
        messages: Sequence[llmstream.Message],
        *,
        key: str | None = None,
        max_tokens: int | None = None,
        **params: Any,
    ) -> AsyncGenerator[str, None]:
        """Yield the answer's text; use it with ``contextlib.aclosing``.

        Each replica is tried at most once per call. Before the first character a failure
        starts the request over on another replica; after it, the next replica continues
        the answer from its last character. ``params`` go to ``client.stream()``; keep to
        one choice of plain text (no ``n``, no tools) for continuations.
        """
        text = ""  # what the caller has received, from every replica
        used = 0  # completion tokens spent on that text
        tried: set[str] = set()
        while True:
            replica = self.choose(key, tried)
            tried.add(replica.name)
            request, extra = list(messages), dict(params)
            if text:
                # vLLM carries on from the last character of the final assistant message.
                request.append({"role": "assistant", "content": text})
                extra.update(continue_final_message=True, add_generation_prompt=False)
                self.on_event(f"continuing after {len(text)} chars on {replica.name}")
            else:
                self.on_event(f"{key or 'call'} -> {replica.name} ({replica.in_flight} in flight)")
            left = None if max_tokens is None else max_tokens - used
            before = len(text)
            replica.in_flight += 1
            replica.started += 1
            try:
                async with replica.client.stream(request, max_tokens=left, **extra) as stream:
                    async for piece in stream:
                        text += piece
                        yield piece
                return
            except llmstream.LLMStreamError as exc:
                if not replica_failed(exc):
                    raise
                replica.down_until = time.monotonic() + COOLDOWN
                what = f"broke after {len(text) - before} chars" if len(text) > before else "failed"
                name = type(exc).__name__
                self.on_event(f"{replica.name} {what} ({name}); down for {COOLDOWN:g} s")
                if text and exc.partial is not None:
                    used += exc.partial.metrics.completion_tokens
                out_of_tokens = max_tokens is not None and used >= max_tokens
                if out_of_tokens or len(tried) == len(self.replicas):
                    raise  # no tokens left to continue with, or no replica left to try
            finally:
                replica.in_flight -= 1


# -- the demo ---------------------------------------------------------------------------------

QUESTION = "List the planets of the solar system, in order."
ANSWER = "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune."


async def ask(
    fleet: Fleet, messages: Sequence[llmstream.Message], key: str | None, **params: Any
) -> str:
    """One call through the fleet; returns the whole answer."""
    params.setdefault("max_tokens", 128)
    async with contextlib.aclosing(fleet.stream(messages, key=key, **params)) as pieces:
        return "".join([piece async for piece in pieces])


async def demo(fleet: Fleet, fakes: Mapping[str, FakeVLLM]) -> None:
    """Each behaviour in turn; with the emulator, faults are queued for the call about them."""
    question: list[llmstream.Message] = [{"role": "user", "content": QUESTION}]
    print("1. a replica that is down: failover before the first token")
    print(f"  answer: {await ask(fleet, question, key='dave')}")

    print("2. one conversation, two turns: prefix affinity")
    answer = await ask(fleet, question, key="carol")
    print(f"  turn 1: {answer}")
    chat: list[llmstream.Message] = [
        *question,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Why?"},
    ]
    print(f"  turn 2: {await ask(fleet, chat, key='carol')}")

    print("3. four one-off questions at once: fewest streams in flight")
    questions: list[list[llmstream.Message]] = [
        [{"role": "user", "content": f"Question {i}"}] for i in range(4)
    ]
    answers = await asyncio.gather(*(ask(fleet, q, key=None) for q in questions))
    print(f"  {len(answers)} answers")

    print("4. a replica that breaks mid-answer: continued on another one")
    if fakes:
        fakes["replica-c"].add_fault(Fault.disconnect(after_chunks=5))  # after four tokens
    answer = await ask(fleet, question, key="alice")
    print(f"  answer: {answer}")
    if fakes:
        print(f"  the whole answer, every character once: {answer == ANSWER}")

    print("5. a request every replica would reject (an unknown model): no failover")
    try:
        await ask(fleet, question, key="bob", model="no-such-model")
    except llmstream.APIStatusError as exc:
        print(f"  {type(exc).__name__} ({exc.status_code}), raised to the caller")


async def main() -> None:
    listed = os.environ.get("LLMSTREAM_BASE_URLS") or os.environ.get("LLMSTREAM_BASE_URL")
    with contextlib.ExitStack() as stack:
        if listed:
            urls = {url: url for url in (u.strip() for u in listed.split(",")) if url}
            fakes: dict[str, FakeVLLM] = {}
        else:  # three emulated replicas on loopback; replica-b stops, so its port refuses
            fakes = {f"replica-{x}": FakeVLLM(ANSWER, token_delay=0.002) for x in "abc"}
            servers = {name: stack.enter_context(fake.serve()) for name, fake in fakes.items()}
            servers["replica-b"].stop()
            urls = {name: server.base_url for name, server in servers.items()}
        async with Fleet(urls, on_event=lambda event: print(f"  fleet: {event}")) as fleet:
            await demo(fleet, fakes)


if __name__ == "__main__":
    asyncio.run(main())
