"""``--plot FILE.png``: latency over the run, from the raw samples (matplotlib, imported here)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._errors import BenchError, BenchUsageError
from ._stats import RequestSample

__all__ = ["check_plotting", "plot_run"]

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

    # Output chunks per second of the run, placed where each one arrived.
    end = max((s.sent + (s.e2e or 0) for s in done), default=0.0)
    buckets = [0] * (math.ceil(end) + 1)
    for s in done:
        if s.ttft is None:
            continue
        at = s.sent + s.ttft
        buckets[int(at)] += 1
        for gap in s.itl:
            at += gap
            buckets[min(int(at), len(buckets) - 1)] += 1
    throughput.step(range(len(buckets)), buckets, where="post", label="output chunks/s")
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
