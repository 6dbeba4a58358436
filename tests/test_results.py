"""What a result gives back: the next turn's message, logprobs, parsed output, headers, speed."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest

import llmstream
from llmstream._metrics import MetricsRecorder
from llmstream._session import StreamSession
from llmstream.testing import FakeVLLM, Fault

from .conftest import DATA, load_vector
from .drivers import MODES, collect

pytestmark = pytest.mark.anyio

CAPTURED = DATA / "vllm" / "v0.33.0"
HAND_BUILT = DATA / "vllm"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def _assemble(path: Path, *, reads: int = 1) -> llmstream.StreamResult:
    """The vector's body fed to a session in ``reads`` network reads (timestamps 1, 2...)."""
    body, _ = load_vector(path)
    session = StreamSession(started=0.0)
    size = -(-len(body) // reads)
    for i in range(reads):
        session.feed(body[i * size : (i + 1) * size], now=float(i + 1))
    return session.end_of_body(now=float(reads + 1))


def _sse(*chunks: dict[str, Any]) -> bytes:
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


def _mock(body: bytes, headers: list[tuple[str, str]] | None = None) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        head = [("content-type", "text/event-stream; charset=utf-8"), *(headers or [])]
        return httpx.Response(200, headers=head, stream=httpx.ByteStream(body))

    return httpx.MockTransport(handler)


# -- the assistant message for the next turn ---------------------------------------------


def test_tool_call_answer_becomes_an_assistant_message_in_openai_shape() -> None:
    result = _assemble(CAPTURED / "tool_call.sse")
    (call,) = result.tool_calls
    assert result.to_message() == {
        "role": "assistant",
        "content": None,  # the turn is only a tool call
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    }
    assert call.id is not None and call.id.startswith("chatcmpl-tool-")


def test_text_before_a_tool_call_is_kept_as_content() -> None:
    # The model may write text before its <tool_call>: vLLM streams it as content first.
    opening = {"id": "chatcmpl-tool-1", "type": "function", "index": 0}
    result = _assemble_chunks(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Let me check."}}]},
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "content": None,
                        "tool_calls": [{**opening, "function": {"name": "get_weather"}}],
                    },
                }
            ]
        },
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]},
                }
            ]
        },
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    )
    message = result.to_message()
    assert message["content"] == "Let me check."
    assert message["tool_calls"] == [
        {
            "id": "chatcmpl-tool-1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": "{}"},
        }
    ]


def test_reasoning_is_left_out_unless_asked_for() -> None:
    result = _assemble(CAPTURED / "reasoning.sse")
    assert result.reasoning
    assert result.to_message() == {"role": "assistant", "content": result.text}
    with_reasoning = result.to_message(include_reasoning=True)
    assert with_reasoning["reasoning"] == result.reasoning


def test_a_tool_call_without_an_id_gets_one_the_server_accepts() -> None:
    # vLLM rejects an assistant tool call without id (400, "Field required").
    result = _assemble_chunks(
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    )
    assert result.tool_calls[0].id is None
    assert result.to_message()["tool_calls"][0]["id"] == "call_0"


def test_each_choice_gives_its_own_message() -> None:
    result = _assemble(HAND_BUILT / "n2.sse")
    messages = [choice.to_message() for choice in result.choices]
    assert [m["content"] for m in messages] == [c.text for c in result.choices]
    assert messages[0] == result.to_message()
    assert messages[0] != messages[1]


@pytest.mark.parametrize("mode", MODES)
async def test_round_trip_the_second_call_is_accepted_with_the_tool_answer(mode: str) -> None:
    fake = FakeVLLM(tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}])
    question: list[llmstream.Message] = [{"role": "user", "content": "Weather in Paris?"}]
    with fake.serve() as server:
        first = await collect(mode, base_url=server.base_url, prompt=question, tools=[WEATHER_TOOL])
        result = first.final
        assert first.error is None and result.finish_reason == "tool_calls"
        call = result.tool_calls[0]
        assert call.function.parsed() == {"city": "Paris"}
        messages: list[llmstream.Message] = [
            *question,
            result.to_message(),
            {"role": "tool", "tool_call_id": call.id, "content": "18 °C and sunny"},
        ]
        second = await collect(
            mode, base_url=server.base_url, prompt=messages, tools=[WEATHER_TOOL]
        )
    assert second.error is None and second.final.complete
    sent = fake.requests[-1].json
    assert sent is not None
    assert sent["messages"][1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": "get_weather", "arguments": call.function.arguments},
            }
        ],
    }
    assert sent["messages"][2]["tool_call_id"] == call.id


# -- logprobs ------------------------------------------------------------------------------


