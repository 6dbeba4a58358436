"""Building and checking the body of a chat completion request (sans-IO)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, Union, cast

from pydantic import BaseModel

# typing_extensions (a dependency of pydantic) rather than typing: NotRequired is 3.11+, and
# pydantic accepts only typing_extensions.TypedDict before Python 3.12.
from typing_extensions import NotRequired, TypedDict

from ._errors import InvalidRequestError
from ._structured import response_format_for

__all__ = [
    "AssistantMessage",
    "ContentPart",
    "ImageContentPart",
    "ImageURL",
    "JSONValue",
    "Message",
    "MessageContent",
    "MessageFunctionCall",
    "MessageToolCall",
    "PromptOrMessages",
    "SystemMessage",
    "TextContentPart",
    "ToolMessage",
    "UserMessage",
    "build_body",
    "build_messages",
]

JSONValue = Union[  # noqa: UP007 (a runtime alias: "X | Y" with strings fails on 3.10)
    str, int, float, bool, None, Sequence["JSONValue"], Mapping[str, "JSONValue"]
]
"""Anything that serialises to JSON."""


class TextContentPart(TypedDict):
    """A text part of a message's content.

    Example::

        {"type": "text", "text": "What is in this picture?"}
    """

    type: Literal["text"]
    text: str


class ImageURL(TypedDict):
    """Where an image part's picture is: an ``https:`` or a ``data:`` URL.

    Example::

        {"url": "data:image/png;base64,iVBORw0KGgo..."}
    """

    url: str
    detail: NotRequired[Literal["auto", "low", "high"]]


class ImageContentPart(TypedDict):
    """An image part of a message's content (for a vision model).

    Example::

        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    """

    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Union[TextContentPart, ImageContentPart, Mapping[str, object]]  # noqa: UP007
"""One part of a message's content: text, an image, or any other part vLLM accepts
(``audio_url``, ``input_audio``, ``video_url``...) as a plain mapping."""

MessageContent = Union[str, Sequence[ContentPart]]  # noqa: UP007
"""A message's content: a string, or a list of content parts."""


class MessageFunctionCall(TypedDict):
    """The function an assistant's tool call invokes, with its arguments as JSON text.

    Example::

        {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    """

    name: str
    arguments: str


class MessageToolCall(TypedDict):
    """A tool call in an assistant message sent back to the server.

    Example::

        {"id": "chatcmpl-tool-1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    """

    id: str
    type: Literal["function"]
    function: MessageFunctionCall


class SystemMessage(TypedDict):
    """Instructions for the model (``developer`` is the newer name some servers use).

    Example::

        {"role": "system", "content": "Answer in one sentence."}
    """

    role: Literal["system", "developer"]
    content: MessageContent
    name: NotRequired[str]


class UserMessage(TypedDict):
    """What the user said.

    Example::

        {"role": "user", "content": "What is PagedAttention?"}
    """

    role: Literal["user"]
    content: MessageContent
    name: NotRequired[str]


class AssistantMessage(TypedDict):
    """What the model said before: its text, and the tool calls it made.

    ``content`` may be ``None`` when the turn was only tool calls. ``tool_calls``
    also takes plain mappings, so ``call.model_dump(exclude={"index"})`` of a
    result's :class:`~llmstream.ToolCall` goes in as it is. ``reasoning`` is
    vLLM's field for the model's earlier thinking, for templates that keep it.

    Example::

        {"role": "assistant", "content": result.text}
    """

    role: Literal["assistant"]
    content: NotRequired[MessageContent | None]
    name: NotRequired[str]
    tool_calls: NotRequired[Sequence[MessageToolCall | Mapping[str, object]]]
    reasoning: NotRequired[str | None]


class ToolMessage(TypedDict):
    """A tool's output, answering the tool call whose id is ``tool_call_id``.

    ``tool_call_id`` takes a result's ``call.id`` as it is: ``None`` only when
    the server gave the call no id (vLLM always gives one), as vLLM's own type allows.

    Example::

        {"role": "tool", "tool_call_id": call.id, "content": "18 °C and sunny"}
    """

    role: Literal["tool"]
    tool_call_id: str | None
    content: MessageContent


