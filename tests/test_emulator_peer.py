"""The emulator against vLLM's own serving code (the scripted-engine peer server).

Needs running peers (see ``shared/peers/vllm``), so it is skipped unless these are set:

- ``LLMSTREAM_PEER_VLLM_PARSERS_URL``: a peer started with
  ``--reasoning-parser qwen3 --tool-call-parser hermes``, e.g. ``http://127.0.0.1:8124/v1``;
  used for reasoning, tool calls, errors and ``/v1/models``.
- ``LLMSTREAM_PEER_VLLM_URL``: a peer started without parsers (with the qwen3 parser every
  answer is reasoning), e.g. ``http://127.0.0.1:8123/v1``; used for the plain-content
  scenarios.

The same two variables as the client's own peer tests (``test_peer_vllm.py``).

Each scenario sends the same request to the peer and to a :class:`FakeVLLM` configured to
produce the same token sequence, then compares the responses event by event: keys, key
order, nulls, value types, and the values that are not volatile (ids, timestamps, model
name, fingerprint and token texts are).
"""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
import pytest

from llmstream.testing import FakeVLLM, Fault

PEER = os.environ.get("LLMSTREAM_PEER_VLLM_PARSERS_URL")
PLAIN = os.environ.get("LLMSTREAM_PEER_VLLM_URL")
needs_peer = pytest.mark.skipif(
    not PEER,
    reason="set LLMSTREAM_PEER_VLLM_PARSERS_URL to a vLLM peer started with parsers "
    "(shared/peers/vllm)",
)
needs_plain = pytest.mark.skipif(
    not PLAIN,
    reason="set LLMSTREAM_PEER_VLLM_URL to a vLLM peer started without parsers",
)

# The peer's scripted engine cycles through these words.
WORDS = ["Hello", " world", ",", " this", " is", " a", " scripted", " vLLM", " stream"]
VOLATILE = {"id", "created", "model", "system_fingerprint"}
KEEP_TEXT = {"finish_reason", "object", "role", "type", "param", "owned_by", "organization"}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def shape(value: Any, key: str = "", exact_counts: bool = True) -> Any:
    """``value`` with volatile parts replaced by their type; dict key order kept."""
    if isinstance(value, dict):
        return [
            (k, shape(v, k, exact_counts))
            for k, v in value.items()
            if k not in VOLATILE and not (key == "permission" and k == "id")
        ]
    if isinstance(value, list):
        return [shape(v, key, exact_counts) for v in value]
    if isinstance(value, str):
        return value if key in KEEP_TEXT else "<str>"
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if exact_counts or key == "index" else "<int>"
    return f"<{type(value).__name__}>"


def stream_shapes(body: bytes, exact_counts: bool = True) -> list[Any]:
    """One shape per event; runs of identical shapes collapse (token counts may differ)."""
    out: list[Any] = []
    for event in body.split(b"\n\n"):
        if not event:
            continue
        assert event.startswith(b"data: "), event
        data = event[len(b"data: ") :]
        item = "[DONE]" if data == b"[DONE]" else shape(json.loads(data), "", exact_counts)
        if not out or out[-1] != item:
            out.append(item)
    return out


def peer_model(base_url: str) -> str:
    return str(httpx.get(f"{base_url}/models", timeout=10).json()["data"][0]["id"])


def both(
    base_url: str, fake: FakeVLLM, body: dict[str, Any], path: str = "/chat/completions"
) -> tuple[httpx.Response, httpx.Response]:
    peer = httpx.post(f"{base_url}{path}", json=body, timeout=30)
    with httpx.Client(transport=fake.transport(), base_url="http://vllm/v1") as client:
        ours = client.post(path, json=body)
    assert ours.status_code == peer.status_code, (ours.content, peer.content)
    assert ours.headers["content-type"] == peer.headers["content-type"]
    return peer, ours


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi there"}], **extra}


