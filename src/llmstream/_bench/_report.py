"""What a run shows: the live progress line, the closing table, and the JSON document."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TextIO

from .._version import __version__
from ._runner import Progress
from ._schedule import RampUp
from ._stats import DEFINITIONS, Distribution, RequestSample, RunSummary

__all__ = [
    "GeneratorLoad",
    "ProgressDisplay",
    "describe_arrivals",
    "format_table",
    "generator_warnings",
    "to_json",
]

BUSY_SHARE = 0.8
"""A generator process above this share of one core may be what limits the run."""

LATE_DISPATCH_MS = 50.0
"""A p99 dispatch lag above this: the generator sent requests later than their arrival."""


@dataclass(frozen=True)
class GeneratorLoad:
    """The CPU the load generator's processes spent, over the measured run.

    ``cpu`` and ``wall`` are seconds per worker process; the share of one core is
    their ratio. ``emulator_cpu`` is the emulator's (``--fake``), in its own process.
    """

    cpu: tuple[float, ...]
    wall: tuple[float, ...]
    cores: int
    emulator_cpu: float | None = None

    @property
    def shares(self) -> tuple[float, ...]:
        """Each process's CPU time over its wall time: 1.0 is one core kept busy."""
        return tuple(c / w if w > 0 else 0.0 for c, w in zip(self.cpu, self.wall, strict=True))


def generator_warnings(
    summary: RunSummary, load: GeneratorLoad, *, paced: bool = True
) -> list[str]:
    """Why the numbers may describe the load generator rather than the server.

    ``paced``: the requests had arrival times to keep (a request rate or a ramp-up), so a
    late dispatch is the generator's fault; with every request due at once it is not.
    """
    warnings = []
    busiest = max(load.shares, default=0.0)
    if busiest >= BUSY_SHARE:
        more = len(load.cpu) + 1
        warnings.append(
            f"the load generator used {busiest:.0%} of a core in its busiest process: it, "
            f"not the server, may be the bottleneck (latencies include its own delays). "
            f"Spread the load with --workers {more}, or lower the load."
        )
    total = sum(load.cpu) + (load.emulator_cpu or 0.0)
    wall = max(load.wall, default=0.0)
    if wall > 0 and total / wall >= BUSY_SHARE * load.cores:
        warnings.append(
            f"this machine's {load.cores} cores were about {total / wall / load.cores:.0%} "
            "busy with the generator"
            + (" and the emulator" if load.emulator_cpu is not None else "")
            + ": run the generator on another machine than the server, or lower the load."
        )
    lag = summary.dispatch_lag
    if paced and lag is not None and lag.p99 > LATE_DISPATCH_MS:
        warnings.append(
            f"requests were sent up to {lag.p99:.0f} ms (p99) after their arrival time: "
            "the generator could not keep the requested rate."
        )
    return warnings


def describe_arrivals(
    request_rate: float, burstiness: float = 1.0, ramp_up: RampUp | None = None
) -> str:
    """How the requests arrive, in words: all at once, at a rate, or ramping up.

    The burstiness shows whenever there is a rate to draw gaps from, as vLLM shows it.

    Example::

        describe_arrivals(math.inf, ramp_up=RampUp("linear", 2, 20))
        # 'linear ramp-up from 2 to 20 req/s, burstiness 1'
    """
    if ramp_up is not None:
        rate = f"{ramp_up.strategy} ramp-up from {ramp_up.start_rps:g} to {ramp_up.end_rps:g} req/s"
    elif math.isinf(request_rate):
        return "inf (all at once)"
    else:
        rate = f"{request_rate:g} req/s"
    return f"{rate}, burstiness {burstiness:g}"


def _ms(value: float) -> str:
    return f"{value:10.2f}"


def _row(name: str, d: Distribution | None) -> str:
    if d is None:
        return f"{name:<22}{'-':>10}{'-':>10}{'-':>10}{'-':>10}{'-':>10}{0:>8}"
    values = "".join(_ms(v) for v in (d.mean, d.p50, d.p90, d.p99, d.max))
    return f"{name:<22}{values}{d.count:>8}"


