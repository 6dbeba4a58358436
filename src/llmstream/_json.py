"""Parsing JSON that a server (or a model) sent, where any text may arrive.

Example::

    from llmstream._json import loads

    loads("[" * 100_000)  # ValueError, as for any JSON that is not valid
"""

from __future__ import annotations

import json

__all__ = ["loads"]


def loads(text: str | bytes) -> object:
    """``json.loads()``, with nesting too deep to parse a ``ValueError`` like bad JSON.

    Python's parser recurses once per nested array or object and raises
    ``RecursionError`` past the interpreter's limit: a body of ``[[[[…`` from a broken or
    hostile server must fail as malformed JSON does, not as a crash.

    Example::

        loads(b'{"a": 1}')  # {'a': 1}
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply to parse") from None
