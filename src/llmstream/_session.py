"""One streamed chat completion as a state machine fed bytes and timestamps (sans-IO).

bytes -> :class:`~llmstream._sse.SSEDecoder` -> events -> typed chunks ->
:class:`~llmstream._assemble.StreamAssembler` + :class:`~llmstream._metrics.MetricsRecorder`.
The async and sync shells only read the network and call :meth:`StreamSession.feed`
and :meth:`StreamSession.end_of_body`; every protocol decision is made here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import ValidationError

from ._accounting import CallAccount
from ._assemble import StreamAssembler, response_headers
from ._chunks import ChatCompletionChunk, Usage
from ._errors import (
    BudgetExceeded,
    LLMStreamError,
    ProtocolError,
    ServerStreamError,
    StreamAborted,
    StreamInterrupted,
    StreamLimitExceeded,
)
from ._json import loads as loads_json
from ._metrics import MetricsRecorder
from ._result import StreamResult, StreamStatus, TokenReport
from ._sse import DEFAULT_MAX_EVENT_BYTES, DEFAULT_MAX_LINE_BYTES, SSEDecoder

__all__ = ["StreamItem", "StreamSession"]

StreamItem = tuple[ChatCompletionChunk, str]
"""A chunk and the text it adds to choice 0 (``""`` when none)."""

PromptSourceName = Literal["server", "tokenizer", "estimate", "unknown"]
_DONE = "[DONE]"
# Errors are built where the problem is seen and given the real partial result by fail().
_PLACEHOLDER = StreamResult(status="error")
# The model's validator itself: model_validate_json() is a Python wrapper around it whose
# own cost (~0.4 us) is measurable per chunk. Same validation, same result type.
_parse_chunk: Callable[[str], ChatCompletionChunk] = (
    ChatCompletionChunk.__pydantic_validator__.validate_json
)


class StreamSession:
    """Decodes one response body and assembles its result.

    Example::

        session = StreamSession(started=time.perf_counter())
        for chunk, text in session.feed(b'data: {"choices": []}\\n\\n', now=time.perf_counter()):
            ...
        result = session.end_of_body(now=time.perf_counter())  # or StreamInterrupted
    """

    __slots__ = (
        "_assembler",
        "_attempt_tokens_from",
        "_bytes",
        "_decoder",
        "_headers",
        "_limits",
        "_max_bytes",
        "_max_chunks",
        "_metrics",
        "_request_id",
        "_status",
        "_usage_before",
        "account",
        "budget_stopped",
        "done",
        "endpoint",
        "error",
        "first_token_at",
        "hedged",
        "last_event_at",
        "resumes",
        "retries",
    )

    def __init__(
        self,
        *,
        started: float,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        max_chunks: int | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self._max_chunks = max_chunks
        self._max_bytes = max_bytes
        self._bytes = 0
        self._limits = (max_line_bytes, max_event_bytes)
        self._decoder = SSEDecoder(max_line_bytes=max_line_bytes, max_event_bytes=max_event_bytes)
        self._usage_before: Usage | None = None
        self._attempt_tokens_from = 0
        self.retries = 0
        """Attempts that were started again from scratch (nothing had been received)."""
        self.resumes = 0
        """Times the stream was continued on a new request after it broke."""
        self.account: CallAccount | None = None
        """The call's token account, fed every chunk, when a budget applies."""
        self.budget_stopped = False
        """True once the budget ran out (``on_exhausted="stop"``): read no further."""
        self.first_token_at: float | None = None
        """When the first generated output arrived (any attempt)."""
        self.last_event_at: float | None = None
        """When the last event of the current attempt arrived."""
        self._assembler = StreamAssembler()
        self._metrics = MetricsRecorder(started)
        self._request_id: str | None = None
        self._headers: dict[str, str] = {}
        self._status: StreamStatus = "streaming"
        self.done = False
        """True once ``data: [DONE]`` arrived: nothing after it is decoded."""
        self.error: LLMStreamError | None = None
        """Set when the stream failed (an error event, bad bytes); carries the partial result."""
        self.endpoint: str | None = None
        """The base URL of the endpoint whose response feeds the session now."""
        self.hedged = False
        """True once the call sent a hedge beside its request."""

    @property
    def status(self) -> StreamStatus:
        """``streaming`` until the stream ends, then how it ended."""
        return self._status

    @property
    def has_output(self) -> bool:
        """True once any generated output arrived (the point after which a retry would repeat)."""
        return self.first_token_at is not None

    def new_attempt(self, *, resume: bool) -> None:
        """A new request will feed this session: a retry (nothing kept) or a resume.

        A resume keeps everything assembled and counts usage across requests (a
        request cut before its usage report counts the tokens it delivered, and
        no prompt tokens: the server never said); a retry starts the answer
        over (only allowed before any output).
        """
        if self.account is not None and resume:
            self.account.new_request()
        if resume:
            self.resumes += 1
            usage = self._assembler.usage
            if usage is None:
                # The cut request never reported usage: count the tokens it did deliver.
                seen = self._metrics.output_chunks - self._attempt_tokens_from
                usage = Usage(completion_tokens=seen, total_tokens=seen)
            self._usage_before = _add_usage(self._usage_before, usage)
        else:
            self.retries += 1
            self._assembler = StreamAssembler()
            self._usage_before = None
        self._assembler.usage = None
        self._decoder = SSEDecoder(max_line_bytes=self._limits[0], max_event_bytes=self._limits[1])
        self._status = "streaming"
        self._attempt_tokens_from = self._metrics.output_chunks
        self.done = False
        self.error = None
        self.last_event_at = None

    def chunk_gaps(self) -> tuple[float, ...]:
        """Seconds between consecutive output chunks (see :meth:`MetricsRecorder.gaps`)."""
        return self._metrics.gaps()

    def completion_tokens(self) -> int:
        """Completion tokens generated so far, all requests of the call.

        Each request counts with the server's usage when it reported one, else
        with the output chunks it delivered.
        """
        current = self._assembler.usage
        if current is not None:
            this = current.completion_tokens
        else:
            this = self._metrics.output_chunks - self._attempt_tokens_from
        before = self._usage_before.completion_tokens if self._usage_before is not None else 0
        return before + this

    def headers(self, now: float, headers: Mapping[str, str]) -> None:
        """The response headers arrived; the result keeps them, and ``X-Request-Id``."""
        self._metrics.headers(now)
        self._headers = response_headers(headers)
        self._request_id = self._headers.get("x-request-id")

    def feed(self, data: bytes, now: float) -> list[StreamItem]:
        """Decode one network read; returns the chunks it completed, with their choice-0 text.

        Raises :class:`~llmstream.ServerStreamError` for an error event and
        :class:`~llmstream.ProtocolError` for bytes that are not a chat
        completion stream; both carry the partial result.
        """
        if self.done or self.error is not None or self.budget_stopped:
            return []
        items: list[StreamItem] = []
        metrics = self._metrics
        add = self._assembler.add
        max_chunks = self._max_chunks
        account = self.account
        parse = _parse_chunk
        try:
            if self._max_bytes is not None:
                self._count_bytes(len(data))
            for event_type, payload, _, _ in self._decoder.decode(data):
                if payload == _DONE:
                    self.done = True
                    break
                if event_type == "error":
                    # Some servers name error events instead of shaping the JSON.
                    raise _server_error({"error": _error_body(payload)})
                try:
                    chunk = parse(payload)
                except ValidationError as exc:
                    raise ProtocolError(_describe_bad_chunk(exc, payload)) from None
                extra = chunk.__pydantic_extra__
                if (extra and "error" in extra) or chunk.object == "error":
                    raise _server_error(extra or {})
                if max_chunks is not None and metrics.chunks >= max_chunks:
                    raise StreamLimitExceeded(
                        f"The server sent more than max_chunks={max_chunks} chunks; the stream "
                        "was closed so the server stops generating.",
                        partial=_PLACEHOLDER,
                    )
                if account is not None and account.refuses(chunk):
                    # Output past the budget (a server that ignores max_tokens): not
                    # delivered, and nothing more is read.
                    self._stop_for_budget(account)
                    break
                metrics.chunk()
                text, output = add(chunk)
                # The finish chunk carries the last token (or the EOS token, which
                # decodes to no text but counts): it closes the decode interval.
                if output or (chunk.choices and chunk.choices[0].finish_reason is not None):
                    metrics.token(now)
                    if self.first_token_at is None and output:
                        self.first_token_at = now
                items.append((chunk, text))
                if account is not None:
                    account.observe(chunk, output)
                    if account.must_stop and not self._assembler.all_finished:
                        self._stop_for_budget(account)
                        break
            if items:
                self.last_event_at = now
        except StreamAborted as exc:
            self.error = self.fail(exc, now, "aborted")
        except BudgetExceeded as exc:
            self.error = self.fail(exc, now, "budget")
        except LLMStreamError as exc:
            # The chunks decoded before the failure are still delivered first.
            self.error = self.fail(exc, now)
        return items

    def _stop_for_budget(self, account: CallAccount) -> None:
        if account.plan.on_exhausted == "error":
            raise account.exhausted_error(_PLACEHOLDER)
        # Deliver what arrived, read no further: the shell closes the connection, and the
        # server stops generating.
        self.budget_stopped = True
        self._status = "budget"

    def _count_bytes(self, size: int) -> None:
        self._bytes += size
        limit = self._max_bytes
        if limit is not None and self._bytes > limit:
            raise StreamLimitExceeded(
                f"The server sent more than max_bytes={limit} bytes; the stream was closed "
                "so the server stops generating.",
                partial=_PLACEHOLDER,
            )

    def end_of_body(self, now: float) -> StreamResult:
        """The body ended cleanly: the result if the stream was complete, else StreamInterrupted.

        Complete means every choice finished (some OpenAI-compatible servers send no
        ``[DONE]``). ``[DONE]`` alone is not enough: llama-cpp-python sends it after a
        request it dropped, with no finish reason; vLLM always finishes every choice first.
        """
        self.end(now)
        return self.result(now)

    def end(self, now: float) -> None:
        """:meth:`end_of_body` without assembling the result (:meth:`result` does, later)."""
        if self.error is not None:
            raise self.error
        try:
            self._decoder.close()
        except ProtocolError as exc:  # the last read's bad bytes, after its good events
            self.error = self.fail(exc, now)
            raise self.error from None
        if self._assembler.all_finished:
            self._status = "complete"
            return
        if self.done:
            raise self.interrupted(
                "The server sent [DONE] before every choice had a finish_reason: the answer "
                "was cut short (llama.cpp's Python server does this when it drops a request). "
                "exc.partial holds what arrived; retry the request to get the full answer.",
                now,
            )
        raise self.interrupted(
            "The server ended the stream before the answer was complete (no finish_reason "
            "and no [DONE]); the connection was probably cut by the server or a proxy. "
            "exc.partial holds what arrived; retry the request to get the full answer.",
            now,
        )

    @property
    def all_finished(self) -> bool:
        """True once every choice has a finish reason."""
        return self._assembler.all_finished

    def finish(self, now: float) -> StreamResult:
        """Mark the stream complete (every choice finished) and return the result."""
        self._status = "complete"
        return self.result(now)

    def interrupted(
        self, message: str, now: float, cls: type[StreamInterrupted] = StreamInterrupted
    ) -> StreamInterrupted:
        """An error for a stream that broke off, carrying the partial result."""
        self._status = "interrupted"
        return cls(message, partial=self.result(now))

    def cancel(self, now: float) -> StreamResult:
        """The caller stopped reading before the end: the partial result, marked cancelled."""
        if self._status == "streaming":
            self._status = "cancelled"
        return self.result(now)

    def result(self, now: float) -> StreamResult:
        """The result assembled so far, with the current status."""
        assembler = self._assembler
        usage = _add_usage(self._usage_before, assembler.usage)
        metrics = self._metrics.summary(
            completion_tokens=usage.completion_tokens if usage is not None else None, ended=now
        )
        return assembler.result(
            status=self._status,
            metrics=metrics,
            request_id=self._request_id,
            usage=usage,
            retries=self.retries,
            resumes=self.resumes,
            tokens=self._token_report(usage, metrics.completion_tokens),
            headers=self._headers,
            endpoint=self.endpoint,
            hedged=self.hedged,
        )

    def _token_report(self, usage: Usage | None, completion: int) -> TokenReport:
        account = self.account
        if usage is not None and usage.prompt_tokens:
            prompt: int | None = usage.prompt_tokens
            source: PromptSourceName = "server"
        elif account is not None:
            prompt, source = account.plan.prompt_tokens, account.plan.prompt_source
        else:
            prompt, source = None, "unknown"
        if account is not None and not account.final:
            # Until the final usage, the meter's count is the one that sums every choice
            # (continuous usage stats count per choice).
            completion = account.used
        return TokenReport(
            prompt_tokens=prompt,
            prompt_source=source,
            completion_tokens=completion,
            completion_source="server" if usage is not None else "chunks",
            total_tokens=prompt + completion if prompt is not None else None,
        )

    def fail(
        self, exc: LLMStreamError, now: float, status: StreamStatus = "error"
    ) -> LLMStreamError:
        """Mark the stream as ended by ``exc`` and attach the partial result to it."""
        self._status = status
        exc.partial = self.result(now)
        return exc


