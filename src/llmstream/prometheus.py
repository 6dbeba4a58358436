"""Prometheus metrics for llmstream, as a hook: latency histograms and call counters.

Pass a :class:`PrometheusHook` in ``hooks=`` and every call is counted and timed on a
``prometheus_client`` registry (the default one, or ``registry=``), labelled by ``model``
(the model asked for) and ``endpoint`` (the client's base URL, without its query string):

======================================  =========  =======================================
metric                                  type       labels (besides model, endpoint)
======================================  =========  =======================================
``llmstream_time_to_first_token_seconds``  histogram
``llmstream_inter_token_latency_seconds``  histogram  (one observation per gap between chunks)
``llmstream_call_duration_seconds``     histogram  ``status``
``llmstream_call_tokens``               histogram  ``type``: ``prompt`` or ``completion``
``llmstream_calls_total``               counter    ``status``, ``finish_reason``
``llmstream_call_errors_total``         counter    ``error``
``llmstream_retries_total``             counter    ``kind``: ``retry`` or ``resume``
``llmstream_calls_in_progress``         gauge
======================================  =========  =======================================

``status`` is how the call ended (:data:`~llmstream.StreamStatus`: ``complete``,
``budget``, ``cancelled`` for a stream the caller stopped, ``error``, ``interrupted``,
``aborted``); ``finish_reason`` is choice 0's (``stop``, ``length``, ``tool_calls``, or
empty); ``error`` is the HTTP status of an error status (``503``) or the error's class
(``llmstream.IdleTimeout``). No label ever holds a credential or message content.

Needs the ``prometheus`` extra (``pip install "llmstream-sdk[prometheus]"``).

Example::

    from llmstream.prometheus import PrometheusHook

    client = llmstream.AsyncClient(hooks=[PrometheusHook()])
    prometheus_client.start_http_server(9464)  # scrape http://host:9464/metrics
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._errors import InvalidRequestError
from ._events import CallEvent, CallFailed, CallFinished, RequestSent, error_type
from ._retry import RetryEvent

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = [
    "DURATION_BUCKETS",
    "INTER_TOKEN_BUCKETS",
    "TOKEN_BUCKETS",
    "TTFT_BUCKETS",
    "PrometheusHook",
]

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Seconds to the first token: a loaded server's prefill can take minutes."""
INTER_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)
"""Seconds between chunks: tens of milliseconds on a healthy server (0 in one network read)."""
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
"""Seconds per call, retries included."""
TOKEN_BUCKETS = tuple(float(4**i) for i in range(1, 11))  # 4, 16 ... 1048576
"""Tokens per call (prompt or completion)."""

_CALL = ("model", "endpoint")


