"""The typed result of a stream: what was said, why it stopped, what it cost, how fast."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ._chunks import Usage
from ._errors import ToolArgumentsError

__all__ = [
    "ChoiceResult",
    "FunctionCall",
    "LatencySummary",
    "StreamMetrics",
    "StreamResult",
    "StreamStatus",
    "TokenReport",
    "ToolCall",
]

StreamStatus = Literal[
    "streaming", "complete", "interrupted", "error", "cancelled", "aborted", "budget"
]
"""Where a stream ended up.

``streaming``: not finished yet (seen on a snapshot); ``complete``: the server
finished the answer; ``interrupted``: the connection or body ended early;
``error``: the server sent an error, or broke the protocol; ``cancelled``: the
caller stopped reading (``break``, ``close()``, ``cancel()``, cancellation) before
the end; ``aborted``: the client stopped the stream because a limit was reached
(``max_chunks``, ``max_bytes``, ``max_pause``, a full buffer with ``on_full="error"``);
``budget``: the call's token budget ran out, so the client ended the stream (and
the server's work) there.
"""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class FunctionCall(_Frozen):
    """The function a tool call invokes; ``arguments`` is the JSON text the model wrote.

    Example::

        call.function.name          # "get_weather"
        call.function.parsed()      # {"city": "Paris"}
    """

    name: str = ""
    arguments: str = ""

    def parsed(self) -> dict[str, Any]:
        """Parse ``arguments``: the JSON object of the function's arguments.

        Empty arguments are ``{}``. Raises :class:`~llmstream.ToolArgumentsError`
        (a ``ValueError``) when the model wrote bad JSON, or JSON that is not an
        object. The values are typed ``Any``, as JSON's are, so the result can be
        passed on as keywords to a typed function.

        Example::

            args = result.tool_calls[0].function.parsed()
            output = get_weather(**args)
        """
        if not self.arguments:
            return {}
        try:
            value = json.loads(self.arguments)
        except ValueError as exc:
            raise ToolArgumentsError(
                f"The arguments of tool call {self.name!r} are not valid JSON ({exc}): "
                f"{_excerpt(self.arguments)}. Send the error back as the tool's answer so the "
                "model can try again, or read function.arguments yourself.",
                name=self.name,
                arguments=self.arguments,
            ) from exc
        if not isinstance(value, dict):
            raise ToolArgumentsError(
                f"The arguments of tool call {self.name!r} are a JSON "
                f"{_JSON_KINDS.get(type(value), type(value).__name__)}, not an object, so they "
                f"cannot be passed as keywords: {_excerpt(self.arguments)}. "
                "Read function.arguments to handle them yourself.",
                name=self.name,
                arguments=self.arguments,
            )
        return value


_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
_JSON_KINDS[type(None)] = "null"


def _excerpt(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


class ToolCall(_Frozen):
    """A tool call assembled from its streamed fragments.

    Example::

        for call in result.tool_calls:
            print(call.id, call.function.name, call.function.arguments)
    """

    index: int = 0
    id: str | None = None
    type: str = "function"
    function: FunctionCall = FunctionCall()


class ChoiceResult(_Frozen):
    """One assembled choice (``n > 1`` gives several).

    Example::

        for choice in result.choices:
            print(choice.index, choice.finish_reason, choice.text)
    """

    index: int
    role: str | None = None
    text: str = ""
    reasoning: str | None = None
    tool_calls: list[ToolCall] = []
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class LatencySummary(_Frozen):
    """Summary of a set of intervals, in seconds.

    Example::

        itl = result.metrics.inter_token_latency
        print(f"p50 {itl.p50 * 1000:.1f} ms, p99 {itl.p99 * 1000:.1f} ms")
    """

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float


class StreamMetrics(_Frozen):
    """Timing of a stream, measured on the client's monotonic clock.

    ``time_to_first_token`` counts from sending the request to the first chunk
    that carried generated output (text, reasoning or a tool call);
    ``inter_token_latency`` summarises the gaps between such chunks (the finish
    chunk included: it carries the last token, or the end-of-sequence token);
    ``tokens_per_second`` is completion tokens over the time from the first to
    the last token (decode speed, excluding the wait for the first token);
    ``completion_tokens`` is the server's count when it sent usage, else the
    number of output chunks (vLLM sends about one token per chunk).

    Example::

        m = result.metrics
        print(f"TTFT {m.time_to_first_token:.3f}s, {m.tokens_per_second:.1f} tok/s")
    """

    time_to_headers: float | None = None
    time_to_first_token: float | None = None
    inter_token_latency: LatencySummary | None = None
    tokens_per_second: float | None = None
    completion_tokens: int = 0
    completion_tokens_source: Literal["server", "chunks"] = "chunks"
    chunks: int = 0
    duration: float = 0.0


class TokenReport(_Frozen):
    """The call's token counts, and where each number came from.

    ``prompt_source`` is ``server`` (the usage the server reported, or its
    ``/tokenize``), ``tokenizer`` (your counter), ``estimate`` (the
    conservative local estimate) or ``unknown``; ``completion_source`` is
    ``server`` or ``chunks`` (one token per output chunk, when the server sent
    no usage).

    Example::

        r = stream.result.tokens
        print(r.prompt_tokens, r.prompt_source, r.completion_tokens, r.completion_source)
    """

    prompt_tokens: int | None = None
    prompt_source: Literal["server", "tokenizer", "estimate", "unknown"] = "unknown"
    completion_tokens: int = 0
    completion_source: Literal["server", "chunks"] = "chunks"
    total_tokens: int | None = None


class StreamResult(_Frozen):
    """Everything a stream produced, assembled.

    ``text``, ``reasoning``, ``tool_calls``, ``finish_reason`` follow choice 0;
    ``choices`` keeps every choice. ``reasoning`` merges vLLM's ``reasoning``
    and the older ``reasoning_content`` field, and is ``None`` when the server
    sent none. ``request_id`` is the server's ``X-Request-Id`` header when it
    sent one, else the completion id. ``complete`` is ``True`` only when the
    server finished the answer; on errors the same type is the ``partial``.
    ``retries`` counts attempts started over before any output, ``resumes``
    the times a broken stream was continued on a new request; ``usage`` then
    sums what every request reported.

    Example::

        async with client.stream("Hi") as stream:
            async for _ in stream:
                pass
        result = stream.result
        print(result.text, result.finish_reason, result.usage, result.metrics)
    """

    id: str = ""
    model: str = ""
    created: int = 0
    request_id: str | None = None
    system_fingerprint: str | None = None
    text: str = ""
    reasoning: str | None = None
    tool_calls: list[ToolCall] = []
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    choices: list[ChoiceResult] = []
    usage: Usage | None = None
    status: StreamStatus = "streaming"
    metrics: StreamMetrics = StreamMetrics()
    retries: int = 0
    resumes: int = 0
    tokens: TokenReport = TokenReport()

    @property
    def complete(self) -> bool:
        """True when the server finished the answer (``status == "complete"``)."""
        return self.status == "complete"
