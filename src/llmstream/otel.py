"""OpenTelemetry for llmstream: a span per call and the GenAI client metrics, as a hook.

Pass an :class:`OpenTelemetryHook` in ``hooks=`` and every call becomes a ``CLIENT`` span
named ``chat {model}``, with its retries, resumes, response headers and first token as
span events, and records the GenAI client metrics. It follows the OpenTelemetry semantic
conventions for generative AI (status: Development) of semantic-conventions **v1.41.0**
(:data:`SEMCONV_VERSION`): ``gen_ai.provider.name``, the four client histograms
``gen_ai.client.operation.duration``, ``gen_ai.client.token.usage``,
``gen_ai.client.operation.time_to_first_chunk`` and
``gen_ai.client.operation.time_per_output_chunk``, with the bucket boundaries the
conventions advise.

``OTEL_SEMCONV_STABILITY_OPT_IN``: the conventions ask instrumentations that emitted
v1.36.0 or earlier to keep doing so unless this comma-separated list holds
``gen_ai_latest_experimental``. This one is newer than v1.36.0 and always emits
``gen_ai.provider.name``; by default it also emits the v1.36.0 attribute it replaced,
``gen_ai.system`` (same value), so dashboards built on instrumentations that still emit
v1.36.0 by default (``opentelemetry-instrumentation-openai-v2``) match its spans and
metrics. With ``gen_ai_latest_experimental`` it emits the latest conventions only.

``gen_ai.provider.name`` is ``"vllm"`` by default: none of the conventions' well-known
values (``openai`` is OpenAI's service) names a vLLM server, and the conventions allow a
custom value then. Pass ``provider_name="openai"`` (or another) when the server is that
provider's.

How a call ends, on the span and on ``gen_ai.client.operation.duration``:

* complete, or ended by its token budget: status unset (the budget's end is in the
  ``llmstream.status`` attribute, ``"budget"``);
* stopped by the caller before its end (``break``, ``close()``, ``cancel()``, task
  cancellation, Ctrl-C): status ``ERROR`` with the description ``cancelled``, and
  ``error.type`` ``"cancelled"``, so dashboards can count or leave out abandoned streams;
* failed: status ``ERROR`` with the error's message, and ``error.type`` the HTTP status
  for an error status (``"503"``) or the error's class (``"llmstream.IdleTimeout"``).

No message content is recorded (prompts and answers stay out of telemetry). Token
counts are the server's usage; without it, output tokens are counted from the chunks
(vLLM sends one token per chunk) and input tokens only when the server counted them
(``/tokenize``) or a tokenizer you gave did, never from the local estimate. The time to
first chunk is ``result.metrics.time_to_first_token`` (from the call's first request);
the time per output chunk is recorded for every gap between output chunks when the call
ends (a uniform sample of 4,096 of them for longer answers).

Needs the ``otel`` extra (``pip install "llmstream-sdk[otel]"``: the OpenTelemetry API),
and an SDK (``opentelemetry-sdk``) or a distro to export anything.

Example::

    from llmstream.otel import OpenTelemetryHook

    client = llmstream.AsyncClient(hooks=[OpenTelemetryHook()])  # the global providers
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._errors import InvalidRequestError
from ._events import (
    CallEvent,
    CallFailed,
    CallFinished,
    FirstToken,
    RequestSent,
    ResponseHeaders,
    error_type,
)
from ._result import StreamResult
from ._retry import RetryEvent
from ._version import __version__

if TYPE_CHECKING:
    from opentelemetry.metrics import Histogram, MeterProvider
    from opentelemetry.trace import Span, TracerProvider
    from opentelemetry.util.types import AttributeValue

__all__ = ["SEMCONV_VERSION", "OpenTelemetryHook"]

SEMCONV_VERSION = "1.41.0"
"""The OpenTelemetry semantic conventions version followed (GenAI: Development status)."""

_SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
_OPT_IN = "OTEL_SEMCONV_STABILITY_OPT_IN"
_LATEST = "gen_ai_latest_experimental"

# The bucket boundaries the conventions advise.
_SECONDS_BUCKETS = tuple(0.01 * 2**i for i in range(14))  # 0.01, 0.02, 0.04 ... 81.92
_TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))  # 1, 4, 16 ... 67108864

# Request fields recorded on the span, when the body has them: (body field, attribute).
_REQUEST_ATTRIBUTES = (
    ("max_tokens", "gen_ai.request.max_tokens"),
    ("max_completion_tokens", "gen_ai.request.max_tokens"),
    ("temperature", "gen_ai.request.temperature"),
    ("top_p", "gen_ai.request.top_p"),
    ("top_k", "gen_ai.request.top_k"),
    ("frequency_penalty", "gen_ai.request.frequency_penalty"),
    ("presence_penalty", "gen_ai.request.presence_penalty"),
    ("seed", "gen_ai.request.seed"),
)

Attributes = dict[str, "AttributeValue"]


def latest_experimental(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``OTEL_SEMCONV_STABILITY_OPT_IN`` asks for the latest GenAI conventions only.

    Example::

        latest_experimental({"OTEL_SEMCONV_STABILITY_OPT_IN": "http,gen_ai_latest_experimental"})
    """
    values = environ.get(_OPT_IN, "")
    return _LATEST in {value.strip() for value in values.split(",")}


