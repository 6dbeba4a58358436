"""Assembling chunks into a result (sans-IO): text, reasoning, tool calls, usage."""

from __future__ import annotations

import functools
from collections.abc import Mapping

from pydantic import TypeAdapter, ValidationError

from ._chunks import ChatCompletionChunk, ChunkChoice, Usage
from ._errors import ProtocolError
from ._result import (
    ChoiceResult,
    FunctionCall,
    StreamMetrics,
    StreamResult,
    StreamStatus,
    TokenLogprob,
    TokenReport,
    ToolCall,
)

__all__ = ["StreamAssembler", "response_headers"]

# Cookies a gateway sets are credentials of a sort, and a result is often logged whole.
_LEFT_OUT_HEADERS = frozenset({"set-cookie", "set-cookie2"})


def response_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The response headers a result keeps: names lower-cased, ``set-cookie`` left out.

    Example::

        response_headers({"X-Request-Id": "abc", "Set-Cookie": "s=1"})  # {"x-request-id": "abc"}
    """
    kept: dict[str, str] = {}
    for name, value in headers.items():
        name = name.lower()
        if name not in _LEFT_OUT_HEADERS:
            kept[name] = value
    return kept


class _Text:
    """Text that grows by small pieces, kept compact.

    A long answer arrives as one small string per token; kept as such, 100,000
    tokens cost ~6 MB of string objects for ~0.4 MB of text. Every 256 pieces
    are joined into one block, so memory stays close to the text's own size.
    """

    __slots__ = ("blocks", "tail")

    def __init__(self) -> None:
        self.blocks: list[str] = []
        self.tail: list[str] = []

    def append(self, piece: str) -> None:
        tail = self.tail
        tail.append(piece)
        if len(tail) >= 256:
            self.blocks.append("".join(tail))
            tail.clear()

    def value(self) -> str:
        if not self.blocks:
            return "".join(self.tail)
        return "".join([*self.blocks, *self.tail])


class _ToolCallParts:
    __slots__ = ("arguments", "id", "index", "name", "type")

    def __init__(self, index: int) -> None:
        self.index = index
        self.id: str | None = None
        self.type: str | None = None
        self.name: list[str] = []
        self.arguments = _Text()

    def build(self) -> ToolCall:
        return ToolCall(
            index=self.index,
            id=self.id,
            type=self.type or "function",
            function=FunctionCall(name="".join(self.name), arguments=self.arguments.value()),
        )


@functools.cache
def _token_logprobs() -> TypeAdapter[list[TokenLogprob]]:
    # Built on first use: most streams never ask for logprobs, and import time counts.
    return TypeAdapter(list[TokenLogprob])


class _ChoiceParts:
    __slots__ = (
        "finish_reason",
        "index",
        "logprobs",
        "reasoning",
        "role",
        "stop_reason",
        "text",
        "tools",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.role: str | None = None
        self.text = _Text()
        self.reasoning: _Text | None = None
        self.tools: dict[int, _ToolCallParts] = {}
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[TokenLogprob] | None = None

    def add_logprobs(self, logprobs: dict[str, object]) -> None:
        # {"content": [{"token", "logprob", "bytes", "top_logprobs"}, ...]}: one entry per
        # token of this delta (vLLM's ChatCompletionLogProbs).
        content = logprobs.get("content")
        if not content:
            return
        try:
            tokens = _token_logprobs().validate_python(content)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ProtocolError(
                f"The server sent logprobs that are not a list of token logprobs "
                f"(choices[{self.index}].logprobs.content.{where}: {first['msg']})."
            ) from None
        if self.logprobs is None:
            self.logprobs = tokens
        else:
            self.logprobs.extend(tokens)

    def build(self) -> ChoiceResult:
        return ChoiceResult(
            index=self.index,
            role=self.role,
            text=self.text.value(),
            reasoning=self.reasoning.value() if self.reasoning is not None else None,
            tool_calls=[self.tools[i].build() for i in sorted(self.tools)],
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
        )


class StreamAssembler:
    """Accumulates chunks into choices; knows when every choice has finished.

    :meth:`add` applies one chunk and returns the text it adds to choice 0
    (what iterating a stream yields), or ``""``.

    Example::

        assembler = StreamAssembler()
        assembler.add(chunk)
        assembler.result(status="complete", metrics=StreamMetrics()).text
    """

    __slots__ = ("_choices", "created", "id", "model", "system_fingerprint", "usage")

    def __init__(self) -> None:
        self._choices: dict[int, _ChoiceParts] = {}
        self.id = ""
        self.model = ""
        self.created = 0
        self.system_fingerprint: str | None = None
        self.usage: Usage | None = None

    @property
    def all_finished(self) -> bool:
        """True once at least one choice exists and every choice has a finish reason."""
        choices = self._choices
        return bool(choices) and all(c.finish_reason is not None for c in choices.values())

    def add(self, chunk: ChatCompletionChunk) -> tuple[str, bool]:
        """Apply ``chunk``; return (text added to choice 0, whether it carried any output)."""
        if not self.id:
            self.id = chunk.id
            self.model = chunk.model
            self.created = chunk.created
        if chunk.system_fingerprint is not None:
            self.system_fingerprint = chunk.system_fingerprint
        if chunk.usage is not None:
            # With continuous_usage_stats every chunk carries the running total;
            # the last one seen is the most recent count.
            self.usage = chunk.usage
        choices = chunk.choices
        if len(choices) == 1:  # the usual case, without the loop's bookkeeping
            choice = choices[0]
            added, output = self._add_choice(choice)
            return (added if choice.index == 0 else ""), output
        text = ""
        output = False
        for choice in choices:
            added, had_output = self._add_choice(choice)
            output = output or had_output
            if choice.index == 0:
                text += added
        return text, output

    def _add_choice(self, choice: ChunkChoice) -> tuple[str, bool]:
        parts = self._choices.get(choice.index)
        if parts is None:
            parts = self._choices[choice.index] = _ChoiceParts(choice.index)
        if choice.logprobs is not None:  # only when asked for: vLLM sends null otherwise
            # First: logprobs that do not parse fail the chunk before any of it is applied.
            parts.add_logprobs(choice.logprobs)
        delta = choice.delta
        output = False
        if delta.role is not None:
            parts.role = delta.role
        text = delta.content or ""
        if text:
            parts.text.append(text)
            output = True
        # vLLM <= 0.11 named it reasoning_content, 0.12 sent both fields with the
        # same text, later releases send only reasoning: one channel, counted once.
        reasoning = delta.reasoning if delta.reasoning is not None else delta.reasoning_content
        if reasoning:
            if parts.reasoning is None:
                parts.reasoning = _Text()
            parts.reasoning.append(reasoning)
            output = True
        if delta.tool_calls:
            output = True
            for call in delta.tool_calls:
                tool = parts.tools.get(call.index)
                if tool is None:
                    tool = parts.tools[call.index] = _ToolCallParts(call.index)
                if call.id:
                    tool.id = tool.id or call.id
                if call.type:
                    tool.type = tool.type or call.type
                if call.function is not None:
                    if call.function.name:
                        tool.name.append(call.function.name)
                    if call.function.arguments:
                        tool.arguments.append(call.function.arguments)
        if choice.finish_reason is not None:
            parts.finish_reason = choice.finish_reason
            parts.stop_reason = choice.stop_reason
        return text, output

    def result(
        self,
        *,
        status: StreamStatus,
        metrics: StreamMetrics,
        request_id: str | None = None,
        usage: Usage | None = None,
        retries: int = 0,
        resumes: int = 0,
        tokens: TokenReport | None = None,
        headers: dict[str, str] | None = None,
        endpoint: str | None = None,
        hedged: bool = False,
    ) -> StreamResult:
        """Build the result from everything added so far."""
        choices = [self._choices[i].build() for i in sorted(self._choices)]
        first = choices[0] if choices and choices[0].index == 0 else None
        return StreamResult(
            id=self.id,
            model=self.model,
            created=self.created,
            request_id=request_id or self.id or None,
            system_fingerprint=self.system_fingerprint,
            text=first.text if first else "",
            reasoning=first.reasoning if first else None,
            tool_calls=first.tool_calls if first else [],
            finish_reason=first.finish_reason if first else None,
            stop_reason=first.stop_reason if first else None,
            choices=choices,
            logprobs=first.logprobs if first else None,
            usage=usage if usage is not None else self.usage,
            status=status,
            metrics=metrics,
            retries=retries,
            resumes=resumes,
            tokens=tokens or TokenReport(),
            headers=headers or {},
            endpoint=endpoint,
            hedged=hedged,
        )
