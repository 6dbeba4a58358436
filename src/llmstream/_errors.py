"""Every error llmstream raises.

The tree is shallow and each class says when it is raised::

    LLMStreamError                    anything llmstream raises
    ├── InvalidRequestError           bad arguments, caught before any request (also a ValueError)
    ├── APIConnectionError            could not reach the server, or it went away before answering
    │   └── APITimeoutError           a deadline passed before the response started
    │       └── ConnectTimeout        the connection could not be opened in time
    ├── APIStatusError                the server answered with a non-2xx status
    │   ├── BadRequestError           400
    │   ├── AuthenticationError       401
    │   ├── PermissionDeniedError     403
    │   ├── NotFoundError             404
    │   ├── UnprocessableEntityError  422
    │   ├── RateLimitError            429
    │   └── InternalServerError       5xx
    ├── ProtocolError                 the server broke the protocol (bad SSE, bad JSON...)
    ├── StreamInterrupted             the stream ended or broke before it was complete
    │   ├── StreamTimeout             a deadline passed while streaming
    │   │   ├── FirstTokenTimeout     no token within Timeouts.first_token
    │   │   ├── IdleTimeout           no event for Timeouts.idle in mid-answer
    │   │   └── TotalTimeout          the call (retries included) passed Timeouts.total
    │   └── ServerStreamError         the server sent an error event inside a 200 stream
    ├── StreamAborted                 the client stopped the stream: a limit was reached
    │   ├── BufferOverflow            the read-ahead buffer filled up (on_full="error")
    │   ├── PauseTimeout              the stream stayed paused longer than max_pause
    │   └── StreamLimitExceeded       more chunks or bytes than max_chunks / max_bytes
    ├── BudgetExceeded                a token budget refused the call, or ran out mid-stream
    ├── OverloadedError               every endpoint of a fleet is saturated or down; nothing sent
    ├── ToolArgumentsError            a tool call's arguments are not a JSON object (a ValueError)
    └── OutputParseError              the answer does not validate as the asked model (a ValueError)

Errors raised once a stream has started carry ``partial``: the
:class:`~llmstream.StreamResult` assembled from what arrived before the failure.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "BudgetExceeded",
    "BudgetLimit",
    "BufferOverflow",
    "ClientClosed",
    "ConnectTimeout",
    "FirstTokenTimeout",
    "IdleTimeout",
    "ToolArgumentsError",
    "TotalTimeout",
    "PauseTimeout",
    "StreamAborted",
    "StreamLimitExceeded",
    "AuthenticationError",
    "BadRequestError",
    "InternalServerError",
    "InvalidRequestError",
    "LLMStreamError",
    "NotFoundError",
    "OutputParseError",
    "OverloadedError",
    "PermissionDeniedError",
    "ProtocolError",
    "RateLimitError",
    "ServerStreamError",
    "StreamInterrupted",
    "StreamTimeout",
    "UnprocessableEntityError",
]


class LLMStreamError(Exception):
    """Base class of every error llmstream raises.

    ``partial`` is the result assembled so far when the error happened while
    streaming, else ``None``.

    Example::

        try:
            async with client.stream("Hi") as stream:
                async for text in stream:
                    print(text, end="")
        except llmstream.LLMStreamError as exc:
            print("failed:", exc, "partial text:", exc.partial and exc.partial.text)
    """

    def __init__(self, message: str, *, partial: StreamResult | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.partial = partial


class InvalidRequestError(LLMStreamError, ValueError):
    """The arguments are invalid, or the client cannot be used as it is; nothing was sent.

    Also raised for a client used after it was closed, an ``AsyncClient`` whose
    ``http_client`` still holds connections of an event loop that has ended, a
    SOCKS proxy in the environment without ``httpx[socks]``, and an optional
    feature whose extra is not installed.

    Example::

        with pytest.raises(llmstream.InvalidRequestError):
            client.stream([])  # no messages
    """


class APIConnectionError(LLMStreamError):
    """The server could not be reached, or the connection failed before a response.

    Example::

        except llmstream.APIConnectionError as exc:
            print("is the server running?", exc)
    """


class APITimeoutError(APIConnectionError):
    """A deadline passed before the response started (connect, write or headers).

    Example::

        except llmstream.APITimeoutError:
            print("the server did not answer in time")
    """


class ConnectTimeout(APITimeoutError):
    """The connection could not be opened within ``Timeouts.connect``.

    Example::

        except llmstream.ConnectTimeout:
            print("the server is unreachable")
    """


class APIStatusError(LLMStreamError):
    """The server answered with a non-2xx status.

    ``status_code`` is the HTTP status, ``body`` the raw body text (truncated to
    64 KiB), ``error_type`` and ``error_code`` what the server's JSON error said
    (when it said), ``headers`` the response headers and ``request_id`` the
    ``X-Request-Id`` header when present, ``method`` and ``url`` the request that
    got the answer (``None`` when not known). ``str(exc)`` names the request and
    quotes the server's own message.

    Example::

        except llmstream.APIStatusError as exc:
            if exc.status_code == 404:
                print(exc.method, exc.url, "not found:", exc.message)
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        body: str,
        headers: dict[str, str],
        error_type: str | None = None,
        error_code: int | str | None = None,
        request_id: str | None = None,
        method: str | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body
        self.headers = headers
        self.error_type = error_type
        self.error_code = error_code
        self.request_id = request_id
        self.method = method
        self.url = url


