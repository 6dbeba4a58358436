"""Types that help: tool-call arguments, recorded request bodies and messages, as checked
by mypy --strict, and what they do at run time."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import httpx
import pytest

import llmstream
from llmstream.testing import FakeVLLM

mypy_api = pytest.importorskip("mypy.api")


def _mypy(tmp_path: Path, code: str) -> tuple[str, int]:
    source = tmp_path / "snippet.py"
    source.write_text(textwrap.dedent(code), "utf-8")
    cache = str(tmp_path / "mypy-cache")
    out, err, status = mypy_api.run(["--strict", "--cache-dir", cache, str(source)])
    return out + err, status


def test_the_documented_uses_type_check(tmp_path: Path) -> None:
    out, status = _mypy(
        tmp_path,
        """
        import llmstream
        from llmstream.testing import RecordedRequest

        def get_weather(city: str, unit: str = "C") -> str:
            return city + unit

        def use(call: llmstream.ToolCall, request: RecordedRequest) -> None:
            get_weather(**call.function.parsed())
            assert request.json is not None
            max_tokens: int = request.json["max_tokens"]
            messages: list[llmstream.Message] = [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                ]},
                {"role": "assistant", "content": None,
                 "tool_calls": [c.model_dump(exclude={"index"}) for c in [call]]},
                {"role": "assistant", "content": "", "reasoning": "thinking", "tool_calls": [
                    {"id": "t1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{}"}},
                ]},
                {"role": "tool", "tool_call_id": call.id, "content": "18 C"},
            ]
            plain = [{"role": "user", "content": "Hi"}]  # inferred list[dict[str, str]]
            with llmstream.Client("http://localhost:8000/v1") as client:
                client.stream(messages)
                client.stream(plain)
                client.stream("Hi")
        """,
    )
    assert status == 0, out


def test_a_message_of_the_wrong_shape_does_not_type_check(tmp_path: Path) -> None:
    out, status = _mypy(
        tmp_path,
        """
        import llmstream

        messages: list[llmstream.Message] = [
            {"role": "user", "content": "fine"},
            {"role": "user", "contnet": "a typo"},
            {"role": "tool", "content": "no tool_call_id"},
            {"role": "robot", "content": "no such role"},
        ]
        """,
    )
    assert status == 1
    assert sorted({int(line.split(":")[1]) for line in out.splitlines() if ": error:" in line}) == [
        6,
        7,
        8,
    ], out


@pytest.mark.parametrize(
    "arguments,expected",
    [
        ('{"city": "Paris"}', {"city": "Paris"}),
        ("", {}),
        ('{"n": [1, {"a": null}]}', {"n": [1, {"a": None}]}),
    ],
)
def test_parsed_arguments_are_a_dict(arguments: str, expected: dict[str, object]) -> None:
    assert llmstream.FunctionCall(name="f", arguments=arguments).parsed() == expected


def test_arguments_that_are_not_json_raise_tool_arguments_error() -> None:
    call = llmstream.FunctionCall(name="get_weather", arguments='{"city": "Par')
    with pytest.raises(llmstream.ToolArgumentsError, match=r"get_weather.*not valid JSON") as info:
        call.parsed()
    assert isinstance(info.value, ValueError)  # as json.JSONDecodeError was
    assert isinstance(info.value.__cause__, json.JSONDecodeError)
    assert (info.value.name, info.value.arguments) == ("get_weather", '{"city": "Par')


@pytest.mark.parametrize(
    "arguments,kind",
    [("[1, 2]", "array"), ('"Paris"', "string"), ("3", "number"), ("null", "null")],
)
def test_arguments_that_are_not_an_object_raise_tool_arguments_error(
    arguments: str, kind: str
) -> None:
    call = llmstream.FunctionCall(name="get_weather", arguments=arguments)
    with pytest.raises(llmstream.ToolArgumentsError, match=f"a JSON {kind}, not an object"):
        call.parsed()


def test_recorded_json_is_the_body_object_or_none() -> None:
    fake = FakeVLLM("Hi")
    with httpx.Client(transport=fake.transport(), base_url="http://vllm.test") as http:
        http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
        http.post("/v1/chat/completions", json=[1, 2])
        http.get("/v1/models")
    first, second, third = fake.requests
    assert first.json == {"messages": [{"role": "user", "content": "Hi"}]}
    assert second.json is None  # JSON, but not an object
    assert third.json is None


def test_typed_and_plain_messages_are_sent_as_they_are() -> None:
    fake = FakeVLLM("Hi")
    typed: list[llmstream.Message] = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]
    legacy = [{"role": "function", "name": "f", "content": "{}"}, {"role": "user", "content": "Hi"}]
    with llmstream.Client(
        "http://vllm.test/v1", model="llmstream/fake-model", transport=fake.transport()
    ) as client:
        for messages in (typed, legacy):
            with client.stream(messages) as stream:
                list(stream)
    assert [r.json["messages"] for r in fake.requests if r.json] == [typed, legacy]


def test_openai_chunk_fields_are_declared() -> None:
    # The fields of openai-python's ChatCompletionChunk, Choice and ChoiceDelta.
    assert {
        "id",
        "choices",
        "created",
        "model",
        "object",
        "service_tier",
        "system_fingerprint",
        "usage",
    } <= set(llmstream.ChatCompletionChunk.model_fields)
    assert {"delta", "finish_reason", "index", "logprobs"} <= set(
        llmstream.ChunkChoice.model_fields
    )
    assert {"content", "function_call", "refusal", "role", "tool_calls"} <= set(
        llmstream.ChunkDelta.model_fields
    )
    chunk = llmstream.ChatCompletionChunk.model_validate_json(
        '{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",'
        ' "service_tier": "default", "choices": [{"index": 0, "delta": {"refusal": "No.",'
        ' "function_call": {"name": "f", "arguments": "{}"}}, "finish_reason": null}]}'
    )
    delta = chunk.choices[0].delta
    assert (chunk.service_tier, delta.refusal) == ("default", "No.")
    assert delta.function_call == llmstream.FunctionCallDelta(name="f", arguments="{}")
    assert chunk.model_extra == {} and delta.model_extra == {}
