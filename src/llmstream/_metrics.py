"""Stream timing, from timestamps the I/O shells pass in (sans-IO)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from ._result import LatencySummary, StreamMetrics

__all__ = ["RESERVOIR_SIZE", "MetricsRecorder", "summarize"]

RESERVOIR_SIZE = 4096
"""Gaps kept for percentiles: exact up to this many tokens, a uniform sample beyond."""


class MetricsRecorder:
    """Collects the timestamps of one stream and summarises them, in constant memory.

    Times are seconds on one monotonic clock (``time.perf_counter()``). Count,
    mean and max of the gaps between tokens are exact; percentiles are exact
    for up to :data:`RESERVOIR_SIZE` gaps and computed from a uniform sample
    (reservoir sampling) beyond, so a 100,000-token stream costs no more memory
    than a short one.

    Example::

        rec = MetricsRecorder(started=0.0)
        rec.headers(0.01)
        rec.token(0.10)
        rec.token(0.12)
        rec.summary(completion_tokens=None, ended=0.13).time_to_first_token  # 0.10
    """

    __slots__ = (
        "_chunks",
        "_first",
        "_gap_max",
        "_gap_sum",
        "_gaps",
        "_headers_at",
        "_last",
        "_random",
        "_started",
        "_tokens",
    )

    def __init__(self, started: float) -> None:
        self._started = started
        self._headers_at: float | None = None
        self._chunks = 0
        self._tokens = 0
        self._first = 0.0
        self._last = 0.0
        self._gap_sum = 0.0
        self._gap_max = 0.0
        self._gaps: list[float] = []
        self._random: Callable[[], float] | None = None

    def headers(self, now: float) -> None:
        """The response headers arrived."""
        self._headers_at = now

    def chunk(self) -> None:
        """A chunk arrived (output or not)."""
        self._chunks += 1

    def token(self, now: float) -> None:
        """A chunk carrying generated output arrived."""
        if self._tokens:
            gap = now - self._last
            self._gap_sum += gap
            if gap > self._gap_max:
                self._gap_max = gap
            gaps = self._gaps
            if len(gaps) < RESERVOIR_SIZE:
                gaps.append(gap)
            else:
                if self._random is None:
                    # random() is several times cheaper than randrange() per token.
                    self._random = random.Random(0).random  # repeatable summaries
                slot = int(self._random() * (self._tokens - 1))
                if slot < RESERVOIR_SIZE:
                    gaps[slot] = gap
        else:
            self._first = now
        self._last = now
        self._tokens += 1

    @property
    def chunks(self) -> int:
        """How many chunks arrived so far."""
        return self._chunks

    def gaps(self) -> tuple[float, ...]:
        """The gaps between output chunks: all of them up to RESERVOIR_SIZE, a sample beyond."""
        return tuple(self._gaps)

    @property
    def output_chunks(self) -> int:
        """How many chunks carried generated output so far."""
        return self._tokens

    def summary(self, *, completion_tokens: int | None, ended: float) -> StreamMetrics:
        """The metrics so far; ``completion_tokens`` is the server's count, if it sent one."""
        count = self._tokens
        tokens = completion_tokens if completion_tokens is not None else count
        itl = None
        if count > 1:
            itl = summarize(
                self._gaps, count=count - 1, mean=self._gap_sum / (count - 1), top=self._gap_max
            )
        return StreamMetrics(
            time_to_headers=(
                self._headers_at - self._started if self._headers_at is not None else None
            ),
            time_to_first_token=self._first - self._started if count else None,
            inter_token_latency=itl,
            tokens_per_second=self._tokens_per_second(tokens, ended),
            completion_tokens=tokens,
            completion_tokens_source="server" if completion_tokens is not None else "chunks",
            chunks=self._chunks,
            duration=ended - self._started,
        )

    def _tokens_per_second(self, tokens: int, ended: float) -> float:
        decode_time = self._last - self._first if self._tokens > 1 else 0.0
        if decode_time > 0 and tokens > 1:
            # The first token's time is TTFT, so decode speed counts the tokens after it.
            return (tokens - 1) / decode_time
        # One output chunk, or all of them in one network read (1-2 tokens, a fast
        # server): no decode interval to measure. Every token over the whole wait is
        # a lower bound of the speed, and never undefined once a token arrived.
        elapsed = (self._last if self._tokens else ended) - self._started
        return tokens / elapsed if tokens and elapsed > 0 else 0.0


def summarize(
    values: list[float],
    *,
    count: int | None = None,
    mean: float | None = None,
    top: float | None = None,
) -> LatencySummary | None:
    """Mean, percentiles (nearest rank) and max of ``values``; ``None`` when empty.

    ``count``, ``mean`` and ``top`` override what ``values`` says, for when
    ``values`` is a sample of a larger population whose exact figures are known.

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
        count=count if count is not None else n,
        mean=mean if mean is not None else sum(ordered) / n,
        p50=rank(0.50),
        p90=rank(0.90),
        p99=rank(0.99),
        max=top if top is not None else ordered[-1],
    )
