"""The typed result of a stream: what was said, why it stopped, what it cost, how fast."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ._chunks import Usage
from ._errors import ToolArgumentsError
from ._json import loads as loads_json
from ._request import AssistantMessage, MessageToolCall
from ._structured import ModelT, parse_output

__all__ = [
    "ChoiceResult",
    "FunctionCall",
    "LatencySummary",
    "StreamMetrics",
    "StreamResult",
    "StreamStatus",
    "TokenLogprob",
    "TokenReport",
    "ToolCall",
    "TopLogprob",
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
            value = loads_json(self.arguments)
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


class TopLogprob(_Frozen):
    """One of the most likely tokens at a position, with its log probability.

    ``bytes`` is the token's UTF-8 (a token may hold part of a character), or
    ``None`` when the server sent none.

    Example::

        TopLogprob(token="Hi", logprob=-4.7, bytes=[72, 105])
    """

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(_Frozen):
    """A generated token, its log probability, and the alternatives asked for.

    ``top_logprobs`` holds the ``top_logprobs=k`` most likely tokens at that
    position (empty unless asked for). vLLM clamps ``logprob`` to ``-9999.0``.

    Example::

        for t in result.logprobs or []:
            print(t.token, round(math.exp(t.logprob), 3), [a.token for a in t.top_logprobs])
    """

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChoiceResult(_Frozen):
    """One assembled choice (``n > 1`` gives several).

    ``logprobs`` has one entry per generated token the server reported, in
    order, when the request asked for ``logprobs=True``; else ``None``.

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
    logprobs: list[TokenLogprob] | None = None

    def to_message(self, *, include_reasoning: bool = False) -> AssistantMessage:
        """This choice as the assistant message of the conversation's next request.

        See :meth:`StreamResult.to_message`.

        Example::

            messages.append(result.choices[1].to_message())
        """
        return _assistant_message(self.text, self.tool_calls, self.reasoning, include_reasoning)

    def parse(self, model: type[ModelT]) -> ModelT:
        """This choice's text validated as ``model``; see :meth:`StreamResult.parse`.

        Example::

            answers = [choice.parse(Weather) for choice in result.choices]
        """
        return parse_output(self.text, model, finish_reason=self.finish_reason, status=None)


def _assistant_message(
    text: str, tool_calls: list[ToolCall], reasoning: str | None, include_reasoning: bool
) -> AssistantMessage:
    message: AssistantMessage = {
        "role": "assistant",
        # OpenAI's shape: no content (null) for a turn that is only tool calls.
        "content": text if text or not tool_calls else None,
    }
    if tool_calls:
        message["tool_calls"] = [_message_tool_call(call) for call in tool_calls]
    if include_reasoning and reasoning is not None:
        message["reasoning"] = reasoning
    return message


def _message_tool_call(call: ToolCall) -> MessageToolCall:
    return {
        "id": call.id or f"call_{call.index}",
        "type": "function",
        "function": {"name": call.function.name, "arguments": call.function.arguments},
    }


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
    ``tokens_per_second`` is the decode speed: the completion tokens after the
    first over the time from the first to the last output chunk (the wait for
    the first token excluded). When that interval cannot be measured (a single
    output chunk, or every chunk in one network read, as with 1 or 2 tokens)
    it is all completion tokens over the time from sending the request to the
    last output chunk: a lower bound of the decode speed. It is ``0.0`` only
    while no token has arrived (or none ever did), never ``None``.
    ``completion_tokens`` is the server's count when it sent usage, else the
    number of output chunks (vLLM sends about one token per chunk).

    Example::

        m = result.metrics
        print(f"TTFT {m.time_to_first_token:.3f}s, {m.tokens_per_second:.1f} tok/s")
    """

    time_to_headers: float | None = None
    time_to_first_token: float | None = None
    inter_token_latency: LatencySummary | None = None
    tokens_per_second: float = 0.0
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
    sent none. ``logprobs`` is choice 0's, when the request asked for
    ``logprobs=True`` (else ``None``). ``request_id`` is the server's
    ``X-Request-Id`` header when it sent one, else the completion id;
    ``headers`` are the response's headers (lower-case names; the last
    request's when there were several; ``set-cookie`` left out). ``usage`` is
    what the server reported, or ``None`` when it sent none (llama.cpp's
    servers, ``include_usage=False``): ``tokens`` and ``metrics`` are always
    there. ``complete`` is ``True`` only when the server finished the answer;
    on errors the same type is the ``partial``. ``retries`` counts attempts
    started over before any output, ``resumes`` the times a broken stream was
    continued on a new request; ``usage`` then sums what every request reported.
    ``endpoint`` is the base URL of the server that sent the answer (the last request's;
    over a :class:`~llmstream.Fleet`, the replica that answered), and ``hedged`` is
    ``True`` when a hedge request was sent beside it.

    Example::

        async with client.stream("Hi") as stream:
            async for _ in stream:
                pass
        result = stream.result
        print(result.text, result.finish_reason, result.tokens.completion_tokens)
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
    logprobs: list[TokenLogprob] | None = None
    usage: Usage | None = None
    status: StreamStatus = "streaming"
    metrics: StreamMetrics = StreamMetrics()
    retries: int = 0
    resumes: int = 0
    tokens: TokenReport = TokenReport()
    headers: dict[str, str] = {}
    endpoint: str | None = None
    hedged: bool = False

    @property
    def complete(self) -> bool:
        """True when the server finished the answer (``status == "complete"``)."""
        return self.status == "complete"

    def to_message(self, *, include_reasoning: bool = False) -> AssistantMessage:
        """The answer (choice 0) as the assistant message of the conversation's next request.

        ``content`` is the text, or ``None`` when the answer is only tool calls;
        ``tool_calls`` are in OpenAI's shape (``id``, ``type``, ``function`` with
        ``name`` and ``arguments``). The reasoning is left out, as OpenAI and
        DeepSeek ask and most chat templates drop it from earlier turns;
        ``include_reasoning=True`` sends it as vLLM's ``reasoning`` field, for a
        template that renders it (Qwen3's, inside one turn of tool calls).

        Example::

            messages.append(result.to_message())
            for call in result.tool_calls:
                output = get_weather(**call.function.parsed())
                messages.append({"role": "tool", "tool_call_id": call.id, "content": output})
            async with client.stream(messages, tools=tools) as stream: ...
        """
        return _assistant_message(self.text, self.tool_calls, self.reasoning, include_reasoning)

    def parse(self, model: type[ModelT]) -> ModelT:
        """The answer (choice 0's text) validated as the pydantic ``model``.

        Raises :class:`~llmstream.OutputParseError` (a ``ValueError``) with the
        text when it is not valid JSON for ``model``, saying why when the answer
        was cut (``finish_reason`` ``"length"``, a stream that did not finish).
        Pass the model as ``response_format`` so the server constrains the answer
        to its schema (:func:`~llmstream.response_format_for`).

        Example::

            async with client.stream("Weather in Paris?", response_format=Weather) as stream:
                weather = (await stream.final_result()).parse(Weather)
        """
        return parse_output(self.text, model, finish_reason=self.finish_reason, status=self.status)
