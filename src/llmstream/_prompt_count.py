"""Counting a prompt before it is sent (sans-IO): a conservative estimate, or the caller's
own tokenizer.

* :func:`estimate_prompt_tokens` counts without a tokenizer, on the safe side.
* :func:`counter_from_text_tokenizer` makes a :data:`TokenCounter` from any
  ``encode(str)``.
* :func:`count_prompt_tokens` uses the caller's counter, or the estimate, and
  says which (:class:`PromptCount`).

vLLM's ``POST /tokenize`` gives the exact count; its body helpers are in
:mod:`llmstream._tokenize`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from ._counts import is_count, require_count
from ._errors import InvalidRequestError

__all__ = [
    "PromptCount",
    "PromptSource",
    "TokenCounter",
    "count_prompt_tokens",
    "counter_from_text_tokenizer",
    "estimate_prompt_tokens",
]

PromptSource = Literal["server", "tokenizer", "estimate"]
"""Where a prompt count came from: vLLM's ``POST /tokenize``, the caller's own
tokenizer, or :func:`estimate_prompt_tokens`."""

TokenCounter = Callable[[list[Mapping[str, object]]], int]
"""Counts the prompt tokens of a list of chat messages.

Example::

    def count(messages: list[Mapping[str, object]]) -> int:
        return len(my_tokenizer.encode(render_chat(messages)))
"""

_BYTES_PER_TOKEN: Final = 3
_TOKENS_PER_MESSAGE: Final = 4
_REPLY_PRIMING: Final = 3


def _text_tokens(text: str) -> int:
    # English runs at about 4 characters a token with GPT, Llama and Qwen vocabularies, so 3
    # bytes a token overestimates prose by about a third. UTF-8 bytes rather than characters:
    # a CJK character is 3 bytes and often a token of its own, which characters / 3 would
    # count as a third. Digits count one each: Qwen's and Llama 2's tokenizers split numbers
    # into single digits, which bytes / 3 would undercount.
    digits = sum(ch.isdigit() for ch in text)
    rest = len(text.encode("utf-8", "replace")) - digits
    return digits + -(-rest // _BYTES_PER_TOKEN)


def _texts(value: object) -> list[str]:
    """Every string a message holds (content, content parts, names, tool-call arguments)."""
    # A loop over a stack, not recursion: estimate_prompt_tokens and the counters are public,
    # and a caller's content parts may nest deeper than the interpreter's recursion limit.
    texts: list[str] = []
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, Mapping):
            pending.extend(reversed(list(item.values())))
        elif isinstance(item, Sequence) and not isinstance(item, bytes | bytearray):
            pending.extend(reversed(item))
        elif item is not None and not isinstance(item, bool):
            texts.append(str(item))
    return texts


def estimate_prompt_tokens(
    messages: Sequence[Mapping[str, object]],
    *,
    tools: Sequence[Mapping[str, object]] | None = None,
) -> int:
    """A deliberately conservative prompt count, without a tokenizer.

    The rule: for each message, every string it holds (role, content, content
    parts, names, tool-call arguments) counts ``ceil(bytes / 3)`` tokens of its
    UTF-8 text, plus one per digit, plus 4 for the chat template's framing of
    the message; plus 3 for the reply's opening. ``tools`` schemas count like a
    message. Conservative because a budget must rather refuse a prompt that
    would have fitted than let through one that does not: prose is
    overestimated by about a third.

    Limits: it cannot see text a chat template adds on its own (Qwen2.5 adds a
    default system prompt: "Hi" is 30 tokens on the server, 10 here), and inline
    images count by the size of their base64 text. Count on the server or with
    the model's tokenizer when that matters.

    Example::

        estimate_prompt_tokens([{"role": "user", "content": "Hello there"}])  # 13
    """
    total = _REPLY_PRIMING
    for message in messages:
        total += _TOKENS_PER_MESSAGE + sum(_text_tokens(text) for text in _texts(message))
    if tools:
        total += _TOKENS_PER_MESSAGE + sum(_text_tokens(text) for text in _texts(list(tools)))
    return total


def counter_from_text_tokenizer(
    encode: Callable[[str], Sequence[int]],
    *,
    tokens_per_message: int = _TOKENS_PER_MESSAGE,
    reply_priming: int = _REPLY_PRIMING,
) -> TokenCounter:
    """Make a :data:`TokenCounter` from a text tokenizer's ``encode``.

    Each message counts the tokens of its strings plus ``tokens_per_message``
    for the template's framing, plus ``reply_priming`` once: the accounting
    OpenAI documents for its chat models. Any ``encode(str) -> list of ids``
    works: tiktoken's ``enc.encode``, a Hugging Face tokenizer's ``encode``
    (which adds a BOS token to every string: a few tokens too many, the safe
    side). For the exact count, render the chat template yourself; a function
    over the messages is a :data:`TokenCounter` too.

    Example::

        enc = tiktoken.get_encoding("o200k_base")
        count = counter_from_text_tokenizer(enc.encode)
        count([{"role": "user", "content": "Hi"}])  # tokens of "user" and "Hi", + 4 + 3
    """
    require_count("tokens_per_message", tokens_per_message, minimum=0)
    require_count("reply_priming", reply_priming, minimum=0)

    def count(messages: list[Mapping[str, object]]) -> int:
        total = reply_priming
        for message in messages:
            total += tokens_per_message + sum(len(encode(text)) for text in _texts(message))
        return total

    return count


@dataclass(frozen=True)
class PromptCount:
    """A prompt's token count and where it came from.

    Example::

        PromptCount(tokens=30, source="server")
    """

    tokens: int
    source: PromptSource


def count_prompt_tokens(
    messages: Sequence[Mapping[str, object]], counter: TokenCounter | None = None
) -> PromptCount:
    """Count a prompt with the caller's counter, or estimate it without one.

    The counter's answer is checked, since it is the caller's code:
    anything but an integer >= 0 raises ``InvalidRequestError``.

    Example::

        count_prompt_tokens(messages).source              # "estimate"
        count_prompt_tokens(messages, my_counter).source  # "tokenizer"
    """
    if counter is None:
        return PromptCount(estimate_prompt_tokens(messages), "estimate")
    tokens = counter(list(messages))
    if not is_count(tokens, 0):
        raise InvalidRequestError(f"The token counter must return an integer >= 0, got {tokens!r}")
    return PromptCount(tokens, "tokenizer")
