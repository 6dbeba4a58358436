"""What llmstream itself costs to open, run and close one stream, without any network.

A transport written from the seam's protocols (``_transport.py``) answers every request at
once with a short answer held in memory (the role chunk, ``--tokens`` tokens, the finish and
usage chunks, ``[DONE]``), so the CPU time measured is llmstream's alone: building the
request, the call core, the shell's tasks and scopes, parsing, assembling the result and
closing. Streams run ``--streams`` at a time on one event loop, as a server relaying many
chats does; the number is CPU microseconds per stream.

Run::

    PYTHONPATH=src python benchmarks/bench_stream_open.py
    PYTHONPATH=src python benchmarks/bench_stream_open.py --profile tottime
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent / "src"))  # after PYTHONPATH

import llmstream
from llmstream._call import ReadFailure
from llmstream._transport import HTTPRequest


def _answer(tokens: int) -> list[bytes]:
    def event(delta: dict[str, object], finish: str | None = None) -> bytes:
        chunk = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    usage = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens},
    }
    return [
        event({"role": "assistant", "content": ""}),
        *(event({"content": " tok"}) for _ in range(tokens)),
        event({"content": ""}, "stop"),
        b"data: " + json.dumps(usage).encode() + b"\n\n" + b"data: [DONE]\n\n",
    ]


class _Response:
    status_code = 200
    reason_phrase = "OK"
    headers: Mapping[str, str] = {"content-type": "text/event-stream"}

    def __init__(self, parts: list[bytes]) -> None:
        self._parts = parts

    async def read(self, limit: int) -> bytes:
        return b""

    def stream(self, body_timeout: float | None) -> AsyncIterator[bytes]:
        return self._reads()

    async def _reads(self) -> AsyncIterator[bytes]:
        for part in self._parts:
            await asyncio.sleep(0)  # a read that waits for the network, as real ones do
            yield part

    def body_ended(self) -> None:
        pass

    def read_failure(self, exc: Exception) -> ReadFailure | None:
        return None

    def abort(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class _Transport:
    requests_in_flight = 0

    def __init__(self, tokens: int) -> None:
        self._parts = _answer(tokens)

    async def send(self, request: HTTPRequest) -> _Response:
        return _Response(self._parts)

    async def aclose(self) -> None:
        pass


async def _run(streams: int, rounds: int, tokens: int, pull: bool = False) -> float:
    client = llmstream.AsyncClient("http://bench/v1", model="m", api_key="bench")
    client._transport = _Transport(tokens)  # type: ignore[assignment]

    async def one() -> None:
        if pull:  # read when the consumer asks: no reader task
            stream = await client.stream("Hi", max_tokens=tokens)
            async for _ in stream:
                pass
        else:
            async with client.stream("Hi", max_tokens=tokens) as stream:
                async for _ in stream:
                    pass
        assert stream.result.complete

    await asyncio.gather(*(one() for _ in range(streams)))  # warm-up
    cpu = time.process_time()
    for _ in range(rounds):
        await asyncio.gather(*(one() for _ in range(streams)))
    spent = time.process_time() - cpu
    await client.aclose()
    return spent / (streams * rounds) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5, help="report the best of N runs")
    parser.add_argument("--pull", action="store_true", help="await client.stream(): no reader")
    parser.add_argument("--profile", metavar="SORT", help="cProfile one run, sorted by SORT")
    args = parser.parse_args()
    if args.profile:
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.runcall(asyncio.run, _run(args.streams, args.rounds, args.tokens, args.pull))
        pstats.Stats(profile).sort_stats(args.profile).print_stats(40)
        return
    arguments = (args.streams, args.rounds, args.tokens, args.pull)
    runs = [asyncio.run(_run(*arguments)) for _ in range(args.repeat)]
    print(
        f"{args.streams} streams at a time x {args.tokens} token(s): "
        f"{min(runs):.0f} us of CPU per stream (best of {args.repeat}; "
        f"all: {', '.join(f'{r:.0f}' for r in runs)})"
    )


if __name__ == "__main__":
    main()