@pytest.mark.parametrize("reads", [1, 3, 40])
def test_logprobs_are_assembled_per_token_in_order(reads: int) -> None:
    _, meta = load_vector(HAND_BUILT / "logprobs.sse")
    want = meta["expected"]["choices"][0]["logprobs"]
    result = _assemble(HAND_BUILT / "logprobs.sse", reads=reads)
    assert result.logprobs is not None
    assert [t.model_dump() for t in result.logprobs] == want
    assert result.choices[0].logprobs == result.logprobs
    first = result.logprobs[0]
    assert (first.token, first.logprob, bytes(first.bytes or [])) == ("Hello", -0.01, b"Hello")
    assert [t.token for t in first.top_logprobs] == ["Hello", "Hi"]
    # The finish chunk carries the end-of-sequence token's entry.
    assert result.logprobs[-1].token == "<|im_end|>"
    assert result.text == "Hello!"


def test_logprobs_are_none_when_not_asked_for() -> None:
    result = _assemble(CAPTURED / "simple_chat.sse")
    assert result.logprobs is None and result.choices[0].logprobs is None


def test_logprobs_of_several_choices_stay_apart() -> None:
    def token(choice: int, text: str, logprob: float) -> dict[str, Any]:
        entry = {
            "token": text,
            "logprob": logprob,
            "bytes": list(text.encode()),
            "top_logprobs": [],
        }
        return {
            "choices": [
                {"index": choice, "delta": {"content": text}, "logprobs": {"content": [entry]}}
            ]
        }

    result = _assemble_chunks(
        token(0, "Red", -0.1),
        token(1, "Blue", -0.2),
        token(1, ".", -0.3),
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [{"index": 1, "delta": {}, "finish_reason": "stop"}]},
    )
    first, second = result.choices
    assert [t.token for t in first.logprobs or []] == ["Red"]
    assert [(t.token, t.logprob) for t in second.logprobs or []] == [("Blue", -0.2), (".", -0.3)]
    assert result.logprobs == first.logprobs


def test_malformed_logprobs_are_a_protocol_error_with_the_partial_answer() -> None:
    session = StreamSession(started=0.0)
    body = _sse(
        {"choices": [{"index": 0, "delta": {"content": "Hi"}}]},
        {"choices": [{"index": 0, "delta": {"content": "!"}, "logprobs": {"content": [{}]}}]},
    )
    session.feed(body, now=1.0)
    error = session.error
    assert isinstance(error, llmstream.ProtocolError)
    assert "logprobs" in str(error) and "token" in str(error)
    assert error.partial is not None and error.partial.text == "Hi"


@pytest.mark.parametrize("mode", MODES)
async def test_logprobs_reach_the_result_through_both_clients(mode: str) -> None:
    body, meta = load_vector(HAND_BUILT / "logprobs.sse")
    outcome = await collect(
        mode, transport=_mock(body), client_kwargs={"model": "m"}, logprobs=True, top_logprobs=2
    )
    logprobs = outcome.final.logprobs
    assert logprobs is not None
    assert [t.model_dump() for t in logprobs] == meta["expected"]["choices"][0]["logprobs"]


# -- structured output ---------------------------------------------------------------------


class Weather(pydantic.BaseModel):
    city: str
    celsius: float


class Box(pydantic.BaseModel):
    item: Weather


def test_response_format_is_the_json_schema_shape_vllm_accepts() -> None:
    assert llmstream.response_format_for(Weather) == {
        "type": "json_schema",
        "json_schema": {"name": "Weather", "schema": Weather.model_json_schema(), "strict": True},
    }
    nested = llmstream.response_format_for(Box, name="box")["json_schema"]
    assert isinstance(nested, dict) and nested["name"] == "box"
    assert "$defs" in nested["schema"]  # nested models travel as references


def test_response_format_name_follows_openais_rule() -> None:
    class Generic(pydantic.BaseModel):
        value: int

    Generic.__name__ = "Page[Weather] v2"
    schema = llmstream.response_format_for(Generic)["json_schema"]
    assert isinstance(schema, dict) and schema["name"] == "Page_Weather__v2"


def test_response_format_refuses_what_is_not_a_model() -> None:
    with pytest.raises(llmstream.InvalidRequestError, match="pydantic model class"):
        llmstream.response_format_for(dict)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", MODES)
async def test_parse_returns_the_validated_object(mode: str) -> None:
    fake = FakeVLLM('{"city": "Paris", "celsius": 18.5}')
    fmt = llmstream.response_format_for(Weather)
    outcome = await collect(mode, transport=fake.transport(), response_format=fmt)
    assert outcome.final.parse(Weather) == Weather(city="Paris", celsius=18.5)
    sent = fake.requests[-1].json
    assert sent is not None and sent["response_format"] == fmt