Message = Union[SystemMessage, UserMessage, AssistantMessage, ToolMessage]  # noqa: UP007
"""One chat message, e.g. ``{"role": "user", "content": "Hi"}``.

A union of one ``TypedDict`` per role, so editors complete the keys and type
checkers check them; a plain dict of that shape is a ``Message``. At run time
messages are plain mappings, checked before sending.

Example::

    messages: list[llmstream.Message] = [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "What is PagedAttention?"},
    ]
"""

PromptOrMessages = Union[str, Sequence[Message], Sequence[Mapping[str, object]]]  # noqa: UP007
"""A prompt string (sent as one user message) or a list of chat messages.

A list typed ``list[llmstream.Message]`` is checked key by key; a list of plain
mappings (``list[dict[str, str]]`` inferred for an unannotated list, or a role
this library does not type, such as the legacy ``function``) is accepted too
and checked at run time.

Example::

    client.stream("Hi")
    client.stream([{"role": "user", "content": "Hi"}])
"""

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# The client sets these itself; letting extra_params override them would break the stream.
_RESERVED = frozenset({"stream", "messages"})
# json.dumps recurses once per level of nesting, and the body is encoded again later, deeper
# in the call's stack (by the transport, or for POST /tokenize): a body that passes a check
# made here by a narrow margin under Python's recursion limit (1000 by default) would then
# fail there with RecursionError. A fixed cap far under it refuses the same body wherever
# the call is made, and is far beyond any chat request (a tool's JSON schema nests a few
# dozen levels).
_MAX_NESTING = 256


def build_messages(prompt_or_messages: PromptOrMessages) -> list[Message]:
    """Turn a prompt or a message list into checked chat messages.

    Example::

        build_messages("Hi")  # [{"role": "user", "content": "Hi"}]
    """
    if isinstance(prompt_or_messages, str):
        if not prompt_or_messages:
            raise InvalidRequestError("The prompt is empty; pass some text or a list of messages.")
        return [{"role": "user", "content": prompt_or_messages}]
    if isinstance(prompt_or_messages, bytes | Mapping) or not isinstance(
        prompt_or_messages, Sequence
    ):
        raise InvalidRequestError(
            "Pass a prompt string or a list of messages like "
            '[{"role": "user", "content": "Hi"}], '
            f"not {type(prompt_or_messages).__name__}."
        )
    messages = list(cast(Sequence[Message], prompt_or_messages))
    if not messages:
        raise InvalidRequestError("messages is empty; a chat request needs at least one message.")
    for i, message in enumerate(messages):
        _check_message(i, message)
    return messages


def _check_message(i: int, message: object) -> None:
    if not isinstance(message, Mapping):
        raise InvalidRequestError(
            f"messages[{i}] must be a mapping like {{'role': 'user', 'content': '...'}}, "
            f"not {type(message).__name__}."
        )
    role = message.get("role")
    # A list or dict role is unhashable: the set lookup would raise TypeError on it.
    if not isinstance(role, str) or role not in _ROLES:
        given = repr(role) if isinstance(role, str) or role is None else type(role).__name__
        raise InvalidRequestError(
            f"messages[{i}] has role {given}, which is not a valid role; expected one of "
            f"{', '.join(sorted(_ROLES))} (a string)."
        )
    content = message.get("content")
    has_tools = bool(message.get("tool_calls"))
    if content is None and not (role == "assistant" and has_tools):
        raise InvalidRequestError(f"messages[{i}] ({role}) has no content.")
    if content is not None and not isinstance(content, str | Sequence):
        raise InvalidRequestError(
            f"messages[{i}].content must be a string or a list of content parts, "
            f"not {type(content).__name__}."
        )


