"""Peak memory of a slow consumer: llmstream's bounded read-ahead vs an unbounded queue.

A consumer that sleeps 10 ms per token reads a stream the server sends as fast as it
can. llmstream's reader stops reading when its buffer is full (TCP backpressure), so
memory stays flat however long the stream; the baseline, a direct port of the
TypeScript ``streamLLMRequest`` design (a reader pushing every token into an unbounded
queue), grows with the stream.

The emulator serves from this process; each client runs in a child process whose peak
RSS (``ru_maxrss``) is the measurement. Run:

    python benchmarks/flow_memory.py                 # 10,000 and 100,000 tokens (~17 min)
    python benchmarks/flow_memory.py --tokens 2000 --sleep 0.001   # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

CHILD = r"""
import asyncio, json, resource, sys, time
import httpx

mode, base_url, sleep = sys.argv[1], sys.argv[2], float(sys.argv[3])
start_rss = None

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

def first_token():
    # Memory once everything is imported and the stream is flowing: the growth after
    # this point is what the stream's length costs.
    global start_rss
    if start_rss is None:
        start_rss = rss_kib()

async def llmstream_async():
    import llmstream
    n = 0
    async with llmstream.AsyncClient(base_url) as client:
        async with client.stream("Hi") as stream:
            async for _ in stream:
                first_token()
                n += 1
                await asyncio.sleep(sleep)
    return n

def llmstream_sync():
    import llmstream
    n = 0
    with llmstream.Client(base_url) as client, client.stream("Hi") as stream:
        for _ in stream:
            first_token()
            n += 1
            time.sleep(sleep)
    return n

async def unbounded_queue():
    # The TypeScript design: parse every event as it arrives, push each token into an
    # unbounded queue, and let the consumer pull from it at its own pace.
    queue: asyncio.Queue = asyncio.Queue()
    async def reader(client):
        body = {"model": "llmstream/fake-model", "stream": True,
                "messages": [{"role": "user", "content": "Hi"}]}
        async with client.stream("POST", base_url + "/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or [{}]
                content = choices[0].get("delta", {}).get("content")
                if content:
                    queue.put_nowait(content)
        queue.put_nowait(None)
    n = 0
    async with httpx.AsyncClient(timeout=None) as client:
        task = asyncio.create_task(reader(client))
        while (token := await queue.get()) is not None:
            first_token()
            n += 1
            await asyncio.sleep(sleep)
        await task
    return n

if mode == "llmstream-async":
    n = asyncio.run(llmstream_async())
elif mode == "llmstream-sync":
    n = llmstream_sync()
else:
    n = asyncio.run(unbounded_queue())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"tokens": n, "peak_rss_kib": peak, "growth_kib": peak - (start_rss or 0)}))
"""

MODES = ["llmstream-async", "llmstream-sync", "unbounded-queue"]


def main() -> None:
    from llmstream.testing import FakeVLLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--sleep", type=float, default=0.010, help="consumer seconds per token")
    args = parser.parse_args()

    runs = []
    servers = []
    for tokens in args.tokens:
        fake = FakeVLLM(tokens=["tok "] * tokens, max_model_len=tokens + 100)
        server = fake.serve()
        server.start()
        servers.append(server)
        for mode in MODES:
            cmd = [sys.executable, "-c", CHILD, mode, server.base_url, str(args.sleep)]
            runs.append((tokens, mode, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)))
    print(f"consumer sleeps {args.sleep * 1000:g} ms per token; peak RSS of the client process")
    print(f"{'tokens':>8}  {'client':<16} {'peak RSS':>10} {'growth after 1st token':>24}")
    for tokens, mode, proc in runs:
        out, _ = proc.communicate()
        data = json.loads(out.strip().splitlines()[-1])
        assert data["tokens"] == tokens, data
        peak, growth = data["peak_rss_kib"] / 1024, data["growth_kib"] / 1024
        print(f"{tokens:>8}  {mode:<16} {peak:>8.1f} MB {growth:>22.1f} MB")
    for server in servers:
        server.stop()


if __name__ == "__main__":
    main()
