"""Fleets without the network: settings, scoring, sampling, rendezvous, breaker, fleet state."""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import random
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import llmstream
from llmstream._breaker import Breaker
from llmstream._fleet_state import AttemptTicket, EndpointState, FleetState, Pick
from llmstream._routing import (
    load_score,
    lowest,
    rendezvous,
    rendezvous_score,
    ttft_term,
    weighted_sample,
)
from llmstream._vllm_metrics import LoadReport

KEY = "sk-very-secret-key-123"
MODEL = "Qwen/Qwen3-8B"
SMALL = "Qwen/Qwen3-1.7B"


def _fleet(n: int = 2, **options: object) -> llmstream.Fleet:
    options.setdefault("model", MODEL)
    endpoints = [llmstream.Endpoint(f"http://gpu-{i}:8000/v1") for i in range(n)]
    return llmstream.Fleet(endpoints, **options)  # type: ignore[arg-type]


def _state(fleet: llmstream.Fleet, seed: int = 0) -> FleetState:
    return FleetState(fleet, rng=random.Random(seed))


def _pick(state: FleetState, now: float = 0.0, **kwargs: object) -> Pick:
    pick = state.choose(now, **kwargs)  # type: ignore[arg-type]
    assert isinstance(pick, Pick), f"no endpoint chosen: wait {pick}"
    return pick


def _counts(state: FleetState, times: int, now: float = 0.0, **kwargs: object) -> dict[str, int]:
    return collections.Counter(_pick(state, now, **kwargs).endpoint.name for _ in range(times))


def _open(state: FleetState, endpoint: EndpointState, now: float = 0.0) -> None:
    for _ in range(state.fleet.breaker.failures):
        with state.started(Pick(endpoint, False), now) as ticket:
            ticket.failed(now, counts=True)
    assert endpoint.breaker.state(now) == "open"


# -- settings ----------------------------------------------------------------------------------


def test_endpoint_base_url_is_normalised_and_named_host_port() -> None:
    endpoint = llmstream.Endpoint("http://gpu-1:8000/v1/")
    assert endpoint.base_url == "http://gpu-1:8000/v1"
    assert endpoint.label == "gpu-1:8000"
    assert llmstream.Endpoint("https://gpu-1/v1", name="big").label == "big"
    assert llmstream.Endpoint("https://[::1]/v1").label == "[::1]:443"


def test_endpoint_ignores_the_base_url_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSTREAM_BASE_URL", "http://elsewhere:8000/v1")
    with pytest.raises(llmstream.InvalidRequestError, match="base_url must be a URL"):
        llmstream.Endpoint("")


def test_api_keys_are_never_shown() -> None:
    endpoint = llmstream.Endpoint("http://gpu-1:8000/v1", api_key=KEY)
    discovery = llmstream.DNSDiscovery("vllm.local", model=MODEL, api_key=KEY)
    fleet = llmstream.Fleet([endpoint], model=MODEL, discovery=discovery)
    state = FleetState(fleet)
    shown = [repr(endpoint), str(endpoint), repr(discovery), repr(fleet), repr(state.endpoints)]
    shown += [repr(load) for load in state.loads(0.0)]
    assert all(KEY not in text for text in shown)
    assert endpoint.api_key == KEY
    assert state.endpoints[0].api_key is not None
    assert state.endpoints[0].api_key.get_secret() == KEY


@pytest.mark.parametrize(
    "build",
    [
        lambda: llmstream.Endpoint("http://gpu-1:8000/v1", api_key=KEY, weight=0),
        lambda: llmstream.Endpoint(f"http://gpu-1:8000/v1?key={KEY}", api_key=KEY),
        lambda: llmstream.Endpoint(f"http://user:{KEY}@gpu-1:8000/v1"),
        lambda: llmstream.Fleet([llmstream.Endpoint("http://a/v1", api_key=KEY)] * 2, model="m"),
        lambda: llmstream.Fleet([llmstream.Endpoint("http://a/v1", api_key=KEY)]),
        lambda: llmstream.DNSDiscovery("vllm", api_key=KEY, interval=-1),
        lambda: llmstream.Endpoint("http://a/v1", api_key=b"bytes-key"),  # type: ignore[arg-type]
    ],
    ids=["weight", "query", "userinfo", "duplicate", "no-model", "discovery", "bytes-key"],
)
def test_errors_never_repeat_the_key(build: Callable[[], object]) -> None:
    with pytest.raises(llmstream.InvalidRequestError) as caught:
        build()
    assert KEY not in str(caught.value) and "bytes-key" not in str(caught.value)


E = llmstream.Endpoint
INVALID: list[tuple[Callable[[], object], str]] = [
    (lambda: E("http://a/v1", weight=0), "weight must be a finite number > 0"),
    (lambda: E("http://a/v1", weight=-1.0), "weight"),
    (lambda: E("http://a/v1", weight=math.inf), "weight"),
    (lambda: E("http://a/v1", weight=True), "weight"),
    (lambda: E("ftp://a/v1"), "http:// or https://"),
    (lambda: E("http://a/v1", model=""), "model must be a non-empty string"),
    (lambda: llmstream.Routing(choices=-1), "choices"),
    (lambda: llmstream.Routing(kv_weight=-0.5), "kv_weight"),
    (lambda: llmstream.CircuitBreaker(failures=0), "failures must be a positive integer"),
    (lambda: llmstream.CircuitBreaker(cooldown=0), "cooldown"),
    (lambda: llmstream.CircuitBreaker(cooldown=10, max_cooldown=5), "must be at least cooldown"),
    (lambda: llmstream.Admission(queue_limit=0), "queue_limit"),
    (lambda: llmstream.Admission(kv_limit=0), "kv_limit"),
    (lambda: llmstream.Admission(kv_limit=85), "fraction of the KV cache"),
    (lambda: llmstream.Admission(wait=-1), "wait"),
    (lambda: llmstream.Hedging(percentile=0), "percentile"),
    (lambda: llmstream.Hedging(percentile=1.5), "percentile"),
    (lambda: llmstream.Hedging(budget=-0.1), "budget"),
    (lambda: llmstream.Hedging(budget=1.1), "budget"),
    (lambda: llmstream.Hedging(delay=0), "delay"),
    (lambda: llmstream.Hedging(window=5), "window"),
    (lambda: llmstream.DNSDiscovery("http://vllm"), "no scheme or path"),
    (lambda: llmstream.DNSDiscovery("vllm", port=70000), "port"),
    (lambda: llmstream.DNSDiscovery("vllm", scheme="ftp"), "scheme"),
    (lambda: llmstream.DNSDiscovery("vllm", path="v1"), 'path must start with "/"'),
    (lambda: llmstream.Fleet(), "needs endpoints="),
    (lambda: llmstream.Fleet([E("http://a/v1")]), "has no model"),
    (lambda: llmstream.Fleet(discovery=llmstream.DNSDiscovery("vllm")), "DNSDiscovery has no"),
    (
        lambda: llmstream.Fleet([E("http://a/v1")], model="m", fallback=[E("http://b/v1")]),
        "must name",
    ),
    (lambda: llmstream.Fleet([E("http://a/v1/"), E("http://a/v1")], model="m"), "listed twice"),
    (lambda: llmstream.Fleet(["http://a/v1"], model="m"), "wrap URLs"),  # type: ignore[list-item]
    (lambda: llmstream.Fleet(E("http://a/v1"), model="m"), "must be a list"),  # type: ignore[arg-type]
    (lambda: llmstream.Fleet([E("http://a/v1")], model="m", routing=2), "llmstream.Routing"),  # type: ignore[arg-type]
    (lambda: llmstream.Fleet([E("http://a/v1")], model="m", stale_after=1.0), "stale_after"),
    (lambda: llmstream.Fleet([E("http://a/v1")], model="m", scrape_interval=0), "scrape_interval"),
    (lambda: llmstream.Fleet([E("http://a/v1")], model="m", session_header=""), "session_header"),
]


