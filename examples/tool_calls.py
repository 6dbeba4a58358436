"""A tool-call round trip: the model asks for a function, we run it, the model answers.

Shows: passing ``tools``, ``result.tool_calls`` assembled from the streamed fragments,
``function.parsed()``, and sending the tool results back as ``tool`` messages.

A real vLLM server needs tool calling enabled, e.g.
``vllm serve Qwen/Qwen3-8B --enable-auto-tool-choice --tool-call-parser hermes``.
Run it against the built-in emulator (two emulators: one calls the tool, one answers), or
against a real server:

    python examples/tool_calls.py
    LLMSTREAM_BASE_URL=http://localhost:8000/v1 python examples/tool_calls.py
"""

from __future__ import annotations

import asyncio
import json
import os

import llmstream
from llmstream.testing import FakeVLLM

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def get_weather(city: str) -> str:
    """The tool: a real program would call a weather service here."""
    return json.dumps({"city": city, "temperature_c": 18, "sky": "sunny"})


async def main() -> None:
    base_url = os.environ.get("LLMSTREAM_BASE_URL")
    # The built-in emulator: the first answers with a tool call, the second with text.
    caller = (
        None
        if base_url
        else FakeVLLM(tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}])
    )
    answerer = None if base_url else FakeVLLM("It is 18 °C and sunny in Paris.", token_delay=0.01)

    messages: list[llmstream.Message] = [
        {"role": "user", "content": "What's the weather like in Paris right now?"}
    ]

    # Turn 1: the model decides to call the tool. The call arrives in fragments.
    transport = caller.transport() if caller else None
    async with llmstream.AsyncClient(base_url, transport=transport) as client:
        async with client.stream(messages, tools=TOOLS, tool_choice="auto", max_tokens=256) as s:
            result = await s.final_result()
    print("finish reason:", result.finish_reason)
    if not result.tool_calls:
        print("the model answered without a tool:", result.text)
        return

    # Run each call and send the results back, after the assistant's own message.
    messages.append(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call.model_dump(exclude={"index"}) for call in result.tool_calls],
        }
    )
    for call in result.tool_calls:
        arguments = call.function.parsed()  # a dict; ToolArgumentsError if it is not JSON
        print(f"tool call {call.id}: {call.function.name}({arguments})")
        output = get_weather(**arguments)
        messages.append({"role": "tool", "tool_call_id": call.id, "content": output})

    # Turn 2: the model answers with the tool's output in front of it.
    transport = answerer.transport() if answerer else None
    async with llmstream.AsyncClient(base_url, transport=transport) as client:
        async with client.stream(messages, tools=TOOLS, max_tokens=256) as stream:
            async for text in stream:
                print(text, end="", flush=True)
    print()


if __name__ == "__main__":
    asyncio.run(main())