class PrometheusHook:
    """A hook that records each call on Prometheus histograms and counters.

    ``registry`` is where the metrics are registered (``prometheus_client.REGISTRY`` by
    default); one hook per registry, shared by every client that should count into it.
    ``namespace`` prefixes the names (``llmstream``); the buckets default to the
    ``*_BUCKETS`` constants of this module. See the module docstring for the metrics.

    Example::

        registry = prometheus_client.CollectorRegistry()
        hook = PrometheusHook(registry=registry)
        with llmstream.Client(hooks=[hook]) as client:
            client.complete("Hi")
        print(prometheus_client.generate_latest(registry).decode())
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        namespace: str = "llmstream",
        ttft_buckets: Sequence[float] = TTFT_BUCKETS,
        inter_token_buckets: Sequence[float] = INTER_TOKEN_BUCKETS,
        duration_buckets: Sequence[float] = DURATION_BUCKETS,
        token_buckets: Sequence[float] = TOKEN_BUCKETS,
    ) -> None:
        try:
            import prometheus_client as prom
        except ImportError as exc:
            raise InvalidRequestError(
                "PrometheusHook needs prometheus_client, which is not installed: "
                f'pip install "llmstream-sdk[prometheus]". ({exc})'
            ) from exc
        where = {"namespace": namespace, "registry": registry or prom.REGISTRY}
        try:
            self.time_to_first_token = prom.Histogram(
                "time_to_first_token_seconds",
                "Seconds from a call's first request to its first output chunk.",
                _CALL,
                buckets=ttft_buckets,
                **where,  # type: ignore[arg-type]
            )
            self.inter_token_latency = prom.Histogram(
                "inter_token_latency_seconds",
                "Seconds between consecutive output chunks, as the client received them.",
                _CALL,
                buckets=inter_token_buckets,
                **where,  # type: ignore[arg-type]
            )
            self.duration = prom.Histogram(
                "call_duration_seconds",
                "Seconds from a call's first request to its end, retries included.",
                (*_CALL, "status"),
                buckets=duration_buckets,
                **where,  # type: ignore[arg-type]
            )
            self.tokens = prom.Histogram(
                "call_tokens",
                "Tokens per call: the prompt (when counted) and the completion.",
                (*_CALL, "type"),
                buckets=token_buckets,
                **where,  # type: ignore[arg-type]
            )
            self.calls = prom.Counter(
                "calls",
                "Calls ended, by how they ended and choice 0's finish reason.",
                (*_CALL, "status", "finish_reason"),
                **where,  # type: ignore[arg-type]
            )
            self.errors = prom.Counter(
                "call_errors",
                "Calls that failed, by error (HTTP status, or llmstream error class).",
                (*_CALL, "error"),
                **where,  # type: ignore[arg-type]
            )
            self.retries = prom.Counter(
                "retries",
                "Requests sent again: a retry from scratch, or a resume of a broken answer.",
                (*_CALL, "kind"),
                **where,  # type: ignore[arg-type]
            )
            self.in_progress = prom.Gauge(
                "calls_in_progress",
                "Calls that sent their first request and have not ended.",
                _CALL,
                **where,  # type: ignore[arg-type]
            )
        except ValueError as exc:  # "Duplicated timeseries in CollectorRegistry"
            raise InvalidRequestError(
                f"PrometheusHook could not register its metrics ({exc}): one hook per "
                "registry. Share one hook between your clients, or pass registry=... "
                "(or another namespace=...)."
            ) from exc
        self._started: dict[str, float] = {}  # call id -> first request, until the end
        self._lock = threading.Lock()  # calls start and end on several threads

    def __call__(self, event: CallEvent) -> None:
        """Record one event of a call (the client calls this)."""
        call = event.call
        labels = (call.request_model or "", call.url)
        if isinstance(event, RequestSent):
            if event.attempt == 1:
                with self._lock:
                    self._started[call.call_id] = event.at
                self.in_progress.labels(*labels).inc()
        elif isinstance(event, RetryEvent):
            self.retries.labels(*labels, event.kind).inc()
        elif isinstance(event, CallFinished | CallFailed):
            self._end(event, labels)

    def _end(self, event: CallFinished | CallFailed, labels: tuple[str, str]) -> None:
        with self._lock:
            started = self._started.pop(event.call.call_id, None)
        if started is not None:
            self.in_progress.labels(*labels).dec()
        result = event.result
        status = result.status
        self.calls.labels(*labels, status, result.finish_reason or "").inc()
        self.duration.labels(*labels, status).observe(
            event.at - started if started is not None else 0.0
        )
        if isinstance(event, CallFailed):
            self.errors.labels(*labels, error_type(event.error)).inc()
        ttft = result.metrics.time_to_first_token
        if ttft is not None:
            self.time_to_first_token.labels(*labels).observe(ttft)
        if event.chunk_gaps:
            observe = self.inter_token_latency.labels(*labels).observe
            for gap in event.chunk_gaps:
                observe(gap)
        tokens = result.tokens
        if tokens.prompt_tokens is not None and tokens.prompt_source in ("server", "tokenizer"):
            self.tokens.labels(*labels, "prompt").observe(tokens.prompt_tokens)
        if result.metrics.chunks or result.usage is not None:
            self.tokens.labels(*labels, "completion").observe(tokens.completion_tokens)