@pytest.mark.parametrize(("build", "message"), INVALID)
def test_invalid_settings_are_refused_saying_what_to_pass(
    build: Callable[[], object], message: str
) -> None:
    with pytest.raises(llmstream.InvalidRequestError) as caught:
        build()
    assert message in str(caught.value)


def test_same_server_may_serve_two_models() -> None:
    fleet = llmstream.Fleet(
        [E("http://a/v1", model="base"), E("http://a/v1", model="lora-1")], model="base"
    )
    assert len(FleetState(fleet).endpoints) == 2


def test_fleet_is_frozen_and_hashable_with_lists_stored_as_tuples() -> None:
    fleet = _fleet(2, fallback=[E("http://small/v1", model=SMALL)])
    assert isinstance(fleet.endpoints, tuple) and isinstance(fleet.fallback, tuple)
    assert hash(fleet) == hash(_fleet(2, fallback=[E("http://small/v1", model=SMALL)]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        fleet.model = "other"  # type: ignore[misc]


def test_discovery_builds_urls_with_ipv6_in_brackets() -> None:
    discovery = llmstream.DNSDiscovery("vllm.ns.svc.cluster.local", port=8001, path="/v1")
    assert discovery.url_for("10.0.0.7") == "http://10.0.0.7:8001/v1"
    assert discovery.url_for("fd00::7") == "http://[fd00::7]:8001/v1"


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_a_weight_is_accepted_exactly_when_positive_and_finite(weight: float) -> None:
    if weight > 0 and math.isfinite(weight):
        assert E("http://a/v1", weight=weight).weight == weight
    else:
        with pytest.raises(llmstream.InvalidRequestError):
            E("http://a/v1", weight=weight)


def test_overloaded_error_carries_retry_after_and_partial() -> None:
    error = llmstream.OverloadedError("all busy", retry_after=0.5)
    assert isinstance(error, llmstream.LLMStreamError)
    assert not isinstance(error, llmstream.APIStatusError)  # nothing was sent
    assert (error.retry_after, error.partial, str(error)) == (0.5, None, "all busy")


# -- scoring and sampling ----------------------------------------------------------------------


def test_load_score_weighs_queue_and_kv() -> None:
    assert load_score(llmstream.Routing(), 0.25, 0.5) == pytest.approx(1.5)
    assert load_score(llmstream.Routing(queue_weight=1, kv_weight=0), 0.25, 0.5) == 0.25


def test_ttft_term_is_the_slowdown_over_the_median_past_the_noise_clipped() -> None:
    assert ttft_term(0.5, 0.2) == pytest.approx(0.4)
    assert ttft_term(0.3, 0.2) == 0.0  # one and a half times: noise
    assert ttft_term(0.1, 0.2) == 0.0
    assert ttft_term(5.0, 0.2) == 1.0
    assert ttft_term(None, 0.2) == ttft_term(0.3, None) == 0.0


def test_weighted_sample_draws_in_proportion_to_weight() -> None:
    rng = random.Random(1234)
    weights = [1.0, 2.0, 3.0, 4.0]
    draws = collections.Counter(weighted_sample(weights, 1, rng)[0] for _ in range(40_000))
    for index, weight in enumerate(weights):
        assert draws[index] / 40_000 == pytest.approx(weight / 10, abs=0.01)


@given(st.lists(st.floats(0.01, 100), min_size=1, max_size=8), st.integers(0, 10), st.integers())
def test_weighted_sample_gives_distinct_indices(weights: list[float], k: int, seed: int) -> None:
    sample = weighted_sample(weights, k, random.Random(seed))
    expected = len(weights) if k == 0 else min(k, len(weights))
    assert len(sample) == len(set(sample)) == expected
    assert set(sample) <= set(range(len(weights)))


def test_ties_are_broken_at_random_not_to_the_first() -> None:
    rng = random.Random(7)
    picks = collections.Counter(
        lowest([0.0, 0.0, 0.0, 1.0], [0, 1, 2, 3], rng) for _ in range(9000)
    )
    assert set(picks) == {0, 1, 2}
    assert all(count / 9000 == pytest.approx(1 / 3, abs=0.03) for count in picks.values())
    assert lowest([0.5, 0.1, 0.2], [0, 1, 2], rng) == 1


@pytest.mark.parametrize("choices", [0, 2])
def test_an_idle_fleet_spreads_calls_over_every_endpoint(choices: int) -> None:
    state = _state(_fleet(3, routing=llmstream.Routing(choices=choices)))
    counts = _counts(state, 3000)
    assert len(counts) == 3
    assert all(count / 3000 == pytest.approx(1 / 3, abs=0.05) for count in counts.values())


def test_with_one_choice_calls_follow_the_weights() -> None:
    endpoints = [E("http://a/v1", weight=1.0), E("http://b/v1", weight=3.0)]
    state = _state(llmstream.Fleet(endpoints, model=MODEL, routing=llmstream.Routing(choices=1)))
    counts = _counts(state, 8000)
    assert counts["b:80"] / 8000 == pytest.approx(0.75, abs=0.02)


def test_fresh_metrics_decide_the_least_loaded() -> None:
    state = _state(_fleet(3, routing=llmstream.Routing(choices=0)))
    a, b, c = state.endpoints
    state.record_load(a, LoadReport(running=10, waiting=4, kv_cache=0.2), 0.0)
    state.record_load(b, LoadReport(running=10, waiting=0, kv_cache=0.5), 0.0)
    state.record_load(c, LoadReport(running=10, waiting=0, kv_cache=0.1), 0.0)
    assert _counts(state, 50, now=1.0) == {c.name: 50}


def test_calls_sent_since_the_last_read_count_as_queued() -> None:
    state = _state(_fleet(2, routing=llmstream.Routing(choices=0, kv_weight=0)))
    a, b = state.endpoints
    for endpoint in (a, b):
        state.record_load(endpoint, LoadReport(running=0, waiting=0, kv_cache=0.0), 0.0)
    tickets = [state.started(_pick(state, 0.5), 0.5) for _ in range(10)]
    # A burst between two reads alternates instead of piling on one endpoint.
    assert (a.in_flight, b.in_flight) == (5, 5)
    for ticket in tickets:
        ticket.release()


def test_our_calls_without_a_first_token_count_as_queued_after_a_read() -> None:
    # A replica that stopped answering: its figures, read after our calls reached it,
    # show them running and nobody waiting. Ours still without a first token are queued
    # there all the same, so the next calls go to the replica that answers.
    state = _state(_fleet(2, routing=llmstream.Routing(choices=0, kv_weight=0)))
    a, b = state.endpoints
    stuck = [state.started(Pick(a, False), 0.0) for _ in range(4)]
    for endpoint in (a, b):
        state.record_load(endpoint, LoadReport(running=4, waiting=0, kv_cache=0.0), 0.1)
    answered = [state.started(Pick(b, False), 0.1) for _ in range(3)]
    for ticket in answered:
        ticket.first_token(0.15)  # b's calls stream: they are running, not queued
    assert b.in_flight - b.in_flight_at_load == 3  # b looks busier by in-flight count
    assert _counts(state, 20, 0.2) == {b.name: 20}
    for ticket in stuck + answered:
        ticket.release()


def test_without_metrics_in_flight_and_first_token_times_decide() -> None:
    state = _state(_fleet(3, routing=llmstream.Routing(choices=0)))
    a, b, c = state.endpoints
    held = state.started(Pick(a, False), 0.0)
    assert a.name not in _counts(state, 50)
    held.release()
    for endpoint, ttft in ((a, 0.1), (b, 0.1), (c, 0.5)):
        with state.started(Pick(endpoint, False), 0.0) as ticket:
            ticket.first_token(ttft)
    assert c.name not in _counts(state, 50)  # five times slower to the first token


def test_without_metrics_first_token_noise_does_not_outweigh_in_flight_counts() -> None:
    # Two healthy replicas whose first tokens differ by 20 %: the one with fewer calls in
    # flight takes the next, or held streams would all pile onto the faster one.
    state = _state(_fleet(2, routing=llmstream.Routing(choices=0)))
    a, b = state.endpoints
    for endpoint, ttft in ((a, 0.010), (b, 0.012)):
        with state.started(Pick(endpoint, False), 0.0) as ticket:
            ticket.first_token(ttft)
    held = [state.started(Pick(a, False), 0.0) for _ in range(2)]
    assert _counts(state, 20) == {b.name: 20}
    for ticket in held:
        ticket.release()


def test_a_slow_replica_is_tried_again_once_its_penalty_faded() -> None:
    # Avoided for being slow, it gets no new first-token times: without fading it would
    # be avoided for ever after it recovered.
    state = _state(_fleet(2, routing=llmstream.Routing(choices=0)))
    slow, fast = state.endpoints
    for endpoint, ttft in ((slow, 2.0), (fast, 0.2), (fast, 0.2)):
        with state.started(Pick(endpoint, False), 0.0) as ticket:
            ticket.first_token(ttft)
    assert _counts(state, 30, now=5.0) == {fast.name: 30}
    counts = _counts(state, 200, now=40.0)  # 30 s and more without news of it
    assert counts[slow.name] > 60 and counts[fast.name] > 60, counts


def test_a_replica_back_from_an_outage_is_not_held_to_its_old_slowness() -> None:
    # Slow, then down (its circuit opens), then back: usually a new process. Once its
    # circuit closes again, by a probe or a trial call, its old first-token times go.
    fleet = _fleet(2, breaker=llmstream.CircuitBreaker(failures=1, cooldown=1.0))
    for closing in ("probe", "trial"):
        state = _state(fleet)
        slow, fast = state.endpoints
        for endpoint, ttft in ((slow, 2.0), (fast, 0.2)):
            with state.started(Pick(endpoint, False), 0.0) as ticket:
                ticket.first_token(ttft)
        _open(state, slow, 3.0)
        assert slow.ttft_ewma == pytest.approx(2.0)
        if closing == "probe":
            state.record_probe(slow, True, 4.5)
        else:
            with state.started(Pick(slow, True), 4.5) as ticket:
                ticket.first_token(4.6)
        assert slow.breaker.state(4.7) == "closed"
        assert slow.ttft_ewma in (None, pytest.approx(0.1)), closing  # forgotten, or new
        counts = _counts(state, 200, now=4.7)
        assert counts[slow.name] > 50, (closing, counts)


def test_first_tokens_a_few_milliseconds_apart_are_not_slowness() -> None:
    assert ttft_term(0.004, 0.0015) == 0.0  # 2.7 times, but 2.5 ms: loopback noise
    assert ttft_term(0.040, 0.010) == pytest.approx(1.0)


def test_weights_split_the_ties_of_an_idle_fleet_when_every_endpoint_is_sampled() -> None:
    endpoints = [
        llmstream.Endpoint("http://gpu-0:8000/v1", weight=3.0),
        llmstream.Endpoint("http://gpu-1:8000/v1", weight=1.0),
    ]
    state = _state(llmstream.Fleet(endpoints, model=MODEL))  # choices=2: both sampled
    counts = _counts(state, 4000)
    assert 2800 <= counts["gpu-0:8000"] <= 3200, counts  # 3000 expected
    rng = random.Random(1)
    picks = collections.Counter(
        lowest([0.0, 0.0, 5.0], [0, 1, 2], rng, [1, 3, 100]) for _ in range(4000)
    )
    assert picks[2] == 0 and 2800 <= picks[1] <= 3200, picks


# -- rendezvous hashing ------------------------------------------------------------------------


def _owners(keys: list[str], ids: list[str]) -> dict[str, str]:
    owners = {}
    for key in keys:
        index = rendezvous(key, [(ident, 1.0) for ident in ids])
        assert index is not None
        owners[key] = ids[index]
    return owners


def test_removing_an_endpoint_moves_only_its_sessions() -> None:
    keys = [f"conv-{i}" for i in range(2000)]
    ids = [f"http://gpu-{i}:8000/v1" for i in range(5)]
    before = _owners(keys, ids)
    after = _owners(keys, ids[:2] + ids[3:])
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == ids[2]}


def test_adding_an_endpoint_moves_about_one_in_n_sessions_all_to_it() -> None:
    keys = [f"conv-{i}" for i in range(3000)]
    ids = [f"http://gpu-{i}:8000/v1" for i in range(5)]
    before = _owners(keys, ids)
    after = _owners(keys, [*ids, "http://gpu-5:8000/v1"])
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == "http://gpu-5:8000/v1" for k in moved)
    assert len(moved) / len(keys) == pytest.approx(1 / 6, abs=0.03)


