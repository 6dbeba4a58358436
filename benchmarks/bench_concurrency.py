"""Many concurrent streams on one event loop: client CPU, throughput and added latency.

512 streams (default) run at once in one process, on one asyncio event loop, against a
server in another process that sends each stream one token every 20 ms (50 tokens/s,
25,600 chunks/s in total), so the server's CPU is not counted. Each chunk's text is the
server's ``time.monotonic()`` when it wrote the chunk; the consumer stamps its own
``time.monotonic()`` when ``async for`` hands it the text (CLOCK_MONOTONIC is one clock
for every process of the machine), so

* added delay = consumer arrival - server send, per chunk (socket, HTTP, SSE, parsing,
  the read-ahead hand-off and the event loop's queueing behind the other streams);
* gap jitter = consumer gap - server gap, between consecutive chunks of a stream.

Streams start staggered over one token interval (requests arrive at different times).
``--lockstep`` starts them all at once, so every stream's token lands in the same
millisecond, like one vLLM decode step for a whole batch: the last of 512 chunks then
waits for the other 511 to be processed, whatever the client.

Clients are interleaved: each measured round runs every client in turn, each in a fresh
process after a warm-up round (connections opened and pooled), so that whatever the machine
does meanwhile falls on all of them alike; the rounds' samples are merged exactly (no
averaging of percentiles). Besides the latencies and TTFT (first content chunk at the
consumer - the request's start), each worker reports the garbage collector's pauses
(``gc.callbacks``), and the parent reports what the machine itself adds: the CPU time its
hypervisor took from this VM (``steal`` in ``/proc/stat``) while the client ran, and how
late a quiet process wakes from a 1 ms sleep. The verdict checks llmstream's rows against
the targets, from the same run: p99 added delay at most the httpx recipe's and at most 2x
the raw floor's + 2 ms, CPU per chunk within 2x the floor's. When the raw floor (no HTTP
library at all) is slow too, the machine sets the tail, not the client.
``--find-max CLIENT`` searches the largest number of streams CLIENT holds with p99 added
delay under 20 ms. ``--gc-threshold`` and ``--gc-freeze`` apply the
same garbage-collector tuning to every client; ``--loop uvloop`` runs every client on
uvloop. The server is ``vllm_sse_server.py --delay``: the
emulator (``llmstream.testing.FakeVLLM``) does not sustain this rate, see
``--emulator``, which measures what it sustains.

Run::

    PYTHONPATH=src python benchmarks/bench_concurrency.py              # ~30 s
    PYTHONPATH=src python benchmarks/bench_concurrency.py --quick      # a few seconds
    PYTHONPATH=src python benchmarks/bench_concurrency.py --emulator   # FakeVLLM's capacity
    PYTHONPATH=src python benchmarks/bench_concurrency.py --gc-threshold 10000 --gc-freeze
    PYTHONPATH=src python benchmarks/bench_concurrency.py --find-max llmstream-async
    PYTHONPATH=src python benchmarks/bench_concurrency.py --streams 256 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent / "src"))  # after PYTHONPATH, which wins

from vllm_sse_server import serve_in_subprocess  # noqa: E402

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
MESSAGES = [{"role": "user", "content": "Hi"}]
CLIENTS = {
    "llmstream-async": "llmstream AsyncClient.stream, async for text (defaults: httpx)",
    "llmstream-aiohttp": "the same, with transport=llmstream.AiohttpTransport()",
    "llmstream-async-pull": "llmstream-async with buffer=0: no read-ahead, no reader task",
    "llmstream-aiohttp-pull": "llmstream-aiohttp with buffer=0: no read-ahead, no reader task",
    "llmstream-asyncio": "the same, with transport=llmstream.AsyncioTransport()",
    "llmstream-asyncio-pull": "llmstream-asyncio with buffer=0: no read-ahead, no reader task",
    "hand-rolled": "httpx.AsyncClient + httpx_sse.aconnect_sse + json.loads",
    "aiohttp": "aiohttp.ClientSession, its body split into events by hand + json.loads",
    "httpx2": "httpx2.AsyncClient (pydantic's httpx fork), the same as aiohttp's row",
    "openai": "openai AsyncOpenAI chat.completions.create(stream=True)",
    "raw-floor": "asyncio Protocol, one connection per request, finds content (floor)",
}

EMULATOR = r"""
import sys
from llmstream.testing import FakeVLLM
fake = FakeVLLM(
    tokens=[" tok"] * int(sys.argv[1]), token_delay=float(sys.argv[2]), model=sys.argv[3]
)
with fake.serve() as server:
    print("URL", server.base_url, flush=True)
    sys.stdin.read()
