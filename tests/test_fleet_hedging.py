"""Hedged first tokens over a fleet, on every client: who answers, what the loser costs.

The slow replica is made the first choice (``Routing(choices=1)`` samples one endpoint by
weight, and it weighs a thousand times more), so the hedge goes to the fast one.
"""

from __future__ import annotations

import os
import time

import anyio
import httpx
import pytest

import llmstream
from llmstream._routing import rendezvous
from llmstream.testing import FakeFleet, FakeVLLM

from .fleet_drivers import (
    MODEL,
    TEXT,
    SentRequests,
    TimedOutcome,
    call,
    call_many,
    call_together,
    every_client,
    fleet_config,
    open_client,
    wait_for,
)

pytestmark = [pytest.mark.anyio, every_client]

PEER = os.environ.get("LLMSTREAM_PEER_VLLM_URL")
PEER_MODEL = "Qwen/Qwen3-0.6B"  # the scripted engine's model (see the peer's README)
SLOW_FIRST = llmstream.Routing(choices=1)
SLOW_WEIGHTS = [1000.0, 0.001]
CUT_WITHIN = 0.1  # seconds between the winner's first token and the loser's connection closed


def _hedged(
    fleet: FakeFleet | list[str], *, model: str = MODEL, **hedging: float
) -> llmstream.Fleet:
    settings = {"delay": 0.05, "budget": 1.0, **hedging}
    return fleet_config(
        fleet,
        model=model,
        weights=SLOW_WEIGHTS,
        routing=SLOW_FIRST,
        hedging=llmstream.Hedging(**settings),  # type: ignore[arg-type]
        scrape_interval=None,
    )


@pytest.fixture
def fleet() -> FakeFleet:
    with FakeFleet(2, text=TEXT) as replicas:
        replicas[0].slow(2.0)
        yield replicas


async def test_a_late_first_token_is_hedged_and_the_fast_replica_answers(
    mode: str, fleet: FakeFleet
) -> None:
    async with open_client(mode, _hedged(fleet)) as client:
        started = time.perf_counter()
        outcome = await call(client)
        cut = await fleet[0].fake.await_disconnect(timeout=2.0)
        await wait_for(lambda: client.in_flight() == [0, 0], what="both requests released")
    assert outcome.result is not None, outcome.error
    assert outcome.text == TEXT
    assert outcome.result.hedged
    assert outcome.result.endpoint == fleet[1].base_url
    assert outcome.first_at is not None and outcome.first_at - started < 1.0
    assert fleet.chat_requests == [1, 1]
    # The loser's connection is closed as soon as the winner's first token is in.
    assert cut.time - outcome.first_at < CUT_WITHIN, cut.time - outcome.first_at


def _session_at(fleet: FakeFleet, index: int) -> str:
    """A session key whose rendezvous home is replica ``index`` (equal weights)."""
    keys = [(f"{url} {MODEL}", 1.0) for url in fleet.base_urls]
    return next(f"s{n}" for n in range(10_000) if rendezvous(f"s{n}", keys) == index)


async def test_a_request_held_by_a_slow_replica_is_hedged_with_the_oldest_one_there(
    mode: str, fleet: FakeFleet
) -> None:
    # Two calls wait at the slow replica, sent half a second apart; the fast one answers
    # a call in between. When the first is due its hedge, the second gets its own too,
    # half a second before its own delay. Sessions place the calls: their affinity
    # outweighs any load.
    delay = 1.0
    sent = SentRequests()
    config = fleet_config(
        fleet,
        routing=llmstream.Routing(affinity_weight=100.0, max_imbalance=100.0),
        hedging=llmstream.Hedging(delay=delay, budget=1.0),
        scrape_interval=None,
    )
    slow, fast = _session_at(fleet, 0), _session_at(fleet, 1)
    async with open_client(mode, config, hooks=[sent]) as client:
        async with anyio.create_task_group() as group:
            first, second = TimedOutcome(), TimedOutcome()
            group.start_soon(lambda: call(client, into=first, session=slow))
            await wait_for(lambda: fleet.chat_requests[0] == 1, what="the first call sent")
            between = await call(client, session=fast)
            # Half a second after the first was sent (the clock of the events), which
            # the test is about: well inside its delay, whatever the call between took.
            first_at = next(e.at for e in sent.events if e.endpoint == fleet[0].base_url)
            await anyio.sleep(first_at + 0.5 - time.perf_counter())
            group.start_soon(lambda: call(client, into=second, session=slow))
    assert between.result is not None and between.result.endpoint == fleet[1].base_url
    for outcome in (first, second):
        assert outcome.result is not None, outcome.error
        assert outcome.result.hedged and outcome.result.endpoint == fleet[1].base_url
    calls = [e.call for e in sent.events if not e.hedge and e.endpoint == fleet[0].base_url]
    assert len(calls) == 2
    (first_sent, second_sent), (first_hedge, second_hedge) = (
        [next(e.at for e in sent.events if e.call is c and e.hedge is h) for c in calls]
        for h in (False, True)
    )
    assert second_sent - first_sent >= 0.5
    assert second_sent < first_hedge - 0.2, "the machine held the second call too long"
    assert first_hedge - first_sent >= delay
    # The second went with the first (about 0.45 s after it was sent), not at its own
    # delay: the margin is for a loaded machine's late timers, not a tolerance of the rule.
    assert second_hedge - second_sent < delay - 0.1, second_hedge - second_sent
    assert second_hedge >= first_sent + delay - 0.01


