"""The emulator's stand-in tokenizer: deterministic, dependency-free, reversible.

A real tokenizer is not needed to exercise a streaming client; what matters is that the
same text always yields the same pieces, that the pieces concatenate back to the text, and
that prompt counts agree between ``/tokenize`` and the ``usage`` of a completion.

Rules:

- Text is split with :data:`PIECE_RE`: a word (up to 16 word characters) or a run of up to
  8 punctuation characters, each with the spaces or tabs before it; line breaks (with any
  whitespace around them) and trailing whitespace are pieces of their own.
  ``"Hello! How are you?"`` gives ``"Hello"``, ``"!"``, ``" How"``, ``" are"``, ``" you"``,
  ``"?"``.
- A chat prompt costs :data:`MESSAGE_OVERHEAD` tokens per message (the chat template's role
  markers) plus the pieces of each message's text content.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

__all__ = ["MESSAGE_OVERHEAD", "PIECE_RE", "count_prompt_tokens", "message_text", "split_text"]

PIECE_RE = re.compile(r"[ \t]*\w{1,16}|[ \t]*[^\w\s]{1,8}|\s+")
MESSAGE_OVERHEAD = 4


def split_text(text: str) -> list[str]:
    """Split ``text`` into token pieces whose concatenation is ``text``.

    >>> split_text("Hello! How can I help?")
    ['Hello', '!', ' How', ' can', ' I', ' help', '?']
    """
    return PIECE_RE.findall(text)


def message_text(message: object) -> str:
    """The text of one chat message: its string content, or its text parts joined.

    >>> message_text({"role": "user", "content": [{"type": "text", "text": "Hi"}]})
    'Hi'
    """
    if not isinstance(message, Mapping):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = [
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        ]
        return "".join(parts)
    return ""


def count_prompt_tokens(messages: Sequence[object]) -> int:
    """Prompt length of a chat request: per message, its overhead plus its text pieces.

    >>> count_prompt_tokens([{"role": "user", "content": "Hi there"}])
    6
    """
    total = sum(MESSAGE_OVERHEAD + len(split_text(message_text(m))) for m in messages)
    return max(total, 1)