def _server_error(extra: dict[str, Any]) -> ServerStreamError:
    # vLLM: {"error": {"message", "type", "param", "code"}}; older servers: a flat
    # {"object": "error", "message", "type", "code"}; some proxies: {"error": "text"}.
    body = extra.get("error", extra)
    if isinstance(body, dict):
        message = str(body.get("message") or "no message")
        error_type = body.get("type")
        code = body.get("code")
    else:
        message, error_type, code = str(body), None, None
    detail = f"{error_type}, code {code}" if error_type or code is not None else "no code"
    return ServerStreamError(
        f"The server reported an error mid-stream ({detail}): {message}. "
        "exc.partial holds what arrived before it.",
        partial=_PLACEHOLDER,
        error_type=str(error_type) if error_type is not None else None,
        error_code=code if isinstance(code, (int, str)) else None,
    )


def _add_usage(before: Usage | None, current: Usage | None) -> Usage | None:
    """Usage across requests of one call: what each request was billed, summed."""
    if before is None or current is None:
        return current if before is None else before
    return Usage(
        prompt_tokens=before.prompt_tokens + current.prompt_tokens,
        completion_tokens=before.completion_tokens + current.completion_tokens,
        total_tokens=before.total_tokens + current.total_tokens,
    )


def _error_body(payload: str) -> object:
    try:
        body = loads_json(payload)
    except ValueError:
        return payload
    if isinstance(body, dict) and isinstance(body.get("error"), dict | str):
        return body["error"]
    return body


def _describe_bad_chunk(exc: ValidationError, payload: str) -> str:
    sample = payload if len(payload) <= 200 else payload[:200] + "..."
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return f"The server sent an event that is not valid JSON: {sample!r}"
    where = ".".join(str(p) for p in first["loc"]) or "the event"
    return (
        f"The server sent an event that is not a chat completion chunk "
        f"({where}: {first['msg']}): {sample!r}"
    )
