"""Types for command-line flags: each parses one flag's text, or says what is wrong with it.

``argparse`` shows an :class:`argparse.ArgumentTypeError`'s message as it is, after the
flag's name, and exits with status 2.

Example::

    parser.add_argument("--num-prompts", type=at_least(1))
    parser.add_argument("--timeout", type=seconds)
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = [
    "at_least",
    "finite_seconds",
    "fraction",
    "non_negative",
    "positive",
    "positive_seconds",
    "seconds",
]


def at_least(minimum: int) -> Callable[[str], int]:
    """A whole number of ``minimum`` or more.

    Example::

        at_least(1)("3")  # 3
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
        return value

    return parse


def _number(text: str, expected: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _checked(text: str, expected: str, ok: Callable[[float], bool], must: str) -> float:
    """``text`` as a number that ``ok`` accepts (comparisons refuse nan, as they should)."""
    value = _number(text, expected)
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {must}, got {text}")
    return value


def seconds(text: str) -> float:
    """Seconds, 0 or more (``inf`` allowed: no limit).

    Example::

        seconds("2.5")  # 2.5
    """
    return _checked(text, "seconds", lambda v: v >= 0, "0 or more")


def positive_seconds(text: str) -> float:
    """Seconds, above 0 (``inf`` allowed: no limit); a deadline of 0 could never be met.

    Example::

        positive_seconds("30")  # 30.0
    """
    return _checked(text, "seconds", lambda v: v > 0, "above 0 seconds")


def non_negative(text: str) -> float:
    """A finite number, 0 or more (a temperature).

    Example::

        non_negative("0.7")  # 0.7
    """
    return _checked(text, "a number", lambda v: 0 <= v < math.inf, "a finite number, 0 or more")


def finite_seconds(text: str) -> float:
    """Seconds, 0 or more, and finite.

    Example::

        finite_seconds("0")  # 0.0
    """
    return _checked(text, "seconds", lambda v: 0 <= v < math.inf, "finite seconds, 0 or more")


def positive(text: str) -> float:
    """A number above 0 (``inf`` allowed).

    Example::

        positive("0.5")  # 0.5
    """
    return _checked(text, "a number", lambda v: v > 0, "above 0")


def fraction(text: str) -> float:
    """A number from 0 to 1.

    Example::

        fraction("0.2")  # 0.2
    """
    return _checked(text, "a number from 0 to 1", lambda v: 0 <= v <= 1, "from 0 to 1")
