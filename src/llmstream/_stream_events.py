"""Typed events of a stream: text, reasoning, tool-call pieces and finishes, as they come.

``stream.events()`` yields these instead of bare text, so a reasoning model's thinking
(vLLM with ``--reasoning-parser``) and tool calls can be shown as they stream, the way
anthropic-sdk-python's ``text`` / ``thinking`` / ``input_json`` events do. Every choice's
events come (``choice`` says which); ``async for text in stream`` stays the cheap path
for choice 0's text.

Example::

    async for event in stream.events():
        if event.type == "reasoning":
            print(event.text, end="", file=sys.stderr)
        elif event.type == "text":
            print(event.text, end="")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from ._chunks import ChatCompletionChunk
from ._session import StreamItem

__all__ = [
    "FinishEvent",
    "ReasoningEvent",
    "StreamEvent",
    "TextEvent",
    "ToolCallEvent",
    "events_of",
]


@dataclass(frozen=True, slots=True)
class TextEvent:
    """A piece of the answer's text.

    Example::

        TextEvent(text="Hello", choice=0).type  # "text"
    """

    text: str
    choice: int = 0
    type: Literal["text"] = "text"


@dataclass(frozen=True, slots=True)
class ReasoningEvent:
    """A piece of the model's reasoning (vLLM's ``reasoning``, formerly ``reasoning_content``).

    Example::

        ReasoningEvent(text="Let me think", choice=0).type  # "reasoning"
    """

    text: str
    choice: int = 0
    type: Literal["reasoning"] = "reasoning"


@dataclass(frozen=True, slots=True)
class ToolCallEvent:
    """A piece of a tool call: its ``id`` and ``name`` come first, ``arguments`` in pieces.

    ``index`` is the call's position in the choice's ``tool_calls``; join the
    ``arguments`` pieces of one index for the JSON text (``stream.result.tool_calls``
    has them assembled).

    Example::

        ToolCallEvent(index=0, id="call_1", name="get_weather", arguments='{"ci')
    """

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""
    choice: int = 0
    type: Literal["tool_call"] = "tool_call"


@dataclass(frozen=True, slots=True)
class FinishEvent:
    """A choice finished: ``reason`` is its ``finish_reason`` (``stop``, ``length``...).

    Example::

        FinishEvent(reason="stop", choice=0).type  # "finish"
    """

    reason: str
    choice: int = 0
    type: Literal["finish"] = "finish"


StreamEvent = Union[TextEvent, ReasoningEvent, ToolCallEvent, FinishEvent]  # noqa: UP007
"""Any event ``stream.events()`` yields; ``event.type`` tells which."""


def events_of(item: StreamItem) -> list[StreamEvent]:
    """The events one chunk brings, in the order a reader expects them.

    Reasoning comes before text (a chunk that ends the thinking may start the answer),
    then tool-call pieces, then the finish.

    Example::

        events_of((chunk, "Hi"))  # [TextEvent(text="Hi")]
    """
    chunk: ChatCompletionChunk = item[0]
    events: list[StreamEvent] = []
    for choice in chunk.choices:
        delta = choice.delta
        index = choice.index
        # vLLM 0.12 sent both fields with the same text; later releases only `reasoning`.
        reasoning = delta.reasoning or delta.reasoning_content
        if reasoning:
            events.append(ReasoningEvent(reasoning, index))
        if delta.content:
            events.append(TextEvent(delta.content, index))
        for call in delta.tool_calls or ():
            function = call.function
            events.append(
                ToolCallEvent(
                    call.index,
                    call.id,
                    function.name if function is not None else None,
                    (function.arguments or "") if function is not None else "",
                    index,
                )
            )
        if choice.finish_reason is not None:
            events.append(FinishEvent(choice.finish_reason, index))
    return events
