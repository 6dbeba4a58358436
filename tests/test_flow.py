"""Flow control on real sockets: read-ahead, backpressure, pause, cancel, limits, threads.

The async client's tests run on httpx and on aiohttp.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import anyio
import pytest

import llmstream
from llmstream._body import READ_SIZE
from llmstream._flow import AsyncReadAhead
from llmstream.testing import Disconnect, FakeServer, FakeVLLM

from .drivers import MODES, SOCKET_MODES, WatchedVLLM, async_client_kwargs, collect

pytestmark = pytest.mark.anyio

LIMIT = 0.100
# More than the kernel's loopback socket buffers hold (~15 MB at ~250 bytes a chunk).
MANY = 60_000
# Events a server can write that the client does not read (~260 KB: four full reads, and
# far less than loopback socket buffers take before the server's send blocks).
UNREAD = 1000


@pytest.fixture
def endless() -> WatchedVLLM:
    return WatchedVLLM(tokens=["tok "] * MANY, max_model_len=10 * MANY)


@pytest.fixture
def server(endless: WatchedVLLM) -> Iterator[FakeServer]:
    with endless.serve() as server:
        yield server


async def _until(condition: object, timeout: float = 10.0) -> None:
    """Wait for a condition on the client's own state (checked every 5 ms)."""
    with anyio.fail_after(timeout):
        while not condition():  # type: ignore[operator]
            await anyio.sleep(0.005)


@pytest.mark.usefixtures("async_http_backend")
async def test_full_buffer_stops_reading_and_holds_the_server_back(
    endless: WatchedVLLM, server: FakeServer
) -> None:
    async with llmstream.AsyncClient(server.base_url) as client:
        async with client.stream("Hi", buffer=8) as stream:
            first = await stream.__aiter__().__anext__()
            buffer = stream._buffer
            assert buffer is not None
            await _until(lambda: buffer.full)
            received = stream.snapshot().metrics.chunks
            # The server writes on into the socket; a reader that still read would take it.
            await endless.await_events(received + UNREAD)
            assert stream.snapshot().metrics.chunks == received
            # The limit, plus at most one read's worth (each event is ~260 bytes here).
            assert len(buffer.items) <= 8 + READ_SIZE // 250
    assert first == "tok "
    disconnect = endless.wait_for_disconnect()
    assert disconnect.chunks_sent < MANY  # TCP backpressure held the server


def test_full_buffer_stops_reading_sync(endless: WatchedVLLM, server: FakeServer) -> None:
    with llmstream.Client(server.base_url) as client:
        with client.stream("Hi", buffer=8) as stream:
            next(iter(stream))
            buffer = stream._buffer
            assert buffer is not None
            with buffer._cond:
                assert buffer._cond.wait_for(lambda: buffer.full, timeout=10)
            received = stream.snapshot().metrics.chunks
            endless.wait_for_events(received + UNREAD)
            assert stream.snapshot().metrics.chunks == received
    assert endless.wait_for_disconnect().chunks_sent < MANY


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_on_full_error_fails_fast_and_closes_upstream(
    mode: str, endless: WatchedVLLM, server: FakeServer
) -> None:
    # The consumer is stuck in slow work on its first piece until the server sees the
    # client go: the overflow must cancel the request while the consumer is still busy,
    # not once it catches up (if it never did, the wait would time out).
    seen: list[Disconnect] = []

    def stall(snapshot: llmstream.StreamResult) -> bool:
        if not seen:
            seen.append(endless.wait_for_disconnect())
        return False

    if mode != "sync":
        pieces: list[str] = []
        async with llmstream.AsyncClient(server.base_url, **async_client_kwargs(mode)) as client:
            with pytest.raises(llmstream.BufferOverflow) as info:
                async with client.stream("Hi", buffer=4, on_full="error") as stream:
                    async for piece in stream:
                        pieces.append(piece)
                        if not seen:
                            seen.append(await endless.await_disconnect())
        error: llmstream.LLMStreamError = info.value
        text = "".join(pieces)
    else:
        outcome = await collect(
            mode, base_url=server.base_url, buffer=4, on_full="error", on_piece=stall
        )
        assert outcome.error is not None
        error, text = outcome.error, outcome.text
    assert isinstance(error, llmstream.BufferOverflow)
    assert error.partial is not None and error.partial.status == "aborted"
    assert "buffer=4" in str(error)
    # What was read before the overflow is delivered first, then the error: more than
    # the buffer holds, the role chunk among them.
    assert error.partial.text == text and len(text) >= 4 * len("tok ")
    assert seen[0].chunks_sent < MANY


