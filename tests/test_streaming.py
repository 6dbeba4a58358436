"""Stream behaviour against the emulator, in-process and on loopback, sync and async.

The async client runs on aiohttp too, on loopback only (conftest deselects the rest).
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

import llmstream
from llmstream.testing import FakeVLLM, Fault
from llmstream.testing._tokenize import split_text

from .drivers import MODES, SOCKET_MODES, collect, no_raw_httpx

pytestmark = pytest.mark.anyio

MODEL = "llmstream/fake-model"
ANSWER = "PagedAttention stores the KV cache in blocks — like pages ✨ 東京."


@pytest.fixture(params=["transport", "socket"])
def where(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def fake() -> FakeVLLM:
    return FakeVLLM(ANSWER)


@pytest.fixture
def target(fake: FakeVLLM, where: str) -> Iterator[dict[str, Any]]:
    """Client arguments pointing at the emulator, in-process or over a real socket."""
    if where == "transport":
        yield {"transport": fake.transport()}
    else:
        with fake.serve() as server:
            yield {"base_url": server.base_url}


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_streams_the_whole_answer(mode: str, fake: FakeVLLM, target: dict[str, Any]) -> None:
    outcome = await collect(mode, **target)
    assert outcome.error is None
    assert outcome.text == ANSWER
    result = outcome.final
    assert result.complete and result.status == "complete"
    assert result.text == ANSWER and result.finish_reason == "stop"
    assert result.model == "llmstream/fake-model"
    assert result.usage is not None
    assert result.usage.completion_tokens == len(outcome.pieces) + 1  # + the EOS token
    metrics = result.metrics
    assert metrics.time_to_first_token is not None and metrics.time_to_first_token >= 0
    assert metrics.completion_tokens_source == "server"
    assert metrics.inter_token_latency is not None
    assert fake.requests[-1].json is not None
    assert fake.requests[-1].json["model"] == "llmstream/fake-model"  # asked via /models


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_max_tokens_ends_with_length(mode: str, target: dict[str, Any]) -> None:
    outcome = await collect(mode, max_tokens=3, **target)
    assert outcome.final.finish_reason == "length"
    assert outcome.final.usage is not None and outcome.final.usage.completion_tokens == 3
    assert outcome.final.complete


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_n2_iterates_choice_zero_and_keeps_both(mode: str) -> None:
    fake = FakeVLLM("one two three")
    outcome = await collect(mode, transport=fake.transport(), n=2)
    assert outcome.text == "one two three"
    assert [c.index for c in outcome.final.choices] == [0, 1]
    assert all(
        c.text == "one two three" and c.finish_reason == "stop" for c in outcome.final.choices
    )


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_reasoning_is_kept_apart_from_text(mode: str) -> None:
    fake = FakeVLLM("The answer.", reasoning="Let me think.")
    outcome = await collect(mode, transport=fake.transport())
    assert outcome.text == "The answer."
    assert outcome.final.reasoning == "Let me think."


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_tool_calls_are_assembled(mode: str) -> None:
    fake = FakeVLLM(tool_calls=[{"name": "get_weather", "arguments": {"city": "東京"}}])
    tool = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object"}},
    }
    outcome = await collect(mode, transport=fake.transport(), tools=[tool])
    assert outcome.error is None
    result = outcome.final
    assert result.finish_reason == "tool_calls"
    [call] = result.tool_calls
    assert call.function.name == "get_weather"
    assert call.function.parsed() == {"city": "東京"}
    assert call.id and call.type == "function"


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_disconnect_mid_stream_raises_interrupted_with_partial(
    mode: str, fake: FakeVLLM, target: dict[str, Any]
) -> None:
    fake.add_fault(Fault.disconnect(after_chunks=4))
    outcome = await collect(mode, client_kwargs={"model": MODEL}, **target)
    assert type(outcome.error) is llmstream.StreamInterrupted
    assert no_raw_httpx(outcome.error)
    partial = outcome.final
    assert partial.status == "interrupted" and not partial.complete
    assert partial.text == outcome.text  # everything yielded is in the partial, nothing more
    assert 0 < len(partial.text) < len(ANSWER)
    assert ANSWER.startswith(partial.text)


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_truncated_body_is_not_a_success(
    mode: str, fake: FakeVLLM, target: dict[str, Any]
) -> None:
    fake.add_fault(Fault.truncate(after_chunks=3))
    outcome = await collect(mode, client_kwargs={"model": MODEL}, **target)
    assert type(outcome.error) is llmstream.StreamInterrupted
    assert "ended the stream before the answer was complete" in str(outcome.error)
    assert ANSWER.startswith(outcome.final.text) and outcome.final.text


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_finished_stream_without_done_is_complete(
    mode: str, fake: FakeVLLM, target: dict[str, Any]
) -> None:
    fake.add_fault(Fault.no_done())
    outcome = await collect(mode, client_kwargs={"model": MODEL}, **target)
    assert outcome.error is None
    assert outcome.final.complete and outcome.text == ANSWER


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_inband_error_raises_with_code_and_partial(
    mode: str, fake: FakeVLLM, target: dict[str, Any]
) -> None:
    fake.add_fault(Fault.inband_error(after_chunks=3, code=503, message="engine paused"))
    outcome = await collect(mode, client_kwargs={"model": MODEL}, **target)
    error = outcome.error
    assert isinstance(error, llmstream.ServerStreamError)
    assert error.error_code == 503 and "engine paused" in str(error)
    assert outcome.final.status == "error"
    assert outcome.final.text == outcome.text and outcome.text  # tokens before it were yielded


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_malformed_chunk_is_a_protocol_error(
    mode: str, fake: FakeVLLM, target: dict[str, Any]
) -> None:
    fake.add_fault(Fault.malformed_chunk(after_chunks=2))
    outcome = await collect(mode, client_kwargs={"model": MODEL}, **target)
    assert isinstance(outcome.error, llmstream.ProtocolError)
    assert "not valid JSON" in str(outcome.error)
    assert outcome.final.status == "error"


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_http_status_fault_gives_typed_error_with_retry_after(
    mode: str, fake: FakeVLLM, target: dict[str, Any]
) -> None:
    fake.add_fault(Fault.http_status(503, retry_after=2))
    outcome = await collect(mode, client_kwargs={"model": MODEL, "retry": 0}, **target)
    error = outcome.error
    assert isinstance(error, llmstream.InternalServerError)
    assert error.status_code == 503 and error.headers["retry-after"] == "2"


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_stall_hits_the_read_timeout_as_stream_timeout(
    mode: str, fake: FakeVLLM, target: dict[str, Any]
) -> None:
    fake.add_fault(Fault.stall(after_chunks=3))
    outcome = await collect(mode, client_kwargs={"model": MODEL, "timeout": 0.3}, **target)
    assert isinstance(outcome.error, llmstream.IdleTimeout)
    assert outcome.final.text == outcome.text and outcome.text


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_disconnect_before_headers_is_a_connection_error(
    mode: str, fake: FakeVLLM, target: dict[str, Any]
) -> None:
    fake.add_fault(Fault.disconnect_before_headers())
    outcome = await collect(mode, client_kwargs={"model": MODEL, "retry": 0}, **target)
    assert isinstance(outcome.error, llmstream.APIConnectionError)
    assert no_raw_httpx(outcome.error)


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_unknown_model_is_not_found(mode: str, target: dict[str, Any]) -> None:
    outcome = await collect(mode, client_kwargs={"model": "gpt-4o"}, **target)
    assert isinstance(outcome.error, llmstream.NotFoundError)
    assert "gpt-4o" in str(outcome.error)


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_wrong_api_key_is_authentication_error(mode: str) -> None:
    fake = FakeVLLM("x", api_key="right")
    outcome = await collect(mode, transport=fake.transport(), client_kwargs={"api_key": "wrong"})
    assert isinstance(outcome.error, llmstream.AuthenticationError)
    assert "wrong" not in str(outcome.error)
    good = await collect(mode, transport=fake.transport(), client_kwargs={"api_key": "right"})
    assert good.text == "x"


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_break_gives_cancelled_partial_result(
    mode: str, fake: FakeVLLM, target: dict[str, Any]
) -> None:
    # The server holds the rest of the answer back, so the break comes before the end
    # however the bytes are split into reads.
    fake.add_fault(Fault.stall(after_chunks=3))
    outcome = await collect(mode, on_piece=lambda snap: len(snap.text) > 10, buffer=0, **target)
    assert outcome.error is None
    result = outcome.final
    assert result.status == "cancelled" and not result.complete
    # Pure pull: nothing beyond the read the loop asked for; that read may hold more chunks.
    assert result.text.startswith(outcome.text) and ANSWER.startswith(result.text)
    assert fake.wait_for_disconnect().chunks_sent <= 3  # the break closed the connection


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_break_with_read_ahead_keeps_what_was_received(mode: str) -> None:
    fake = FakeVLLM(ANSWER)
    # The role chunk and five tokens, then nothing until the client goes.
    fake.add_fault(Fault.stall(after_chunks=6))
    received = "".join(split_text(ANSWER)[:5])
    # The loop breaks once all of them were read, however many it has consumed by then.
    outcome = await collect(
        mode, transport=fake.transport(), on_piece=lambda snap: snap.text == received
    )
    result = outcome.final
    assert result.status == "cancelled" and not result.complete
    assert result.text == received and received.startswith(outcome.text)
    assert fake.wait_for_disconnect().chunks_sent == 6


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_keep_alive_comments_are_ignored(mode: str) -> None:
    fake = FakeVLLM("slow answer", ttft=0.2, keep_alive=0.02)
    outcome = await collect(mode, transport=fake.transport())
    assert outcome.text == "slow answer" and outcome.final.complete


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_request_id_header_is_reported(mode: str) -> None:
    fake = FakeVLLM("x", request_id_headers=True)
    outcome = await collect(mode, transport=fake.transport())
    assert outcome.final.request_id
    assert outcome.final.request_id.startswith("chatcmpl-") or outcome.final.request_id


async def test_chunks_iterates_typed_chunks_including_usage() -> None:
    fake = FakeVLLM("a b")
    async with (
        llmstream.AsyncClient(transport=fake.transport(), base_url="http://f.test/v1") as client,
        client.stream("Hi") as stream,
    ):
        chunks = [c async for c in stream.chunks()]
    assert isinstance(chunks[0], llmstream.ChatCompletionChunk)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert stream.result.complete


def test_sync_chunks_and_final_result() -> None:
    fake = FakeVLLM("a b c")
    with llmstream.Client("http://f.test/v1", transport=fake.transport()) as client:
        with client.stream("Hi") as stream:
            first = next(iter(stream.chunks()))
            result = stream.final_result()
    assert first.choices[0].delta.role == "assistant"
    assert result.text == "a b c" and result.complete


@pytest.mark.parametrize("mode", MODES)
async def test_final_result_without_with_opens_reads_and_closes(mode: str) -> None:
    # As iterating does: the stream is opened, read to the end and closed.
    fake = FakeVLLM("x y z")
    if mode == "async":
        async with llmstream.AsyncClient("http://f.test/v1", transport=fake.transport()) as aclient:
            result = await aclient.stream("Hi").final_result()
    else:
        with llmstream.Client("http://f.test/v1", transport=fake.transport()) as client:
            stream = client.stream("Hi")
            result = await anyio.to_thread.run_sync(stream.final_result)
            assert client._requests_in_flight == 0  # closed: nothing held
    assert result.complete and result.text == "x y z"


async def test_iterating_without_with_opens_and_closes() -> None:
    fake = FakeVLLM("x y z")
    async with llmstream.AsyncClient("http://f.test/v1", transport=fake.transport()) as client:
        stream = client.stream("Hi")
        assert [t async for t in stream] == ["x", " y", " z"]
        assert stream.result.complete


async def test_stream_llm_request_port(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeVLLM("ported answer")
    with fake.serve() as server:
        pieces = [t async for t in llmstream.stream_llm_request("Hi", 16, base_url=server.base_url)]
        sync_pieces = list(llmstream.stream_llm_request_sync("Hi", 16, base_url=server.base_url))
    assert "".join(pieces) == "".join(sync_pieces) == "ported answer"
    body = fake.requests[-1].json
    assert body is not None
    assert body["max_tokens"] == 16 and body["temperature"] == 0.7 and body["stream"] is True


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_tokens_per_second_counts_the_end_of_sequence_token_once(mode: str) -> None:
    fake = FakeVLLM("a b c", token_delay=0.1)
    outcome = await collect(mode, transport=fake.transport())
    metrics = outcome.final.metrics
    assert metrics.completion_tokens == 4  # 3 text tokens + EOS, as vLLM counts
    assert metrics.tokens_per_second is not None
    assert 7 < metrics.tokens_per_second < 11  # 10 tokens/s, give or take scheduling


def test_result_after_an_error_before_streaming_raises_that_error() -> None:
    fake = FakeVLLM("x")
    fake.add_fault(Fault.http_status(404))
    with llmstream.Client("http://f.test/v1", model=MODEL, transport=fake.transport()) as c:
        stream = c.stream("Hi")
        with pytest.raises(llmstream.NotFoundError):
            with stream:
                pass
        with pytest.raises(llmstream.NotFoundError):
            _ = stream.result


class _OneWriteServer:
    """Loopback: answers every request with ``response`` in one write, then hangs up."""

    def __init__(self, response: bytes) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/v1"
        self.requests = 0
        self._response = response
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self._listener.accept()
                with conn:
                    _read_request(conn)  # all of it: closing on unread bytes resets
                    self.requests += 1
                    conn.sendall(self._response)
                    conn.shutdown(socket.SHUT_WR)
                    while conn.recv(65536):  # until the client hangs up
                        pass

    def close(self) -> None:
        self._listener.close()


def _read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = conn.recv(65536)
        if not piece:
            return
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?i)content-length: *(\d+)", head)
    left = int(length[1]) - len(body) if length else 0
    while left > 0 and (piece := conn.recv(65536)):
        left -= len(piece)


def _sse_chunk(content: bytes) -> bytes:
    return (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{"content":"' + content + b'"},"finish_reason":null}]}\n\n'
    )


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_invalid_utf8_in_the_last_read_is_a_protocol_error_and_not_retried(
    mode: str,
) -> None:
    # The whole body in one read: a good token, an event that is not UTF-8, the end.
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
    server = _OneWriteServer(head + _sse_chunk(b"Hi") + _sse_chunk(b"\xff"))
    try:
        outcome = await collect(mode, base_url=server.base_url, client_kwargs={"model": "m"})
    finally:
        server.close()
    assert isinstance(outcome.error, llmstream.ProtocolError), outcome.error
    assert "invalid UTF-8" in str(outcome.error)
    assert outcome.text == "Hi" and outcome.final.status == "error"
    assert server.requests == 1  # the server's fault, not a cut: not retried
