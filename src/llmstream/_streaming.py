"""The stream objects: ``AsyncChatStream`` and its sync twin ``ChatStream``.

Both are thin I/O shells around :class:`~llmstream._session.StreamSession`:
they send requests, pass each network read to the session with a timestamp,
and hand out what it decoded. Every decision that needs no I/O (deadlines,
retries, resume bodies, error mapping) lives in :class:`_StreamBase` and the
sans-IO modules it calls.

One call may take several requests: a failure before any output is retried
from scratch, and, with ``RetryPolicy(resume=True)``, a stream that broke
mid-answer is continued on a new request; the consumer sees one stream.

Reading: inside a ``with`` block a background reader (a task of the stream's
own task group, or a thread for the sync twin) reads the socket as data comes,
so timings are taken at the wire, and hands chunks over through a bounded
buffer (``buffer`` chunks). When the buffer is full the reader stops reading,
and TCP pushes back on the server. With ``buffer=0`` the reader reads only
while the consumer waits. Deadlines are watched beside the reader (a watchdog
task; the waiting consumer thread), so they cost nothing per chunk.

Closing is prompt on purpose: leaving the ``with`` block for any reason closes
the HTTP response before it is fully read, which makes httpcore close the
connection instead of returning it to the pool. vLLM sees the disconnect and
aborts the request, freeing its KV cache.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import httpx

from ._accounting import BudgetOptions, CallAccount
from ._body import aiter_body, iter_body
from ._budget import CallPlan, plan_call
from ._chunks import ChatCompletionChunk
from ._deadlines import DeadlineKind, Timeouts, next_deadline
from ._errors import (
    BudgetExceeded,
    BufferOverflow,
    FirstTokenTimeout,
    IdleTimeout,
    LLMStreamError,
    PauseTimeout,
    ProtocolError,
    StreamTimeout,
    TotalTimeout,
)
from ._flow import AsyncReadAhead, PauseClock, StreamOptions, ThreadReadAhead
from ._header_wait import HeaderWait, shut_down, waiting_for_headers
from ._http_errors import MAX_ERROR_BODY_BYTES, connection_error, status_error
from ._prompt_count import PromptCount, count_prompt_tokens
from ._request import continuation_body
from ._result import StreamResult
from ._retry import RetryEvent, RetryPolicy
from ._session import StreamItem, StreamSession
from ._token_budget import Reservation

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from ._client import AsyncClient, Client

__all__ = ["AsyncChatStream", "ChatStream"]

_now = time.perf_counter
_T = TypeVar("_T")

_TIMEOUT_ERRORS: dict[DeadlineKind, type[StreamTimeout]] = {
    "first_token": FirstTokenTimeout,
    "idle": IdleTimeout,
    "total": TotalTimeout,
}


def _text_of(item: StreamItem) -> str | None:
    return item[1] or None


def _chunk_of(item: StreamItem) -> ChatCompletionChunk:
    return item[0]


class _StreamBase:
    """State and decisions shared by the two stream classes (no I/O here)."""

    def __init__(
        self,
        client: AsyncClient | Client,
        body: dict[str, object],
        options: StreamOptions,
        timeouts: Timeouts,
        retry: RetryPolicy,
        owns_client: bool,
        budget: BudgetOptions | None = None,
    ) -> None:
        self._body = body
        self._budget = budget or BudgetOptions()
        self._account: CallAccount | None = None
        self._next_body = body
        self._options = options
        self._timeouts = timeouts
        self._retry = retry
        self._owns_client = owns_client
        self._max_line_bytes = client._max_line_bytes
        self._max_event_bytes = client._max_event_bytes
        self._session: StreamSession | None = None
        self._response: httpx.Response | None = None
        self._pending: deque[StreamItem] = deque()
        self._result: StreamResult | None = None
        self._error: LLMStreamError | None = None
        self._failure: LLMStreamError | None = None  # raised by the next read
        self._pause = PauseClock(options.max_pause)
        self._entered = False
        self._exhausted = False  # the current body was read to its end
        self._closed = False
        self._cancelled = False
        self._call_started = 0.0
        self._attempt_started = 0.0
        self._read_started = 0.0
        self._attempts = 0
        self._live = False  # a response body is open
        self._reading = False  # a network read is in progress (deadlines apply)
        self._deadline_hit: DeadlineKind | None = None

    @property
    def result(self) -> StreamResult:
        """The assembled result, once the stream has ended or been closed.

        After a full read ``result.complete`` is ``True``; after ``break``,
        ``close()`` or ``cancel()`` it is the partial result with ``status ==
        "cancelled"``; after an error it is the error's ``partial``. With
        read-ahead the partial result holds everything received, which can be
        a few chunks more than the loop consumed. Raises the error that ended
        the call when it failed before streaming.

        Example::

            with client.stream("Hi") as stream:
                text = "".join(stream)
            print(stream.result.usage)
        """
        if self._result is None:
            if self._error is not None:
                raise self._error  # it failed before streaming: there is no result
            raise LLMStreamError(
                "The stream has not ended yet: read it to the end or close it before "
                "asking for .result (use .snapshot() for the result so far)."
            )
        return self._result

    def snapshot(self) -> StreamResult:
        """The result assembled so far, while the stream is still running.

        Example::

            async for text in stream:
                if len(stream.snapshot().text) > 1000:
                    break
        """
        if self._result is not None:
            return self._result
        if self._session is None:
            return StreamResult()
        return self._session.result(_now())

    @property
    def request_body(self) -> dict[str, object]:
        """The JSON body of the (first) request.

        Example::

            stream.request_body["max_tokens"]
        """
        return self._body

    @property
    def paused(self) -> bool:
        """True between :meth:`pause` and :meth:`resume`.

        Example::

            stream.pause()
            assert stream.paused
        """
        return self._pause.paused

    # -- attempts -------------------------------------------------------------

    def _begin_attempt(self) -> httpx.Timeout:
        """Book-keeping for a new request; returns httpx's timeouts for it.

        Until the response headers arrive (vLLM sends them at once, but a proxy
        may hold them until the first token) httpx's read timeout is the
        first-token deadline, or what is left of the total; :meth:`_body_read_timeout`
        then turns it into a backstop for the body, whose real deadlines are watched
        beside the reader.
        """
        now = _now()
        if self._attempts == 0:
            self._call_started = now
        self._attempts += 1
        self._attempt_started = now
        self._read_started = now
        self._deadline_hit = None
        self._exhausted = False
        t = self._timeouts
        found = self._deadline()
        header_wait = max(found[0] - now, 0.001) if found is not None else None
        return httpx.Timeout(connect=t.connect, read=header_wait, write=30.0, pool=t.connect)

    def _body_read_timeout(self, response: httpx.Response) -> None:
        """Headers arrived: httpx's read timeout becomes a backstop for the body."""
        t = self._timeouts
        # Without a limit on either wait (None), a read may legitimately wait forever.
        backstop = None if t.first_token is None or t.idle is None else max(t.first_token, t.idle)
        # httpcore reads this when the body's first read starts, which is after now.
        timeout = response.request.extensions.get("timeout")
        if isinstance(timeout, dict):
            timeout["read"] = backstop

    def _deadline(self) -> tuple[float, DeadlineKind] | None:
        session = self._session
        last = session.last_event_at if session is not None else None
        return next_deadline(
            self._timeouts,
            started=self._call_started,
            attempt_started=self._attempt_started,
            # Time the reader spent held back (full buffer, pause) is not idleness.
            last_event_at=max(last, self._read_started) if last is not None else None,
        )

    def _timeout_error(self, kind: DeadlineKind) -> LLMStreamError:
        t = self._timeouts
        if kind == "first_token":
            message = (
                f"No token arrived within first_token={t.first_token} s of sending the "
                "request: the server may be overloaded or the prompt very long. Raise "
                "Timeouts.first_token, or retry later."
            )
        elif kind == "idle":
            message = (
                f"The server sent no event for idle={t.idle} s in the middle of the answer "
                "(keep-alive comments do not count). exc.partial holds what arrived."
            )
        else:
            message = (
                f"The call took longer than total={t.total} s, retries included. "
                "exc.partial holds what arrived."
            )
        error_type = _TIMEOUT_ERRORS[kind]
        if self._session is None:
            return error_type(message, partial=StreamResult(status="interrupted"))
        return self._session.interrupted(message, _now(), error_type)

    def _open_session(self, response: httpx.Response) -> None:
        """Start (or continue) the session on a response that just arrived."""
        options = self._options
        if self._session is None:
            self._session = StreamSession(
                started=self._call_started,
                max_line_bytes=self._max_line_bytes,
                max_event_bytes=self._max_event_bytes,
                max_chunks=options.max_chunks,
                max_bytes=options.max_bytes,
            )
            self._session.retries = self._attempts - 1  # attempts that failed before a response
            self._session.account = self._account
        session = self._session
        session.headers(_now(), response.headers.get("x-request-id"))
        content_type = response.headers.get("content-type", "")
        if not content_type.lower().startswith("text/event-stream"):
            raise session.fail(
                ProtocolError(
                    f"The server answered {response.status_code} with content type "
                    f"{content_type or 'none'!r}, not text/event-stream: this is not a "
                    "streaming chat completion endpoint. Check the base URL (it usually "
                    "ends in /v1) and that the server speaks the OpenAI protocol."
                ),
                _now(),
            )

    def _plan_recovery(self, error: LLMStreamError) -> RetryEvent | None:
        """Whether and how to try again after ``error``; sets the next request's body."""
        policy = self._retry
        now = _now()
        session = self._session
        if session is not None and session.has_output:
            if not policy.resume or session.resumes >= policy.max_resumes:
                return None
            if not policy.retryable(error):
                return None
            partial = session.result(now)
            if partial.tool_calls or len(partial.choices) != 1:
                return None  # only plain text of a single choice can be continued
            body = continuation_body(self._body, partial.text, session.completion_tokens())
            if body is None:
                return None
            delay = policy.resume_delay(
                session.resumes + 1, error, started=self._call_started, now=now
            )
            if delay is None:
                return None
            event = RetryEvent("resume", self._attempts + 1, delay, error)
        else:
            delay_or_none = policy.delay_before(
                self._attempts + 1, error, started=self._call_started, now=now
            )
            if delay_or_none is None:
                return None
            body = self._body
            event = RetryEvent("retry", self._attempts + 1, delay_or_none, error)
        total = self._timeouts.total
        if total is not None and now + event.delay >= self._call_started + total:
            return None
        self._next_body = body
        if session is not None:
            session.new_attempt(resume=event.kind == "resume")
        policy.announce(event)
        return event

    def _mid_body_error(self, exc: httpx.HTTPError) -> LLMStreamError | None:
        """The error for a failure mid-body, or None when the answer was already complete."""
        session = self._session
        assert session is not None
        if self._deadline_hit is not None:
            return self._timeout_error(self._deadline_hit)
        if session.all_finished:
            # Every choice had finished: only the trailer ([DONE], usage) was lost.
            self._result = session.finish(_now())
            return None
        if isinstance(exc, httpx.TimeoutException):
            found = self._deadline()  # which deadline httpx's backstop stood in for
            return self._timeout_error(found[1] if found is not None else "idle")
        if isinstance(exc, httpx.DecodingError):
            return session.fail(ProtocolError(f"Could not decode the response body: {exc}"), _now())
        return session.interrupted(
            f"The connection broke while streaming ({type(exc).__name__}: {exc}). "
            "exc.partial holds what arrived; retry the request to get the full answer.",
            _now(),
        )

    def _end_of_body(self) -> None:
        """The current body ended cleanly: the result, or the error for a cut stream."""
        session = self._session
        assert session is not None
        self._exhausted = True
        if self._deadline_hit is not None:
            raise self._timeout_error(self._deadline_hit)
        self._result = session.end_of_body(_now())

    def _feed(self, data: bytes) -> list[StreamItem]:
        session = self._session
        assert session is not None
        waiting_for_first = session.last_event_at is None
        items = session.feed(data, _now())
        if waiting_for_first and session.last_event_at is not None:
            self._deadline_moved()  # first-token deadline over; the idle one starts
        if session.budget_stopped and self._result is None:
            self._result = session.result(_now())  # the stream ends here, by design
        if session.error is not None:
            if not items:
                raise session.error
            self._failure = session.error  # deliver what came before it first
        return items

    def _budget_spent(self) -> bool:
        """True once the budget stopped the stream: no more reads, no retries."""
        return self._session is not None and self._session.budget_stopped

    def _plan_budget(
        self, count: PromptCount, max_model_len: int | None, reservation: Reservation | None
    ) -> CallPlan:
        """Plan the call against its budgets (raises BudgetExceeded); sets max_tokens."""
        body = self._body
        asked = body.get("max_tokens")
        plan = plan_call(
            self._budget.budget,
            prompt_tokens=count.tokens,
            prompt_source=count.source,
            max_tokens=asked if isinstance(asked, int) else None,
            max_model_len=max_model_len,
            shared_allowance=reservation.amount if reservation is not None else None,
        )
        if plan.max_tokens is not None:
            body["max_tokens"] = plan.max_tokens
        return plan

    def _reserve_amount(self, count: PromptCount, plan: CallPlan) -> tuple[int, int]:
        """What to reserve on the shared budget: (up to, at least)."""
        shared = self._budget.shared
        assert shared is not None
        answer = plan.max_tokens if plan.max_tokens is not None else shared.limit
        return count.tokens + answer, count.tokens + 1

    def _count_locally(self, messages: list[Any]) -> PromptCount | None:
        """The prompt count without I/O, or None when the server must count it."""
        counting = self._budget.count_prompt
        if counting == "server":
            return None
        return count_prompt_tokens(messages, None if counting == "estimate" else counting)

    def _try_reserve(
        self, count: PromptCount, plan: CallPlan
    ) -> tuple[Reservation | None, float | None]:
        """One try on the shared budget: (reservation, None), or (None, seconds to wait).

        (None, None) means there is no shared budget. Raises BudgetExceeded when
        waiting is not asked for or cannot help.
        """
        shared = self._budget.shared
        if shared is None:
            return None, None
        most, least = self._reserve_amount(count, plan)
        try:
            return shared.reserve(most, minimum=least), None
        except BudgetExceeded as exc:
            if not self._budget.wait or exc.retry_after is None:
                raise
            return None, exc.retry_after

    def _open_account(
        self,
        count: PromptCount,
        max_len: int | None,
        plan: CallPlan,
        reservation: Reservation | None,
    ) -> None:
        """Re-plan within the reservation (releasing it if that fails) and keep the account."""
        if reservation is not None:
            try:
                plan = self._plan_budget(count, max_len, reservation)
            except BaseException:
                reservation.release()
                raise
        self._account = CallAccount(plan, reservation)

    def _settle_budget(self) -> None:
        if self._account is not None:
            self._account.settle(sent=self._session is not None)

    def _take_failure(self) -> None:
        failure = self._failure
        if failure is not None:
            self._failure = None
            raise failure

    # -- endings --------------------------------------------------------------

    def _record_error(self, exc: LLMStreamError) -> LLMStreamError:
        if exc.partial is None and self._session is not None:
            self._session.fail(exc, _now())
        if self._error is None:
            self._error = exc
        if exc.partial is not None:
            self._result = exc.partial
        return exc

    def _send_error(self, exc: BaseException, request: httpx.Request) -> LLMStreamError | None:
        """A request that got no response: the error to raise for it (None: ``exc`` as is)."""
        if isinstance(exc, httpx.ReadTimeout):
            # No headers in time (a proxy may hold them until the first token).
            found = self._deadline()
            return self._timeout_error(found[1] if found else "first_token")
        if isinstance(exc, httpx.HTTPError):
            return connection_error(exc, str(request.url), self._timeouts)
        return None

    def _body_done(self) -> bool:
        """The current body was read to its end: its connection need not be cut."""
        return self._exhausted or getattr(getattr(self, "_reader", None), "ended", False)

    def _end_cancelled(self) -> None:
        """The caller stopped the stream: freeze the result as it is."""
        if self._result is None and self._session is not None:
            self._result = self._session.cancel(_now())
        elif self._result is None and self._error is None:
            # Stopped before any response arrived: an empty result, not a missing one.
            self._result = StreamResult(status="cancelled", retries=max(self._attempts - 1, 0))

    def _pause_timeout(self) -> LLMStreamError:
        assert self._session is not None
        return self._session.fail(
            PauseTimeout(
                f"The stream was paused for more than max_pause={self._options.max_pause:g} s, "
                "so the request was cancelled: a paused client keeps its request's KV cache "
                "held on the server. Resume sooner, or raise max_pause.",
                partial=StreamResult(),
            ),
            _now(),
            "aborted",
        )

    def _overflow(self) -> LLMStreamError:
        assert self._session is not None
        return self._session.fail(
            BufferOverflow(
                f"The consumer fell more than buffer={self._options.buffer} chunks behind the "
                'network, and on_full="error" was asked for: the request was cancelled. '
                'Read faster, raise buffer, or use on_full="wait" for backpressure.',
                partial=StreamResult(),
            ),
            _now(),
            "aborted",
        )

    def _hit_deadline_if_due(self) -> float | None:
        """Check the deadlines; on one that passed, cut the connection so the read fails.

        Returns the seconds until the next check.
        """
        found = self._deadline()
        if found is None:
            return 1.0  # none now; one may start with the first token
        at, kind = found
        left = at - _now()
        if left > 0:
            return left
        if self._deadline_hit is None and self._live and self._reading:
            self._deadline_hit = kind
            self._cut_for_deadline()
        return 0.05  # the reader turns it into an error (and maybe a retry)

    def _cut_for_deadline(self) -> None:
        """Make the read in progress fail now (each shell knows how)."""
        raise NotImplementedError

    def _deadline_moved(self) -> None:
        """The deadline in force changed kind (once per request, not per chunk)."""