def test_rendezvous_is_the_same_in_every_process() -> None:
    code = (
        "from llmstream._routing import rendezvous_score as s; print(repr(s('conv-42', 'x', 1.0)))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert outputs == {repr(rendezvous_score("conv-42", "x", 1.0))}


def test_rendezvous_follows_weights() -> None:
    keys = [f"conv-{i}" for i in range(4000)]
    owners = collections.Counter(rendezvous(k, [("a", 1.0), ("b", 3.0)]) for k in keys)
    assert owners[1] / 4000 == pytest.approx(0.75, abs=0.03)


# -- session affinity --------------------------------------------------------------------------


def _home(state: FleetState, session: str) -> EndpointState:
    index = rendezvous(session, [(e.key, e.weight) for e in state.endpoints])
    assert index is not None
    return state.endpoints[index]


@pytest.mark.parametrize("choices", [0, 2])
def test_a_session_sticks_to_its_endpoint(choices: int) -> None:
    state = _state(_fleet(4, routing=llmstream.Routing(choices=choices)))
    home = _home(state, "conv-42")
    assert _counts(state, 100, session="conv-42") == {home.name: 100}


def test_affinity_holds_while_not_much_busier_and_breaks_beyond() -> None:
    # queue term = in_flight / 64, weight 2: 16 in flight is 0.5 above an idle endpoint.
    state = _state(_fleet(2, routing=llmstream.Routing(choices=0, max_imbalance=0.5)))
    home = _home(state, "conv-42")
    tickets = [state.started(Pick(home, False), 0.0) for _ in range(16)]
    assert _counts(state, 50, session="conv-42") == {home.name: 50}
    tickets.append(state.started(Pick(home, False), 0.0))
    assert home.name not in _counts(state, 50, session="conv-42")
    for ticket in tickets:
        ticket.release()


def test_a_session_moves_when_its_endpoint_is_down_and_comes_back() -> None:
    state = _state(_fleet(3))
    home = _home(state, "conv-7")
    _open(state, home)
    assert home.name not in _counts(state, 30, session="conv-7")
    assert _counts(state, 30, now=120.0, session="conv-7") == {home.name: 30}


# -- circuit breaker ---------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_only() -> None:
    breaker = Breaker(llmstream.CircuitBreaker(failures=3))
    breaker.failed(0.0)
    breaker.failed(0.0)
    breaker.succeeded(0.0)  # resets the run
    breaker.failed(0.0)
    breaker.failed(0.0)
    assert breaker.state(0.0) == "closed"
    breaker.failed(0.0)
    assert breaker.state(0.0) == "open" and not breaker.available(0.5)


def test_breaker_cooldown_doubles_up_to_the_cap() -> None:
    breaker = Breaker(llmstream.CircuitBreaker(failures=1, cooldown=1.0, max_cooldown=5.0))
    now = 0.0
    breaker.failed(now)
    cooldowns = []
    for _ in range(5):
        assert breaker.reopens_at is not None
        cooldowns.append(breaker.reopens_at - now)
        now = breaker.reopens_at
        assert breaker.state(now) == "half_open" and breaker.admit(now)
        breaker.failed(now)  # the trial failed
    assert cooldowns == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert breaker.admit(now + 5.0)
    breaker.succeeded(now + 5.0)
    breaker.failed(now + 6.0)
    assert breaker.reopens_at == now + 7.0  # a success resets the doubling


def test_half_open_lets_one_trial_through_at_a_time() -> None:
    breaker = Breaker(llmstream.CircuitBreaker(failures=1, cooldown=1.0))
    breaker.failed(0.0)
    assert not breaker.admit(0.5)
    assert breaker.available(1.0) and breaker.admit(1.0)
    slot = breaker.trial
    assert slot is not None
    assert not breaker.available(1.0) and not breaker.admit(1.0)
    breaker.release_trial(slot)  # cancelled: no verdict
    assert breaker.admit(1.0)
    breaker.release_trial(slot)  # an old slot frees nothing
    assert not breaker.admit(1.0)
    breaker.succeeded(1.1)
    assert breaker.state(1.1) == "closed" and breaker.admit(1.1) and breaker.admit(1.1)


def test_health_probe_decides_only_a_half_open_circuit() -> None:
    breaker = Breaker(llmstream.CircuitBreaker(failures=1, cooldown=1.0))
    breaker.failed(0.0)
    breaker.probed(True, 0.5)
    assert breaker.state(0.5) == "open"
    breaker.probed(False, 1.0)
    assert breaker.state(1.0) == "open" and breaker.reopens_at == 3.0  # doubled
    breaker.probed(True, 3.0)
    assert breaker.state(3.0) == "closed"


def test_failed_health_probes_in_a_row_take_a_closed_endpoint_out() -> None:
    # A replica whose /health fails (engine dead, or being drained) is taken out even if
    # the calls it still answers succeed between the probes.
    breaker = Breaker(llmstream.CircuitBreaker(failures=3, cooldown=1.0))
    breaker.probed(False, 0.0)
    breaker.succeeded(0.1)
    breaker.probed(False, 1.0)
    assert breaker.state(1.0) == "closed"
    breaker.probed(False, 2.0)
    assert breaker.state(2.0) == "open" and breaker.reopens_at == 3.0
    healthy = Breaker(llmstream.CircuitBreaker(failures=2))
    for ok in (False, True, False, True):  # not in a row
        healthy.probed(ok, 0.0)
    assert healthy.state(0.0) == "closed"


def test_an_endpoint_out_for_failed_probes_is_tried_by_a_probe_before_any_call() -> None:
    # /health says it is down: after the cool-down, a probe decides while probes run;
    # a caller's call goes there only if no probe came within two probe intervals.
    config = llmstream.CircuitBreaker(failures=2, cooldown=1.0, probe_interval=0.1)
    breaker = Breaker(config)
    breaker.probed(False, 0.0)
    breaker.probed(False, 0.1)
    assert breaker.state(0.1) == "open" and breaker.reopens_at == 1.1
    assert breaker.state(1.15) == "half_open"
    assert not breaker.available(1.15) and not breaker.admit(1.15)  # the probe's turn
    breaker.probed(False, 1.2)  # still down: out again, for longer
    assert breaker.state(1.2) == "open" and breaker.reopens_at == 3.2
    assert breaker.available(3.2 + 0.25) and breaker.admit(3.2 + 0.25)  # no probe came
    # Out for failed calls instead: a trial call may go as soon as the cool-down ends.
    by_calls = Breaker(config)
    by_calls.failed(0.0)
    by_calls.failed(0.0)
    assert by_calls.available(1.0) and by_calls.admit(1.0)


def test_caller_faults_and_late_failures_do_not_open_the_circuit() -> None:
    state = _state(_fleet(1))
    (endpoint,) = state.endpoints
    for _ in range(5):
        with state.started(_pick(state), 0.0) as ticket:
            ticket.failed(0.0, counts=False)  # 400, 422: the request was wrong
    for _ in range(5):
        with state.started(_pick(state), 0.0) as ticket:
            ticket.first_token(0.1)
            ticket.failed(0.2, counts=True)  # broke mid-answer: the server was serving
    assert endpoint.breaker.state(1.0) == "closed" and endpoint.failures == 0


def test_a_fleet_endpoint_opens_then_recovers_through_one_trial() -> None:
    state = _state(_fleet(1, breaker=llmstream.CircuitBreaker(failures=2, cooldown=1.0)))
    (endpoint,) = state.endpoints
    _open(state, endpoint)
    assert state.choose(0.2) == pytest.approx(0.8)
    trial = _pick(state, 1.0)
    assert trial.trial
    ticket = state.started(trial, 1.0)
    assert ticket.trial
    assert state.choose(1.0) == pytest.approx(llmstream.CircuitBreaker().probe_interval)
    ticket.first_token(1.5)
    assert not _pick(state, 1.5).trial
    ticket.release()


def test_a_failed_trial_reopens_with_a_doubled_cooldown() -> None:
    state = _state(_fleet(1, breaker=llmstream.CircuitBreaker(failures=1, cooldown=1.0)))
    (endpoint,) = state.endpoints
    _open(state, endpoint)
    with state.started(_pick(state, 1.0), 1.0) as ticket:
        ticket.failed(1.0, counts=True)
    assert endpoint.breaker.reopens_at == 3.0


def test_a_cancelled_trial_frees_the_slot() -> None:
    state = _state(_fleet(1, breaker=llmstream.CircuitBreaker(failures=1, cooldown=1.0)))
    (endpoint,) = state.endpoints
    _open(state, endpoint)
    with state.started(_pick(state, 1.0), 1.0):
        assert isinstance(state.choose(1.0), float)
    assert _pick(state, 1.0).trial


def test_an_open_endpoint_is_never_picked_while_another_is_available() -> None:
    state = _state(_fleet(3))
    down = state.endpoints[1]
    _open(state, down)
    assert down.name not in _counts(state, 300, now=0.5)
    assert down.name not in _counts(state, 300, now=0.5, session="conv-1")


def test_when_every_endpoint_is_open_choose_says_when_the_first_reopens() -> None:
    state = _state(_fleet(2, breaker=llmstream.CircuitBreaker(failures=1, cooldown=2.0)))
    a, b = state.endpoints
    _open(state, a, now=0.0)
    _open(state, b, now=1.0)
    assert state.choose(1.5) == pytest.approx(0.5)


# -- in-flight accounting ----------------------------------------------------------------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(["start", "first_token", "fail", "fail_4xx", "succeed", "release"]),
        st.integers(0, 1000),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_in_flight_never_goes_negative_and_returns_to_zero(ops: list[tuple[str, int]]) -> None:
    state = _state(_fleet(3, breaker=llmstream.CircuitBreaker(failures=1, cooldown=0.5)))
    tickets: list[AttemptTicket] = []
    now = 0.0
    for op, n in ops:
        now += 0.1
        if op == "start":
            pick = state.choose(now, session=f"s{n % 3}")
            if isinstance(pick, Pick):
                tickets.append(state.started(pick, now))
            continue
        if not tickets:
            continue
        ticket = tickets[n % len(tickets)]
        if op == "first_token":
            ticket.first_token(now)
        elif op in ("fail", "fail_4xx"):
            ticket.failed(now, counts=op == "fail")
        elif op == "succeed":
            ticket.succeeded(now)
        else:
            ticket.release()  # perhaps again
        for endpoint in state.endpoints:
            open_tickets = [t for t in tickets if t.endpoint is endpoint and not t.released]
            assert endpoint.in_flight == len(open_tickets) >= 0
    for ticket in tickets:
        ticket.release()
    assert [e.in_flight for e in state.endpoints] == [0, 0, 0]
    # No trial slot leaked: once cooled down, every endpoint takes calls again.
    later = now + 3600.0
    assert all(e.breaker.available(later) for e in state.endpoints)


def test_double_release_is_harmless() -> None:
    state = _state(_fleet(1))
    (endpoint,) = state.endpoints
    first = state.started(_pick(state), 0.0)
    second = state.started(_pick(state), 0.0)
    first.release()
    first.release()
    assert endpoint.in_flight == 1
    with second:
        second.release()
    assert endpoint.in_flight == 0 and endpoint.calls == 2


def test_release_from_many_threads_counts_exactly() -> None:
    state = _state(_fleet(2))

    def work() -> None:
        for _ in range(500):
            ticket = state.started(_pick(state), 0.0)
            ticket.first_token(0.01)
            ticket.release()
            ticket.release()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [e.in_flight for e in state.endpoints] == [0, 0]
    assert sum(e.calls for e in state.endpoints) == 4000


# -- admission ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "report",
    [
        LoadReport(running=256, waiting=64, kv_cache=0.2),
        LoadReport(running=8, waiting=0, kv_cache=0.85),
    ],
    ids=["waiting", "kv"],
)
def test_a_saturated_endpoint_takes_no_calls(report: LoadReport) -> None:
    state = _state(_fleet(2))
    full, free = state.endpoints
    state.record_load(full, report, 0.0)
    state.record_load(free, LoadReport(running=1, waiting=0, kv_cache=0.1), 0.0)
    assert _counts(state, 100, now=0.2) == {free.name: 100}
    assert _counts(state, 20, now=0.2, session="conv-1") == {free.name: 20}


