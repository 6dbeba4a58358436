"""One client over four vLLM replicas, one of them degraded: what routing and hedging buy.

``--calls`` chat completions (500), ``--concurrency`` at a time (32), over four emulated
replicas (:class:`llmstream.testing.FakeFleet` on loopback sockets, run in a child
process so the emulator never takes the client's CPU). The client first makes
``--warmup`` calls (300) with every replica healthy, as a client that has run a while
has; they are not measured. Then, while the calls go on, one replica is degraded in three
phases, by measured call number: its first token takes ten times as long as the others'
(calls 0-40 %), then it is down (40-70 %: connections refused, its streams under way
cut), then it is back and healthy (70-100 %). Every client resumes a stream cut mid-answer.

Strategies, each on a fresh fleet:

* ``round-robin``: the baseline without a fleet: one ``AsyncClient`` per replica (with
  the client's default retries), calls handed out in rotation, a call that fails on its
  replica moved to the next one;
* ``load-aware``: ``AsyncClient(fleet=Fleet(endpoints=...))``, the defaults;
* ``hedged``: the same with ``Fleet(hedging=Hedging())`` (hedge after the 95th
  percentile of recent first-token times, at most 10 % of calls);
* ``healthy-3``: the reference: three healthy replicas only, load-aware.

Per strategy: calls that succeeded, time to first token and end to end (p50 and p99,
measured by the caller from the start of the call, so failovers, retries and waits are
in them), chat requests each replica received (its own count), hedges as a share of
calls, and every request beyond one per call (hedges, failovers to a replica that
answered, resumes). The targets are printed with whether each is met. ``--repeat N`` runs
each strategy N times, in turn, and pools the calls of its runs: the p99 of one run of 500
calls is its 5th slowest call, which one pause of the machine (a garbage collection of the
client, another process) can set, so the pooled figure and each run's are both printed.

Run::

    PYTHONPATH=src python benchmarks/bench_fleet.py                 # ~30 s
    PYTHONPATH=src python benchmarks/bench_fleet.py --repeat 5        # ~12 min
    PYTHONPATH=src python benchmarks/bench_fleet.py --quick
    PYTHONPATH=src python benchmarks/bench_fleet.py --json fleet.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import math
import multiprocessing
import multiprocessing.connection
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import llmstream

MODEL = "llmstream/fake-model"
TEXT = (
    "PagedAttention stores the KV cache in fixed-size blocks, so memory is allocated on "
    "demand and shared between sequences."
)
STRATEGIES = ("round-robin", "load-aware", "hedged", "healthy-3")
SLOWDOWN = 10.0  # the degraded replica's first token takes this many times longer
DOWN_FROM, UP_FROM = 0.4, 0.7  # fractions of the calls: the degraded replica is down between
# The targets the fleet is built to meet (see docs/fleet.md).
MAX_P99_RATIO = 1.5  # hedged p99 TTFT over healthy-3's
MAX_HEDGES = 0.10  # hedges as a share of calls


# --- the fleet, in a child process ------------------------------------------------------


def _serve_fleet(
    conn: multiprocessing.connection.Connection, replicas: int, ttft: float, token_delay: float
) -> None:
    """The child: a FakeFleet, driven by (command, replica, value) tuples on ``conn``."""
    from llmstream.testing import FakeFleet

    with FakeFleet(replicas, text=TEXT, ttft=ttft, token_delay=token_delay) as fleet:
        conn.send(fleet.base_urls)
        while True:
            command, index, value = conn.recv()
            if command == "stop":
                break
            replica = fleet[index]
            if command == "slow":
                replica.slow(value)
            elif command == "down":
                replica.down()
            elif command == "up":
                replica.up()
            conn.send(fleet.chat_requests)
        conn.send(fleet.chat_requests)


class FleetProcess:
    """Emulated replicas served by a child process; ``urls`` once started.

    ``command()`` changes a replica and returns once done; leaving the block stops the
    fleet and leaves its per-replica chat request counts in ``chat_requests``.
    """

    def __init__(self, replicas: int, ttft: float, token_delay: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve_fleet, args=(child, replicas, ttft, token_delay), daemon=True
        )
        self.urls: list[str] = []
        self.chat_requests: list[int] = []

    def __enter__(self) -> FleetProcess:
        self._process.start()
        self.urls = self._conn.recv()
        return self

    def command(self, command: str, index: int, value: float = 0.0) -> None:
        self._conn.send((command, index, value))
        self._conn.recv()

    def counts(self) -> list[int]:
        """Chat requests each replica has received so far."""
        self._conn.send(("count", 0, 0.0))
        counts: list[int] = self._conn.recv()
        return counts

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._conn.send(("stop", 0, 0.0))
        self.chat_requests = self._conn.recv()
        self._process.join(timeout=10)


# --- one call, one strategy ---------------------------------------------------------------


@dataclass
class Call:
    """What the caller saw of one call (seconds from its start)."""

    ok: bool
    ttft: float | None = None
    total: float = 0.0
    hedged: bool = False
    error: str | None = None


async def _stream(client: object, session: str | None = None) -> Call:
    """One streamed call; the first-token time is the first text the caller receives."""
    import llmstream

    assert isinstance(client, llmstream.AsyncClient)
    start = time.perf_counter()
    ttft: float | None = None
    params = {"session": session} if session is not None else {}
    async with client.stream("Explain PagedAttention.", **params) as stream:  # type: ignore[arg-type]
        async for _ in stream:
            if ttft is None:
                ttft = time.perf_counter() - start
    result = stream.result
    return Call(True, ttft, time.perf_counter() - start, result.hedged)


# A strategy's way to make one call, and to close its clients at the end.
Caller = tuple[Callable[[], Awaitable[Call]], Callable[[], Awaitable[None]]]


def round_robin(urls: Sequence[str]) -> Caller:
    """The baseline: one client per replica in rotation, the next one on a failure."""
    import llmstream

    retry = llmstream.RetryPolicy(resume=True)  # see fleet_client()
    clients = [llmstream.AsyncClient(url, model=MODEL, retry=retry) for url in urls]
    turn = itertools.count()

    async def call() -> Call:
        start = time.perf_counter()
        first = next(turn)
        error: llmstream.LLMStreamError | None = None
        for k in range(len(clients)):
            try:
                done = await _stream(clients[(first + k) % len(clients)])
            except llmstream.LLMStreamError as exc:
                error = exc
                continue
            # Times count from the call's start, failed replicas included.
            spent = done.total
            done.total = time.perf_counter() - start
            if done.ttft is not None:
                done.ttft += done.total - spent
            return done
        return Call(False, None, time.perf_counter() - start, error=type(error).__name__)

    async def close() -> None:
        for client in clients:
            await client.aclose()

    return call, close


def fleet_client(urls: Sequence[str], hedging: llmstream.Hedging | None) -> Caller:
    """``AsyncClient(fleet=Fleet(...))``, with or without hedging."""
    import llmstream

    fleet = llmstream.Fleet([llmstream.Endpoint(url) for url in urls], model=MODEL, hedging=hedging)
    # Resume a stream cut mid-answer (the replica going down cuts some): without it such
    # a call fails whatever the routing, as a repeat would duplicate delivered text.
    client = llmstream.AsyncClient(fleet=fleet, retry=llmstream.RetryPolicy(resume=True))

    async def call() -> Call:
        start = time.perf_counter()
        try:
            return await _stream(client)
        except llmstream.LLMStreamError as exc:
            return Call(False, None, time.perf_counter() - start, error=type(exc).__name__)

    return call, client.aclose


# --- a run --------------------------------------------------------------------------------


@dataclass
class Report:
    """One strategy's numbers (seconds, shares in 0..1)."""

    strategy: str
    calls: int
    succeeded: int
    ttft_p50: float
    ttft_p99: float
    total_p50: float
    total_p99: float
    chat_requests: list[int]
    hedges: int
    extra_requests: int
    errors: dict[str, int] = field(default_factory=dict)
    runs: int = 1
    ttft_p99_runs: list[float] = field(default_factory=list)
    """Each run's own p99 first-token time, in the order of the runs."""

    @property
    def success_rate(self) -> float:
        return self.succeeded / self.calls

    @property
    def hedge_share(self) -> float:
        return self.hedges / self.calls

    @property
    def extra_share(self) -> float:
        return self.extra_requests / self.calls


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def _drive(
    call: Callable[[], Awaitable[Call]],
    calls: int,
    concurrency: int,
    at_call: dict[int, Callable[[], None]],
) -> list[Call]:
    """``calls`` calls, ``concurrency`` at a time; ``at_call[i]`` runs before call ``i``.

    The calls' outcomes, in the order of their numbers.
    """
    numbers = iter(range(calls))
    results: list[Call | None] = [None] * calls

    async def worker() -> None:
        for number in numbers:
            change = at_call.get(number)
            if change is not None:
                await asyncio.to_thread(change)
            results[number] = await call()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [r for r in results if r is not None]


