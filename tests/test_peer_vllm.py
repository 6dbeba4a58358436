"""The client against vLLM's own serving code (a scripted engine), when it is running.

Set ``LLMSTREAM_PEER_VLLM_URL`` to a server started without parsers, and
``LLMSTREAM_PEER_VLLM_PARSERS_URL`` to one started with
``--reasoning-parser qwen3 --tool-call-parser hermes``. Skipped otherwise:
users' clones and CI have no such server. The async client runs on httpx and on aiohttp.
"""

from __future__ import annotations

import os
import time

import anyio
import httpx
import pytest

import llmstream

from .drivers import SOCKET_MODES, close_client_mid_stream, collect

PLAIN = os.environ.get("LLMSTREAM_PEER_VLLM_URL")
PARSERS = os.environ.get("LLMSTREAM_PEER_VLLM_PARSERS_URL")

needs_plain = pytest.mark.skipif(not PLAIN, reason="LLMSTREAM_PEER_VLLM_URL not set (no vLLM peer)")
needs_parsers = pytest.mark.skipif(
    not PARSERS, reason="LLMSTREAM_PEER_VLLM_PARSERS_URL not set (no vLLM peer with parsers)"
)
pytestmark = pytest.mark.anyio


def _root(base_url: str) -> str:
    return base_url.removesuffix("/v1")


@pytest.fixture
def root() -> str:
    """The plain peer's root URL, its abort log (``/_aborts``) emptied first."""
    assert PLAIN
    root = _root(PLAIN)
    httpx.post(f"{root}/_reset")
    return root


def _non_streamed(base_url: str, body: dict[str, object]) -> dict[str, object]:
    response = httpx.post(f"{base_url}/chat/completions", json={**body, "stream": False})
    response.raise_for_status()
    data: dict[str, object] = response.json()
    return data


async def _first_abort(root: str) -> float:
    """When vLLM saw the first client go (``time.time()``), from its own log."""
    aborts: list[dict[str, object]] = []
    with anyio.fail_after(5):
        while not aborts:
            aborts = httpx.get(f"{root}/_aborts").json()["aborts"]
            if not aborts:
                await anyio.sleep(0.02)  # polling the server's log; the timing comes from it
    return float(aborts[0]["time"])  # type: ignore[arg-type]


@needs_plain
@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_streamed_text_equals_the_servers_own_answer(mode: str) -> None:
    assert PLAIN
    outcome = await collect(mode, base_url=PLAIN, max_tokens=24)
    assert outcome.error is None
    result = outcome.final
    reference = _non_streamed(
        PLAIN,
        {"model": result.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 24},
    )
    choice = reference["choices"][0]  # type: ignore[index]
    assert outcome.text == choice["message"]["content"]
    assert result.finish_reason == choice["finish_reason"] == "length"
    assert result.usage is not None
    assert result.usage.completion_tokens == reference["usage"]["completion_tokens"]  # type: ignore[index]
    assert result.complete


@needs_plain
@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_engine_death_is_a_server_stream_error(mode: str) -> None:
    assert PLAIN
    outcome = await collect(mode, base_url=PLAIN, max_tokens=20, extra_body={"x_die_after": 3})
    assert isinstance(outcome.error, llmstream.ServerStreamError)
    assert outcome.error.error_code == 500
    assert outcome.final.text == outcome.text and outcome.text


@needs_plain
@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_unknown_model_and_validation_errors(mode: str) -> None:
    assert PLAIN
    outcome = await collect(mode, base_url=PLAIN, client_kwargs={"model": "nope"})
    assert isinstance(outcome.error, llmstream.NotFoundError)
    assert "nope" in str(outcome.error)
    outcome = await collect(
        mode, base_url=PLAIN, continue_final_message=True, add_generation_prompt=True
    )
    assert isinstance(outcome.error, llmstream.BadRequestError)
    assert "continue_final_message" in str(outcome.error)


@needs_plain
@pytest.mark.parametrize("mode", SOCKET_MODES)
@pytest.mark.parametrize("buffer", [64, 0], ids=["read-ahead", "pull"])
async def test_break_aborts_the_request_in_vllm_within_100ms(
    mode: str, buffer: int, root: str
) -> None:
    assert PLAIN

    def stop_after_first(snapshot: llmstream.StreamResult) -> bool:
        stop_after_first.t0 = time.time()  # type: ignore[attr-defined]
        return True

    outcome = await collect(
        mode,
        base_url=PLAIN,
        max_tokens=50,
        extra_body={"x_delay_ms": 500},
        on_piece=stop_after_first,
        buffer=buffer,
    )
    assert outcome.final.status == "cancelled"
    seen = await _first_abort(root)
    assert seen - stop_after_first.t0 < 0.100  # type: ignore[attr-defined]


@needs_plain
@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_the_total_deadline_aborts_a_request_held_back_by_a_slow_consumer(
    mode: str, root: str
) -> None:
    # The consumer is busy for 3 s after its first piece; the reader fills its buffer of 4
    # and waits. The total deadline (1 s) must still abort the request in vLLM at 1 s.
    assert PLAIN
    started = time.time()
    outcome = await collect(
        mode,
        base_url=PLAIN,
        max_tokens=200,
        extra_body={"x_delay_ms": 20},
        timeout=llmstream.Timeouts(total=1.0),
        buffer=4,
        busy=3.0,
    )
    assert isinstance(outcome.error, llmstream.TotalTimeout)
    assert outcome.error.partial is not None and outcome.error.partial.text == outcome.text
    assert 0.95 <= await _first_abort(root) - started < 1.0 + 0.1


@needs_plain
@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_closing_the_client_aborts_its_requests_in_vllm_within_100ms(
    mode: str, root: str
) -> None:
    assert PLAIN
    outcome, closed_at = await close_client_mid_stream(
        mode, PLAIN, clock=time.time, within=1.0, max_tokens=50, extra_body={"x_delay_ms": 500}
    )
    error = outcome.error
    assert isinstance(error, llmstream.ClientClosed)
    assert await _first_abort(root) - closed_at < 0.100


@needs_parsers
@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_reasoning_and_tool_call_through_vllm_parsers(mode: str) -> None:
    assert PARSERS
    outcome = await collect(mode, base_url=PARSERS, max_tokens=40, extra_body={"x_think_tokens": 5})
    assert outcome.final.reasoning
    assert outcome.text and outcome.text not in outcome.final.reasoning
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    outcome = await collect(
        mode,
        base_url=PARSERS,
        max_tokens=200,
        tools=tools,
        extra_body={"x_tool_call": {"name": "get_weather", "arguments": {"city": "東京"}}},
    )
    assert outcome.error is None
    result = outcome.final
    assert result.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.parsed()) for c in result.tool_calls] == [
        ("get_weather", {"city": "東京"})
    ]


@needs_parsers
@pytest.mark.usefixtures("async_http_backend")
async def test_events_show_vllms_reasoning_before_the_answer() -> None:
    assert PARSERS
    async with llmstream.AsyncClient(PARSERS) as client:
        async with client.stream("Hi", max_tokens=20, extra_body={"x_think_tokens": 5}) as stream:
            events = [event async for event in stream.events()]
    kinds = [e.type for e in events]
    assert kinds[0] == "reasoning" and "text" in kinds and kinds[-1] == "finish"
    assert kinds.index("text") > max(i for i, k in enumerate(kinds) if k == "reasoning")
    assert "".join(e.text for e in events if e.type == "reasoning") == stream.result.reasoning