def test_when_all_are_saturated_choose_says_when_to_look_again() -> None:
    state = _state(_fleet(2, scrape_interval=1.0))
    a, b = state.endpoints
    state.record_load(a, LoadReport(running=0, waiting=100, kv_cache=0.1), 0.0)
    state.record_load(b, LoadReport(running=0, waiting=0, kv_cache=0.99), 0.5)
    assert state.choose(0.75) == pytest.approx(0.25)  # a's next read of /metrics


def test_a_call_told_to_wait_keeps_the_watcher_awake() -> None:
    # The watcher sleeps two intervals after the last call started; a call waiting for room
    # needs its next reads of /metrics, so each answer to wait counts as activity.
    state = _state(_fleet(2, scrape_interval=1.0))
    woken: list[float] = []
    state.on_wait = lambda: woken.append(state.last_call_at or -1.0)
    for endpoint in state.endpoints:
        state.record_load(endpoint, LoadReport(running=0, waiting=100, kv_cache=0.1), 0.0)
    assert isinstance(state.choose(0.5), float)
    assert isinstance(state.choose(3.5), float)
    assert state.last_call_at == 3.5 and woken == [0.5, 3.5]
    # Waiting cannot help (every endpoint tried): no call waits, the watcher may sleep.
    assert state.choose(4.0, tried=set(state.endpoints)) == math.inf
    assert state.last_call_at == 3.5 and len(woken) == 2


