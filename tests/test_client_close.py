"""Closing a client ends its streams still in flight, on real sockets.

A service shutting down closes its client while other tasks or threads still stream:
each stream's connection must be cut at once (vLLM aborts the request and frees its KV
cache), and its consumer must learn why (``ClientClosed``, with what arrived), not hang
on a dead pool nor see a quiet, truncated end.
"""

from __future__ import annotations

import time

import pytest

import llmstream
from llmstream.testing import FakeVLLM

from .drivers import SOCKET_MODES, close_client_mid_stream

pytestmark = pytest.mark.anyio

LIMIT = 0.100
# "mid-answer": the consumer waits for a second token that comes 2 s later. "first token":
# the request was sent and waits for its first token, 2 s away.
WHERE = ["mid-answer", "first token"]


def _fake(where: str) -> FakeVLLM:
    if where == "mid-answer":
        return FakeVLLM(tokens=["x "] * 100, token_delay=2.0)
    return FakeVLLM(tokens=["x "] * 100, ttft=2.0)


def _check(
    error: BaseException | None, pieces: list[str], closed_at: float, fake: FakeVLLM
) -> None:
    assert isinstance(error, llmstream.ClientClosed), error
    assert isinstance(error, llmstream.StreamAborted)
    assert "closed" in str(error)
    assert error.partial is not None and error.partial.status == "aborted"
    assert error.partial.text == "".join(pieces)
    disconnect = fake.wait_for_disconnect()
    assert disconnect.time - closed_at < LIMIT
    assert disconnect.chunks_sent < 100


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_closing_the_client_ends_its_streams_in_flight(mode: str, where: str) -> None:
    fake = _fake(where)
    with fake.serve() as server:
        # The next token is 2 s away: the consumer must be done long before.
        outcome, closed_at = await close_client_mid_stream(
            mode,
            server.base_url,
            clock=time.perf_counter,
            within=1.0,
            at_first_token=where == "first token",
        )
        _check(outcome.error, outcome.pieces, closed_at, fake)
    if where == "mid-answer":
        assert outcome.pieces == ["x "]


@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_a_stream_made_before_the_client_closed_fails_without_sending(mode: str) -> None:
    fake = FakeVLLM(tokens=["x "])
    with fake.serve() as server:
        if mode == "async":
            client = llmstream.AsyncClient(server.base_url)
            stream = client.stream("Hi")
            await client.aclose()
            with pytest.raises(llmstream.ClientClosed) as info:
                async with stream:
                    async for _ in stream:
                        pass
        else:
            sync_client = llmstream.Client(server.base_url)
            sync_stream = sync_client.stream("Hi")
            sync_client.close()
            with pytest.raises(llmstream.ClientClosed) as info:
                with sync_stream:
                    for _ in sync_stream:
                        pass
    assert info.value.partial is not None and info.value.partial.text == ""
    assert fake.requests == []


@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_a_finished_stream_keeps_its_result_when_the_client_closes(mode: str) -> None:
    fake = FakeVLLM(tokens=["x "] * 3)
    with fake.serve() as server:
        if mode == "async":
            client = llmstream.AsyncClient(server.base_url)
            async with client.stream("Hi") as stream:
                text = "".join([t async for t in stream])
            await client.aclose()
            result = stream.result
        else:
            sync_client = llmstream.Client(server.base_url)
            with sync_client.stream("Hi") as sync_stream:
                text = "".join(sync_stream)
            sync_client.close()
            result = sync_stream.result
    assert result.complete and result.text == text == "x x x "
