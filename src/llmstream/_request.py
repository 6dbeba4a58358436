"""Building and checking the body of a chat completion request (sans-IO)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union, cast

from ._errors import InvalidRequestError

__all__ = ["JSONValue", "Message", "PromptOrMessages", "build_body", "build_messages"]

JSONValue = Union[  # noqa: UP007 (a runtime alias: "X | Y" with strings fails on 3.10)
    str, int, float, bool, None, Sequence["JSONValue"], Mapping[str, "JSONValue"]
]
"""Anything that serialises to JSON."""

Message = Mapping[str, object]
"""One chat message, e.g. ``{"role": "user", "content": "Hi"}``."""

PromptOrMessages = Union[str, Sequence[Message]]  # noqa: UP007
"""A prompt string (sent as one user message) or a list of chat messages."""

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# The client sets these itself; letting extra_params override them would break the stream.
_RESERVED = frozenset({"stream", "messages"})


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
    if role not in _ROLES:
        raise InvalidRequestError(
            f"messages[{i}] has role {role!r}; expected one of {', '.join(sorted(_ROLES))}."
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
    model: str | None,
    max_tokens: int | None,
    temperature: float | None,
    include_usage: bool,
    extra_params: Mapping[str, object],
) -> dict[str, object]:
    """The JSON body of a streaming chat completion request.

    ``stream_options.include_usage`` is asked for by default so results carry
    the server's exact token counts; a caller's own ``stream_options`` wins.

    Example::

        build_body(build_messages("Hi"), model="m", max_tokens=16, temperature=None,
                   include_usage=True, extra_params={})
    """
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise InvalidRequestError(f"max_tokens must be a positive integer, got {max_tokens!r}.")
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not temperature >= 0
    ):
        raise InvalidRequestError(f"temperature must be a number >= 0, got {temperature!r}.")
    reserved = _RESERVED.intersection(extra_params)
    if reserved:
        raise InvalidRequestError(
            f"{', '.join(sorted(reserved))} cannot be passed as extra parameters: "
            "the client sets them (pass messages as the first argument)."
        )
    body: dict[str, object] = {"messages": messages}
    if model is not None:
        body["model"] = model
    body["stream"] = True
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    body.update(extra_params)
    return body


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
