"""``--workers N``: the run spread over N processes, their raw samples merged in the parent.

One Python process keeps at most one core busy; past that, its own delays show up as the
server's latency. With workers, each process sends every N-th request of the schedule at
its planned time (all start at the same moment) with its share of ``--max-concurrency``,
and sends its raw samples back: the percentiles are computed once, over all of them,
never averaged across processes.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import TypeVar

import anyio
import anyio.to_thread

from ._errors import BenchError
from ._runner import LoadResult, PlannedRequest, Progress, Target, run_load
from ._signals import ignore_sigint, sigint_blocked

__all__ = ["WorkerJob", "run_async", "run_workers", "split"]

T = TypeVar("T")

_READY_TIMEOUT = 120.0  # seconds for a worker to import, connect and warm up
_START_DELAY = 0.1  # seconds between telling the workers to go and the common start


@dataclass(frozen=True)
class WorkerJob:
    """One worker's share of a run."""

    worker: int
    target: Target
    requests: Sequence[PlannedRequest]
    max_concurrency: int | None
    num_warmups: int


def split(
    target: Target,
    requests: Sequence[PlannedRequest],
    workers: int,
    *,
    max_concurrency: int | None,
    num_warmups: int,
) -> list[WorkerJob]:
    """Deal the requests round-robin over ``workers``, and the concurrency limit too.

    Example::

        [len(j.requests) for j in split(target, plan, 2, max_concurrency=3, num_warmups=0)]
    """
    jobs = []
    for w in range(workers):
        limit = None
        if max_concurrency is not None:
            limit = max_concurrency // workers + (w < max_concurrency % workers)
        jobs.append(
            WorkerJob(
                worker=w,
                target=target,
                requests=list(requests[w::workers]),
                max_concurrency=limit,
                num_warmups=num_warmups // workers + (w < num_warmups % workers),
            )
        )
    return jobs


def run_async(function: Callable[[], Awaitable[T]]) -> T:
    """Run ``function`` on asyncio, on uvloop when installed (less CPU per chunk)."""
    options = {"use_uvloop": importlib.util.find_spec("uvloop") is not None}
    return anyio.run(function, backend="asyncio", backend_options=options)


def _worker_main(conn: Connection, job: WorkerJob) -> None:
    # Ctrl-C reaches the whole process group: the parent decides, and stops the workers.
    ignore_sigint()

    async def ready() -> float:
        conn.send(("ready", job.worker))
        message = await anyio.to_thread.run_sync(conn.recv)
        go: float = message[1]
        return time.perf_counter() + (go - time.time())

    def progress(snapshot: Progress) -> None:
        conn.send(("progress", job.worker, snapshot))

    async def main() -> LoadResult:
        return await run_load(
            job.target,
            job.requests,
            max_concurrency=job.max_concurrency,
            num_warmups=job.num_warmups,
            on_progress=progress,
            ready=ready,
            worker=job.worker,
        )

    try:
        try:
            result = run_async(main)
        except Exception as exc:  # reported to the parent, which raises it as a BenchError
            conn.send(("error", job.worker, f"{type(exc).__name__}: {exc}"))
            return
        conn.send(("done", job.worker, result))
    except (OSError, EOFError):
        # The parent is gone (stopped with Ctrl-C, say): there is no one left to tell.
        return


def _total(snapshots: dict[int, Progress], total: int) -> Progress:
    p = Progress(total=total)
    for s in snapshots.values():
        p.sent += s.sent
        p.completed += s.completed
        p.failed += s.failed
        p.cancelled += s.cancelled
        p.output_chunks += s.output_chunks
    return p


def run_workers(
    jobs: Sequence[WorkerJob], on_progress: Callable[[Progress], None]
) -> list[LoadResult]:
    """Run each job in a process of its own; their results, in worker order.

    Example::

        results = run_workers(split(target, plan, 2, max_concurrency=8, num_warmups=0), show)
    """
    spawn = multiprocessing.get_context("spawn")
    total = sum(len(j.requests) for j in jobs)
    processes = []
    conns: dict[int, Connection] = {}
    try:
        for job in jobs:
            here, there = spawn.Pipe()
            process = spawn.Process(target=_worker_main, args=(there, job), daemon=True)
            with sigint_blocked():
                process.start()
            there.close()
            processes.append(process)
            conns[job.worker] = here
        snapshots: dict[int, Progress] = {}
        results: dict[int, LoadResult] = {}
        waiting_ready = set(conns)
        deadline = time.monotonic() + _READY_TIMEOUT
        while waiting_ready:
            _receive(conns, waiting_ready, snapshots, results, deadline - time.monotonic())
        go = time.time() + _START_DELAY
        for conn in conns.values():
            conn.send(("go", go))
        while len(results) < len(jobs):
            _receive(conns, set(), snapshots, results, None)
            on_progress(_total(snapshots, total))
        return [results[w] for w in sorted(results)]
    except BaseException:
        # Stopped (Ctrl-C) or failed: the workers' results are of no use any more.
        for process in processes:
            process.terminate()
        raise
    finally:
        for conn in conns.values():
            conn.close()
        for process in processes:
            process.join(5)
            if process.is_alive():
                process.terminate()
                process.join(5)


def _receive(
    conns: dict[int, Connection],
    waiting_ready: set[int],
    snapshots: dict[int, Progress],
    results: dict[int, LoadResult],
    timeout: float | None,
) -> None:
    """Handle the messages that arrive within ``timeout`` (None: 0.25 s)."""
    if timeout is not None and timeout <= 0:
        raise BenchError(
            f"worker processes {sorted(waiting_ready)} did not start within "
            f"{_READY_TIMEOUT:.0f} s; try fewer --workers."
        )
    open_conns = [c for w, c in conns.items() if w not in results]
    for conn in wait(open_conns, timeout=0.25 if timeout is None else min(timeout, 0.25)):
        assert isinstance(conn, Connection)
        worker = next(w for w, c in conns.items() if c is conn)
        try:
            message = conn.recv()
        except EOFError:
            raise BenchError(
                f"worker process {worker} exited before sending its results; "
                "see the messages above, or run with fewer --workers."
            ) from None
        kind = message[0]
        if kind == "ready":
            waiting_ready.discard(worker)
        elif kind == "progress":
            snapshots[worker] = message[2]
        elif kind == "done":
            results[worker] = message[2]
        else:
            raise BenchError(f"worker process {worker} failed: {message[2]}")