def format_table(
    summary: RunSummary,
    load: GeneratorLoad,
    *,
    max_concurrency: int | None,
    request_rate: float,
    burstiness: float = 1.0,
    ramp_up: RampUp | None = None,
    warnings: Sequence[str] = (),
) -> str:
    """The closing report as text: counts, throughputs, latencies, errors, the generator.

    Example::

        print(format_table(summary, load, max_concurrency=8, request_rate=float("inf")))
    """
    s = summary
    line = "=" * 78
    out = [line, f"{' llmstream bench result ':=^78}", line]

    def item(label: str, value: object) -> None:
        out.append(f"{label:<44}{value}")

    item("Successful requests:", s.completed)
    item("Failed requests:", s.failed)
    if s.cancelled:
        item("Cancelled on purpose (--cancel-fraction):", s.cancelled)
    item("Maximum request concurrency:", max_concurrency or "unlimited")
    item("Request arrivals:", describe_arrivals(request_rate, burstiness, ramp_up))
    item("Benchmark duration (s):", f"{s.duration:.2f}")
    item("Total input tokens:", s.total_input_tokens)
    item("Total generated tokens:", s.total_output_tokens)
    item("Request throughput (req/s):", f"{s.request_throughput:.2f}")
    item("Output token throughput (tok/s):", f"{s.output_throughput:.2f}")
    item("Total token throughput (tok/s):", f"{s.total_token_throughput:.2f}")
    if s.goodput is not None:
        slos = ", ".join(f"{k} <= {v:g} ms" for k, v in s.slos_ms.items())
        item("Request goodput (req/s):", f"{s.goodput:.2f}  ({s.good_requests} within {slos})")
    out.append("-" * 78)
    out.append(
        f"{'latency (ms)':<22}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}{'n':>8}"
    )
    out.append(_row("TTFT", s.ttft))
    out.append(_row("TPOT", s.tpot))
    out.append(_row("ITL", s.itl))
    out.append(_row("E2E latency", s.e2el))
    if s.cancelled:
        out.append(_row("cancel -> closed", s.cancel_close))
    out.append("-" * 78)
    if s.errors:
        out.append("Errors by type:")
        for e in s.errors:
            out.append(f"  {e.type:<26}{e.count:>6}  e.g. {e.example[:120]}")
    else:
        out.append("Errors by type:                             none")
    server, chunks = s.output_tokens_from["server"], s.output_tokens_from["chunks"]
    out.append(
        f"Output tokens counted from: server usage ({server} requests), "
        f"output chunks ({chunks} requests)"
    )
    prompt_server = s.input_tokens_from["server"]
    prompt_estimate = s.input_tokens_from["estimate"]
    out.append(
        f"Input tokens counted from: server usage ({prompt_server} requests), "
        f"estimate ({prompt_estimate} requests)"
    )
    shares = ", ".join(f"{x:.0%}" for x in load.shares)
    cpu = sum(load.cpu)
    out.append(
        f"Generator: {len(load.cpu)} process(es), CPU {shares} of a core "
        f"({cpu:.2f} s CPU), {load.cores} cores on this machine"
        + (f"; emulator {load.emulator_cpu:.2f} s CPU" if load.emulator_cpu is not None else "")
    )
    if s.dispatch_lag is not None:
        lag = s.dispatch_lag
        out.append(
            f"Dispatch lag (sent after arrival time): p50 {lag.p50:.2f} ms, p99 {lag.p99:.2f} ms"
        )
    out.append(
        "Definitions (vLLM's): TTFT = sent -> first output chunk; TPOT = (E2E - TTFT) / "
        "(output tokens - 1); ITL = every gap between output chunks, pooled; E2E = sent -> "
        "last output chunk; percentiles interpolated over all raw samples."
    )
    out.append(line)
    for warning in warnings:
        out.append(f"WARNING: {warning}")
    return "\n".join(out)