@dataclass
class Run:
    """One run of a strategy: its measured calls and the chat requests each replica got."""

    calls: list[Call]
    chat_requests: list[int]


def run_strategy(strategy: str, args: argparse.Namespace) -> Run:
    """One strategy on a fresh fleet; the degraded replica is the last one."""
    import llmstream

    replicas = 3 if strategy == "healthy-3" else args.replicas
    degraded = replicas - 1
    with FleetProcess(replicas, args.ttft, args.token_delay) as fleet:
        at_call: dict[int, Callable[[], None]] = {}
        warmed: list[int] = []  # chat requests per replica once warmed up

        def measure() -> None:  # the measured calls start: the last replica turns slow
            warmed[:] = fleet.counts()
            if args.gc_freeze:
                gc.collect()
                gc.freeze()  # what the warm-up left is never scanned again
            if strategy != "healthy-3":
                fleet.command("slow", degraded, args.ttft * SLOWDOWN)

        # One run of calls: the first `warmup` with every replica healthy (what a client
        # that has been running for a while knows), then the measured ones.
        first = args.warmup
        at_call[first] = measure
        if strategy != "healthy-3":
            at_call[first + int(args.calls * DOWN_FROM)] = lambda: fleet.command("down", degraded)

            def back() -> None:  # healthy again: fast, and listening on its port
                fleet.command("slow", degraded, args.ttft)
                fleet.command("up", degraded)

            at_call[first + int(args.calls * UP_FROM)] = back
        if strategy == "round-robin":
            call, close = round_robin(fleet.urls)
        else:
            hedging = None
            if strategy == "hedged":
                hedging = llmstream.Hedging(
                    delay=args.hedge_delay,
                    percentile=args.hedge_percentile,
                    budget=args.hedge_budget,
                )
            call, close = fleet_client(fleet.urls, hedging)

        async def main() -> list[Call]:
            try:
                done = await _drive(call, first + args.calls, args.concurrency, at_call)
                return done[first:]
            finally:
                await close()

        try:
            results = asyncio.run(main())
        finally:
            gc.unfreeze()
    return Run(results, [n - w for n, w in zip(fleet.chat_requests, warmed, strict=True)])


