"""Leaving a stream for any reason closes the connection at once: the server sees it.

Real loopback sockets: the emulator's server reads the socket while it waits
between tokens, like vLLM's, and records when each client went away.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import anyio
import pytest

import llmstream
from llmstream.testing import FakeServer, FakeVLLM

# Tokens come 2 s apart: a disconnect seen sooner than that was caused by the close.
SLOW = 2.0
LIMIT = 0.100


@pytest.fixture
def fake() -> FakeVLLM:
    return FakeVLLM("one two three four five", token_delay=SLOW)


@pytest.fixture
def server(fake: FakeVLLM) -> Iterator[FakeServer]:
    with fake.serve() as server:
        yield server


def _seen_after(fake: FakeVLLM, t0: float) -> float:
    disconnect = fake.wait_for_disconnect(timeout=5)
    return disconnect.time - t0


@pytest.mark.anyio
async def test_break_closes_connection_within_100ms_async(
    fake: FakeVLLM, server: FakeServer
) -> None:
    async with llmstream.AsyncClient(server.base_url) as client:
        async with client.stream("Hi") as stream:
            async for _ in stream:
                t0 = time.perf_counter()
                break
        assert stream.result.status == "cancelled"
        assert stream.result.text == "one"
    assert _seen_after(fake, t0) < LIMIT


def test_break_closes_connection_within_100ms_sync(fake: FakeVLLM, server: FakeServer) -> None:
    with llmstream.Client(server.base_url) as client:
        with client.stream("Hi") as stream:
            for _ in stream:
                t0 = time.perf_counter()
                break
        assert stream.result.status == "cancelled"
    assert _seen_after(fake, t0) < LIMIT


@pytest.mark.anyio
async def test_exception_in_block_closes_connection_async(
    fake: FakeVLLM, server: FakeServer
) -> None:
    async with llmstream.AsyncClient(server.base_url) as client:
        with pytest.raises(KeyError):
            async with client.stream("Hi") as stream:
                async for _ in stream:
                    t0 = time.perf_counter()
                    raise KeyError("consumer failed")
    assert _seen_after(fake, t0) < LIMIT
    assert stream.result.status == "cancelled"


def test_exception_in_block_closes_connection_sync(fake: FakeVLLM, server: FakeServer) -> None:
    with llmstream.Client(server.base_url) as client:
        with pytest.raises(KeyError):
            with client.stream("Hi") as stream:
                for _ in stream:
                    t0 = time.perf_counter()
                    raise KeyError("consumer failed")
    assert _seen_after(fake, t0) < LIMIT


@pytest.mark.anyio
async def test_cancelling_the_task_from_outside_closes_connection(
    fake: FakeVLLM, server: FakeServer
) -> None:
    first_token = anyio.Event()
    pieces: list[str] = []

    async def consume(client: llmstream.AsyncClient) -> None:
        async with client.stream("Hi") as stream:
            async for piece in stream:
                pieces.append(piece)
                first_token.set()

    async with llmstream.AsyncClient(server.base_url) as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume, client)
            await first_token.wait()
            # The consumer is now blocked reading the socket, waiting for token 2.
            t0 = time.perf_counter()
            tg.cancel_scope.cancel()
    assert pieces == ["one"]
    assert _seen_after(fake, t0) < LIMIT


@pytest.mark.anyio
async def test_deadline_of_an_enclosing_cancel_scope_closes_connection(
    fake: FakeVLLM, server: FakeServer
) -> None:
    async with llmstream.AsyncClient(server.base_url) as client:
        with anyio.move_on_after(0.3) as scope:
            async with client.stream("Hi") as stream:
                async for _ in stream:
                    pass
        t0 = scope.deadline
    assert scope.cancelled_caught
    assert stream.result.status == "cancelled" and stream.result.text == "one"
    # anyio's deadline is on the event loop clock; compare durations instead.
    disconnect = fake.wait_for_disconnect(timeout=5)
    started = fake.requests[-1].time
    assert disconnect.time - started < 0.3 + LIMIT + 0.2
    del t0


@pytest.mark.anyio
async def test_aclose_while_streaming_closes_connection(fake: FakeVLLM, server: FakeServer) -> None:
    async with llmstream.AsyncClient(server.base_url) as client:
        stream = client.stream("Hi")
        async with stream:
            async for _ in stream:
                t0 = time.perf_counter()
                await stream.aclose()
        assert stream.result.status == "cancelled"
    assert _seen_after(fake, t0) < LIMIT


def test_close_from_another_thread_closes_connection(fake: FakeVLLM, server: FakeServer) -> None:
    with llmstream.Client(server.base_url) as client:
        stream = client.stream("Hi")
        got_first = threading.Event()
        errors: list[BaseException] = []

        def consume() -> None:
            try:
                with stream:
                    for _ in stream:
                        got_first.set()
            except BaseException as exc:  # the read fails once the socket is closed
                errors.append(exc)

        thread = threading.Thread(target=consume)
        thread.start()
        assert got_first.wait(5)
        t0 = time.perf_counter()
        stream.close()
        assert _seen_after(fake, t0) < LIMIT
        thread.join(5)
        assert not thread.is_alive()
    for exc in errors:
        assert isinstance(exc, llmstream.LLMStreamError)


def _pool_size(http: object) -> int:
    # httpx keeps its connection pool on the transport (httpcore.ConnectionPool).
    return len(http._transport._pool.connections)  # type: ignore[attr-defined]


def test_connection_is_reused_after_a_complete_stream() -> None:
    fake = FakeVLLM("short answer")
    with fake.serve() as server, llmstream.Client(server.base_url) as client:
        for _ in range(3):
            with client.stream("Hi") as stream:
                assert "".join(stream) == "short answer"
        assert _pool_size(client._http) == 1
    assert fake.disconnects == []


@pytest.mark.anyio
async def test_connection_is_reused_after_a_complete_stream_async() -> None:
    fake = FakeVLLM("short answer")
    with fake.serve() as server:
        async with llmstream.AsyncClient(server.base_url) as client:
            for _ in range(3):
                async with client.stream("Hi") as stream:
                    assert "".join([t async for t in stream]) == "short answer"
            assert _pool_size(client._http) == 1
    assert fake.disconnects == []


# -- stopped before the response's headers arrived ---------------------------------------
# vLLM sends the headers with the first token; a long prefill keeps a request waiting there.


def _chat_requests(fake: FakeVLLM) -> int:
    return len([r for r in fake.requests if r.path.endswith("/chat/completions")])


async def _until_sent(fake: FakeVLLM) -> None:
    while not _chat_requests(fake):  # polls the emulator's record: a condition, not a delay
        await anyio.sleep(0.005)


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["aclose", "cancel"])
async def test_stopping_while_headers_are_awaited_cuts_the_request(how: str) -> None:
    fake = FakeVLLM("never sent", ttft=30)
    with fake.serve() as server:
        async with llmstream.AsyncClient(server.base_url) as client:
            stream = client.stream("hi")

            async def stop() -> None:
                await _until_sent(fake)
                await stream.aclose() if how == "aclose" else stream.cancel()

            with anyio.fail_after(5):  # not the 30 s the headers would take
                async with anyio.create_task_group() as tg:
                    tg.start_soon(stop)
                    async with stream:
                        pieces = [piece async for piece in stream]
            assert pieces == [] and stream.result.status == "cancelled"
            assert _chat_requests(fake) == 1  # stopped, not retried
            assert client._requests_in_flight == 0
            fake.wait_for_disconnect(timeout=5)  # the server saw the connection close


def test_sync_cancel_while_headers_are_awaited_sends_no_other_request() -> None:
    fake = FakeVLLM("one two", ttft=0.3)
    with fake.serve() as server, llmstream.Client(server.base_url) as client:
        stream = client.stream("hi")
        timer = threading.Thread(target=lambda: (_wait_sent_sync(fake), stream.cancel()))
        timer.start()
        with stream:
            pieces = list(stream)
        timer.join()
        assert pieces == [] and stream.result.status == "cancelled"
        assert _chat_requests(fake) == 1
        assert client._requests_in_flight == 0


def _wait_sent_sync(fake: FakeVLLM) -> None:
    deadline = time.monotonic() + 5
    while not _chat_requests(fake) and time.monotonic() < deadline:
        time.sleep(0.005)


@pytest.fixture
def error_then_stall() -> Iterator[str]:
    """A server that sends a 503's headers, then never the body it announced."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 100\r\n\r\n")
            stop.wait()
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    stop.set()
    thread.join(5)
    listener.close()


@pytest.mark.anyio
async def test_cancelled_while_reading_an_error_body_releases_the_request(
    error_then_stall: str,
) -> None:
    async with llmstream.AsyncClient(error_then_stall, model="m", retry=0) as client:
        for _ in range(3):
            with anyio.move_on_after(0.2) as scope:
                async with client.stream("hi") as stream:
                    async for _ in stream:
                        pass
            assert scope.cancelled_caught
        assert client._requests_in_flight == 0