def _distribution_json(d: Distribution | None) -> dict[str, float] | None:
    if d is None:
        return None
    return {
        "count": d.count,
        "mean": d.mean,
        "p50": d.p50,
        "p90": d.p90,
        "p99": d.p99,
        "max": d.max,
    }


def to_json(
    summary: RunSummary,
    load: GeneratorLoad,
    *,
    config: Mapping[str, object],
    warnings: Sequence[str],
    samples: Sequence[RequestSample] | None = None,
) -> dict[str, object]:
    """The run as one JSON-ready object (milliseconds for latencies).

    ``samples`` adds every request's raw measurements (``--save-detailed``).
    """
    s = summary
    document: dict[str, object] = {
        "llmstream_version": __version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "definitions": DEFINITIONS,
        "config": dict(config),
        "duration_s": s.duration,
        "completed": s.completed,
        "failed": s.failed,
        "cancelled": s.cancelled,
        "total_input_tokens": s.total_input_tokens,
        "total_output_tokens": s.total_output_tokens,
        "output_tokens_from": dict(s.output_tokens_from),
        "input_tokens_from": dict(s.input_tokens_from),
        "request_throughput": s.request_throughput,
        "output_throughput": s.output_throughput,
        "total_token_throughput": s.total_token_throughput,
        "request_goodput": s.goodput,
        "good_requests": s.good_requests,
        "goodput_slos_ms": dict(s.slos_ms),
        "ttft_ms": _distribution_json(s.ttft),
        "tpot_ms": _distribution_json(s.tpot),
        "itl_ms": _distribution_json(s.itl),
        "e2el_ms": _distribution_json(s.e2el),
        "errors": [dataclasses.asdict(e) for e in s.errors],
        "cancelled_output_tokens": s.cancelled_output_tokens,
        "cancel_close_ms": _distribution_json(s.cancel_close),
        "generator": {
            "workers": len(load.cpu),
            "cpu_s": list(load.cpu),
            "wall_s": list(load.wall),
            "core_share": list(load.shares),
            "machine_cores": load.cores,
            "emulator_cpu_s": load.emulator_cpu,
            "dispatch_lag_ms": _distribution_json(s.dispatch_lag),
        },
        "warnings": list(warnings),
    }
    if samples is not None:
        document["requests"] = [dataclasses.asdict(x) for x in samples]
    return document


class ProgressDisplay:
    """The run as it goes: one line rewritten in place on a terminal, plain lines elsewhere.

    On a terminal the line is redrawn at every update; otherwise a line is written each
    time another tenth of the requests has ended, so a log stays short.
    """

    def __init__(self, stream: TextIO, *, enabled: bool = True) -> None:
        self._stream = stream
        isatty = getattr(stream, "isatty", None)
        self._tty = bool(isatty and isatty())
        self._enabled = enabled
        self._started = time.perf_counter()
        self._next_tenth = 1
        self._drawn = False

    def _line(self, p: Progress) -> str:
        elapsed = time.perf_counter() - self._started
        in_flight = p.sent - p.finished
        rate = p.output_chunks / elapsed if elapsed > 0 else 0.0
        return (
            f"[{p.finished}/{p.total}] {p.completed} ok, {p.failed} failed, "
            f"{p.cancelled} cancelled, {in_flight} in flight, {rate:.0f} chunks/s, "
            f"{elapsed:.1f} s"
        )

    def update(self, p: Progress) -> None:
        """Show ``p`` (called a few times a second)."""
        if not self._enabled or p.total == 0:
            return
        if self._tty:
            self._stream.write("\r\x1b[K" + self._line(p))
            self._stream.flush()
            self._drawn = True
            return
        while p.finished * 10 >= self._next_tenth * p.total and self._next_tenth <= 10:
            self._stream.write(self._line(p) + "\n")
            self._stream.flush()
            self._next_tenth = 10 * p.finished // p.total + 1

    def close(self, p: Progress) -> None:
        """Show the last state and end the line."""
        if not self._enabled or p.total == 0:
            return
        self.update(p)
        if self._tty and self._drawn:
            self._stream.write("\n")
            self._stream.flush()
