"""``stream.events()``: reasoning, text, tool-call pieces and finishes, typed, as they come.

Against the emulator on loopback sockets, for the sync and the async stream alike.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import llmstream
from llmstream.testing import FakeVLLM

from .drivers import MODES

pytestmark = pytest.mark.anyio


async def _events(mode: str, fake: FakeVLLM, **kwargs: Any) -> tuple[list[Any], Any]:
    with fake.serve() as server:
        if mode == "async":
            async with llmstream.AsyncClient(server.base_url) as client:
                async with client.stream("Hi", **kwargs) as stream:
                    events = [event async for event in stream.events()]
            return events, stream.result

        def run() -> tuple[list[Any], Any]:
            with llmstream.Client(server.base_url) as client:
                with client.stream("Hi", **kwargs) as stream:
                    events = list(stream.events())
            return events, stream.result

        return await anyio.to_thread.run_sync(run)


@pytest.mark.parametrize("mode", MODES)
async def test_reasoning_comes_first_then_the_text_then_the_finish(mode: str) -> None:
    fake = FakeVLLM("The sky is blue.", reasoning="Light scatters off air.")
    events, result = await _events(mode, fake)
    kinds = [e.type for e in events]
    first_text = kinds.index("text")
    assert set(kinds[:first_text]) == {"reasoning"}
    assert set(kinds[first_text:-1]) == {"text"} and kinds[-1] == "finish"
    assert "".join(e.text for e in events if e.type == "reasoning") == result.reasoning
    assert "".join(e.text for e in events if e.type == "text") == result.text
    assert result.reasoning and "Light scatters" in result.reasoning
    assert isinstance(events[-1], llmstream.FinishEvent) and events[-1].reason == "stop"


@pytest.mark.parametrize("mode", MODES)
async def test_tool_call_pieces_join_to_the_assembled_call(mode: str) -> None:
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    fake = FakeVLLM(tool_calls=[call])
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    events, result = await _events(mode, fake, tools=tools)
    pieces = [e for e in events if isinstance(e, llmstream.ToolCallEvent)]
    assert pieces and pieces[0].name == "get_weather" and pieces[0].id
    assert "".join(p.arguments for p in pieces) == result.tool_calls[0].function.arguments
    assert result.tool_calls[0].function.parsed() == {"city": "Paris"}
    assert events[-1].type == "finish" and events[-1].reason == "tool_calls"


@pytest.mark.parametrize("mode", MODES)
async def test_every_choice_has_its_events(mode: str) -> None:
    fake = FakeVLLM("one two")
    events, result = await _events(mode, fake, n=2)
    for index in (0, 1):
        text = "".join(e.text for e in events if e.type == "text" and e.choice == index)
        assert text == result.choices[index].text
    assert sorted(e.choice for e in events if e.type == "finish") == [0, 1]


async def test_breaking_out_of_events_closes_the_stream() -> None:
    fake = FakeVLLM("one two three four five", token_delay=0.5)
    with fake.serve() as server:
        async with llmstream.AsyncClient(server.base_url) as client:
            async with client.stream("Hi") as stream:
                async for event in stream.events():
                    if event.type == "text":
                        break
        assert stream.result.status == "cancelled"
        assert fake.wait_for_disconnect(timeout=5)
