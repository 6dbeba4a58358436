"""``AsyncChatStream``: the async shell around a call's core (anyio).

Inside ``async with`` a reader task of the stream's own task group reads the body as data
comes, so timings are taken at the wire, and hands chunks over through a bounded buffer
(``buffer`` chunks). When the buffer is full the reader stops reading, and TCP pushes
back on the server. A watchdog task beside it cuts a read that a deadline ends, so
deadlines cost nothing per chunk. Iterated without ``async with`` there is no task: each
read happens when the consumer asks, under a cancel scope for the deadline.

Every decision is the core's (:mod:`llmstream._call`); this module only waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio

from ._accounting import BudgetOptions
from ._call import Attempt, CallCore, Drop, Fail, NeedWait, Retry, Step
from ._call_route import CallRoute
from ._chunks import ChatCompletionChunk
from ._deadlines import Timeouts
from ._errors import LLMStreamError
from ._fleet_watch import DISCOVER_WAIT
from ._flow import AsyncReadAhead, StreamOptions
from ._hooks import Hook
from ._http_errors import MAX_ERROR_BODY_BYTES
from ._read_cut import ReadCut, cut_after, read_cut
from ._result import StreamResult
from ._retry import RetryPolicy
from ._session import StreamItem
from ._stream_events import StreamEvent, events_of
from ._streaming import StreamBase, chunk_of, item_of, now, text_of, unexpected
from ._transport import AsyncResponse, HeaderTimeout, HTTPRequest, LendableBody

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from ._client import AsyncClient

__all__ = ["AsyncChatStream"]

_T = TypeVar("_T")


class AsyncChatStream(StreamBase):
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
        headers: Mapping[str, str] | None = None,
        owns_client: bool = False,
        hooks: tuple[Hook, ...] = (),
        route: CallRoute | None = None,
    ) -> None:
        super().__init__(
            client, body, options, timeouts, retry, budget, owns_client, headers, hooks, route
        )
        self._client = client
        self._attempt: Attempt | None = None
        self._response: AsyncResponse | None = None
        self._reader: AsyncIterator[bytes] | None = None
        self._pending: deque[StreamItem] = deque()  # read without a reader task
        self._buffer: AsyncReadAhead[StreamItem] | None = None
        self._task_group: TaskGroup | None = None
        self._pump_done: anyio.Event | None = None
        # The reader's own scope: cancelling it must never cancel the code in the
        # caller's `async with` block, which runs inside the task group's scope.
        self._pump_scope: anyio.CancelScope | None = None
        # The wait for a response's headers, so cancel() and aclose() can cut it short.
        self._send_scope: anyio.CancelScope | ReadCut | None = None
        # The current attempt's reads, so a deadline can cut the read in progress
        # whatever the transport.
        self._read_scope: anyio.CancelScope | ReadCut | None = None
        # Made when first needed: most streams never pause, retry or wait, and each
        # anyio primitive costs a few microseconds of every stream's set-up.
        self._watch_scope: anyio.CancelScope | None = None  # the watchdog's (trio)
        # On asyncio the deadlines are watched by a timer of the event loop instead of a
        # watchdog task: a task costs about a tenth of a stream's set-up.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch_timer: asyncio.Handle | None = None
        # What the timer and the core hold instead of the stream (see _watch_by_timer).
        self._weak: weakref.ref[AsyncChatStream] | None = None
        # Without a reader task: None until the first read decides how deadlines are
        # watched; True for the loop's timer (asyncio), False for a scope per read.
        self._timer_watch: bool | None = None
        # With the timer watching: one reusable cut for every read (Python 3.11+).
        self._read_cut: ReadCut | None = None
        self._resumed: anyio.Event | None = None  # wakes a paused reader
        # Whether the current body lets a waiting consumer read in the reader's place.
        self._lend_checked: AsyncIterator[bytes] | None = None
        self._lends = False
        self._stopped: anyio.Event | None = None  # wakes a retry's backoff

    # -- the public surface ----------------------------------------------------------

    async def __aenter__(self) -> AsyncChatStream:
        self._entered = True
        await self._open()
        # buffer=0: no read-ahead, so no reader task either: the consumer's own reads are
        # the only ones, as for a stream iterated without `async with`. A task, its group
        # and their scopes are most of what opening a stream costs.
        if self._reader is not None and self._core.stopped is None and self._core.options.buffer:
            self._buffer = AsyncReadAhead(self._core.options.buffer)
            if self._pending:  # read while a hedge raced the request: first in line
                self._buffer.put(list(self._pending))
                self._pending.clear()
            self._pump_done = anyio.Event()
            self._pump_scope = anyio.CancelScope()
            self._task_group = anyio.create_task_group()
            await self._task_group.__aenter__()
            self._task_group.start_soon(self._pump, name="llmstream reader")
            self._start_watch()
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

    def __await__(self) -> Generator[Any, None, AsyncChatStream]:
        """``stream = await client.stream(...)``: send the request, return the open stream.

        It is read when iterated (no reader task), and closes itself at the end of
        the loop or on an error; after a ``break``, ``await stream.aclose()``.
        ``async with`` is the form that always closes.

        Example::

            stream = await client.stream("Hi")
            async for text in stream:
                print(text, end="")
        """
        return self._opened().__await__()

    async def _opened(self) -> AsyncChatStream:
        await self._open()
        return self

    def __aiter__(self) -> AsyncIterator[str]:
        return _AsyncItems(self, text_of)

    def chunks(self) -> AsyncIterator[ChatCompletionChunk]:
        """Iterate the typed chunks (every choice, usage chunks included) instead of text.

        Example::

            async with client.stream("Hi", n=2) as stream:
                async for chunk in stream.chunks():
                    print([c.delta.content for c in chunk.choices])
        """
        return _AsyncItems(self, chunk_of)

    def events(self) -> AsyncIterator[StreamEvent]:
        """Iterate typed events: text, reasoning, tool-call pieces and finishes, every choice.

        Example::

            async with client.stream("Why is the sky blue?") as stream:
                async for event in stream.events():
                    if event.type == "reasoning":
                        print(event.text, end="", file=sys.stderr)  # the model thinking
                    elif event.type == "text":
                        print(event.text, end="")
        """
        return _AsyncEvents(_AsyncItems(self, item_of))

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
        clock = self._core.pause_clock
        if not clock.paused:
            self._resumed = anyio.Event()
        clock.pause(now())

    def resume(self) -> None:
        """Continue reading after :meth:`pause`.

        Example::

            stream.resume()
            assert not stream.paused
        """
        self._core.pause_clock.resume()
        if self._resumed is not None:
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
        if not self._core.stop("cancelled", now()):
            return
        self._pending.clear()
        if self._buffer is not None:
            self._buffer.items.clear()
        self._cut()

    def _client_closed(self) -> None:
        """The client is closing: the stream fails with ClientClosed, at once."""
        if self._core.client_closed(now()):
            self._cut()

    def _cut(self) -> None:
        """Cut the request in flight and end the reading, once the call was stopped."""
        if self._send_scope is not None:
            self._send_scope.cancel()
        if self._response is not None:
            self._response.abort()
        if self._buffer is not None:
            self._buffer.end(self._core.error)
        if self._pump_scope is not None:
            self._pump_scope.cancel()
        self._wake_all()

    async def aclose(self) -> None:
        """Close the connection now. Reading stops; the result becomes final.

        Safe to call more than once, and from a cancelled task: the close is
        shielded so the socket is always released.

        Example::

            await stream.aclose()
            stream.result.status  # "cancelled" if the answer was not finished
        """
        core = self._core
        if self._closed and self._pump_done is None and self._response is None:
            return  # closed already with nothing left to release: no scope to pay for
        # What is awaited below cannot be interrupted when only a response is released
        # (its aclose() shields itself, see _transport.AsyncResponse): a shield, about
        # 4 µs of every stream, is for the reader, the hooks and an owned client.
        shielded = self._pump_done is not None or self._hooks is not None or self._owns_client
        with anyio.CancelScope(shield=True) if shielded else _UNSHIELDED:
            if self._closed:
                # Closed already, perhaps from another task while a request was on its
                # way: a response that arrived since is still released, once the reader
                # (which may be reading it) has stopped.
                if self._pump_done is not None:
                    await self._pump_done.wait()
                await self._drop_response()
                return
            self._closed = True
            core.stop("closed", now())
            self._stop_watch()  # without a reader task, nothing else stops it
            if self._send_scope is not None:
                self._send_scope.cancel()
            if self._buffer is not None:
                self._buffer.end()
            core.settle()
            self._wake_all()
            if self._pump_scope is not None and self._pump_done is not None:
                self._pump_scope.cancel()
                await self._pump_done.wait()  # the reader closes the response on its way out
            await self._drop_response()
            await self._tell_hooks()
            if self._owns_client:
                await self._client.aclose()

    def __del__(self) -> None:
        # Dropped unclosed: a `break` out of `async for` without `async with` (the docs
        # ask for aclose() then). Nothing can be awaited here: cut the connection, so the
        # server aborts the generation, and end the call for the hooks that need no
        # awaiting, so that no span or in-progress gauge stays open. A stream never
        # opened has no call to end.
        try:
            core = self._core
            if self._closed or core.attempts == 0 or core.ended:
                return
            core.stop("cancelled", now())
            response = self._response
            if response is not None:
                response.abort()
            hooks = self._hooks
            if hooks is not None and hooks.pending:
                hooks.deliver("a stream dropped without aclose() cannot await")
        except Exception:  # a finaliser must not raise (half made, or the loop is gone)
            pass

    # -- opening ---------------------------------------------------------------------

    async def _open(self) -> None:
        """Plan the call, then send requests until one streams (or the call ends)."""
        core = self._core
        if core.ended:
            return  # its client was closed before it opened: iteration raises that
        try:
            await self._plan()
            while self._reader is None and core.stopped is None:
                step = await self._send_attempt()
                if step is not None and not await self._follow(step):
                    return
        except LLMStreamError as exc:
            core.fail(exc, now())
            await self.aclose()
            raise
        except BaseException:
            # Cancelled (or interrupted) mid-request: `async with` will not exit, so the
            # stream is stopped and the response released here.
            core.stop("cancelled", now())
            with anyio.CancelScope(shield=True):
                await self._drop_response()
                await self._tell_hooks()
            raise

    async def _plan(self) -> None:
        planner = self._core.plan()
        answer: object = None
        while True:
            try:
                need = planner.send(answer)
            except StopIteration:
                return
            if isinstance(need, NeedWait):
                await self._sleep_unless_stopped(need.seconds)
                answer = None
            else:
                answer = await self._client._answer(need)

    async def _send_attempt(self) -> Step | None:
        """Send the next request. None: its body streams (or the call was stopped)."""
        core = self._core
        if "model" not in core.body:
            core.body["model"] = await self._client._resolve_model()
        route, watcher = core.route, self._client._watcher
        if route is not None and watcher is not None and not route.state.endpoints:
            # A discovered fleet's first lookup, started when the call was made: awaited
            # here, so that the event loop runs on while DNS answers.
            total = core.timeouts.total
            await watcher.discover_async(
                DISCOVER_WAIT if total is None else min(total, DISCOVER_WAIT)
            )
        while (room := core.admit(now())) is not None:
            await self._sleep_unless_stopped(room)
            if core.stopped is not None:
                return None
        attempt = self._attempt = core.begin_attempt(now())
        await self._tell_hooks()
        sent = await self._send(attempt)
        if not isinstance(sent, tuple):
            return sent
        response, request = sent
        self._response = response
        if core.stopped is not None:  # stopped by another task while we waited
            await self._drop_response()
            return None
        status = response.status_code
        step = core.response(attempt, status, response.headers, now())
        await self._tell_hooks()
        if status >= 300:
            self._response = None  # _refused() releases it
            return await self._refused(attempt, response, request)
        if step is None:
            self._reader = response.stream(core.body_read_backstop)
            if core.hedge_due(now()) is not None:
                return await self._race()
        return step

    async def _send(self, attempt: Attempt) -> tuple[AsyncResponse, HTTPRequest] | Step | None:
        """Send ``attempt``'s request and wait for its headers, within its header deadline.

        The response and its request; or what the core says of a request that got no
        response; None when the call was stopped meanwhile.
        """
        core = self._core
        found = attempt.header_deadline
        wait = found[0] - now() if found is not None else None
        request = self._client._stream_request(attempt.body, wait, attempt.headers, attempt.target)
        # A hedge is sent inside a race, whose scope cancel() and aclose() cut instead.
        owns_scope = self._send_scope is None
        try:
            with cut_after(wait) as scope:
                if owns_scope:
                    self._send_scope = scope
                response = await self._client._transport.send(request)
        except HeaderTimeout:
            return core.send_failed(attempt, None, now())
        except LLMStreamError as exc:
            return core.send_failed(attempt, exc, now())
        finally:
            if owns_scope:
                self._send_scope = None
        if scope.cancelled_caught:
            if core.stopped is not None:
                return None  # cut short by cancel() or aclose(): no error, nothing to retry
            return core.send_failed(attempt, None, now())
        return response, request

    async def _refused(
        self, attempt: Attempt, response: AsyncResponse, request: HTTPRequest
    ) -> Step:
        """A response of 300 and up: read its (capped) body, then ask the core."""
        body = b""
        try:
            with anyio.move_on_after(self._core.error_body_wait(now())):
                body = await response.read(MAX_ERROR_BODY_BYTES)
        finally:
            await response.aclose()
        return self._core.refused(attempt, response, body, request, now())

    # -- hedging ---------------------------------------------------------------------

    async def _race(self) -> Step | None:
        """Read the request until its first event, racing a hedge against it if it is late.

        Over a fleet with hedging on: when no event came ``Hedging`` seconds after the
        request was sent, the same request goes to another endpoint. Whichever brings
        an event first carries the call on; the other is cut at once, so its server
        aborts it. None: streaming (the winner is the current attempt), else a step.
        """
        core = self._core
        first = self._attempt
        response, reader = self._response, self._reader
        assert first is not None and response is not None and reader is not None
        # The race owns the responses until a winner is known.
        self._response = self._reader = None
        race = _Race()
        race.running[first] = (response, reader)
        race.reading.add(first)
        found = core.deadline()  # the first-token deadline (or the total) bounds the race
        with anyio.move_on_after(found[0] - now() if found is not None else math.inf):
            async with anyio.create_task_group() as group:
                race.scope = group.cancel_scope
                # cancel(), aclose() and the deadlines' watch stop the whole race.
                self._send_scope = self._read_scope = group.cancel_scope
                group.start_soon(self._run_racer, race, first, response, reader)
                group.start_soon(self._hedge, race, group)
        self._send_scope = self._read_scope = None
        for attempt, (loser, _) in race.running.items():
            if attempt is not race.winner:
                await loser.aclose()
        await self._tell_hooks()
        if race.winner is not None and core.stopped is None:
            self._attempt = race.winner
            self._response, self._reader = race.running[race.winner]
            return None
        if core.stopped is not None:
            return None
        if race.step is not None:
            return race.step
        current = core.current
        assert current is not None
        return core.read_failed(current, None, now())  # a deadline cut the race

    async def _hedge(self, race: _Race, group: TaskGroup) -> None:
        """Send the hedge once it is due, then read it as a racer."""
        core = self._core
        due = core.hedge_due(now())
        while due is not None and due > 0:
            # Woken by the race settling rather than cancelled: most races are won before
            # the hedge is due, and a cancellation leaves a cycle (the exception, its
            # traceback, the frames) for the garbage collector on every such call.
            with anyio.move_on_after(due):
                await race.settled.wait()
            if race.settled.is_set():
                return
            due = core.hedge_due(now())
        if due is None:
            return
        hedge = core.begin_hedge(now())
        if hedge is None:
            return
        race.hedging = True
        try:
            ended = await self._send_hedge(race, hedge)
        finally:
            race.hedging = False
        if ended is not None:
            race.ended(hedge, ended[0], core)
            return
        response, reader = race.running[hedge]
        race.reading.add(hedge)
        group.start_soon(self._run_racer, race, hedge, response, reader)

    async def _send_hedge(self, race: _Race, hedge: Attempt) -> tuple[Step | None] | None:
        """Send the hedge; its step when it ended there (in a tuple), None: read it."""
        core = self._core
        sent = await self._send(hedge)
        if not isinstance(sent, tuple):
            return (sent,)
        response, request = sent
        step = core.response(hedge, response.status_code, response.headers, now())
        if response.status_code >= 300:
            return (await self._refused(hedge, response, request),)
        if step is not None or hedge.lost:
            await response.aclose()
            return (step,)
        reader = response.stream(core.body_read_backstop)
        race.running[hedge] = (response, reader)  # released after the race, whatever happens
        return None

    async def _run_racer(
        self, race: _Race, attempt: Attempt, response: AsyncResponse, reader: AsyncIterator[bytes]
    ) -> None:
        """Read one racing request until the call's first event (or its own end)."""
        try:
            await self._read_racer(race, attempt, response, reader)
        finally:
            race.reading.discard(attempt)

    async def _read_racer(
        self, race: _Race, attempt: Attempt, response: AsyncResponse, reader: AsyncIterator[bytes]
    ) -> None:
        core = self._core
        while not attempt.lost:
            attempt.reading = True
            try:
                data = await reader.__anext__()
            except StopAsyncIteration:
                response.body_ended()
                race.ended(attempt, core.body_ended(attempt, now()), core)
                return
            except Exception as exc:
                failure = response.read_failure(exc)
                if failure is None:
                    raise
                race.ended(attempt, core.read_failed(attempt, failure, now()), core)
                return
            finally:
                attempt.reading = False
            items = core.feed(attempt, data, now())
            if attempt.lost:
                break
            if items:
                if self._buffer is not None:
                    self._buffer.put(items)
                else:
                    self._pending.extend(items)
            if core.step is not None:
                race.ended(attempt, core.step, core)
                return
            if core.answering(attempt):
                race.won(attempt)
                return
        response.abort()  # lost: its server aborts the request now

    async def _follow(self, step: Step) -> bool:
        """Act on how an attempt ended; True: send another request."""
        await self._tell_hooks()
        if isinstance(step, Retry):
            await self._drop_response()
            if step.delay > 0:
                await self._sleep_unless_stopped(step.delay)
            return self._core.stopped is None
        if isinstance(step, Fail):
            raise step.error
        return False

    # -- reading ---------------------------------------------------------------------

    async def _next_item(self) -> StreamItem | None:
        pending = self._pending
        if pending:
            return pending.popleft()
        buffer = self._buffer
        if buffer is not None:
            if not buffer.items and self._lender() is not None:
                await self._read_in_place(buffer)
            return await buffer.get()
        core = self._core
        # The consumer's own time since its last item is not the server's idleness; the
        # reads it now waits on (keep-alive comments bring no item) are.
        core.reading_resumed(now())
        while not pending:
            if core.error is not None:
                raise core.error
            if core.has_result or core.stopped is not None:
                return None
            await self._pull()
        return pending.popleft()

    def _lender(self) -> LendableBody | None:
        """The body the reader task waits on, if this consumer may read it in its place.

        Only a plain read: not while requests race, with hooks to tell in order, paused,
        failing fast on a full buffer, or once the call has a step to follow.
        """
        reader, attempt, core = self._reader, self._attempt, self._core
        if reader is None or attempt is None or not attempt.reading or self._hooks is not None:
            return None
        if reader is not self._lend_checked:
            self._lend_checked = reader
            self._lends = isinstance(reader, LendableBody)
        if (
            not self._lends
            or core.step is not None
            or core.stopped is not None
            or core.error is not None
            or core.pause_clock.paused
            or not core.waits_for_room
        ):
            return None
        return cast(LendableBody, reader)

    async def _read_in_place(self, buffer: AsyncReadAhead[StreamItem]) -> None:
        """Read for the reader task while it waits on the body, until an item comes.

        The reader task sleeps through it: a chunk wakes this consumer alone, instead of
        the reader and then the consumer, two task switches. What the core must act on
        (the body's end, a failure, a step) is the reader's: it is woken for it, and
        whenever this stops reading without an item.
        """
        core = self._core
        attempt = self._attempt
        body = self._lender()
        assert attempt is not None and body is not None
        while body is self._lender():
            data = body.take_ready()
            if data:
                items = core.feed(attempt, data, now())
                if items:
                    buffer.put(items)
                if core.step is not None:
                    break
                if items:
                    if body.settled:
                        body.wake_reader()  # the end came with them: the reader's to see
                    return
                continue
            if body.settled:
                break
            await body.wait_instead()
        body.wake_reader()

    async def _pull(self) -> None:
        """Without a reader task: read once because the consumer asked.

        One coroutine per read, the read inlined: every frame between the consumer and
        the socket is paid on every chunk.
        """
        core = self._core
        if self._timer_watch is None:
            self._timer_watch = core.watches_deadlines and self._watch_by_timer()
            if self._timer_watch:
                self._read_cut = read_cut()
        try:
            if core.pause_clock.paused:
                paused = await self._wait_while_paused()
                if paused is not None:
                    raise paused.error
                core.reading_resumed(now())  # time paused is not the server's idleness
            if self._reader is None and core.session is None:
                await self._open()
            while (reader := self._reader) is not None:
                attempt = self._attempt
                # Held here: aclose() from another task drops the stream's response mid-read.
                response = self._response
                assert attempt is not None and response is not None
                # One read under a cancel scope for the deadline.
                scope: anyio.CancelScope | ReadCut
                if self._timer_watch:
                    # The loop's timer cuts the read when a deadline passes: a timer per
                    # read would cost more than the rest of handling a chunk, an anyio
                    # scope a tenth.
                    scope = self._read_scope = self._read_cut or anyio.CancelScope()
                else:
                    found = core.deadline()
                    scope = anyio.move_on_after(found[0] - now() if found is not None else math.inf)
                step: Step | None = None
                with scope:
                    attempt.reading = True
                    try:
                        data = await reader.__anext__()
                    except StopAsyncIteration:
                        response.body_ended()
                        step = core.body_ended(attempt, now())
                    except Exception as exc:
                        if core.stopped is not None:
                            return  # cut by the caller while the read was waiting
                        failure = response.read_failure(exc)
                        if failure is None:
                            raise
                        step = core.read_failed(attempt, failure, now())
                    finally:
                        attempt.reading = False
                        self._read_scope = None
                if step is None:
                    if scope.cancelled_caught:
                        step = core.read_failed(attempt, None, now())
                    else:
                        self._pending.extend(core.feed(attempt, data, now()))
                        hooks = self._hooks
                        if hooks is not None and hooks.pending:
                            await hooks.adeliver()
                        step = core.step
                        if step is None:
                            return  # items (maybe none) came
                if not await self._follow(step):
                    break
                step = await self._send_attempt()
                if step is not None and not await self._follow(step):
                    break
        except LLMStreamError as exc:
            core.fail(exc, now())
        await self.aclose()

    async def _pump(self) -> None:
        """The reader task: read ahead into the buffer until the call ends."""
        core = self._core
        buffer = self._buffer
        assert buffer is not None and self._pump_done is not None and self._pump_scope
        try:
            with self._pump_scope:
                while core.stopped is None:
                    if self._reader is None:
                        step = await self._send_attempt()
                        if step is None:
                            continue  # streaming now (or stopped: the loop ends)
                    else:
                        step = await self._read_attempt(buffer)
                        if step is None:
                            break  # stopped, or the buffer was ended
                    if not await self._follow(step):
                        break
        except LLMStreamError as exc:
            core.fail(exc, now())
        except Exception as exc:  # a reader that dies must not take the caller's block down
            core.fail(unexpected(exc, self.snapshot()), now())
        finally:
            with anyio.CancelScope(shield=True):  # one scope: each costs every stream
                await self._tell_hooks()  # the end of the call, before the consumer sees it
                buffer.end(core.error)
                self._stop_watch()
                await self._drop_response()
            self._pump_done.set()

    async def _read_attempt(self, buffer: AsyncReadAhead[StreamItem]) -> Step | None:
        """Read the current attempt's body into the buffer until it ends."""
        core = self._core
        attempt = self._attempt
        assert attempt is not None
        self._read_scope = scope = anyio.CancelScope()
        with scope:
            step = await self._read_body(buffer, attempt)
        if scope.cancelled_caught and core.stopped is None:
            return core.read_failed(attempt, None, now())  # a deadline cut the read
        return step

    async def _read_body(self, buffer: AsyncReadAhead[StreamItem], attempt: Attempt) -> Step | None:
        core = self._core
        reader = self._reader
        response = self._response
        assert reader is not None and response is not None
        pause = core.pause_clock
        wait_for_room = core.waits_for_room
        feed = core.feed
        hooks = self._hooks
        while not buffer.ended:
            # Checked inline: awaiting a no-op coroutine per chunk costs measurable CPU.
            held = False
            if wait_for_room and buffer.full:
                held = True
                await buffer.wait_for_room()
                if buffer.ended:
                    return None
            if pause.paused:
                held = True
                paused = await self._wait_while_paused()
                if paused is not None:
                    return paused
            if held:
                core.reading_resumed(now())  # time held back is not the server's idleness
            attempt.reading = True
            try:
                data = await reader.__anext__()
            except StopAsyncIteration:
                response.body_ended()
                return core.body_ended(attempt, now())
            except Exception as exc:
                if core.stopped is not None:
                    return None  # cut by the caller while the read was waiting
                failure = response.read_failure(exc)
                if failure is None:
                    raise
                return core.read_failed(attempt, failure, now())
            finally:
                attempt.reading = False
            items = feed(attempt, data, now())
            if hooks is not None and hooks.pending:
                await hooks.adeliver()  # the first token, or a budget's end
            if items:
                buffer.put(items)
                if not wait_for_room:
                    overflow = core.overflowed(len(buffer.items), now())
                    if overflow is not None:
                        return overflow
            if core.step is not None:
                return core.step
        return None

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the stream is stopped meanwhile."""
        if self._core.stopped is not None:
            return
        if self._stopped is None:
            self._stopped = anyio.Event()
        with anyio.move_on_after(seconds):
            await self._stopped.wait()

    async def _wait_while_paused(self) -> Fail | None:
        core = self._core
        clock = core.pause_clock
        while clock.paused and core.stopped is None:
            expired = core.held_expired(now())
            if expired is not None:
                return expired
            if self._resumed is None:
                self._resumed = anyio.Event()
            wait = core.held_wait(now())
            with anyio.move_on_after(math.inf if wait is None else wait):
                await self._resumed.wait()
        return None

    def _start_watch(self) -> None:
        """Watch the deadlines beside the reader: a timer on asyncio, a task elsewhere."""
        assert self._task_group is not None
        core = self._core
        if not core.watches_deadlines:
            return
        if not self._watch_by_timer():  # not asyncio (trio): no loop timers to use
            self._watch_scope = anyio.CancelScope()
            self._task_group.start_soon(self._watchdog, name="llmstream deadlines")

    def _watch_by_timer(self) -> bool:
        """On asyncio, watch the deadlines with a timer of the loop; False elsewhere."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        # The timer holds the stream by weak reference: a stream dropped unclosed must
        # be freed at once (its finaliser cuts the connection). No deadline that starts
        # later comes before the check it times (CallCore.deadline_due): it never moves.
        self._weak = weakref.ref(self)
        self._check_deadlines()  # sets the first timer
        return True

    def _stop_watch(self) -> None:
        if self._watch_scope is not None:
            self._watch_scope.cancel()
        timer, self._watch_timer, self._loop = self._watch_timer, None, None
        if timer is not None:
            timer.cancel()

    def _check_deadlines(self) -> float:
        """Cut the read in progress if a deadline passed; seconds until the next check."""
        core = self._core
        due = core.deadline_due(now())
        if isinstance(due, Attempt):
            if self._response is not None:
                self._response.abort()
            if self._read_scope is not None:
                self._read_scope.cancel()
            if core.error is not None:
                # It ended the call while the reader was held back (paused, or waiting
                # for room): the reader wakes to its error, the consumer after the
                # items it was handed before the deadline.
                if self._buffer is not None:
                    self._buffer.end(core.error)
                self._wake_all()
            due = 0.05
        loop = self._loop
        if loop is not None:  # the timer's own callback: set the next one
            # By weak reference: a stream dropped unclosed must still be collected (its
            # finaliser cuts the connection), not kept alive by its own timer.
            self._watch_timer = loop.call_later(due, _check_deadlines_of, self._weak)
        return due

    async def _watchdog(self) -> None:
        """The deadlines' watcher as a task, a sibling of the reader (trio)."""
        assert self._watch_scope is not None
        with self._watch_scope:
            while True:
                await anyio.sleep(self._check_deadlines())

    async def _tell_hooks(self) -> None:
        """Deliver the events the core emitted since the last step (no hooks: nothing)."""
        hooks = self._hooks
        if hooks is not None and hooks.pending:
            await hooks.adeliver()

    def _wake_all(self) -> None:
        if self._resumed is not None:
            self._resumed.set()
        if self._stopped is not None:
            self._stopped.set()

    async def _drop_response(self) -> None:
        """Release the current response (cutting it if unread) and forget it."""
        response, self._response = self._response, None
        self._reader = None
        if response is not None:
            await response.aclose()


