"""The emulator refuses the request bodies vLLM 0.33.0 refuses, with vLLM's bytes.

Every expected error below was captured from vLLM 0.33.0's own serving code: the request
model's checks from the scripted-engine peer server (``shared/peers/vllm``), and the
``SamplingParams`` checks, which its scripted engine skips, from the same code with
``to_sampling_params`` called as vLLM's ``create_chat_completion`` calls it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from llmstream.testing import FakeVLLM

MODEL = "llmstream/fake-model"
BASE: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Hi"}],
    "max_tokens": 3,
}
BODY_IS_A_LIST: dict[str, Any] = {}  # the case sends the body `[]`
REQUEST = "request"  # checked by the request model, as on the peer server too
SAMPLING = "sampling"  # checked by SamplingParams, after the model and the prompt length


@dataclass(frozen=True)
class Case:
    extra: dict[str, Any]
    message: str
    type: str
    param: str | None
    stage: str

    def body(self, model: str = MODEL) -> Any:
        if self.extra is BODY_IS_A_LIST:
            return []
        return {**BASE, "model": model, **self.extra}

    def expected(self) -> bytes:
        """The response body, serialized as Starlette's JSONResponse does."""
        error = {"message": self.message, "type": self.type, "param": self.param, "code": 400}
        return json.dumps({"error": error}, ensure_ascii=False, separators=(",", ":")).encode()