def test_metrics_that_stop_answering_count_as_saturated() -> None:
    state = _state(_fleet(2, scrape_interval=1.0, stale_after=5.0))
    a, b = state.endpoints
    state.record_load(a, LoadReport(running=0, waiting=0, kv_cache=0.0), 0.0)
    state.record_load(a, None, 4.0)
    assert a.name in _counts(state, 50, now=4.0)
    state.record_load(a, None, 6.0)
    assert _counts(state, 50, now=6.0) == {b.name: 50}
    assert not next(load for load in state.loads(6.0) if load.url == a.url).fresh
    state.record_load(a, LoadReport(running=0, waiting=0, kv_cache=0.0), 7.0)
    assert a.name in _counts(state, 50, now=7.0)


def test_old_metrics_of_an_idle_client_fall_back_to_in_flight() -> None:
    # Nobody reads /metrics while the client is idle: old figures are not a reason to refuse.
    state = _state(_fleet(1))
    (endpoint,) = state.endpoints
    state.record_load(endpoint, LoadReport(running=0, waiting=100, kv_cache=1.0), 0.0)
    assert isinstance(state.choose(1.0), float)
    assert _pick(state, 600.0).endpoint is endpoint


def test_an_endpoint_without_metrics_is_never_saturated() -> None:
    state = _state(_fleet(1, admission=llmstream.Admission(queue_limit=2)))
    tickets = [state.started(_pick(state), 0.0) for _ in range(10)]
    assert state.endpoints[0].in_flight == 10
    for ticket in tickets:
        ticket.release()


