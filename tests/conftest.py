"""Shared fixtures: both anyio backends (and asyncio on uvloop), both HTTP libraries of the
async client, the recorded vLLM vectors."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).parent / "data"


BACKENDS: list[Any] = ["asyncio", "trio"]
if importlib.util.find_spec("uvloop") is not None:
    # uvicorn's loop when it is installed: its transports and sockets are its own, not
    # asyncio's, and a client that reaches below httpx must work on them too.
    BACKENDS.append(pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"))


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return request.param


# The HTTP libraries an AsyncClient can send with, and llmstream's own HTTP/1.1 on asyncio.
# aiohttp and asyncio run only on asyncio: the tests that would run them under trio are
# deselected (test_aiohttp_transport.py and test_asyncio_transport.py check the error).
HTTP_BACKENDS = (
    ["httpx", "aiohttp", "asyncio"] if importlib.util.find_spec("aiohttp") else ["httpx", "asyncio"]
)
ASYNCIO_ONLY = ("aiohttp", "asyncio")


@pytest.fixture(params=HTTP_BACKENDS)
def async_http_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every ``AsyncClient`` the test makes (without a transport) sends with this library."""
    backend: str = request.param
    monkeypatch.setenv("LLMSTREAM_HTTP_BACKEND", backend)
    return backend


def _impossible(item: pytest.Item) -> bool:
    """aiohttp or asyncio under trio, or with an in-process transport (a socket is all
    they have)."""
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec is not None else {}
    asyncio_only = params.get("async_http_backend") in ASYNCIO_ONLY or params.get("mode") in (
        "async-aiohttp",
        "async-asyncio",
    )
    return asyncio_only and (
        params.get("anyio_backend") == "trio" or params.get("where") == "transport"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    dropped = [item for item in items if _impossible(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not _impossible(item)]


def load_vector(path: Path) -> tuple[bytes, dict[str, Any]]:
    """The SSE body and the JSON description (request + expected) of one vector."""
    return path.read_bytes(), json.loads(path.with_suffix(".json").read_text("utf-8"))


VECTOR_PATHS = sorted((DATA / "vllm").glob("*.sse")) + sorted(
    (DATA / "vllm" / "v0.33.0").glob("*.sse")
)


def vector_id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}" if path.parent.name != "vllm" else path.stem


def _fastpath_on() -> bool:
    # The gate's own first decision (environment and installed versions), without
    # deciding it for the process: tests of the gate decide it themselves.
    from llmstream import _fastpath

    return _fastpath._first_decision() is None


# For the tests that check the fast path itself (that it is taken, what only it can do):
# the suite also runs with LLMSTREAM_FASTPATH=0, where the public path must pass the rest.
requires_fastpath = pytest.mark.skipif(
    not _fastpath_on(), reason="the fast path is off (LLMSTREAM_FASTPATH=0 or versions)"
)


# -- a server that never sends its response headers ---------------------------------------


@dataclasses.dataclass
class WithheldHeaders:
    """A server that reads each request and never answers: headers held back for good."""

    base_url: str
    requests: threading.Semaphore  # released once per request received
    hung_up: threading.Event  # set when a client closed its connection

    def wait_for_request(self) -> None:
        assert self.requests.acquire(timeout=5), "the request never reached the server"


@pytest.fixture
def withheld_headers() -> Iterator[WithheldHeaders]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    server = WithheldHeaders(url, threading.Semaphore(0), threading.Event())

    def hold(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.1)
            while not stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    server.hung_up.set()
                    return
                if b"\r\n\r\n" in data:
                    server.requests.release()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=hold, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server
    stop.set()
    thread.join(5)
    listener.close()


# -- a server that ignores max_tokens ------------------------------------------------------


@dataclass
class EndlessServer:
    """A loopback server that ignores max_tokens: one chunk every few ms until cut off."""

    base_url: str
    sent: list[int] = field(default_factory=list)  # chunks sent before the client left
    gone: threading.Event = field(default_factory=threading.Event)


def _chunk(i: int) -> bytes:
    body = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}],
    }
    data = f"data: {json.dumps(body)}\n\n".encode()
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@pytest.fixture
def endless() -> Iterator[EndlessServer]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()
    server = EndlessServer(f"http://127.0.0.1:{listener.getsockname()[1]}/v1")

    def serve(conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            if data.startswith(b"GET"):  # GET /models: no context length to tell
                conn.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                return
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            sent = 0
            try:
                while sent < 2000:
                    conn.sendall(_chunk(sent))
                    sent += 1
                    time.sleep(0.005)  # the server's pace, not a synchronisation
            except OSError:
                pass
            server.sent.append(sent)
            server.gone.set()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server
    stop.set()
    thread.join(5)
    listener.close()


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A port whose listener never accepts, its backlog full: a connect waits there."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers = []
    for _ in range(8):  # what the kernel queues beyond listen(0) before it drops SYNs
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for filler in fillers:
        filler.close()
    listener.close()
