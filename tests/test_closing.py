"""Leaving a stream for any reason closes the connection at once: the server sees it.

Real loopback sockets: the emulator's server reads the socket while it waits
between tokens, like vLLM's, and records when each client went away. The async client's
tests run on httpx and on aiohttp (the ``async_http_backend`` fixture).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

import llmstream
from llmstream.testing import FakeServer, FakeVLLM

from .conftest import WithheldHeaders, requires_fastpath

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


@pytest.mark.usefixtures("async_http_backend")
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


@pytest.mark.usefixtures("async_http_backend")
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


@pytest.mark.usefixtures("async_http_backend")
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


@pytest.mark.usefixtures("async_http_backend")
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


@pytest.mark.usefixtures("async_http_backend")
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


def _async_pool_size(client: llmstream.AsyncClient) -> int:
    transport: Any = client._transport
    if isinstance(transport, llmstream.AiohttpTransport):
        # aiohttp's connector keeps its idle connections by host.
        return sum(len(idle) for idle in transport._session.connector._conns.values())
    if isinstance(transport, llmstream.AsyncioTransport):
        return sum(len(idle) for idle in transport._idle.values())
    return _pool_size(transport.http)


@requires_fastpath  # without it the sync pool keeps no idle connection: test_fastpath.py
def test_connection_is_reused_after_a_complete_stream() -> None:
    fake = FakeVLLM("short answer")
    with fake.serve() as server, llmstream.Client(server.base_url) as client:
        for _ in range(3):
            with client.stream("Hi") as stream:
                assert "".join(stream) == "short answer"
        assert _pool_size(client._http) == 1
    assert fake.disconnects == []


@pytest.mark.usefixtures("async_http_backend")
@pytest.mark.anyio
async def test_connection_is_reused_after_a_complete_stream_async() -> None:
    fake = FakeVLLM("short answer")
    with fake.serve() as server:
        async with llmstream.AsyncClient(server.base_url) as client:
            for _ in range(3):
                async with client.stream("Hi") as stream:
                    assert "".join([t async for t in stream]) == "short answer"
            assert _async_pool_size(client) == 1
    assert fake.disconnects == []


# -- stopped before the response's headers arrived ---------------------------------------
# vLLM sends its headers at once, but a proxy in front of it may hold them back until the
# first token: a request can wait there for as long as the prefill takes.


def _chat_requests(fake: FakeVLLM) -> int:
    return len([r for r in fake.requests if r.path.endswith("/chat/completions")])


async def _until_sent(fake: FakeVLLM) -> None:
    while not _chat_requests(fake):  # polls the emulator's record: a condition, not a delay
        await anyio.sleep(0.005)


@pytest.mark.usefixtures("async_http_backend")
@pytest.mark.anyio
@pytest.mark.parametrize("how", ["aclose", "cancel"])
@pytest.mark.parametrize("buffer", [64, 0], ids=["read-ahead", "pull"])
async def test_stopping_while_headers_are_awaited_cuts_the_request(how: str, buffer: int) -> None:
    # buffer=0: no reader task, the stop comes while the consumer itself reads.
    fake = FakeVLLM("never sent", ttft=30)
    with fake.serve() as server:
        async with llmstream.AsyncClient(server.base_url) as client:
            stream = client.stream("hi", buffer=buffer)

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


@pytest.mark.parametrize("how", ["close", "cancel"])
def test_sync_stop_from_another_thread_cuts_the_header_wait(
    how: str, withheld_headers: WithheldHeaders
) -> None:
    server = withheld_headers
    timeouts = llmstream.Timeouts(first_token=20)  # a failure, not a hang, if the cut fails
    # The default retry policy: a cut that were taken for a dropped connection would retry.
    with llmstream.Client(server.base_url, model="m", timeout=timeouts) as client:
        stream = client.stream("hi")
        failures: list[BaseException] = []

        def stop() -> None:
            try:
                server.wait_for_request()
                getattr(stream, how)()
            except BaseException as exc:  # reported by the test below, not lost in the thread
                failures.append(exc)

        stopper = threading.Thread(target=stop, daemon=True)
        stopper.start()
        started = time.monotonic()
        with stream:
            pieces = list(stream)
        stopper.join(5)
        assert not failures
        assert time.monotonic() - started < 10  # only the cut ends the wait this soon
        assert pieces == [] and stream.result.status == "cancelled"
        assert server.hung_up.wait(5)  # the server saw the connection close
        assert not server.requests.acquire(timeout=0.2)  # stopped, not retried
        assert client._requests_in_flight == 0


@pytest.mark.usefixtures("async_http_backend")
@pytest.mark.anyio
@pytest.mark.parametrize("how", ["aclose", "cancel"])
async def test_async_stop_cuts_the_header_wait(how: str, withheld_headers: WithheldHeaders) -> None:
    server = withheld_headers
    async with llmstream.AsyncClient(server.base_url, model="m") as client:
        stream = client.stream("hi")

        async def stop() -> None:
            await anyio.to_thread.run_sync(server.wait_for_request)
            await stream.aclose() if how == "aclose" else stream.cancel()

        with anyio.fail_after(10):  # the first-token deadline is 300 s
            async with anyio.create_task_group() as tg:
                tg.start_soon(stop)
                async with stream:
                    pieces = [piece async for piece in stream]
        assert pieces == [] and stream.result.status == "cancelled"
        assert await anyio.to_thread.run_sync(server.hung_up.wait, 5)
        assert not await anyio.to_thread.run_sync(lambda: server.requests.acquire(timeout=0.2))
        assert client._requests_in_flight == 0


@requires_fastpath
def test_sync_header_wait_also_watches_the_environments_proxy_pools(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    with llmstream.Client("http://127.0.0.1:8/v1", model="m") as client:
        mounts = list(client._http._mounts.values())  # type: ignore[attr-defined]
        assert mounts, "httpx mounted no proxy transport for HTTP_PROXY"
        for transport in [client._http._transport, *mounts]:  # type: ignore[attr-defined]
            backend = transport._pool._network_backend
            assert type(backend).__name__ == "_WatchedBackend"


def test_sync_header_wait_of_a_callers_own_http_client_is_left_alone() -> None:
    http = httpx.Client()
    backend = http._transport._pool._network_backend  # type: ignore[attr-defined]
    with llmstream.Client("http://127.0.0.1:9/v1", http_client=http):
        assert http._transport._pool._network_backend is backend  # type: ignore[attr-defined]
    http.close()


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


@pytest.mark.usefixtures("async_http_backend")
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


@pytest.mark.usefixtures("async_http_backend")
@pytest.mark.anyio
@pytest.mark.parametrize("entered", [True, False], ids=["async-with", "iterated"])
async def test_cancel_shuts_the_socket_down_before_anything_is_awaited(
    fake: FakeVLLM, server: FakeServer, entered: bool
) -> None:
    async with llmstream.AsyncClient(server.base_url) as client:
        stream = client.stream("Hi")
        async with contextlib.AsyncExitStack() as stack:
            if entered:
                await stack.enter_async_context(stream)
            async for _ in stream:
                t0 = time.perf_counter()
                stream.cancel()
                # Blocks the event loop: the close must not need another task to run.
                assert _seen_after(fake, t0) < LIMIT
                break
        await stream.aclose()
        assert stream.result.status == "cancelled"
