"""What hooks cost: CPU per chunk and per call with no hooks, a no-op hook, and the integrations.

The workload of ``bench_clients.py`` (the loopback server of ``vllm_sse_server.py`` in its
own process, one long-lived worker process per row, rows run in turn each round, medians
over rounds), measured two ways per round: one long stream (``--chunks`` content chunks:
CPU us per chunk, where a per-chunk cost would show) and a batch of short calls
(``--calls`` calls of ``--short`` chunks: CPU us per call, where the per-call events
show). CPU is ``time.process_time()`` in the worker, all its threads.

Rows, for the async and the sync client:

* ``before``: the library before hooks existed, from a git revision (``--baseline REV``:
  ``git archive REV src`` is unpacked in a temporary folder and put first on the worker's
  ``PYTHONPATH``); left out without ``--baseline``;
* ``none``: this tree, no hooks (the default);
* ``noop``: this tree, one hook that does nothing;
* ``otel``: :class:`llmstream.otel.OpenTelemetryHook` with the SDK's providers (spans
  and metrics recorded in memory, nothing exported);
* ``prometheus``: :class:`llmstream.prometheus.PrometheusHook` on a private registry.

Run::

    PYTHONPATH=src python benchmarks/bench_hooks.py --baseline HEAD~12     # ~1 min
    PYTHONPATH=src python benchmarks/bench_hooks.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(HERE))

from vllm_sse_server import serve_in_subprocess  # noqa: E402
from worker_process import WorkerProcess  # noqa: E402

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
MESSAGES = [{"role": "user", "content": "Hi"}]
VARIANTS = {
    "before": "the library before hooks (--baseline REV)",
    "none": "no hooks",
    "noop": "one hook that does nothing",
    "otel": "OpenTelemetryHook, SDK providers in memory",
    "prometheus": "PrometheusHook, private registry",
}


# --- the worker: one client, with or without hooks -----------------------------------


def _hooks(variant: str) -> list[Callable[[object], object]] | None:
    if variant == "noop":

        def noop(event: object) -> None:
            return None

        return [noop]
    if variant == "otel":
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from llmstream.otel import OpenTelemetryHook

        tracer_provider = TracerProvider()
        exporter = InMemorySpanExporter()
        tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        hook = OpenTelemetryHook(tracer_provider=tracer_provider, meter_provider=meter_provider)
        return [hook, lambda event: exporter.clear()]  # keep memory flat over rounds
    if variant == "prometheus":
        from prometheus_client import CollectorRegistry

        from llmstream.prometheus import PrometheusHook

        return [PrometheusHook(registry=CollectorRegistry())]
    return None


def worker(variant: str, mode: str, url: str) -> None:
    """A row's process: a line ``N K S`` runs one stream of N chunks and K calls of S chunks."""
    import llmstream

    kwargs: dict[str, object] = {"model": MODEL, "api_key": "bench"}
    hooks = _hooks(variant)
    if hooks is not None:
        kwargs["hooks"] = hooks
    loop = asyncio.new_event_loop()
    if mode == "async":
        client = llmstream.AsyncClient(url, **kwargs)  # type: ignore[arg-type]

        async def stream_async(n: int) -> int:
            count = 0
            async with client.stream(MESSAGES, max_tokens=n) as stream:
                async for _ in stream:
                    count += 1
            return count

        def run(n: int) -> int:
            return loop.run_until_complete(stream_async(n))

        def close() -> None:
            loop.run_until_complete(client.aclose())
    else:
        sync_client = llmstream.Client(url, **kwargs)  # type: ignore[arg-type]

        def run(n: int) -> int:
            count = 0
            with sync_client.stream(MESSAGES, max_tokens=n) as stream:
                for _ in stream:
                    count += 1
            return count

        close = sync_client.close
    print("READY", flush=True)
    for line in sys.stdin:
        n, calls, short = (int(x) for x in line.split())
        gc.collect()
        cpu0 = time.process_time()
        count = run(n)
        cpu1 = time.process_time()
        counts = [run(short) for _ in range(calls)]
        cpu2 = time.process_time()
        ok = count == n and all(c == short for c in counts)
        print(json.dumps({"long": cpu1 - cpu0, "short": cpu2 - cpu1, "ok": ok}), flush=True)
    close()
    loop.close()