class BadRequestError(APIStatusError):
    """HTTP 400: the server rejected the request (validation, prompt too long, ...).

    Example::

        except llmstream.BadRequestError as exc:
            print(exc.message)
    """


class AuthenticationError(APIStatusError):
    """HTTP 401: the API key is missing or wrong.

    Example::

        except llmstream.AuthenticationError:
            print("set LLMSTREAM_API_KEY")
    """


class PermissionDeniedError(APIStatusError):
    """HTTP 403: the key is valid but not allowed to do this.

    Example::

        except llmstream.PermissionDeniedError as exc:
            print(exc.message)
    """


class NotFoundError(APIStatusError):
    """HTTP 404: unknown model or wrong base URL.

    Example::

        except llmstream.NotFoundError as exc:
            print("check the model name and base_url:", exc.message)
    """


class UnprocessableEntityError(APIStatusError):
    """HTTP 422: the server could not validate the request body.

    Example::

        except llmstream.UnprocessableEntityError as exc:
            print(exc.body)
    """


class RateLimitError(APIStatusError):
    """HTTP 429: too many requests; ``headers`` may carry ``retry-after``.

    Example::

        except llmstream.RateLimitError as exc:
            print("retry after", exc.headers.get("retry-after"))
    """


class InternalServerError(APIStatusError):
    """HTTP 5xx: the server (or a gateway in front of it) failed.

    Example::

        except llmstream.InternalServerError as exc:
            print(exc.status_code, exc.message)
    """


class ProtocolError(LLMStreamError):
    """The server broke the streaming protocol.

    Raised for a 200 that is not ``text/event-stream``, an event that is not
    valid JSON or not a chat completion chunk, invalid UTF-8, or a line or event
    over the configured size limit. ``partial`` holds what arrived before.

    Example::

        except llmstream.ProtocolError as exc:
            print("not an OpenAI-compatible stream:", exc)
    """


class StreamInterrupted(LLMStreamError):
    """The stream ended or broke before it was complete.

    A stream is complete when ``data: [DONE]`` arrives, or when every choice
    has a ``finish_reason`` and the body then ends. Anything else (the
    connection dropped, the body ended early) raises this, with ``partial``
    holding the result assembled so far (``partial.complete`` is ``False``).

    Example::

        except llmstream.StreamInterrupted as exc:
            print("got only:", exc.partial.text)
    """

    partial: StreamResult

    def __init__(self, message: str, *, partial: StreamResult) -> None:
        super().__init__(message, partial=partial)


class StreamTimeout(StreamInterrupted):
    """A deadline passed while the stream was running.

    Example::

        except llmstream.StreamTimeout as exc:
            print("stalled after", len(exc.partial.text), "characters")
    """