# aclose()'s scope when nothing it awaits needs a shield; a nullcontext can be reused.
_UNSHIELDED = contextlib.nullcontext()


def _check_deadlines_of(stream: weakref.ref[AsyncChatStream] | None) -> None:
    alive = stream() if stream is not None else None
    if alive is not None:
        alive._check_deadlines()


class _Race:
    """The requests of one call racing to its first event, and how the race ended."""

    __slots__ = ("hedging", "reading", "running", "scope", "settled", "step", "winner")

    def __init__(self) -> None:
        self.running: dict[Attempt, tuple[AsyncResponse, AsyncIterator[bytes]]] = {}
        self.reading: set[Attempt] = set()
        """The racers whose reading task is still running."""
        self.hedging = False
        """Whether the hedge's task is past its wait (sending, or about to)."""
        self.scope: anyio.CancelScope | None = None
        self.settled = anyio.Event()
        self.winner: Attempt | None = None
        self.step: Step | None = None

    def won(self, attempt: Attempt) -> None:
        self.winner = attempt
        self._settle(attempt)

    def _settle(self, by: Attempt) -> None:
        self.settled.set()  # a hedge still waiting to be sent returns
        # Cancel only what must be cut: another racer reading, or a hedge being sent.
        if self.hedging or any(racer is not by for racer in self.reading):
            assert self.scope is not None
            self.scope.cancel()

    def ended(self, attempt: Attempt, step: Step | None, core: CallCore) -> None:
        """A racer ended without winning: out of the race, or the end of the call's try."""
        if isinstance(step, Drop) or attempt.lost:
            if core.current is not None and core.current in self.running:
                return  # the other racer carries the call on
            if core.current is not None and core.current is not attempt:
                return  # a hedge on its way carries it on
        self.step = step
        self._settle(attempt)


class _AsyncEvents(AsyncIterator[StreamEvent]):
    """The events of each item, one at a time (a chunk may bring several)."""

    __slots__ = ("_items", "_ready")

    def __init__(self, items: _AsyncItems[StreamItem]) -> None:
        self._items = items
        self._ready: deque[StreamEvent] = deque()

    async def __anext__(self) -> StreamEvent:
        ready = self._ready
        while not ready:
            ready.extend(events_of(await self._items.__anext__()))
        return ready.popleft()


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