def build_body(
    messages: list[Message],
    *,
    params: Mapping[str, object],
    include_usage: bool,
    extra_body: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """The JSON body of a streaming chat completion request.

    ``params`` are the typed sampling parameters (``model``, ``max_tokens``...), and
    ``extra_body`` is merged in last, as openai-python does. ``stream_options.include_usage``
    is asked for by default so results carry the server's exact token counts; a caller's
    own ``stream_options`` keeps its other fields (``continuous_usage_stats``...). A value
    that cannot be sent as JSON is refused here, before anything is sent.

    Example::

        build_body(build_messages("Hi"), params={"model": "m", "max_tokens": 16},
                   include_usage=True)
    """
    for name in ("max_tokens", "max_completion_tokens"):
        value = params.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}.")
    model = params.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequestError(
            f"model must be a str such as 'Qwen/Qwen3-8B', got {type(model).__name__} {model!r}."
        )
    temperature = params.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not temperature >= 0
    ):
        raise InvalidRequestError(f"temperature must be a number >= 0, got {temperature!r}.")
    extra = dict(extra_body or {})
    reserved = _RESERVED.intersection(extra)
    if reserved:
        raise InvalidRequestError(
            f"{', '.join(sorted(reserved))} cannot be passed in extra_body: the client sets "
            "them (pass messages as the first argument, or messages=...)."
        )
    body: dict[str, object] = {"messages": messages}
    body.update((k, v) for k, v in params.items() if v is not None)
    response_format = body.get("response_format")
    if isinstance(response_format, type) and issubclass(response_format, BaseModel):
        body["response_format"] = response_format_for(response_format)
    body["stream"] = True
    body.update(extra)
    options = body.get("stream_options")
    if include_usage:
        if options is None:
            body["stream_options"] = {"include_usage": True}
        elif isinstance(options, Mapping) and "include_usage" not in options:
            body["stream_options"] = {**options, "include_usage": True}
    if _nested_deeper_than(body, _MAX_NESTING):
        raise _too_deep()
    try:
        json_body(body)  # as it will be sent: NaN and infinity are not JSON either
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(
            f"The request cannot be sent as JSON: {exc}. Pass plain JSON values (str, int, "
            "finite float, bool, None, lists and dicts of them)."
        ) from None
    except RecursionError:
        # Only under a recursion limit lowered far below Python's default of 1000.
        raise _too_deep() from None
    return body


def _nested_deeper_than(value: object, limit: int) -> bool:
    """True when lists and dicts in ``value`` nest more than ``limit`` levels (or loop)."""
    # A loop over a stack: recursing here would meet the very limit this guards against.
    # Only containers are stacked: every request pays for this walk.
    if not isinstance(value, dict | list | tuple):
        return False
    pending: list[tuple[dict[object, object] | list[object] | tuple[object, ...], int]]
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > limit:
            return True  # a list that contains itself ends here too, its depth growing
        children: Iterable[object] = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, dict | list | tuple):
                pending.append((child, depth + 1))
    return False


def _too_deep() -> InvalidRequestError:
    return InvalidRequestError(
        "The request cannot be sent as JSON: its lists or dicts are nested more than "
        f"{_MAX_NESTING} levels deep (or a list or dict contains itself). Pass values "
        "nested a few levels deep, as chat messages, tool schemas and parameters are."
    )


def json_body(value: object) -> bytes:
    """A request's JSON body as httpx 0.28 writes it: compact, UTF-8, no NaN.

    Example::

        json_body({"stream": True})  # b'{"stream":true}'
    """
    return _ENCODE(value).encode()


# One encoder for every request: json.dumps() with these options builds a new one per call,
# a third of what encoding a chat request costs. encode() keeps no state between calls.
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def continuation_body(
    body: Mapping[str, object], partial_text: str, completion_tokens_used: int
) -> dict[str, object] | None:
    """The body that continues a broken answer, or None when it cannot be continued.

    The partial answer goes last as an assistant message with vLLM's
    ``continue_final_message: true, add_generation_prompt: false``, so the
    model carries on from its last character instead of starting over; the
    token allowance shrinks by what was already generated. Only one choice
    (``n`` of 1) can be continued.

    Example::

        continuation_body({"messages": [...], "max_tokens": 100}, "Once upon", 3)
        # {..., "messages": [..., {"role": "assistant", "content": "Once upon"}],
        #  "continue_final_message": True, "add_generation_prompt": False, "max_tokens": 97}
    """
    n = body.get("n", 1)
    messages = body.get("messages")
    if n not in (1, None) or not isinstance(messages, list) or not partial_text:
        return None
    continued: dict[str, object] = dict(body)
    continued["messages"] = [*messages, {"role": "assistant", "content": partial_text}]
    continued["continue_final_message"] = True
    continued["add_generation_prompt"] = False
    for key in ("max_tokens", "max_completion_tokens"):
        allowance = body.get(key)
        if isinstance(allowance, int) and not isinstance(allowance, bool):
            left = allowance - completion_tokens_used
            if left < 1:
                return None
            continued[key] = left
    return continued
