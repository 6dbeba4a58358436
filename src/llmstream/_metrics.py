"""Stream timing, from timestamps the I/O shells pass in (sans-IO)."""

from __future__ import annotations

import math
from array import array
from itertools import pairwise

from ._result import LatencySummary, StreamMetrics

__all__ = ["MetricsRecorder", "summarize"]


class MetricsRecorder:
    """Collects the timestamps of one stream and summarises them.

    Times are seconds on one monotonic clock (``time.perf_counter()``). Token
    times are kept in an ``array`` of doubles: 8 bytes a token, far less than
    the text the result keeps anyway.

    Example::

        rec = MetricsRecorder(started=0.0)
        rec.headers(0.01)
        rec.token(0.10)
        rec.token(0.12)
        rec.summary(completion_tokens=None, ended=0.13).time_to_first_token  # 0.10
    """

    __slots__ = ("_chunks", "_headers_at", "_started", "_token_times")

    def __init__(self, started: float) -> None:
        self._started = started
        self._headers_at: float | None = None
        self._token_times = array("d")
        self._chunks = 0

    def headers(self, now: float) -> None:
        """The response headers arrived."""
        self._headers_at = now

    def chunk(self) -> None:
        """A chunk arrived (output or not)."""
        self._chunks += 1

    def token(self, now: float) -> None:
        """A chunk carrying generated output arrived."""
        self._token_times.append(now)

    @property
    def chunks(self) -> int:
        """How many chunks arrived so far."""
        return self._chunks

    @property
    def output_chunks(self) -> int:
        """How many chunks carried generated output so far."""
        return len(self._token_times)

    def summary(self, *, completion_tokens: int | None, ended: float) -> StreamMetrics:
        """The metrics so far; ``completion_tokens`` is the server's count, if it sent one."""
        times = self._token_times
        tokens = completion_tokens if completion_tokens is not None else len(times)
        ttft = times[0] - self._started if times else None
        gaps = [b - a for a, b in pairwise(times)]
        decode_time = times[-1] - times[0] if len(times) > 1 else 0.0
        # The first token's time is TTFT, so decode speed counts the tokens after it.
        tps = (tokens - 1) / decode_time if decode_time > 0 and tokens > 1 else None
        return StreamMetrics(
            time_to_headers=(
                self._headers_at - self._started if self._headers_at is not None else None
            ),
            time_to_first_token=ttft,
            inter_token_latency=summarize(gaps),
            tokens_per_second=tps,
            completion_tokens=tokens,
            completion_tokens_source="server" if completion_tokens is not None else "chunks",
            chunks=self._chunks,
            duration=ended - self._started,
        )


def summarize(values: list[float]) -> LatencySummary | None:
    """Mean, percentiles (nearest rank) and max of ``values``; ``None`` when empty.

    Example::

        summarize([0.01, 0.02, 0.03]).p50  # 0.02
    """
    if not values:
        return None
    ordered = sorted(values)
    n = len(ordered)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p * n) - 1)]

    return LatencySummary(
        count=n,
        mean=sum(ordered) / n,
        p50=rank(0.50),
        p90=rank(0.90),
        p99=rank(0.99),
        max=ordered[-1],
    )