class AsyncChatStream(_StreamBase):
    """A streamed chat completion, for ``async with`` and ``async for``.

    Iterating yields the text deltas of choice 0; :meth:`chunks` yields the
    typed chunks instead. Leaving the ``async with`` block closes the
    connection at once, whatever the reason (end, ``break``, an exception,
    cancellation), so the server aborts the generation.

    Example::

        async with client.stream("Tell me a joke", max_tokens=64) as stream:
            async for text in stream:
                print(text, end="", flush=True)
        print(stream.result.metrics.time_to_first_token)
    """

    def __init__(
        self,
        client: AsyncClient,
        body: dict[str, object],
        options: StreamOptions | None = None,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        budget: BudgetOptions | None = None,
        *,
        owns_client: bool = False,
    ) -> None:
        super().__init__(
            client,
            body,
            options or StreamOptions(),
            timeouts or client.timeouts,
            retry or client.retry,
            owns_client,
            budget,
        )
        self._client = client
        self._reader: AsyncIterator[bytes] | None = None
        self._task_group: TaskGroup | None = None
        self._buffer: AsyncReadAhead[StreamItem] | None = None
        self._pump_done: anyio.Event | None = None
        self._pump_scope: anyio.CancelScope | None = None
        # The wait for a response's headers, so cancel() and aclose() can cut it short.
        self._send_scope: anyio.CancelScope | None = None
        self._watch_scope = anyio.CancelScope()
        # Wakes the watchdog when a request's first event ends its first-token wait.
        self._deadline_changed = anyio.Event()
        self._attempt_scope: anyio.CancelScope | None = None
        self._resumed = anyio.Event()
        self._response_closed = False

    async def __aenter__(self) -> AsyncChatStream:
        self._entered = True
        await self._start()
        if not (self._closed or self._cancelled):
            self._buffer = AsyncReadAhead(self._options.buffer)
            self._pump_done = anyio.Event()
            # The reader's own scope: cancelling it must never cancel the code in the
            # caller's `async with` block, which runs inside the task group's scope.
            self._pump_scope = anyio.CancelScope()
            self._task_group = anyio.create_task_group()
            await self._task_group.__aenter__()
            self._task_group.start_soon(self._pump)
            self._task_group.start_soon(self._watchdog)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.aclose()
        finally:
            task_group, self._task_group = self._task_group, None
            if task_group is not None:
                # The reader never raises (its errors go through the buffer), and
                # aclose() stopped it: leaving the group only waits for it.
                await task_group.__aexit__(None, None, None)

    def __aiter__(self) -> AsyncIterator[str]:
        return _AsyncItems(self, _text_of)

    def chunks(self) -> AsyncIterator[ChatCompletionChunk]:
        """Iterate the typed chunks (every choice, usage chunks included) instead of text.

        Example::

            async with client.stream("Hi", n=2) as stream:
                async for chunk in stream.chunks():
                    print([c.delta.content for c in chunk.choices])
        """
        return _AsyncItems(self, _chunk_of)

    async def final_result(self) -> StreamResult:
        """Read whatever is left and return the result.

        Example::

            async with client.stream("Hi") as stream:
                result = await stream.final_result()
        """
        while await self._next_item() is not None:
            pass
        return self.result

    def pause(self) -> None:
        """Stop reading from the network; what is buffered can still be consumed.

        The server is held up by TCP backpressure once the socket buffers
        fill. A pause longer than ``max_pause`` seconds cancels the request
        (:class:`~llmstream.PauseTimeout`), because vLLM keeps the request's
        KV cache for as long as the connection is open.

        Example::

            stream.pause()
            await save_checkpoint()
            stream.resume()
        """
        if not self._pause.paused:
            self._resumed = anyio.Event()
        self._pause.pause(_now())

    def resume(self) -> None:
        """Continue reading after :meth:`pause`.

        Example::

            stream.resume()
            assert not stream.paused
        """
        self._pause.resume()
        self._resumed.set()

    def cancel(self) -> None:
        """Stop now: the connection is shut down at once, iteration ends.

        Safe to call from any task of the stream's event loop; the result
        becomes the partial result with ``status == "cancelled"``. The socket
        is released when the ``async with`` block ends (or on :meth:`aclose`).

        Example::

            async for text in stream:
                if "STOP" in text:
                    stream.cancel()
        """
        if self._closed or self._cancelled:
            return
        self._cancelled = True
        self._end_cancelled()
        if self._send_scope is not None:
            self._send_scope.cancel()
        if self._response is not None and not self._body_done():
            _shutdown_socket(self._response)
        self._pending.clear()
        if self._buffer is not None:
            self._buffer.items.clear()
            self._buffer.end()
        if self._pump_scope is not None:
            self._pump_scope.cancel()
        self._resumed.set()

    async def aclose(self) -> None:
        """Close the connection now. Reading stops; the result becomes final.

        Safe to call more than once, and from a cancelled task: the close is
        shielded so the socket is always released.

        Example::

            await stream.aclose()
            stream.result.status  # "cancelled" if the answer was not finished
        """
        if self._closed:
            # Closed already, perhaps from another task while a request was on its way:
            # a response that arrived since is still released.
            with anyio.CancelScope(shield=True):
                await self._drop_response()
            return
        self._closed = True
        self._end_cancelled()
        if self._send_scope is not None:
            self._send_scope.cancel()
        if self._buffer is not None:
            self._buffer.end()
        self._settle_budget()
        with anyio.CancelScope(shield=True):
            if self._pump_scope is not None and self._pump_done is not None:
                self._pump_scope.cancel()
                await self._pump_done.wait()  # the reader closes the response on its way out
            await self._drop_response()
            if self._owns_client:
                await self._client.aclose()

    # -- reading --------------------------------------------------------------

    async def _next_item(self) -> StreamItem | None:
        pending = self._pending
        if pending:
            return pending.popleft()
        if self._buffer is not None:
            return await self._buffer.get()
        # Iterated without `async with`: no reader task, read when asked.
        while not pending:
            if self._error is not None:
                raise self._error
            if self._result is not None or self._closed or self._cancelled:
                return None
            await self._pull()
        return pending.popleft()

    async def _start(self) -> None:
        """Send the first request, retrying what fails before a response."""
        if self._attempts == 0 and self._account is None and self._budget.planned:
            try:
                await self._prepare_budget()
            except LLMStreamError as exc:
                self._record_error(exc)
                await self.aclose()
                raise
        while self._reader is None and not (self._closed or self._cancelled):
            try:
                await self._send_attempt()
            except LLMStreamError as exc:
                if await self._recover(exc):
                    continue
                self._record_error(exc)
                await self.aclose()
                raise
            except BaseException:
                # Cancelled (or worse) mid-request: `async with` will not exit, so the
                # response is released here.
                with anyio.CancelScope(shield=True):
                    await self._drop_response()
                raise

    async def _prepare_budget(self) -> None:
        """Count the prompt, check the context, reserve on the shared budget."""
        client = self._client
        body = self._body
        model = await client._model_of(body)
        messages = body["messages"]
        assert isinstance(messages, list)
        max_len = await client._context_length(model)
        count = self._count_locally(messages)
        if count is None:
            count = PromptCount(await client._count_on_server(model, messages), "server")
        plan = self._plan_budget(count, max_len, None)
        reservation = None
        while reservation is None:
            reservation, wait = self._try_reserve(count, plan)
            if reservation is None and wait is None:
                break
            if wait is not None:
                await anyio.sleep(wait)
        self._open_account(count, max_len, plan, reservation)

    async def _send_attempt(self) -> None:
        client = self._client
        timeout = self._begin_attempt()
        request = await client._request_for(self._next_body, timeout)
        found = self._deadline()
        client._request_started()  # until _drop_response, or the failure below
        try:
            with anyio.move_on_after(found[0] - _now() if found else math.inf) as scope:
                self._send_scope = scope
                response = await client._http.send(request, stream=True)
        except BaseException as exc:
            client._request_ended()
            error = self._send_error(exc, request)
            if error is None:
                raise
            raise error from exc
        finally:
            self._send_scope = None
        if scope.cancelled_caught:
            client._request_ended()
            if self._closed or self._cancelled:
                return  # cut short by cancel() or aclose(): no error, nothing to retry
            assert found is not None
            raise self._timeout_error(found[1])
        self._response = response
        self._response_closed = False
        if self._closed or self._cancelled:  # closed by another task while we waited
            await self._drop_response()
            return
        if response.status_code >= 300:
            body = await _read_capped(response)
            self._exhausted = len(body) < MAX_ERROR_BODY_BYTES  # read whole: reusable
            await self._drop_response()
            raise status_error(response.status_code, response.reason_phrase, response.headers, body)
        self._open_session(response)
        self._body_read_timeout(response)
        # The watchdog and the per-read scope of _read_with_deadline enforce the deadlines.
        self._reader = aiter_body(response, watched=True)
        self._live = True

    async def _recover(self, error: LLMStreamError) -> bool:
        """Start over (or resume) after ``error`` if the policy allows; False if not."""
        if self._closed or self._cancelled:
            return False
        event = self._plan_recovery(error)
        if event is None:
            return False
        await self._drop_response()
        if event.delay > 0:
            await anyio.sleep(event.delay)
        return not (self._closed or self._cancelled)

    async def _read_once(self, per_read_deadline: bool) -> list[StreamItem] | None:
        """One network read, decoded; None once the body has ended (the result is set)."""
        if self._failure is not None:
            self._take_failure()
        if self._budget_spent():
            return None
        reader = self._reader
        assert reader is not None
        self._reading = True
        try:
            if per_read_deadline:
                data = await self._read_with_deadline(reader)
            else:
                data = await reader.__anext__()
        except StopAsyncIteration:
            self._end_of_body()
            return None
        except httpx.HTTPError as exc:
            if self._closed or self._cancelled:
                return None  # closed by the caller while the read was waiting
            failure = self._mid_body_error(exc)
            if failure is not None:
                raise failure from exc
            self._exhausted = True
            return None
        finally:
            self._reading = False
        return self._feed(data)

    async def _read_with_deadline(self, reader: AsyncIterator[bytes]) -> bytes:
        found = self._deadline()
        with anyio.move_on_after(found[0] - _now() if found else math.inf) as scope:
            return await reader.__anext__()
        assert found is not None and scope.cancelled_caught
        raise self._timeout_error(found[1])

    async def _next_batch(self, per_read_deadline: bool = False) -> list[StreamItem] | None:
        """The next items, across retries and resumes; None at the end."""
        while True:
            try:
                if self._reader is None:
                    await self._send_attempt()
                return await self._read_once(per_read_deadline)
            except LLMStreamError as exc:
                if self._closed or self._cancelled:
                    return None
                if not await self._recover(exc):
                    raise

    async def _wait_while_paused(self) -> None:
        clock = self._pause
        while clock.paused and not self._cancelled:
            left = clock.remaining(_now())
            if left <= 0:
                raise self._pause_timeout()
            with anyio.move_on_after(left):
                await self._resumed.wait()

    async def _pull(self) -> None:
        """Without a reader task: read once because the consumer asked."""
        try:
            await self._wait_while_paused()
            if self._reader is None and self._session is None:
                await self._start()
                if self._reader is None:
                    return  # closed or cancelled while the request was on its way
            # The consumer's own time since the last read is not the server's idleness.
            self._read_started = _now()
            items = await self._next_batch(per_read_deadline=True)
        except LLMStreamError as exc:
            self._record_error(exc)
            await self.aclose()
            return
        if items:
            self._pending.extend(items)
        if items is None:
            await self.aclose()

    async def _pump(self) -> None:
        """The background reader: read ahead into the buffer until the end."""
        buffer = self._buffer
        assert buffer is not None and self._pump_done is not None and self._pump_scope
        wait_for_room = self._options.on_full == "wait" or self._options.buffer == 0
        try:
            with self._pump_scope:
                while not buffer.ended:
                    # One scope per request, so a deadline can cut the read in progress
                    # whatever the transport (no cost per chunk).
                    self._attempt_scope = scope = anyio.CancelScope()
                    with scope:
                        await self._pump_attempt(buffer, wait_for_room)
                    if not scope.cancelled_caught:
                        break
                    assert self._deadline_hit is not None
                    error = self._timeout_error(self._deadline_hit)
                    if not await self._recover(error):
                        raise error
        except LLMStreamError as exc:
            self._record_error(exc)
        except Exception as exc:  # a reader that dies must not take the caller's block down
            self._record_error(_unexpected(exc, self.snapshot()))
        finally:
            buffer.end(self._error)
            self._watch_scope.cancel()
            with anyio.CancelScope(shield=True):
                await self._drop_response()
            self._pump_done.set()

    async def _pump_attempt(self, buffer: AsyncReadAhead[StreamItem], wait_for_room: bool) -> None:
        pause = self._pause
        while not buffer.ended:
            # Checked inline: awaiting a no-op coroutine per chunk costs measurable CPU.
            held = False
            if wait_for_room and buffer.full:
                held = True
                await buffer.wait_for_room()
            if pause.paused:
                held = True
                await self._wait_while_paused()
            if held:
                self._read_started = _now()  # time held back is not the server's idleness
            items = await self._next_batch()
            if items is None:
                return
            buffer.put(items)
            if not wait_for_room and len(buffer.items) > buffer.limit:
                raise self._overflow()

    def _cut_for_deadline(self) -> None:
        if self._response is not None:
            _shutdown_socket(self._response)
        if self._attempt_scope is not None:
            self._attempt_scope.cancel()

    async def _watchdog(self) -> None:
        """Cut the connection when a deadline passes (a sibling of the reader task)."""
        t = self._timeouts
        if t.first_token is None and t.idle is None and t.total is None:
            return
        with self._watch_scope:
            while True:
                wait = self._hit_deadline_if_due()
                with anyio.move_on_after(wait if wait is not None else 1.0):
                    await self._deadline_changed.wait()
                if self._deadline_changed.is_set():
                    self._deadline_changed = anyio.Event()

    def _deadline_moved(self) -> None:
        self._deadline_changed.set()

    async def _drop_response(self) -> None:
        """Close the current response (cutting it if unread) and forget it."""
        body_done = self._body_done()
        response, self._response = self._response, None
        reader, self._reader = self._reader, None
        self._live = False
        if response is None or self._response_closed:
            return
        self._response_closed = True
        self._client._request_ended()
        if not body_done:
            _shutdown_socket(response)  # an unread body: the server must see the close now
        with anyio.CancelScope(shield=True):
            if reader is not None and hasattr(reader, "aclose"):
                await reader.aclose()
            await response.aclose()