# -- tiers, tried, model -----------------------------------------------------------------------


def _tiered() -> FleetState:
    return _state(_fleet(2, fallback=[E("http://small:8000/v1", model=SMALL)]))


def test_fallback_only_after_the_primary_tier_is_exhausted() -> None:
    state = _tiered()
    a, b, small = state.endpoints
    assert small.name not in _counts(state, 200)
    assert _pick(state, tried={a, b}).endpoint is small
    _open(state, a)
    state.record_load(b, LoadReport(running=0, waiting=64, kv_cache=0.0), 0.0)
    assert _counts(state, 20, now=0.1) == {small.name: 20}
    assert _pick(state, 0.1).endpoint.model == SMALL


def test_every_endpoint_tried_means_waiting_cannot_help() -> None:
    state = _tiered()
    assert state.choose(0.0, tried=state.endpoints) == math.inf
    assert isinstance(state.choose(0.0, tried=()), Pick)  # a new round


def test_model_restricts_the_choice_to_that_model() -> None:
    state = _tiered()
    a, b, small = state.endpoints
    assert _counts(state, 50, model=SMALL) == {small.name: 50}
    assert state.choose(0.0, model=MODEL, tried={a, b}) == math.inf  # never the small model
    assert state.choose(0.0, model="other/model") == math.inf


# -- discovery ---------------------------------------------------------------------------------


def test_discovered_endpoints_join_and_drain() -> None:
    discovery = llmstream.DNSDiscovery("vllm.local", model=MODEL, api_key=KEY)
    state = _state(llmstream.Fleet(discovery=discovery))
    assert state.choose(0.0) == math.inf  # nothing resolved yet
    urls = [discovery.url_for(address) for address in ("10.0.0.1", "10.0.0.2")]
    state.replace_discovered(urls, 0.0)
    one, two = state.endpoints
    assert one.api_key is not None and one.api_key.get_secret() == KEY
    ticket = state.started(Pick(one, False), 0.0)
    state.replace_discovered([urls[1], discovery.url_for("10.0.0.3")], 1.0)
    assert state.endpoints[0] is two  # kept its state
    assert one.draining and one in state.endpoints
    assert one.name not in _counts(state, 100, now=1.0)
    ticket.release()
    assert one not in state.endpoints
    assert [e.name for e in state.endpoints] == ["10.0.0.2:8000", "10.0.0.3:8000"]
    state.replace_discovered([], 2.0)  # gone and idle: dropped at once
    assert state.endpoints == []


def test_a_discovered_endpoint_listed_too_is_not_doubled() -> None:
    discovery = llmstream.DNSDiscovery("vllm.local")
    state = _state(
        llmstream.Fleet([E("http://10.0.0.1:8000/v1")], model=MODEL, discovery=discovery)
    )
    state.replace_discovered(["http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1"], 0.0)
    assert [e.discovered for e in state.endpoints] == [False, True]


# -- hedging -----------------------------------------------------------------------------------


def test_hedges_stay_within_the_budget() -> None:
    state = _state(_fleet(2, hedging=llmstream.Hedging(delay=0.5, budget=0.05)))
    hedges = 0
    for i in range(1000):
        state.note_call(float(i))
        hedges += state.take_hedge(float(i))
    assert 59 <= hedges <= 61  # 5 %, plus the bucket's burst (0.05 * 200), full at the start
    assert state.calls == 1000 and state.last_call_at == 999.0


def test_a_request_waiting_long_for_its_first_token_makes_its_endpoint_look_slow() -> None:
    # The replica turned slow just now: its first slow answer is not in yet, but a request
    # that has waited there far longer than the others take already tells.
    state = _state(_fleet(3, routing=llmstream.Routing(choices=0)))
    a, b, slow = state.endpoints
    for endpoint in state.endpoints:
        with state.started(Pick(endpoint, False), 0.0) as ticket:
            ticket.first_token(0.05)
    streaming = [state.started(Pick(e, False), 10.0) for e in (a, b)]  # one call each...
    for ticket in streaming:
        ticket.first_token(10.01)  # ...answering
    waiting = state.started(Pick(slow, False), 10.0)
    assert slow.name in _counts(state, 90, now=10.02)  # 20 ms: nothing to tell yet
    assert slow.name not in _counts(state, 90, now=10.5)  # ten times the others' 50 ms
    waiting.first_token(10.5)
    assert slow.unanswered == set()
    for ticket in [*streaming, waiting]:
        ticket.release()


def test_no_hedges_without_hedging_or_budget() -> None:
    for fleet in (_fleet(2), _fleet(2, hedging=llmstream.Hedging(budget=0.0))):
        state = _state(fleet)
        for i in range(100):
            state.note_call(float(i))
        assert not any(state.take_hedge(100.0) for _ in range(10))


def test_hedge_delay_is_the_percentile_of_recent_first_token_times() -> None:
    state = _state(_fleet(1, hedging=llmstream.Hedging(percentile=0.95, min_delay=0.05)))
    (endpoint,) = state.endpoints
    for ms in range(1, 101):
        if ms == 20:
            assert state.hedge_delay(MODEL, 0.0) is None  # 19 samples: not enough
        with state.started(Pick(endpoint, False), 0.0) as ticket:
            ticket.first_token(ms / 1000)
    assert state.hedge_delay(MODEL, 0.0) == pytest.approx(0.095)
    assert state.hedge_delay("other/model", 0.0) is None
    with state.started(Pick(endpoint, False), 0.0) as ticket:
        ticket.first_token(0.0)
        ticket.first_token(5.0)  # once per attempt
    assert state.hedge_delay(MODEL, 0.0) == pytest.approx(0.095)


def test_a_degraded_endpoint_does_not_set_the_hedge_delay() -> None:
    # The delay is the median of each endpoint's own percentile: the slow replica that
    # hedging is for would otherwise push a pooled p95 up to its own first-token time.
    state = _state(_fleet(3, hedging=llmstream.Hedging(percentile=0.95, min_delay=0.01)))
    fast_a, fast_b, slow = state.endpoints
    for i in range(60):
        endpoint, ttft = [(fast_a, 0.020), (fast_b, 0.030), (slow, 1.0)][i % 3]
        with state.started(Pick(endpoint, False), 0.0) as ticket:
            ticket.first_token(ttft)
    assert state.hedge_delay(MODEL, 0.0) == pytest.approx(0.030)


