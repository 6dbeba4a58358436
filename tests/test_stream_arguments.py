"""``stream()`` takes what an openai-python user passes, and refuses what would be lost.

HTTP-level cases with respx, for the sync and the async client alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
import respx

import llmstream
from llmstream.testing import FakeVLLM

from .drivers import MODES, collect

pytestmark = pytest.mark.anyio

URL = "http://vllm.test/v1"
SSE_OK = (
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},'
    b'"logprobs":null,"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
)


@pytest.fixture
def server() -> Iterator[respx.Route]:
    with respx.mock(assert_all_called=False) as mock:
        yield mock.post(f"{URL}/chat/completions").mock(
            return_value=httpx.Response(
                200, headers={"content-type": "text/event-stream"}, content=SSE_OK
            )
        )


def _bodies(route: respx.Route) -> list[dict[str, Any]]:
    return [json.loads(call.request.content) for call in route.calls]


async def _run(
    mode: str, *args: Any, client_kwargs: dict[str, Any] | None = None, **kw: Any
) -> str:
    kwargs = {"model": "m", "api_key": "sk-client", **(client_kwargs or {})}
    if mode == "async":
        async with llmstream.AsyncClient(URL, **kwargs) as client:
            async with client.stream(*args, **kw) as stream:
                return "".join([t async for t in stream])

    def run() -> str:
        with llmstream.Client(URL, **kwargs) as client, client.stream(*args, **kw) as stream:
            return "".join(stream)

    return await anyio.to_thread.run_sync(run)


@pytest.mark.parametrize("mode", MODES)
async def test_extra_body_is_merged_into_the_body(mode: str, server: respx.Route) -> None:
    await _run(mode, "Hi", max_tokens=5, extra_body={"top_k": 20, "x_delay_ms": 3})
    body = _bodies(server)[0]
    assert body["top_k"] == 20 and body["x_delay_ms"] == 3 and body["max_tokens"] == 5


@pytest.mark.parametrize("mode", MODES)
async def test_typed_sampling_keywords_go_into_the_body(mode: str, server: respx.Route) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    await _run(
        mode,
        "Hi",
        stop=["END"],
        seed=7,
        tools=tools,
        tool_choice="auto",
        logprobs=True,
        top_logprobs=2,
        n=1,
        min_tokens=2,
        response_format={"type": "json_object"},
    )
    body = _bodies(server)[0]
    assert body["stop"] == ["END"] and body["seed"] == 7 and body["tools"] == tools
    assert body["tool_choice"] == "auto" and body["logprobs"] is True
    assert body["top_logprobs"] == 2 and body["min_tokens"] == 2
    assert body["response_format"] == {"type": "json_object"}


@pytest.mark.parametrize("mode", MODES)
async def test_extra_headers_are_sent_and_a_per_call_authorization_wins_for_that_call_only(
    mode: str, server: respx.Route
) -> None:
    await _run(mode, "Hi", extra_headers={"X-Session-ID": "abc", "authorization": "Bearer sk-call"})
    await _run(mode, "Hi")
    first, second = (call.request.headers for call in server.calls)
    assert first["x-session-id"] == "abc"
    assert first.get_list("authorization") == ["Bearer sk-call"]
    assert second.get_list("authorization") == ["Bearer sk-client"]
    assert "x-session-id" not in second


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_token": 5}, "did you mean max_tokens"),
        ({"api_key": "sk"}, "api_key"),
        ({"max_retries": 3}, "max_retries"),
        ({"extra_body": {"stream": False}}, "cannot be passed in extra_body"),
        ({"stream": False}, "cannot be passed"),
        ({"extra_body": {"when": object()}}, "cannot be sent as JSON"),
        ({"stop": {1, 2}}, "cannot be sent as JSON"),
        ({"extra_body": {"x": float("nan")}}, "cannot be sent as JSON"),
        ({"extra_body": {"x": [float("-inf")]}}, "cannot be sent as JSON"),
    ],
)
def test_what_would_be_lost_is_refused_before_sending(
    kwargs: dict[str, Any], match: str, server: respx.Route
) -> None:
    for client in (llmstream.Client(URL, model="m"), llmstream.AsyncClient(URL, model="m")):
        with pytest.raises(llmstream.InvalidRequestError, match=match):
            client.stream("Hi", **kwargs)
    assert server.call_count == 0


@pytest.mark.parametrize("mode", MODES)
async def test_messages_may_be_passed_by_keyword(mode: str, server: respx.Route) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert await _run(mode, messages=messages) == "Hi"
    assert _bodies(server)[0]["messages"] == messages


def test_a_prompt_and_messages_together_are_refused() -> None:
    client = llmstream.Client(URL, model="m")
    with pytest.raises(llmstream.InvalidRequestError, match="not both"):
        client.stream("Hi", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(llmstream.InvalidRequestError, match="not both"):
        client.stream()


@pytest.mark.parametrize("mode", MODES)
async def test_a_callers_stream_options_keep_the_usage(mode: str) -> None:
    fake = FakeVLLM("one two three")
    outcome = await collect(
        mode,
        transport=fake.transport(),
        stream_options={"continuous_usage_stats": True},
    )
    sent = next(r.json for r in fake.requests if r.path.endswith("/chat/completions"))
    assert sent is not None
    assert sent["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
    assert outcome.final.usage is not None and outcome.final.usage.completion_tokens > 0


async def test_awaiting_stream_opens_it_and_iterating_closes_it() -> None:
    fake = FakeVLLM("one two three")
    async with llmstream.AsyncClient("http://fake/v1", transport=fake.transport()) as client:
        stream = await client.stream("Hi")
        assert len([r for r in fake.requests if r.path.endswith("/chat/completions")]) == 1
        text = "".join([t async for t in stream])
    assert text == "one two three"
    assert stream.result.complete


@pytest.mark.parametrize("mode", MODES)
async def test_complete_returns_the_result_a_stream_ends_with(mode: str) -> None:
    fake = FakeVLLM("one two three")
    if mode == "async":
        async with llmstream.AsyncClient("http://fake/v1", transport=fake.transport()) as client:
            result = await client.complete("Hi", max_tokens=16)
    else:
        with llmstream.Client("http://fake/v1", transport=fake.transport()) as client:
            result = client.complete(messages=[{"role": "user", "content": "Hi"}])
    assert result.complete and result.text == "one two three"
    assert result.metrics.time_to_first_token is not None


@pytest.mark.parametrize("mode", MODES)
async def test_complete_raises_what_the_stream_would(mode: str, server: respx.Route) -> None:
    server.mock(return_value=httpx.Response(404, json={"error": {"message": "no such model"}}))
    with pytest.raises(llmstream.NotFoundError, match="no such model"):
        if mode == "async":
            async with llmstream.AsyncClient(URL, model="m") as client:
                await client.complete("Hi")
        else:
            with llmstream.Client(URL, model="m") as client:
                client.complete("Hi")


@pytest.mark.parametrize("mode", MODES)
async def test_none_is_the_same_as_not_passing_a_parameter(mode: str, server: respx.Route) -> None:
    await _run(mode, "Hi", max_tokens=None, temperature=None, stop=None, timeout=None)
    body = _bodies(server)[0]
    assert not {"max_tokens", "temperature", "stop"} & set(body)