"""


def _limits():
    import httpx

    # httpx allows 100 connections per client by default: stream 101 would wait for a
    # free one. Every pool here is unbounded, so 512 streams really run at once.
    return httpx.Limits(max_connections=None, max_keepalive_connections=None)


SHARDS = 16


def _pools(factory, streams: int, pool: str) -> list:
    """One shared client, one client (and pool) per stream, or ``SHARDS`` clients shared."""
    if pool == "shared":
        return [factory()] * streams
    if pool == "sharded":
        made = [factory() for _ in range(min(SHARDS, streams))]
        return [made[i % len(made)] for i in range(streams)]
    return [factory() for _ in range(streams)]


def _aiohttp_transport() -> dict[str, object]:
    import llmstream

    return {"transport": llmstream.AiohttpTransport()}


def _asyncio_transport() -> dict[str, object]:
    import llmstream

    return {"transport": llmstream.AsyncioTransport()}


def _pull(transport: Callable[[], dict[str, object]]) -> Callable[[], dict[str, object]]:
    return lambda: {**transport(), "buffer": 0}


# llmstream's rows: the client's keyword arguments for each transport (made per client).
LLMSTREAM_TRANSPORTS = {
    "llmstream-async": dict,
    "llmstream-aiohttp": _aiohttp_transport,
    "llmstream-async-pull": _pull(dict),
    "llmstream-aiohttp-pull": _pull(_aiohttp_transport),
    "llmstream-asyncio": _asyncio_transport,
    "llmstream-asyncio-pull": _pull(_asyncio_transport),
}


async def _open_llmstream(
    url: str, streams: int, pool: str, buffer: int | None = None, backend: str = ""
):
    import llmstream

    def make():
        # llmstream's own connection pool, as a user gets it (DEFAULT_LIMITS).
        options = LLMSTREAM_TRANSPORTS[backend]()
        if buffer is not None:
            options["buffer"] = buffer
        return llmstream.AsyncClient(url, model=MODEL, api_key="bench", **options)

    clients = _pools(make, streams, pool)

    async def stream(i: int, n: int, on_text) -> None:
        async with clients[i].stream(MESSAGES, max_tokens=n) as s:
            async for text in s:
                on_text(text)

    async def close() -> None:
        for client in {id(c): c for c in clients}.values():
            await client.aclose()

    return stream, close


async def _open_hand_rolled(url: str, streams: int, pool: str):
    import httpx
    from httpx_sse import aconnect_sse

    clients = _pools(lambda: httpx.AsyncClient(limits=_limits(), timeout=60), streams, pool)

    async def stream(i: int, n: int, on_text) -> None:
        body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": n}
        async with aconnect_sse(clients[i], "POST", url + "/chat/completions", json=body) as source:
            async for sse in source.aiter_sse():
                if sse.data == "[DONE]":
                    break
                choices = json.loads(sse.data)["choices"]
                if choices and choices[0]["delta"].get("content"):
                    on_text(choices[0]["delta"]["content"])

    async def close() -> None:
        for http in {id(c): c for c in clients}.values():
            await http.aclose()

    return stream, close


async def _open_aiohttp(url: str, streams: int, pool: str):
    import aiohttp

    def make():
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    sessions = _pools(make, streams, pool)

    async def stream(i: int, n: int, on_text) -> None:
        body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": n}
        async with sessions[i].post(url + "/chat/completions", json=body) as response:
            pending: bytes | None = b""
            async for data in response.content.iter_any():
                pending = _split_events(pending, data, on_text)
                if pending is None:
                    return

    async def close() -> None:
        for session in {id(s): s for s in sessions}.values():
            await session.close()

    return stream, close


def _split_events(pending: bytes, data: bytes, on_text) -> bytes | None:
    """The recipe rows' SSE handling: complete events out of ``pending + data``;
    returns what is left, or None at ``[DONE]``."""
    *events, pending = (pending + data).split(b"\n\n")
    for event in events:
        for line in event.split(b"\n"):
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                return None
            choices = json.loads(line[6:])["choices"]
            if choices and choices[0]["delta"].get("content"):
                on_text(choices[0]["delta"]["content"])
    return pending


async def _open_httpx2(url: str, streams: int, pool: str):
    import httpx2

    def make():
        limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
        return httpx2.AsyncClient(limits=limits, timeout=60)

    clients = _pools(make, streams, pool)

    async def stream(i: int, n: int, on_text) -> None:
        body = {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": n}
        url_ = url + "/chat/completions"
        async with clients[i].stream("POST", url_, json=body) as response:
            pending: bytes | None = b""
            async for data in response.aiter_raw():
                pending = _split_events(pending, data, on_text)
                if pending is None:
                    return

    async def close() -> None:
        for client in {id(c): c for c in clients}.values():
            await client.aclose()

    return stream, close


async def _open_openai(url: str, streams: int, pool: str):
    import httpx2
    from openai import AsyncOpenAI

    def make():
        http = httpx2.AsyncClient(
            limits=httpx2.Limits(max_connections=None, max_keepalive_connections=None),
            timeout=60,
        )
        return AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, http_client=http)

    clients = _pools(make, streams, pool)

    async def stream(i: int, n: int, on_text) -> None:
        s = await clients[i].chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, max_tokens=n
        )
        async for chunk in s:
            if chunk.choices and chunk.choices[0].delta.content:
                on_text(chunk.choices[0].delta.content)

    async def close() -> None:
        for client in {id(c): c for c in clients}.values():
            await client.close()

    return stream, close


async def _open_raw_floor(url: str, streams: int, pool: str):
    """The least one event loop can do per chunk: a Protocol, no HTTP library, no JSON."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port, path = parts.hostname, parts.port, parts.path + "/chat/completions"
    loop = asyncio.get_running_loop()
    marker = b'"content":"'

    class Floor(asyncio.Protocol):
        def __init__(self, on_text, done: asyncio.Future) -> None:
            self.on_text, self.done, self.tail = on_text, done, b""

        def data_received(self, data: bytes) -> None:
            data = self.tail + data
            at = data.find(marker)
            while at >= 0:
                end = data.find(b'"', at + len(marker))
                if end < 0:
                    break
                if end > at + len(marker):  # the role and finish chunks carry ""
                    self.on_text(data[at + len(marker) : end].decode())
                at = data.find(marker, end)
            self.tail = data[at:] if at >= 0 else data[-len(marker) :]
            if b"[DONE]" in data and not self.done.done():
                self.done.set_result(None)

        def connection_lost(self, exc: Exception | None) -> None:
            if not self.done.done():
                self.done.set_result(None)

    async def stream(i: int, n: int, on_text) -> None:
        body = json.dumps(
            {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": n}
        ).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        done = loop.create_future()
        transport, _ = await loop.create_connection(lambda: Floor(on_text, done), host, port)
        transport.write(head.encode() + body)
        try:
            await done
        finally:
            transport.close()

    async def close() -> None:
        pass

    return stream, close


OPENERS = {
    "llmstream-async": _open_llmstream,
    "llmstream-aiohttp": _open_llmstream,
    "llmstream-async-pull": _open_llmstream,
    "llmstream-aiohttp-pull": _open_llmstream,
    "llmstream-asyncio": _open_llmstream,
    "llmstream-asyncio-pull": _open_llmstream,
    "hand-rolled": _open_hand_rolled,
    "aiohttp": _open_aiohttp,
    "httpx2": _open_httpx2,
    "openai": _open_openai,
    "raw-floor": _open_raw_floor,
}


def _percentile(ordered: list[float], p: float) -> float:
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)] if ordered else float("nan")