def test_a_request_cut_without_a_first_token_makes_its_endpoint_look_slower() -> None:
    state = _state(_fleet(2, hedging=llmstream.Hedging(percentile=0.5)))
    slow, fast = state.endpoints
    for endpoint in (slow, fast):
        with state.started(Pick(endpoint, False), 0.0) as ticket:
            ticket.first_token(0.1)
    with state.started(Pick(slow, False), 1.0) as ticket:
        ticket.lost(3.0)  # two seconds without a first token, then cut
    assert slow.ttft_ewma is not None and slow.ttft_ewma > 0.6
    assert fast.ttft_ewma == pytest.approx(0.1)
    before = slow.ttft_ewma
    with state.started(Pick(slow, False), 10.0) as ticket:
        ticket.lost(10.05)  # cut sooner than it usually answers: says nothing
    assert slow.ttft_ewma == before
    assert slow.breaker.state(11.0) == "closed"  # losing a race is no failure
    for _ in range(18):
        with state.started(Pick(fast, False), 0.0) as ticket:
            ticket.first_token(0.1)
    # Only real first-token times are samples of the window (20 of them here, all 0.1).
    assert state.hedge_delay(MODEL, 0.0) == pytest.approx(0.1)


def _two_with_hedging() -> tuple[FleetState, EndpointState, EndpointState]:
    """Two endpoints, hedged after 0.1 s: the state and both endpoints."""
    state = _state(_fleet(2, hedging=llmstream.Hedging(delay=0.1)))
    first, second = state.endpoints
    return state, first, second


def _answered(state: FleetState, endpoint: EndpointState, sent: float, answered: float) -> None:
    with state.started(Pick(endpoint, False), sent) as ticket:
        ticket.first_token(answered)


def test_a_lost_race_shows_a_slow_endpoint_at_once_and_a_slow_request_a_little() -> None:
    state, slow, busy = _two_with_hedging()
    for endpoint in (slow, busy):
        with state.started(Pick(endpoint, False), 0.0) as ticket:
            ticket.first_token(0.05)
    # Nothing sent to `slow` since answered: its first-token time is now at least 0.15 s.
    with state.started(Pick(slow, False), 1.0) as ticket:
        ticket.lost(1.15)
    assert slow.ttft_ewma == pytest.approx(0.15)
    # On `busy`, a request sent later answered in 0.05 s: this one was slow on its own,
    # and its bound only moves the average.
    lost = state.started(Pick(busy, False), 1.0)
    _answered(state, busy, 1.01, 1.06)
    lost.lost(1.15)
    lost.release()
    assert busy.ttft_ewma == pytest.approx(0.05 + 0.3 * 0.1)


def test_requests_held_by_an_endpoint_that_turned_slow_are_hedged_with_its_oldest() -> None:
    # A replica turns slow: the requests it took since are each due a hedge only at their
    # own delay, though the oldest one's being overdue while later requests elsewhere
    # answered already says they will be late too.
    state, slow, fast = _two_with_hedging()
    oldest = state.started(Pick(slow, False), 0.0)
    younger = state.started(Pick(slow, False), 0.03)
    assert state.hedge_at(oldest, 0.1, 0.05) == pytest.approx(0.1)
    # Before the oldest is overdue: ask again when it is.
    assert state.hedge_at(younger, 0.1, 0.05) == pytest.approx(0.1)
    _answered(state, fast, 0.02, 0.07)  # sent after the oldest, answered
    assert state.hedge_at(younger, 0.1, 0.1) == 0.1  # due now, not at 0.13
    assert state.hedge_at(younger, 0.1, 0.11) == 0.11


def test_an_older_request_rescued_before_the_younger_asks_still_shows_the_slow_endpoint() -> None:
    # The oldest request's hedge wins and cuts it before the younger one's shell wakes to
    # ask (a thread scheduled late): it is gone from the endpoint, yet it was overdue
    # while the younger was there, so the younger is due at once, not at its own delay.
    state, slow, fast = _two_with_hedging()
    oldest = state.started(Pick(slow, False), 0.0)
    younger = state.started(Pick(slow, False), 0.03)
    _answered(state, fast, 0.1, 0.101)  # the oldest's hedge, answered
    oldest.lost(0.102)
    oldest.release()
    assert state.hedge_at(younger, 0.1, 0.11) == 0.11
    # A request sent after the rescue goes by the requests still there (the younger,
    # overdue at 0.13), not by the rescue.
    later = state.started(Pick(slow, False), 0.105)
    assert state.hedge_at(later, 0.1, 0.11) == pytest.approx(0.13)
    # Nor has one whose endpoint answered a request sent after the rescued one.
    _answered(state, slow, 0.04, 0.12)
    assert state.hedge_at(younger, 0.1, 0.12) == pytest.approx(0.13)


def test_an_endpoint_that_turns_slow_while_it_answers_is_seen_by_its_stuck_request() -> None:
    # The oldest request here was answered quickly, then the replica turned slow: the
    # first request stuck after the change is what shows it.
    state, slow, fast = _two_with_hedging()
    state.started(Pick(slow, False), 0.0)  # slow on its own: a request sent later answered
    _answered(state, slow, 0.005, 0.05)
    state.started(Pick(slow, False), 0.01)  # stuck since the change
    younger = state.started(Pick(slow, False), 0.03)
    _answered(state, fast, 0.02, 0.07)
    assert state.hedge_at(younger, 0.1, 0.11) == 0.11


def _routed_with_hedging() -> FleetState:
    """Two endpoints, hedged after 0.1 s, the lowest score always wins (no sampling)."""
    return _state(
        _fleet(2, routing=llmstream.Routing(choices=0), hedging=llmstream.Hedging(delay=0.1))
    )


def test_a_request_overtaken_by_its_hedge_keeps_its_endpoint_avoided_until_it_answers() -> None:
    # The cut leaves the slow endpoint with no request in flight, and its wait (the hedge
    # delay plus the hedge's first token) bounds its first-token time at only 1.5 times
    # the median. It is still waiting there, as far as anyone knows: new calls go to the
    # endpoint that answers, busier as it is, until the slow one answers a later request.
    state = _routed_with_hedging()
    slow, fast = state.endpoints
    for endpoint in (slow, fast):
        _answered(state, endpoint, 0.0, 0.05)
    busy = [state.started(Pick(fast, False), 1.0) for _ in range(3)]
    for ticket in busy:
        ticket.first_token(1.05)
    overtaken = state.started(Pick(slow, False), 1.0)
    _answered(state, fast, 1.1, 1.15)  # its hedge answered first
    overtaken.lost(1.15)
    overtaken.release()
    assert slow.in_flight == 0 and not slow.unanswered
    assert _counts(state, 20, 1.2) == {fast.name: 20}
    assert _counts(state, 20, 10.0) == {fast.name: 20}  # no news from it since
    _answered(state, slow, 10.0, 10.05)  # it answers a request sent after the cut one
    assert _counts(state, 20, 10.1) == {slow.name: 20}
    for ticket in busy:
        ticket.release()


