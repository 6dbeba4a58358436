"""CPU and wall time per streamed chunk: llmstream against the alternatives, side by side.

A loopback server in its own process (``vllm_sse_server.py``) streams vLLM-shaped chunks,
one HTTP chunk per event, as fast as the socket takes them. Each client runs in its own
long-lived worker process (so its CPU is measured alone, imports and warm-up are paid
once, and one client's garbage never lands on another's bill); the parent sends every
worker one request per round, in turn (A B C D E F, A B C D E F, ...), and reports
medians over rounds. CPU time is ``time.process_time()`` in the worker (every thread of
it, so the sync client's reader thread counts); wall time is ``time.perf_counter()``.

Run (about 1-2 minutes on 2 cores)::

    PYTHONPATH=src python benchmarks/bench_clients.py
    PYTHONPATH=src python benchmarks/bench_clients.py --quick      # a few seconds
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent / "src"))  # after PYTHONPATH, which wins

from vllm_sse_server import serve_in_subprocess  # noqa: E402
from worker_process import WorkerProcess  # noqa: E402

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
MESSAGES = [{"role": "user", "content": "Hi"}]

CLIENTS = {
    "llmstream-async": "llmstream AsyncClient.stream, async for text (defaults)",
    "llmstream-sync": "llmstream Client.stream, for text (defaults)",
    "llmstream-aiohttp": "llmstream AsyncClient on transport=AiohttpTransport()",
    "hand-rolled": "httpx.AsyncClient + httpx_sse.aconnect_sse + json.loads",
    "openai": "openai AsyncOpenAI chat.completions.create(stream=True)",
    "httpx-bytes": "httpx aiter_bytes, no parsing (reference)",
    "aiohttp-bytes": "aiohttp content.iter_any, no parsing (reference)",
    "raw-floor": "asyncio socket, counts \\n\\n (floor)",
}


# --- the clients: each sets itself up once and returns a coroutine/function per round ---


async def _setup_llmstream_async(url: str, **kwargs: object):
    import llmstream

    client = llmstream.AsyncClient(url, model=MODEL, api_key="bench", **kwargs)

    async def run(n: int) -> int:
        count = 0
        async with client.stream(MESSAGES, max_tokens=n) as stream:
            async for _text in stream:
                count += 1
        return count

    return run, client.aclose


async def _setup_llmstream_aiohttp(url: str):
    import llmstream

    return await _setup_llmstream_async(url, transport=llmstream.AiohttpTransport())


def _setup_llmstream_sync(url: str):
    import llmstream

    client = llmstream.Client(url, model=MODEL, api_key="bench")

    def run(n: int) -> int:
        count = 0
        with client.stream(MESSAGES, max_tokens=n) as stream:
            for _text in stream:
                count += 1
        return count

    return run, client.close


async def _setup_hand_rolled(url: str):
    import httpx
    from httpx_sse import aconnect_sse

    client = httpx.AsyncClient(timeout=60)
    loads = json.loads

    async def run(n: int) -> int:
        count = 0
        body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": n}
        async with aconnect_sse(client, "POST", url + "/chat/completions", json=body) as source:
            async for sse in source.aiter_sse():
                if sse.data == "[DONE]":
                    break
                chunk = loads(sse.data)
                choices = chunk["choices"]
                if choices and choices[0]["delta"].get("content"):
                    count += 1
        return count

    return run, client.aclose


async def _setup_openai(url: str):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=60)

    async def run(n: int) -> int:
        count = 0
        stream = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, max_tokens=n
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                count += 1
        return count

    return run, client.close


async def _setup_httpx_bytes(url: str):
    import httpx

    client = httpx.AsyncClient(timeout=60)

    async def run(n: int) -> int:
        events = 0
        last = b""
        body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": n}
        async with client.stream("POST", url + "/chat/completions", json=body) as response:
            async for data in response.aiter_bytes():
                events += (last + data[:1]).count(b"\n\n") + data.count(b"\n\n")
                last = data[-1:]
        return events - 3  # role, finish and [DONE] are not content

    return run, client.aclose


async def _setup_aiohttp_bytes(url: str):
    import aiohttp

    session = aiohttp.ClientSession()

    async def run(n: int) -> int:
        events = 0
        last = b""
        body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": n}
        async with session.post(url + "/chat/completions", json=body) as response:
            async for data in response.content.iter_any():
                events += (last + data[:1]).count(b"\n\n") + data.count(b"\n\n")
                last = data[-1:]
        return events - 3  # role, finish and [DONE] are not content

    return run, session.close


class _FloorProtocol(asyncio.Protocol):
    """Counts ``\\n\\n`` in what arrives; the body ends with the chunk ``0\\r\\n\\r\\n``."""

    def __init__(self) -> None:
        self.events = 0
        self.last = b""
        self.tail = b""
        self.done: asyncio.Future[int] | None = None

    def data_received(self, data: bytes) -> None:
        self.events += (self.last + data[:1]).count(b"\n\n") + data.count(b"\n\n")
        self.last = data[-1:]
        self.tail = (self.tail + data)[-7:]
        if self.tail == b"\r\n0\r\n\r\n" and self.done is not None:
            self.done.set_result(self.events)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("the server closed the connection"))


async def _setup_raw_floor(url: str):
    host, port = url.split("//")[1].split("/")[0].split(":")
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(_FloorProtocol, host, int(port))

    async def run(n: int) -> int:
        body = json.dumps(
            {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": n}
        ).encode()
        proto.events, proto.last, proto.tail = 0, b"", b""
        proto.done = loop.create_future()
        transport.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: %b:%b\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
            % (host.encode(), port.encode(), len(body), body)
        )
        # Each event has one "\n\n"; the header block ends in "\r\n\r\n" (no match).
        return await proto.done - 3

    async def close() -> None:
        transport.close()

    return run, close


SETUPS = {
    "llmstream-async": _setup_llmstream_async,
    "llmstream-sync": _setup_llmstream_sync,
    "hand-rolled": _setup_hand_rolled,
    "openai": _setup_openai,
    "httpx-bytes": _setup_httpx_bytes,
    "aiohttp-bytes": _setup_aiohttp_bytes,
    "llmstream-aiohttp": _setup_llmstream_aiohttp,
    "raw-floor": _setup_raw_floor,
}


def worker(name: str, url: str) -> None:
    """A client's process: one line ``N`` on stdin runs one stream of N chunks."""
    setup = SETUPS[name]
    loop = asyncio.new_event_loop()
    if asyncio.iscoroutinefunction(setup):
        run_async, close_async = loop.run_until_complete(setup(url))

        def run(n: int) -> int:
            return loop.run_until_complete(run_async(n))

        def close() -> None:
            loop.run_until_complete(close_async())
    else:
        run, close = setup(url)
    print("READY", flush=True)
    for line in sys.stdin:
        n = int(line)
        gc.collect()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        count = run(n)
        wall1, cpu1 = time.perf_counter(), time.process_time()
        print(json.dumps({"cpu": cpu1 - cpu0, "wall": wall1 - wall0, "count": count}), flush=True)
    close()
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