class _AsyncItems(AsyncIterator[_T]):
    """Iterates a stream's items, picking text or chunks.

    A class rather than an async generator: an abandoned async generator is
    finalised by the event loop at some later point (and trio warns about it),
    while this holds nothing that needs finalising. Iterating a stream that was
    not entered with ``async with`` opens it on first use and closes it at the
    end of the loop or on an error; after a ``break`` call ``aclose()``, or use
    ``async with``.
    """

    __slots__ = ("_implicit", "_pick", "_stream")

    def __init__(self, stream: AsyncChatStream, pick: Callable[[StreamItem], _T | None]) -> None:
        self._stream = stream
        self._pick = pick
        self._implicit = not stream._entered

    async def __anext__(self) -> _T:
        stream = self._stream
        pick = self._pick
        buffer = stream._buffer
        while True:
            # Fast path: an item already read ahead is taken without awaiting.
            if buffer is not None and buffer.items:
                value = pick(buffer.take_now())
                if value is not None:
                    return value
                continue
            try:
                item = await stream._next_item()
            except BaseException:
                if self._implicit:
                    await stream.aclose()
                raise
            if item is None:
                if self._implicit:
                    await stream.aclose()
                raise StopAsyncIteration
            value = pick(item)
            if value is not None:
                return value


class ChatStream(_StreamBase):
    """A streamed chat completion, for ``with`` and ``for`` (the sync twin of AsyncChatStream).

    A reader thread reads ahead into the bounded buffer; the stream may be
    cancelled or closed from any thread.

    Example::

        with client.stream("Tell me a joke", max_tokens=64) as stream:
            for text in stream:
                print(text, end="", flush=True)
        print(stream.result.metrics.time_to_first_token)
    """

    def __init__(
        self,
        client: Client,
        body: dict[str, object],
        options: StreamOptions | None = None,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        budget: BudgetOptions | None = None,
        *,
        owns_client: bool = False,
    ) -> None:
        super().__init__(
            client,
            body,
            options or StreamOptions(),
            timeouts or client.timeouts,
            retry or client.retry,
            owns_client,
            budget,
        )
        self._client = client
        self._reader: Iterator[bytes] | None = None
        self._buffer: ThreadReadAhead[StreamItem] | None = None
        self._thread: threading.Thread | None = None
        self._resumed = threading.Event()
        self._resumed.set()
        self._stopping = threading.Event()  # wakes a retry's backoff on close
        # The reader thread feeds the session while the consumer may take snapshots.
        self._lock = threading.Lock()
        self._response_lock = threading.Lock()
        # The request waiting for its headers, so cancel() and close() can cut it short.
        self._header_wait: HeaderWait | None = None

    def __enter__(self) -> ChatStream:
        self._entered = True
        self._begin()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return self._iterate(_text_of)

    def chunks(self) -> Iterator[ChatCompletionChunk]:
        """Iterate the typed chunks (every choice, usage chunks included) instead of text.

        Example::

            with client.stream("Hi", n=2) as stream:
                for chunk in stream.chunks():
                    print([c.delta.content for c in chunk.choices])
        """
        return self._iterate(_chunk_of)

    def final_result(self) -> StreamResult:
        """Read whatever is left and return the result.

        Example::

            with client.stream("Hi") as stream:
                result = stream.final_result()
        """
        while self._next_item() is not None:
            pass
        return self.result

    def snapshot(self) -> StreamResult:
        """The result assembled so far, while the stream is still running.

        Example::

            for text in stream:
                if len(stream.snapshot().text) > 1000:
                    break
        """
        with self._lock:
            return super().snapshot()

    def pause(self) -> None:
        """Stop reading from the network; what is buffered can still be consumed.

        A pause longer than ``max_pause`` seconds cancels the request
        (:class:`~llmstream.PauseTimeout`): vLLM keeps the request's KV cache
        while the connection is open.

        Example::

            stream.pause()
            save_checkpoint()
            stream.resume()
        """
        self._pause.pause(_now())
        self._resumed.clear()

    def resume(self) -> None:
        """Continue reading after :meth:`pause`.

        Example::

            stream.resume()
        """
        self._pause.resume()
        self._resumed.set()

    def cancel(self) -> None:
        """Stop now, from any thread: the connection is shut down, iteration ends.

        Example::

            threading.Timer(5.0, stream.cancel).start()
        """
        if self._closed or self._cancelled:
            return
        self._cancelled = True
        with self._lock:
            self._end_cancelled()
        self._cut_connection()
        if self._buffer is not None:
            self._buffer.items.clear()
            self._buffer.end()
        self._stopping.set()
        self._resumed.set()

    def close(self) -> None:
        """Close the connection now, from any thread. Reading stops; the result becomes final.

        Example::

            stream.close()
            stream.result.status  # "cancelled" if the answer was not finished
        """
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._end_cancelled()
        self._cut_connection()
        if self._buffer is not None:
            self._buffer.end()
        self._stopping.set()
        self._resumed.set()
        with self._lock:
            self._settle_budget()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._drop_response()
        if self._owns_client:
            self._client.close()

    def _cut_connection(self) -> None:
        """Cut the request in flight, whether it waits for its headers or reads its body.

        Shutting the socket down wakes a thread blocked in recv() and tells the server at
        once; an in-process transport is woken by closing the response.
        """
        wait = self._header_wait
        if wait is not None:
            wait.cut()
        response = self._response
        if response is not None and not self._body_done() and not _shutdown_socket(response):
            response.close()

    # -- reading --------------------------------------------------------------

    def _begin(self) -> None:
        """Send the first request (with retries), then start the reader thread."""
        if self._thread is not None or self._closed:
            return
        if self._attempts == 0 and self._account is None and self._budget.planned:
            try:
                self._prepare_budget()
            except LLMStreamError as exc:
                self._record_error(exc)
                self.close()
                raise
        while self._reader is None and not (self._closed or self._cancelled):
            try:
                self._send_attempt()
            except LLMStreamError as exc:
                if self._recover(exc):
                    continue
                self._record_error(exc)
                self.close()
                raise
        if self._closed or self._cancelled:
            return
        self._buffer = ThreadReadAhead(self._options.buffer)
        self._thread = threading.Thread(target=self._pump, name="llmstream-reader", daemon=True)
        self._thread.start()

    def _iterate(self, pick: Callable[[StreamItem], _T | None]) -> Iterator[_T]:
        # A generator is fine here: a sync generator is closed as soon as it is
        # dropped, so `for ... : break` without `with` still closes the stream.
        implicit = not self._entered
        try:
            self._begin()
            while True:
                item = self._next_item()
                if item is None:
                    return
                value = pick(item)
                if value is not None:
                    yield value
        finally:
            if implicit:
                self.close()

    def _next_item(self) -> StreamItem | None:
        buffer = self._buffer
        if buffer is None:
            if self._error is not None:
                raise self._error
            return None
        return buffer.get(self._watch_deadlines)

    def _watch_deadlines(self) -> float | None:
        # Called by the consumer while it waits: it doubles as the deadline watchdog.
        t = self._timeouts
        if t.first_token is None and t.idle is None and t.total is None:
            return None
        with self._lock:
            return self._hit_deadline_if_due()

    def _prepare_budget(self) -> None:
        """Count the prompt, check the context, reserve on the shared budget."""
        client = self._client
        body = self._body
        model = client._model_of(body)
        messages = body["messages"]
        assert isinstance(messages, list)
        max_len = client._context_length(model)
        count = self._count_locally(messages)
        if count is None:
            count = PromptCount(client._count_on_server(model, messages), "server")
        plan = self._plan_budget(count, max_len, None)
        reservation = None
        while reservation is None:
            reservation, wait = self._try_reserve(count, plan)
            if reservation is None and wait is None:
                break
            if wait is not None:
                time.sleep(wait)
        self._open_account(count, max_len, plan, reservation)

    def _send_attempt(self) -> None:
        client = self._client
        timeout = self._begin_attempt()
        request = client._request_for(self._next_body, timeout)
        client._request_started()  # until _drop_response, or the failure below
        self._header_wait = wait = HeaderWait()
        if self._closed or self._cancelled:
            wait.cut()  # stopped before the wait was there to be cut
        try:
            with waiting_for_headers(wait):
                response = client._http.send(request, stream=True)
        except BaseException as exc:
            client._request_ended()
            if isinstance(exc, Exception) and (self._closed or self._cancelled):
                return  # cut short by cancel() or close(): no error, nothing to retry
            error = self._send_error(exc, request)
            if error is None:
                raise
            raise error from exc
        finally:
            self._header_wait = None
        with self._response_lock:
            self._response = response
        if self._closed or self._cancelled:
            self._drop_response()
            return
        if response.status_code >= 300:
            body = _read_capped_sync(response)
            self._exhausted = len(body) < MAX_ERROR_BODY_BYTES  # read whole: reusable
            self._drop_response()
            raise status_error(response.status_code, response.reason_phrase, response.headers, body)
        with self._lock:
            self._open_session(response)
        self._body_read_timeout(response)
        self._reader = iter_body(response)
        self._live = True

    def _recover(self, error: LLMStreamError) -> bool:
        if self._closed or self._cancelled:
            return False
        with self._lock:
            event = self._plan_recovery(error)
        if event is None:
            return False
        self._drop_response()
        if event.delay > 0:
            self._stopping.wait(event.delay)
        return not (self._closed or self._cancelled)

    def _read_once(self) -> list[StreamItem] | None:
        self._take_failure()
        if self._budget_spent():
            return None
        reader = self._reader
        assert reader is not None
        self._reading = True
        try:
            data = next(reader)
        except StopIteration:
            with self._lock:
                self._end_of_body()
            return None
        except httpx.HTTPError as exc:
            if self._closed or self._cancelled:
                return None
            with self._lock:
                failure = self._mid_body_error(exc)
            if failure is not None:
                raise failure from exc
            self._exhausted = True
            return None
        finally:
            self._reading = False
        with self._lock:
            return self._feed(data)

    def _cut_for_deadline(self) -> None:
        response = self._response
        if response is not None and not _shutdown_socket(response):
            response.close()  # an in-process transport: closing it ends the read

    def _next_batch(self) -> list[StreamItem] | None:
        while True:
            try:
                if self._reader is None:
                    self._send_attempt()
                    if self._reader is None:
                        return None  # closed meanwhile
                return self._read_once()
            except LLMStreamError as exc:
                if self._closed or self._cancelled:
                    return None
                if not self._recover(exc):
                    raise

    def _wait_while_paused(self) -> None:
        clock = self._pause
        while clock.paused and not (self._cancelled or self._closed):
            left = clock.remaining(_now())
            if left <= 0:
                with self._lock:
                    raise self._pause_timeout()
            self._resumed.wait(left)

    def _pump(self) -> None:
        """The reader thread: read ahead into the buffer until the end."""
        buffer = self._buffer
        assert buffer is not None
        wait_for_room = self._options.on_full == "wait" or self._options.buffer == 0
        try:
            while not buffer.ended:
                held = self._pause.paused or (wait_for_room and buffer.full)
                if wait_for_room:
                    buffer.wait_for_room()
                    if buffer.ended:
                        break
                self._wait_while_paused()
                if held:
                    self._read_started = _now()  # time held back is not the server's idleness
                if self._closed or self._cancelled:
                    break
                items = self._next_batch()
                if items is None:
                    break
                buffer.put(items)
                if not wait_for_room and len(buffer.items) > buffer.limit:
                    with self._lock:
                        raise self._overflow()
        except LLMStreamError as exc:
            with self._lock:
                self._record_error(exc)
        except Exception as exc:  # never let the thread die silently
            with self._lock:
                self._record_error(_unexpected(exc, super().snapshot()))
        finally:
            if self._error is not None or self._exhausted:
                self._drop_response()  # a failed stream is cancelled upstream now
            buffer.end(self._error)

    def _drop_response(self) -> None:
        with self._response_lock:
            body_done = self._body_done()
            response, self._response = self._response, None
            self._reader = None
            self._live = False
        if response is None:
            return
        self._client._request_ended()
        if not body_done:
            _shutdown_socket(response)
        response.close()


def _unexpected(exc: Exception, partial: StreamResult | None) -> LLMStreamError:
    message = f"Reading the stream failed: {type(exc).__name__}: {exc}"
    return LLMStreamError(message, partial=partial)


async def _read_capped(response: httpx.Response) -> bytes:
    body = bytearray()
    try:
        async for part in response.aiter_bytes():
            body += part
            if len(body) >= MAX_ERROR_BODY_BYTES:
                break
    except httpx.HTTPError:
        pass  # the status is the error; a body cut short still tells what it can
    return bytes(body)


def _read_capped_sync(response: httpx.Response) -> bytes:
    body = bytearray()
    try:
        for part in response.iter_bytes():
            body += part
            if len(body) >= MAX_ERROR_BODY_BYTES:
                break
    except httpx.HTTPError:
        pass
    return bytes(body)


def _shutdown_socket(response: httpx.Response) -> bool:
    """Shut the response's socket down (see :func:`shut_down`); False if it has none."""
    return shut_down(response.extensions.get("network_stream"))
