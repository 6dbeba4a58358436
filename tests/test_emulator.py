"""The vLLM emulator (llmstream.testing): wire fidelity, faults, transports, socket server."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from llmstream.testing import FakeVLLM, Fault

VECTORS = Path(__file__).parent / "data" / "vllm" / "v0.33.0"
HELLO = ["Hello", "!", " How", " can", " I", " help", " you", " today", "?"]
MODEL = "llmstream/fake-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True}


def normalise(body: bytes) -> bytes:
    """Blank the values vLLM itself varies between runs."""
    body = re.sub(rb'"id":"chatcmpl-[^"]*"', b'"id":"ID"', body)
    body = re.sub(rb'"created":\d+', b'"created":0', body)
    body = re.sub(rb'"system_fingerprint":"[^"]*"', b'"system_fingerprint":"FP"', body)
    return re.sub(rb'"chatcmpl-tool-[0-9a-f]+"', b'"TOOL"', body)


def events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e]


def payloads(body: bytes) -> list[Any]:
    out: list[Any] = []
    for event in events(body):
        assert event.startswith(b"data: "), event
        data = event[len(b"data: ") :]
        out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


# --- byte-for-byte against the captures ----------------------------------------------


def _vector_fake(name: str, meta: dict[str, Any]) -> FakeVLLM:
    body = meta["request"]["body"]
    usage = meta["expected"].get("usage") or {"prompt_tokens": 30}
    kwargs: dict[str, Any] = {"model": body["model"], "prompt_tokens": usage["prompt_tokens"]}
    if name == "tool_call":
        kwargs["tool_calls"] = [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    elif name == "reasoning":
        kwargs.update(reasoning="\nOkay, the user said hi.\n", tokens=["\n\n", "Hello", "!"])
    else:
        kwargs["tokens"] = HELLO
    fake = FakeVLLM(**kwargs)
    if name == "midstream_error":
        fake.add_fault(Fault.inband_error(after_chunks=4))
    return fake


VECTOR_NAMES = sorted(p.stem for p in VECTORS.glob("*.sse"))


@pytest.mark.parametrize("name", VECTOR_NAMES)
@pytest.mark.parametrize("via", ["transport", "socket"])
def test_matches_captured_vllm_bytes(name: str, via: str) -> None:
    expected = (VECTORS / f"{name}.sse").read_bytes()
    meta = json.loads((VECTORS / f"{name}.json").read_text("utf-8"))
    fake = _vector_fake(name, meta)
    request = meta["request"]
    if via == "transport":
        with httpx.Client(transport=fake.transport(), base_url="http://vllm") as client:
            response = client.post(request["path"], json=request["body"])
    else:
        with fake.serve() as server, httpx.Client(base_url=server.base_url[:-3]) as client:
            response = client.post(request["path"], json=request["body"])
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["transfer-encoding"] == "chunked"
    assert normalise(response.content) == normalise(expected)


def test_ids_are_stable_within_a_stream_and_follow_x_request_id() -> None:
    fake = FakeVLLM("Hi there", request_id_headers=True)
    with httpx.Client(transport=fake.transport(), base_url="http://vllm/v1") as client:
        response = client.post("/chat/completions", json=CHAT, headers={"x-request-id": "r-42"})
    chunks = [p for p in payloads(response.content) if p != "[DONE]"]
    assert {c["id"] for c in chunks} == {"chatcmpl-r-42"}
    assert len({c["created"] for c in chunks}) == 1
    assert response.headers["x-request-id"] == "r-42"


def test_one_http_chunk_per_event_and_keep_alive_connection() -> None:
    fake = FakeVLLM(tokens=["A", "B"])
    body = json.dumps(CHAT).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    with fake.serve() as server, socket.create_connection(("127.0.0.1", server.port)) as sock:
        reader = sock.makefile("rb")
        for _ in range(2):  # the same connection serves a second request
            sock.sendall(request)
            assert reader.readline().startswith(b"HTTP/1.1 200 OK")
            headers = {}
            while (line := reader.readline()) != b"\r\n":
                name, _, value = line.decode().partition(":")
                headers[name.lower()] = value.strip()
            assert headers["transfer-encoding"] == "chunked"
            chunks = []
            while (size := int(reader.readline(), 16)) != 0:
                chunks.append(reader.read(size))
                assert reader.read(2) == b"\r\n"
            assert reader.read(2) == b"\r\n"
            assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") for c in chunks)
            assert all(c.count(b"\n\n") == 1 for c in chunks)
            assert chunks[-1] == b"data: [DONE]\n\n"
            assert len(chunks) == 5  # role, "A", "B", finish, [DONE]
    assert len(fake.requests) == 2


# --- generation rules -----------------------------------------------------------------


def _post(fake: FakeVLLM, body: dict[str, Any], **kw: Any) -> httpx.Response:
    with httpx.Client(transport=fake.transport(), base_url="http://vllm/v1") as client:
        return client.post("/chat/completions", json=body, **kw)


def test_echoes_the_last_user_message_by_default() -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": "Say this back!"}]}
    chunks = payloads(_post(FakeVLLM(), body).content)
    texts = [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]]
    assert texts == ["Say", " this", " back", "!"]


def test_max_tokens_truncates_with_length_and_last_token_on_finish() -> None:
    body = {**CHAT, "max_tokens": 3}
    chunks = payloads(_post(FakeVLLM(tokens=HELLO), body).content)
    assert [c["choices"][0]["delta"] for c in chunks[1:-1]] == [
        {"content": "Hello"},
        {"content": "!"},
        {"content": " How"},
    ]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1] == "[DONE]"


def test_max_tokens_clamped_to_room_left_in_context() -> None:
    # prompt: 4 + 1 ("Hi") = 5 tokens; 8 - 5 leaves room for 3
    body = {**CHAT, "max_tokens": 8, "stream_options": {"include_usage": True}}
    chunks = payloads(_post(FakeVLLM(tokens=HELLO, max_model_len=8), body).content)
    assert chunks[-3]["choices"][0]["finish_reason"] == "length"
    assert chunks[-2]["usage"] == {"prompt_tokens": 5, "total_tokens": 8, "completion_tokens": 3}


def test_n2_interleaves_choices_each_with_role_and_finish() -> None:
    body = {**CHAT, "n": 2, "stream_options": {"include_usage": True}}
    chunks = payloads(_post(FakeVLLM(tokens=["A", "B"]), body).content)
    order = [(c["choices"][0]["index"], c["choices"][0]["delta"]) for c in chunks[:-2]]
    assert order == [
        (0, {"role": "assistant", "content": ""}),
        (1, {"role": "assistant", "content": ""}),
        (0, {"content": "A"}),
        (1, {"content": "A"}),
        (0, {"content": "B"}),
        (1, {"content": "B"}),
        (0, {"content": ""}),
        (1, {"content": ""}),
    ]
    assert chunks[-2]["usage"]["completion_tokens"] == 6


def test_continuous_usage_counts_up_from_zero() -> None:
    body = {**CHAT, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = payloads(_post(FakeVLLM(tokens=["A", "B"]), body).content)
    assert [c["usage"]["completion_tokens"] for c in chunks[:-1]] == [0, 1, 2, 3, 3]


def test_reasoning_then_content_with_reasoning_tokens() -> None:
    body = {**CHAT, "stream_options": {"include_usage": True}}
    chunks = payloads(_post(FakeVLLM("Yes.", reasoning="Think hard"), body).content)
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-3]]
    assert deltas == [
        {"reasoning": "Think"},
        {"reasoning": " hard"},
        {"content": "Yes"},
        {"content": "."},
    ]
    assert chunks[-2]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}
    assert chunks[-2]["usage"]["completion_tokens"] == 7  # <think>, 2, </think>, 2, EOS


def test_non_streaming_completion_shape() -> None:
    body = {k: v for k, v in CHAT.items() if k != "stream"}
    response = _post(FakeVLLM(tokens=HELLO), body)
    assert response.headers["content-type"] == "application/json"
    result = response.json()
    assert list(result) == [
        "id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
        "usage", "prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params",
        "ec_transfer_params", "metrics",
    ]  # fmt: skip
    choice = result["choices"][0]
    assert choice["message"]["content"] == "Hello! How can I help you today?"
    assert choice["finish_reason"] == "stop"
    assert result["usage"]["completion_tokens"] == 10


def test_non_streaming_tool_calls() -> None:
    body = {k: v for k, v in CHAT.items() if k != "stream"}
    fake = FakeVLLM(tool_calls=[{"name": "f", "arguments": {"x": 1}}])
    choice = _post(fake, body).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}


# --- errors before the stream ------------------------------------------------------------

HTTP_ERRORS = json.loads((VECTORS.parent / "http_errors.json").read_text("utf-8"))["vllm"]


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        ({**CHAT, "model": "gpt-4o"}, 404, None),
        (
            {**CHAT, "continue_final_message": True, "add_generation_prompt": True},
            400,
            HTTP_ERRORS["both_continue_flags"],
        ),
        ({"model": MODEL, "stream": True}, 400, HTTP_ERRORS["validation"]),
        ({**CHAT, "stream": False, "stream_options": {"include_usage": True}}, 400, None),
        ({**CHAT, "max_tokens": 9000}, 400, None),
        ({**CHAT, "messages": [{"role": "user", "content": "word " * 9000}]}, 400, None),
    ],
    ids=["model", "continue", "missing-messages", "stream-options", "max-tokens", "prompt"],
)
def test_errors_before_streaming(body: dict[str, Any], status: int, expected: Any) -> None:
    response = _post(FakeVLLM(), body)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert list(error) == ["message", "type", "param", "code"]
    assert error["code"] == status
    if expected is not None:
        assert response.json() == expected["body"]


def test_continue_final_message_alone_continues_with_the_last_role() -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    body = {**CHAT, "messages": messages, "continue_final_message": True}
    assert _post(FakeVLLM("lo"), body).status_code == 200
    body["add_generation_prompt"] = False
    first = payloads(_post(FakeVLLM("lo"), body).content)[0]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_unknown_model_message_is_vllms() -> None:
    response = _post(FakeVLLM(model="Qwen/Qwen2.5-0.5B-Instruct"), {**CHAT, "model": "gpt-4o"})
    assert response.json() == HTTP_ERRORS["model_not_found"]["body"]


def test_max_tokens_over_context_message() -> None:
    error = _post(FakeVLLM(max_model_len=100), {**CHAT, "max_tokens": 101}).json()["error"]
    assert error["message"] == (
        "max_tokens=101 cannot be greater than max_model_len=100. Please request fewer "
        "output tokens. (parameter=max_tokens, value=101)"
    )
    assert error["param"] == "max_tokens"


def test_api_key() -> None:
    fake = FakeVLLM(api_key="sekret")
    with httpx.Client(transport=fake.transport(), base_url="http://vllm") as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 401
        bad = client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer x"})
        assert bad.status_code == 401
        assert bad.content == b'{"error":"Unauthorized"}'
        ok = client.post(
            "/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sekret"}
        )
        assert ok.status_code == 200
        assert client.get("/health").status_code == 200  # not behind the key, as in vLLM


# --- other endpoints ----------------------------------------------------------------------


def test_models_health_tokenize_over_socket() -> None:
    fake = FakeVLLM(max_model_len=4096)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    with fake.serve() as server, httpx.Client(base_url=server.base_url[:-3]) as client:
        models = client.get("/v1/models").json()
        assert models["object"] == "list"
        card = models["data"][0]
        assert list(card) == [
            "id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission",
        ]  # fmt: skip
        assert (card["id"], card["max_model_len"], card["owned_by"]) == (MODEL, 4096, "vllm")
        health = client.get("/health")
        assert (health.status_code, health.content) == (200, b"")
        tok = client.post("/tokenize", json={"model": MODEL, "messages": messages}).json()
        assert list(tok) == ["count", "max_model_len", "tokens", "token_strs"]
        body = {**CHAT, "messages": messages, "stream_options": {"include_usage": True}}
        usage = payloads(client.post("/v1/chat/completions", json=body).content)[-2]["usage"]
        assert tok["count"] == usage["prompt_tokens"] == len(tok["tokens"]) == (4 + 3) + (4 + 2)
        assert client.get("/nope").status_code == 404


# --- faults -----------------------------------------------------------------------------


@dataclass
class Outcome:
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: Exception | None = None


def run_sync(client: httpx.Client, body: dict[str, Any] = CHAT) -> Outcome:
    out = Outcome()
    try:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            out.status, out.headers = response.status_code, dict(response.headers)
            for data in response.iter_raw():
                out.body += data
    except httpx.HTTPError as exc:
        out.error = exc
    return out


async def run_async(client: httpx.AsyncClient, body: dict[str, Any] = CHAT) -> Outcome:
    out = Outcome()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            out.status, out.headers = response.status_code, dict(response.headers)
            async for data in response.aiter_raw():
                out.body += data
    except httpx.HTTPError as exc:
        out.error = exc
    return out


NORMAL_EVENTS = 6  # role, "A", "B", "C", finish, [DONE]


def check_fault(kind: str, out: Outcome) -> None:
    evs = events(out.body)
    if kind == "http_status":
        assert out.status == 503
        assert out.headers["retry-after"] == "2"
        assert json.loads(out.body)["error"]["type"] == "Service Unavailable"
    elif kind == "http_text":
        assert out.status == 502
        assert out.headers["content-type"] == "text/html"
        assert out.body == b"<html>bad gateway</html>"
    elif kind == "disconnect":
        assert isinstance(out.error, httpx.RemoteProtocolError)
        assert len(evs) == 2 and out.body.endswith(b"\n\n")
    elif kind == "disconnect_0":
        assert out.status == 200
        assert isinstance(out.error, httpx.RemoteProtocolError)
        assert out.body == b""
    elif kind == "before_headers":
        assert isinstance(out.error, httpx.RemoteProtocolError)
        assert out.status is None
    elif kind == "inband_error":
        assert out.error is None
        assert [p if p == "[DONE]" else list(p) for p in payloads(out.body)][2:] == [
            ["error"],
            "[DONE]",
        ]
        assert payloads(out.body)[2]["error"]["code"] == 500
    elif kind == "malformed":
        assert out.error is None
        assert evs[1] == b'data: {"id": "chatcmpl-broken", "choices": ['
        assert len(evs) == NORMAL_EVENTS + 1 and evs[-1] == b"data: [DONE]"
    elif kind == "stall":
        assert out.error is None and len(evs) == NORMAL_EVENTS
    elif kind == "no_done":
        assert out.error is None and len(evs) == NORMAL_EVENTS - 1
        assert payloads(out.body)[-1]["choices"][0]["finish_reason"] == "stop"
    elif kind == "truncate":
        assert out.error is None and len(evs) == 3
    else:  # pragma: no cover
        raise AssertionError(kind)


FAULTS = {
    "http_status": Fault.http_status(503, retry_after=2),
    "http_text": Fault.http_status(
        502, "<html>bad gateway</html>", headers={"Content-Type": "text/html"}
    ),
    "disconnect": Fault.disconnect(after_chunks=2),
    "disconnect_0": Fault.disconnect(),
    "before_headers": Fault.disconnect_before_headers(),
    "inband_error": Fault.inband_error(after_chunks=2),
    "malformed": Fault.malformed_chunk(after_chunks=1),
    "stall": Fault.stall(after_chunks=2, seconds=0.05),
    "no_done": Fault.no_done(),
    "truncate": Fault.truncate(after_chunks=3),
}


@pytest.mark.parametrize("kind", sorted(FAULTS))
@pytest.mark.parametrize("via", ["transport", "socket"])
def test_fault_sync(kind: str, via: str) -> None:
    fake = FakeVLLM(tokens=["A", "B", "C"])
    fake.add_fault(FAULTS[kind])
    if via == "transport":
        client = httpx.Client(transport=fake.transport(), base_url="http://vllm")
        with client:
            check_fault(kind, run_sync(client))
            normal = run_sync(client)
    else:
        with fake.serve() as server, httpx.Client(base_url=server.base_url[:-3]) as client:
            check_fault(kind, run_sync(client))
            normal = run_sync(client)
    assert normal.error is None and len(events(normal.body)) == NORMAL_EVENTS
    assert len(fake.requests) == 2
    assert fake.disconnects == []


@pytest.mark.anyio
@pytest.mark.parametrize("kind", sorted(FAULTS))
@pytest.mark.parametrize("via", ["transport", "socket"])
async def test_fault_async(kind: str, via: str) -> None:
    fake = FakeVLLM(tokens=["A", "B", "C"])
    fake.add_fault(FAULTS[kind])
    if via == "transport":
        client = httpx.AsyncClient(transport=fake.transport(), base_url="http://vllm")
        async with client:
            check_fault(kind, await run_async(client))
            normal = await run_async(client)
    else:
        with fake.serve() as server:
            async with httpx.AsyncClient(base_url=server.base_url[:-3]) as client:
                check_fault(kind, await run_async(client))
                normal = await run_async(client)
    assert normal.error is None and len(events(normal.body)) == NORMAL_EVENTS
    assert fake.disconnects == []


def test_faults_apply_in_order_one_per_chat_request() -> None:
    fake = FakeVLLM(tokens=["A"])
    fake.add_fault(Fault.http_status(500))
    fake.add_fault(Fault.no_done())
    with httpx.Client(transport=fake.transport(), base_url="http://vllm") as client:
        assert client.get("/health").status_code == 200  # not a chat request: no fault
        first, second, third = (run_sync(client) for _ in range(3))
    assert first.status == 500
    assert not second.body.endswith(b"data: [DONE]\n\n")
    assert third.body.endswith(b"data: [DONE]\n\n")
    fake.add_fault(Fault.no_done())
    fake.reset()
    assert (fake.requests, fake.disconnects) == ([], [])


@pytest.mark.parametrize("via", ["transport", "socket"])
def test_stall_forever_hits_the_client_read_timeout(via: str) -> None:
    fake = FakeVLLM(tokens=["A", "B"])
    fake.add_fault(Fault.stall(after_chunks=2))
    timeout = httpx.Timeout(5.0, read=0.1)
    if via == "transport":
        client = httpx.Client(transport=fake.transport(), base_url="http://vllm", timeout=timeout)
        with client:
            out = run_sync(client)
    else:
        with fake.serve() as server:
            with httpx.Client(base_url=server.base_url[:-3], timeout=timeout) as client:
                out = run_sync(client)
            seen = fake.wait_for_disconnect()
            assert seen.chunks_sent == 2
    assert isinstance(out.error, httpx.ReadTimeout)
    assert len(events(out.body)) == 2


def test_keep_alive_comments_while_idle() -> None:
    fake = FakeVLLM(tokens=["A"], ttft=0.25, keep_alive=0.1)
    with fake.serve() as server, httpx.Client(base_url=server.base_url[:-3]) as client:
        body = run_sync(client).body
    assert body.startswith(b": keep-alive\n\n: keep-alive\n\ndata: {")
    assert body.count(b": keep-alive") == 2


# --- disconnects --------------------------------------------------------------------------


def test_socket_sees_client_close_within_100ms_during_token_delay() -> None:
    fake = FakeVLLM(tokens=HELLO, token_delay=1.0)
    with fake.serve() as server, httpx.Client(base_url=server.base_url[:-3]) as client:
        with client.stream("POST", "/v1/chat/completions", json=CHAT) as response:
            lines = response.iter_lines()
            got = [next(lines), next(lines), next(lines)]  # role chunk, "", first token
            assert b"Hello" in got[2].encode()
            closed = time.perf_counter()
            # leaving the block closes the pooled connection mid-body
        seen = fake.wait_for_disconnect(timeout=2.0)
    assert seen.time - closed < 0.1
    assert seen.chunks_sent == 2
    assert seen.request_index == 0


@pytest.mark.anyio
async def test_socket_disconnect_async(anyio_backend: object) -> None:
    fake = FakeVLLM(tokens=HELLO, ttft=1.0)
    with fake.serve() as server:
        async with (
            httpx.AsyncClient(base_url=server.base_url[:-3]) as client,
            client.stream("POST", "/v1/chat/completions", json=CHAT) as response,
        ):
            assert response.status_code == 200
            closed = time.perf_counter()
        seen = await fake.await_disconnect(timeout=2.0)
    assert seen.time - closed < 0.1
    assert seen.chunks_sent == 0


@pytest.mark.anyio
async def test_transport_records_early_close(anyio_backend: object) -> None:
    fake = FakeVLLM(tokens=HELLO, token_delay=10.0)
    transport = fake.transport()
    # Leaving before reading the body (iterating partly would leave httpx's async
    # generators unfinalised, which trio reports).
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://vllm") as client,
        client.stream("POST", "/v1/chat/completions", json=CHAT) as response,
    ):
        assert response.status_code == 200
    seen = await fake.await_disconnect()
    assert (seen.request_index, seen.chunks_sent) == (0, 0)


def test_sync_transport_records_early_close_and_not_a_full_read() -> None:
    fake = FakeVLLM(tokens=HELLO)
    with httpx.Client(transport=fake.transport(), base_url="http://vllm") as client:
        client.post("/v1/chat/completions", json=CHAT)
        with client.stream("POST", "/v1/chat/completions", json=CHAT) as response:
            next(response.iter_raw())
    assert [d.request_index for d in fake.disconnects] == [1]


def test_wait_for_disconnect_wakes_a_blocked_waiter() -> None:
    fake = FakeVLLM(tokens=HELLO, ttft=5.0)
    results: list[float] = []
    with fake.serve() as server:
        waiter = threading.Thread(
            target=lambda: results.append(fake.wait_for_disconnect(timeout=3.0).time)
        )
        waiter.start()
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            body = json.dumps(CHAT).encode()
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
            )
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        waiter.join(timeout=3.0)
    assert len(results) == 1


# --- requests and the server itself -------------------------------------------------------


def test_requests_are_recorded() -> None:
    fake = FakeVLLM("ok")
    before = time.perf_counter()
    with fake.serve() as server, httpx.Client(base_url=server.base_url) as client:
        client.post("/chat/completions", json=CHAT, headers={"X-Custom": "1"})
        client.get("/models")
    first, second = fake.requests
    assert (first.method, first.path, first.json) == ("POST", "/v1/chat/completions", CHAT)
    assert first.headers["x-custom"] == "1"
    assert (second.method, second.path, second.json) == ("GET", "/v1/models", None)
    assert before <= first.time <= second.time


def test_server_limits_and_connection_close() -> None:
    with FakeVLLM().serve() as server:
        with httpx.Client(base_url=server.base_url[:-3]) as client:
            big = client.post(
                "/v1/chat/completions",
                content=b"x" * (8 * 1024 * 1024 + 1),
                headers={"content-type": "application/json"},
            )
            assert big.status_code == 413
            closing = client.get("/health", headers={"connection": "close"})
            assert closing.headers["connection"] == "close"
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 431")


@pytest.mark.parametrize("via", ["transport", "socket"])
def test_a_body_nested_too_deep_to_parse_is_fastapis_400(via: str) -> None:
    # json.loads raises RecursionError, not a JSONDecodeError: FastAPI answers
    # HTTPException(400, "There was an error parsing the body"), in vLLM's ErrorResponse.
    deep = b"[" * 5000 + b"]" * 5000
    headers = {"content-type": "application/json"}
    fake = FakeVLLM("Hi")
    with contextlib.ExitStack() as stack:
        if via == "transport":
            client = stack.enter_context(
                httpx.Client(transport=fake.transport(), base_url="http://vllm/v1")
            )
        else:
            server = stack.enter_context(fake.serve())
            client = stack.enter_context(httpx.Client(base_url=server.base_url))
        response = client.post("/chat/completions", content=deep, headers=headers)
        assert response.status_code == 400
        assert response.json() == {
            "error": {
                "message": "There was an error parsing the body",
                "type": "Bad Request",
                "param": None,
                "code": 400,
            }
        }
        assert client.post("/chat/completions", json=CHAT).status_code == 200
    assert fake.requests[0].json is None


@pytest.mark.parametrize("where", ["exchange", "before-head", "after-head"])
def test_a_request_whose_handling_raises_fails_alone(
    where: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # As uvicorn under vLLM: 500 (vLLM's catch-all handler) when nothing is sent yet, the
    # connection closed otherwise, and the server goes on serving.
    fake = FakeVLLM("Hi")
    exchange = fake.exchange

    def failing(request: Any) -> Any:
        if request.path != "/v1/chat/completions":
            return exchange(request)
        if where == "exchange":
            raise RuntimeError("a bug in the emulator")
        real = exchange(request)

        def actions() -> Any:
            if where == "after-head":
                yield next(real.actions)
            raise RuntimeError("a bug in the emulator")

        return dataclasses.replace(real, actions=actions())

    monkeypatch.setattr(fake, "exchange", failing)
    with fake.serve() as server, httpx.Client(base_url=server.base_url[:-3]) as client:
        if where == "after-head":
            with pytest.raises(httpx.RemoteProtocolError):
                client.post("/v1/chat/completions", json=CHAT)
        else:
            response = client.post("/v1/chat/completions", json=CHAT)
            assert response.status_code == 500
            assert response.json()["error"]["type"] == "InternalServerError"
            assert response.headers["connection"] == "close"
        for _ in range(2):
            assert client.get("/health").status_code == 200
    assert "a bug in the emulator" in caplog.text


def test_server_stops_cleanly_with_open_streams() -> None:
    before = set(threading.enumerate())
    fake = FakeVLLM(tokens=HELLO, token_delay=10.0)
    server = fake.serve()
    server.start()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        body = json.dumps(CHAT).encode()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        server.stop()
    assert set(threading.enumerate()) <= before


@pytest.mark.anyio
async def test_server_usable_from_async_code(anyio_backend: object) -> None:
    fake = FakeVLLM("Hello there")
    with fake.serve() as server:
        results: list[bytes] = []
        async with (
            httpx.AsyncClient(base_url=server.base_url) as client,
            anyio.create_task_group() as tg,
        ):

            async def one() -> None:
                results.append((await client.post("/chat/completions", json=CHAT)).content)

            for _ in range(3):
                tg.start_soon(one)
    assert len(results) == 3
    assert all(r.endswith(b"data: [DONE]\n\n") for r in results)
