"""When each request of a run arrives: all at once, Poisson, burstier or smoother, or ramping.

The arrival process is vLLM's (``vllm/benchmarks/serve.py``, ``get_request``): the gaps
between requests are drawn from a gamma distribution of shape ``burstiness`` and mean
``1 / rate``. ``burstiness`` 1 is a Poisson process (exponential gaps); below 1 requests come
in bursts, above 1 more evenly, and infinity is a fixed interval. Without a ramp-up the
arrival times are rescaled so that the last one falls at ``n / rate``, as vLLM does, so
that runs with different seeds offer the same average load. Same distribution as vLLM's,
not the same draws: vLLM seeds numpy, this uses :class:`random.Random`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

__all__ = ["RampUp", "arrival_times"]


@dataclass(frozen=True)
class RampUp:
    """A request rate that grows from ``start_rps`` to ``end_rps`` over the run.

    Example::

        RampUp("linear", 1, 10).rate_at(0.5)  # 5.5 requests per second halfway
    """

    strategy: Literal["linear", "exponential"]
    start_rps: float
    end_rps: float

    def rate_at(self, progress: float) -> float:
        """The rate when ``progress`` (0 to 1) of the requests have been sent."""
        if self.strategy == "linear":
            return self.start_rps + (self.end_rps - self.start_rps) * progress
        return float(self.start_rps * (self.end_rps / self.start_rps) ** progress)


def arrival_times(
    count: int,
    rate: float,
    burstiness: float = 1.0,
    *,
    ramp_up: RampUp | None = None,
    rng: random.Random | None = None,
) -> list[float]:
    """Seconds from the run's start at which each of ``count`` requests arrives.

    ``rate`` infinite (and no ramp-up): every request at 0.

    Example::

        arrival_times(4, rate=2.0, rng=random.Random(0))[-1]  # 2.0: 4 requests at 2/s
    """
    if count <= 0:
        return []
    if burstiness <= 0:
        raise ValueError(f"burstiness must be above 0, got {burstiness}")
    rng = rng or random.Random(0)
    gaps: list[float] = []
    for i in range(count):
        current = ramp_up.rate_at(i / max(count - 1, 1)) if ramp_up is not None else rate
        if current <= 0:
            raise ValueError(f"the request rate must be above 0, got {current}")
        if math.isinf(current):
            gaps.append(0.0)
        elif math.isinf(burstiness):
            gaps.append(1.0 / current)
        else:
            gaps.append(rng.gammavariate(burstiness, 1.0 / (current * burstiness)))
    times: list[float] = []
    total = 0.0
    for gap in gaps:
        total += gap
        times.append(total)
    if ramp_up is None and times[-1] > 0:
        scale = (count / rate) / times[-1]
        times = [t * scale for t in times]
    return times
