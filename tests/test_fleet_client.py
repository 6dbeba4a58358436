"""Clients over a fleet of emulated replicas on loopback: where calls go, and what they survive.

Every scenario runs on every client (see ``fleet_drivers.every_client``): the sync client,
the async client on asyncio and on trio, and the async client on aiohttp.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import anyio
import pytest

import llmstream
from llmstream.testing import FakeFleet, FakeVLLM
from llmstream.testing._config import Fault

from .fleet_drivers import (
    FAST_BREAKER,
    MODEL,
    TEXT,
    WAIT,
    FleetClient,
    SentRequests,
    answered_by,
    call,
    call_many,
    call_together,
    cancelled_call,
    every_client,
    fleet_config,
    held_open,
    open_client,
    until_loads_show,
    wait_for,
)

pytestmark = [pytest.mark.anyio, every_client]

KEYS = ["sk-replica-zero-0123456789", None, "sk-replica-two-9876543210"]
SMALL = "other"
# Scores by in-flight counts and waiting queues only, for the tests of spread and sessions:
# the emulator's KV-cache figure follows the calls running on it, and a first token 25 ms
# late on a busy test machine is real slowness to the router; both would (rightly) move
# calls that these tests expect to stay put.
BY_COUNTS = llmstream.Routing(kv_weight=0.0)


@pytest.fixture
def fleet() -> FakeFleet:
    with FakeFleet(3, text=TEXT) as replicas:
        yield replicas


def _authorization(headers: dict[str, str]) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == "authorization"), None)


async def _session_homes(client: FleetClient, sessions: list[str]) -> dict[str, str | None]:
    """The endpoint that answered one call of each session (None: the call failed)."""
    homes = {}
    for session in sessions:
        outcome = await call(client, session=session)
        homes[session] = outcome.result.endpoint if outcome.result is not None else None
    return homes


# -- endpoints ---------------------------------------------------------------------------


async def test_idle_calls_spread_over_every_endpoint_and_name_the_one_that_answered(
    mode: str, fleet: FakeFleet
) -> None:
    async with open_client(mode, fleet_config(fleet, routing=BY_COUNTS)) as client:
        outcomes = await call_many(client, 30)
    assert all(o.text == TEXT for o in outcomes)
    counts = answered_by(outcomes, fleet)
    # Ties are broken at random: the first endpoint listed does not take every call.
    assert min(counts) >= 3, counts
    assert counts == fleet.chat_requests


async def test_weights_set_each_endpoints_share_of_an_idle_fleet(mode: str) -> None:
    with FakeFleet(2, text="Hi") as fleet:
        config = fleet_config(fleet, weights=[3.0, 1.0], routing=BY_COUNTS)
        async with open_client(mode, config) as client:
            outcomes = await call_many(client, 100)
    heavy, light = answered_by(outcomes, fleet)
    assert 63 <= heavy <= 90, (heavy, light)  # 75 expected


async def test_each_endpoints_key_goes_to_it_alone_and_is_never_shown(
    mode: str, fleet: FakeFleet
) -> None:
    config = fleet_config(fleet, keys=KEYS)
    async with open_client(mode, config) as client:
        outcomes = await call_many(client, 20)
        shown = [repr(config), str(config), repr(client.client), *map(repr, config.endpoints)]
        shown += map(repr, client.endpoint_loads())
        for replica in fleet:
            replica.fake.fail_always(Fault.http_status(401))
        refused = await call(client)
    assert min(answered_by(outcomes, fleet)) >= 1
    for replica, key in zip(fleet, KEYS, strict=True):
        sent = {_authorization(r.headers) for r in replica.requests}
        assert sent == {f"Bearer {key}" if key else None}, (replica, sent)
    assert isinstance(refused.error, llmstream.AuthenticationError)
    shown += [str(refused.error), repr(refused.error), repr(refused.error.partial)]
    assert not [text for text in shown for key in KEYS if key and key in text]


# -- load signals ------------------------------------------------------------------------


async def test_a_busy_replica_gets_no_calls_once_its_metrics_are_read(
    mode: str, fleet: FakeFleet
) -> None:
    fleet[1].fake.set_metrics(waiting=60, kv_cache=0.8)  # busy, short of the admission limits
    async with open_client(mode, fleet_config(fleet)) as client:
        await until_loads_show(
            client, lambda loads: loads[1].waiting == 60 and loads[1].fresh, "the busy figures"
        )
        before = fleet.chat_requests
        outcomes = await call_many(client, 20)
    after = fleet.chat_requests
    assert all(o.result is not None for o in outcomes)
    assert after[1] - before[1] <= 1, (before, after)


async def test_without_metrics_held_streams_spread_by_the_clients_own_counts(mode: str) -> None:
    # Paced, so that each answer is still being served while the next stream opens.
    with FakeFleet(3, text=TEXT, token_delay=0.05) as fleet:
        for replica in fleet:
            replica.fake.metrics_enabled = False  # a gateway in front: /metrics is 404
        config = fleet_config(fleet, routing=llmstream.Routing(choices=0))
        async with open_client(mode, config) as client:
            async with held_open(client, 6) as held:
                assert client.in_flight() == [2, 2, 2]
            await wait_for(lambda: client.in_flight() == [0, 0, 0], what="in flight back to 0")
    assert all(o.text == TEXT for o in held)


async def test_in_flight_returns_to_zero_after_successes_errors_and_cancellations(
    mode: str, fleet: FakeFleet
) -> None:
    async with open_client(mode, fleet_config(fleet)) as client:
        await call_together(client, 6)
        for replica in fleet:
            replica.fake.add_fault(Fault.http_status(422))
        refused = await call(client)
        for replica in fleet:
            replica.fake.clear_faults()  # the 422s not taken
            replica.die_mid_stream(after_chunks=3)
        broken = await call(client)
        for replica in fleet:
            replica.fake.clear_faults()
        gave_up = [await cancelled_call(client) for _ in range(3)]
        await wait_for(lambda: client.in_flight() == [0, 0, 0], what="in flight back to 0")
    assert isinstance(refused.error, llmstream.UnprocessableEntityError)
    assert isinstance(broken.error, llmstream.StreamInterrupted)
    assert all(o.pieces for o in gave_up)


# -- session affinity --------------------------------------------------------------------


async def test_a_session_stays_on_its_replica_by_argument_or_header(
    mode: str, fleet: FakeFleet
) -> None:
    sessions = [f"user-{i}" for i in range(6)]
    async with open_client(mode, fleet_config(fleet, routing=BY_COUNTS)) as client:
        first = await _session_homes(client, sessions)
        again = await _session_homes(client, sessions)
        by_header = {}
        for session in sessions:
            outcome = await call(client, extra_headers={"X-Session-ID": session})
            assert outcome.result is not None
            by_header[session] = outcome.result.endpoint
    assert first == again == by_header
    assert len(set(first.values())) >= 2, first  # sessions are spread, not all on one


async def test_a_down_replica_moves_its_own_sessions_only(mode: str, fleet: FakeFleet) -> None:
    sessions = [f"conversation-{i}" for i in range(12)]
    async with open_client(mode, fleet_config(fleet, routing=BY_COUNTS)) as client:
        homes = await _session_homes(client, sessions)
        lost = homes[sessions[0]]
        victim = next(r for r in fleet if r.base_url == lost)
        victim.down()
        moved = await _session_homes(client, sessions)
        settled = await _session_homes(client, sessions)
    for session in sessions:
        if homes[session] == lost:
            assert moved[session] not in (None, lost)
        else:
            assert moved[session] == homes[session], session
    assert settled == moved


# -- discovery ---------------------------------------------------------------------------


class FakeDNS:
    """``socket.getaddrinfo`` that answers one made-up name with the addresses it is given."""

    def __init__(self, name: str, addresses: list[str]) -> None:
        self.name = name
        self.addresses = addresses
        self._real = socket.getaddrinfo

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != self.name:
            return self._real(host, port, *args, **kwargs)
        return [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port)))
            for address in list(self.addresses)
        ]


async def test_replicas_found_by_dns_come_and_go_without_a_restart(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeFleet(3, text=TEXT, shared_port=True) as fleet:
        dns = FakeDNS("vllm.fleet.test", fleet.hosts[:2])
        monkeypatch.setattr(socket, "getaddrinfo", dns)
        discovery = llmstream.DNSDiscovery(
            "vllm.fleet.test", port=fleet.port, model=MODEL, interval=0.05
        )
        config = llmstream.Fleet(
            discovery=discovery, scrape_interval=0.05, breaker=FAST_BREAKER, routing=BY_COUNTS
        )
        async with open_client(mode, config) as client:
            first, second, third = fleet
            before = answered_by(await call_many(client, 20), fleet)
            assert before[2] == 0 and min(before[:2]) > 0, before

            dns.addresses = fleet.hosts  # a third replica joins the Service
            await until_loads_show(client, lambda loads: len(loads) == 3, "the new replica")
            joined = answered_by(await call_many(client, 30), fleet)
            assert joined[2] > 0, joined

            dns.addresses = fleet.hosts[1:]  # the first one leaves it
            await until_loads_show(
                client,
                lambda loads: first.base_url not in {load.url for load in loads},
                "the replica gone",
            )
            left = first.chat_requests
            after = answered_by(await call_many(client, 20), fleet)
        assert after[0] == 0 and first.chat_requests == left, after
        assert second.chat_requests > 0 and third.chat_requests > 0


# -- health and circuit breaking ---------------------------------------------------------


async def test_a_down_replica_gets_no_attempts_once_its_breaker_opens(
    mode: str, fleet: FakeFleet
) -> None:
    breaker = llmstream.CircuitBreaker(failures=2, cooldown=30.0, max_cooldown=30.0)
    sent = SentRequests()
    fleet[0].down()
    async with open_client(mode, fleet_config(fleet, breaker=breaker), hooks=[sent]) as client:
        # Until the breaker opens: the down replica, idle to the router, is one of three
        # tied candidates, picked at random (twice in 20 calls, nearly always).
        with anyio.fail_after(WAIT):
            while client.endpoint_loads()[0].state != "open":
                assert (await call(client)).text == TEXT
        tried = sent.to(fleet[0].base_url)
        outcomes = await call_many(client, 20)
        state = client.endpoint_loads()[0].state
    assert tried == breaker.failures
    assert all(o.text == TEXT for o in outcomes)
    assert state == "open"
    assert sent.to(fleet[0].base_url) == breaker.failures  # none once it opened


async def test_a_replica_back_up_is_probed_and_takes_calls_again(
    mode: str, fleet: FakeFleet
) -> None:
    fleet[0].down()
    # By counts: the trial's first token, on a new connection of a busy test machine, may
    # be slow enough for the router to prefer the others for a while, rightly.
    async with open_client(mode, fleet_config(fleet, routing=BY_COUNTS)) as client:
        await until_loads_show(client, lambda loads: loads[0].state != "closed", "the breaker open")
        fleet[0].up()
        await until_loads_show(client, lambda loads: loads[0].state == "closed", "it closed again")
        before = fleet[0].chat_requests
        outcomes = await call_many(client, 15)
    assert all(o.text == TEXT for o in outcomes)
    assert fleet[0].chat_requests - before >= 1


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_the_callers_own_errors_do_not_open_the_breaker(
    mode: str, fleet: FakeFleet, status: int
) -> None:
    for replica in fleet:
        replica.fake.fail_always(Fault.http_status(status))
    async with open_client(mode, fleet_config(fleet, routing=BY_COUNTS)) as client:
        refused = await call_many(client, 8)
        states = {load.state for load in client.endpoint_loads()}
        for replica in fleet:
            replica.fake.clear_faults()
        outcomes = await call_many(client, 30)
    assert all(isinstance(o.error, llmstream.APIStatusError) for o in refused)
    assert {o.error.status_code for o in refused if o.error is not None} == {status}  # type: ignore[attr-defined]
    assert sum(fleet.chat_requests) == 8 + 30  # each refusal was sent once, not elsewhere
    assert states == {"closed"}
    assert min(answered_by(outcomes, fleet)) >= 1


async def test_a_replica_failing_its_health_check_is_taken_out(mode: str, fleet: FakeFleet) -> None:
    fleet[0].unhealthy()
    async with open_client(mode, fleet_config(fleet)) as client:
        await until_loads_show(client, lambda loads: loads[0].state != "closed", "it taken out")
        before = fleet[0].chat_requests
        outcomes = await call_many(client, 15)
    assert all(o.text == TEXT for o in outcomes)
    assert fleet[0].chat_requests == before


# -- fallback and resume -----------------------------------------------------------------


async def test_with_every_primary_down_the_fallback_model_answers(
    mode: str, fleet: FakeFleet
) -> None:
    with FakeFleet([FakeVLLM("Small answer.", model=SMALL)]) as small:
        fallback = [llmstream.Endpoint(small[0].base_url, model=SMALL)]
        config = fleet_config(fleet, fallback=fallback)
        async with open_client(mode, config) as client:
            fleet.stop()
            outcomes = await call_many(client, 4)
    for outcome in outcomes:
        assert outcome.result is not None, outcome.error
        assert outcome.text == "Small answer."
        assert outcome.result.endpoint == small[0].base_url
        assert outcome.result.model == SMALL
    assert small.chat_requests == [4]


async def test_a_replica_dying_mid_answer_is_resumed_elsewhere_exactly_once(
    mode: str, fleet: FakeFleet
) -> None:
    retry = llmstream.RetryPolicy(max_retries=2, initial_backoff=0.01, resume=True)
    for replica in fleet:
        replica.die_mid_stream(after_chunks=3)
    async with open_client(mode, fleet_config(fleet), retry=retry) as client:
        outcome = await call(client)
    assert outcome.result is not None, outcome.error
    assert outcome.text == TEXT  # every character once: nothing repeated, nothing lost
    assert outcome.result.resumes >= 1
    assert outcome.result.complete


# -- admission ---------------------------------------------------------------------------


@pytest.mark.parametrize("busy", [{"waiting": 9}, {"kv_cache": 0.95}], ids=["queue", "kv"])
async def test_a_saturated_fleet_refuses_at_once_with_a_retry_hint(
    mode: str, fleet: FakeFleet, busy: dict[str, float]
) -> None:
    admission = llmstream.Admission(queue_limit=8, kv_limit=0.9)
    async with open_client(mode, fleet_config(fleet, admission=admission)) as client:
        for replica in fleet:
            replica.fake.set_metrics(**busy)  # type: ignore[arg-type]
        await until_loads_show(client, lambda loads: all(map(_saturated, loads)), "saturation")
        sent = sum(fleet.chat_requests)
        refused = await call(client)
    assert isinstance(refused.error, llmstream.OverloadedError)
    assert refused.error.retry_after is not None and 0 < refused.error.retry_after <= 2.0
    assert "Admission(wait=" in str(refused.error)
    assert sum(fleet.chat_requests) == sent  # nothing was sent


def _saturated(load: llmstream.EndpointLoad) -> bool:
    return load.fresh and ((load.waiting or 0) >= 8 or (load.kv_cache or 0) >= 0.9)


async def test_a_waiting_call_goes_once_a_replica_has_room(mode: str, fleet: FakeFleet) -> None:
    admission = llmstream.Admission(queue_limit=8, wait=3.0)
    async with open_client(mode, fleet_config(fleet, admission=admission)) as client:
        for replica in fleet:
            replica.fake.set_metrics(waiting=20)
        await until_loads_show(
            client, lambda loads: all(load.waiting == 20 for load in loads), "saturation"
        )
        sent = sum(fleet.chat_requests)
        started = threading.Event()
        freed: list[tuple[float, int]] = []

        async def free_one_later() -> None:
            await wait_for(started.is_set, what="the call to start")
            await anyio.sleep(0.2)  # part of the scenario: the call waits a while for room
            freed.append((time.perf_counter(), sum(fleet.chat_requests)))
            fleet[2].fake.set_metrics(waiting=0)

        async with anyio.create_task_group() as group:
            group.start_soon(free_one_later)
            started.set()
            outcome = await call(client)
    assert outcome.result is not None, outcome.error
    [(freed_at, sent_meanwhile)] = freed
    assert sent_meanwhile == sent  # the call was waiting, not sent to a saturated replica
    assert outcome.result.endpoint == fleet[2].base_url
    # Sent once the next read of /metrics shows room (every 0.05 s), not seconds later.
    assert outcome.first_at is not None and outcome.first_at - freed_at < 1.0


async def test_stale_metrics_count_as_saturated(mode: str, fleet: FakeFleet) -> None:
    config = fleet_config(fleet, scrape_interval=0.05, stale_after=0.3)
    async with open_client(mode, config) as client:
        await until_loads_show(client, lambda loads: all(load.fresh for load in loads), "figures")
        for replica in fleet:
            replica.fake.metrics_enabled = False  # /metrics stops answering
        with anyio.fail_after(WAIT):
            while True:  # calls go on until the figures are stale_after old
                sent = sum(fleet.chat_requests)
                refused = await call(client)
                if refused.error is not None:
                    break
    assert isinstance(refused.error, llmstream.OverloadedError)
    assert sum(fleet.chat_requests) == sent


# -- token budgets -----------------------------------------------------------------------


async def test_a_shared_token_budget_is_charged_what_the_fleets_calls_used(
    mode: str, fleet: FakeFleet
) -> None:
    shared = llmstream.TokenBudget(100_000)
    async with open_client(mode, fleet_config(fleet), token_budget=shared) as client:
        outcomes = await call_together(client, 9, max_tokens=64)
    used = 0
    for outcome in outcomes:
        assert outcome.result is not None and outcome.result.usage is not None
        used += outcome.result.usage.total_tokens
    assert min(answered_by(outcomes, fleet)) >= 1
    assert shared.spent == used
    assert shared.reserved == 0
    assert shared.balance == 100_000 - used
