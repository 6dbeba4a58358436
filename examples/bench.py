"""Measure your own setup: concurrent streams, their latencies, throughput and client CPU.

For a load test of a server, use the command instead: ``llmstream bench`` sends requests at a
fixed concurrency or request rate and reports TTFT, TPOT, ITL and end-to-end latency with
vLLM's definitions (docs/load-testing.md). This program shows how to do the same sums in your
own code, from each result's ``metrics``.

Shows: what ``result.metrics`` (a ``StreamMetrics``) carries for each stream, time to first
token, inter-token latency (a ``LatencySummary``), completion tokens and chunks, summed up
over N concurrent streams; and ``time.process_time()`` around the run, for the CPU the client
itself spends per chunk. Every stream asks for ``--max-tokens`` tokens with vLLM's
``ignore_eos``, so that all of them are as long.

Against the built-in emulator (in a child process, so that its CPU is not counted, with a
delay before the first token and between tokens, so that the timings mean something), or
against your server when ``LLMSTREAM_BASE_URL`` is set:

    python examples/bench.py
    python examples/bench.py --streams 64 --max-tokens 256
    LLMSTREAM_BASE_URL=http://localhost:8000/v1 python examples/bench.py --streams 32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection

import llmstream
from llmstream.testing import FakeVLLM

EMULATOR_TTFT = 0.05  # seconds before the first token: a short prefill
EMULATOR_TOKEN_DELAY = 0.01  # seconds between tokens: 100 tokens/s per stream


def serve_emulator(parent: Connection, max_tokens: int) -> None:
    """Run the emulator until the parent says stop (in the child process)."""
    fake = FakeVLLM(
        tokens=[" token"] * max_tokens, ttft=EMULATOR_TTFT, token_delay=EMULATOR_TOKEN_DELAY
    )
    with fake.serve() as server:
        parent.send(server.base_url)
        with contextlib.suppress(EOFError):
            parent.recv()


@contextlib.contextmanager
def emulator_process(max_tokens: int) -> Iterator[str]:
    """The emulator in a child process, so that ``time.process_time()`` counts the client only."""
    spawn = multiprocessing.get_context("spawn")
    here, there = spawn.Pipe()
    process = spawn.Process(target=serve_emulator, args=(there, max_tokens), daemon=True)
    process.start()
    try:
        yield here.recv()
    finally:
        here.send("stop")
        process.join(10)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile, as ``LatencySummary`` computes them."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


async def one_stream(
    client: llmstream.AsyncClient, i: int, max_tokens: int
) -> llmstream.StreamMetrics:
    """One stream read to its end; its metrics."""
    prompt = f"Story {i}: tell me a long story about a lighthouse keeper."
    async with client.stream(prompt, max_tokens=max_tokens, ignore_eos=True) as stream:
        async for _ in stream:
            pass
    return stream.result.metrics


async def bench(base_url: str, streams: int, max_tokens: int) -> None:
    """Warm up, run ``streams`` streams at once, print the summary."""
    # retry=0: a failure shows instead of hiding in a retry. The client's own pool opens
    # up to 1,000 connections, so every stream really runs at once.
    async with llmstream.AsyncClient(base_url, retry=0) as client:
        # Warm-up: look the model up and open the connections, as a long-running app has.
        await asyncio.gather(*(one_stream(client, i, 1) for i in range(streams)))
        cpu, wall = time.process_time(), time.perf_counter()
        runs = [one_stream(client, i, max_tokens) for i in range(streams)]
        metrics = await asyncio.gather(*runs)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall

    ttft = [m.time_to_first_token for m in metrics if m.time_to_first_token is not None]
    itl = [m.inter_token_latency for m in metrics if m.inter_token_latency is not None]
    tokens = sum(m.completion_tokens for m in metrics)
    chunks = sum(m.chunks for m in metrics)
    print(
        f"time to first token   p50 {percentile(ttft, 0.5) * 1000:6.1f} ms"
        f"   p99 {percentile(ttft, 0.99) * 1000:6.1f} ms"
    )
    if itl:
        # Each stream summarises its own gaps: the median stream's p50, the worst one's p99.
        p50 = percentile([s.p50 for s in itl], 0.5)
        p99 = max(s.p99 for s in itl)
        print(f"inter-token latency   p50 {p50 * 1000:6.1f} ms   p99 {p99 * 1000:6.1f} ms")
    print(
        f"throughput            {tokens / wall:.0f} tokens/s overall"
        f" ({tokens} tokens in {wall:.2f} s)"
    )
    print(
        f"client CPU            {cpu / max(chunks, 1) * 1e6:.1f} us per chunk"
        f" ({chunks} chunks, {cpu * 1000:.0f} ms of CPU)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Measure concurrent streams.")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams (8)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per stream (64)")
    args = parser.parse_args()
    if args.streams < 1 or args.max_tokens < 1:
        parser.error("--streams and --max-tokens must be at least 1")
    base_url = os.environ.get("LLMSTREAM_BASE_URL")
    with contextlib.ExitStack() as stack:
        if base_url:
            where = base_url
        else:
            base_url = stack.enter_context(emulator_process(args.max_tokens))
            where = (
                f"the built-in emulator ({EMULATOR_TTFT * 1000:g} ms to the first token,"
                f" {EMULATOR_TOKEN_DELAY * 1000:g} ms per token)"
            )
        print(f"{args.streams} streams x {args.max_tokens} tokens, against {where}")
        asyncio.run(bench(base_url, args.streams, args.max_tokens))


if __name__ == "__main__":
    main()
