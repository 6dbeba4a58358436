"""llmstream.prometheus: histograms and counters per model and endpoint, on a private registry.

Both clients, real loopback sockets; every value is read back from the registry.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import llmstream
from llmstream.prometheus import PrometheusHook
from llmstream.testing import FakeVLLM, Fault

from .drivers import MODES, collect

pytestmark = pytest.mark.anyio

MODEL = "llmstream/fake-model"
ANSWER = "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune."


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.mark.parametrize("mode", MODES)
async def test_a_complete_call_is_counted_and_timed(mode: str) -> None:
    registry = CollectorRegistry()
    hook = PrometheusHook(registry=registry)
    in_progress: list[float] = []
    # Tokens 10 ms apart: the call is still going when the first piece is read.
    with FakeVLLM(ANSWER, prompt_tokens=12, token_delay=0.01).serve() as server:
        call = {"model": MODEL, "endpoint": server.base_url}

        def during(snapshot: llmstream.StreamResult) -> bool:
            in_progress.append(_value(registry, "llmstream_calls_in_progress", **call))
            return False

        outcome = await collect(
            mode,
            base_url=server.base_url,
            client_kwargs={"hooks": [hook], "model": MODEL},
            on_piece=during,
        )
    result = outcome.final
    assert in_progress[0] == 1 and _value(registry, "llmstream_calls_in_progress", **call) == 0
    ended = {**call, "status": "complete", "finish_reason": "stop"}
    assert _value(registry, "llmstream_calls_total", **ended) == 1
    assert _value(registry, "llmstream_call_duration_seconds_count", **call, status="complete") == 1
    assert _value(registry, "llmstream_time_to_first_token_seconds_count", **call) == 1
    assert _value(registry, "llmstream_time_to_first_token_seconds_sum", **call) == pytest.approx(
        result.metrics.time_to_first_token
    )
    itl = result.metrics.inter_token_latency
    assert itl is not None
    assert _value(registry, "llmstream_inter_token_latency_seconds_count", **call) == itl.count
    assert _value(registry, "llmstream_call_tokens_sum", **call, type="prompt") == 12
    completion = result.tokens.completion_tokens
    assert _value(registry, "llmstream_call_tokens_sum", **call, type="completion") == completion
    assert _value(registry, "llmstream_retries_total", **call, kind="retry") == 0


@pytest.mark.parametrize("mode", MODES)
async def test_a_stream_stopped_early_is_counted_cancelled(mode: str) -> None:
    registry = CollectorRegistry()
    with FakeVLLM(tokens=["w "] * 500, token_delay=0.005).serve() as server:
        await collect(
            mode,
            base_url=server.base_url,
            client_kwargs={"hooks": [PrometheusHook(registry=registry)], "model": MODEL},
            on_piece=lambda snapshot: len(snapshot.text) >= 4,
        )
        call = {"model": MODEL, "endpoint": server.base_url}
    ended = {**call, "status": "cancelled", "finish_reason": ""}
    assert _value(registry, "llmstream_calls_total", **ended) == 1
    duration = "llmstream_call_duration_seconds_count"
    assert _value(registry, duration, **call, status="cancelled") == 1
    assert _value(registry, "llmstream_calls_in_progress", **call) == 0


@pytest.mark.parametrize("mode", MODES)
async def test_retries_resumes_and_errors_are_counted(mode: str) -> None:
    registry = CollectorRegistry()
    fake = FakeVLLM(ANSWER)
    fake.add_fault(Fault.http_status(503))
    fake.add_fault(Fault.disconnect(after_chunks=4))
    policy = llmstream.RetryPolicy(max_retries=1, initial_backoff=0.001, resume=True)
    with fake.serve() as server:
        kwargs = {"hooks": [PrometheusHook(registry=registry)], "model": MODEL}
        first = await collect(mode, base_url=server.base_url, client_kwargs=kwargs, retry=policy)
        for _ in range(2):
            fake.add_fault(Fault.http_status(502))
        second = await collect(mode, base_url=server.base_url, client_kwargs=kwargs, retry=policy)
        call = {"model": MODEL, "endpoint": server.base_url}
    assert first.error is None and isinstance(second.error, llmstream.APIStatusError)
    assert _value(registry, "llmstream_retries_total", **call, kind="retry") == 2
    assert _value(registry, "llmstream_retries_total", **call, kind="resume") == 1
    assert _value(registry, "llmstream_call_errors_total", **call, error="502") == 1
    failed = {**call, "status": "error", "finish_reason": ""}
    assert _value(registry, "llmstream_calls_total", **failed) == 1
    complete = {**call, "status": "complete", "finish_reason": "stop"}
    assert _value(registry, "llmstream_calls_total", **complete) == 1
    assert _value(registry, "llmstream_calls_in_progress", **call) == 0


async def test_no_credential_reaches_a_label() -> None:
    registry = CollectorRegistry()
    secret = "sk-prometheus-secret-42"
    with FakeVLLM(ANSWER, api_key=secret).serve() as server:
        async with llmstream.AsyncClient(
            server.base_url, api_key=secret, hooks=[PrometheusHook(registry=registry)]
        ) as client:
            await client.complete("Hi")
            await client.complete("Hi", extra_headers={"Authorization": f"Bearer {secret}"})
            with pytest.raises(llmstream.AuthenticationError):
                await client.complete("Hi", extra_headers={"Authorization": "Bearer wrong"})
    exposition = generate_latest(registry).decode()
    assert secret not in exposition
    assert f'endpoint="{server.base_url}"' in exposition and 'error="401"' in exposition


def test_one_hook_per_registry() -> None:
    registry = CollectorRegistry()
    PrometheusHook(registry=registry)
    with pytest.raises(llmstream.InvalidRequestError, match="one hook per registry"):
        PrometheusHook(registry=registry)
    PrometheusHook(registry=registry, namespace="other")  # another namespace is fine


def test_without_prometheus_client_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(llmstream.InvalidRequestError, match=r"llmstream-sdk\[prometheus\]"):
        PrometheusHook()


def test_importing_llmstream_or_its_prometheus_module_imports_no_prometheus_client() -> None:
    code = (
        "import sys, llmstream, llmstream.prometheus\n"
        "assert not [m for m in sys.modules if m.startswith('prometheus_client')], 'imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