class FirstTokenTimeout(StreamTimeout):
    """No generated token arrived within ``Timeouts.first_token`` of sending the request.

    Retried like a connection failure (nothing was delivered yet).

    Example::

        except llmstream.FirstTokenTimeout:
            print("the server is overloaded or the prompt is very long")
    """


class IdleTimeout(StreamTimeout):
    """The server sent no event for ``Timeouts.idle`` seconds in the middle of an answer.

    Keep-alive comments do not count as events. ``partial`` holds what arrived.

    Example::

        except llmstream.IdleTimeout as exc:
            print("stalled after", len(exc.partial.text), "characters")
    """


class TotalTimeout(StreamTimeout):
    """The whole call, retries and their waits included, took longer than ``Timeouts.total``.

    Example::

        except llmstream.TotalTimeout as exc:
            print("gave up after", exc.partial.metrics.duration, "s")
    """


class ServerStreamError(StreamInterrupted):
    """The server sent an error event inside a 200 stream.

    vLLM sends ``data: {"error": {"message", "type", "param", "code"}}`` then
    ``[DONE]`` when generation fails after the stream started; other servers
    send a flat ``{"object": "error", ...}`` or ``{"error": "text"}``.
    ``error_code`` is the integer code (500 engine error, 503 retryable, 400),
    ``error_type`` the server's type string.

    Example::

        except llmstream.ServerStreamError as exc:
            if exc.error_code == 503:
                print("engine busy; retry later")
    """

    def __init__(
        self,
        message: str,
        *,
        partial: StreamResult,
        error_type: str | None = None,
        error_code: int | str | None = None,
    ) -> None:
        super().__init__(message, partial=partial)
        self.error_type = error_type
        self.error_code = error_code


class StreamAborted(LLMStreamError):
    """The client stopped the stream: a limit set on it was reached, or it was closed.

    The connection is closed (so vLLM aborts the request) and ``partial``
    holds what arrived before, with ``status == "aborted"``.

    Example::

        except llmstream.StreamAborted as exc:
            print("stopped early:", exc, len(exc.partial.text))
    """

    partial: StreamResult

    def __init__(self, message: str, *, partial: StreamResult) -> None:
        super().__init__(message, partial=partial)


class BufferOverflow(StreamAborted):
    """The read-ahead buffer was full and the stream was told to fail rather than wait.

    Raised with ``on_full="error"`` when the consumer fell more than
    ``buffer`` chunks behind the network.

    Example::

        async with client.stream("Hi", buffer=16, on_full="error") as stream:
            ...  # a consumer that stalls gets BufferOverflow instead of backpressure
    """


class ClientClosed(StreamAborted):
    """The client was closed while the stream was in flight.

    ``Client.close()`` / ``AsyncClient.aclose()`` end every stream of the client that is
    still open: each one's connection is cut (vLLM aborts the request) and its consumer
    gets what was handed over before, then this error.

    Example::

        try:
            async for text in stream:
                ...
        except llmstream.ClientClosed as exc:
            print("shutting down after", len(exc.partial.text), "characters")
    """


class PauseTimeout(StreamAborted):
    """The stream stayed paused for longer than ``max_pause`` seconds.

    A paused client keeps its request's KV cache held on the vLLM server, so
    a pause has a limit; past it the request is cancelled.

    Example::

        stream.pause()
        ...  # more than max_pause seconds later, reading raises PauseTimeout
    """


class StreamLimitExceeded(StreamAborted):
    """The stream sent more chunks or bytes than ``max_chunks`` / ``max_bytes`` allow.

    A guard against runaway generations.

    Example::

        async with client.stream("Hi", max_chunks=1000) as stream:
            ...
    """


BudgetLimit = Literal[
    "max_tokens", "prompt_tokens", "completion_tokens", "total_tokens", "max_model_len", "shared"
]
"""Which limit decided: the caller's ``max_tokens``, a :class:`~llmstream.CallBudget`
field, the model's context length, or a shared :class:`~llmstream.TokenBudget`."""


