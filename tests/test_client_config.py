"""Configuration: environment defaults, model discovery, argument checks, secrets."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import typing
from typing import Any

import anyio
import httpx
import pydantic
import pytest
import respx

import llmstream
from llmstream.testing import FakeVLLM, Fault

URL = "http://vllm.test/v1"
SSE_OK = (
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},'
    b'"logprobs":null,"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
)


def _sse() -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=SSE_OK)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (
        "LLMSTREAM_BASE_URL",
        "LLMSTREAM_MODEL",
        "LLMSTREAM_API_KEY",
        "OPENAI_BASE_URL",
        "OPENAI_API_KEY",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults_to_localhost_8000(clean_env: pytest.MonkeyPatch) -> None:
    assert llmstream.Client().base_url == "http://localhost:8000/v1"


def test_llmstream_env_wins_over_openai_env(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OPENAI_BASE_URL", "http://openai.test/v1")
    assert llmstream.Client().base_url == "http://openai.test/v1"
    clean_env.setenv("LLMSTREAM_BASE_URL", "http://mine.test/v1/")
    clean_env.setenv("LLMSTREAM_MODEL", "my-model")
    client = llmstream.AsyncClient()
    assert (client.base_url, client.model) == ("http://mine.test/v1", "my-model")


def test_argument_wins_over_env(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LLMSTREAM_BASE_URL", "http://env.test/v1")
    assert llmstream.Client("http://arg.test/v1").base_url == "http://arg.test/v1"


@respx.mock
def test_api_key_from_env_is_sent_as_bearer(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OPENAI_API_KEY", "sk-openai")
    route = respx.post(f"{URL}/chat/completions").mock(return_value=_sse())
    with llmstream.Client(URL, model="m") as client, client.stream("Hi") as stream:
        list(stream)
    assert route.calls.last.request.headers["authorization"] == "Bearer sk-openai"
    clean_env.setenv("LLMSTREAM_API_KEY", "sk-mine")
    with llmstream.Client(URL, model="m") as client, client.stream("Hi") as stream:
        list(stream)
    assert route.calls.last.request.headers["authorization"] == "Bearer sk-mine"


@respx.mock
def test_model_is_asked_of_the_server_once(clean_env: pytest.MonkeyPatch) -> None:
    models = respx.get(f"{URL}/models").mock(
        return_value=httpx.Response(200, json={"object": "list", "data": [{"id": "served"}]})
    )
    chat = respx.post(f"{URL}/chat/completions").mock(side_effect=lambda r: _sse())
    with llmstream.Client(URL) as client:
        for _ in range(3):
            with client.stream("Hi") as stream:
                list(stream)
        assert client.model == "served"
    assert models.call_count == 1
    assert json.loads(chat.calls.last.request.content)["model"] == "served"


@pytest.mark.anyio
async def test_model_is_asked_of_the_server_once_async(clean_env: pytest.MonkeyPatch) -> None:
    with respx.mock:
        models = respx.get(f"{URL}/models").mock(
            return_value=httpx.Response(200, json={"data": [{"id": "served"}, {"id": "b"}]})
        )
        respx.post(f"{URL}/chat/completions").mock(side_effect=lambda r: _sse())
        async with llmstream.AsyncClient(URL) as client:
            for _ in range(2):
                async with client.stream("Hi") as stream:
                    assert [t async for t in stream] == ["Hi"]
        assert models.call_count == 1
        assert client.model == "served"


@respx.mock
def test_empty_model_list_says_what_to_do(clean_env: pytest.MonkeyPatch) -> None:
    respx.get(f"{URL}/models").mock(return_value=httpx.Response(200, json={"data": []}))
    with pytest.raises(llmstream.ProtocolError, match="LLMSTREAM_MODEL"):
        with llmstream.Client(URL) as client, client.stream("Hi") as stream:
            list(stream)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (([],), {}, "at least one message"),
        (("",), {}, "prompt is empty"),
        (([{"role": "wizard", "content": "x"}],), {}, "role 'wizard'"),
        (([{"role": "user"}],), {}, "no content"),
        (([{"role": "user", "content": 3}],), {}, "content must be"),
        ((["not a dict"],), {}, "must be a mapping"),
        ((42,), {}, "prompt string or a list"),
        (("Hi",), {"max_tokens": 0}, "max_tokens must be a positive integer"),
        (("Hi",), {"max_tokens": -5}, "max_tokens"),
        (("Hi",), {"max_tokens": 1.5}, "max_tokens"),
        (("Hi",), {"temperature": -1}, "temperature"),
        (("Hi",), {"stream": False}, "cannot be passed"),
    ],
)
def test_invalid_arguments_fail_before_any_request(
    args: tuple[object, ...], kwargs: dict[str, object], match: str
) -> None:
    with respx.mock(assert_all_called=False) as mock:
        route = mock.route().mock(return_value=_sse())
        for client in (llmstream.Client(URL, model="m"), llmstream.AsyncClient(URL, model="m")):
            with pytest.raises(llmstream.InvalidRequestError, match=match):
                client.stream(*args, **kwargs)  # type: ignore[arg-type]
        assert route.call_count == 0


@pytest.mark.parametrize(
    "url", ["ftp://host/v1", "localhost:8000", "not a url", "http://user:pw@host/v1"]
)
def test_malformed_base_url_fails_at_construction(url: str) -> None:
    with pytest.raises(llmstream.InvalidRequestError, match="base_url"):
        llmstream.Client(url)


@pytest.mark.parametrize(
    "url",
    ["http://host:8000/v1?key=sk-secret-1", "http://host:8000/v1#sk-secret-1", "http://host/v1?"],
)
def test_a_base_url_with_a_query_string_is_refused_without_echoing_it(url: str) -> None:
    # Paths are appended to the base URL, so its query would land mid-path; the query may
    # hold a key, so the message does not repeat the URL.
    for make in (llmstream.Client, llmstream.AsyncClient):
        with pytest.raises(llmstream.InvalidRequestError, match="query string") as caught:
            make(url)  # type: ignore[operator]
        assert "sk-secret" not in str(caught.value)


def test_invalid_request_error_is_also_a_value_error() -> None:
    assert issubclass(llmstream.InvalidRequestError, ValueError)
    assert issubclass(llmstream.InvalidRequestError, llmstream.LLMStreamError)


@respx.mock
def test_api_key_never_appears_in_repr_errors_or_logs(
    clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-very-secret-123"
    respx.post(f"{URL}/chat/completions").mock(
        return_value=httpx.Response(401, json={"error": "Unauthorized"})
    )
    caplog.set_level(logging.DEBUG)
    client = llmstream.Client(URL, model="m", api_key=secret)
    assert secret not in repr(client) and secret not in str(vars(client))
    with pytest.raises(llmstream.AuthenticationError) as info:
        with client.stream("Hi") as stream:
            list(stream)
    exc = info.value
    assert secret not in str(exc) and secret not in repr(exc)
    assert secret not in json.dumps(exc.headers) and secret not in exc.body
    assert secret not in caplog.text
    assert "LLMSTREAM_API_KEY" in str(exc)


@respx.mock
def test_redirects_are_not_followed() -> None:
    respx.post(f"{URL}/chat/completions").mock(
        return_value=httpx.Response(307, headers={"location": "http://evil.test/v1/chat"})
    )
    evil = respx.post("http://evil.test/v1/chat").mock(return_value=_sse())
    with pytest.raises(llmstream.APIStatusError) as info:
        with llmstream.Client(URL, model="m", api_key="k") as c, c.stream("Hi") as s:
            list(s)
    assert info.value.status_code == 307
    assert evil.call_count == 0


@respx.mock
def test_request_body_is_what_the_typescript_port_sent_plus_usage() -> None:
    route = respx.post(f"{URL}/chat/completions").mock(return_value=_sse())
    with llmstream.Client(URL, model="m") as client:
        with client.stream("Hi", max_tokens=32, temperature=0.7, seed=1) as stream:
            list(stream)
    body = json.loads(route.calls.last.request.content)
    assert body == {
        "model": "m",
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "max_tokens": 32,
        "temperature": 0.7,
        "stream_options": {"include_usage": True},
        "seed": 1,
    }
    request = route.calls.last.request
    assert request.headers["accept"] == "text/event-stream"


@respx.mock
def test_include_usage_can_be_turned_off() -> None:
    route = respx.post(f"{URL}/chat/completions").mock(return_value=_sse())
    with llmstream.Client(URL, model="m", include_usage=False) as client:
        with client.stream("Hi") as stream:
            list(stream)
    assert "stream_options" not in json.loads(route.calls.last.request.content)


def test_result_before_the_end_is_an_error_and_snapshot_is_not() -> None:
    stream = llmstream.Client(URL, model="m").stream("Hi")
    with pytest.raises(llmstream.LLMStreamError, match="not ended"):
        _ = stream.result
    assert stream.snapshot().text == ""


# Every public name, written out: adding or removing one is a decision this test records.
PUBLIC_NAMES = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AiohttpTransport",
    "AsyncioTransport",
    "AssistantMessage",
    "AsyncChatStream",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "BudgetExceeded",
    "BufferOverflow",
    "ClientClosed",
    "CallBudget",
    "CallEvent",
    "CallFailed",
    "CallFinished",
    "CallInfo",
    "CallRetries",
    "ChatCompletionChunk",
    "ChatStream",
    "ChoiceResult",
    "ChunkChoice",
    "ChunkDelta",
    "Client",
    "CompletionTokensDetails",
    "ConnectTimeout",
    "FinishEvent",
    "FirstToken",
    "FirstTokenTimeout",
    "FunctionCall",
    "FunctionCallDelta",
    "Hook",
    "IdleTimeout",
    "InternalServerError",
    "InvalidRequestError",
    "LLMStreamError",
    "LatencySummary",
    "Message",
    "NotFoundError",
    "OnFull",
    "OutputParseError",
    "PauseTimeout",
    "PermissionDeniedError",
    "PromptCounting",
    "PromptOrMessages",
    "PromptTokensDetails",
    "ProtocolError",
    "RateLimitError",
    "ReasoningEvent",
    "RequestSent",
    "Reservation",
    "ResponseHeaders",
    "RetryEvent",
    "RetryPolicy",
    "SSEDecoder",
    "SamplingParams",
    "ServerSentEvent",
    "ServerStreamError",
    "StreamAborted",
    "StreamEvent",
    "StreamInterrupted",
    "StreamLimitExceeded",
    "StreamMetrics",
    "StreamOptions",
    "StreamParams",
    "StreamResult",
    "StreamStatus",
    "StreamTimeout",
    "SystemMessage",
    "TextEvent",
    "Timeouts",
    "TokenBudget",
    "TokenCounter",
    "TokenLogprob",
    "TokenReport",
    "ToolArgumentsError",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallEvent",
    "ToolMessage",
    "TopLogprob",
    "TotalTimeout",
    "UnprocessableEntityError",
    "Usage",
    "UserMessage",
    "Admission",
    "CircuitBreaker",
    "DNSDiscovery",
    "Endpoint",
    "EndpointLoad",
    "Fleet",
    "Hedging",
    "OverloadedError",
    "Routing",
    "counter_from_text_tokenizer",
    "estimate_prompt_tokens",
    "response_format_for",
    "stream_llm_request",
    "stream_llm_request_sync",
    "__version__",
]


def test_public_names_are_exactly_these() -> None:
    assert sorted(set(llmstream.__all__)) == sorted(PUBLIC_NAMES)
    assert len(llmstream.__all__) == len(set(llmstream.__all__))
    for name in PUBLIC_NAMES:
        getattr(llmstream, name)  # exported, not only listed


PUBLIC_CLASSES = [
    getattr(llmstream, name) for name in PUBLIC_NAMES if inspect.isclass(getattr(llmstream, name))
]


@pytest.mark.parametrize("cls", PUBLIC_CLASSES, ids=lambda cls: cls.__name__)
def test_type_hints_of_public_classes_resolve(cls: type) -> None:
    # get_type_hints looks names up in sys.modules[cls.__module__]: the module that
    # defines the class must be the one that says so.
    typing.get_type_hints(cls)


@pytest.mark.parametrize(
    "cls",
    [cls for cls in PUBLIC_CLASSES if dataclasses.is_dataclass(cls)],
    ids=lambda c: c.__name__,
)
def test_pydantic_validates_public_dataclasses(cls: type) -> None:
    # The schema itself, not a placeholder: newer pydantic defers what it cannot resolve.
    assert pydantic.TypeAdapter(cls).core_schema["type"]


@pytest.mark.anyio
@pytest.mark.usefixtures("async_http_backend")
async def test_more_than_a_hundred_streams_run_at_once_on_the_default_pool() -> None:
    # httpx's and aiohttp's own default pools hold 100 connections: stream 101 would wait.
    streams = 110
    started = 0
    all_started = anyio.Event()
    # A long answer: every stream is still being generated when the last one starts.
    with FakeVLLM(tokens=["tok "] * 1000, token_delay=0.05).serve() as server:
        async with llmstream.AsyncClient(server.base_url) as client:

            async def one() -> None:
                nonlocal started
                async with client.stream("hi") as stream:
                    async for _ in stream:
                        started += 1
                        if started == streams:
                            all_started.set()
                        await all_started.wait()  # hold this stream's connection open
                        break

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for _ in range(streams):
                        tg.start_soon(one)
    assert started == streams
    # The first streams keep their connections for reuse; once 20 are in flight, the
    # others ask the server to close theirs at the end (the pool then stays small). The
    # asyncio transport keeps them all: taking one from its pool scans nothing.
    chats = [r for r in server.fake.requests if r.path.endswith("/chat/completions")]
    closing = [r for r in chats if r.headers.get("connection", "").lower() == "close"]
    kept_alive = isinstance(client._transport, llmstream.AsyncioTransport)
    assert len(chats) == streams and len(closing) == (0 if kept_alive else streams - 20)
    assert client._requests_in_flight == 0


FAULTS = [
    Fault.http_status(503),
    Fault.http_status(404),
    Fault.disconnect(after_chunks=3),
    Fault.disconnect_before_headers(),
    Fault.inband_error(after_chunks=2),
    Fault.stall(after_chunks=2, seconds=5),
]
IN_FLIGHT_OPTIONS: dict[str, Any] = {
    "retry": 0,
    "timeout": llmstream.Timeouts(connect=5, idle=0.3),
}


def _one_call_sync(client: llmstream.Client) -> None:
    with contextlib.suppress(llmstream.LLMStreamError), client.stream("Hi") as stream:
        for _ in stream:
            if len(stream.snapshot().text) > 8:
                break  # the calls without a fault end early


async def _one_call_async(client: llmstream.AsyncClient) -> None:
    with contextlib.suppress(llmstream.LLMStreamError):
        async with client.stream("Hi") as stream:
            async for _ in stream:
                if len(stream.snapshot().text) > 8:
                    break


@pytest.mark.anyio
async def test_streams_in_flight_are_counted_back_to_zero_whatever_ends_them() -> None:
    fake = FakeVLLM("one two three four five six", token_delay=0.001)
    with fake.serve() as server:
        async with llmstream.AsyncClient(server.base_url, **IN_FLIGHT_OPTIONS) as client:
            for fault in [*FAULTS, None]:
                if fault is not None:
                    fake.add_fault(fault)
                await _one_call_async(client)
            assert client._requests_in_flight == 0


def test_sync_streams_in_flight_are_counted_back_to_zero_whatever_ends_them() -> None:
    fake = FakeVLLM("one two three four five six", token_delay=0.001)
    with fake.serve() as server, llmstream.Client(server.base_url, **IN_FLIGHT_OPTIONS) as client:
        for fault in [*FAULTS, None]:
            if fault is not None:
                fake.add_fault(fault)
            _one_call_sync(client)
        assert client._requests_in_flight == 0