def test_an_overtaken_request_is_forgotten_without_news_and_when_its_endpoint_recovers() -> None:
    state = _routed_with_hedging()
    slow, fast = state.endpoints
    for endpoint in (slow, fast):
        _answered(state, endpoint, 0.0, 0.05)
    with state.started(Pick(slow, False), 1.0) as overtaken:
        overtaken.lost(1.15)
    busy = state.started(Pick(fast, False), 1.0)
    busy.first_token(1.05)
    assert _counts(state, 20, 2.0) == {fast.name: 20}
    # Fades out as first-token times do (over 30 s): avoided, then back in the rotation.
    assert _counts(state, 20, 40.0) == {slow.name: 20}
    # A replica back from an outage is a new process: its overtaken requests say nothing.
    with state.started(Pick(slow, False), 41.0) as again:
        again.lost(41.15)
    assert slow.rescued
    slow.recovered()
    assert not slow.rescued
    busy.release()


def test_a_hedge_cut_because_its_request_answered_first_says_nothing_of_its_endpoint() -> None:
    state, first, second = _two_with_hedging()
    for endpoint in (first, second):
        _answered(state, endpoint, 0.0, 0.05)
    hedge = state.started(Pick(second, False), 1.1)
    younger = state.started(Pick(second, False), 1.11)
    hedge.lost(1.12, overtaken=False)  # the request it backed answered first
    hedge.release()
    assert not second.rescued and second.ttft_ewma == pytest.approx(0.05)
    # The younger request waits its own delay: nothing here was overdue.
    assert state.hedge_at(younger, 0.1, 1.13) == pytest.approx(1.21)


def test_an_endpoint_holding_a_late_request_gets_no_new_calls_until_it_answers() -> None:
    # Its hedge is due: the endpoint stalled as far as anyone can tell, whether or not the
    # budget let the hedge go. New calls go elsewhere, though that endpoint is busier.
    state = _routed_with_hedging()
    stalled, other = state.endpoints
    for endpoint in (stalled, other):
        _answered(state, endpoint, 0.0, 0.05)
    busy = [state.started(Pick(other, False), 1.0) for _ in range(3)]
    late = state.started(Pick(stalled, False), 1.0)
    assert _counts(state, 20, 1.1) == {stalled.name: 20}  # not late yet: the idler one
    late.late()
    assert _counts(state, 20, 1.1) == {other.name: 20}
    _answered(state, stalled, 1.05, 1.12)  # a request sent after the late one answers
    assert _counts(state, 20, 1.13) == {stalled.name: 20}
    for ticket in [*busy, late]:
        ticket.release()


def test_a_late_straggler_of_an_endpoint_that_answers_later_requests_does_not_stall_it() -> None:
    state = _routed_with_hedging()
    healthy, other = state.endpoints
    _answered(state, other, 0.0, 0.05)
    busy = [state.started(Pick(other, False), 1.0) for _ in range(3)]
    straggler = state.started(Pick(healthy, False), 1.0)
    _answered(state, healthy, 1.01, 1.06)  # sent after it, answered: the endpoint works
    straggler.late()
    assert _counts(state, 20, 1.11) == {healthy.name: 20}
    for ticket in [*busy, straggler]:
        ticket.release()


def test_a_whole_fleet_late_does_not_hedge_early() -> None:
    # No endpoint answered since the oldest request was sent: a stall of the client or
    # of every replica, which an early hedge would not beat.
    state, slow, fast = _two_with_hedging()
    _answered(state, fast, -0.05, -0.001)
    state.started(Pick(slow, False), 0.0)
    younger = state.started(Pick(slow, False), 0.03)
    assert state.hedge_at(younger, 0.1, 0.1) == pytest.approx(0.13)
    _answered(state, fast, -0.01, 0.1)  # and now one does
    assert state.hedge_at(younger, 0.1, 0.1) == 0.1


def test_one_slow_request_does_not_make_its_endpoint_look_slow() -> None:
    # A request sent later to the same endpoint answered: the oldest is slow on its own
    # (a long prompt), the endpoint is not.
    state, slow, fast = _two_with_hedging()
    state.started(Pick(slow, False), 0.0)
    younger = state.started(Pick(slow, False), 0.03)
    _answered(state, fast, 0.02, 0.07)
    _answered(state, slow, 0.01, 0.06)
    assert state.hedge_at(younger, 0.1, 0.1) == pytest.approx(0.13)


def test_an_older_request_that_answers_in_time_leaves_the_own_delay() -> None:
    state, slow, fast = _two_with_hedging()
    oldest = state.started(Pick(slow, False), 0.0)
    younger = state.started(Pick(slow, False), 0.03)
    assert state.hedge_at(younger, 0.1, 0.05) == pytest.approx(0.1)
    oldest.first_token(0.08)
    _answered(state, fast, 0.02, 0.07)
    assert state.hedge_at(younger, 0.1, 0.1) == pytest.approx(0.13)
    assert state.hedge_at(oldest, 0.1, 0.1) == pytest.approx(0.1)  # its own, answered or not


def test_a_burst_of_slow_calls_may_spend_a_window_of_the_hedge_budget_at_once() -> None:
    state = _state(_fleet(2, hedging=llmstream.Hedging(delay=0.5, budget=0.1, window=200)))
    for i in range(400):
        state.note_call(float(i))
    hedges = sum(state.take_hedge(400.0) for _ in range(50))
    assert hedges == 20  # 0.1 of a 200-call window


def test_hedge_delay_floor_fixed_and_off() -> None:
    state = _state(_fleet(1, hedging=llmstream.Hedging(min_delay=0.2)))
    (endpoint,) = state.endpoints
    for _ in range(30):
        with state.started(Pick(endpoint, False), 0.0) as ticket:
            ticket.first_token(0.01)
    assert state.hedge_delay(MODEL, 0.0) == 0.2
    assert _state(_fleet(1, hedging=llmstream.Hedging(delay=0.7))).hedge_delay(MODEL, 0.0) == 0.7
    assert _state(_fleet(1)).hedge_delay(MODEL, 0.0) is None


def test_loads_is_a_snapshot_of_each_endpoint() -> None:
    state = _state(_fleet(2))
    a, b = state.endpoints
    state.record_load(a, LoadReport(running=3, waiting=1, kv_cache=0.4), 0.0)
    ticket = state.started(Pick(b, False), 0.0)
    loads = state.loads(1.0)
    assert loads[0] == llmstream.EndpointLoad(
        name="gpu-0:8000",
        url="http://gpu-0:8000/v1",
        model=MODEL,
        in_flight=0,
        running=3,
        waiting=1,
        kv_cache=0.4,
        state="closed",
        fresh=True,
    )
    assert (loads[1].in_flight, loads[1].running, loads[1].fresh) == (1, None, False)
    ticket.release()
