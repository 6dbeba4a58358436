"""A fast loopback server that streams vLLM-shaped chat completion chunks, for benchmarks.

Raw asyncio, no framework: it parses just enough HTTP/1.1 (request line, headers, a
``Content-Length`` body), keeps connections alive, and answers ``POST .../chat/completions``
with ``text/event-stream`` in chunked transfer encoding, one HTTP chunk per SSE event.
The events are byte for byte the shape vLLM 0.33.0 sends (see
``tests/data/vllm/v0.33.0/simple_chat.sse``): a role chunk, content chunks, a finish chunk,
a usage chunk when ``stream_options.include_usage`` is asked for, then ``data: [DONE]``.

The number of content chunks is the request's ``max_tokens`` (default 100).

Two modes:

* burst (``--delay 0``): the whole body of a request is built once and written as fast
  as the socket takes it; the server spends almost no CPU, so the client is the bottleneck.
* paced (``--delay 0.02``): each stream gets one content chunk every ``delay`` seconds
  on an absolute schedule. The content of each chunk is the server's
  ``time.monotonic()`` at the moment it was written (``"%.6f"``), so a client in another
  process on the same machine can compute the delay it added. One ticker drives every
  stream (1 ms slots) instead of one sleeping task per stream, so 512 streams at 50
  tokens/s cost the server little CPU.

Run it on its own (it prints ``PORT <n>`` when ready and serves until killed)::

    python benchmarks/vllm_sse_server.py --delay 0.02

or from Python with :func:`serve_in_subprocess`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
CHUNK_ID = "chatcmpl-90088eb03a5e5fd1"
CREATED = 1795480687
DEFAULT_TOKENS = 100
WRITE_SIZE = 256 * 1024

_HEAD = (
    f'{{"id":"{CHUNK_ID}","object":"chat.completion.chunk","created":{CREATED},"model":"{MODEL}",'
)


def _frame(payload: str) -> bytes:
    """One SSE event as one HTTP/1.1 chunk."""
    event = f"data: {payload}\n\n".encode()
    return b"%x\r\n%b\r\n" % (len(event), event)


ROLE = _frame(
    _HEAD + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
    '"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}'
)


def content_frame(text: str) -> bytes:
    """A content chunk carrying ``text``, framed."""
    return _frame(
        _HEAD + '"choices":[{"index":0,"delta":{"content":' + json.dumps(text) + "},"
        '"logprobs":null,"finish_reason":null,"token_ids":null}],"kv_transfer_params":null}'
    )


FINISH = _frame(
    _HEAD + '"choices":[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"stop",'
    '"stop_reason":null,"token_ids":null,"weight_versions":null}],'
    '"system_fingerprint":"vllm-0.33.0-1a2b3c4d","kv_transfer_params":null}'
)
DONE = _frame("[DONE]") + b"0\r\n\r\n"
TOKEN = content_frame(" tok")


def usage_frame(tokens: int) -> bytes:
    return _frame(
        _HEAD + '"choices":[],"usage":{"prompt_tokens":30,'
        f'"total_tokens":{30 + tokens + 1},"completion_tokens":{tokens + 1}}},'
        '"system_fingerprint":"vllm-0.33.0-1a2b3c4d"}'
    )


def tail(tokens: int, include_usage: bool) -> bytes:
    return FINISH + (usage_frame(tokens) if include_usage else b"") + DONE


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\nserver: bench\r\n\r\n"
)


def _json_response(body: object) -> bytes:
    data = json.dumps(body).encode()
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (
        len(data),
        data,
    )


class _Pacer:
    """Writes one content chunk per ``delay`` to every paced stream, from one 1 ms ticker."""

    TICK = 0.001

    def __init__(self, delay: float) -> None:
        self.slots: list[list[list]] = [[] for _ in range(max(1, round(delay / self.TICK)))]
        self.slot = 0
        self.task: asyncio.Task[None] | None = None

    def add(self, transport: asyncio.Transport, tokens: int, usage: bool) -> asyncio.Future[None]:
        done = asyncio.get_running_loop().create_future()
        # Placed in the slot just passed: its first token comes one full delay from now.
        self.slots[(self.slot - 1) % len(self.slots)].append([transport, tokens, usage, done])
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())
        return done

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        now = time.monotonic
        next_at = loop.time()
        while True:
            for entry in self.slots[self.slot]:
                transport, left = entry[0], entry[1]
                if transport.is_closing():
                    entry[1] = -1
                elif left > 0:
                    transport.write(content_frame(f"{now():.6f}"))
                    entry[1] = left - 1
                else:
                    transport.write(content_frame(f"{now():.6f}") + tail(0, entry[2]))
                    entry[1] = -1
                if entry[1] < 0 and not entry[3].done():
                    entry[3].set_result(None)
            if any(e[1] < 0 for e in self.slots[self.slot]):
                self.slots[self.slot] = [e for e in self.slots[self.slot] if e[1] >= 0]
            self.slot = (self.slot + 1) % len(self.slots)
            next_at += self.TICK
            wait = next_at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            # When late, the missed slots are served at once, back to back.


class _Connection(asyncio.Protocol):
    def __init__(self, server: _Server) -> None:
        self.server = server
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.can_write = asyncio.Event()
        self.can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._next_request()

    def _next_request(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        method, path = head[0].split(" ")[:2]
        self.busy = True
        asyncio.get_running_loop().create_task(self._answer(method, path, body))

    async def _answer(self, method: str, path: str, body: bytes) -> None:
        transport = self.transport
        assert transport is not None
        try:
            if method == "GET" and path.endswith("/models"):
                transport.write(_json_response({"object": "list", "data": [{"id": MODEL}]}))
            elif method == "POST" and path.endswith("/chat/completions"):
                request = json.loads(body or b"{}")
                tokens = int(request.get("max_tokens") or DEFAULT_TOKENS)
                usage = bool((request.get("stream_options") or {}).get("include_usage"))
                transport.write(SSE_HEAD + ROLE)
                if self.server.pacer is not None:
                    await self.server.pacer.add(transport, tokens - 1, usage)
                else:
                    await self._burst(self.server.body(tokens, usage))
            else:
                transport.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
        except Exception as exc:  # a benchmark server: report and drop the connection
            print(f"vllm_sse_server: {type(exc).__name__}: {exc}", file=sys.stderr)
            transport.close()
            return
        self.busy = False
        if not transport.is_closing():
            self._next_request()

    async def _burst(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        view = memoryview(data)
        for start in range(0, len(view), WRITE_SIZE):
            if transport.is_closing():
                return
            transport.write(view[start : start + WRITE_SIZE])
            await self.can_write.wait()


class _Server:
    def __init__(self, delay: float) -> None:
        self.pacer = _Pacer(delay) if delay > 0 else None
        self._bodies: dict[tuple[int, bool], bytes] = {}

    def body(self, tokens: int, usage: bool) -> bytes:
        key = (tokens, usage)
        if key not in self._bodies:
            if len(self._bodies) > 8:
                self._bodies.clear()
            self._bodies[key] = TOKEN * tokens + tail(tokens, usage)
        return self._bodies[key]


async def serve(port: int, delay: float) -> None:
    server = _Server(delay)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(
        lambda: _Connection(server), "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    print(f"PORT {listener.sockets[0].getsockname()[1]}", flush=True)
    async with listener:
        await listener.serve_forever()


@contextlib.contextmanager
def serve_in_subprocess(delay: float = 0.0) -> Iterator[str]:
    """Run the server in a child process; yields its base URL (``http://127.0.0.1:N/v1``)."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--delay", str(delay)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"the benchmark server did not start (got {line!r})")
        yield f"http://127.0.0.1:{int(line.split()[1])}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between tokens")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and os.environ.get("BENCH_SERVER_CPU"):
        os.sched_setaffinity(0, {int(os.environ["BENCH_SERVER_CPU"])})
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.delay))


if __name__ == "__main__":
    main()
