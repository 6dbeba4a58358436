"""llmstream.otel: a span per call and the GenAI client metrics (semantic conventions v1.41.0).

Recorded with the OpenTelemetry SDK's in-memory span exporter and metric reader, on
providers of the test's own (never the global ones), both clients, real loopback sockets.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import llmstream
from llmstream.otel import OpenTelemetryHook
from llmstream.testing import FakeVLLM, Fault

from .drivers import MODES, collect

pytestmark = pytest.mark.anyio

MODEL = "llmstream/fake-model"
ANSWER = "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune."
ADVISED_SECONDS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12]
ADVISED_SECONDS += [10.24, 20.48, 40.96, 81.92]


@dataclass
class Telemetry:
    tracer_provider: TracerProvider
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader

    def hook(self, **kwargs: Any) -> OpenTelemetryHook:
        meter_provider = MeterProvider(metric_readers=[self.metrics])
        return OpenTelemetryHook(
            tracer_provider=self.tracer_provider, meter_provider=meter_provider, **kwargs
        )

    def span(self) -> ReadableSpan:
        [span] = self.spans.get_finished_spans()
        return span

    def points(self, name: str) -> list[HistogramDataPoint]:
        data = self.metrics.get_metrics_data()
        assert data is not None
        found: list[HistogramDataPoint] = []
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found += metric.data.data_points  # type: ignore[arg-type]
        return found


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    yield Telemetry(tracer_provider, spans, InMemoryMetricReader())
    tracer_provider.shutdown()


@pytest.mark.parametrize("mode", MODES)
async def test_a_call_is_a_client_span_with_the_genai_attributes(
    mode: str, telemetry: Telemetry
) -> None:
    hook = telemetry.hook()
    tracer = telemetry.tracer_provider.get_tracer("app")
    with FakeVLLM(ANSWER, prompt_tokens=12).serve() as server:
        if mode == "async":
            with tracer.start_as_current_span("handler"):
                outcome = await collect(
                    mode, base_url=server.base_url, client_kwargs={"hooks": [hook]}, max_tokens=64
                )
        else:

            def run() -> llmstream.StreamResult:
                with tracer.start_as_current_span("handler"):
                    with llmstream.Client(server.base_url, hooks=[hook]) as client:
                        return client.complete("Hi", max_tokens=64)

            outcome_result = await anyio.to_thread.run_sync(run)
    result = outcome.final if mode == "async" else outcome_result
    chat, handler = telemetry.spans.get_finished_spans()
    assert chat.name == f"chat {MODEL}" and chat.kind is SpanKind.CLIENT
    assert chat.parent is not None and chat.parent.span_id == handler.context.span_id
    assert chat.status.status_code is StatusCode.UNSET
    attributes = dict(chat.attributes or {})
    assert attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "vllm",
        "gen_ai.system": "vllm",
        "gen_ai.request.model": MODEL,
        "gen_ai.request.max_tokens": 64,
        "gen_ai.response.model": MODEL,
        "gen_ai.response.id": result.id,
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": result.tokens.completion_tokens,
        "server.address": "127.0.0.1",
        "server.port": server.port,
        "http.response.status_code": 200,
        "llmstream.status": "complete",
    }
    events = [e.name for e in chat.events]
    assert events == ["llmstream.request", "llmstream.response_headers", "llmstream.first_token"]
    assert chat.start_time is not None and chat.end_time is not None
    assert chat.start_time <= chat.events[0].timestamp <= chat.events[-1].timestamp < chat.end_time


@pytest.mark.parametrize("mode", MODES)
async def test_the_genai_client_metrics_are_recorded(mode: str, telemetry: Telemetry) -> None:
    hook = telemetry.hook()
    with FakeVLLM(ANSWER, prompt_tokens=12).serve() as server:
        outcome = await collect(mode, base_url=server.base_url, client_kwargs={"hooks": [hook]})
    result = outcome.final
    base = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "vllm",
        "gen_ai.system": "vllm",
        "gen_ai.request.model": MODEL,
        "gen_ai.response.model": MODEL,
        "server.address": "127.0.0.1",
        "server.port": server.port,
    }
    [duration] = telemetry.points("gen_ai.client.operation.duration")
    assert dict(duration.attributes or {}) == base and duration.count == 1
    assert list(duration.explicit_bounds) == pytest.approx(ADVISED_SECONDS)
    assert 0 < duration.sum < 10
    tokens = {
        dict(p.attributes or {})["gen_ai.token.type"]: p
        for p in telemetry.points("gen_ai.client.token.usage")
    }
    assert tokens["input"].sum == 12
    assert tokens["output"].sum == result.tokens.completion_tokens
    assert list(tokens["input"].explicit_bounds)[:3] == [1, 4, 16]
    [first] = telemetry.points("gen_ai.client.operation.time_to_first_chunk")
    assert first.count == 1
    assert first.sum == pytest.approx(result.metrics.time_to_first_token)
    [per_chunk] = telemetry.points("gen_ai.client.operation.time_per_output_chunk")
    itl = result.metrics.inter_token_latency
    assert itl is not None and per_chunk.count == itl.count
    assert dict(per_chunk.attributes or {}) == base


@pytest.mark.parametrize("mode", MODES)
async def test_a_stream_stopped_early_is_a_cancelled_span(mode: str, telemetry: Telemetry) -> None:
    hook = telemetry.hook()
    with FakeVLLM(tokens=["w "] * 500, token_delay=0.005).serve() as server:
        outcome = await collect(
            mode,
            base_url=server.base_url,
            client_kwargs={"hooks": [hook]},
            on_piece=lambda snapshot: len(snapshot.text) >= 4,  # then break
        )
    assert outcome.final.status == "cancelled"
    span = telemetry.span()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "cancelled"
    attributes = dict(span.attributes or {})
    assert attributes["error.type"] == "cancelled" and attributes["llmstream.status"] == "cancelled"
    [duration] = telemetry.points("gen_ai.client.operation.duration")
    assert dict(duration.attributes or {})["error.type"] == "cancelled"


@pytest.mark.parametrize("mode", MODES)
async def test_a_failed_call_records_its_error_type(mode: str, telemetry: Telemetry) -> None:
    hook = telemetry.hook()
    fake = FakeVLLM(ANSWER)
    for _ in range(3):
        fake.add_fault(Fault.http_status(503))
    retry = llmstream.RetryPolicy(max_retries=2, initial_backoff=0.001, max_backoff=0.01)
    with fake.serve() as server:
        outcome = await collect(
            mode, base_url=server.base_url, client_kwargs={"hooks": [hook]}, retry=retry
        )
    assert isinstance(outcome.error, llmstream.InternalServerError)
    span = telemetry.span()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == str(outcome.error)
    attributes = dict(span.attributes or {})
    assert attributes["error.type"] == "503"
    assert attributes["http.response.status_code"] == 503
    assert "gen_ai.usage.output_tokens" not in attributes  # nothing arrived, nothing counted
    retries = [e for e in span.events if e.name == "llmstream.retry"]
    assert [dict(e.attributes or {})["llmstream.attempt"] for e in retries] == [2, 3]
    [duration] = telemetry.points("gen_ai.client.operation.duration")
    assert dict(duration.attributes or {})["error.type"] == "503"
    assert telemetry.points("gen_ai.client.operation.time_to_first_chunk") == []


@pytest.mark.parametrize("mode", MODES)
async def test_a_resume_is_a_span_event_and_a_timeout_an_error_type(
    mode: str, telemetry: Telemetry
) -> None:
    hook = telemetry.hook()
    fake = FakeVLLM(ANSWER)
    fake.add_fault(Fault.disconnect(after_chunks=4))
    fake.add_fault(Fault.stall(after_chunks=2))
    policy = llmstream.RetryPolicy(max_retries=0, resume=True, max_resumes=1)
    with fake.serve() as server:
        outcome = await collect(
            mode,
            base_url=server.base_url,
            client_kwargs={"hooks": [hook]},
            retry=policy,
            timeout=llmstream.Timeouts(idle=0.3),
        )
    assert isinstance(outcome.error, llmstream.IdleTimeout)
    span = telemetry.span()
    assert [e.name for e in span.events].count("llmstream.resume") == 1
    attributes = dict(span.attributes or {})
    assert attributes["error.type"] == "llmstream.IdleTimeout"
    assert attributes["llmstream.resumes"] == 1
    assert attributes["gen_ai.usage.output_tokens"] > 0


async def test_the_latest_conventions_only_when_opted_in(
    telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "http, gen_ai_latest_experimental")
    hook = telemetry.hook(provider_name="openai")
    assert hook.latest_only
    with FakeVLLM(ANSWER).serve() as server:
        async with llmstream.AsyncClient(server.base_url, hooks=[hook]) as client:
            await client.complete("Hi")
    attributes = dict(telemetry.span().attributes or {})
    assert attributes["gen_ai.provider.name"] == "openai"
    assert "gen_ai.system" not in attributes
    [duration] = telemetry.points("gen_ai.client.operation.duration")
    assert "gen_ai.system" not in dict(duration.attributes or {})


def test_without_opentelemetry_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(llmstream.InvalidRequestError, match=r"llmstream-sdk\[otel\]"):
        OpenTelemetryHook()


def test_importing_llmstream_or_its_otel_module_imports_no_opentelemetry() -> None:
    code = (
        "import sys, llmstream, llmstream.otel\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
