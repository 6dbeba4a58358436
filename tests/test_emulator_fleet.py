"""The emulator as a fleet (llmstream.testing.FakeFleet): /metrics, sticky behaviours, death."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmstream.testing import FakeFleet, FakeReplica, FakeVLLM, Fault
from llmstream.testing._metrics import MetricsSnapshot, render_metrics

MODEL = "llmstream/fake-model"
CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Hi"}],
    "stream": True,
    "stream_options": {"include_usage": True},
}

# The families vLLM 0.33.0 registers in vllm/v1/metrics/loggers.py (PrometheusStatLogger),
# as prometheus_client names them on the wire: (name, type, help). Copied from that file.
VLLM_FAMILIES = [
    ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches."),
    ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed."),
    (
        "vllm:num_requests_waiting_by_reason",
        "gauge",
        "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for "
        "scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, "
        "KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",
    ),
    ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage."),
    ("vllm:num_preemptions_total", "counter", "Cumulative number of preemption from the engine."),
    ("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed."),
    ("vllm:generation_tokens_total", "counter", "Number of generation tokens processed."),
    ("vllm:request_success_total", "counter", "Count of successfully processed requests."),
]

# prometheus_client 0.26 (vLLM 0.33.0's) writing these families for a model named
# Qwen/Qwen3-"8B"\x (its label @M), _created values replaced by T: labels sorted, quotes
# and backslashes escaped, values as Go floats.
MODEL_LABEL = r'model_name="Qwen/Qwen3-\"8B\"\\x"'
REFERENCE_LINES = [
    "# HELP vllm:num_requests_running Number of requests in model execution batches.",
    "# TYPE vllm:num_requests_running gauge",
    'vllm:num_requests_running{engine="0",@M} 2.0',
    "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
    "# TYPE vllm:num_requests_waiting gauge",
    'vllm:num_requests_waiting{engine="0",@M} 3.0',
    (
        "# HELP vllm:num_requests_waiting_by_reason Number of waiting requests by reason. "
        "Reason labels: 'capacity' = waiting for scheduling capacity; 'deferred' = deferred "
        "by transient constraints (LoRA budget, KV transfer, blocked status). Sum of all "
        "reasons equals vllm:num_requests_waiting."
    ),
    "# TYPE vllm:num_requests_waiting_by_reason gauge",
    'vllm:num_requests_waiting_by_reason{engine="0",@M,reason="capacity"} 3.0',
    'vllm:num_requests_waiting_by_reason{engine="0",@M,reason="deferred"} 0.0',
    "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
    "# TYPE vllm:kv_cache_usage_perc gauge",
    'vllm:kv_cache_usage_perc{engine="0",@M} 0.0123',
    "# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.",
    "# TYPE vllm:num_preemptions_total counter",
    'vllm:num_preemptions_total{engine="0",@M} 0.0',
    "# HELP vllm:num_preemptions_created Cumulative number of preemption from the engine.",
    "# TYPE vllm:num_preemptions_created gauge",
    'vllm:num_preemptions_created{engine="0",@M} T',
    "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
    "# TYPE vllm:prompt_tokens_total counter",
    'vllm:prompt_tokens_total{engine="0",@M} 13.0',
    "# HELP vllm:prompt_tokens_created Number of prefill tokens processed.",
    "# TYPE vllm:prompt_tokens_created gauge",
    'vllm:prompt_tokens_created{engine="0",@M} T',
    "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
    "# TYPE vllm:generation_tokens_total counter",
    'vllm:generation_tokens_total{engine="0",@M} 40.0',
    "# HELP vllm:generation_tokens_created Number of generation tokens processed.",
    "# TYPE vllm:generation_tokens_created gauge",
    'vllm:generation_tokens_created{engine="0",@M} T',
    "# HELP vllm:request_success_total Count of successfully processed requests.",
    "# TYPE vllm:request_success_total counter",
    'vllm:request_success_total{engine="0",finished_reason="stop",@M} 4.0',
    'vllm:request_success_total{engine="0",finished_reason="length",@M} 0.0',
    'vllm:request_success_total{engine="0",finished_reason="abort",@M} 1.0',
    'vllm:request_success_total{engine="0",finished_reason="error",@M} 0.0',
    'vllm:request_success_total{engine="0",finished_reason="repetition",@M} 0.0',
    "# HELP vllm:request_success_created Count of successfully processed requests.",
    "# TYPE vllm:request_success_created gauge",
    'vllm:request_success_created{engine="0",finished_reason="stop",@M} T',
    'vllm:request_success_created{engine="0",finished_reason="length",@M} T',
    'vllm:request_success_created{engine="0",finished_reason="abort",@M} T',
    'vllm:request_success_created{engine="0",finished_reason="error",@M} T',
    'vllm:request_success_created{engine="0",finished_reason="repetition",@M} T',
]
REFERENCE = "".join(f"{line}\n" for line in REFERENCE_LINES).replace("@M", MODEL_LABEL)


def sample(text: str, name: str, **labels: str) -> float:
    """The one value of ``name`` whose labels include ``labels``, parsed as Prometheus does."""
    found = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    ]
    assert len(found) == 1, (name, labels, found)
    return float(found[0])


def load(text: str) -> tuple[float, float, float]:
    return (
        sample(text, "vllm:num_requests_running"),
        sample(text, "vllm:num_requests_waiting"),
        sample(text, "vllm:kv_cache_usage_perc"),
    )


def events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e]


@pytest.fixture
def fleet() -> Iterator[FakeFleet]:
    with FakeFleet(2, tokens=["A", "B", "C"]) as fleet:
        yield fleet


def root(replica: FakeReplica) -> httpx.Client:
    return httpx.Client(base_url=replica.root_url, timeout=5.0)


# --- /metrics ----------------------------------------------------------------------------


def test_render_matches_prometheus_client_bytes() -> None:
    snap = MetricsSnapshot(
        running=2,
        waiting=3,
        kv_cache=0.0123,
        prompt_tokens=13,
        generation_tokens=40,
        finished={"stop": 4, "abort": 1},
        created=1712345678.25,
    )
    text = render_metrics('Qwen/Qwen3-"8B"\\x', snap).decode()
    assert re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", text) == REFERENCE
    assert 'model_name="Qwen/Qwen3-\\"8B\\"\\\\x"} 1.71234567825e+09' in text


@pytest.mark.parametrize("via", ["transport", "socket"])
def test_metrics_is_vllms_prometheus_text(via: str) -> None:
    fake = FakeVLLM(tokens=["A", "B"], model="Qwen/Qwen3-8B")
    with fake.serve() as server:
        url = "http://vllm" if via == "transport" else server.base_url[:-3]
        transport = fake.transport() if via == "transport" else None
        with httpx.Client(base_url=url, transport=transport) as client:
            response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert response.headers["content-encoding"] == "gzip"  # httpx accepts it; so does vLLM
    text = response.text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    lines = text.splitlines()
    for name, kind, help in VLLM_FAMILIES:
        assert f"# HELP {name} {help}" in lines
        assert f"# TYPE {name} {kind}" in lines
        family = families[name.removesuffix("_total")]
        assert family.type == kind
        for s in family.samples:
            if s.name == name:
                assert s.labels["model_name"] == "Qwen/Qwen3-8B"
                assert s.labels["engine"] == "0"
    reasons = {
        s.labels["finished_reason"]
        for s in families["vllm:request_success"].samples
        if s.name == "vllm:request_success_total"
    }
    assert reasons == {"stop", "length", "abort", "error", "repetition"}
    assert load(text) == (0.0, 0.0, 0.0)


def test_metrics_without_gzip_and_with_trailing_slash() -> None:
    fake = FakeVLLM()
    with fake.serve() as server, httpx.Client(base_url=server.base_url[:-3]) as client:
        plain = client.get("/metrics/", headers={"accept-encoding": "identity"})
    assert "content-encoding" not in plain.headers
    assert plain.content.startswith(b"# HELP vllm:num_requests_running ")


def test_live_running_during_a_stream_then_counters_match_usage() -> None:
    fake = FakeVLLM(tokens=["A", "B", "C"], prompt_tokens=30, kv_cache_tokens=100)
    fake.add_fault(Fault.stall(after_chunks=2))
    with fake.serve() as server, httpx.Client(base_url=server.base_url[:-3]) as client:
        with client.stream("POST", "/v1/chat/completions", json=CHAT) as response:
            lines = response.iter_lines()
            assert [next(lines), next(lines), next(lines)][2].startswith('data: {"id"')
            # The role chunk and one token are out; the engine holds prompt + 1 token.
            assert load(client.get("/metrics").text) == (1.0, 0.0, 0.31)
            assert fake.running == 1
        fake.wait_for_load(running=0)  # the client left: vLLM aborts the request
        text = client.get("/metrics").text
        assert load(text) == (0.0, 0.0, 0.0)
        assert sample(text, "vllm:request_success_total", finished_reason="abort") == 1.0

        whole = client.post("/v1/chat/completions", json=CHAT)
        # Ended before the last byte left the server: no wait needed.
        text = client.get("/metrics").text
    usage = json.loads(events(whole.content)[-2][len(b"data: ") :])["usage"]
    assert load(text) == (0.0, 0.0, 0.0)
    assert sample(text, "vllm:request_success_total", finished_reason="stop") == 1.0
    assert sample(text, "vllm:prompt_tokens_total") == 2 * usage["prompt_tokens"]
    assert sample(text, "vllm:generation_tokens_total") == 1 + usage["completion_tokens"]


def test_length_and_inband_errors_are_labelled_like_vllm() -> None:
    fake = FakeVLLM(tokens=["A", "B", "C"])
    fake.add_fault(Fault.inband_error(after_chunks=2))
    with httpx.Client(transport=fake.transport(), base_url="http://vllm") as client:
        client.post("/v1/chat/completions", json=CHAT)
        short = {"model": MODEL, "messages": CHAT["messages"], "max_tokens": 1}
        assert (
            client.post("/v1/chat/completions", json=short).json()["choices"][0]["finish_reason"]
            == "length"
        )
        text = client.get("/metrics").text
    assert sample(text, "vllm:request_success_total", finished_reason="error") == 1.0
    assert sample(text, "vllm:request_success_total", finished_reason="length") == 1.0
    assert sample(text, "vllm:request_success_total", finished_reason="stop") == 0.0


@pytest.mark.anyio
async def test_live_running_async_in_process(anyio_backend: object) -> None:
    fake = FakeVLLM(tokens=["A", "B"], ttft=30.0)
    async with httpx.AsyncClient(transport=fake.transport(), base_url="http://vllm") as client:
        async with client.stream("POST", "/v1/chat/completions", json=CHAT) as response:
            assert response.status_code == 200
            await fake.await_load(running=1)
            assert load((await client.get("/metrics")).text)[0] == 1.0
        await fake.await_load(running=0)
        assert load((await client.get("/metrics")).text)[0] == 0.0


def test_overrides_then_live_again() -> None:
    fake = FakeVLLM()
    with httpx.Client(transport=fake.transport(), base_url="http://vllm") as client:
        fake.set_metrics(running=7, waiting=80, kv_cache=0.97)
        assert load(client.get("/metrics").text) == (7.0, 80.0, 0.97)
        fake.set_metrics(waiting=2)  # each call sets all three: running and kv live again
        assert load(client.get("/metrics").text) == (0.0, 2.0, 0.0)
        fake.set_metrics()
        assert load(client.get("/metrics").text) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="fraction"):
        fake.set_metrics(kv_cache=85)


@pytest.mark.parametrize("via", ["transport", "socket"])
def test_metrics_disabled_is_404(via: str) -> None:
    fake = FakeVLLM()
    fake.metrics_enabled = False
    with fake.serve() as server:
        url = "http://vllm" if via == "transport" else server.base_url[:-3]
        transport = fake.transport() if via == "transport" else None
        with httpx.Client(base_url=url, transport=transport) as client:
            off = client.get("/metrics")
            fake.metrics_enabled = True
            on = client.get("/metrics")
    assert (off.status_code, off.json()) == (404, {"detail": "Not Found"})
    assert on.status_code == 200


@pytest.mark.anyio
async def test_max_num_seqs_queues_before_ttft(anyio_backend: object) -> None:
    fake = FakeVLLM(tokens=["A", "B"], max_num_seqs=1)
    fake.add_fault(Fault.stall(after_chunks=1))  # the first request holds the only slot
    with fake.serve() as server:
        async with httpx.AsyncClient(base_url=server.base_url[:-3], timeout=5.0) as client:
            bodies: list[bytes] = []

            async def second() -> None:
                bodies.append((await client.post("/v1/chat/completions", json=CHAT)).content)

            async with anyio.create_task_group() as tg:
                async with client.stream("POST", "/v1/chat/completions", json=CHAT):
                    await fake.await_load(running=1)
                    tg.start_soon(second)
                    await fake.await_load(running=1, waiting=1)
                    assert load((await client.get("/metrics")).text)[:2] == (1.0, 1.0)
                    assert bodies == []
                # The first client left: the queued request gets the slot and its answer.
            assert bodies[0].endswith(b"data: [DONE]\n\n")
            assert (fake.running, fake.waiting) == (0, 0)


# --- sticky behaviours -------------------------------------------------------------------


def test_health_toggles(fleet: FakeFleet) -> None:
    replica = fleet[0]
    with root(replica) as client:
        assert client.get("/health").status_code == 200
        replica.unhealthy()
        sick = client.get("/health")
        assert (sick.status_code, sick.content) == (503, b"")
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        replica.healthy()
        assert client.get("/health").status_code == 200
    assert fleet[1].fake.healthy


def test_sticky_fault_until_cleared() -> None:
    fake = FakeVLLM(tokens=["A"])
    fake.fail_always(Fault.http_status(503))
    fake.add_fault(Fault.http_status(429))  # a queued fault comes first
    with httpx.Client(transport=fake.transport(), base_url="http://vllm") as client:
        statuses = [client.post("/v1/chat/completions", json=CHAT).status_code for _ in range(4)]
        assert client.get("/health").status_code == 200  # only chat requests fail
        fake.fail_always(None)
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        fake.fail_always(Fault.disconnect_before_headers())
        with pytest.raises(httpx.RemoteProtocolError):
            client.post("/v1/chat/completions", json=CHAT)
        fake.clear_faults()
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert statuses == [429, 503, 503, 503]
    assert fake.running == 0


def test_slow_ttft_applies_from_then_on(fleet: FakeFleet) -> None:
    fleet[1].slow(0.2)
    with root(fleet[1]) as client:
        with client.stream("POST", "/v1/chat/completions", json=CHAT) as response:
            started = time.perf_counter()
            next(response.iter_lines())
            ttft = time.perf_counter() - started
    assert ttft >= 0.2
    assert fleet[1].fake.config.ttft == 0.2
    assert fleet[0].fake.config.ttft == 0.0
    with pytest.raises(ValueError):
        fleet[1].slow(-1)


# --- the fleet ---------------------------------------------------------------------------


def test_fleet_of_count_or_of_fakes() -> None:
    with FakeFleet(3, text="Hi there", model="m") as fleet:
        assert len(fleet) == 3 and len(set(fleet.base_urls)) == 3
        assert all(r.is_up and r.base_url == f"http://127.0.0.1:{r.port}/v1" for r in fleet)
        with httpx.Client() as client:
            for url in fleet.base_urls:
                assert client.get(f"{url}/models").json()["data"][0]["id"] == "m"
        stopped = fleet[2].root_url
    assert not any(r.is_up for r in fleet)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{stopped}/health")
    own = [FakeVLLM("a"), FakeVLLM("b", ttft=0.01)]
    assert FakeFleet(own).fakes == own
    with pytest.raises(ValueError, match="at least 1"):
        FakeFleet(0)


def test_down_refuses_then_up_serves_on_the_same_port(fleet: FakeFleet) -> None:
    replica = fleet[0]
    port = replica.port
    with root(replica) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200  # pooled
        replica.down()
        replica.down()  # already down: nothing to do
        with pytest.raises(httpx.ConnectError):
            client.get("/health")
        assert fleet[1].fake.requests == []  # the other replica is untouched
        replica.up()
        assert replica.port == port
        # The same client (its pooled connection died with the server) is served again.
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert replica.chat_requests == 2
    assert fleet.chat_requests == [2, 0]


def test_a_shared_port_fleet_puts_each_replica_on_its_own_loopback_address() -> None:
    # As the pods behind a Kubernetes Service: one port, an address each.
    with FakeFleet(3, shared_port=True) as fleet:
        assert fleet.hosts == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        assert {replica.port for replica in fleet} == {fleet.port} and fleet.port != 0
        assert fleet[2].base_url == f"http://127.0.0.3:{fleet.port}/v1"
        for replica in fleet:
            assert httpx.post(replica.base_url + "/chat/completions", json=CHAT).status_code == 200
        assert fleet.chat_requests == [1, 1, 1]
        fleet[1].down()
        with pytest.raises(httpx.ConnectError):
            httpx.get(fleet[1].root_url + "/health")
        fleet[1].up()
        assert (fleet[1].host, fleet[1].port) == ("127.0.0.2", fleet.port)
        assert httpx.get(fleet[1].root_url + "/health").status_code == 200
    with pytest.raises(ValueError, match="shared_port=True"):
        _ = FakeFleet(2).port


def test_down_cuts_an_open_stream(fleet: FakeFleet) -> None:
    replica = fleet[0]
    replica.fake.add_fault(Fault.stall(after_chunks=2))
    with root(replica) as client:
        with client.stream("POST", "/v1/chat/completions", json=CHAT) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            replica.down()  # returns once the server thread is gone
            with pytest.raises(httpx.RemoteProtocolError):
                list(lines)
    assert replica.fake.running == 0
    assert replica.disconnects == []  # the server went, not the client


@pytest.mark.anyio
async def test_down_cuts_an_open_stream_async(anyio_backend: object) -> None:
    with FakeFleet(1, tokens=["A", "B"]) as fleet:
        replica = fleet[0]
        replica.fake.add_fault(Fault.stall(after_chunks=2))
        async with httpx.AsyncClient(base_url=replica.root_url) as client:
            async with client.stream("POST", "/v1/chat/completions", json=CHAT) as response:
                await replica.fake.await_load(running=1)
                await anyio.to_thread.run_sync(replica.down)
                with pytest.raises(httpx.RemoteProtocolError):
                    await response.aread()
            await anyio.to_thread.run_sync(replica.up)
            assert (await client.get("/health")).status_code == 200


def test_die_mid_stream_cuts_the_next_streams_only(fleet: FakeFleet) -> None:
    replica = fleet[1]
    replica.die_mid_stream(after_chunks=3, streams=2)
    with root(replica) as client:
        for _ in range(2):
            got: list[str] = []
            with client.stream("POST", "/v1/chat/completions", json=CHAT) as response:
                with pytest.raises(httpx.RemoteProtocolError):
                    got.extend(line for line in response.iter_lines() if line)
            assert len(got) == 3
        whole = client.post("/v1/chat/completions", json=CHAT)
    assert whole.content.endswith(b"data: [DONE]\n\n")
    assert replica.is_up and replica.chat_requests == 3


def test_testing_page_fleet_example_passes() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "testing.md").read_text("utf-8")
    blocks = [
        b for b in re.findall(r"^```python\n(.*?)^```", text, re.S | re.M) if "FakeFleet(" in b
    ]
    assert len(blocks) == 1
    namespace: dict[str, object] = {"__name__": "docs_testing_fleet_example"}
    exec(compile(blocks[0], "docs/testing.md", "exec"), namespace)
    test = namespace["test_ask_moves_on_from_dead_and_dying_replicas"]
    assert callable(test)
    test()
