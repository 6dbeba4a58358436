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

__all__ = ["at_least", "finite_seconds", "fraction", "positive", "seconds"]


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


def seconds(text: str) -> float:
    """Seconds, 0 or more (``inf`` allowed: no limit).

    Example::

        seconds("2.5")  # 2.5
    """
    value = _number(text, "seconds")
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def finite_seconds(text: str) -> float:
    """Seconds, 0 or more, and finite.

    Example::

        finite_seconds("0")  # 0.0
    """
    value = seconds(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, got {text}")
    return value


def positive(text: str) -> float:
    """A number above 0 (``inf`` allowed).

    Example::

        positive("0.5")  # 0.5
    """
    value = _number(text, "a number")
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A number from 0 to 1.

    Example::

        fraction("0.2")  # 0.2
    """
    value = _number(text, "a number from 0 to 1")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {text}")
    return value
