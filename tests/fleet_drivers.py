"""Run one fleet scenario through every client: sync, async on asyncio and trio, aiohttp,
the asyncio transport.

Each test takes ``mode`` (and ``anyio_backend``) from :data:`every_client`, opens a client
over a :class:`~llmstream.testing.FakeFleet` with :func:`open_client`, and makes its calls
with :func:`call`, which streams to the end and returns what the consumer saw. The sync
client runs in worker threads, as in a threaded application; the replicas serve real
sockets on 127.0.0.1 either way.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

import llmstream
from llmstream.testing import FakeFleet

from .drivers import AIOHTTP, ASYNCIO, SOCKET_MODES, Outcome, async_client_kwargs

MODEL = "llmstream/fake-model"
TEXT = "The quick brown fox jumps over the lazy dog."
WAIT = 5.0  # bound on every wait for something that must happen

# (mode, anyio backend): the sync client needs an event loop only to run its threads.
_PAIRS = [("sync", "asyncio"), ("async", "asyncio"), ("async", "trio")]
_PAIRS += [(AIOHTTP, "asyncio")] if AIOHTTP in SOCKET_MODES else []
_PAIRS += [(ASYNCIO, "asyncio")]
every_client = pytest.mark.parametrize(
    ("mode", "anyio_backend"), _PAIRS, ids=[f"{m}-{b}" for m, b in _PAIRS]
)
"""Parametrise a test over every client: ``sync``, ``async`` on asyncio and trio, aiohttp,
and the asyncio transport."""

# Quick to notice and quick to forgive, so that a scenario runs in well under a second.
FAST_BREAKER = llmstream.CircuitBreaker(
    failures=2, cooldown=0.2, max_cooldown=0.4, probe_interval=0.05
)
FAST_RETRY = llmstream.RetryPolicy(max_retries=4, initial_backoff=0.01, max_backoff=0.05)


def fleet_config(
    fleet: FakeFleet | Sequence[str],
    *,
    weights: Sequence[float] | None = None,
    keys: Sequence[str | None] | None = None,
    **options: Any,
) -> llmstream.Fleet:
    """A ``Fleet`` of the replicas (or base URLs), with intervals short enough for tests.

    ``weights`` and ``keys`` give each endpoint its weight and API key, in order;
    ``options`` override the ``Fleet`` settings.

    Example::

        fleet_config(replicas, admission=llmstream.Admission(queue_limit=4))
    """
    urls = fleet.base_urls if isinstance(fleet, FakeFleet) else list(fleet)
    endpoints = [
        llmstream.Endpoint(
            url,
            weight=weights[i] if weights is not None else 1.0,
            api_key=keys[i] if keys is not None else None,
        )
        for i, url in enumerate(urls)
    ]
    settings: dict[str, Any] = {
        "model": MODEL,
        "scrape_interval": 0.05,
        "stale_after": 2.0,
        "breaker": FAST_BREAKER,
        **options,
    }
    return llmstream.Fleet(endpoints, **settings)


@dataclass
class TimedOutcome(Outcome):
    """What a consumer saw, and when the first piece reached it.

    ``first_at`` is ``time.perf_counter()`` (the emulator's clock), ``first_wall`` is
    ``time.time()`` (a vLLM server's), both ``None`` when no piece came.
    """

    first_at: float | None = None
    first_wall: float | None = None

    def saw_piece(self, piece: str) -> None:
        if self.first_at is None:
            self.first_at = time.perf_counter()
            self.first_wall = time.time()
        self.pieces.append(piece)


@dataclass
class FleetClient:
    """A sync or async client over a fleet, driven from async test code."""

    mode: str
    client: llmstream.Client | llmstream.AsyncClient

    def endpoint_loads(self) -> list[llmstream.EndpointLoad]:
        return self.client.endpoint_loads()

    def in_flight(self) -> list[int]:
        """This client's requests in flight on each endpoint, in order."""
        return [load.in_flight for load in self.endpoint_loads()]


@contextlib.asynccontextmanager
async def open_client(
    mode: str, fleet: llmstream.Fleet, **kwargs: Any
) -> AsyncIterator[FleetClient]:
    """A client of ``mode`` over ``fleet``, closed at the end.

    Example::

        async with open_client(mode, fleet_config(replicas)) as client:
            outcome = await call(client)
    """
    kwargs.setdefault("retry", FAST_RETRY)
    if mode == "sync":
        sync = llmstream.Client(fleet=fleet, **kwargs)
        try:
            yield FleetClient(mode, sync)
        finally:
            await anyio.to_thread.run_sync(sync.close)
        return
    kwargs.update(async_client_kwargs(mode))
    async with llmstream.AsyncClient(fleet=fleet, **kwargs) as client:
        yield FleetClient(mode, client)


async def call(
    client: FleetClient,
    prompt: str = "Hi",
    *,
    until: threading.Event | None = None,
    into: TimedOutcome | None = None,
    **stream_kwargs: Any,
) -> TimedOutcome:
    """Stream one call to its end; the outcome holds the pieces and the result or error.

    ``until``: after the first piece the consumer stops reading until it is set (the
    stream stays open, in flight on its endpoint), then reads on. ``into``: the outcome
    to fill as the call goes, for a test watching it from another task.
    """
    outcome = into if into is not None else TimedOutcome()
    inner = client.client
    if isinstance(inner, llmstream.AsyncClient):
        try:
            async with inner.stream(prompt, **stream_kwargs) as stream:
                async for piece in stream:
                    outcome.saw_piece(piece)
                    if until is not None and len(outcome.pieces) == 1:
                        await wait_for(until.is_set, WAIT, "the held stream to be released")
            outcome.result = stream.result
        except llmstream.LLMStreamError as exc:
            outcome.error = exc
        return outcome

    def run() -> None:
        try:
            with inner.stream(prompt, **stream_kwargs) as stream:
                for piece in stream:
                    outcome.saw_piece(piece)
                    if until is not None and len(outcome.pieces) == 1:
                        assert until.wait(WAIT), "the held stream was never released"
            outcome.result = stream.result
        except llmstream.LLMStreamError as exc:
            outcome.error = exc

    await anyio.to_thread.run_sync(run)
    return outcome


async def call_many(client: FleetClient, count: int, **stream_kwargs: Any) -> list[TimedOutcome]:
    """``count`` calls, one after the other (each may change what the fleet knows)."""
    return [await call(client, **stream_kwargs) for _ in range(count)]


async def call_together(
    client: FleetClient, count: int, **stream_kwargs: Any
) -> list[TimedOutcome]:
    """``count`` calls at once; their outcomes in the order they were started."""
    outcomes = [TimedOutcome() for _ in range(count)]

    async def one(outcome: TimedOutcome) -> None:
        await call(client, into=outcome, **stream_kwargs)

    async with anyio.create_task_group() as group:
        for outcome in outcomes:
            group.start_soon(one, outcome)
    return outcomes


@contextlib.asynccontextmanager
async def held_open(
    client: FleetClient, count: int, **stream_kwargs: Any
) -> AsyncIterator[list[TimedOutcome]]:
    """``count`` streams opened one after the other, each held after its first piece.

    Inside the block they are all open (in flight on their endpoints); leaving it lets
    them finish, and their outcomes are complete after the block.
    """
    release = threading.Event()
    outcomes: list[TimedOutcome] = []

    async def one(outcome: TimedOutcome) -> None:
        await call(client, until=release, into=outcome, **stream_kwargs)

    async with anyio.create_task_group() as group:
        try:
            for _ in range(count):
                outcome = TimedOutcome()
                outcomes.append(outcome)
                group.start_soon(one, outcome)
                # Opened one by one: each choice sees the streams already open.
                await wait_for(
                    lambda o=outcome: o.first_at is not None or o.error is not None,  # type: ignore[misc]
                    WAIT,
                    f"stream {len(outcomes)} of {count} to open",
                )
            yield outcomes
        finally:
            release.set()


async def wait_for(condition: Callable[[], object], timeout: float = WAIT, what: str = "") -> None:
    """Poll ``condition`` until it is true; fail the test after ``timeout`` seconds.

    Example::

        await wait_for(lambda: fleet[0].chat_requests == 1, 2.0, "the request to arrive")
    """
    with anyio.move_on_after(timeout):
        while not condition():
            await anyio.sleep(0.005)
        return
    raise AssertionError(f"gave up after {timeout} s waiting for {what or condition}")


async def until_loads_show(
    client: FleetClient,
    shown: Callable[[list[llmstream.EndpointLoad]], bool],
    what: str,
    timeout: float = WAIT,
) -> None:
    """Make calls until the client's view of the fleet satisfies ``shown``.

    The watcher reads ``/metrics`` only while calls are made, so each round makes one.
    """
    with anyio.move_on_after(timeout):
        while not shown(client.endpoint_loads()):
            await call(client)
            await anyio.sleep(0.01)
        return
    raise AssertionError(f"gave up after {timeout} s waiting for {what}: {client.endpoint_loads()}")


def answered_by(outcomes: Sequence[Outcome], fleet: FakeFleet) -> list[int]:
    """How many of ``outcomes`` each replica answered (by ``result.endpoint``)."""
    urls = fleet.base_urls
    counts = [0] * len(urls)
    for outcome in outcomes:
        assert outcome.result is not None, f"the call failed: {outcome.error!r}"
        counts[urls.index(outcome.result.endpoint or "")] += 1
    return counts


class SentRequests:
    """A hook recording where each request of the client's calls went (``RequestSent``).

    Example::

        sent = SentRequests()
        async with open_client(mode, fleet, hooks=[sent]) as client: ...
        sent.to(fleet[0].base_url)  # requests sent there, refused ones included
    """

    def __init__(self) -> None:
        self.events: list[llmstream.RequestSent] = []

    def __call__(self, event: object) -> None:
        if isinstance(event, llmstream.RequestSent):
            self.events.append(event)

    def to(self, base_url: str) -> int:
        return sum(1 for event in self.events if event.endpoint == base_url)

    @property
    def hedges(self) -> int:
        return sum(1 for event in self.events if event.hedge)


async def cancelled_call(
    client: FleetClient, prompt: str = "Hi", **stream_kwargs: Any
) -> TimedOutcome:
    """A call its consumer gives up on after the first piece.

    The async consumer is cancelled (its cancel scope), the sync one breaks out of its loop
    and leaves the stream's block: the two ways a call ends early.
    """
    outcome = TimedOutcome()
    inner = client.client
    if isinstance(inner, llmstream.AsyncClient):
        with anyio.CancelScope() as scope:
            async with inner.stream(prompt, **stream_kwargs) as stream:
                async for piece in stream:
                    outcome.saw_piece(piece)
                    scope.cancel()
                    await anyio.sleep(0)  # the cancellation lands here, mid-stream
        assert scope.cancelled_caught, "the stream ended before it was cancelled"
        return outcome

    def run() -> None:
        with inner.stream(prompt, **stream_kwargs) as stream:
            for piece in stream:
                outcome.saw_piece(piece)
                break

    await anyio.to_thread.run_sync(run)
    return outcome
