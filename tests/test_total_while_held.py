"""The total deadline ends a call whatever holds its reader back, on real sockets.

A paused stream, a full read-ahead buffer (``on_full="wait"``), or a consumer that has
not asked for more (``buffer=0``): no read is in progress for the deadline to cut, and
the server keeps the request's KV cache meanwhile. The call must still end at ``total``:
the connection is cut then (the server sees it while the consumer is still away), and
the consumer gets what was handed over before the deadline, then the timeout.
"""

from __future__ import annotations

import time

import anyio
import pytest

import llmstream

from .drivers import SOCKET_MODES, WatchedVLLM, async_client_kwargs

pytestmark = pytest.mark.anyio

TOTAL = 1.0
# Paced over ~5 s: the server is still generating when the deadline cuts the call.
MANY = 5_000
DELAY = 0.001
HOLDS = ["pause", "full buffer", "nothing asked"]


def _stream_kwargs(hold: str) -> dict[str, object]:
    buffer = 0 if hold == "nothing asked" else 4
    return {"timeout": llmstream.Timeouts(total=TOTAL), "buffer": buffer}


def _check(
    error: BaseException | None, pieces: list[str], cut_after: float, fake: WatchedVLLM
) -> None:
    assert isinstance(error, llmstream.TotalTimeout), error
    assert f"total={TOTAL}" in str(error)
    # Cut at the deadline, not before it.
    assert cut_after >= TOTAL * 0.95
    # Everything the partial result holds was delivered, once, before the error.
    assert error.partial is not None
    assert error.partial.text == "".join(pieces) and pieces
    assert fake.wait_for_disconnect().chunks_sent < MANY


@pytest.mark.parametrize("hold", HOLDS)
@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_the_total_deadline_ends_a_call_whose_reader_is_held_back(
    mode: str, hold: str, anyio_backend: str
) -> None:
    if mode == "async" and hold == "nothing asked" and anyio_backend == "trio":
        pytest.skip(
            "buffer=0 on trio has no task beside the consumer: the total deadline is "
            "enforced at its next read (see test_total_is_enforced_at_the_next_read_"
            "without_a_task_beside_the_consumer)"
        )
    fake = WatchedVLLM(tokens=["tok "] * MANY, max_model_len=10 * MANY, token_delay=DELAY)
    pieces: list[str] = []
    error: BaseException | None = None
    with fake.serve() as server:
        started = time.monotonic()
        if mode != "sync":
            kwargs = async_client_kwargs(mode)
            async with llmstream.AsyncClient(server.base_url, **kwargs) as client:
                try:
                    async with client.stream("Hi", **_stream_kwargs(hold)) as stream:
                        items = stream.__aiter__()
                        pieces.append(await items.__anext__())
                        if hold == "pause":
                            stream.pause()
                        # The consumer is away until the server sees the client go.
                        await fake.await_disconnect(timeout=10)
                        cut_after = time.monotonic() - started
                        async for piece in items:
                            pieces.append(piece)
                except llmstream.LLMStreamError as exc:
                    error = exc
        else:

            def consume() -> float:
                nonlocal error
                with llmstream.Client(server.base_url) as client:
                    try:
                        with client.stream("Hi", **_stream_kwargs(hold)) as stream:
                            items = iter(stream)
                            pieces.append(next(items))
                            if hold == "pause":
                                stream.pause()
                            fake.wait_for_disconnect(timeout=10)
                            cut = time.monotonic() - started
                            pieces.extend(items)
                    except llmstream.LLMStreamError as exc:
                        error = exc
                return cut

            cut_after = await anyio.to_thread.run_sync(consume)
        _check(error, pieces, cut_after, fake)


@pytest.mark.usefixtures("async_http_backend")
async def test_total_is_enforced_at_the_next_read_without_a_task_beside_the_consumer() -> None:
    # buffer=0 without `async with`: no reader task, so nothing runs while the consumer
    # is away on trio; its next read still ends the call at once, not at a read timeout.
    fake = WatchedVLLM(tokens=["tok "] * MANY, max_model_len=10 * MANY, token_delay=DELAY)
    pieces: list[str] = []
    with fake.serve() as server:
        async with llmstream.AsyncClient(server.base_url) as client:
            stream = client.stream("Hi", **_stream_kwargs("nothing asked"))
            items = stream.__aiter__()
            started = time.monotonic()
            try:
                pieces.append(await items.__anext__())
                await anyio.sleep(TOTAL)  # the consumer's own slow work, past the deadline
                with anyio.fail_after(5):
                    with pytest.raises(llmstream.TotalTimeout) as info:
                        async for piece in items:
                            pieces.append(piece)
            finally:
                await stream.aclose()
            cut_after = time.monotonic() - started
        # While the server still serves: it sees the close at the next write it fails.
        _check(info.value, pieces, cut_after, fake)