# A stream's first chunks arrive while the other streams of the burst are still opening,
# and wait behind their set-up: the delays of the chunks after each stream's first OPENING
# are also reported apart.
OPENING = 3


async def _round(open_stream, streams: int, tokens: int, delay: float, lockstep: bool):
    """One round: (wall, cpu, added delays, gap jitters, times to first token, added
    delays after each stream's first OPENING chunks)."""
    now = time.monotonic
    added: list[float] = []
    jitter: list[float] = []
    ttft: list[float] = []
    settled: list[float] = []

    async def one(i: int) -> None:
        if not lockstep:
            await asyncio.sleep(i * delay / streams)
        last: list[float] = []
        seen = [0]  # chunks this stream has delivered
        opened = now()

        def on_text(text: str) -> None:
            arrived = now()
            try:
                sent = float(text)
            except ValueError:
                sent = math.nan  # the emulator does not stamp its chunks
            if last:
                jitter.append((arrived - last[0]) - (sent - last[1]))
            else:
                ttft.append(arrived - opened)
            added.append(arrived - sent)
            if seen[0] >= OPENING:
                settled.append(arrived - sent)
            seen[0] += 1
            last[:] = [arrived, sent]

        await open_stream(i, tokens, on_text)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(streams)))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return wall, cpu, added, jitter, ttft, settled


