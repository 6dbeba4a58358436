"""Time from cancel() (or break) to the server seeing the disconnect.

The emulator's server reads its socket while it waits between tokens, as vLLM does,
and records when each client went away (``time.perf_counter()``, same process and
clock as the client here). Each try streams from a server sending a token every
second, cancels right after the first token, and measures the gap.

    python benchmarks/cancel_latency.py              # 100 tries per way of stopping
    python benchmarks/cancel_latency.py --tries 20

With ``LLMSTREAM_PEER_VLLM_URL`` set to a vLLM peer (vLLM's own serving code with a
scripted engine; its ``/_aborts`` log uses ``time.time()``), the break case is also
measured against vLLM's abort log.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import llmstream
from llmstream.testing import FakeVLLM


def _summary(name: str, gaps: list[float]) -> str:
    ms = [g * 1000 for g in gaps]
    return (
        f"{name:<34} n={len(ms):<4} median {statistics.median(ms):6.2f} ms   "
        f"p90 {sorted(ms)[int(0.9 * (len(ms) - 1))]:6.2f} ms   worst {max(ms):6.2f} ms"
    )


async def _async_cancel(fake: FakeVLLM, base_url: str, tries: int) -> list[float]:
    gaps = []
    async with llmstream.AsyncClient(base_url) as client:
        for i in range(tries):
            async with client.stream("Hi") as stream:
                async for _ in stream:
                    t0 = time.perf_counter()
                    stream.cancel()
            gaps.append(fake.wait_for_disconnect(count=i + 1).time - t0)
    return gaps


def _sync_cancel(fake: FakeVLLM, base_url: str, tries: int, offset: int) -> list[float]:
    gaps = []
    with llmstream.Client(base_url) as client:
        for i in range(tries):
            with client.stream("Hi") as stream:
                for _ in stream:
                    t0 = time.perf_counter()
                    stream.cancel()
            gaps.append(fake.wait_for_disconnect(count=offset + i + 1).time - t0)
    return gaps


def _sync_cancel_from_thread(fake: FakeVLLM, base_url: str, tries: int, offset: int) -> list[float]:
    gaps = []
    with llmstream.Client(base_url) as client:
        for i in range(tries):
            with client.stream("Hi") as stream:
                got = threading.Event()

                def consume(s: llmstream.ChatStream = stream, ev: threading.Event = got) -> None:
                    for _ in s:
                        ev.set()

                thread = threading.Thread(target=consume)
                thread.start()
                got.wait(10)
                t0 = time.perf_counter()
                stream.cancel()
                thread.join(10)
            gaps.append(fake.wait_for_disconnect(count=offset + i + 1).time - t0)
    return gaps


def _peer_break(base_url: str, tries: int) -> list[float]:
    root = base_url.removesuffix("/v1")
    gaps = []
    with llmstream.Client(base_url) as client:
        for _ in range(tries):
            httpx.post(f"{root}/_reset")
            with client.stream("Hi", max_tokens=50, extra_body={"x_delay_ms": 500}) as stream:
                for _ in stream:
                    t0 = time.time()
                    break
            deadline = time.monotonic() + 5
            aborts: list[dict[str, float]] = []
            while not aborts and time.monotonic() < deadline:
                aborts = httpx.get(f"{root}/_aborts").json()["aborts"]
                time.sleep(0.005)  # polling vLLM's log; the timing comes from its entry
            gaps.append(aborts[0]["time"] - t0)
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=100)
    args = parser.parse_args()
    n = args.tries
    fake = FakeVLLM(tokens=["tok "] * 100, token_delay=1.0)
    with fake.serve() as server:
        rows = [
            _summary(
                "async: cancel() after 1st token",
                anyio.run(_async_cancel, fake, server.base_url, n),
            )
        ]
        rows.append(
            _summary("sync: cancel() after 1st token", _sync_cancel(fake, server.base_url, n, n))
        )
        rows.append(
            _summary(
                "sync: cancel() from another thread",
                _sync_cancel_from_thread(fake, server.base_url, n, 2 * n),
            )
        )
    peer = os.environ.get("LLMSTREAM_PEER_VLLM_URL")
    if peer:
        rows.append(_summary("vLLM peer: break -> /_aborts", _peer_break(peer, n)))
    print(f"time from cancel to the server seeing the disconnect ({n} tries each)")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