@pytest.mark.usefixtures("async_http_backend")
async def test_buffer_zero_reads_nothing_until_asked() -> None:
    fake = WatchedVLLM(tokens=["tok "] * 2 * UNREAD)
    with fake.serve() as server:
        async with llmstream.AsyncClient(server.base_url) as client:
            async with client.stream("Hi", buffer=0) as stream:
                # Bytes wait in the socket; a reader that ran ahead would have taken some.
                await fake.await_events(UNREAD)
                assert stream.snapshot().metrics.chunks == 0
                assert "".join([t async for t in stream]) == "tok " * 2 * UNREAD


def test_buffer_zero_reads_nothing_until_asked_sync() -> None:
    fake = WatchedVLLM(tokens=["tok "] * 2 * UNREAD)
    with fake.serve() as server, llmstream.Client(server.base_url) as client:
        with client.stream("Hi", buffer=0) as stream:
            fake.wait_for_events(UNREAD)
            assert stream.snapshot().metrics.chunks == 0
            assert "".join(stream) == "tok " * 2 * UNREAD


# Tokens paced 20 ms apart: each gap at the wire is at least that.
PACED = [f"{c} " for c in "abcdefghijk"]


@pytest.mark.parametrize("mode", MODES)
async def test_read_ahead_measures_at_the_wire_not_at_the_consumer(mode: str) -> None:
    fake = WatchedVLLM(tokens=PACED, token_delay=0.02)
    # Events to the finish chunk: the role chunk, the tokens, the finish (EOS) chunk.
    read_all = len(PACED) + 2
    pieces: list[str] = []
    hold = 0.0
    # The consumer holds its first piece until the reader has read the whole answer. A
    # gap measured at the consumer would span the whole hold; the ones at the wire add up
    # to it at most, and the other ten take 0.2 s of it, so the largest is well below it.
    if mode == "async":
        async with llmstream.AsyncClient(
            "http://fake-vllm.test/v1", transport=fake.transport()
        ) as client:
            async with client.stream("Hi") as stream:
                async for piece in stream:
                    pieces.append(piece)
                    if len(pieces) == 1:
                        started = time.perf_counter()
                        await fake.await_events(read_all)
                        hold = time.perf_counter() - started
        result = stream.result
    else:

        def consume() -> llmstream.StreamResult:
            nonlocal hold
            with llmstream.Client("http://fake-vllm.test/v1", transport=fake.transport()) as client:
                with client.stream("Hi") as stream:
                    for piece in stream:
                        pieces.append(piece)
                        if len(pieces) == 1:
                            started = time.perf_counter()
                            fake.wait_for_events(read_all)
                            hold = time.perf_counter() - started
            return stream.result

        result = await anyio.to_thread.run_sync(consume)
    assert "".join(pieces) == "".join(PACED) and result.complete
    itl = result.metrics.inter_token_latency
    assert itl is not None and itl.count == len(PACED)
    assert itl.max < hold