# --- the parent: starts the server and the workers, interleaves rounds, prints the table ---


class Worker(WorkerProcess):
    def __init__(self, name: str, url: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [*filter(None, [env.get("PYTHONPATH")]), str(HERE.parent / "src")]
        )
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--url", url]
        super().__init__(name, argv, env)

    def run(self, n: int) -> dict[str, float]:
        result = self.ask(f"{n}")
        if result["count"] != n:
            raise RuntimeError(f"{self.name} saw {result['count']} chunks, expected {n}")
        return result


def _available(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _fmt_ratio(value: float, target: str, ok: bool) -> str:
    return f"{value:6.2f}x   (target {target}: {'PASS' if ok else 'FAIL'})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="CPU per chunk of streaming clients.")
    parser.add_argument("--chunks", type=int, default=20_000, help="content chunks per stream")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2,000 chunks, 2 rounds")
    parser.add_argument("--clients", default=",".join(CLIENTS), help="comma-separated subset")
    parser.add_argument("--json", type=Path, help="also write the medians here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.url)
        return 0
    if args.quick:
        args.chunks, args.rounds = 2_000, 2

    names = [n.strip() for n in args.clients.split(",") if n.strip()]
    unknown = set(names) - set(CLIENTS)
    if unknown:
        parser.error(f"unknown clients: {', '.join(sorted(unknown))}")
    if "openai" in names and not _available("openai"):
        print("openai is not installed: skipping the openai row (pip install openai).")
        names.remove("openai")
    if not _available("aiohttp"):
        print('aiohttp is not installed: skipping its rows (pip install "llmstream-sdk[aiohttp]").')
        names = [name for name in names if "aiohttp" not in name]

    n = args.chunks
    print(
        f"{n:,} content chunks per stream, {args.rounds} rounds, interleaved; "
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs"
    )
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with serve_in_subprocess() as url:
        workers = [Worker(name, url) for name in names]
        try:
            for w in workers:  # warm-up: connections, caches, lazy imports
                w.run(min(n, 2_000))
            for r in range(args.rounds):
                for w in workers:
                    samples[w.name].append(w.run(n))
                print(f"  round {r + 1}/{args.rounds} done", flush=True)
        finally:
            for w in workers:
                w.close()

    cpu = {k: statistics.median(s["cpu"] for s in v) / n * 1e6 for k, v in samples.items()}
    wall = {k: statistics.median(s["wall"] for s in v) / n * 1e6 for k, v in samples.items()}
    spread = {
        k: (max(s["cpu"] for s in v) - min(s["cpu"] for s in v)) / n * 1e6
        for k, v in samples.items()
    }
    floor = cpu.get("raw-floor")
    print()
    print(
        f"{'client':<18} {'CPU us/chunk':>13} {'(spread)':>9} {'wall us/chunk':>14} "
        f"{'CPU x floor':>12}  what"
    )
    print("-" * 112)
    for name in names:
        ratio = f"{cpu[name] / floor:11.1f}x" if floor else f"{'-':>12}"
        print(
            f"{name:<18} {cpu[name]:13.2f} {spread[name]:9.2f} {wall[name]:14.2f} "
            f"{ratio}  {CLIENTS[name]}"
        )
    print()
    a = cpu.get("llmstream-async")
    if a is not None:
        if "hand-rolled" in cpu:
            r = a / cpu["hand-rolled"]
            print("llmstream-async / hand-rolled CPU:", _fmt_ratio(r, "<= 1.0", r <= 1.0))
        if "openai" in cpu:
            r = cpu["openai"] / a
            print("openai / llmstream-async CPU:     ", _fmt_ratio(r, ">= 5", r >= 5))
        if "llmstream-sync" in cpu:
            r = cpu["llmstream-sync"] / a
            print("llmstream-sync / llmstream-async: ", _fmt_ratio(r, "<= 1.15", r <= 1.15))
        if "llmstream-aiohttp" in cpu:
            print(f"llmstream-aiohttp / llmstream-async CPU: {cpu['llmstream-aiohttp'] / a:.2f}x")
    print("(spread: max - min CPU us/chunk over rounds; the server's CPU is not counted)")
    if args.json:
        args.json.write_text(json.dumps({"chunks": n, "cpu_us": cpu, "wall_us": wall}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
