"""What one benchmark request measured, and the run's figures pooled from every request.

Sans-IO: plain numbers in, plain numbers out. The definitions are vLLM's
(``vllm/benchmarks/serve.py``, ``calculate_metrics``), so that a run of ``llmstream bench``
and one of ``vllm bench serve`` at the same load can be read side by side:

* TTFT: from sending the request to the first chunk that carries output;
* ITL: every gap between two consecutive output chunks, pooled over all requests;
* TPOT: per request, ``(E2E - TTFT) / (output tokens - 1)``, for requests of 2+ tokens;
* E2E: from sending the request to its last output chunk.

Percentiles interpolate linearly between the two nearest samples (numpy's default, which
vLLM's benchmark uses), over the raw samples of the whole run: with several worker
processes, the samples are merged before any percentile is taken.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "DEFINITIONS",
    "GOODPUT_METRICS",
    "Distribution",
    "ErrorCount",
    "RequestSample",
    "RunSummary",
    "distribution",
    "percentile",
    "summarize_run",
]

Outcome = Literal["ok", "cancelled", "error"]

GOODPUT_METRICS = ("ttft", "tpot", "e2el")
"""The metrics a ``--goodput`` objective may name (vLLM's names), in milliseconds."""

DEFINITIONS = {
    "ttft": "time to first token: request sent -> first chunk carrying output",
    "tpot": "time per output token: (E2E - TTFT) / (output tokens - 1), per request of 2+ tokens",
    "itl": "inter-token latency: every gap between consecutive output chunks, pooled",
    "e2el": "end-to-end latency: request sent -> last chunk carrying output",
    "percentiles": "linear interpolation over the raw samples of all requests (numpy's default)",
    "output_tokens": "the server's usage.completion_tokens; counted output chunks without it",
    "source": "vLLM's benchmark (vllm bench serve) definitions",
}


@dataclass
class RequestSample:
    """One request of a run: when it went, what came back, how it ended.

    Times are seconds; ``arrived`` and ``sent`` count from the run's start (the
    difference is the wait for a free ``--max-concurrency`` slot), ``ttft``, ``e2e``
    and ``itl`` from sending it.

    Example::

        s = RequestSample(index=0, arrived=0.0, sent=0.0, outcome="ok",
                          ttft=0.1, e2e=0.5, itl=[0.1] * 4, output_tokens=5)
        s.tpot  # 0.1
    """

    index: int
    arrived: float
    sent: float
    outcome: Outcome
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    tokens_source: Literal["server", "chunks"] = "chunks"
    prompt_tokens: int | None = None
    prompt_tokens_source: Literal["server", "estimate"] = "estimate"
    error_type: str | None = None
    error: str | None = None
    closed_in: float | None = None  # a cancelled request: cancel() to the connection closed
    dispatch_lag: float = 0.0  # how late the generator dispatched it after its arrival time
    worker: int = 0

    @property
    def tpot(self) -> float | None:
        """``(E2E - TTFT) / (output tokens - 1)``; None below 2 tokens or without output."""
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Distribution:
    """Mean, percentiles and max of a set of samples, in milliseconds.

    Example::

        distribution([0.010, 0.020, 0.030]).p50  # 20.0
    """

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float


@dataclass(frozen=True)
class ErrorCount:
    """How many requests failed with one error type, and one of their messages."""

    type: str
    count: int
    example: str


@dataclass(frozen=True)
class RunSummary:
    """The run's figures, pooled from every request's raw samples.

    Example::

        summary = summarize_run(samples, duration=12.5)
        print(summary.ttft.p99, summary.output_throughput)
    """

    duration: float
    completed: int
    failed: int
    cancelled: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: Distribution | None
    tpot: Distribution | None
    itl: Distribution | None
    e2el: Distribution | None
    goodput: float | None
    good_requests: int | None
    slos_ms: Mapping[str, float]
    errors: tuple[ErrorCount, ...]
    output_tokens_from: Mapping[str, int]
    input_tokens_from: Mapping[str, int]
    cancelled_output_tokens: int
    cancel_close: Distribution | None
    dispatch_lag: Distribution | None


def percentile(ordered: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) of sorted values, interpolated as numpy does.

    Example::

        percentile([1.0, 2.0, 3.0, 4.0], 50)  # 2.5
    """
    if not ordered:
        raise ValueError("no samples")
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(seconds: Iterable[float]) -> Distribution | None:
    """The :class:`Distribution` of samples given in seconds; None when there are none.

    Example::

        distribution([0.01, 0.03]).mean  # 20.0 (milliseconds)
    """
    ordered = sorted(seconds)
    if not ordered:
        return None
    return Distribution(
        count=len(ordered),
        mean=math.fsum(ordered) / len(ordered) * 1000,
        p50=percentile(ordered, 50) * 1000,
        p90=percentile(ordered, 90) * 1000,
        p99=percentile(ordered, 99) * 1000,
        max=ordered[-1] * 1000,
    )


def _is_good(sample: RequestSample, slos_ms: Mapping[str, float]) -> bool:
    # As vLLM: a request of fewer than 2 tokens has a TPOT of 0 for goodput.
    values = {"ttft": sample.ttft, "tpot": sample.tpot or 0.0, "e2el": sample.e2e}
    for name, limit in slos_ms.items():
        value = values[name]
        if value is None or value * 1000 > limit:
            return False
    return True


def _errors(samples: Iterable[RequestSample]) -> tuple[ErrorCount, ...]:
    counts: dict[str, int] = {}
    examples: dict[str, str] = {}
    for s in samples:
        kind = s.error_type or "Error"
        counts[kind] = counts.get(kind, 0) + 1
        examples.setdefault(kind, s.error or "")
    ranked = sorted(counts, key=lambda k: (-counts[k], k))
    return tuple(ErrorCount(k, counts[k], examples[k]) for k in ranked)


def summarize_run(
    samples: Sequence[RequestSample],
    *,
    duration: float,
    slos_ms: Mapping[str, float] | None = None,
) -> RunSummary:
    """Pool every request's samples into the run's figures (vLLM's definitions).

    Only completed requests count in the latencies and throughputs; cancelled
    requests (``--cancel-fraction``) and failed ones are counted apart.

    Example::

        summary = summarize_run(samples, duration=10.0, slos_ms={"ttft": 500})
        summary.goodput  # completed requests within every objective, per second
    """
    slos = dict(slos_ms or {})
    done = [s for s in samples if s.outcome == "ok"]
    cancelled = [s for s in samples if s.outcome == "cancelled"]
    failed = [s for s in samples if s.outcome == "error"]
    output = sum(s.output_tokens for s in done)
    inputs = sum(s.prompt_tokens or 0 for s in done)
    per_second = 1 / duration if duration > 0 else 0.0
    good = sum(_is_good(s, slos) for s in done) if slos else None
    return RunSummary(
        duration=duration,
        completed=len(done),
        failed=len(failed),
        cancelled=len(cancelled),
        total_input_tokens=inputs,
        total_output_tokens=output,
        request_throughput=len(done) * per_second,
        output_throughput=output * per_second,
        total_token_throughput=(inputs + output) * per_second,
        ttft=distribution(s.ttft for s in done if s.ttft is not None),
        tpot=distribution(t for s in done if (t := s.tpot) is not None),
        itl=distribution(gap for s in done for gap in s.itl),
        e2el=distribution(s.e2e for s in done if s.e2e is not None),
        goodput=good * per_second if good is not None else None,
        good_requests=good,
        slos_ms=slos,
        errors=_errors(failed),
        output_tokens_from={
            "server": sum(s.tokens_source == "server" for s in done),
            "chunks": sum(s.tokens_source == "chunks" for s in done),
        },
        input_tokens_from={
            "server": sum(s.prompt_tokens_source == "server" for s in done),
            "estimate": sum(s.prompt_tokens_source == "estimate" for s in done),
        },
        cancelled_output_tokens=sum(s.output_tokens for s in cancelled),
        cancel_close=distribution(s.closed_in for s in cancelled if s.closed_in is not None),
        dispatch_lag=distribution(s.dispatch_lag for s in samples),
    )
