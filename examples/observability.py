"""Watch every call: a hook of your own, OpenTelemetry spans and metrics, Prometheus metrics.

Shows: ``AsyncClient(hooks=[...])`` with a plain function that logs each call's steps
(``match`` on the events, ``event.call.call_id`` to follow concurrent calls), an ``async``
hook, ``llmstream.otel.OpenTelemetryHook`` on an SDK tracer and meter provider of its own,
``llmstream.prometheus.PrometheusHook`` on a private registry, and what each records for a
call that is retried, one that completes, and one the caller stops early.

Needs the extras: ``pip install "llmstream-sdk[otel,prometheus]" opentelemetry-sdk``.
Against the built-in emulator a 503 is queued so the first call is retried. Run it:

    python examples/observability.py
    LLMSTREAM_BASE_URL=http://localhost:8000/v1 python examples/observability.py
"""

from __future__ import annotations

import asyncio
import os

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest

import llmstream
from llmstream.otel import OpenTelemetryHook
from llmstream.prometheus import PrometheusHook
from llmstream.testing import FakeVLLM, Fault

PROMPT = "List the planets of the solar system, in order."
FAKE_ANSWER = "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune."
NAMES: dict[str, str] = {}  # call id -> a short name for the log


def log_steps(event: llmstream.CallEvent) -> None:
    """A plain hook: one line per step of each call (it runs inline: keep it quick)."""
    name = NAMES.setdefault(event.call.call_id, f"call {len(NAMES) + 1}")
    match event:
        case llmstream.RequestSent(attempt=attempt):
            print(f"  [{name}] request {attempt} to {event.call.server_address}")
        case llmstream.ResponseHeaders(status=status):
            print(f"  [{name}] HTTP {status}")
        case llmstream.RetryEvent(kind=kind, error=error):
            print(f"  [{name}] {kind} after {type(error).__name__}")
        case llmstream.CallFinished(status=status, result=result):
            tokens = result.tokens.completion_tokens
            print(f"  [{name}] finished: {status}, {tokens} tokens, retries={result.retries}")
        case llmstream.CallFailed(error=error):
            print(f"  [{name}] failed: {type(error).__name__}")
        case _:
            pass  # the first token, and kinds of events added later


FIRST_TOKENS: asyncio.Queue[float] = asyncio.Queue()


async def queue_first_tokens(event: llmstream.CallEvent) -> None:
    """An async hook: awaited in order before the stream goes on (bounded to 5 s)."""
    if isinstance(event, llmstream.FirstToken):
        await FIRST_TOKENS.put(event.at)


async def main() -> None:
    base_url = os.environ.get("LLMSTREAM_BASE_URL")
    fake = None if base_url else FakeVLLM(FAKE_ANSWER, token_delay=0.005)
    if fake is not None:
        fake.add_fault(Fault.http_status(503))  # the first request is refused once

    # OpenTelemetry: providers of this program's own; in an app, the global ones (the
    # default) with an OTLP exporter.
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    metrics = InMemoryMetricReader()
    otel = OpenTelemetryHook(
        tracer_provider=tracer_provider, meter_provider=MeterProvider(metric_readers=[metrics])
    )
    registry = CollectorRegistry()  # in an app: the default one, served to Prometheus
    prometheus = PrometheusHook(registry=registry)

    retry = llmstream.RetryPolicy(initial_backoff=0.01, max_backoff=0.05)
    async with llmstream.AsyncClient(
        base_url,
        transport=fake.transport() if fake else None,
        retry=retry,
        hooks=[log_steps, queue_first_tokens, otel, prometheus],
    ) as client:
        print("1. a call retried once, then complete:")
        result = await client.complete(PROMPT, max_tokens=100)
        print(f"  answer: {result.text}")

        print("2. a call the caller stops after a few words:")
        async with client.stream(PROMPT, max_tokens=100) as stream:
            seen = ""
            async for text in stream:
                seen += text
                if len(seen) > 12:
                    break  # the stream ends "cancelled": never counted as a success
        print(f"  kept: {stream.result.text!r}")

    print(f"first tokens queued by the async hook: {FIRST_TOKENS.qsize()}")
    print("OpenTelemetry spans:")
    for span in spans.get_finished_spans():
        attributes = span.attributes or {}
        events = ", ".join(e.name.removeprefix("llmstream.") for e in span.events)
        print(f"  {span.name}: {span.status.status_code.name}, error.type=", end="")
        print(f"{attributes.get('error.type', '-')}, events: {events}")
    data = metrics.get_metrics_data()
    names = sorted(
        {m.name for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics}
        if data is not None
        else set()
    )
    print("OpenTelemetry metrics:", ", ".join(names))
    print("Prometheus (calls_total):")
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("llmstream_calls_total"):
            print(" ", line)


if __name__ == "__main__":
    asyncio.run(main())
