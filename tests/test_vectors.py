"""Every vLLM vector, through the sans-IO session and through both clients."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import llmstream
from llmstream._session import StreamSession

from .conftest import VECTOR_PATHS, load_vector, vector_id


def _splits(body: bytes, how: str) -> list[bytes]:
    if how == "whole":
        return [body]
    if how == "bytes":
        return [body[i : i + 1] for i in range(len(body))]
    rng = random.Random(len(body))
    out, i = [], 0
    while i < len(body):
        n = rng.randint(1, 40)
        out.append(body[i : i + n])
        i += n
    return out


def _expected_text_and_error(meta: dict[str, Any]) -> tuple[str, dict[str, Any] | None, bool]:
    """Normalise the two vector conventions: (choice-0 text, error, complete)."""
    expected = meta["expected"]
    if "text" in expected or "partial_text" in expected:
        text = expected.get("text", expected.get("partial_text"))
        return text, expected.get("error"), expected["complete"]
    choice0 = expected["choices"][0]
    error = expected.get("error")
    return choice0["content"], error, error is None


def _run_session(body: bytes, how: str) -> tuple[llmstream.StreamResult, Exception | None]:
    session = StreamSession(started=0.0)
    try:
        for i, piece in enumerate(_splits(body, how)):
            session.feed(piece, now=float(i))
            if session.error is not None:
                raise session.error
        return session.end_of_body(now=1e6), None
    except llmstream.LLMStreamError as exc:
        assert exc.partial is not None
        return exc.partial, exc


@pytest.mark.parametrize("how", ["whole", "bytes", "random"])
@pytest.mark.parametrize("path", VECTOR_PATHS, ids=vector_id)
def test_vector_assembles_to_expected(path: Path, how: str) -> None:
    body, meta = load_vector(path)
    result, error = _run_session(body, how)
    text, expected_error, complete = _expected_text_and_error(meta)
    assert result.text == text
    assert result.complete is complete
    if expected_error is not None:
        assert isinstance(error, llmstream.ServerStreamError)
        assert error.error_code == expected_error["code"]
        assert error.error_type == expected_error["type"]
        assert expected_error["message"] in str(error)
        assert result.status == "error"
    elif not complete:
        assert type(error) is llmstream.StreamInterrupted
        assert result.status == "interrupted"
    else:
        assert error is None
        _check_complete(result, meta["expected"])


def _check_complete(result: llmstream.StreamResult, expected: dict[str, Any]) -> None:
    if "choices" in expected and "content" in expected["choices"][0]:
        # Captured-vector convention: every choice, reasoning '' = none.
        for got, want in zip(result.choices, expected["choices"], strict=True):
            assert got.text == want["content"]
            assert (got.reasoning or "") == want["reasoning"]
            assert got.finish_reason == want["finish_reason"]
            assert got.stop_reason == want["stop_reason"]
            assert got.role == want["role"]
            assert [c.model_dump(exclude={"index"}) for c in got.tool_calls] == want["tool_calls"]
        assert result.system_fingerprint == expected["system_fingerprint"]
    else:
        assert result.finish_reason == expected["finish_reason"]
        if "reasoning" in expected:
            assert result.reasoning == expected["reasoning"]
        if "tool_calls" in expected:
            assert [c.model_dump(exclude={"index"}) for c in result.tool_calls] == expected[
                "tool_calls"
            ]
        for got, want in zip(result.choices, expected.get("choices", []), strict=False):
            assert (got.index, got.text, got.finish_reason) == (
                want["index"],
                want["text"],
                want["finish_reason"],
            )
    usage = expected.get("usage")
    if usage is None:
        assert result.usage is None
    else:
        assert result.usage is not None
        got_usage = result.usage.model_dump(exclude_none=True)
        assert {k: got_usage[k] for k in usage} == usage


def test_continuous_usage_counts_are_visible_on_every_chunk() -> None:
    body, meta = load_vector(Path(VECTOR_PATHS[0]).parent / "continuous_usage.sse")
    session = StreamSession(started=0.0)
    items = session.feed(body, now=1.0)
    seen = [c.usage.completion_tokens for c, _ in items if c.usage is not None and c.choices]
    assert seen == meta["expected"]["completion_tokens_seen"]


def test_unknown_fields_are_kept_on_chunks() -> None:
    body, _ = load_vector(Path(VECTOR_PATHS[0]).parent / "v0.33.0" / "include_usage.sse")
    items = StreamSession(started=0.0).feed(body, now=1.0)
    first = items[0][0]
    assert first.model_extra == {"prompt_token_ids": None, "prompt_text": None}
    assert items[1][0].choices[0].model_extra == {"token_ids": None}


def _transport(body: bytes, headers: dict[str, str] | None = None) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream; charset=utf-8", **(headers or {})},
            stream=httpx.ByteStream(body),
        )

    return httpx.MockTransport(handler)


@pytest.mark.anyio
@pytest.mark.parametrize("path", VECTOR_PATHS, ids=vector_id)
async def test_vector_through_async_client(path: Path) -> None:
    body, meta = load_vector(path)
    text, _, complete = _expected_text_and_error(meta)
    async with llmstream.AsyncClient(
        "http://vllm.test/v1", model="m", transport=_transport(body)
    ) as client:
        pieces: list[str] = []
        try:
            async with client.stream("Hi") as stream:
                async for piece in stream:
                    pieces.append(piece)
        except llmstream.StreamInterrupted as exc:
            assert not complete
            assert exc.partial.text == text
        else:
            assert complete
            assert stream.result.complete
        assert "".join(pieces) == text


@pytest.mark.parametrize("path", VECTOR_PATHS, ids=vector_id)
def test_vector_through_sync_client(path: Path) -> None:
    body, meta = load_vector(path)
    text, _, complete = _expected_text_and_error(meta)
    with llmstream.Client("http://vllm.test/v1", model="m", transport=_transport(body)) as client:
        pieces: list[str] = []
        try:
            with client.stream("Hi") as stream:
                pieces.extend(stream)
        except llmstream.StreamInterrupted as exc:
            assert not complete
            assert exc.partial.text == text
        else:
            assert complete
            assert stream.result.complete
        assert "".join(pieces) == text


def test_request_id_header_wins_over_completion_id() -> None:
    body, _ = load_vector(VECTOR_PATHS[0])
    transport = _transport(body, {"x-request-id": "req-42"})
    with llmstream.Client("http://vllm.test/v1", model="m", transport=transport) as client:
        with client.stream("Hi") as stream:
            result = stream.final_result()
    assert result.request_id == "req-42"
    assert stream.request_body["messages"] == [{"role": "user", "content": "Hi"}]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_split_and_garbage_give_a_result_or_a_typed_error(data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(VECTOR_PATHS))
    body, _ = load_vector(path)
    cut = data.draw(st.integers(0, len(body)))
    garbage = data.draw(st.binary(max_size=40))
    body = body[:cut] + garbage + body[cut:] if data.draw(st.booleans()) else body
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=6)))
    session = StreamSession(started=0.0)
    try:
        for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True):
            session.feed(body[a:b], now=0.0)
            if session.error is not None:
                raise session.error
        result = session.end_of_body(now=1.0)
    except llmstream.LLMStreamError as exc:
        assert exc.partial is not None
    else:
        assert result.status == "complete"