def worker(name: str, url: str, args: argparse.Namespace) -> None:
    """Run ``args.rounds`` measured rounds of one client; print its raw samples as JSON."""
    streams, tokens, delay = args.streams, args.tokens, args.delay
    rounds, lockstep = args.rounds, args.lockstep

    pauses = _GCPauses()
    if args.gc_threshold:
        gc.set_threshold(args.gc_threshold, *gc.get_threshold()[1:])

    async def main() -> dict[str, object]:
        opener = OPENERS[name]
        if name.startswith("llmstream"):
            opener = functools.partial(opener, buffer=args.buffer, backend=name)
        open_stream, close = await opener(url, streams, args.pool)
        wall = cpu = 0.0
        added: list[float] = []
        jitter: list[float] = []
        ttft: list[float] = []
        settled: list[float] = []
        try:
            await _round(open_stream, streams, min(tokens, 5), delay, lockstep)  # warm-up
            if args.gc_freeze:
                gc.collect()
                gc.freeze()  # what survived start-up is never scanned again
            gc.callbacks.append(pauses.callback)
            for _ in range(rounds):
                w, c, a, j, t, s = await _round(open_stream, streams, tokens, delay, lockstep)
                wall += w
                cpu += c
                added += a
                jitter += j
                ttft += t
                settled += s
        finally:
            if pauses.callback in gc.callbacks:
                gc.callbacks.remove(pauses.callback)
            await close()
        return {
            "wall": wall,
            "cpu": cpu,
            "expected": streams * tokens * rounds,
            "rounds": rounds,
            "added": added,
            "jitter": jitter,
            "ttft": ttft,
            "settled": settled,
            "gc_total": pauses.total,
            "gc_max": pauses.longest,
            "gc_full": pauses.full,
        }

    if args.loop == "uvloop":
        import uvloop

        result = uvloop.run(main())
    else:
        result = asyncio.run(main())
    print(json.dumps(result), flush=True)


class _Samples:
    """One client's samples over its rounds, merged exactly (no averaging of percentiles)."""

    def __init__(self) -> None:
        self.wall = self.cpu = self.gc_total = self.gc_max = self.steal_sum = 0.0
        self.expected = self.rounds = self.gc_full = self.runs = 0
        self.added: list[float] = []
        self.jitter: list[float] = []
        self.ttft: list[float] = []
        self.settled: list[float] = []

    def add(self, run: dict) -> None:
        self.runs += 1
        for key in ("wall", "cpu", "gc_total", "expected", "rounds", "gc_full"):
            setattr(self, key, getattr(self, key) + run[key])
        self.gc_max = max(self.gc_max, run["gc_max"])
        self.steal_sum += run["steal"]
        self.added += run["added"]
        self.jitter += run["jitter"]
        self.ttft += run["ttft"]
        self.settled += run["settled"]

    def summary(self) -> dict[str, float]:
        added, jitter, ttft = sorted(self.added), sorted(self.jitter), sorted(self.ttft)
        chunks = len(added)
        ms = 1e3
        return {
            "chunks": chunks,
            "expected": self.expected,
            "throughput": chunks / self.wall,
            "cpu_us": self.cpu / chunks * 1e6 if chunks else math.nan,
            "cpu_load": self.cpu / self.wall,
            "added_p50": _percentile(added, 0.5) * ms,
            "added_p99": _percentile(added, 0.99) * ms,
            "added_max": added[-1] * ms if added else math.nan,
            "jitter_p99": _percentile(jitter, 0.99) * ms,
            "ttft_p50": _percentile(ttft, 0.5) * ms,
            "ttft_p99": _percentile(ttft, 0.99) * ms,
            "settled_p99": _percentile(sorted(self.settled), 0.99) * ms,
            "gc_ms_per_round": self.gc_total / self.rounds * ms,
            "gc_max_ms": self.gc_max * ms,
            "gc_full": self.gc_full,
            "steal": self.steal_sum / self.runs,
        }


