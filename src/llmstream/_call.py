"""One streamed call as a state machine fed timestamped events (sans-IO).

:class:`CallCore` makes every decision of a call: when a request is sent and with which
body, what a response, a network read, the end of a body or a transport failure means,
which of the four deadlines is due, whether a failure is retried or the answer resumed
and after how long, the pause limit, the read-ahead limit, the token budget, and how
the call ended. The async and the sync stream (the shells) only do I/O: they send what
the core says, hand it what the network did with a timestamp, and follow the
:data:`Step` it returns, the way h11 or tenacity's ``iter()`` drive their callers.

The core is fed per call, not per request: each request is an :class:`Attempt`, and an
event names the attempt it is about. Every attempt of a call feeds the one
:class:`~llmstream._session.StreamSession` that assembles the answer (a retry starts it
over, a resume continues it). Events about an attempt that is no longer the current one
are ignored, so several requests of one call may be in flight on different endpoints.

Example::

    core = CallCore(body, StreamOptions(), Timeouts(), RetryPolicy())
    attempt = core.begin_attempt(now=0.0)             # send attempt.body
    core.response(attempt, 200, headers, now=0.01)    # None: read the body
    items = core.feed(attempt, b"data: {...}\\n\\n", now=0.02)
    step = core.body_ended(attempt, now=0.5)          # Finish(result)
"""

from __future__ import annotations

import dataclasses
import math
import types
import uuid
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ._accounting import BudgetOptions, CallAccount
from ._assemble import response_headers
from ._budget import CallPlan, plan_call
from ._call_info import CallInfo
from ._call_route import CallRoute, endpoint_fault
from ._chunks import ChatCompletionChunk
from ._deadlines import DeadlineKind, Timeouts, next_deadline
from ._errors import (
    BudgetExceeded,
    BufferOverflow,
    ClientClosed,
    FirstTokenTimeout,
    IdleTimeout,
    LLMStreamError,
    OverloadedError,
    PauseTimeout,
    ProtocolError,
    StreamTimeout,
    TotalTimeout,
)
from ._events import (
    NO_ENDPOINT,
    CallEvent,
    CallFailed,
    CallFinished,
    Endpoint,
    FirstToken,
    RequestSent,
    ResponseHeaders,
)
from ._fleet_state import AttemptTicket, EndpointState, Pick
from ._flow import PauseClock, StreamOptions
from ._http_errors import status_error
from ._prompt_count import PromptCount, count_prompt_tokens
from ._request import continuation_body
from ._result import StreamResult
from ._retry import RetryEvent, RetryPolicy
from ._session import StreamItem, StreamSession
from ._sse import DEFAULT_MAX_EVENT_BYTES, DEFAULT_MAX_LINE_BYTES
from ._token_budget import Reservation

if TYPE_CHECKING:  # the transport's protocols name this module's ReadFailure
    from ._transport import AsyncResponse, HTTPRequest, SyncResponse

__all__ = [
    "Attempt",
    "CallCore",
    "Drop",
    "Fail",
    "Finish",
    "NeedContextLength",
    "NeedModel",
    "NeedPromptCount",
    "NeedWait",
    "ReadFailure",
    "Retry",
    "Step",
]

# Body fields that change the tokens of the prompt the server builds (vLLM's /tokenize
# takes the same).
# Once the answer is whole (every choice finished, or [DONE] came), only the body's end is
# awaited (usage, [DONE], the last chunk of the framing): a server that never sends it
# must not hold a finished answer for the whole idle deadline, nor have it resumed.
TRAILER_WAIT = 2.0
# A socket's timeout may end a few milliseconds before the deadline it was set from.
_TIMER_SLACK = 0.005
# An error response's body (capped at 64 KiB) comes at once from any server: a longer
# wait is a stalled or trickling peer, whose status alone is the error.
ERROR_BODY_WAIT = 10.0

_TEMPLATE_FIELDS = (
    "tools",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
)

_TIMEOUT_ERRORS: dict[DeadlineKind, type[StreamTimeout]] = {
    "first_token": FirstTokenTimeout,
    "idle": IdleTimeout,
    "total": TotalTimeout,
}


# -- what the core tells the shell to do next ------------------------------------------


@dataclass(frozen=True, slots=True)
class Retry:
    """Release the attempt, wait ``delay`` seconds (unless stopped), then begin another."""

    delay: float
    event: RetryEvent


@dataclass(frozen=True, slots=True)
class Fail:
    """The call failed: raise ``error`` to the consumer (it carries the partial result)."""

    error: LLMStreamError


class Finish:
    """The call ended without an error (complete, or stopped by its budget).

    ``result`` is the call's result, assembled when first read: a stream whose result
    nobody reads does not pay for it.
    """

    __slots__ = ("_core", "_result")

    def __init__(self, result: StreamResult | None = None, core: CallCore | None = None) -> None:
        self._result = result
        self._core = core

    @property
    def result(self) -> StreamResult:
        if self._result is None:
            assert self._core is not None, "a Finish holds a result or its call"
            self._result = self._core.result
            assert self._result is not None
        return self._result

    def __repr__(self) -> str:
        return f"Finish({self.result!r})"


@dataclass(frozen=True, slots=True)
class Drop:
    """This attempt is out of the call (it lost a race, or another took over): release it.

    The call goes on with its current attempt; only a shell that runs several attempts
    at once (hedging) ever gets this.
    """

    attempt: Attempt


Step = Retry | Fail | Finish | Drop
"""How an attempt ended, and what the shell does about it."""