def _clock_offset_ns() -> int:
    """What turns a ``perf_counter()`` time into nanoseconds since the epoch (what spans take)."""
    return time.time_ns() - int(time.perf_counter() * 1e9)


@dataclass
class _Call:
    span: Span
    started: float
    attributes: Attributes  # what every metric of the call is recorded with
    offset_ns: int  # taken once per call, so its times keep their order

    def wall_ns(self, at: float) -> int:
        return int(at * 1e9) + self.offset_ns


class OpenTelemetryHook:
    """A hook that traces each call as a span and records the GenAI client metrics.

    ``tracer_provider`` and ``meter_provider`` default to the global ones
    (``opentelemetry.trace.set_tracer_provider``...); ``provider_name`` is the
    ``gen_ai.provider.name`` recorded (``"vllm"``). Safe to share between clients,
    threads and concurrent calls. See the module docstring for what is recorded.

    Example::

        from opentelemetry.sdk.trace import TracerProvider
        from llmstream.otel import OpenTelemetryHook

        hook = OpenTelemetryHook(tracer_provider=TracerProvider())
        async with llmstream.AsyncClient(hooks=[hook]) as client:
            await client.complete("Hi")
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        provider_name: str = "vllm",
    ) -> None:
        try:
            from opentelemetry import metrics, trace
        except ImportError as exc:
            raise InvalidRequestError(
                "OpenTelemetryHook needs the OpenTelemetry API, which is not installed: "
                f'pip install "llmstream-sdk[otel]" (and an SDK to export with). ({exc})'
            ) from exc
        self.provider_name = provider_name
        self.latest_only = latest_experimental()
        """True when ``OTEL_SEMCONV_STABILITY_OPT_IN`` holds ``gen_ai_latest_experimental``."""
        self._tracer = trace.get_tracer(
            "llmstream", __version__, tracer_provider, schema_url=_SCHEMA_URL
        )
        meter = metrics.get_meter("llmstream", __version__, meter_provider, _SCHEMA_URL)
        self._duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=_SECONDS_BUCKETS,
        )
        self._tokens = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
        )
        self._first_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk",
            unit="s",
            description="Time to receive the first chunk, from when the client issues the "
            "generation request.",
            explicit_bucket_boundaries_advisory=_SECONDS_BUCKETS,
        )
        self._per_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_per_output_chunk",
            unit="s",
            description="Time per output chunk, for each chunk received after the first one.",
            explicit_bucket_boundaries_advisory=_SECONDS_BUCKETS,
        )
        self._kind = trace.SpanKind.CLIENT
        self._cancelled = trace.Status(trace.StatusCode.ERROR, "cancelled")
        self._error = trace.StatusCode.ERROR
        self._status = trace.Status
        self._calls: dict[str, _Call] = {}
        self._lock = threading.Lock()  # around _calls: calls end on several threads

    def __call__(self, event: CallEvent) -> None:
        """Record one event of a call (the client calls this)."""
        call = self._calls.get(event.call.call_id)
        if call is None:
            call = self._start(event)
        span = call.span
        if isinstance(event, RequestSent):
            attributes: Attributes = {"llmstream.attempt": event.attempt}
            if event.hedge:
                attributes["llmstream.hedge"] = True
            span.add_event("llmstream.request", attributes, call.wall_ns(event.at))
        elif isinstance(event, ResponseHeaders):
            span.set_attribute("http.response.status_code", event.status)
            attributes = {"llmstream.attempt": event.attempt}
            attributes["http.response.status_code"] = event.status
            span.add_event("llmstream.response_headers", attributes, call.wall_ns(event.at))
        elif isinstance(event, FirstToken):
            attributes = {"llmstream.attempt": event.attempt}
            span.add_event("llmstream.first_token", attributes, call.wall_ns(event.at))
        elif isinstance(event, RetryEvent):
            attributes = {
                "llmstream.attempt": event.attempt,
                "llmstream.retry.delay": event.delay,
                "error.type": error_type(event.error),
            }
            span.add_event(f"llmstream.{event.kind}", attributes, call.wall_ns(event.at))
        elif isinstance(event, CallFinished | CallFailed):
            with self._lock:
                self._calls.pop(event.call.call_id, None)
            self._end(call, event)

    def _start(self, event: CallEvent) -> _Call:
        info = event.call
        attributes: Attributes = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": self.provider_name,
        }
        if not self.latest_only:
            attributes["gen_ai.system"] = self.provider_name  # v1.36.0's name for it
        if info.request_model is not None:
            attributes["gen_ai.request.model"] = info.request_model
        if info.server_address:
            attributes["server.address"] = info.server_address
            attributes["server.port"] = info.server_port
        span_attributes = dict(attributes)
        if isinstance(event, RequestSent):
            span_attributes.update(_request_attributes(event.body))
        name = f"chat {info.request_model}" if info.request_model else "chat"
        offset = _clock_offset_ns()
        span = self._tracer.start_span(
            name,
            kind=self._kind,
            attributes=span_attributes,
            start_time=int(event.at * 1e9) + offset,
        )
        call = _Call(span, event.at, attributes, offset)
        with self._lock:
            self._calls[info.call_id] = call
        return call

    def _end(self, call: _Call, event: CallFinished | CallFailed) -> None:
        span = call.span
        result = event.result
        attributes = call.attributes
        if result.model:
            attributes["gen_ai.response.model"] = result.model
        ended: Attributes = {"llmstream.status": result.status}
        if result.id:
            ended["gen_ai.response.id"] = result.id
        if event.finish_reasons:
            ended["gen_ai.response.finish_reasons"] = list(event.finish_reasons)
        if result.retries or result.resumes:
            ended["llmstream.retries"] = result.retries
            ended["llmstream.resumes"] = result.resumes
        tokens = _token_counts(result)
        if tokens[0] is not None:
            ended["gen_ai.usage.input_tokens"] = tokens[0]
        if tokens[1] is not None:
            ended["gen_ai.usage.output_tokens"] = tokens[1]
        failure: str | None = None
        if isinstance(event, CallFailed):
            failure = error_type(event.error)
            span.set_status(self._status(self._error, str(event.error)))
        elif event.status == "cancelled":
            failure = "cancelled"
            span.set_status(self._cancelled)
        if failure is not None:
            ended["error.type"] = failure
        span.set_attributes({**attributes, **ended})
        span.end(call.wall_ns(event.at))

        self._duration.record(
            event.at - call.started,
            {**attributes, "error.type": failure} if failure is not None else attributes,
        )
        self._record_tokens(tokens, attributes)
        if result.metrics.time_to_first_token is not None:
            self._first_chunk.record(result.metrics.time_to_first_token, attributes)
        record = self._per_chunk.record
        for gap in event.chunk_gaps:
            record(gap, attributes)

    def _record_tokens(self, tokens: tuple[int | None, int | None], attributes: Attributes) -> None:
        histogram: Histogram = self._tokens
        for kind, count in zip(("input", "output"), tokens, strict=True):
            if count is not None:
                histogram.record(count, {**attributes, "gen_ai.token.type": kind})


def _request_attributes(body: Mapping[str, object]) -> Attributes:
    attributes: Attributes = {}
    for field, name in _REQUEST_ATTRIBUTES:
        value = body.get(field)
        if isinstance(value, int | float) and not isinstance(value, bool):
            attributes[name] = value
    stop = body.get("stop")
    if isinstance(stop, str):
        attributes["gen_ai.request.stop_sequences"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        attributes["gen_ai.request.stop_sequences"] = [str(s) for s in stop]
    n = body.get("n")
    if isinstance(n, int) and n != 1:
        attributes["gen_ai.request.choice.count"] = n
    return attributes


def _token_counts(result: StreamResult) -> tuple[int | None, int | None]:
    """(input, output) tokens as the conventions allow: counted, never estimated."""
    usage = result.usage
    tokens = result.tokens
    if usage is not None and usage.prompt_tokens:
        prompt: int | None = usage.prompt_tokens
    elif tokens.prompt_source in ("server", "tokenizer"):
        prompt = tokens.prompt_tokens
    else:
        prompt = None
    if usage is not None:
        completion: int | None = usage.completion_tokens
    elif result.metrics.chunks:
        completion = tokens.completion_tokens  # one token per chunk, as vLLM sends them
    else:
        completion = None  # nothing arrived: nothing to count
    return prompt, completion
