"""A replica that was slow and recovered gets calls again (sans-IO, explicit clock)."""

from __future__ import annotations

import collections
import random

import llmstream
from llmstream._fleet_state import FleetState, Pick
from llmstream._vllm_metrics import LoadReport

MODEL = "Qwen/Qwen3-8B"


def test_a_replica_slow_ten_minutes_ago_takes_calls_again_once_all_report_idle() -> None:
    # Its first-token average is only updated by calls it serves: unless the penalty fades,
    # the slowness it showed once keeps it out for as long as the client lives (in
    # bench_fleet.py it once received none of the last 150 of 500 calls).
    endpoints = [llmstream.Endpoint(f"http://gpu-{i}:8000/v1") for i in range(3)]
    state = FleetState(llmstream.Fleet(endpoints, model=MODEL), rng=random.Random(0))
    fast_a, fast_b, slow = state.endpoints
    for endpoint, ttft in ((fast_a, 0.1), (fast_b, 0.1), (slow, 1.0)):
        with state.started(Pick(endpoint, False), 0.0) as ticket:
            ticket.first_token(ttft)
    later = 600.0
    idle = LoadReport(running=0.0, waiting=0.0, kv_cache=0.0)
    for endpoint in state.endpoints:
        state.record_load(endpoint, idle, later)
    chosen: collections.Counter[str] = collections.Counter()
    for _ in range(300):
        pick = state.choose(later)
        assert isinstance(pick, Pick)
        chosen[pick.endpoint.name] += 1
    assert chosen[slow.name] > 0, f"the recovered replica got no call in 300: {dict(chosen)}"