@pytest.mark.usefixtures("async_http_backend")
async def test_pause_stops_reading_and_resume_continues() -> None:
    fake = WatchedVLLM(tokens=[f"{i} " for i in range(40)], token_delay=0.005)
    with fake.serve() as server:
        async with llmstream.AsyncClient(server.base_url) as client:
            async with client.stream("Hi", buffer=4) as stream:
                pieces = [await stream.__aiter__().__anext__()]
                buffer = stream._buffer
                assert buffer is not None
                # The reader waits for room, with no read in progress.
                await _until(lambda: buffer.full)
                stream.pause()
                assert stream.paused
                # What was read ahead can still be consumed; that makes room, so from
                # here only the pause holds the reader back.
                while buffer.items:
                    pieces.append(await stream.__aiter__().__anext__())
                held = stream.snapshot().metrics.chunks
                # The server writes the rest of the answer meanwhile, into the socket.
                await fake.await_answers()
                assert stream.snapshot().metrics.chunks == held  # paused: nothing read
                stream.resume()
                assert not stream.paused
                pieces += [t async for t in stream]
    assert "".join(pieces) == "".join(f"{i} " for i in range(40))
    assert stream.result.complete


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_pause_longer_than_max_pause_cancels_the_request(mode: str) -> None:
    fake = FakeVLLM(tokens=["x "] * 1000, token_delay=0.01)
    with fake.serve() as server:
        if mode != "sync":
            async with llmstream.AsyncClient(
                server.base_url, **async_client_kwargs(mode)
            ) as client:
                with pytest.raises(llmstream.PauseTimeout) as info:
                    async with client.stream("Hi", max_pause=0.2) as stream:
                        async for _ in stream:
                            stream.pause()
                error: llmstream.LLMStreamError = info.value
        else:
            with llmstream.Client(server.base_url) as sync_client:
                with pytest.raises(llmstream.PauseTimeout) as sync_info:
                    with sync_client.stream("Hi", max_pause=0.2) as sync_stream:
                        for _ in sync_stream:
                            sync_stream.pause()
                error = sync_info.value
        disconnect = fake.wait_for_disconnect()
    assert "KV cache" in str(error)
    assert error.partial is not None and error.partial.status == "aborted"
    assert disconnect.chunks_sent < 1000


@pytest.mark.usefixtures("async_http_backend")
async def test_cancel_from_another_task_reaches_the_server_within_100ms() -> None:
    fake = FakeVLLM(tokens=["x "] * 100, token_delay=2.0)
    with fake.serve() as server:
        async with llmstream.AsyncClient(server.base_url) as client:
            async with client.stream("Hi") as stream:
                got = anyio.Event()
                pieces: list[str] = []

                async def consume() -> None:
                    async for piece in stream:
                        pieces.append(piece)
                        got.set()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(consume)
                    await got.wait()
                    t0 = time.perf_counter()
                    stream.cancel()
            assert stream.result.status == "cancelled"
        disconnect = fake.wait_for_disconnect()
    assert disconnect.time - t0 < LIMIT
    assert pieces == ["x "]


def test_cancel_from_another_thread_reaches_the_server_within_100ms() -> None:
    fake = FakeVLLM(tokens=["x "] * 100, token_delay=2.0)
    with fake.serve() as server, llmstream.Client(server.base_url) as client:
        with client.stream("Hi") as stream:
            got = threading.Event()
            pieces: list[str] = []

            def consume() -> None:
                for piece in stream:
                    pieces.append(piece)
                    got.set()

            thread = threading.Thread(target=consume)
            thread.start()
            assert got.wait(5)
            t0 = time.perf_counter()
            stream.cancel()
            disconnect = fake.wait_for_disconnect()
            thread.join(5)
            assert not thread.is_alive()
        assert stream.result.status == "cancelled"
    assert disconnect.time - t0 < LIMIT
    assert pieces == ["x "]


