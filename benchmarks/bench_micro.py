"""Where each microsecond of a chunk goes: llmstream's per-chunk steps, timed in isolation.

Every step runs on the same vLLM 0.33.0 content chunk that ``bench_clients.py`` streams,
with no network: the SSE decoder, JSON parsing (``json.loads``) against pydantic
validation into ``ChatCompletionChunk``, the assembler, the session (all of these
together) fed one chunk per call and a 64 KiB read at a time, the clock, and the
read-ahead hand-off between two tasks. Each figure is the best of ``--repeat`` timings
(microseconds per chunk).

Run::

    PYTHONPATH=src python benchmarks/bench_micro.py            # ~15 s
    PYTHONPATH=src python benchmarks/bench_micro.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import timeit
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent / "src"))  # after PYTHONPATH, which wins

from vllm_sse_server import ROLE, TOKEN  # noqa: E402

from llmstream._assemble import StreamAssembler  # noqa: E402
from llmstream._chunks import ChatCompletionChunk  # noqa: E402
from llmstream._flow import AsyncReadAhead  # noqa: E402
from llmstream._metrics import MetricsRecorder  # noqa: E402
from llmstream._session import StreamSession  # noqa: E402
from llmstream._sse import SSEDecoder  # noqa: E402


def _unframe(frame: bytes) -> bytes:
    """The SSE bytes inside one HTTP chunk."""
    return frame.split(b"\r\n", 1)[1][:-2]


EVENT = _unframe(TOKEN)  # b'data: {...}\n\n'
PAYLOAD = EVENT[len(b"data: ") : -2].decode()
PER_READ = max(1, 65536 // len(EVENT))
READ = EVENT * PER_READ


def best(fn, number: int, repeat: int, per: int = 1) -> float:
    """Best time of ``fn`` over ``repeat`` timings of ``number`` calls, in us per item."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / (number * per) * 1e6


def rows(number: int, repeat: int) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    decoder = SSEDecoder()
    out.append(
        ("SSEDecoder.feed, one event per call", best(lambda: decoder.feed(EVENT), number, repeat))
    )
    out.append(
        (
            f"SSEDecoder.feed, {PER_READ} events per call",
            best(lambda: decoder.feed(READ), max(1, number // PER_READ), repeat, PER_READ),
        )
    )
    loads = json.loads
    out.append(("json.loads(payload)", best(lambda: loads(PAYLOAD), number, repeat)))
    validate = ChatCompletionChunk.model_validate_json
    out.append(
        ("ChatCompletionChunk.model_validate_json", best(lambda: validate(PAYLOAD), number, repeat))
    )
    chunk = validate(PAYLOAD)
    assembler = StreamAssembler()
    assembler.add(ChatCompletionChunk.model_validate_json(_unframe(ROLE)[6:-2]))
    out.append(("StreamAssembler.add", best(lambda: assembler.add(chunk), number, repeat)))
    metrics = MetricsRecorder(0.0)
    now = time.perf_counter
    out.append(("time.perf_counter()", best(now, number, repeat)))
    out.append(
        (
            "MetricsRecorder.chunk + token",
            best(lambda: (metrics.chunk(), metrics.token(1.0)), number, repeat),
        )
    )

    def session_one() -> None:
        session = StreamSession(started=0.0)
        feed = session.feed
        for _ in range(number):
            feed(EVENT, 1.0)

    def session_read() -> None:
        session = StreamSession(started=0.0)
        feed = session.feed
        for _ in range(max(1, number // PER_READ)):
            feed(READ, 1.0)

    out.append(("StreamSession.feed, one event per call", best(session_one, 1, repeat, number)))
    reads = max(1, number // PER_READ)
    out.append(
        (
            f"StreamSession.feed, {PER_READ} events per call",
            best(session_read, 1, repeat, reads * PER_READ),
        )
    )
    out.append(("AsyncReadAhead hand-off, 1 item per put", _handoff(number, repeat, 1)))
    out.append(
        (f"AsyncReadAhead hand-off, {PER_READ} items per put", _handoff(number, repeat, PER_READ))
    )
    return out


def _handoff(number: int, repeat: int, batch: int) -> float:
    """A reader task putting ``batch`` items at a time, a consumer getting them one by one."""

    async def run() -> float:
        buffer: AsyncReadAhead[int] = AsyncReadAhead(64)
        items = [1] * batch
        puts = max(1, number // batch)

        async def reader() -> None:
            for _ in range(puts):
                await buffer.wait_for_room()
                buffer.put(items)
                await asyncio.sleep(0)  # a network read would yield to the loop here
            buffer.end()

        start = time.perf_counter()
        task = asyncio.ensure_future(reader())
        got = 0
        while await buffer.get() is not None:
            got += 1
        await task
        return (time.perf_counter() - start) / got * 1e6

    return min(asyncio.run(run()) for _ in range(repeat))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Per-chunk costs of llmstream's steps.")
    parser.add_argument("--number", type=int, default=20_000, help="chunks per timing")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2,000 chunks, 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.number, args.repeat = 2_000, 2
    print(f"one vLLM content chunk = {len(EVENT)} bytes of SSE; best of {args.repeat}")
    for name, us in rows(args.number, args.repeat):
        print(f"  {us:8.2f} us/chunk  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
