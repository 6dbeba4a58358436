"""Typed models of the chunks an OpenAI-compatible server streams.

Every model keeps unknown fields (``extra="allow"``): vLLM adds fields from
release to release (``token_ids``, ``prompt_token_ids``, ``kv_transfer_params``,
``weight_versions``...) and a client must neither crash on them nor drop them.
Fields a server may omit or send as ``null`` are optional.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = [
    "ChatCompletionChunk",
    "ChunkChoice",
    "ChunkDelta",
    "CompletionTokensDetails",
    "FunctionCallDelta",
    "PromptTokensDetails",
    "ToolCallDelta",
    "Usage",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class FunctionCallDelta(_Model):
    """A fragment of a tool call's function: its name, then argument pieces.

    Example::

        FunctionCallDelta(arguments='{"city": "Par')
    """

    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Model):
    """One tool-call entry of a delta; fragments with the same ``index`` belong together.

    Example::

        ToolCallDelta(index=0, id="call-1", type="function",
                      function=FunctionCallDelta(name="get_weather"))
    """

    index: int = 0
    id: str | None = None
    type: str | None = None
    function: FunctionCallDelta | None = None


class ChunkDelta(_Model):
    """What one chunk adds to a choice.

    ``reasoning`` is the field current vLLM uses for reasoning text; releases
    up to 0.11 used ``reasoning_content`` (0.12 sent both). ``refusal`` and the
    legacy ``function_call`` are OpenAI's fields, declared so code written for
    openai's chunks reads them the same way; vLLM leaves them unset.

    Example::

        ChunkDelta(content="Hello")
    """

    role: str | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    refusal: str | None = None
    function_call: FunctionCallDelta | None = None


class ChunkChoice(_Model):
    """One choice in a chunk. ``finish_reason`` is set on the choice's last chunk.

    Example::

        ChunkChoice(index=0, delta=ChunkDelta(content="Hi"), finish_reason=None)
    """

    index: int = 0
    delta: ChunkDelta = ChunkDelta()
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: dict[str, object] | None = None


class PromptTokensDetails(_Model):
    """Breakdown of prompt tokens (``cached_tokens`` with prefix caching).

    Example::

        PromptTokensDetails(cached_tokens=16)
    """

    cached_tokens: int | None = None


class CompletionTokensDetails(_Model):
    """Breakdown of completion tokens (``reasoning_tokens`` with a reasoning parser).

    Example::

        CompletionTokensDetails(reasoning_tokens=9)
    """

    reasoning_tokens: int | None = None


class Usage(_Model):
    """Token counts as the server reports them.

    Example::

        Usage(prompt_tokens=14, completion_tokens=8, total_tokens=22)
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class ChatCompletionChunk(_Model):
    """One ``chat.completion.chunk`` event of a stream.

    ``choices`` is empty on the usage chunk that ``stream_options.include_usage``
    adds at the end; ``usage`` is set there, and on every chunk with
    ``continuous_usage_stats``. ``service_tier`` is OpenAI's field (vLLM sends
    ``null``).

    Example::

        async with client.stream("Hi") as stream:
            async for chunk in stream.chunks():
                for choice in chunk.choices:
                    print(choice.index, choice.delta.content)
    """

    id: str = ""
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str = ""
    choices: list[ChunkChoice] = []
    usage: Usage | None = None
    system_fingerprint: str | None = None
    service_tier: str | None = None
