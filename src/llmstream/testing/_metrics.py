"""``GET /metrics`` as vLLM 0.33.0 writes it: Prometheus text exposition, no I/O.

vLLM registers its metrics in ``vllm/v1/metrics/loggers.py`` (``PrometheusStatLogger``)
with ``prometheus_client`` and serves them with ``make_asgi_app``. The names, types, help
texts and labels (``model_name``, ``engine``, and ``finished_reason`` or ``reason``)
below are copied from there; the layout is ``prometheus_client`` 0.26's text format
0.0.4: labels sorted by name, values as Go prints floats, a ``_created`` gauge after
each counter, gzip when the client accepts it. Only the scheduler gauges and a few
counters are emulated; the histograms are left out.

>>> snap = MetricsSnapshot(running=2, waiting=0, kv_cache=0.5)
>>> text = render_metrics("m", snap).decode()
>>> 'vllm:num_requests_running{engine="0",model_name="m"} 2.0' in text.splitlines()
True
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from ._script import Action, Head, Send

__all__ = [
    "CONTENT_TYPE",
    "FINISH_REASONS",
    "MetricsSnapshot",
    "format_value",
    "metrics_response",
    "render_metrics",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# vllm.v1.engine.FINISH_REASON_STRINGS, in the order vLLM registers the series.
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


@dataclass(frozen=True)
class MetricsSnapshot:
    """The values one ``/metrics`` answer reports.

    ``created`` is the ``time.time()`` the counters started at (their ``_created``).

    >>> MetricsSnapshot(running=1, waiting=0, kv_cache=0.0).finished
    {}
    """

    running: float
    waiting: float
    kv_cache: float
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: Mapping[str, int] = field(default_factory=dict)
    created: float = 0.0


def format_value(value: float) -> str:
    """A sample value as ``prometheus_client`` writes it (Go's float formatting).

    >>> format_value(2), format_value(0.25), format_value(1712345678.5)
    ('2.0', '0.25', '1.7123456785e+09')
    """
    value = float(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    # Go switches to an exponent sooner than Python does.
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class _Writer:
    def __init__(self, model: str) -> None:
        self.lines: list[str] = []
        self.base = {"model_name": model, "engine": "0"}

    def family(
        self, name: str, kind: str, help: str, samples: list[tuple[dict[str, str], float]]
    ) -> None:
        self.lines.append(f"# HELP {name} {help}")
        self.lines.append(f"# TYPE {name} {kind}")
        for extra, value in samples:
            labels = {**self.base, **extra}
            text = ",".join(f'{k}="{_escape(labels[k])}"' for k in sorted(labels))
            self.lines.append(f"{name}{{{text}}} {format_value(value)}")

    def gauge(self, name: str, help: str, value: float) -> None:
        self.family(name, "gauge", help, [({}, value)])

    def counter(
        self, name: str, help: str, samples: list[tuple[dict[str, str], float]], created: float
    ) -> None:
        self.family(f"{name}_total", "counter", help, samples)
        self.family(f"{name}_created", "gauge", help, [(extra, created) for extra, _ in samples])


def render_metrics(model: str, snap: MetricsSnapshot) -> bytes:
    """The ``/metrics`` body for one engine serving ``model``.

    >>> body = render_metrics("m", MetricsSnapshot(running=0, waiting=3, kv_cache=0.0))
    >>> body.decode().splitlines()[:3]  # doctest: +NORMALIZE_WHITESPACE
    ['# HELP vllm:num_requests_running Number of requests in model execution batches.',
     '# TYPE vllm:num_requests_running gauge',
     'vllm:num_requests_running{engine="0",model_name="m"} 0.0']
    """
    out = _Writer(model)
    out.gauge(
        "vllm:num_requests_running", "Number of requests in model execution batches.", snap.running
    )
    out.gauge(
        "vllm:num_requests_waiting", "Number of requests waiting to be processed.", snap.waiting
    )
    out.family(
        "vllm:num_requests_waiting_by_reason",
        "gauge",
        "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for "
        "scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, "
        "KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",
        [({"reason": "capacity"}, snap.waiting), ({"reason": "deferred"}, 0.0)],
    )
    out.gauge(
        "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", snap.kv_cache
    )
    out.counter(
        "vllm:num_preemptions",
        "Cumulative number of preemption from the engine.",
        [({}, 0.0)],
        snap.created,
    )
    out.counter(
        "vllm:prompt_tokens",
        "Number of prefill tokens processed.",
        [({}, snap.prompt_tokens)],
        snap.created,
    )
    out.counter(
        "vllm:generation_tokens",
        "Number of generation tokens processed.",
        [({}, snap.generation_tokens)],
        snap.created,
    )
    out.counter(
        "vllm:request_success",
        "Count of successfully processed requests.",
        [({"finished_reason": r}, snap.finished.get(r, 0)) for r in FINISH_REASONS],
        snap.created,
    )
    return ("\n".join(out.lines) + "\n").encode()


def metrics_response(body: bytes, accept_encoding: str) -> list[Action]:
    """The actions answering ``GET /metrics`` with ``body``, gzipped when accepted.

    >>> head = metrics_response(b"x 1.0\\n", "gzip, deflate")[0]
    >>> dict(head.headers)["content-encoding"]
    'gzip'
    """
    headers = [("content-type", CONTENT_TYPE)]
    # prometheus_client compresses whenever the client takes gzip (httpx says it does).
    if any(part.split(";")[0].strip().lower() == "gzip" for part in accept_encoding.split(",")):
        body = gzip.compress(body)
        headers.append(("content-encoding", "gzip"))
    # make_asgi_app sends no content-length, so uvicorn frames the body as one chunk.
    headers.append(("transfer-encoding", "chunked"))
    return [Head(200, tuple(headers), chunked=True), Send(body, event=False)]