def _ttfts(calls: Sequence[Call]) -> list[float]:
    return [c.ttft for c in calls if c.ok and c.ttft is not None]


def report(strategy: str, runs: Sequence[Run]) -> Report:
    """A strategy's numbers over its runs: percentiles of every measured call together."""
    results = [c for run in runs for c in run.calls]
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    per_run = (run.chat_requests for run in runs)
    chat_requests = [sum(counts) for counts in zip(*per_run, strict=True)]
    return Report(
        strategy=strategy,
        calls=len(results),
        succeeded=len(ok),
        ttft_p50=percentile(_ttfts(ok), 0.5),
        ttft_p99=percentile(_ttfts(ok), 0.99),
        total_p50=percentile([r.total for r in ok], 0.5),
        total_p99=percentile([r.total for r in ok], 0.99),
        chat_requests=chat_requests,
        hedges=sum(r.hedged for r in results),
        extra_requests=max(0, sum(chat_requests) - len(results)),
        errors=errors,
        runs=len(runs),
        ttft_p99_runs=[percentile(_ttfts(run.calls), 0.99) for run in runs],
    )


# --- output -------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.0f}"


def table(reports: Sequence[Report]) -> str:
    head = (
        f"{'strategy':<12} {'ok %':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'e2e p50':>8} "
        f"{'e2e p99':>8} {'hedges %':>9} {'extra %':>8}  chat requests per replica"
    )
    lines = [head, "-" * len(head)]
    for r in reports:
        lines.append(
            f"{r.strategy:<12} {100 * r.success_rate:>6.1f} {_ms(r.ttft_p50):>9} "
            f"{_ms(r.ttft_p99):>9} {_ms(r.total_p50):>8} {_ms(r.total_p99):>8} "
            f"{100 * r.hedge_share:>9.1f} {100 * r.extra_share:>8.1f}  "
            f"{' / '.join(map(str, r.chat_requests))}"
            + (f"  errors: {r.errors}" if r.errors else "")
        )
    return "\n".join(lines)