CASES: dict[str, Case] = {
    "max_tokens_negative": Case(
        {"max_tokens": -1},
        "max_tokens must be at least 1, got -1. (parameter=max_tokens, value=-1)",
        "BadRequestError",
        "max_tokens",
        SAMPLING,
    ),
    "max_completion_tokens_zero": Case(
        {"max_completion_tokens": 0},
        "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
        "BadRequestError",
        "max_tokens",
        SAMPLING,
    ),
    "max_tokens_fraction": Case(
        {"max_tokens": 1.5},
        (
            "1 validation error:\n"
            "  {'type': 'int_from_float', 'loc': 'body.max_tokens', 'msg': 'Input "
            "should be a valid integer, got a number with a fractional part', "
            "'input': '1.5'}"
        ),
        "Bad Request",
        "body.max_tokens",
        REQUEST,
    ),
    "n_zero": Case(
        {"n": 0},
        "n must be at least 1, got 0.",
        "BadRequestError",
        None,
        SAMPLING,
    ),
    "n_greedy": Case(
        {"n": 2, "temperature": 0},
        "n must be 1 when using greedy sampling, got 2.",
        "BadRequestError",
        None,
        SAMPLING,
    ),
    "message_not_object": Case(
        {"messages": ["hi"]},
        (
            "8 validation errors:\n"
            "  {'type': 'dict_type', 'loc': "
            "'body.messages.0.ChatCompletionDeveloperMessageParam', 'msg': 'Input "
            "should be a valid dictionary', 'input': 'hi'}\n"
            "  {'type': 'dict_type', 'loc': "
            "'body.messages.0.ChatCompletionSystemMessageParam', 'msg': 'Input "
            "should be a valid dictionary', 'input': 'hi'}\n"
            "  {'type': 'dict_type', 'loc': "
            "'body.messages.0.ChatCompletionUserMessageParam', 'msg': 'Input should "
            "be a valid dictionary', 'input': 'hi'}\n"
            "  {'type': 'dict_type', 'loc': "
            "'body.messages.0.ChatCompletionAssistantMessageParam', 'msg': 'Input "
            "should be a valid dictionary', 'input': 'hi'}\n"
            "  {'type': 'dict_type', 'loc': "
            "'body.messages.0.ChatCompletionToolMessageParam', 'msg': 'Input should "
            "be a valid dictionary', 'input': 'hi'}\n"
            "  {'type': 'dict_type', 'loc': "
            "'body.messages.0.ChatCompletionFunctionMessageParam', 'msg': 'Input "
            "should be a valid dictionary', 'input': 'hi'}\n"
            "  {'type': 'dict_type', 'loc': "
            "'body.messages.0.CustomChatCompletionMessageParam', 'msg': 'Input "
            "should be a valid dictionary', 'input': 'hi'}\n"
            "  {'type': 'model_attributes_type', 'loc': 'body.messages.0.Message', "
            "'msg': 'Input should be a valid dictionary or object to extract fields "
            "from', 'input': 'hi'}"
        ),
        "Bad Request",
        "body.messages.0.ChatCompletionDeveloperMessageParam",
        REQUEST,
    ),
    "message_without_role": Case(
        {"messages": [{"content": "hi"}]},
        (
            "11 validation errors:\n"
            "  {'type': 'missing', 'loc': "
            "'body.messages.0.ChatCompletionDeveloperMessageParam.role', 'msg': "
            "'Field required', 'input': '<dict of 1 items>'}\n"
            "  {'type': 'missing', 'loc': "
            "'body.messages.0.ChatCompletionSystemMessageParam.role', 'msg': 'Field "
            "required', 'input': '<dict of 1 items>'}\n"
            "  {'type': 'missing', 'loc': "
            "'body.messages.0.ChatCompletionUserMessageParam.role', 'msg': 'Field "
            "required', 'input': '<dict of 1 items>'}\n"
            "  {'type': 'missing', 'loc': "
            "'body.messages.0.ChatCompletionAssistantMessageParam.role', 'msg': "
            "'Field required', 'input': '<dict of 1 items>'}\n"
            "  {'type': 'missing', 'loc': "
            "'body.messages.0.ChatCompletionToolMessageParam.role', 'msg': 'Field "
            "required', 'input': '<dict of 1 items>'}\n"
            "  {'type': 'missing', 'loc': "
            "'body.messages.0.ChatCompletionToolMessageParam.tool_call_id', 'msg': "
            "'Field required', 'input': '<dict of 1 items>'}\n"
            "  {'type': 'missing', 'loc': "
            "'body.messages.0.ChatCompletionFunctionMessageParam.name', 'msg': "
            "'Field required', 'input': '<dict of 1 items>'}\n"
            "  {'type': 'missing', 'loc': "
            "'body.messages.0.ChatCompletionFunctionMessageParam.role', 'msg': "
            "'Field required', 'input': '<dict of 1 items>'}\n"
            "  {'type': 'missing', 'loc': "
            "'body.messages.0.CustomChatCompletionMessageParam.role', 'msg': 'Field "
            "required', 'input': '<dict of 1 items>'}\n"
            "  {'type': 'missing', 'loc': 'body.messages.0.Message.author', 'msg': "
            "'Field required', 'input': '<dict of 1 items>'}\n"
            "  ...and 1 more errors"
        ),
        "Bad Request",
        "body.messages.0.ChatCompletionDeveloperMessageParam.role",
        REQUEST,
    ),
    "messages_null": Case(
        {"messages": None},
        "'NoneType' object is not iterable",
        "BadRequestError",
        None,
        REQUEST,
    ),
    "messages_many_bad": Case(
        {"messages": [5, None]},
        (
            "16 validation errors:\n"
            "  {'type': 'dict_type', 'loc': "
            "'body.messages.0.ChatCompletionDeveloperMessageParam', 'msg': 'Input "
            "should be a valid dictionary', 'input': '5'}\n"
            "  {'type': 'dict_type', 'loc': "
            "'body.messages.0.ChatCompletionSystemMessageParam', 'msg': 'Input "
            "should be a valid dictionary', 'input': '5'}\n"
            "  {'type': 'dict_type', 'loc': "
            "'body.messages.0.ChatCompletionUserMessageParam', 'msg': 'Input should "
            "be a valid dictionary', 'input': '5'}\n"
            "  {'type': 'dict_type', 'loc': "
            "'body.messages.0.ChatCompletionAssistantMessageParam', 'msg': 'Input "
            "should be a valid dictionary', 'input': '5'}\n"
            "  {'type': 'dict_type', 'loc': "
            "'body.messages.0.ChatCompletionToolMessageParam', 'msg': 'Input should "
            "be a valid dictionary', 'input': '5'}\n"
            "  {'type': 'dict_type', 'loc': "
            "'body.messages.0.ChatCompletionFunctionMessageParam', 'msg': 'Input "
            "should be a valid dictionary', 'input': '5'}\n"
            "  {'type': 'dict_type', 'loc': "
            "'body.messages.0.CustomChatCompletionMessageParam', 'msg': 'Input "
            "should be a valid dictionary', 'input': '5'}\n"
            "  {'type': 'model_attributes_type', 'loc': 'body.messages.0.Message', "
            "'msg': 'Input should be a valid dictionary or object to extract fields "
            "from', 'input': '5'}\n"
            "  {'type': 'dict_type', 'loc': "
            "'body.messages.1.ChatCompletionDeveloperMessageParam', 'msg': 'Input "
            "should be a valid dictionary', 'input': 'None'}\n"
            "  {'type': 'dict_type', 'loc': "
            "'body.messages.1.ChatCompletionSystemMessageParam', 'msg': 'Input "
            "should be a valid dictionary', 'input': 'None'}\n"
            "  ...and 6 more errors"
        ),
        "Bad Request",
        "body.messages.0.ChatCompletionDeveloperMessageParam",
        REQUEST,
    ),
    "top_logprobs_without_logprobs": Case(
        {"top_logprobs": 3},
        ("when using `top_logprobs`, `logprobs` must be set to true. (parameter=top_logprobs)"),
        "BadRequestError",
        "top_logprobs",
        REQUEST,
    ),
    "top_logprobs_negative": Case(
        {"top_logprobs": -2, "logprobs": True},
        ("`top_logprobs` must be a positive value or -1. (parameter=top_logprobs, value=-2)"),
        "BadRequestError",
        "top_logprobs",
        REQUEST,
    ),
    "top_logprobs_string": Case(
        {"top_logprobs": "a", "logprobs": True},
        "`top_logprobs` must be an integer. (parameter=top_logprobs, value=a)",
        "BadRequestError",
        "top_logprobs",
        REQUEST,
    ),
    "stream_not_bool": Case(
        {"stream": "maybe"},
        (
            "1 validation error:\n"
            "  {'type': 'bool_parsing', 'loc': 'body.stream', 'msg': 'Input should "
            "be a valid boolean, unable to interpret input', 'input': 'maybe'}"
        ),
        "Bad Request",
        "body.stream",
        REQUEST,
    ),
    "stream_list": Case(
        {"stream": []},
        (
            "1 validation error:\n"
            "  {'type': 'bool_type', 'loc': 'body.stream', 'msg': 'Input should be a "
            "valid boolean', 'input': '<list of 0 items>'}"
        ),
        "Bad Request",
        "body.stream",
        REQUEST,
    ),
    "temperature_high": Case(
        {"temperature": 3},
        ("temperature must be in [0, 2], got 3.0. (parameter=temperature, value=3.0)"),
        "BadRequestError",
        "temperature",
        SAMPLING,
    ),
    "temperature_negative": Case(
        {"temperature": -1},
        ("temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)"),
        "BadRequestError",
        "temperature",
        SAMPLING,
    ),
    "temperature_text": Case(
        {"temperature": "hot"},
        (
            "1 validation error:\n"
            "  {'type': 'float_parsing', 'loc': 'body.temperature', 'msg': 'Input "
            "should be a valid number, unable to parse string as a number', 'input': "
            "'hot'}"
        ),
        "Bad Request",
        "body.temperature",
        REQUEST,
    ),
    "top_p_zero": Case(
        {"top_p": 0},
        "top_p must be in (0, 1], got 0.0. (parameter=top_p, value=0.0)",
        "BadRequestError",
        "top_p",
        SAMPLING,
    ),
    "presence_penalty_high": Case(
        {"presence_penalty": 3},
        "presence_penalty must be in [-2, 2], got 3.0.",
        "BadRequestError",
        None,
        SAMPLING,
    ),
    "frequency_penalty_low": Case(
        {"frequency_penalty": -3},
        "frequency_penalty must be in [-2, 2], got -3.0.",
        "BadRequestError",
        None,
        SAMPLING,
    ),
    "repetition_penalty_zero": Case(
        {"repetition_penalty": 0},
        "repetition_penalty must be greater than zero, got 0.0.",
        "BadRequestError",
        None,
        SAMPLING,
    ),
    "top_k_low": Case(
        {"top_k": -2},
        "top_k must be 0 (disable), or at least 1, got -2.",
        "BadRequestError",
        None,
        SAMPLING,
    ),
    "min_p_high": Case(
        {"min_p": 2},
        "min_p must be in [0, 1], got 2.0.",
        "BadRequestError",
        None,
        SAMPLING,
    ),
    "min_tokens_over_max": Case(
        {"min_tokens": 10},
        "min_tokens must be less than or equal to max_tokens=3, got 10.",
        "BadRequestError",
        None,
        SAMPLING,
    ),
    "stop_number": Case(
        {"stop": 5},
        (
            "2 validation errors:\n"
            "  {'type': 'string_type', 'loc': 'body.stop', 'msg': 'Input should be a "
            "valid string', 'input': '5'}\n"
            "  {'type': 'list_type', 'loc': 'body.stop', 'msg': 'Input should be a "
            "valid list', 'input': '5'}"
        ),
        "Bad Request",
        "body.stop",
        REQUEST,
    ),
    "stop_empty": Case(
        {"stop": [""]},
        "stop cannot contain an empty string.",
        "BadRequestError",
        None,
        SAMPLING,
    ),
    "stop_too_many": Case(
        {"stop": ["a", "b", "c", "d", "e"]},
        (
            "2 validation errors:\n"
            "  {'type': 'string_type', 'loc': 'body.stop', 'msg': 'Input should be a "
            "valid string', 'input': '<list of 5 items>'}\n"
            "  {'type': 'too_long', 'loc': 'body.stop', 'msg': 'List should have at "
            "most 4 items after validation, not 5', 'input': '<list of 5 items>', "
            "'ctx': {'field_type': 'List', 'max_length': 4, 'actual_length': 5}}"
        ),
        "Bad Request",
        "body.stop",
        REQUEST,
    ),
    "stop_item_number": Case(
        {"stop": ["a", 5]},
        (
            "2 validation errors:\n"
            "  {'type': 'string_type', 'loc': 'body.stop', 'msg': 'Input should be a "
            "valid string', 'input': '<list of 2 items>'}\n"
            "  {'type': 'string_type', 'loc': 'body.stop.1', 'msg': 'Input should be "
            "a valid string', 'input': '5'}"
        ),
        "Bad Request",
        "body.stop",
        REQUEST,
    ),
    "model_number": Case(
        {"model": 5},
        (
            "1 validation error:\n"
            "  {'type': 'string_type', 'loc': 'body.model', 'msg': 'Input should be "
            "a valid string', 'input': '5'}"
        ),
        "Bad Request",
        "body.model",
        REQUEST,
    ),
    "tools_empty": Case(
        {"tools": []},
        (
            "`tools` must not be an empty array. Either provide at least one tool or "
            "omit the field entirely. (parameter=tools)"
        ),
        "BadRequestError",
        "tools",
        REQUEST,
    ),
    "tool_choice_without_tools": Case(
        {"tool_choice": "auto"},
        "When using `tool_choice`, `tools` must be set. (parameter=tool_choice)",
        "BadRequestError",
        "tool_choice",
        REQUEST,
    ),
    "tool_choice_unknown_function": Case(
        {
            "tool_choice": {"type": "function", "function": {"name": "g"}},
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
        (
            "The tool specified in `tool_choice` does not match any of the specified "
            "`tools` (parameter=tool_choice)"
        ),
        "BadRequestError",
        "tool_choice",
        REQUEST,
    ),
    "stream_options_not_object": Case(
        {"stream_options": 5, "stream": True},
        (
            "1 validation error:\n"
            "  {'type': 'model_attributes_type', 'loc': 'body.stream_options', "
            "'msg': 'Input should be a valid dictionary or object to extract fields "
            "from', 'input': '5'}"
        ),
        "Bad Request",
        "body.stream_options",
        REQUEST,
    ),
    "two_fields": Case(
        {"max_tokens": "x", "n": "y"},
        (
            "2 validation errors:\n"
            "  {'type': 'int_parsing', 'loc': 'body.max_tokens', 'msg': 'Input "
            "should be a valid integer, unable to parse string as an integer', "
            "'input': 'x'}\n"
            "  {'type': 'int_parsing', 'loc': 'body.n', 'msg': 'Input should be a "
            "valid integer, unable to parse string as an integer', 'input': 'y'}"
        ),
        "Bad Request",
        "body.max_tokens",
        REQUEST,
    ),
    "validators_before_fields": Case(
        {"tools": [], "max_tokens": "x"},
        (
            "`tools` must not be an empty array. Either provide at least one tool or "
            "omit the field entirely. (parameter=tools)"
        ),
        "BadRequestError",
        "tools",
        REQUEST,
    ),
    "body_list": Case(
        BODY_IS_A_LIST,
        (
            "1 validation error:\n"
            "  {'type': 'model_attributes_type', 'loc': 'body', 'msg': 'Input should "
            "be a valid dictionary or object to extract fields from', 'input': "
            "'<list of 0 items>'}"
        ),
        "Bad Request",
        "body",
        REQUEST,
    ),
}


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    with FakeVLLM("Hello there").serve() as server:
        yield server.base_url


def post(via: str, server_url: str, body: Any) -> httpx.Response:
    if via == "transport":
        transport = FakeVLLM("Hello there").transport()
        with httpx.Client(transport=transport, base_url="http://vllm/v1") as client:
            return client.post("/chat/completions", json=body)
    with httpx.Client(base_url=server_url) as client:
        return client.post("/chat/completions", json=body)


@pytest.mark.parametrize("via", ["transport", "socket"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_refused_with_vllms_error_body(name: str, via: str, server_url: str) -> None:
    case = CASES[name]
    response = post(via, server_url, case.body())
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.content == case.expected()


@pytest.mark.parametrize(
    ("extra", "status", "error"),
    [
        # vLLM indexes the raw tools to find the named one: a tool without "function"
        # is a KeyError, which its catch-all handler answers with 500.
        (
            {
                "tool_choice": {"type": "function", "function": {"name": "g"}},
                "tools": [{"type": "function"}],
            },
            500,
            {"message": "'function'", "type": "InternalServerError", "param": None, "code": 500},
        ),
        # A prompt that fills the whole context leaves max_tokens 0.
        (
            {"max_tokens": None},
            400,
            {
                "message": "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
                "type": "BadRequestError",
                "param": "max_tokens",
                "code": 400,
            },
        ),
    ],
    ids=["tools-without-function", "prompt-fills-context"],
)
def test_other_refusals(extra: dict[str, Any], status: int, error: dict[str, Any]) -> None:
    fake = FakeVLLM("Hello", max_model_len=5)  # "Hi": 4 + 1 prompt tokens
    body = {k: v for k, v in {**BASE, **extra}.items() if v is not None}
    with httpx.Client(transport=fake.transport(), base_url="http://vllm/v1") as client:
        response = client.post("/chat/completions", json=body)
    assert response.status_code == status
    assert response.json() == {"error": error}


def sse_payloads(body: bytes) -> list[Any]:
    events = [e.removeprefix(b"data: ") for e in body.split(b"\n\n") if e]
    return [json.loads(e) for e in events if e != b"[DONE]"]


def test_lax_values_are_read_as_vllm_reads_them() -> None:
    """vLLM's model is lax: "yes" is a bool, "2" an int; the emulator answers likewise."""
    fake = FakeVLLM(tokens=["A", "B", "C"])
    body = {**BASE, "stream": "yes", "max_tokens": "2", "n": 2.0, "temperature": "0.5"}
    with httpx.Client(transport=fake.transport(), base_url="http://vllm/v1") as client:
        response = client.post("/chat/completions", json=body)
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        chunks = sse_payloads(response.content)
        finishes = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"]]
        assert [(f["index"], f["finish_reason"]) for f in finishes] == [
            (0, "length"),
            (1, "length"),
        ]
        plain = client.post("/chat/completions", json={**BASE, "stream": "off"})
        assert plain.headers["content-type"] == "application/json"
        assert plain.json()["object"] == "chat.completion"


def test_a_refused_request_is_recorded_but_never_runs() -> None:
    fake = FakeVLLM("Hi")
    with httpx.Client(transport=fake.transport(), base_url="http://vllm/v1") as client:
        response = client.post("/chat/completions", json={**BASE, "n": 0})
    assert response.status_code == 400
    assert fake.requests[-1].json == {**BASE, "n": 0}
    assert fake.running == 0


PEER = os.environ.get("LLMSTREAM_PEER_VLLM_PARSERS_URL")


@pytest.mark.skipif(
    not PEER,
    reason="set LLMSTREAM_PEER_VLLM_PARSERS_URL to a vLLM peer started with parsers "
    "(shared/peers/vllm)",
)
@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.stage == REQUEST))
def test_request_model_refusals_match_the_peer(name: str) -> None:
    assert PEER
    model = str(httpx.get(f"{PEER}/models", timeout=10).json()["data"][0]["id"])
    case = CASES[name]
    body = case.body(model)
    peer = httpx.post(f"{PEER}/chat/completions", json=body, timeout=30)
    with httpx.Client(transport=FakeVLLM(model=model).transport(), base_url="http://v/v1") as c:
        ours = c.post("/chat/completions", json=body)
    assert (ours.status_code, ours.content) == (peer.status_code, peer.content)
    assert ours.content == case.expected()
