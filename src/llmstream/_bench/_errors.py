"""The benchmark's own failures, as llmstream errors."""

from __future__ import annotations

from .._errors import InvalidRequestError, LLMStreamError

__all__ = ["BenchError", "BenchUsageError"]


class BenchUsageError(InvalidRequestError):
    """The command line (or a dataset file it names) cannot run as given: nothing was sent."""


class BenchError(LLMStreamError):
    """The benchmark could not run to its end (a worker process died, the emulator failed)."""