def targets(reports: Sequence[Report]) -> list[tuple[str, bool | None, str]]:
    """(target, met or None when a strategy it needs did not run, the figures)."""
    by_name = {r.strategy: r for r in reports}
    hedged, healthy = by_name.get("hedged"), by_name.get("healthy-3")
    checks: list[tuple[str, bool | None, str]] = []
    name = f"hedged p99 TTFT <= {MAX_P99_RATIO:g} x healthy-3 p99 TTFT"
    if hedged is not None and healthy is not None:
        ratio = hedged.ttft_p99 / healthy.ttft_p99
        figures = f"{_ms(hedged.ttft_p99)} ms vs {_ms(healthy.ttft_p99)} ms: {ratio:.2f} x"
        if hedged.runs > 1:
            each = [a / b for a, b in zip(hedged.ttft_p99_runs, healthy.ttft_p99_runs, strict=True)]
            met = sum(r <= MAX_P99_RATIO for r in each)
            figures += (
                f" (all {hedged.runs} runs' calls together; run by run "
                f"{', '.join(f'{r:.2f}' for r in each)} x: met in {met} of {len(each)})"
            )
        checks.append((name, ratio <= MAX_P99_RATIO, figures))
    else:
        checks.append((name, None, "needs the hedged and healthy-3 rows"))
    name = f"hedges <= {100 * MAX_HEDGES:g} % of calls"
    if hedged is not None:
        checks.append(
            (
                name,
                hedged.hedge_share <= MAX_HEDGES,
                f"{100 * hedged.hedge_share:.1f} % "
                f"({100 * hedged.extra_share:.1f} % extra requests in all)",
            )
        )
    else:
        checks.append((name, None, "needs the hedged row"))
    fleets = [r for r in reports if r.strategy in ("load-aware", "hedged")]
    name = "no failed call while a healthy replica exists (load-aware, hedged)"
    if fleets:
        failed = sum(r.calls - r.succeeded for r in fleets)
        checks.append((name, failed == 0, f"{failed} failed"))
    else:
        checks.append((name, None, "needs the load-aware or hedged row"))
    return checks


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=4, help="including the degraded one")
    parser.add_argument("--ttft", type=float, default=0.05, help="a healthy first token, s")
    parser.add_argument("--token-delay", type=float, default=0.005, help="between tokens, s")
    parser.add_argument(
        "--hedge-delay",
        type=float,
        help="seconds before a hedge (default: the 95th percentile of first-token times)",
    )
    parser.add_argument(
        "--hedge-percentile",
        type=float,
        default=0.95,
        help="without --hedge-delay: hedge after this percentile of first-token times",
    )
    parser.add_argument("--hedge-budget", type=float, default=0.1, help="hedges per call, max")
    parser.add_argument(
        "--strategies", default=",".join(STRATEGIES), help=f"any of {','.join(STRATEGIES)}"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=300,
        help="calls before the measured ones, every replica healthy, so that the hedge "
        "delay is learned from more first tokens than the window holds (0: the client "
        "starts cold, the replica already slow)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each strategy, taken in turn (round-robin run 1, load-aware run 1, ..., "
        "round-robin run 2, ...); the percentiles are of every run's calls together, as the "
        "p99 of one run of 500 calls is its 5th slowest call, which one stall of the machine "
        "can set",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="after the warm-up, move the client's objects out of the garbage collector's "
        "reach (gc.freeze()): its full collections, tens of ms here, then stop pausing calls",
    )
    parser.add_argument("--quick", action="store_true", help="60 calls, 8 at a time (~5 s)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the numbers here")
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.concurrency, args.warmup = 60, 8, 20
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = set(args.strategies) - set(STRATEGIES)
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}; pick from {list(STRATEGIES)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.replicas < 2:
        parser.error("--replicas must be at least 2 (one of them is degraded)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print(
        f"{args.warmup} calls to warm up, then {args.calls} measured, {args.concurrency} at "
        f"a time, over {args.replicas} replicas "
        f"(first token {args.ttft * 1000:.0f} ms, {args.token_delay * 1000:.0f} ms per token); "
        f"the last replica: first token x{SLOWDOWN:g} until call {int(args.calls * DOWN_FROM)}, "
        f"down until call {int(args.calls * UP_FROM)}, then healthy. Times in ms, from the "
        "start of each call."
        + (
            f" {args.repeat} runs of each strategy, on a fresh fleet each; the figures are "
            "of all their calls together."
            if args.repeat > 1
            else ""
        )
    )
    runs: dict[str, list[Run]] = {strategy: [] for strategy in args.strategies}
    for number in range(1, args.repeat + 1):
        for strategy in args.strategies:
            runs[strategy].append(run_strategy(strategy, args))
            done = f" (run {number} of {args.repeat})" if args.repeat > 1 else ""
            print(f"  {strategy} done{done}", file=sys.stderr, flush=True)
    reports = [report(strategy, runs[strategy]) for strategy in args.strategies]
    print(table(reports))
    print("\ntargets:")
    checks = targets(reports)
    for name, met, figures in checks:
        verdict = "not run" if met is None else ("met" if met else "NOT MET")
        print(f"  {verdict:<8} {name}: {figures}")
    if args.json is not None:
        data = {
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "quick")},
            "strategies": [
                {
                    **asdict(r),
                    "success_rate": r.success_rate,
                    "hedge_share": r.hedge_share,
                    "extra_share": r.extra_share,
                }
                for r in reports
            ],
            "targets": [{"target": n, "met": m, "figures": f} for n, m, f in checks],
        }
        args.json.write_text(json.dumps(data, indent=2) + "\n", "utf-8")


if __name__ == "__main__":
    main()