@dataclass(frozen=True, slots=True)
class ReadFailure:
    """A body read that failed, in the transport's words: how, and what it said."""

    kind: Literal["timeout", "decode", "broken"]
    detail: str


# -- what planning a budgeted call needs from the network ------------------------------


@dataclass(frozen=True, slots=True)
class NeedModel:
    """Answer with the model name (the client may have to ask ``GET /models``)."""


@dataclass(frozen=True, slots=True)
class NeedContextLength:
    """Answer with the model's context length (vLLM's ``max_model_len``), or None."""

    model: str


@dataclass(frozen=True, slots=True)
class NeedPromptCount:
    """Answer with the prompt's token count from the server (vLLM's ``POST /tokenize``)."""

    model: str
    messages: list[Any]
    template: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """What else shapes the prompt: ``tools``, ``chat_template_kwargs``..., from the body."""


@dataclass(frozen=True, slots=True)
class NeedWait:
    """Wait ``seconds`` (a shared budget has no room yet), then answer None."""

    seconds: float


Need = NeedModel | NeedContextLength | NeedPromptCount | NeedWait


# -- one request of the call ------------------------------------------------------------


class Attempt:
    """One request of a call: its number, body, timing and where its body stands.

    Example::

        attempt = core.begin_attempt(now)
        attempt.body, attempt.header_deadline
    """

    __slots__ = (
        "awaiting_headers",
        "body",
        "body_done",
        "endpoint",
        "failed",
        "header_deadline",
        "headers",
        "hedge",
        "lost",
        "number",
        "reading",
        "session",
        "started",
        "target",
        "ticket",
    )

    def __init__(
        self,
        number: int,
        body: dict[str, object],
        started: float,
        headers: Mapping[str, str],
        endpoint: str | None = None,
        hedge: bool = False,
    ) -> None:
        self.number = number
        """1 for the first request of the call, 2 for the next..."""
        self.body = body
        """The JSON body to send."""
        self.headers = headers
        """Headers to send besides the client's (they win over the client's)."""
        self.started = started
        self.header_deadline: tuple[float, DeadlineKind] | None = None
        """When the wait for the response headers must end, and which deadline that is."""
        self.body_done = False
        """True once the body was read to its end: the connection need not be cut."""
        self.failed = False
        """True once it failed (the call then retries, resumes or fails)."""
        self.reading = False
        """True while a network read of this attempt is in progress (deadlines cut it)."""
        self.awaiting_headers = True
        """True until its response's headers came or its send failed (deadlines cut it)."""
        self.endpoint = endpoint
        """Where the shell sends it (None: the client's base URL)."""
        self.hedge = hedge
        """True for a request sent beside the current one, racing it to the first token."""
        self.lost = False
        """True once another attempt won the call: the shell cuts and releases this one."""
        self.session: StreamSession | None = None
        """A racing attempt's own session, until it wins (then it is the call's)."""
        self.target: EndpointState | None = None
        """The fleet endpoint it goes to (None: the client's one base URL)."""
        self.ticket: AttemptTicket | None = None
        """Its place in the fleet's in-flight count and health (released once)."""