# --- the parent ------------------------------------------------------------------------


class Worker(WorkerProcess):
    def __init__(self, variant: str, mode: str, url: str, src: Path) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(src), str(HERE)])
        argv = [sys.executable, __file__, "--worker", variant, "--mode", mode, "--url", url]
        super().__init__(f"{mode} {variant}", argv, env)

    def run(self, n: int, calls: int, short: int) -> dict[str, float]:
        result: dict[str, float] = self.ask(f"{n} {calls} {short}")
        if not result["ok"]:
            raise RuntimeError(f"{self.name} did not see every chunk")
        return result


def _baseline_src(rev: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "archive", rev, "src"], cwd=HERE.parent, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="CPU cost of hooks, per chunk and per call.")
    parser.add_argument("--chunks", type=int, default=20_000, help="chunks of the long stream")
    parser.add_argument("--calls", type=int, default=50, help="short calls per round")
    parser.add_argument("--short", type=int, default=16, help="chunks of each short call")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--modes", default="async,sync")
    parser.add_argument("--variants", default="before,none,noop,otel,prometheus")
    parser.add_argument("--baseline", metavar="REV", help="git revision for the 'before' rows")
    parser.add_argument("--quick", action="store_true", help="2,000 chunks, 10 calls, 2 rounds")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.mode, args.url)
        return 0
    if args.quick:
        args.chunks, args.calls, args.rounds = 2_000, 10, 2
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    if "before" in variants and not args.baseline:
        variants.remove("before")
    for name, module in (("otel", "opentelemetry.sdk"), ("prometheus", "prometheus_client")):
        if name in variants and importlib.util.find_spec(module) is None:
            print(f"{module} is not installed: skipping the {name} rows.")
            variants.remove(name)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    print(
        f"{args.chunks:,} chunks per long stream, {args.calls} calls of {args.short} chunks, "
        f"{args.rounds} rounds, interleaved; Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs"
    )
    samples: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, serve_in_subprocess() as url:
        baseline = _baseline_src(args.baseline, Path(tmp)) if "before" in variants else None
        workers = [
            Worker(v, m, url, baseline if v == "before" and baseline else SRC)
            for m in modes
            for v in variants
        ]
        try:
            for w in workers:  # warm-up: connections, caches, lazy imports
                w.run(min(args.chunks, 2_000), 2, args.short)
            for r in range(args.rounds):
                for w in workers:
                    samples.setdefault(w.name, []).append(
                        w.run(args.chunks, args.calls, args.short)
                    )
                print(f"  round {r + 1}/{args.rounds} done", flush=True)
        finally:
            for w in workers:
                w.close()

    print()
    head = f"{'CPU us/chunk':>13} {'(spread)':>9} {'CPU us/call':>12} {'(spread)':>9}"
    print(f"{'row':<18} {head}  what")
    print("-" * 100)
    for w_name, runs in samples.items():
        per_chunk = [s["long"] / args.chunks * 1e6 for s in runs]
        per_call = [s["short"] / args.calls * 1e6 for s in runs]
        variant = w_name.split()[1]
        print(
            f"{w_name:<18} {statistics.median(per_chunk):13.2f} "
            f"{max(per_chunk) - min(per_chunk):9.2f} {statistics.median(per_call):12.1f} "
            f"{max(per_call) - min(per_call):9.1f}  {VARIANTS[variant]}"
        )
    if args.baseline:
        print(f"(before = {args.baseline}; medians over rounds; spread = max - min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