@pytest.mark.parametrize("mode", SOCKET_MODES)
@pytest.mark.parametrize("buffer", [0, 16])
@pytest.mark.parametrize("limit", [{"max_chunks": 10}, {"max_bytes": 2000}])
async def test_chunk_and_byte_caps_stop_a_runaway_generation(
    mode: str, buffer: int, limit: dict[str, int]
) -> None:
    runaway = FakeVLLM(tokens=["tok "] * 2000, token_delay=0.001)
    with runaway.serve() as server:
        outcome = await collect(mode, base_url=server.base_url, buffer=buffer, **limit)
        disconnect = runaway.wait_for_disconnect()
    error = outcome.error
    assert isinstance(error, llmstream.StreamLimitExceeded)
    name = next(iter(limit))
    assert f"{name}={limit[name]}" in str(error)
    assert outcome.final.status == "aborted"
    assert outcome.final.text == outcome.text  # everything received before the cap was yielded
    assert disconnect.chunks_sent < 2000


def test_many_sync_streams_in_many_threads() -> None:
    fake = FakeVLLM(None, token_delay=0.001)  # echoes each prompt
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    with fake.serve() as server, llmstream.Client(server.base_url) as client:

        def worker(i: int) -> None:
            try:
                with client.stream(f"stream number {i} says hello") as stream:
                    results[i] = "".join(stream)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors
    assert results == {i: f"stream number {i} says hello" for i in range(12)}


@pytest.mark.usefixtures("async_http_backend")
async def test_many_async_streams_on_one_loop() -> None:
    fake = FakeVLLM(None, token_delay=0.001)
    results: dict[int, str] = {}
    with fake.serve() as server:
        async with llmstream.AsyncClient(server.base_url) as client:

            async def one(i: int) -> None:
                async with client.stream(f"stream number {i} says hello") as stream:
                    results[i] = "".join([t async for t in stream])

            async with anyio.create_task_group() as tg:
                for i in range(30):
                    tg.start_soon(one, i)
    assert results == {i: f"stream number {i} says hello" for i in range(30)}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"buffer": -1}, "buffer"),
        ({"on_full": "drop"}, "on_full"),
        ({"max_pause": 0}, "max_pause"),
        ({"max_chunks": 0}, "max_chunks"),
    ],
)
def test_flow_options_are_checked(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(llmstream.InvalidRequestError, match=match):
        llmstream.Client("http://x.test/v1", model="m").stream("Hi", **kwargs)  # type: ignore[arg-type]


async def test_the_read_ahead_wakes_a_waiting_consumer_and_a_cancel_scope_cuts_its_wait() -> None:
    """The hand-off between the reader and a consumer waiting on it, on both backends.

    On asyncio the wait is a bare future (cheaper than an anyio event per chunk): an anyio
    deadline must still cut it, and the buffer must still hand over what comes after.
    """
    buffer = AsyncReadAhead[str](limit=2)
    with anyio.move_on_after(0.05) as scope:
        await buffer.get()  # nothing comes: the scope ends the wait
    assert scope.cancelled_caught

    buffer = AsyncReadAhead[str](limit=2)
    got: list[str | None] = []
    async with anyio.create_task_group() as group:

        async def consume() -> None:
            got.append(await buffer.get())
            got.append(await buffer.get())

        group.start_soon(consume)
        await anyio.wait_all_tasks_blocked()  # the consumer waits on an empty buffer
        assert buffer.wanted
        buffer.put(["a"])
        await _until(lambda: got == ["a"])
        await anyio.wait_all_tasks_blocked()
        buffer.end()
    assert got == ["a", None]


async def test_the_reader_waiting_for_room_is_woken_when_the_consumer_takes() -> None:
    """A full buffer holds the reader back until the consumer takes an item."""
    buffer = AsyncReadAhead[str](limit=1)
    buffer.put(["a"])
    woke = anyio.Event()
    async with anyio.create_task_group() as group:

        async def reader() -> None:
            await buffer.wait_for_room()
            woke.set()

        group.start_soon(reader)
        await anyio.wait_all_tasks_blocked()
        assert not woke.is_set()
        assert await buffer.get() == "a"
        with anyio.fail_after(5):
            await woke.wait()
