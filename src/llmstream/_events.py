"""What happens during a call, as typed events (sans-IO).

:class:`~llmstream._call.CallCore` emits one of these at each step of a call to an
observer, when one is set: a request sent, response headers, the first token, a retry
or resume (:class:`~llmstream.RetryEvent`), the end. Timestamps are the core's clock
(``time.perf_counter()`` in the shells). With no observer nothing is built per chunk:
events are emitted per request and per call, never per token.

Example::

    core = CallCore(body, options, timeouts, retry, observer=events.append)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ._errors import LLMStreamError
from ._result import StreamResult
from ._retry import RetryEvent

__all__ = [
    "CallEvent",
    "CallFailed",
    "CallFinished",
    "FirstToken",
    "RequestSent",
    "ResponseHeaders",
]


@dataclass(frozen=True, slots=True)
class RequestSent:
    """A request of the call is being sent (``attempt`` 1 first, then retries/resumes)."""

    at: float
    attempt: int
    body: dict[str, object]
    endpoint: str | None = None
    """Where it goes (None: the client's base URL)."""
    hedge: bool = False
    """True for a request sent beside the current one, racing it to the first token."""


@dataclass(frozen=True, slots=True)
class ResponseHeaders:
    """The response headers of an attempt arrived."""

    at: float
    attempt: int
    status: int


@dataclass(frozen=True, slots=True)
class FirstToken:
    """The first event of an attempt's body arrived (vLLM sends it with the first token)."""

    at: float
    attempt: int


@dataclass(frozen=True, slots=True)
class CallFinished:
    """The call ended without an error: complete, stopped by its budget, or cancelled."""

    at: float
    result: StreamResult


@dataclass(frozen=True, slots=True)
class CallFailed:
    """The call ended with ``error`` (it carries the partial result)."""

    at: float
    error: LLMStreamError


CallEvent = Union[  # noqa: UP007 (a runtime alias on 3.10)
    RequestSent, ResponseHeaders, FirstToken, RetryEvent, CallFinished, CallFailed
]
"""Any event of a call."""
