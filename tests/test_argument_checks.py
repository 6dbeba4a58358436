"""Arguments of the wrong type are refused before anything is sent, with InvalidRequestError.

Each message names the argument, the type it takes and what was given (never a header's
value). The same cases run on the sync and the async client, per call and per client.
"""

from __future__ import annotations

from typing import Any

import pytest

import llmstream
from llmstream.testing import FakeVLLM

from .drivers import MODES

pytestmark = pytest.mark.anyio

URL = "http://fake-vllm.test/v1"


def _nested(depth: int) -> list[object]:
    """A list holding a list holding a list... ``depth`` levels deep."""
    outer: list[object] = []
    inner = outer
    for _ in range(depth - 1):
        child: list[object] = []
        inner.append(child)
        inner = child
    return outer


async def _stream(
    mode: str,
    prompt: Any = "Hi",
    *,
    client_kwargs: dict[str, Any] | None = None,
    fake: FakeVLLM | None = None,
    **params: Any,
) -> str:
    """Open a client and stream one answer as a user would; the text streamed."""
    fake = fake or FakeVLLM("ok")
    kwargs = {"model": "llmstream/fake-model", "retry": 0, **(client_kwargs or {})}
    if mode == "async":
        async with (
            llmstream.AsyncClient(URL, transport=fake.transport(), **kwargs) as client,
            client.stream(prompt, **params) as stream,
        ):
            return "".join([text async for text in stream])
    with (
        llmstream.Client(URL, transport=fake.transport(), **kwargs) as sync_client,
        sync_client.stream(prompt, **params) as sync_stream,
    ):
        return "".join(sync_stream)


async def _refused(mode: str, *args: Any, **kwargs: Any) -> str:
    """The message of the InvalidRequestError streaming raises; checks nothing was sent."""
    fake = FakeVLLM("ok")
    with pytest.raises(llmstream.InvalidRequestError) as caught:
        await _stream(mode, *args, fake=fake, **kwargs)
    assert fake.requests == []
    return str(caught.value)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("role", "given"), [(["user"], "list"), ({"a": 1}, "dict"), (5, "int"), ("bot", "'bot'")]
)
async def test_a_message_role_that_is_not_a_role_name_is_refused(
    mode: str, role: object, given: str
) -> None:
    message = await _refused(mode, [{"role": role, "content": "x"}])
    assert f"messages[0] has role {given}, which is not a valid role" in message
    assert "expected one of assistant, developer, function, system, tool, user" in message


def _cyclic() -> list[object]:
    loop: list[object] = []
    loop.append(loop)
    return loop


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("prompt", "params"),
    [
        ("Hi", {"extra_body": {"x": _nested(100_000)}}),
        ([{"role": "user", "content": [_nested(100_000)]}], {}),
        # Deep enough to pass json.dumps where the body is checked, and to fail where it is
        # encoded again deeper in the call (prompt count, transport): refused up front.
        ("Hi", {"extra_body": {"x": _nested(300)}, "count_prompt": "server"}),
        ("Hi", {"extra_body": {"x": _nested(300)}}),
        ("Hi", {"extra_body": {"x": _cyclic()}}),
    ],
    ids=["extra_body", "content", "counted-on-server", "just-over", "cycle"],
)
async def test_json_nested_too_deeply_is_refused(
    mode: str, prompt: Any, params: dict[str, Any]
) -> None:
    message = await _refused(mode, prompt, **params)
    assert "cannot be sent as JSON" in message and "nested more than 256 levels" in message