class BudgetExceeded(LLMStreamError):
    """A token budget does not allow the call, or ran out while it streamed.

    ``limit`` names the limit that decided (:data:`BudgetLimit`), ``allowed`` is
    that limit in tokens (for a shared budget: what it had available),
    ``requested`` what the call needed, ``prompt_tokens`` the prompt count used
    (when known), and ``retry_after`` the seconds until a refilling shared budget
    can cover the request (``None``: waiting will not help). Raised before
    sending, or mid-stream with ``partial`` when ``on_exhausted="error"``.

    Example::

        try:
            plan = plan_call(CallBudget(total_tokens=100), prompt_tokens=120,
                             prompt_source="server")
        except BudgetExceeded as exc:
            print(exc.limit, exc.allowed, exc.requested)  # total_tokens 100 121
    """

    def __init__(
        self,
        message: str,
        *,
        limit: BudgetLimit,
        allowed: int,
        requested: int,
        prompt_tokens: int | None = None,
        retry_after: float | None = None,
        partial: StreamResult | None = None,
    ) -> None:
        super().__init__(message, partial=partial)
        self.limit: BudgetLimit = limit
        self.allowed = allowed
        self.requested = requested
        self.prompt_tokens = prompt_tokens
        self.retry_after = retry_after


class OverloadedError(LLMStreamError):
    """Every endpoint of a fleet that could take the call is saturated or down.

    Raised by a client with ``fleet=...`` before sending, when admission control
    finds no endpoint with room (``vllm:num_requests_waiting`` at
    ``Admission.queue_limit``, KV cache at ``Admission.kv_limit``, load figures gone
    stale, or circuit open) and ``Admission.wait`` ran out. ``retry_after`` is the
    seconds until an endpoint may have room (``None``: no endpoint will, e.g. none
    serves the model); ``partial`` is set when the call had already streamed part of
    an answer (a resume found no endpoint).

    Example::

        try:
            async with client.stream("Hi") as stream:
                ...
        except llmstream.OverloadedError as exc:
            await anyio.sleep(exc.retry_after or 1.0)  # then try again, or shed the load
    """

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        partial: StreamResult | None = None,
    ) -> None:
        super().__init__(message, partial=partial)
        self.retry_after = retry_after


class ToolArgumentsError(LLMStreamError, ValueError):
    """A tool call's arguments are not a JSON object, so they cannot be used as keywords.

    Raised by :meth:`~llmstream.FunctionCall.parsed` when the model wrote text
    that is not JSON, or JSON that is not an object (a list, a string...).
    ``name`` is the function's name and ``arguments`` the text the model wrote.
    A ``ValueError``, as ``json.JSONDecodeError`` is.

    Example::

        try:
            output = get_weather(**call.function.parsed())
        except llmstream.ToolArgumentsError as exc:
            output = f"error: {exc}"  # send it back as the tool's answer
    """

    def __init__(self, message: str, *, name: str, arguments: str) -> None:
        super().__init__(message)
        self.name = name
        self.arguments = arguments


class OutputParseError(LLMStreamError, ValueError):
    """The answer is not valid JSON for the model it was parsed as.

    Raised by :meth:`~llmstream.StreamResult.parse`. ``text`` is the answer as
    the model wrote it and ``model_name`` the class it was checked against; the
    pydantic ``ValidationError`` is the ``__cause__``. A ``ValueError``, as
    pydantic's own error is.

    Example::

        try:
            weather = result.parse(Weather)
        except llmstream.OutputParseError as exc:
            print("not a Weather:", exc.text)
    """

    def __init__(self, message: str, *, text: str, model_name: str) -> None:
        super().__init__(message)
        self.text = text
        self.model_name = model_name


# At run time, not only for type checkers: typing.get_type_hints() on the errors (and
# pydantic, through it) resolves `partial: StreamResult` in this module's namespace. Last,
# because _result imports ToolArgumentsError from here.
from ._result import StreamResult  # noqa: E402