@pytest.mark.parametrize("mode", MODES)
async def test_a_model_class_as_response_format_sends_its_schema(mode: str) -> None:
    fake = FakeVLLM('{"city": "Paris", "celsius": 18.5}')
    outcome = await collect(mode, transport=fake.transport(), response_format=Weather)
    assert outcome.final.parse(Weather) == Weather(city="Paris", celsius=18.5)
    sent = fake.requests[-1].json
    assert sent is not None
    assert sent["response_format"] == llmstream.response_format_for(Weather)


def _result(text: str, finish_reason: str = "stop", **kwargs: Any) -> llmstream.StreamResult:
    return llmstream.StreamResult(
        text=text, finish_reason=finish_reason, status=kwargs.pop("status", "complete"), **kwargs
    )


def test_parse_of_text_that_is_not_json_names_the_model_and_keeps_the_text() -> None:
    with pytest.raises(llmstream.OutputParseError) as caught:
        _result("Sure! The weather is nice.").parse(Weather)
    error = caught.value
    assert isinstance(error, llmstream.LLMStreamError) and isinstance(error, ValueError)
    assert error.text == "Sure! The weather is nice." and error.model_name == "Weather"
    assert "not a valid Weather" in str(error) and "not valid JSON" in str(error)
    assert "response_format=Weather" in str(error)
    assert isinstance(error.__cause__, pydantic.ValidationError)


def test_parse_of_json_that_does_not_validate_says_where() -> None:
    with pytest.raises(llmstream.OutputParseError, match=r"celsius: Field required"):
        _result('{"city": "Paris"}').parse(Weather)


@pytest.mark.parametrize(
    ("finish_reason", "status", "says"),
    [
        ("length", "complete", "raise max_tokens"),
        (None, "interrupted", "status 'interrupted'"),
        (None, "streaming", "has not ended yet"),
    ],
)
def test_parse_of_a_cut_answer_says_why(
    finish_reason: str | None, status: llmstream.StreamStatus, says: str
) -> None:
    result = llmstream.StreamResult(
        text='{"city": "Par', finish_reason=finish_reason, status=status
    )
    with pytest.raises(llmstream.OutputParseError, match=says):
        result.parse(Weather)


def test_each_choice_parses_on_its_own() -> None:
    good = llmstream.ChoiceResult(
        index=0, text='{"city": "Oslo", "celsius": -3}', finish_reason="stop"
    )
    cut = llmstream.ChoiceResult(index=1, text='{"city": "Os')
    assert good.parse(Weather).celsius == -3
    with pytest.raises(llmstream.OutputParseError, match="no finish_reason"):
        cut.parse(Weather)


# -- response headers ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_headers_and_request_id_are_on_the_result(mode: str) -> None:
    fake = FakeVLLM("Hi there", request_id_headers=True)
    with fake.serve() as server:
        outcome = await collect(mode, base_url=server.base_url)
    result = outcome.final
    assert result.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert result.request_id is not None
    assert result.headers["x-request-id"] == result.request_id


@pytest.mark.parametrize("mode", MODES)
async def test_header_names_are_lower_case_and_cookies_left_out(mode: str) -> None:
    body, _ = load_vector(CAPTURED / "simple_chat.sse")
    headers = [("X-Request-Id", "req-7"), ("Set-Cookie", "session=secret"), ("X-Served-By", "gw-2")]
    outcome = await collect(mode, transport=_mock(body, headers), client_kwargs={"model": "m"})
    result = outcome.final
    assert result.headers["x-served-by"] == "gw-2"
    assert result.request_id == "req-7"
    assert all(name == name.lower() for name in result.headers)
    assert "set-cookie" not in result.headers
    assert "secret" not in result.model_dump_json()


@pytest.mark.parametrize("mode", MODES)
async def test_headers_are_the_last_responses_after_a_retry(mode: str) -> None:
    fake = FakeVLLM("Hi there")
    fake.add_fault(Fault.http_status(503, headers={"x-failed-attempt": "1"}))
    outcome = await collect(
        mode, transport=fake.transport(), retry=llmstream.RetryPolicy(initial_backoff=0.0)
    )
    result = outcome.final
    assert result.retries == 1 and result.complete
    assert "x-failed-attempt" not in result.headers
    assert result.headers["content-type"].startswith("text/event-stream")


@pytest.mark.parametrize("mode", MODES)
async def test_a_broken_streams_partial_result_has_the_headers(mode: str) -> None:
    fake = FakeVLLM("one two three four five", request_id_headers=True)
    fake.add_fault(Fault.disconnect(after_chunks=3))
    with fake.serve() as server:
        outcome = await collect(mode, base_url=server.base_url)
    assert isinstance(outcome.error, llmstream.StreamInterrupted)
    partial = outcome.final
    assert partial.text and partial.headers["x-request-id"] == partial.request_id


# -- tokens per second ---------------------------------------------------------------------