class CallCore:
    """Every decision of one streamed call; see the module docstring.

    Example::

        core = CallCore(body, options, timeouts, retry)
        attempt = core.begin_attempt(now)
    """

    def __init__(
        self,
        body: dict[str, object],
        options: StreamOptions,
        timeouts: Timeouts,
        retry: RetryPolicy,
        budget: BudgetOptions | None = None,
        *,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        observer: Callable[[CallEvent], object] | None = None,
        headers: Mapping[str, str] | None = None,
        endpoint: Endpoint = NO_ENDPOINT,
        route: CallRoute | None = None,
    ) -> None:
        self.body = body
        self.headers: Mapping[str, str] = headers or {}
        """Headers of this call's own (``extra_headers``), sent with every attempt."""
        self.options = options
        self.timeouts = timeouts
        self.retry = retry
        self.budget = budget or BudgetOptions()
        self._limits = (max_line_bytes, max_event_bytes)
        self._observer = observer
        self._endpoint = endpoint
        self._info: CallInfo | None = None
        self._ended_told = False  # the one CallFinished or CallFailed was emitted
        self.pause_clock = PauseClock(options.max_pause)
        self.account: CallAccount | None = None
        self.session: StreamSession | None = None
        self.current: Attempt | None = None
        self._result: StreamResult | None = None
        # A complete stream's result, not assembled yet: (its session, when it ended).
        self._result_of: tuple[StreamSession, float] | None = None
        self.error: LLMStreamError | None = None
        """The error that ended the call, if one did."""
        self.stopped: Literal["closed", "cancelled"] | None = None
        """Set once the caller stopped the call: nothing more is sent or read."""
        self.step: Step | None = None
        """Set by :meth:`feed` when the attempt must end (an error, the budget)."""
        spans = [t for t in (timeouts.first_token, timeouts.idle) if t is not None]
        self._check_every = min(spans, default=math.inf)  # see deadline_due()
        self._next_body = body
        self._attempts = 0
        self._started = 0.0
        self._read_started = 0.0
        self._deadline_hit: DeadlineKind | None = None
        self._planned = False
        self._racing: list[Attempt] = []  # hedges sent beside the current attempt
        self.route = route
        """Over a fleet: where each request goes (None: the client's one base URL)."""
        self._pick: Pick | None = None  # the endpoint admit() chose for the next request
        self._admit_since: float | None = None  # when admission started waiting for room
        # When the call first asked for an endpoint: the total deadline counts from there,
        # a wait for room before the first request included.
        self._asked_at: float | None = None
        self._retries = self.retry.start_call(0.0)  # replaced when the first attempt begins

    # -- state ---------------------------------------------------------------------

    @property
    def attempts(self) -> int:
        """How many requests the call has begun."""
        return self._attempts

    @property
    def result(self) -> StreamResult | None:
        """The final result, once the call ended (complete, cancelled, or with an error).

        A complete stream's result is assembled on first use (five pydantic models, a
        sixth of what a short stream costs): a relay that never reads it does not pay.
        """
        result = self._result
        if result is None and self._result_of is not None:
            session, ended = self._result_of
            result = self._result = session.result(ended)
            self._result_of = None
        return result

    @result.setter
    def result(self, result: StreamResult) -> None:
        self._result = result
        self._result_of = None

    @property
    def has_result(self) -> bool:
        """Whether :attr:`result` is set, without assembling it."""
        return self._result is not None or self._result_of is not None

    @property
    def ended(self) -> bool:
        """True once the call has a final result or error, or was stopped."""
        return self.has_result or self.error is not None or self.stopped is not None

    def snapshot(self, now: float) -> StreamResult:
        """The result so far (the final one once the call ended)."""
        if self.result is not None:
            return self.result
        if self.session is None:
            # Nothing streamed: failed before a response, or not started yet.
            return StreamResult(status="error" if self.error is not None else "streaming")
        return self.session.result(now)

    @property
    def info(self) -> CallInfo:
        """Which call this is, for events: made on first use (the model is known by then)."""
        info = self._info
        if info is None:
            model = self.body.get("model")
            endpoint = self._endpoint
            info = self._info = CallInfo(
                uuid.uuid4().hex,
                model if isinstance(model, str) else None,
                endpoint.url,
                endpoint.address,
                endpoint.port,
            )
        return info

    def _emit(self, event: CallEvent) -> None:
        observer = self._observer
        if observer is not None:
            observer(event)

    def _emit_end(self, now: float, error: LLMStreamError | None) -> None:
        """The call's one CallFinished or CallFailed, whatever path ends it."""
        if self._ended_told or self._observer is None:
            return
        self._ended_told = True
        session = self.session
        gaps = session.chunk_gaps() if session is not None else ()
        if error is None:
            assert self.result is not None
            self._emit(CallFinished(self.info, now, self._attempts, self.result, gaps))
        else:
            partial = error.partial or StreamResult(status="error")
            self._emit(CallFailed(self.info, now, self._attempts, error, partial, gaps))

    # -- planning a budgeted call --------------------------------------------------

    def plan(self) -> Generator[Need, object, None]:
        """Count the prompt, check the budgets and the context, reserve on a shared budget.

        A generator of what it needs from the network: the shell answers each
        :data:`Need` with ``send()``. Does nothing when the call has no budget and
        counts its prompt locally. A prompt that the budget alone refuses is refused
        before any request: only the context length needs ``GET /models``.

        Example::

            planner = core.plan()
            need = next(planner)          # NeedModel()
            need = planner.send("Qwen/Qwen3-8B")
        """
        if self._planned or not self.budget.planned:
            return
        self._planned = True
        body = self.body
        messages = body["messages"]
        assert isinstance(messages, list)
        count = self._count_locally(messages)
        if count is not None:
            self._plan_budget(count, None, None)  # the budget alone: no I/O
        model = body.get("model")
        if not isinstance(model, str):
            model = yield NeedModel()
            assert isinstance(model, str)
            body["model"] = model
        if count is None:
            template = {k: body[k] for k in _TEMPLATE_FIELDS if body.get(k) is not None}
            counted = yield NeedPromptCount(model, messages, template)
            assert isinstance(counted, int)
            count = PromptCount(counted, "server")
        max_len = yield NeedContextLength(model)
        assert max_len is None or isinstance(max_len, int)
        plan = self._plan_budget(count, max_len, None)
        reservation = None
        shared = self.budget.shared
        if shared is not None:
            most, least = self._reserve_amount(count, plan)
            while reservation is None:
                try:
                    reservation = shared.reserve(most, minimum=least)
                except BudgetExceeded as exc:
                    if not self.budget.wait or exc.retry_after is None:
                        raise
                    yield NeedWait(exc.retry_after)
            try:
                plan = self._plan_budget(count, max_len, reservation)
            except BaseException:
                reservation.release()
                raise
        self.account = CallAccount(plan, reservation)

    def _count_locally(self, messages: list[Any]) -> PromptCount | None:
        counting = self.budget.count_prompt
        if counting == "server":
            return None
        return count_prompt_tokens(messages, None if counting == "estimate" else counting)

    def _plan_budget(
        self, count: PromptCount, max_model_len: int | None, reservation: Reservation | None
    ) -> CallPlan:
        body = self.body
        asked = body.get("max_tokens")
        plan = plan_call(
            self.budget.budget,
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
        shared = self.budget.shared
        assert shared is not None
        answer = plan.max_tokens if plan.max_tokens is not None else shared.limit
        return count.tokens + answer, count.tokens + 1

    # -- attempts ------------------------------------------------------------------

    def admit(self, now: float) -> float | None:
        """Over a fleet, before each request: choose its endpoint. None: go on.

        A float is the seconds to wait before asking again: every candidate endpoint is
        saturated or down and :class:`~llmstream.Admission` allows waiting. Past that
        wait (at once, by default) the call fails with :class:`~llmstream.OverloadedError`
        instead of piling onto a backlog. Without a fleet: always None.
        """
        route = self.route
        if route is None or self._pick is not None:
            return None
        if self._asked_at is None:
            self._asked_at = now
        chosen = route.pick(now)
        if not isinstance(chosen, float):
            self._pick = chosen
            self._admit_since = None
            return None
        if self._admit_since is None:
            self._admit_since = now
        left = route.state.fleet.admission.wait - (now - self._admit_since)
        total = self.timeouts.total
        if total is not None:
            began = self._started if self._attempts else self._asked_at
            left = min(left, began + total - now)
        if math.isinf(chosen) or left <= 0:
            retry_after = None if math.isinf(chosen) else chosen
            raise OverloadedError(
                "Every endpoint that could take this call is saturated (its waiting queue "
                "or KV cache at the admission limits) or down"
                + (f"; one may have room in about {chosen:.2f} s" if retry_after else "")
                + ". Retry later, add replicas, or let calls wait with "
                "Fleet(admission=Admission(wait=...)).",
                retry_after=retry_after,
                partial=self.snapshot(now),
            )
        return min(chosen, left)

    def hedge_due(self, now: float) -> float | None:
        """Seconds until a hedge of the current request is due (None: no hedge for it).

        Only over a fleet with hedging on, before any output, once per call. A shell
        waits this long, then asks again, and sends the hedge once it is 0 or less: what
        the fleet learns meanwhile may move it (see :meth:`FleetState.hedge_at`).
        """
        route = self.route
        current = self.current
        if route is None or current is None or self._racing or self._has_output():
            return None
        delay = route.hedge_delay(now)
        if delay is None:
            return None
        if current.ticket is None:
            return current.started + delay - now
        return route.state.hedge_at(current.ticket, delay, now) - now

    def begin_hedge(self, now: float) -> Attempt | None:
        """The hedge to send now beside the current request, if the fleet allows one."""
        route = self.route
        current = self.current
        if route is None or current is None or self._racing or self._has_output():
            return None
        if current.ticket is not None:
            current.ticket.late()  # routing avoids its endpoint, hedge or no hedge
        pick = route.hedge(now, current.target)
        if pick is None:
            return None
        if self.session is not None:
            self.session.hedged = True  # also when the current request wins after all
        self._pick = pick
        return self.begin_attempt(now, hedge=True)

    def begin_attempt(
        self, now: float, *, endpoint: str | None = None, hedge: bool = False
    ) -> Attempt:
        """A new request is about to be sent: its body and how long to wait for headers.

        Until the response headers arrive (vLLM sends them at once; a proxy may hold
        them until the first token) the first-token deadline applies, or what is left
        of the total. ``endpoint`` says where it goes, for the shell and the events.

        ``hedge=True`` sends it beside the current attempt instead of after it (only
        before any output): the first of them whose body brings an event becomes the
        call's attempt, the others are lost (:attr:`Attempt.lost`) and must be cut.
        """
        if hedge and (self.current is None or self._has_output()):
            raise RuntimeError("a hedge races the current attempt before any output")
        if self._attempts == 0:
            began = self._started = self._asked_at if self._asked_at is not None else now
            total = self.timeouts.total
            self._retries = self.retry.start_call(
                began, deadline=began + total if total is not None else None
            )
        self._attempts += 1
        body = self._next_body
        pick, self._pick = self._pick, None
        ticket = None
        if pick is not None:
            assert self.route is not None
            target = pick.endpoint
            endpoint = target.url
            ticket = self.route.started(pick, now)
            if body.get("model") != target.model:
                body = {**body, "model": target.model}  # a fallback model, or the replica's
        attempt = Attempt(self._attempts, body, now, self.headers, endpoint, hedge)
        if pick is not None:
            attempt.target = pick.endpoint
            attempt.ticket = ticket
        if hedge:
            self._racing.append(attempt)
        else:
            self._lose_racers(now)
            self.current = attempt
            self._read_started = now
            self._deadline_hit = None
            self.step = None
        found = self.deadline()
        if hedge and self.timeouts.first_token is not None:
            # Its own first-token deadline, or the call's total, whichever comes first.
            own = (now + self.timeouts.first_token, "first_token")
            found = own if found is None or own[0] < found[0] else found  # type: ignore[assignment]
        attempt.header_deadline = found
        if self._observer is not None:
            shown = types.MappingProxyType(attempt.body)
            self._emit(RequestSent(self.info, now, attempt.number, shown, endpoint, hedge))
        return attempt

    def answering(self, attempt: Attempt) -> bool:
        """Whether ``attempt`` is the call's and has brought an event (it won any race)."""
        session = self.session
        return attempt is self.current and session is not None and session.last_event_at is not None

    def _has_output(self) -> bool:
        session = self.session
        return session is not None and session.has_output

    def _lose_racers(self, now: float, winner: Attempt | None = None) -> None:
        for racer in self._racing:
            self._lose(racer, now, winner)
        self._racing.clear()

    def _lose(self, attempt: Attempt, now: float, winner: Attempt | None) -> None:
        """``attempt`` lost a race to another one of this call: it is cut, and charged.

        Overtaken (``winner`` was sent after it and answered first) says its endpoint is
        slow; a hedge cut because the request it backed answered says nothing.
        """
        attempt.lost = True
        if attempt.ticket is not None:
            overtaken = winner is not None and winner.started > attempt.started
            attempt.ticket.lost(now, overtaken=overtaken)
        _release(attempt)
        if self.account is not None:
            # Its server read and prefilled the prompt before the cut.
            self.account.lost_request()

    def _answered(self, attempt: Attempt, now: float) -> None:
        """The attempt's first event arrived: its endpoint answers (health, TTFT, resume)."""
        ticket = attempt.ticket
        if ticket is not None and self.route is not None:
            ticket.first_token(now)
            self.route.answering(ticket)

    def _release_all(self) -> None:
        """The call ended: no attempt of it is in flight any more (fleet counts)."""
        if self.current is not None:
            _release(self.current)
        for racer in self._racing:
            _release(racer)

    def _take_over(self, winner: Attempt, now: float) -> None:
        """A racing attempt brought the call's first event: it becomes the call's attempt."""
        loser = self.current
        if loser is not None:
            self._lose(loser, now, winner)
        self._racing.remove(winner)
        self._lose_racers(now, winner)
        session = winner.session
        assert session is not None
        session.retries = self.session.retries if self.session is not None else 0
        session.account = self.account
        self.current = winner
        self.session = session
        self._read_started = winner.started
        self._deadline_hit = None
        self.step = None

    def _is_current(self, attempt: Attempt) -> bool:
        return attempt is self.current and self.stopped is None

    def send_failed(self, attempt: Attempt, error: LLMStreamError | None, now: float) -> Step:
        """The request got no response: ``error`` says why (None: its header wait ran out)."""
        attempt.awaiting_headers = False
        found = attempt.header_deadline
        if found is not None and now >= found[0] - _TIMER_SLACK:
            # The header deadline passed: whatever ended the wait (the connect limit set
            # from it, the connection cut by deadline_due) stood in for that deadline.
            error = None
        if error is None:
            error = self.timeout_error(found[1] if found is not None else "first_token", now)
        return self._after_failure(attempt, error, now)

    def response(
        self, attempt: Attempt, status: int, headers: Mapping[str, str], now: float
    ) -> Step | None:
        """The response headers arrived. None: read the body as a stream.

        For a status of 300 and up the shell reads the (capped) error body and calls
        :meth:`error_response`.
        """
        attempt.awaiting_headers = False
        if self._observer is not None:
            shown = response_headers(headers)
            self._emit(ResponseHeaders(self.info, now, attempt.number, status, shown))
        if status >= 300:
            return None
        if attempt.hedge and attempt is not self.current:
            if attempt.lost:
                return Drop(attempt)
            session = attempt.session = self._new_session()
        elif self.session is not None:
            session = self.session
        else:
            session = self.session = self._new_session()
            session.retries = self._attempts - 1  # attempts that failed before a response
            session.account = self.account
        session.headers(now, headers)
        session.endpoint = attempt.endpoint or self._endpoint.url or None
        session.hedged = self.route is not None and self.route.hedged
        content_type = headers.get("content-type", "")
        if not content_type.lower().startswith("text/event-stream"):
            error = session.fail(
                ProtocolError(
                    f"The server answered {status} with content type "
                    f"{content_type or 'none'!r}, not text/event-stream: this is not a "
                    "streaming chat completion endpoint. Check the base URL (it usually "
                    "ends in /v1) and that the server speaks the OpenAI protocol."
                ),
                now,
            )
            return self._after_failure(attempt, error, now)
        return None

    def _new_session(self) -> StreamSession:
        max_line, max_event = self._limits
        options = self.options
        return StreamSession(
            started=self._started,
            max_line_bytes=max_line,
            max_event_bytes=max_event,
            max_chunks=options.max_chunks,
            max_bytes=options.max_bytes,
        )

    def error_body_wait(self, now: float) -> float:
        """Seconds a shell may spend reading an error response's body (status 300 and up).

        The total deadline bounds it, and :data:`ERROR_BODY_WAIT` when there is none: a
        server that sends error headers, then trickles (or withholds) the body, would
        hold the call for as long as it likes, as a transport's read timeout restarts
        with each byte. Cut at this time, the body read so far is the body.

        Example::

            body = await response.read(MAX_ERROR_BODY_BYTES)  # within error_body_wait(now)
        """
        wait = ERROR_BODY_WAIT
        total = self.timeouts.total
        if total is not None:
            wait = min(wait, self._started + total - now)
        return max(wait, 0.0)

    def refused(
        self,
        attempt: Attempt,
        response: AsyncResponse | SyncResponse,
        body: bytes,
        request: HTTPRequest,
        now: float,
    ) -> Step:
        """:meth:`error_response` for a transport's response to ``request``."""
        return self.error_response(
            attempt,
            response.status_code,
            response.reason_phrase,
            response.headers,
            body,
            now,
            method=request.method,
            url=request.url,
        )

    def error_response(
        self,
        attempt: Attempt,
        status: int,
        reason: str,
        headers: Mapping[str, str],
        body: bytes,
        now: float,
        *,
        method: str | None = None,
        url: str | None = None,
    ) -> Step:
        """A non-2xx response and its (capped) body: retry, or fail with the status error.

        ``method`` and ``url`` name the request in the error's message.
        """
        error = status_error(status, reason, headers, body, method=method, url=url)
        return self._after_failure(attempt, error, now)

    def feed(self, attempt: Attempt, data: bytes, now: float) -> list[StreamItem]:
        """One network read of the body: the chunks it completed, to deliver in order.

        When the attempt must end (an error event, bad bytes, a limit, the budget),
        :attr:`step` is set: deliver the items, then follow the step.
        """
        session = self.session
        if self.stopped is not None or self.error is not None:
            # The result was made final when the call stopped or failed: a read that
            # completes after that (on the reader's thread, or a task the stop could not
            # reach in time) must not hand the consumer text the result does not hold.
            return []
        if attempt is not self.current:
            return self._feed_racer(attempt, data, now)
        if session is None:
            return []
        waiting_for_first = session.last_event_at is None
        items = session.feed(data, now)
        if waiting_for_first and session.last_event_at is not None:
            self._lose_racers(now, attempt)  # the current attempt answered first
            self._answered(attempt, now)
            if self._observer is not None:
                self._emit(FirstToken(self.info, now, attempt.number))
        if session.error is not None:
            error, session.error = session.error, None
            self.step = self._after_failure(attempt, error, now)
        elif session.budget_stopped:
            # Deliver what arrived, read no further: the shell cuts the connection now,
            # so the server stops generating.
            self.step = self._finish(session.result(now), now)
        return items

    def _feed_racer(self, attempt: Attempt, data: bytes, now: float) -> list[StreamItem]:
        session = attempt.session
        if attempt.lost or attempt not in self._racing or session is None:
            attempt.lost = True
            return []
        items = session.feed(data, now)
        if session.last_event_at is None and session.error is None:
            return items  # no event yet: the race goes on
        self._take_over(attempt, now)
        self._answered(attempt, now)
        account = self.account
        if account is not None:
            # Metered from here on; what this read brought is counted now.
            for chunk, text in items:
                account.observe(chunk, bool(text) or _carries_output(chunk))
        if self._observer is not None:
            self._emit(FirstToken(self.info, now, attempt.number))
        if session.error is not None:
            error, session.error = session.error, None
            self.step = self._after_failure(attempt, error, now)
        return items

    def body_ended(self, attempt: Attempt, now: float) -> Step:
        """The body ended cleanly: the result, or what to do about a stream cut short."""
        attempt.body_done = True
        if self.error is not None:
            return Fail(self.error)  # a deadline ended the call while the reader was held
        session = self.session
        assert session is not None
        if self._deadline_hit is not None and not self._answer_whole(session):
            return self._after_failure(attempt, self.timeout_error(self._deadline_hit, now), now)
        try:
            session.end(now)
        except LLMStreamError as exc:
            return self._after_failure(attempt, exc, now)
        if self.account is not None:
            # Its token report reads the account, which settling changes: assembled now.
            return self._finish(session.result(now), now)
        return self._finish(None, now, session)

    def read_failed(self, attempt: Attempt, failure: ReadFailure | None, now: float) -> Step:
        """A body read failed (None: it was cut by :meth:`deadline_due`)."""
        if self.error is not None:
            return Fail(self.error)  # a deadline ended the call while the reader was held
        session = self.session
        assert session is not None
        if self._answer_whole(session):
            # Every choice had finished, or [DONE] came: whatever cut the read (a deadline,
            # the server) cut only the body's end, and a resume would repeat the answer.
            self._deadline_hit = None
            if session.all_finished:
                attempt.body_done = True
                return self._finish(session.finish(now), now)
            return self.body_ended(attempt, now)  # [DONE] before a finish: cut short
        error: LLMStreamError
        if self._deadline_hit is not None:
            error = self.timeout_error(self._deadline_hit, now)
        elif failure is None or failure.kind == "timeout":
            found = self.deadline()  # which deadline the transport's backstop stood in for
            error = self.timeout_error(found[1] if found is not None else "idle", now)
        elif failure.kind == "decode":
            error = session.fail(
                ProtocolError(f"Could not decode the response body: {failure.detail}"), now
            )
        else:
            error = session.interrupted(
                f"The connection broke while streaming ({failure.detail}). "
                "exc.partial holds what arrived; retry the request to get the full answer.",
                now,
            )
        return self._after_failure(attempt, error, now)

    def _after_failure(self, attempt: Attempt, error: LLMStreamError, now: float) -> Step:
        """Retry, resume or fail after ``error`` ended ``attempt``."""
        attempt.failed = True
        ticket = attempt.ticket
        if ticket is not None:
            if self.stopped is None:
                ticket.failed(now, counts=endpoint_fault(error))
            ticket.release()
        if self.stopped is not None:
            # Stopped by the caller, who is not told of what failed afterwards.
            return Finish(self.snapshot(now))
        if attempt is not self.current:
            attempt.lost = True  # a racer that failed: the others go on
            if attempt in self._racing:
                self._racing.remove(attempt)
            return Drop(attempt)
        if self._racing and not self._has_output():
            # The current attempt failed before any output while a hedge still races:
            # the hedge carries the call on instead of a retry.
            attempt.lost = True
            promoted = self._racing.pop(0)
            self.current = promoted
            self.session = promoted.session
            if self.session is not None:
                self.session.account = self.account
            promoted.hedge = False
            self._read_started = now
            self._deadline_hit = None
            return Drop(attempt)
        if attempt is self.current:
            event = self._plan_recovery(error, now)
            if event is not None:
                return Retry(event.delay, event)
        return self.fail(error, now)

    def _plan_recovery(self, error: LLMStreamError, now: float) -> RetryEvent | None:
        """Whether and how to try again after ``error``; sets the next request's body.

        The delays come from the call's one tenacity state (:class:`~llmstream.CallRetries`),
        which also keeps a wait from reaching the total deadline.
        """
        retries = self._retries
        session = self.session
        if session is not None and session.has_output:
            if not self.retry.resume:
                return None  # a retry would repeat what was delivered
            partial = session.result(now)
            if partial.tool_calls or len(partial.choices) != 1:
                return None  # only plain text of a single choice can be continued
            body = continuation_body(self.body, partial.text, session.completion_tokens())
            if body is None:
                return None
            delay = retries.resume_delay(error, now)
            if delay is None:
                return None
            event = RetryEvent("resume", self._attempts + 1, delay, error, self.info, now)
        else:
            route = self.route
            if route is not None and self.retry.retryable(error) and route.has_untried(now):
                delay = 0.0  # another endpoint: no backoff, and no retry of the policy spent
            else:
                delay = retries.retry_delay(error, now)
                if delay is None:
                    return None
                if route is not None:
                    route.new_round()
            body = self.body
            event = RetryEvent("retry", self._attempts + 1, delay, error, self.info, now)
        self._next_body = body
        if session is not None:
            session.new_attempt(resume=event.kind == "resume")
        self.retry.announce(event)
        self._emit(event)
        return event

    # -- endings -------------------------------------------------------------------

    def _finish(
        self, result: StreamResult | None, now: float, session: StreamSession | None = None
    ) -> Finish:
        """End the call; ``result`` None: ``session``'s, assembled when first read."""
        current = self.current
        if current is not None and current.ticket is not None:
            current.ticket.succeeded(now)
        self._release_all()
        if not self.has_result:
            if result is not None:
                self._result = result
            else:
                assert session is not None
                self._result_of = (session, now)
            self._emit_end(now, None)
        return Finish(core=self)

    def fail(self, error: LLMStreamError, now: float) -> Fail:
        """End the call with ``error`` (the first error wins); it carries the partial result."""
        if error.partial is None and self.session is not None:
            self.session.fail(error, now)
        self._release_all()
        if self.error is None:
            self.error = error
            if not self.has_result and error.partial is not None:
                self.result = error.partial
            self._emit_end(now, error)
        return Fail(self.error)

    def stop(self, how: Literal["closed", "cancelled"], now: float) -> bool:
        """The caller stopped the call; the result becomes final. False if it had been."""
        if self.stopped is not None:
            if how == "closed":
                self.stopped = how
            return False
        self.stopped = how
        self._release_all()
        if not self.has_result and self.session is not None:
            self.result = self.session.cancel(now)
        elif not self.has_result and self.error is None:
            # Stopped before any response arrived: an empty result, not a missing one.
            self.result = StreamResult(status="cancelled", retries=max(self._attempts - 1, 0))
        if self.error is not None:
            self._emit_end(now, self.error)
        elif self.has_result:
            self._emit_end(now, None)
        return True

    def client_closed(self, now: float) -> bool:
        """The client was closed under the call: it fails with ClientClosed, and stops.

        Nothing more is sent or read (the shell cuts the connection); the consumer gets
        what was handed over, then the error. False when the call had ended already.
        """
        if self.ended:
            return False
        error = ClientClosed(
            "The client was closed while this stream was in flight, so its request was "
            "cancelled. exc.partial holds what arrived. Close the client only after its "
            "streams end.",
            partial=StreamResult(status="aborted", retries=max(self._attempts - 1, 0)),
        )
        if self.session is not None:
            self._abort(error, now)
        else:
            self.fail(error, now)
        self.stopped = "cancelled"
        return True

    def settle(self) -> None:
        """Charge the shared budget for what the call used (or release it). Once."""
        if self.account is not None:
            self.account.settle(sent=self.session is not None)

    # -- time ----------------------------------------------------------------------

    def deadline(self) -> tuple[float, DeadlineKind] | None:
        """The earliest deadline in force now, and its kind."""
        session = self.session
        last = session.last_event_at if session is not None else None
        attempt = self.current
        found = next_deadline(
            self.timeouts,
            started=self._started,
            attempt_started=attempt.started if attempt is not None else self._started,
            # Time the reader spent held back (full buffer, pause) is not idleness.
            last_event_at=max(last, self._read_started) if last is not None else None,
        )
        if last is not None and session is not None and self._answer_whole(session):
            trailer = max(last, self._read_started) + TRAILER_WAIT
            if found is None or trailer < found[0]:
                found = (trailer, "idle")
        return found

    @staticmethod
    def _answer_whole(session: StreamSession) -> bool:
        """Every choice finished, or the server said it is done: nothing more to deliver."""
        return session.done or session.all_finished

    @property
    def body_read_backstop(self) -> float | None:
        """The transport's own read timeout once the body streams.

        The call's deadlines are watched beside the reads; this only bounds a read
        that nothing else would end. None: a read may legitimately wait forever.
        """
        t = self.timeouts
        if t.first_token is None or t.idle is None:
            return None
        return max(t.first_token, t.idle)

    @property
    def watches_deadlines(self) -> bool:
        """False when no deadline can ever be due (every one is None)."""
        t = self.timeouts
        return not (t.first_token is None and t.idle is None and t.total is None)

    def reading_resumed(self, now: float) -> None:
        """The reader was held back (full buffer, pause) and reads again now."""
        self._read_started = now

    def deadline_due(self, now: float) -> float | Attempt:
        """Check the deadlines: seconds until the next check, or the attempt to cut now.

        A deadline that passes while a body read waits makes that read fail: the shell
        cuts the attempt's connection, and the failed read becomes the timeout error.
        """
        found = self.deadline()
        if found is None:
            return 1.0  # none now; one may start with the first token
        at, kind = found
        left = at - now
        if left > 0:
            # Checked at least once per the shorter of first_token and idle: a deadline
            # that starts later (the idle one after an event, the next request's first
            # token) then never comes before the check timed now, which need not move.
            return min(left, self._check_every)
        attempt = self.current
        if self._deadline_hit is None and attempt is not None and attempt.reading:
            self._deadline_hit = kind
            return attempt
        if attempt is not None and attempt.awaiting_headers:
            # A server that trickles bytes (or sends 100 Continue without end) keeps a
            # transport's read timeout from ever firing: the wait for headers is cut, and
            # send_failed() makes the failed send this deadline's error.
            found = attempt.header_deadline
            if found is not None and now >= found[0]:
                return attempt
        elif kind == "total" and attempt is not None and self._held_past_total(attempt, now):
            return attempt  # the call failed: the shell cuts the connection, wakes the reader
        return 0.05  # the reader turns it into an error (and maybe a retry)

    def _held_past_total(self, attempt: Attempt, now: float) -> bool:
        """Fail the call if the total deadline passed while its reader was held back.

        A paused stream, a full buffer with ``on_full="wait"``, or a consumer that has
        not asked for more (``buffer=0``): no read is in progress for a deadline to cut,
        and the server keeps generating into the socket's buffers meanwhile. The total
        deadline bounds the call whatever holds it up, so it ends here.
        """
        if attempt.reading or attempt.body_done or attempt.failed or self._racing:
            return False
        if self.error is not None:
            return False  # told once; the reader reports it
        return self.held_expired(now) is not None

    def timeout_error(self, kind: DeadlineKind, now: float) -> LLMStreamError:
        """The error for a deadline that passed, with the partial result."""
        t = self.timeouts
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
        if self.session is None:
            return error_type(message, partial=StreamResult(status="interrupted"))
        return self.session.interrupted(message, now, error_type)

    # -- flow control --------------------------------------------------------------

    def held_expired(self, now: float) -> Fail | None:
        """While the reader is held back: the failure that ends the call now, if any.

        Held back by a pause, a full buffer (``on_full="wait"``) or a consumer that
        has not asked for more: the idle and first-token deadlines do not count that
        time (it is not the server's), but the total deadline does, and a pause is
        capped by ``max_pause``. Also the error that already ended the call, if one did.

        Example::

            expired = core.held_expired(now)
            if expired is not None:
                raise expired.error
        """
        if self.error is not None:
            return Fail(self.error)
        session = self.session
        if self.stopped is not None or self.has_result or session is None:
            return None
        total = self.timeouts.total
        if total is not None and now >= self._started + total and not self._answer_whole(session):
            # Whole answers wait for their body's end (TRAILER_WAIT): the result stands.
            self._deadline_hit = "total"
            return self.fail(self.timeout_error("total", now), now)
        if self.pause_clock.paused:
            return self.pause_expired(now)
        return None

    def held_wait(self, now: float) -> float | None:
        """Seconds a held-back reader may wait before :meth:`held_expired` is due again.

        None: no limit (not paused, and no total deadline).
        """
        wait: float | None = None
        if self.pause_clock.paused:
            wait = self.pause_clock.remaining(now)
        total = self.timeouts.total
        if total is not None:
            left = max(0.0, self._started + total - now)
            wait = left if wait is None else min(wait, left)
        return wait

    def pause_expired(self, now: float) -> Fail | None:
        """While paused: the failure once the pause has lasted longer than ``max_pause``."""
        if self.pause_clock.remaining(now) > 0:
            return None
        return self._abort(
            PauseTimeout(
                f"The stream was paused for more than max_pause={self.options.max_pause:g} s, "
                "so the request was cancelled: a paused client keeps its request's KV cache "
                "held on the server. Resume sooner, or raise max_pause.",
                partial=StreamResult(),
            ),
            now,
        )

    def overflowed(self, buffered: int, now: float) -> Fail | None:
        """With ``on_full="error"``: the failure once the consumer is too far behind."""
        options = self.options
        if options.on_full != "error" or options.buffer == 0 or buffered <= options.buffer:
            return None
        return self._abort(
            BufferOverflow(
                f"The consumer fell more than buffer={options.buffer} chunks behind the "
                'network, and on_full="error" was asked for: the request was cancelled. '
                'Read faster, raise buffer, or use on_full="wait" for backpressure.',
                partial=StreamResult(),
            ),
            now,
        )

    @property
    def waits_for_room(self) -> bool:
        """True when a full read-ahead buffer holds the reader back (backpressure)."""
        return self.options.on_full == "wait" or self.options.buffer == 0

    def _abort(self, error: LLMStreamError, now: float) -> Fail:
        assert self.session is not None
        return self.fail(self.session.fail(error, now, "aborted"), now)


def _release(attempt: Attempt) -> None:
    ticket = attempt.ticket
    if ticket is not None:
        ticket.release()


def _carries_output(chunk: ChatCompletionChunk) -> bool:
    """Whether a chunk brought generated output of any kind (text, reasoning, tool calls)."""
    for choice in chunk.choices:
        delta = choice.delta
        if delta.content or delta.reasoning or delta.reasoning_content or delta.tool_calls:
            return True
        if choice.finish_reason is not None:
            return True
    return False
