"""Token counts passed in by callers (or by their counters), checked the same way everywhere."""

from __future__ import annotations

from typing import TypeGuard

from ._errors import InvalidRequestError

__all__ = ["is_count", "require_count"]


def is_count(value: object, minimum: int) -> TypeGuard[int]:
    """True for an integer count of at least ``minimum`` (``True`` is not a count).

    Example::

        is_count(3, 0), is_count(True, 0)  # True, False
    """
    # bool is an int subclass; True tokens is a bug in the caller's code, not a count.
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def require_count(name: str, value: object, minimum: int = 1) -> None:
    """Raise ``InvalidRequestError`` unless ``value`` is an integer count >= ``minimum``.

    Example::

        require_count("max_tokens", 0)  # InvalidRequestError: ... a positive integer, got 0
    """
    if not is_count(value, minimum):
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise InvalidRequestError(f"{name} must be {kind}, got {value!r}")