def test_one_output_chunk_gives_tokens_over_the_whole_wait() -> None:
    rec = MetricsRecorder(started=10.0)
    rec.token(10.5)
    assert rec.summary(completion_tokens=None, ended=10.6).tokens_per_second == pytest.approx(2.0)
    assert rec.summary(completion_tokens=3, ended=10.6).tokens_per_second == pytest.approx(6.0)


def test_chunks_in_one_read_give_tokens_over_the_whole_wait() -> None:
    rec = MetricsRecorder(started=0.0)
    rec.token(0.25)
    rec.token(0.25)  # the same network read: no decode interval
    assert rec.summary(completion_tokens=None, ended=0.3).tokens_per_second == pytest.approx(8.0)


def test_a_measured_decode_interval_still_gives_the_decode_speed() -> None:
    rec = MetricsRecorder(started=0.0)
    for t in (1.0, 1.1, 1.2):
        rec.token(t)
    assert rec.summary(completion_tokens=None, ended=2.0).tokens_per_second == pytest.approx(10.0)


def test_one_read_of_a_whole_captured_stream_has_a_speed() -> None:
    result = _assemble(CAPTURED / "simple_chat.sse", reads=1)
    m = result.metrics
    assert m.completion_tokens > 0
    assert m.tokens_per_second == pytest.approx(m.completion_tokens / 1.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("answer", ["Hi", "Hi there"])
async def test_a_completed_short_stream_formats_its_speed(mode: str, answer: str) -> None:
    fake = FakeVLLM(answer)
    with fake.serve() as server:
        outcome = await collect(mode, base_url=server.base_url, max_tokens=2)
    m = outcome.final.metrics
    assert outcome.final.complete
    assert math.isfinite(m.tokens_per_second) and m.tokens_per_second > 0
    assert f"{m.tokens_per_second:.1f} tok/s"  # the docs' own format string


# -- the usage that may be missing ---------------------------------------------------------


def test_a_result_without_usage_still_counts_its_tokens() -> None:
    result = _assemble(CAPTURED / "simple_chat.sse")  # no include_usage: no usage chunk
    assert result.usage is None
    assert result.tokens.completion_tokens == result.metrics.completion_tokens > 0
    assert result.tokens.completion_source == "chunks"


def test_docs_and_examples_never_read_a_usage_field_unguarded() -> None:
    root = Path(__file__).resolve().parent.parent
    files = [root / "README.md", *(root / "docs").rglob("*.md"), *(root / "examples").glob("*.py")]
    offenders = []
    for path in files:
        text = path.read_text("utf-8")
        for line in text.splitlines():
            if "result.usage." in line and "result.usage is not None" not in text:
                offenders.append(f"{path.relative_to(root)}: {line.strip()}")
    assert not offenders, "usage is None without include_usage or on llama.cpp:\n" + "\n".join(
        offenders
    )


# -- against vLLM's own serving code, when it runs -------------------------------------------

PARSERS = os.environ.get("LLMSTREAM_PEER_VLLM_PARSERS_URL")
needs_parsers = pytest.mark.skipif(
    not PARSERS, reason="LLMSTREAM_PEER_VLLM_PARSERS_URL not set (no vLLM peer with parsers)"
)


@needs_parsers
@pytest.mark.parametrize("mode", MODES)
async def test_vllm_accepts_the_round_trip_message(mode: str) -> None:
    assert PARSERS
    question: list[llmstream.Message] = [{"role": "user", "content": "Weather in Paris?"}]
    first = await collect(
        mode,
        base_url=PARSERS,
        prompt=question,
        tools=[WEATHER_TOOL],
        max_tokens=64,
        # The scripted engine's own field: it answers with this tool call.
        extra_body={"x_tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}},
    )
    result = first.final
    assert first.error is None and result.finish_reason == "tool_calls", result
    call = result.tool_calls[0]
    messages: list[llmstream.Message] = [
        *question,
        result.to_message(),
        {"role": "tool", "tool_call_id": call.id, "content": "18 °C and sunny"},
    ]
    second = await collect(
        mode, base_url=PARSERS, prompt=messages, tools=[WEATHER_TOOL], max_tokens=4
    )
    assert second.error is None, second.error
    assert second.final.complete


@needs_parsers
@pytest.mark.parametrize("mode", MODES)
async def test_vllm_accepts_the_response_format(mode: str) -> None:
    assert PARSERS
    fmt = llmstream.response_format_for(Box)
    outcome = await collect(mode, base_url=PARSERS, response_format=fmt, max_tokens=4)
    assert outcome.error is None, outcome.error
    assert outcome.final.complete


def _assemble_chunks(*chunks: dict[str, Any]) -> llmstream.StreamResult:
    session = StreamSession(started=0.0)
    session.feed(_sse(*chunks), now=1.0)
    assert session.error is None, session.error
    return session.end_of_body(now=2.0)
