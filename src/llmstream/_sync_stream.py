"""``ChatStream``: the blocking shell around a call's core (threads).

A reader thread reads the body as data comes into a bounded buffer; the consumer thread,
while it waits for an item, doubles as the deadline watchdog. The stream may be
cancelled or closed from any thread: that shuts the socket down, which wakes a read
blocked in ``recv()`` and tells the server at once (also while the request still waits
for its response headers, through :class:`~llmstream._header_wait.HeaderWait`).

Every decision is the core's (:mod:`llmstream._call`); this module only waits. The
core is fed under one lock, since the reader thread, the consumer and a thread that
stops the stream all reach it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from ._accounting import BudgetOptions
from ._call import Attempt, CallCore, Drop, Fail, NeedWait, Retry, Step
from ._call_route import CallRoute
from ._chunks import ChatCompletionChunk
from ._deadlines import Timeouts, blocking_wait
from ._errors import LLMStreamError
from ._flow import StreamOptions, ThreadReadAhead
from ._header_wait import HeaderWait, cut_after
from ._hooks import Hook
from ._http_errors import MAX_ERROR_BODY_BYTES
from ._result import StreamResult
from ._retry import RetryPolicy
from ._session import StreamItem
from ._stream_events import StreamEvent, events_of
from ._streaming import StreamBase, chunk_of, item_of, now, text_of, unexpected
from ._timer_thread import fire_after
from ._transport import HeaderTimeout, HTTPRequest, SyncResponse

if TYPE_CHECKING:
    from ._client import Client

__all__ = ["ChatStream"]

_T = TypeVar("_T")


class ChatStream(StreamBase):
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
        self._response: SyncResponse | None = None
        self._reader: Iterator[bytes] | None = None
        self._buffer: ThreadReadAhead[StreamItem] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # around the core
        self._response_lock = threading.Lock()
        # The request waiting for its headers, so cancel() and close() can cut it short.
        self._header_wait: HeaderWait | None = None
        # The attempt whose headers _header_wait waits for: set before it, so that a
        # watchdog that sees the wait of a newer attempt also sees that attempt.
        self._header_owner: Attempt | None = None
        self._resumed = threading.Event()  # wakes a paused reader
        self._resumed.set()
        self._stopping = threading.Event()  # wakes a retry's backoff
        self._race: _ThreadRace | None = None  # a hedge racing the request, while it does
        self._early: list[StreamItem] = []  # read during a race before the buffer exists
        self._total_watch: _TotalWatch | None = None

    # -- the public surface ----------------------------------------------------------

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
        return self._iterate(text_of)

    def chunks(self) -> Iterator[ChatCompletionChunk]:
        """Iterate the typed chunks (every choice, usage chunks included) instead of text.

        Example::

            with client.stream("Hi", n=2) as stream:
                for chunk in stream.chunks():
                    print([c.delta.content for c in chunk.choices])
        """
        return self._iterate(chunk_of)

    def events(self) -> Iterator[StreamEvent]:
        """Iterate typed events: text, reasoning, tool-call pieces and finishes, every choice.

        Example::

            with client.stream("Why is the sky blue?") as stream:
                for event in stream.events():
                    if event.type == "reasoning":
                        print(event.text, end="", file=sys.stderr)  # the model thinking
                    elif event.type == "text":
                        print(event.text, end="")
        """
        for item in self._iterate(item_of):
            yield from events_of(item)

    def final_result(self) -> StreamResult:
        """Read whatever is left and return the result.

        Example::

            with client.stream("Hi") as stream:
                result = stream.final_result()
        """
        for _ in self._iterate(_none):  # opens the stream first if nothing read it yet
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
        self._core.pause_clock.pause(now())
        self._resumed.clear()

    def resume(self) -> None:
        """Continue reading after :meth:`pause`.

        Example::

            stream.resume()
        """
        self._core.pause_clock.resume()
        self._resumed.set()

    def cancel(self) -> None:
        """Stop now, from any thread: the connection is shut down, iteration ends.

        Example::

            threading.Timer(5.0, stream.cancel).start()
        """
        with self._lock:
            stopped = self._core.stop("cancelled", now())
        if not stopped:
            return
        if self._buffer is not None:
            self._buffer.items.clear()
        self._cut()

    def _client_closed(self) -> None:
        """The client is closing: the stream fails with ClientClosed, at once."""
        with self._lock:
            closed = self._core.client_closed(now())
        if closed:
            self._cut()

    def _cut(self) -> None:
        """Cut the request in flight and end the reading, once the call was stopped."""
        self._tell_hooks()
        self._cut_connection()
        if self._buffer is not None:
            self._buffer.end(self._core.error)
        self._wake_all()

    def close(self) -> None:
        """Close the connection now, from any thread. Reading stops; the result becomes final.

        Example::

            stream.close()
            stream.result.status  # "cancelled" if the answer was not finished
        """
        if self._closed:
            return
        self._closed = True
        core = self._core
        with self._lock:
            core.stop("closed", now())
        self._cut_connection()
        if self._buffer is not None:
            self._buffer.end()
        self._wake_all()
        with self._lock:
            core.settle()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._drop_response()
        self._tell_hooks()
        if self._owns_client:
            self._client.close()

    # -- opening ---------------------------------------------------------------------

    def _begin(self) -> None:
        """Plan the call and send requests until one streams, then start the reader."""
        if self._thread is not None or self._closed:
            return
        core = self._core
        if core.ended:
            return  # its client was closed before it opened: iteration raises that
        try:
            self._plan()
            while self._reader is None and core.stopped is None:
                step = self._send_attempt()
                if step is not None and not self._follow(step):
                    return
        except LLMStreamError as exc:
            with self._lock:
                core.fail(exc, now())
            self.close()
            raise
        except BaseException:
            # Interrupted mid-request (Ctrl-C): `with` will not exit, so the stream is
            # stopped and the response released here.
            with self._lock:
                core.stop("cancelled", now())
            self._drop_response()
            self._tell_hooks()
            raise
        if self._reader is None or core.stopped is not None:
            return
        self._buffer = ThreadReadAhead(core.options.buffer)
        if self._early:  # read while a hedge raced the request: first in line
            self._buffer.put(self._early)
            self._early = []
        self._thread = threading.Thread(target=self._pump, name="llmstream-reader", daemon=True)
        self._thread.start()
        if core.timeouts.total is not None:
            # The consumer watches the deadlines only while it waits for an item: the
            # total one is kept from the timer thread too (a slow consumer, a pause).
            self._total_watch = watch = _TotalWatch(self)
            watch.arm(core.held_wait(now()))

    def _plan(self) -> None:
        planner = self._core.plan()
        answer: object = None
        while True:
            try:
                need = planner.send(answer)
            except StopIteration:
                return
            if isinstance(need, NeedWait):
                self._stopping.wait(blocking_wait(need.seconds))
                answer = None
            else:
                answer = self._client._answer(need)

    def _send_attempt(self) -> Step | None:
        """Send the next request. None: its body streams (or the call was stopped)."""
        core = self._core
        client = self._client
        if "model" not in core.body:
            core.body["model"] = client._resolve_model()
        while True:
            with self._lock:
                room = core.admit(now())
            if room is None:
                break
            self._stopping.wait(blocking_wait(room))
            if core.stopped is not None:
                return None
        with self._lock:
            attempt = self._attempt = core.begin_attempt(now())
        self._tell_hooks()
        self._header_owner = attempt
        self._header_wait = wait = HeaderWait()
        if core.stopped is not None:
            wait.cut()  # stopped before the wait was there to be cut
        try:
            sent = self._send(attempt, wait)
        finally:
            self._header_wait = None
        if not isinstance(sent, tuple):
            return sent
        response, request = sent
        with self._response_lock:
            self._response = response
        if core.stopped is not None:
            self._drop_response()
            return None
        status = response.status_code
        with self._lock:
            step = core.response(attempt, status, response.headers, now())
        self._tell_hooks()
        if status >= 300:
            with self._response_lock:
                self._response = None  # _refused() releases it
            return self._refused(attempt, response, request)
        if step is None:
            self._reader = response.stream(core.body_read_backstop)
            with self._lock:
                hedging = core.hedge_due(now()) is not None
            if hedging:
                return self._race_first_event()
        return step

    def _send(
        self, attempt: Attempt, wait: HeaderWait
    ) -> tuple[SyncResponse, HTTPRequest] | Step | None:
        """Send ``attempt``'s request and wait for its headers (``wait`` cuts that short).

        The response and its request; or what the core says of a request that got no
        response; None when the call was stopped meanwhile.
        """
        core = self._core
        found = attempt.header_deadline
        left = found[0] - now() if found else None
        request = self._client._stream_request(attempt.body, left, attempt.headers, attempt.target)
        if left is not None:
            # Nobody else may be watching (the consumer itself sends the first request),
            # and a server that trickles bytes keeps the read timeout from firing.
            cut_after(wait, max(left, 0.0))
        try:
            return self._client._transport.send(request, wait), request
        except HeaderTimeout:
            with self._lock:
                return core.send_failed(attempt, None, now())
        except LLMStreamError as exc:
            with self._lock:
                return core.send_failed(attempt, exc, now())
        except Exception:
            if core.stopped is not None or attempt.lost:
                return None  # cut short by cancel(), close() or a race: nothing to retry
            raise
        finally:
            wait.over = True

    def _refused(self, attempt: Attempt, response: SyncResponse, request: HTTPRequest) -> Step:
        """A response of 300 and up: read its (capped) body, then ask the core."""
        cut = _AbortAfter(response)
        fire_after(cut, self._core.error_body_wait(now()))
        try:
            body = response.read(MAX_ERROR_BODY_BYTES)  # what arrived, once aborted
        finally:
            cut.over = True
            response.close()
        with self._lock:
            return self._core.refused(attempt, response, body, request, now())

    # -- hedging ---------------------------------------------------------------------

    def _race_first_event(self) -> Step | None:
        """Read the request until its first event, racing a hedge against it if it is late.

        The async stream's race (see ``AsyncChatStream._race``) on threads: this thread
        reads the first request, another sends the hedge when due and reads it, and a
        timer stands for the first-token deadline. The first to bring an event cuts the
        others' connections, so their servers abort them.
        """
        core = self._core
        first, response, reader = self._attempt, self._response, self._reader
        assert first is not None and response is not None and reader is not None
        race = self._race = _ThreadRace(self._lock)
        race.running[first] = (response, reader)
        with self._lock:
            due = core.hedge_due(now())
            found = core.deadline()
        timer = None
        if found is not None:
            timer = threading.Timer(max(found[0] - now(), 0.0), race.time_out)
            timer.daemon = True
            timer.start()
        hedger = threading.Thread(
            target=self._hedge, args=(race, due), name="llmstream-hedge", daemon=True
        )
        hedger.start()
        try:
            self._read_racer(race, first, response, reader)
            race.over.wait()
            hedger.join()
        finally:
            if timer is not None:
                timer.cancel()
            race.cut_all(keep=race.winner)
            self._race = None
        for attempt, (loser, _) in race.running.items():
            if attempt is not race.winner and attempt is not first:
                loser.close()  # the first is the current response: released as it always is
        self._tell_hooks()
        if core.stopped is not None:
            return None
        if race.winner is not None:
            won, won_reader = race.running[race.winner]
            with self._response_lock:
                old, self._response = self._response, won
                self._attempt = race.winner
                self._reader = won_reader
            if old is not None and old is not won:
                old.close()
            return None
        if race.step is not None:
            return race.step
        current = core.current
        assert current is not None
        with self._lock:
            return core.read_failed(current, None, now())  # the deadline cut the race

    def _hedge(self, race: _ThreadRace, due: float | None) -> None:
        """The hedge's thread: send it once due, then read it as a racer."""
        core = self._core
        try:
            left = due
            while left is not None and left > 0:
                if race.over.wait(blocking_wait(left)):
                    return
                with self._lock:
                    left = core.hedge_due(now())
            if left is None:
                return
            with self._lock:
                hedge = core.begin_hedge(now())
            if hedge is None:
                return
            race.hedge = hedge
            wait = race.hedge_wait = HeaderWait()
            if race.over.is_set():
                wait.cut()
            sent = self._send(hedge, wait)
            if not isinstance(sent, tuple):
                race.ended(hedge, sent, core)
                return
            response, request = sent
            with self._lock:
                step = core.response(hedge, response.status_code, response.headers, now())
            if response.status_code >= 300:
                race.ended(hedge, self._refused(hedge, response, request), core)
                return
            reader = response.stream(core.body_read_backstop)
            if not race.enter(hedge, response, reader) or step is not None:
                response.close()
                race.ended(hedge, step, core)
                return
            self._read_racer(race, hedge, response, reader)
        except BaseException as exc:  # never leave the race waiting for this thread
            if isinstance(exc, LLMStreamError):
                race.fail(exc)
            else:
                race.fail(unexpected(exc, None) if isinstance(exc, Exception) else None)
            raise

    def _read_racer(
        self, race: _ThreadRace, attempt: Attempt, response: SyncResponse, reader: Iterator[bytes]
    ) -> None:
        """Read one racing request until the call's first event (or its own end)."""
        core = self._core
        lock = self._lock
        while not race.over.is_set() and not attempt.lost:
            attempt.reading = True
            try:
                data = next(reader)
            except StopIteration:
                response.body_ended()
                with lock:
                    step = core.body_ended(attempt, now())
                race.ended(attempt, step, core)
                return
            except Exception as exc:
                if race.over.is_set() or attempt.lost or core.stopped is not None:
                    return  # cut: another racer won, the deadline passed, or the caller
                failure = response.read_failure(exc)
                if failure is None:
                    raise
                with lock:
                    step = core.read_failed(attempt, failure, now())
                race.ended(attempt, step, core)
                return
            finally:
                attempt.reading = False
            with lock:
                items = core.feed(attempt, data, now())
                answering = core.answering(attempt)
                ended = core.step
            if attempt.lost:
                return
            if items:
                if self._buffer is not None:
                    self._buffer.put(items)
                else:
                    self._early.extend(items)
            if ended is not None:
                race.ended(attempt, ended, core)
                return
            if answering:
                race.won(attempt)
                return

    def _follow(self, step: Step) -> bool:
        """Act on how an attempt ended; True: send another request."""
        self._tell_hooks()
        if isinstance(step, Retry):
            self._drop_response()
            if step.delay > 0:
                self._stopping.wait(blocking_wait(step.delay))
            return self._core.stopped is None
        if isinstance(step, Fail):
            raise step.error
        return False

    def _cut_connection(self) -> None:
        """Cut the request in flight, whether it waits for its headers or reads its body."""
        race = self._race
        if race is not None:
            race.cut_all(keep=None)
            race.over.set()
        wait = self._header_wait
        if wait is not None:
            wait.cut()
        response = self._response
        if response is not None:
            response.abort()

    # -- reading ---------------------------------------------------------------------

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
            if self._core.error is not None:
                raise self._core.error
            return None
        return buffer.get(self._watch_deadlines)

    def _watch_deadlines(self) -> float | None:
        # Called by the consumer while it waits: it doubles as the deadline watchdog.
        core = self._core
        if not core.watches_deadlines:
            return None
        with self._lock:
            due = core.deadline_due(now())
        if isinstance(due, Attempt):
            response = self._response
            if response is not None:
                response.abort()  # the read fails, and the reader reports the deadline
            wait = self._header_wait
            # Only the wait of the attempt whose deadline passed: the reader may have
            # moved on to the next attempt meanwhile, which must not be cut.
            if wait is not None and self._header_owner is due:
                wait.cut()  # the send fails, and the reader reports the deadline
            if core.error is not None:
                # It ended the call while the reader was held back (paused, or waiting
                # for room): the reader wakes to its error, the consumer after the
                # items it was handed before the deadline.
                if self._buffer is not None:
                    self._buffer.end(core.error)
                self._wake_all()
            return 0.05
        return due

    def _pump(self) -> None:
        """The reader thread: read ahead into the buffer until the call ends."""
        core = self._core
        buffer = self._buffer
        assert buffer is not None
        try:
            while core.stopped is None:
                if self._reader is None:
                    step = self._send_attempt()
                    if step is None:
                        continue  # streaming now (or stopped: the loop ends)
                else:
                    step = self._read_body(buffer)
                    if step is None:
                        break  # stopped, or the buffer was ended
                if not self._follow(step):
                    break
        except LLMStreamError as exc:
            with self._lock:
                core.fail(exc, now())
        except Exception as exc:  # never let the thread die silently
            with self._lock:
                core.fail(unexpected(exc, core.snapshot(now())), now())
        finally:
            # Released at once, however the call ended: an unread body is cut, so the
            # server stops generating (a budget stop, an error).
            self._drop_response()
            if self._total_watch is not None:
                self._total_watch.over = True
            self._tell_hooks()  # the end of the call, before the consumer sees it
            buffer.end(core.error)

    def _read_body(self, buffer: ThreadReadAhead[StreamItem]) -> Step | None:
        core = self._core
        attempt = self._attempt
        reader = self._reader
        response = self._response
        assert attempt is not None and reader is not None and response is not None
        lock = self._lock
        pause = core.pause_clock
        wait_for_room = core.waits_for_room
        feed = core.feed
        hooks = self._hooks
        while not buffer.ended:
            held = pause.paused or (wait_for_room and buffer.full)
            if wait_for_room:
                buffer.wait_for_room()
                if buffer.ended:
                    return None
            if pause.paused:
                paused = self._wait_while_paused()
                if paused is not None:
                    return paused
            if held:
                core.reading_resumed(now())  # time held back is not the server's idleness
            if core.stopped is not None:
                return None
            attempt.reading = True
            try:
                data = next(reader)
            except StopIteration:
                response.body_ended()
                with lock:
                    return core.body_ended(attempt, now())
            except Exception as exc:
                if core.stopped is not None:
                    return None  # cut by the caller while the read was waiting
                failure = response.read_failure(exc)
                if failure is None:
                    raise
                with lock:
                    return core.read_failed(attempt, failure, now())
            finally:
                attempt.reading = False
            with lock:
                items = feed(attempt, data, now())
            if hooks is not None and hooks.pending:
                hooks.deliver()  # the first token, or a budget's end
            if items:
                buffer.put(items)
                if not wait_for_room:
                    with lock:
                        overflow = core.overflowed(len(buffer.items), now())
                    if overflow is not None:
                        return overflow
            if core.step is not None:
                return core.step
        return None

    def _wait_while_paused(self) -> Fail | None:
        core = self._core
        clock = core.pause_clock
        while clock.paused and core.stopped is None:
            with self._lock:
                expired = core.held_expired(now())
                wait = core.held_wait(now())
            if expired is not None:
                return expired
            self._resumed.wait(blocking_wait(wait))
        return None

    def _tell_hooks(self) -> None:
        """Deliver the events the core emitted since the last step (no hooks: nothing)."""
        hooks = self._hooks
        if hooks is not None and hooks.pending:
            hooks.deliver()

    def _wake_all(self) -> None:
        self._stopping.set()
        self._resumed.set()

    def _drop_response(self) -> None:
        with self._response_lock:
            response, self._response = self._response, None
            self._reader = None
        if response is not None:
            response.close()