async def test_a_replica_holding_a_late_request_gets_no_new_call_though_it_looks_idler(
    mode: str, fleet: FakeFleet
) -> None:
    # Replica 0 holds a call whose hedge is due (the budget sends none) and has answered
    # nothing since: the next call goes to replica 1, though its figures look busier.
    fleet[0].slow(0.6)
    fleet[0].fake.set_metrics(kv_cache=0.0)
    fleet[1].fake.set_metrics(kv_cache=0.5)
    config = fleet_config(
        fleet,
        routing=llmstream.Routing(choices=0, affinity_weight=100.0, max_imbalance=100.0),
        hedging=llmstream.Hedging(delay=0.1, budget=0.0),
    )
    async with open_client(mode, config) as client:
        state = client.client._fleet_state
        assert state is not None
        async with anyio.create_task_group() as group:
            held = TimedOutcome()
            group.start_soon(lambda: call(client, into=held, session=_session_at(fleet, 0)))

            def ready() -> bool:
                loads = client.endpoint_loads()
                figures = all(load.fresh for load in loads) and loads[1].kv_cache == 0.5
                late = any(t._late for t in state.endpoints[0].unanswered)
                return figures and late

            await wait_for(ready, what="fresh figures and the held call late")
            other = await call(client)
    assert held.result is not None and held.result.endpoint == fleet[0].base_url
    assert not held.result.hedged
    assert other.result is not None and other.result.endpoint == fleet[1].base_url
    assert fleet.chat_requests == [1, 1]


async def test_no_hedge_when_the_first_token_comes_before_the_delay(mode: str) -> None:
    sent = SentRequests()
    with FakeFleet(2, text=TEXT) as fleet:
        async with open_client(mode, _hedged(fleet, delay=0.5), hooks=[sent]) as client:
            outcomes = await call_many(client, 10)
    assert all(o.result is not None and not o.result.hedged for o in outcomes)
    assert sent.hedges == 0
    assert sum(fleet.chat_requests) == 10


async def test_the_hedge_budget_caps_the_extra_requests(mode: str) -> None:
    sent = SentRequests()
    calls = 40
    with FakeFleet(2, text="Hi") as fleet:
        # Slow enough that every hedge reaches its server before the request it backs
        # answers, even on a machine that stalls: a hedge cut before it is sent reaches none.
        fleet[0].slow(0.5)
        # The bucket's burst is budget * window, at least 3: 3 with the smallest window.
        config = _hedged(fleet, delay=0.01, budget=0.1, window=20)
        async with open_client(mode, config, hooks=[sent]) as client:
            outcomes = await call_together(client, calls)
    assert all(o.text == "Hi" for o in outcomes)
    burst = 3  # the bucket starts full: a few may go at once
    assert 1 <= sent.hedges <= 0.1 * calls + burst, sent.hedges
    assert sum(fleet.chat_requests) == calls + sent.hedges
    assert sum(o.result.hedged for o in outcomes if o.result is not None) == sent.hedges


async def test_a_shared_budget_is_charged_for_the_losing_request_too(
    mode: str, fleet: FakeFleet
) -> None:
    shared = llmstream.TokenBudget(100_000)
    async with open_client(mode, _hedged(fleet), token_budget=shared) as client:
        outcome = await call(client, max_tokens=64)
        await fleet[0].fake.await_disconnect(timeout=2.0)
        await wait_for(lambda: shared.reserved == 0, what="every reservation settled")
    assert outcome.result is not None and outcome.result.usage is not None
    assert outcome.result.hedged
    used = outcome.result.usage.total_tokens
    prompt = outcome.result.usage.prompt_tokens
    # The loser's prompt was prefilled on its replica: it costs about a prompt, not more.
    assert used < shared.spent <= used + 2 * prompt, (shared.spent, used, prompt)


# -- against vLLM's own serving code -----------------------------------------------------


def _aborts(base_url: str) -> list[dict[str, object]]:
    answer = httpx.get(f"{base_url.removesuffix('/v1')}/_aborts", timeout=5.0)
    answer.raise_for_status()
    aborts: list[dict[str, object]] = answer.json()["aborts"]
    return aborts


@pytest.mark.skipif(not PEER, reason="LLMSTREAM_PEER_VLLM_URL not set (no vLLM peer)")
async def test_the_losing_request_is_aborted_on_a_vllm_server(mode: str) -> None:
    assert PEER
    httpx.post(f"{PEER.removesuffix('/v1')}/_reset", timeout=5.0).raise_for_status()
    # vLLM (slow: 300 ms per token, asked first) and a fast emulated replica of its model.
    with FakeFleet([FakeVLLM(TEXT, model=PEER_MODEL)]) as fast:
        config = _hedged([PEER, fast[0].base_url], model=PEER_MODEL)
        async with open_client(mode, config) as client:
            outcome = await call(client, max_tokens=32, extra_body={"x_delay_ms": 300})
            with anyio.fail_after(2.0):
                while not (aborts := await anyio.to_thread.run_sync(_aborts, PEER)):
                    await anyio.sleep(0.01)
    assert outcome.result is not None, outcome.error
    assert outcome.result.hedged
    assert outcome.result.endpoint == fast[0].base_url
    assert outcome.text == TEXT
    assert len(aborts) == 1, aborts
    assert outcome.first_wall is not None
    gap = float(aborts[0]["time"]) - outcome.first_wall  # type: ignore[arg-type]
    assert gap < CUT_WITHIN, gap
