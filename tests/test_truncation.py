"""No silent truncation: ``[DONE]`` before every choice finished is a cut answer.

llama-cpp-python's server ends a request it dropped with ``data: [DONE]`` and no
``finish_reason``; vLLM always finishes every choice first, so its streams are unaffected.
"""

from __future__ import annotations

import json

import httpx
import pytest

import llmstream

from .drivers import MODES, collect

pytestmark = pytest.mark.anyio


def _event(text: str | None, finish: str | None = None) -> bytes:
    delta = {"content": text} if text is not None else {}
    body = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body)}\n\n".encode()


DROPPED = _event("Once") + _event(" upon") + b"data: [DONE]\n\n"
FINISHED = _event(" a time", "stop") + b"data: [DONE]\n\n"


def _server(*bodies: bytes) -> tuple[httpx.MockTransport, list[dict[str, object]]]:
    sent: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        body = bodies[min(len(sent), len(bodies)) - 1]
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    return httpx.MockTransport(handler), sent


@pytest.mark.parametrize("mode", MODES)
async def test_done_without_a_finish_reason_is_an_interrupted_stream(mode: str) -> None:
    transport, sent = _server(DROPPED)
    outcome = await collect(mode, transport=transport, client_kwargs={"model": "m"}, retry=0)
    assert isinstance(outcome.error, llmstream.StreamInterrupted)
    assert "[DONE]" in str(outcome.error)
    assert outcome.final.status == "interrupted" and outcome.final.text == "Once upon"
    assert len(sent) == 1


@pytest.mark.parametrize("mode", MODES)
async def test_done_without_a_finish_reason_is_resumed_when_resume_is_on(mode: str) -> None:
    transport, sent = _server(DROPPED, FINISHED)
    policy = llmstream.RetryPolicy(resume=True, initial_backoff=0, max_backoff=0)
    outcome = await collect(mode, transport=transport, client_kwargs={"model": "m"}, retry=policy)
    assert outcome.error is None
    assert outcome.text == "Once upon a time" and outcome.final.complete
    assert outcome.final.resumes == 1
    continued = sent[1]["messages"]
    assert isinstance(continued, list) and continued[-1]["content"] == "Once upon"


@pytest.mark.parametrize("mode", MODES)
async def test_a_finished_answer_with_done_is_complete(mode: str) -> None:
    transport, _ = _server(_event("Hi", "stop") + b"data: [DONE]\n\n")
    outcome = await collect(mode, transport=transport, client_kwargs={"model": "m"})
    assert outcome.error is None and outcome.final.complete and outcome.text == "Hi"
