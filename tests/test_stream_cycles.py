"""A finished stream leaves no reference cycle of llmstream's objects.

Objects in a cycle outlive the stream until the garbage collector runs, and with hundreds
of streams in one process its pauses were the largest single cost: every stream object is
freed by reference counting as soon as the caller drops it. Checked on a transport of the
seam's protocols alone, so only llmstream's own objects are in play; then over httpx on
loopback, whose response and body stream would form a cycle of their own per call.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

import llmstream
from llmstream.testing import FakeFleet, FakeVLLM

from .test_transport_seam import ANSWERS, RETRY, _AsyncTransport, _event, _SyncTransport

pytestmark = pytest.mark.anyio

WORDS = [(200, [_event("Hello"), _event(" there"), _event(None, "stop"), b"data: [DONE]\n\n"])]


@pytest.fixture
def collector() -> Iterator[None]:
    """The collector keeps what it finds in ``gc.garbage`` instead of freeing it."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _llmstream_garbage() -> list[str]:
    gc.collect()
    return [type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("llmstream")]


def _noop(event: llmstream.CallEvent) -> None:
    pass


async def _async_stream(how: str) -> None:
    transport = _AsyncTransport(ANSWERS if how == "retry" else WORDS, blocking=False)
    hooks = [_noop] if how == "hooked" else []
    async with llmstream.AsyncClient(
        "http://seam/v1", model="m", retry=RETRY, hooks=hooks
    ) as client:
        client._transport = transport  # type: ignore[assignment]
        if how == "pull":
            stream = await client.stream("Hi")
            assert "".join([t async for t in stream]) == "Hello there"
        else:
            async with client.stream("Hi") as stream:
                async for _ in stream:
                    if how == "break":
                        break
        assert stream.result.status == ("cancelled" if how == "break" else "complete")


@pytest.mark.parametrize("how", ["whole", "break", "retry", "pull", "hooked"])
async def test_a_finished_async_stream_leaves_no_cycle(how: str, collector: None) -> None:
    for _ in range(3):
        await _async_stream(how)
    gc.collect()
    found = [type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("llmstream")]
    assert found == []


@pytest.mark.parametrize("how", ["whole", "break", "retry", "hooked"])
def test_a_finished_sync_stream_leaves_no_cycle(how: str, collector: None) -> None:
    for _ in range(3):
        transport = _SyncTransport(ANSWERS if how == "retry" else WORDS, blocking=True)
        hooks = [_noop] if how == "hooked" else []
        with llmstream.Client("http://seam/v1", model="m", retry=RETRY, hooks=hooks) as client:
            client._transport = transport  # type: ignore[assignment]
            with client.stream("Hi") as stream:
                for _ in stream:
                    if how == "break":
                        break
    gc.collect()
    found = [type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("llmstream")]
    assert found == []


def _llmstream_frames() -> list[str]:
    """Frames of llmstream's code among the garbage: left by an exception's traceback."""
    gc.collect()
    return [
        o.f_code.co_qualname  # type: ignore[attr-defined]
        for o in gc.garbage
        if type(o).__name__ == "frame" and "llmstream" in o.f_code.co_filename  # type: ignore[attr-defined]
    ]


def _forget_garbage() -> None:
    gc.collect()
    gc.garbage.clear()


async def _async_calls(client: llmstream.AsyncClient, count: int) -> list[llmstream.StreamResult]:
    """``count`` calls; the garbage after the first is forgotten (the client's own set-up)."""
    results = []
    for call in range(count):
        if call == 1:
            _forget_garbage()
        async with client.stream("Hi") as stream:
            assert "".join([t async for t in stream]) == "Hello there"
        results.append(stream.result)
    return results


def _sync_calls(client: llmstream.Client, count: int) -> list[llmstream.StreamResult]:
    """The same as ``_async_calls``, on the sync client."""
    results = []
    for call in range(count):
        if call == 1:
            _forget_garbage()
        with client.stream("Hi") as stream:
            assert "".join(stream) == "Hello there"
        results.append(stream.result)
    return results


HEDGED = llmstream.Fleet(
    [llmstream.Endpoint("http://seam-a/v1"), llmstream.Endpoint("http://seam-b/v1")],
    model="m",
    hedging=llmstream.Hedging(delay=30.0, budget=1.0),
    scrape_interval=None,
)


