"""``--plot FILE.png``: latency over the run, from the raw samples (matplotlib, imported here)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._errors import BenchError, BenchUsageError
from ._stats import RequestSample

__all__ = ["check_plotting", "chunk_rates", "plot_run"]

_MISSING = (
    '--plot needs matplotlib: pip install "llmstream-sdk[plot]" (or run without --plot; '
    "--json keeps every number to plot later)."
)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise BenchUsageError(_MISSING) from None
    matplotlib.use("Agg")  # a file, never a window
    import matplotlib.pyplot as plt

    return plt


def check_plotting() -> None:
    """Fail before the run, not after it, when matplotlib is missing."""
    _pyplot()


_SHORTEST_TAIL = 0.5
"""A last, partial second shorter than this is left out: too few chunks to make a rate."""


def chunk_rates(samples: Sequence[RequestSample]) -> tuple[list[float], list[float]]:
    """Output chunks per second over the run, in one-second buckets, with the step's end.

    Returns the buckets' starts (then where the last one ends) and their rates (the last
    repeated, for a step chart). The run rarely ends on a whole second: its last bucket,
    only partly covered, is counted over the time it covers, else it would show a drop
    that never happened; left out if under half a second.

    Example::

        seconds, rates = chunk_rates(samples)
    """
    times = []
    for s in samples:
        if s.ttft is None:
            continue
        at = s.sent + s.ttft
        times.append(at)
        for gap in s.itl:
            at += gap
            times.append(at)
    if not times:
        return [], []
    end = max(times)
    whole = int(end)  # complete one-second buckets
    counts = [0] * (whole + 1)
    for at in times:
        counts[min(int(at), whole)] += 1
    rates = [float(c) for c in counts[:whole]]
    tail = end - whole
    if tail >= _SHORTEST_TAIL or not whole:
        rates.append(counts[whole] / tail if tail > 0 else float(counts[whole]))
    else:
        end = float(whole)
    seconds = [float(i) for i in range(len(rates))] + [end]
    return seconds, [*rates, rates[-1]]


def plot_run(samples: Sequence[RequestSample], path: Path, *, title: str) -> None:
    """Draw TTFT, TPOT and E2E per request against when it was sent, and tokens per second.

    Example::

        plot_run(samples, Path("run.png"), title="Qwen3-8B, 8 concurrent")
    """
    plt = _pyplot()
    done = [s for s in samples if s.outcome == "ok"]
    failed = [s for s in samples if s.outcome == "error"]
    figure, (latency, decode, throughput) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    figure.suptitle(title)

    sent = [s.sent for s in done]
    latency.scatter(sent, [(s.ttft or 0) * 1000 for s in done], s=8, label="TTFT")
    latency.scatter(sent, [(s.e2e or 0) * 1000 for s in done], s=8, label="E2E latency")
    if failed:
        latency.scatter(
            [s.sent for s in failed], [0] * len(failed), marker="x", c="red", label="failed"
        )
    latency.set_ylabel("ms")
    latency.legend(loc="upper left")
    latency.grid(alpha=0.3)

    with_tpot = [s for s in done if s.tpot is not None]
    decode.scatter(
        [s.sent for s in with_tpot],
        [(s.tpot or 0) * 1000 for s in with_tpot],
        s=8,
        label="TPOT",
        c="tab:green",
    )
    decode.set_ylabel("ms per token")
    decode.legend(loc="upper left")
    decode.grid(alpha=0.3)

    seconds, rates = chunk_rates(done)
    throughput.step(seconds, rates, where="post", label="output chunks/s")
    throughput.set_ylabel("chunks per second")
    throughput.set_xlabel("seconds since the run started (when each request was sent)")
    throughput.legend(loc="upper left")
    throughput.grid(alpha=0.3)

    figure.tight_layout()
    try:
        figure.savefig(path, dpi=100)
    except OSError as exc:
        # After the run, so no usage error (exit 2 says nothing was sent).
        raise BenchError(f"cannot write --plot {path}: {exc.strerror or exc}.") from None
    finally:
        plt.close(figure)