class _ThreadRace:
    """The requests of one call racing to its first event, on threads, and how it ended."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock  # the stream's lock around its core
        self.running: dict[Attempt, tuple[SyncResponse, Iterator[bytes]]] = {}
        self.hedge_wait: HeaderWait | None = None
        self.hedge: Attempt | None = None
        self.over = threading.Event()
        self.winner: Attempt | None = None
        self.step: Step | None = None

    def enter(self, attempt: Attempt, response: SyncResponse, reader: Iterator[bytes]) -> bool:
        """Register a racer's response; False when the race is already over."""
        with self._lock:
            if self.over.is_set():
                return False
            self.running[attempt] = (response, reader)
            return True

    def won(self, attempt: Attempt) -> None:
        self.winner = attempt
        self.cut_all(keep=attempt)
        self.over.set()

    def ended(self, attempt: Attempt, step: Step | None, core: CallCore) -> None:
        """A racer ended without winning: out of the race, or the end of the call's try."""
        with self._lock:
            current = core.current
            if (isinstance(step, Drop) or attempt.lost) and (
                current is not None and current is not attempt and not current.lost
            ):
                return  # the other racer (or a hedge on its way) carries the call on
            self.step = step
        self.cut_all(keep=None)
        self.over.set()

    def fail(self, error: LLMStreamError | None) -> None:
        """The hedge's thread died: end the race with its error."""
        if error is not None and self.step is None:
            self.step = Fail(error)
        self.cut_all(keep=None)
        self.over.set()

    def time_out(self) -> None:
        """The deadline passed during the race: cut every request."""
        self.cut_all(keep=None)
        self.over.set()

    def cut_all(self, *, keep: Attempt | None) -> None:
        """Cut every racing request but ``keep`` (their servers abort them)."""
        wait = self.hedge_wait
        if wait is not None and (keep is None or keep is not self.hedge):
            wait.cut()  # the hedge, still waiting for its headers
        with self._lock:
            racers = [r for a, (r, _) in self.running.items() if a is not keep]
        for response in racers:
            response.abort()


def _none(item: StreamItem) -> None:
    return None


class _AbortAfter:
    """Aborts a response from the shared timer thread once its time is up (a blocked read
    returns), unless it is :attr:`over` by then."""

    __slots__ = ("_response", "over")

    def __init__(self, response: SyncResponse) -> None:
        self._response = response
        self.over = False

    def fire(self) -> None:
        self._response.abort()


class _TotalWatch:
    """A stream's total deadline, checked from the shared timer thread.

    It holds the stream by weak reference: a stream dropped unclosed must still be
    collected (its finaliser cuts the connection), not kept alive by its timer.
    """

    __slots__ = ("_stream", "over")

    def __init__(self, stream: ChatStream) -> None:
        self._stream = weakref.ref(stream)
        self.over = False

    def arm(self, seconds: float | None) -> None:
        if seconds is not None and not self.over:
            fire_after(self, seconds)

    def fire(self) -> None:
        stream = self._stream()
        if stream is None or stream._core.ended:
            self.over = True
            return
        self.arm(stream._watch_deadlines())