class _GCPauses:
    """The garbage collector's pauses: their total, the longest, how many were full."""

    def __init__(self) -> None:
        self.total = self.longest = self._started = 0.0
        self.full = 0

    def callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        self.total += took
        self.longest = max(self.longest, took)
        self.full += info["generation"] == 2


def _run_worker(name: str, url: str, args: argparse.Namespace) -> dict[str, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [*filter(None, [env.get("PYTHONPATH")]), str(HERE.parent / "src")]
    )
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--url", url]
    cmd += ["--streams", str(args.streams), "--tokens", str(args.tokens)]
    cmd += ["--delay", str(args.delay), "--rounds", str(args.rounds)]
    cmd += ["--pool", args.pool, "--loop", args.loop] + (["--lockstep"] if args.lockstep else [])
    cmd += ["--gc-threshold", str(args.gc_threshold)] + (["--gc-freeze"] if args.gc_freeze else [])
    cmd += ["--buffer", str(args.buffer)] if args.buffer is not None else []
    before = _cpu_ticks()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, timeout=600, check=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    result["steal"] = _steal_share(before, _cpu_ticks())
    return result


def _cpu_ticks() -> list[int]:
    """The machine's CPU time by kind (``/proc/stat``'s ``cpu`` line), or [] off Linux."""
    try:
        with open("/proc/stat") as stat:
            return [int(field) for field in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return []


def _steal_share(before: list[int], after: list[int]) -> float:
    """The share of the machine's CPU time its hypervisor took between two readings."""
    if len(before) < 8 or len(after) < 8:
        return math.nan
    spent = [b - a for a, b in zip(before[:8], after[:8], strict=True)]
    total = sum(spent)  # user nice system idle iowait irq softirq steal (guest is in user)
    return spent[7] / total if total else math.nan


def _timer_lateness(samples: int = 1000, interval: float = 0.001) -> tuple[float, float, float]:
    """How late a quiet process wakes from ``interval`` sleeps: p50, p99 and max, in ms."""
    late = []
    for _ in range(samples):
        start = time.perf_counter()
        time.sleep(interval)
        late.append((time.perf_counter() - start - interval) * 1e3)
    late.sort()
    return _percentile(late, 0.5), _percentile(late, 0.99), late[-1]


# The rows that need a library of their own, which the comparison does not install.
NEEDS = {
    "openai": ["openai", "httpx2"],
    "aiohttp": ["aiohttp"],
    "llmstream-aiohttp": ["aiohttp"],
    "llmstream-aiohttp-pull": ["aiohttp"],
    "httpx2": ["httpx2"],
}


def _missing(name: str) -> list[str]:
    return [module for module in NEEDS.get(name, []) if importlib.util.find_spec(module) is None]


def _emulator(args: argparse.Namespace) -> int:
    """How fast FakeVLLM (in its own process) serves the same load."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [*filter(None, [env.get("PYTHONPATH")]), str(HERE.parent / "src")]
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", EMULATOR, str(args.tokens), str(args.delay), MODEL],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[1]
        cpu0 = _child_cpu(proc.pid)
        samples = _Samples()
        samples.add(_run_worker("llmstream-async", url, args))
        r = samples.summary()
        server_cpu = _child_cpu(proc.pid) - cpu0
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=30)
    target = args.streams / args.delay
    print(
        f"FakeVLLM(token_delay={args.delay}).serve() in its own process, {args.streams} "
        f"streams x {args.tokens} tokens, llmstream-async client:"
    )
    print(f"  throughput       {r['throughput']:10,.0f} chunks/s  (target {target:,.0f})")
    ideal = (args.tokens - 1) * args.delay
    print(
        f"  round            {samples.wall / args.rounds:10.2f} s      "
        f"(a stream's ideal {ideal:.2f} s at {1 / args.delay:.0f} tokens/s)"
    )
    print(f"  emulator CPU     {server_cpu:10.2f} s  for {r['chunks']:,} chunks")
    print(f"  client CPU       {r['cpu_us']:10.1f} us/chunk")
    ok = r["throughput"] >= 0.95 * target
    print(
        "  => the emulator "
        + ("sustains" if ok else "does NOT sustain")
        + f" {args.streams} x {1 / args.delay:.0f} tokens/s"
    )
    return 0


def _child_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Concurrent streams on one event loop.")
    parser.add_argument("--streams", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=100, help="content chunks per stream")
    parser.add_argument("--delay", type=float, default=0.02, help="seconds between tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lockstep", action="store_true", help="start every stream at once")
    parser.add_argument(
        "--pool",
        choices=["shared", "sharded", "per-stream"],
        default="shared",
        help="one HTTP client for every stream, 16 shared round-robin, or one per stream",
    )
    parser.add_argument(
        "--gc-threshold",
        type=int,
        default=0,
        help="gc.set_threshold(N) for the youngest generation in every client (0: Python's)",
    )
    parser.add_argument(
        "--gc-freeze", action="store_true", help="gc.freeze() after each client's warm-up"
    )
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument(
        "--buffer", type=int, help="llmstream's read-ahead in chunks (default: its own, 64)"
    )
    parser.add_argument("--clients", default=",".join(CLIENTS), help="comma-separated subset")
    parser.add_argument("--quick", action="store_true", help="64 streams x 20 tokens, 1 round")
    parser.add_argument("--emulator", action="store_true", help="measure FakeVLLM instead")
    parser.add_argument(
        "--find-max", metavar="CLIENT", help="the most streams CLIENT holds at p99 < --max-delay"
    )
    parser.add_argument(
        "--max-delay", type=float, default=20.0, help="--find-max's limit, in ms (20)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.streams, args.tokens, args.rounds = 64, 20, 1
    if args.worker:
        worker(args.worker, args.url, args)
        return 0
    if args.emulator:
        return _emulator(args)

    if args.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        print("--loop uvloop needs uvloop: pip install uvloop")
        return 2
    names = [n.strip() for n in args.clients.split(",") if n.strip()]
    for name in list(names):
        missing = _missing(name)
        if missing:
            print(f"skipping the {name} row: pip install {' '.join(missing)}")
            names.remove(name)
    target = args.streams / args.delay
    print(
        f"{args.streams} concurrent streams x {args.tokens} tokens, one every "
        f"{args.delay * 1e3:g} ms ({target:,.0f} chunks/s offered), {args.rounds} rounds, "
        f"{'lockstep' if args.lockstep else 'staggered'} starts, {args.pool} pool, "
        f"{args.loop} loop, GC {_gc_setting(args)}; {os.cpu_count()} CPUs"
    )
    late = _timer_lateness()
    print(
        f"machine: a quiet process wakes from a 1 ms sleep {late[0]:.2f} ms late at p50, "
        f"{late[1]:.2f} ms at p99, {late[2]:.2f} ms at worst"
    )
    if args.find_max:
        return _find_max(args.find_max, args, args.max_delay)
    with serve_in_subprocess(delay=args.delay) as url:
        results = _interleaved(names, url, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}))
    print()
    print(
        f"{'client':<22} {'chunks/s':>9} {'CPU us/chunk':>13} {'CPU load':>9} "
        f"{'added p50':>10} {'added p99':>10} {'added max':>10} {'jitter p99':>11} "
        f"{'TTFT p50':>9} {'TTFT p99':>9}"
    )
    print("-" * 121)
    for name, r in results.items():
        print(
            f"{name:<22} {r['throughput']:9,.0f} {r['cpu_us']:13.1f} "
            f"{r['cpu_load'] * 100:8.0f}% {r['added_p50']:8.2f}ms {r['added_p99']:8.2f}ms "
            f"{r['added_max']:8.2f}ms {r['jitter_p99']:9.2f}ms "
            f"{r['ttft_p50']:7.1f}ms {r['ttft_p99']:7.1f}ms"
        )
        if r["chunks"] != r["expected"]:
            print(f"  !! {name} received {r['chunks']} chunks, expected {r['expected']}")
    print()
    print(
        f"{'client':<22} {'GC ms/round':>12} {'GC longest':>11} {'full GCs':>9} {'steal':>7} "
        f"{'p99 once open':>14}"
    )
    print("-" * 80)
    for name, r in results.items():
        print(
            f"{name:<22} {r['gc_ms_per_round']:10.0f}ms {r['gc_max_ms']:9.1f}ms "
            f"{r['gc_full']:9.0f} {r['steal'] * 100:6.0f}% {r['settled_p99']:12.2f}ms"
        )
    print()
    print(
        "added = consumer arrival - server send (both time.monotonic()); jitter = consumer "
        "gap - server gap;\nCPU load = client CPU / wall (100% = one core); GC = the "
        "collector's pauses in the client;\nsteal = the machine's CPU time its hypervisor "
        "took while the client ran;\nTTFT = first content chunk at the consumer - "
        "the request's start (the server waits one token interval before it);\n"
        f"p99 once open = the added delay's p99 from each stream's chunk {OPENING + 1} on "
        "(the first ones wait behind the burst of opens)."
    )
    _verdict(results, args.streams)
    return 0


def _gc_setting(args: argparse.Namespace) -> str:
    threshold = args.gc_threshold or gc.get_threshold()[0]
    return f"threshold {threshold}" + (", frozen after warm-up" if args.gc_freeze else "")


def _interleaved(names: list[str], url: str, args: argparse.Namespace) -> dict[str, dict]:
    """Round by round, every client in turn (each round a fresh process after a warm-up),
    so that whatever the machine does meanwhile falls on every client alike."""
    samples = {name: _Samples() for name in names}
    one_round = argparse.Namespace(**{**vars(args), "rounds": 1})
    for index in range(args.rounds):
        for name in names:
            samples[name].add(_run_worker(name, url, one_round))
        print(f"  round {index + 1}/{args.rounds} done", flush=True)
    return {name: s.summary() for name, s in samples.items()}


def _verdict(results: dict[str, dict[str, float]], streams: int) -> None:
    """The targets: at most the recipe's p99 and 2x the floor's + 2 ms; CPU within 2x."""
    floor, recipe = results.get("raw-floor"), results.get("hand-rolled")
    if floor is None:
        return
    limit = 2 * floor["added_p99"] + 2.0
    print(f"\ntargets at {streams} streams (from the same run):")
    for name, r in results.items():
        if not name.startswith("llmstream"):
            continue
        checks = [
            (
                f"p99 {r['added_p99']:.2f} ms <= 2 x floor + 2 ms = {limit:.2f} ms",
                r["added_p99"] <= limit,
            ),
            (
                f"CPU {r['cpu_us']:.1f} us/chunk <= 2 x floor = {2 * floor['cpu_us']:.1f}",
                r["cpu_us"] <= 2 * floor["cpu_us"],
            ),
        ]
        if recipe is not None:
            checks.insert(
                1,
                (
                    f"p99 <= the httpx recipe's {recipe['added_p99']:.2f} ms",
                    r["added_p99"] <= recipe["added_p99"],
                ),
            )
        for text, ok in checks:
            print(f"  {name:<22} {text}: {'PASS' if ok else 'FAIL'}")
        # Not a target: where the tail comes from (the burst of opens, or every chunk).
        print(
            f"  {name:<22} (once open: p99 {r['settled_p99']:.2f} ms, the floor's "
            f"{floor['settled_p99']:.2f} ms)"
        )


def _find_max(name: str, args: argparse.Namespace, limit_ms: float = 20.0) -> int:
    """The largest number of streams ``name`` holds with p99 added delay under ``limit_ms``:
    doubling from 64, then halving the interval (to a step of 32 streams)."""

    def p99(streams: int) -> float:
        run = argparse.Namespace(**{**vars(args), "streams": streams})
        samples = _Samples()
        samples.add(_run_worker(name, url, run))
        value = samples.summary()["added_p99"]
        print(f"  {name} at {streams} streams: p99 added delay {value:.2f} ms", flush=True)
        return value

    with serve_in_subprocess(delay=args.delay) as url:
        good, bad = 0, 64
        while p99(bad) < limit_ms:
            good, bad = bad, bad * 2
            if bad > 8192:
                break
        while bad - good > 32:
            middle = (good + bad) // 2
            if p99(middle) < limit_ms:
                good = middle
            else:
                bad = middle
    print(f"{name}: holds {good} streams with p99 added delay under {limit_ms:g} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