PLAIN_CASES: dict[str, dict[str, Any]] = {
    "plain": {"stream": True, "max_tokens": 5},
    "include_usage": {"stream": True, "max_tokens": 4, "stream_options": {"include_usage": True}},
    "continuous_usage": {
        "stream": True,
        "max_tokens": 4,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    },
    "n2": {"stream": True, "max_tokens": 3, "n": 2, "stream_options": {"include_usage": True}},
    "max_tokens_1": {"stream": True, "max_tokens": 1},
    "non_streaming": {"max_tokens": 4},
    "non_streaming_n2": {"max_tokens": 2, "n": 2},
}


@needs_plain
@pytest.mark.parametrize("case", sorted(PLAIN_CASES))
def test_plain_scenarios_match_peer(case: str) -> None:
    assert PLAIN
    model = peer_model(PLAIN)
    fake = FakeVLLM(tokens=WORDS, model=model)
    peer, ours = both(PLAIN, fake, chat(model, **PLAIN_CASES[case]))
    if case.startswith("non_streaming"):
        assert shape(ours.json()) == shape(peer.json())
    else:
        assert stream_shapes(ours.content) == stream_shapes(peer.content)


@needs_peer
def test_reasoning_matches_peer() -> None:
    assert PEER
    model = peer_model(PEER)
    # Peer: <think>, 3 words, </think>, "\n\n", ... capped at 6 tokens.
    fake = FakeVLLM(model=model, reasoning="Hello world,", tokens=["\n\n", *WORDS])
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = chat(model, stream=True, max_tokens=6, x_think_tokens=3, stream_options=options)
    peer, ours = both(PEER, fake, body)
    assert stream_shapes(ours.content) == stream_shapes(peer.content)


@needs_peer
def test_tool_call_matches_peer() -> None:
    assert PEER
    model = peer_model(PEER)
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    # reasoning="" stands for the peer's reasoning parser that finds no reasoning.
    fake = FakeVLLM(model=model, tool_calls=[call], reasoning="")
    body = chat(
        model,
        stream=True,
        tools=[TOOL],
        x_tool_call=call,
        stream_options={"include_usage": True},
    )
    peer, ours = both(PEER, fake, body)
    # The peer cuts the arguments into 4-character pieces: token counts differ.
    assert stream_shapes(ours.content, False) == stream_shapes(peer.content, False)


@needs_peer
def test_inband_error_matches_peer() -> None:
    assert PEER
    model = peer_model(PEER)
    # Peer: role chunk, <think>+"Hello", " world", then the engine dies.
    fake = FakeVLLM(model=model, reasoning="Hello world, this", tokens=WORDS)
    fake.add_fault(Fault.inband_error(after_chunks=3))
    peer, ours = both(PEER, fake, chat(model, stream=True, x_die_after=3, x_think_tokens=4))
    assert ours.content.split(b"\n\n")[-3:] == peer.content.split(b"\n\n")[-3:]
    assert stream_shapes(ours.content) == stream_shapes(peer.content)


ERROR_CASES: dict[str, dict[str, Any]] = {
    "unknown_model": {"model": "gpt-4o", "stream": True},
    "both_continue_flags": {
        "stream": True,
        "continue_final_message": True,
        "add_generation_prompt": True,
    },
    "missing_messages": {"stream": True, "messages": None},
    "stream_options_without_stream": {"stream_options": {"include_usage": True}},
}


@needs_peer
@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_match_peer_exactly(case: str) -> None:
    assert PEER
    model = peer_model(PEER)
    body = {**chat(model), **ERROR_CASES[case]}
    body = {k: v for k, v in body.items() if v is not None}
    peer, ours = both(PEER, FakeVLLM(model=model), body)
    assert ours.content == peer.content


@needs_peer
def test_models_and_health_match_peer() -> None:
    assert PEER
    model = peer_model(PEER)
    fake = FakeVLLM(model=model, max_model_len=32768)
    with httpx.Client(transport=fake.transport(), base_url="http://vllm") as client:
        ours_models = client.get("/v1/models")
        ours_health = client.get("/health")
    peer_models = httpx.get(f"{PEER}/models", timeout=10)
    peer_health = httpx.get(PEER.removesuffix("/v1") + "/health", timeout=10)
    assert shape(ours_models.json()) == shape(peer_models.json())
    assert (ours_health.status_code, ours_health.content) == (200, peer_health.content)