@pytest.mark.parametrize("mode", MODES)
async def test_json_deeper_than_the_interpreter_allows_is_refused_whatever_the_cap(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the cap, json.dumps itself runs out of stack: still InvalidRequestError.
    monkeypatch.setattr(llmstream._request, "_MAX_NESTING", 10**9)
    message = await _refused(mode, extra_body={"x": _nested(100_000)})
    assert "cannot be sent as JSON" in message and "nested more than" in message


@pytest.mark.parametrize("mode", MODES)
async def test_json_nested_within_the_limit_is_sent(mode: str) -> None:
    fake = FakeVLLM("ok")
    assert await _stream(mode, fake=fake, extra_body={"x": _nested(200)}) == "ok"
    assert len(fake.requests) == 1


def test_estimating_a_deeply_nested_prompt_does_not_recurse() -> None:
    # Content parts nested deeper than the interpreter's stack: counted with a loop.
    part = {"type": "text", "text": "abc"}
    deep = [{"role": "user", "content": [{**part, "x": _nested(5000)}]}]
    plain = [{"role": "user", "content": [part]}]
    assert llmstream.estimate_prompt_tokens(deep) == llmstream.estimate_prompt_tokens(plain)


# (keywords, the argument's name and type in the message, what was given)
CALL_OPTIONS = [
    ({"max_pause": "3"}, "max_pause must be a number of seconds > 0", "got '3'"),
    ({"max_chunks": True}, "max_chunks must be a positive integer", "got True"),
    ({"max_bytes": "10"}, "max_bytes must be a positive integer", "got '10'"),
    ({"hooks": 5}, "hooks takes a list of callables", "got int"),
    ({"budget": "x"}, "budget must be a llmstream.CallBudget", "got str 'x'"),
    ({"token_budget": 5}, "token_budget must be a llmstream.TokenBudget", "got int 5"),
    ({"budget_wait": "yes"}, "budget_wait must be True or False", "got str 'yes'"),
    ({"count_prompt": "exact"}, 'count_prompt must be "estimate", "server" or a token', "'exact'"),
    ({"count_prompt": 5}, 'count_prompt must be "estimate", "server" or a token', "got int 5"),
]
# The construction test passes a model of its own.
MODEL = ({"model": 5}, "model must be a str such as", "got int 5")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("kwargs", "expected", "given"), [*CALL_OPTIONS, MODEL])
async def test_a_call_option_of_the_wrong_type_is_refused_at_the_call(
    mode: str, kwargs: dict[str, Any], expected: str, given: str
) -> None:
    message = await _refused(mode, **kwargs)
    assert expected in message and given in message


CLIENT_OPTIONS = [
    *CALL_OPTIONS,
    ({"max_line_bytes": "10"}, "max_line_bytes must be a positive integer", "got '10'"),
    ({"max_event_bytes": 0.5}, "max_event_bytes must be a positive integer", "got 0.5"),
    ({"include_usage": "no"}, "include_usage must be True or False", "got str 'no'"),
    ({"api_key": 12345}, "api_key must be a str", "got int;"),
    MODEL,
]


@pytest.mark.parametrize("client_class", [llmstream.Client, llmstream.AsyncClient])
@pytest.mark.parametrize(("kwargs", "expected", "given"), CLIENT_OPTIONS)
def test_a_client_option_of_the_wrong_type_is_refused_at_construction(
    client_class: type[llmstream.Client | llmstream.AsyncClient],
    kwargs: dict[str, Any],
    expected: str,
    given: str,
) -> None:
    with pytest.raises(llmstream.InvalidRequestError) as caught:
        client_class(URL, **{"model": "m", **kwargs})
    assert expected in str(caught.value) and given in str(caught.value)


@pytest.mark.parametrize("mode", MODES)
async def test_a_count_prompt_function_is_still_accepted(mode: str) -> None:
    counted: list[int] = []

    def count(messages: list[Any]) -> int:
        counted.append(len(messages))
        return 7

    assert await _stream(mode, count_prompt=count) == "ok"
    assert await _stream(mode, client_kwargs={"count_prompt": "estimate"}) == "ok"
    assert counted == [1]


SECRET = "sk-do-not-print"
HEADERS = [
    ({"X-N": 5}, "['X-N'] must be a str, got int"),
    ({"Authorization": SECRET.encode()}, "['Authorization'] must be a str, got bytes"),
    ({1: SECRET}, "names must be str, got a name of type int"),
    ({b"Authorization": SECRET}, "names must be str, got a name of type bytes"),
    ([("X-N", SECRET)], "must be a mapping, got list"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("headers", "expected"), HEADERS)
async def test_client_headers_that_are_not_str_are_refused_at_construction(
    mode: str, headers: Any, expected: str
) -> None:
    client_class = llmstream.AsyncClient if mode == "async" else llmstream.Client
    with pytest.raises(llmstream.InvalidRequestError) as caught:
        client_class(URL, model="m", headers=headers)
    assert f"headers{expected}" in str(caught.value) or f"headers {expected}" in str(caught.value)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("headers", "expected"), HEADERS)
async def test_call_headers_that_are_not_str_are_refused_at_the_call(
    mode: str, headers: Any, expected: str
) -> None:
    message = await _refused(mode, extra_headers=headers)
    assert f"extra_headers{expected}" in message or f"extra_headers {expected}" in message
    assert SECRET not in message


@pytest.mark.parametrize("mode", MODES)
async def test_client_headers_and_call_headers_are_both_sent(mode: str) -> None:
    fake = FakeVLLM("ok")
    await _stream(
        mode,
        fake=fake,
        client_kwargs={"headers": {"X-Team": "search", "X-Trace": "client"}},
        extra_headers={"x-trace": "call"},
    )
    (request,) = fake.requests
    assert request.headers["x-team"] == "search" and request.headers["x-trace"] == "call"