async def test_a_hedged_call_answered_in_time_leaves_no_cycle(collector: None) -> None:
    # The race between the request and its hedge is set up on every call of a hedging
    # fleet; ending it when the first token comes before the hedge is due must not
    # cancel the hedge's wait (an exception, a traceback, frames: a cycle per call).
    async with llmstream.AsyncClient(fleet=HEDGED) as client:
        client._transport = _AsyncTransport(WORDS * 4, blocking=False)  # type: ignore[assignment]
        assert not any(result.hedged for result in await _async_calls(client, 4))
        assert _llmstream_frames() == []
        assert _llmstream_garbage() == []


def test_a_hedged_sync_call_answered_in_time_leaves_no_cycle(collector: None) -> None:
    with llmstream.Client(fleet=HEDGED) as client:
        client._transport = _SyncTransport(WORDS * 4, blocking=True)  # type: ignore[assignment]
        assert not any(result.hedged for result in _sync_calls(client, 4))
        assert _llmstream_frames() == []
        assert _llmstream_garbage() == []


def _httpx_garbage() -> list[str]:
    gc.collect()
    return [
        type(o).__qualname__
        for o in gc.garbage
        if type(o).__module__.split(".")[0] in ("httpx", "httpcore")
    ]


@pytest.fixture
def server() -> Iterator[str]:
    with FakeVLLM("Hello there", model="m").serve() as running:
        yield running.base_url


async def test_an_async_stream_over_httpx_leaves_no_cycle_of_httpx_objects(
    server: str, collector: None
) -> None:
    # httpx's response and its body stream refer to each other; closed, the response
    # is unbound from it, so that a finished call is freed at once, not by the collector.
    async with llmstream.AsyncClient(server, model="m") as client:
        await _async_calls(client, 4)
        assert _httpx_garbage() == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("buffer", [None, 0], ids=["read-ahead", "pull"])
async def test_a_stream_over_the_asyncio_transport_leaves_no_cycle(
    server: str, buffer: int | None, collector: None
) -> None:
    # Its connections are kept for reuse: a finished call's response, body reader and the
    # connection's parser are freed at once, the connection goes back to the pool.
    options = {} if buffer is None else {"buffer": buffer}
    async with llmstream.AsyncClient(
        server, model="m", transport=llmstream.AsyncioTransport(), **options
    ) as client:
        await _async_calls(client, 4)
        assert _client_garbage() == []


def _client_garbage() -> list[str]:
    """The client's objects and frames among the garbage; not the emulator's, which serves
    in this process (its per-connection task leaves a cycle when a kept connection's
    answer ends)."""
    gc.collect()
    found = []
    for o in gc.garbage:
        if type(o).__name__ == "frame":
            where: str = o.f_code.co_filename
            name = o.f_code.co_qualname
        else:
            where = type(o).__module__
            name = type(o).__qualname__
        if "llmstream" in where and "testing" not in where:
            found.append(name)
    return found


def test_a_sync_stream_over_httpx_leaves_no_cycle_of_httpx_objects(
    server: str, collector: None
) -> None:
    with llmstream.Client(server, model="m") as client:
        _sync_calls(client, 4)
        assert _httpx_garbage() == []


def test_reading_a_fleets_metrics_leaves_no_cycle_of_httpx_objects(collector: None) -> None:
    # The watcher reads /metrics in its own thread, on an httpx client of its own.
    with FakeFleet(1, text="Hello there", model="m") as fleet:
        config = llmstream.Fleet(
            [llmstream.Endpoint(fleet.base_urls[0])], model="m", scrape_interval=0.01
        )
        with llmstream.Client(fleet=config) as client:
            _sync_calls(client, 2)
            read = len(_metrics_reads(fleet))
            # Calls keep the watcher reading; it reads a few times meanwhile.
            while len(_metrics_reads(fleet)) < read + 3:
                _sync_calls(client, 1)
            assert _httpx_garbage() == []


def _metrics_reads(fleet: FakeFleet) -> list[object]:
    return [r for r in fleet[0].requests if r.path == "/metrics"]
