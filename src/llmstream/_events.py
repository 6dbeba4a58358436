"""What happens during a call, as typed events (sans-IO).

:class:`~llmstream._call.CallCore` emits one of these at each step of a call to an
observer, when one is set: a request sent, response headers, the first token, a retry
or resume (:class:`~llmstream.RetryEvent`), and exactly one end: :class:`CallFinished`
or :class:`CallFailed`. The hooks a client is given (``hooks=[...]``) receive them.

Every event names its call (:class:`CallInfo`, the same object for every event of one
call), the attempt it is about and when it happened (``at``, the stream's clock:
``time.perf_counter()`` seconds). With no observer nothing is built: events are per
request and per call, never per token.

Example::

    def hook(event: llmstream.CallEvent) -> None:
        if isinstance(event, llmstream.CallFinished):
            print(event.call.call_id, event.status, event.result.metrics.duration)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Union

import httpx
from pydantic import ConfigDict

from ._call_info import CallInfo
from ._errors import APIStatusError, LLMStreamError
from ._result import StreamResult, StreamStatus
from ._retry import RetryEvent

__all__ = [
    "CallEvent",
    "CallFailed",
    "CallFinished",
    "CallInfo",
    "Endpoint",
    "FirstToken",
    "RequestSent",
    "ResponseHeaders",
    "endpoint_of",
    "error_type",
]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a client sends its calls, as events name it: no credentials, no query string."""

    url: str
    address: str
    port: int


NO_ENDPOINT = Endpoint("", "", 0)
"""For a core driven without a client (tests)."""


def endpoint_of(base_url: str) -> Endpoint:
    """The endpoint a base URL names, for events and metric labels.

    The query string is left out (some servers take a key there), and the port is the
    scheme's default when the URL has none.

    Example::

        endpoint_of("http://gpu-1:8000/v1?key=x")  # Endpoint("http://gpu-1:8000/v1", "gpu-1", 8000)
    """
    url = httpx.URL(base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    clean = url.copy_with(query=None, fragment=None)
    return Endpoint(str(clean).rstrip("/"), url.host, port)


@dataclass(frozen=True, slots=True)
class RequestSent:
    """A request of the call is about to be sent: ``attempt`` 1 first, then retries/resumes.

    ``body`` is the JSON body (read-only); ``endpoint`` is set when the request goes
    somewhere other than the client's base URL (a fleet), and ``hedge`` is True for a
    request sent beside the current one, racing it to the first token.

    Example::

        case llmstream.RequestSent(attempt=n) if n > 1:
            log.info("call %s: request %d", event.call.call_id, n)
    """

    call: CallInfo
    at: float
    attempt: int
    body: Mapping[str, object]
    endpoint: str | None = None
    hedge: bool = False


@dataclass(frozen=True, slots=True)
class ResponseHeaders:
    """The response headers of an attempt arrived (``status`` 200, or an error status).

    ``headers`` have lower-case names, without ``set-cookie``.

    Example::

        case llmstream.ResponseHeaders(status=status, headers=headers):
            print(status, headers.get("x-request-id"))
    """

    call: CallInfo
    at: float
    attempt: int
    status: int
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class FirstToken:
    """The first event of an attempt's body arrived (vLLM sends it with the first token).

    Once per request: a resumed call has one for each request that answered.

    Example::

        case llmstream.FirstToken(at=at):
            print(f"first token after {at - sent_at[event.call.call_id]:.3f} s")
    """

    call: CallInfo
    at: float
    attempt: int


@dataclass(frozen=True, slots=True)
class CallFinished:
    """The call ended without an error: ``status`` is ``complete``, ``budget`` or ``cancelled``.

    ``cancelled``: the caller stopped the stream before its end (``break``, ``close()``,
    ``cancel()``, task cancellation, Ctrl-C); ``budget``: the token budget ended it.
    ``complete`` covers every finish reason (``finish_reasons`` says ``stop``,
    ``length``...). ``attempt`` is the number of requests sent (0 when the call was stopped
    before any). ``chunk_gaps`` are the seconds between consecutive output chunks as they
    arrived (exact for up to 4,096 gaps, a uniform sample of them beyond).

    Example::

        case llmstream.CallFinished(status="complete", result=result):
            print(result.finish_reason, result.metrics.time_to_first_token)
    """

    call: CallInfo
    at: float
    attempt: int
    result: StreamResult
    chunk_gaps: tuple[float, ...] = ()

    @property
    def status(self) -> StreamStatus:
        """How the call ended: ``result.status``."""
        return self.result.status

    @property
    def finish_reasons(self) -> tuple[str, ...]:
        """The finish reason of each choice that has one (``("stop",)``, ``("length",)``)."""
        return _finish_reasons(self.result)


@dataclass(frozen=True, slots=True)
class CallFailed:
    """The call ended with ``error`` (after any retries); ``result`` is what arrived before it.

    Also for failures before any response: a refused connection, an error status, a
    deadline. ``result`` is ``error.partial`` (an empty result with status ``error`` when
    nothing was received).

    Example::

        case llmstream.CallFailed(error=llmstream.APIStatusError() as error):
            print("HTTP", error.status_code, "after", event.attempt, "attempts")
    """

    # pydantic has no schema for an exception: it checks `error` with isinstance.
    __pydantic_config__ = ConfigDict(arbitrary_types_allowed=True)

    call: CallInfo
    at: float
    attempt: int
    error: LLMStreamError
    result: StreamResult
    chunk_gaps: tuple[float, ...] = ()

    @property
    def status(self) -> StreamStatus:
        """How far the answer got: ``error``, ``interrupted`` or ``aborted`` (``result.status``)."""
        return self.result.status

    @property
    def finish_reasons(self) -> tuple[str, ...]:
        """The finish reason of each choice that had one before the failure."""
        return _finish_reasons(self.result)


def _finish_reasons(result: StreamResult) -> tuple[str, ...]:
    return tuple(c.finish_reason for c in result.choices if c.finish_reason is not None)


CallEvent = Union[  # noqa: UP007 (a runtime alias on 3.10)
    RequestSent, ResponseHeaders, FirstToken, RetryEvent, CallFinished, CallFailed
]
"""Any event of a call. More kinds may be added (a fleet's choice of endpoint): a hook
matches the ones it wants and ignores the rest."""


def error_type(error: LLMStreamError) -> str:
    """A short, low-cardinality name for an error (OpenTelemetry's ``error.type``).

    The HTTP status of a status error, else the error's class.

    Example::

        error_type(llmstream.IdleTimeout("..."))  # "llmstream.IdleTimeout"
        error_type(llmstream.InternalServerError(...))  # "503"
    """
    if isinstance(error, APIStatusError):
        return str(error.status_code)
    cls = type(error)
    return f"llmstream.{cls.__name__}" if cls.__module__.startswith("llmstream") else cls.__name__
