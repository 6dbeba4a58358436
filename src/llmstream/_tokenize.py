"""The body of vLLM's ``POST /tokenize`` for a chat prompt, and reading its answer (sans-IO).

The I/O shells send the request; these helpers only build and check JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ._counts import is_count
from ._errors import InvalidRequestError, ProtocolError

__all__ = ["parse_tokenize_max_model_len", "parse_tokenize_response", "tokenize_request_body"]


def tokenize_request_body(
    model: str | None,
    messages: Sequence[Mapping[str, object]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: Sequence[Mapping[str, object]] | None = None,
    chat_template_kwargs: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """The JSON body of vLLM's ``POST /tokenize`` for a chat prompt.

    Pass the same template options as the chat request (tools and template
    arguments change the rendered prompt), so the count is the one the
    server will see. ``continue_final_message`` needs
    ``add_generation_prompt=False``, as in the chat request.

    Example::

        body = tokenize_request_body("Qwen/Qwen2.5-0.5B-Instruct", messages)
        count = parse_tokenize_response(http.post(base + "/tokenize", json=body).json())
    """
    if add_generation_prompt and continue_final_message:
        # vLLM's TokenizeChatRequest rejects both with a 400; say so before sending.
        raise InvalidRequestError(
            "continue_final_message=True needs add_generation_prompt=False "
            "(the server rejects both together)."
        )
    body: dict[str, object] = {
        "messages": list(messages),
        "add_generation_prompt": add_generation_prompt,
        "continue_final_message": continue_final_message,
    }
    if model is not None:
        body["model"] = model
    if tools is not None:
        body["tools"] = list(tools)
    if chat_template_kwargs is not None:
        body["chat_template_kwargs"] = dict(chat_template_kwargs)
    return body


def _describe(body: object) -> str:
    text = repr(body)
    return text if len(text) <= 200 else text[:200] + "..."


def parse_tokenize_response(body: object) -> int:
    """The exact prompt token count from ``POST /tokenize``'s JSON body.

    vLLM answers ``{"count", "max_model_len", "tokens": [...]}``. A body
    without an integer ``count`` raises :class:`~llmstream.ProtocolError`
    (a server that is not vLLM, or a proxy's error page).

    Example::

        parse_tokenize_response({"count": 30, "max_model_len": 32768, "tokens": [...]})  # 30
    """
    count = body.get("count") if isinstance(body, Mapping) else None
    if not is_count(count, 0):
        raise ProtocolError(
            "POST /tokenize answered without an integer 'count' (is this a vLLM server?); "
            f"got {_describe(body)}. Count with a tokenizer or use the estimate instead."
        )
    return count


def parse_tokenize_max_model_len(body: object) -> int | None:
    """The model's context length from ``POST /tokenize``'s JSON body, if it says.

    Example::

        parse_tokenize_max_model_len({"count": 30, "max_model_len": 32768})  # 32768
    """
    value = body.get("max_model_len") if isinstance(body, Mapping) else None
    return value if is_count(value, 1) else None
