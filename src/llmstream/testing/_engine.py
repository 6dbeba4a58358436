"""The emulated engine's load: chat requests waiting and running, and vLLM's counters.

Every chat request the script admits (its :class:`~._script.Admit` marker) gets a
:class:`Ticket`. With ``max_num_seqs`` set, a ticket waits in line, before its TTFT
starts, until fewer than ``max_num_seqs`` requests run, as vLLM's scheduler holds
requests it has no room for. A ticket ends once: its answer completed, the client left
("abort"), or the server stopped. ``/metrics`` reports these counts live.

>>> import threading
>>> engine = Engine(threading.Condition(), max_num_seqs=None, kv_cache_tokens=100)
>>> engine.snapshot().running
0
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator

from ._metrics import FINISH_REASONS, MetricsSnapshot
from ._script import Action, Admit, Cut, Head, Refuse, Send, Wait

__all__ = ["Engine", "Ticket"]

# How often a queued request looks for a free slot. Polling keeps the shells (socket
# server, sync and async transports) unaware of queueing: they only see short waits.
_QUEUE_POLL = 0.005


class Ticket:
    """One chat request's place in the engine; ended exactly once.

    >>> import threading
    >>> engine = Engine(threading.Condition(), max_num_seqs=None, kv_cache_tokens=100)
    >>> ticket = engine.ticket(); ticket.end("abort"); ticket.end("abort")
    >>> engine.snapshot().finished["abort"]
    0
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.admit: Admit | None = None
        self.state = "new"  # new, waiting, running, ended
        self.events = 0
        self.generated = 0

    def end(self, reason: str | None) -> None:
        """Leave the engine; ``reason`` labels the finish (None: not counted).

        A ticket never admitted, or already ended, is left as it is.
        """
        self._engine._end(self, reason)


class Engine:
    """Live scheduler state behind ``/metrics``, guarded by the emulator's condition.

    >>> import threading
    >>> Engine(threading.Condition(), max_num_seqs=2, kv_cache_tokens=100).max_num_seqs
    2
    """

    def __init__(
        self, lock: threading.Condition, *, max_num_seqs: int | None, kv_cache_tokens: int
    ) -> None:
        if max_num_seqs is not None and max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1 (or None), not {max_num_seqs}")
        if kv_cache_tokens < 1:
            raise ValueError(f"kv_cache_tokens must be at least 1, not {kv_cache_tokens}")
        self._lock = lock
        self.max_num_seqs = max_num_seqs
        self.kv_cache_tokens = kv_cache_tokens
        self._waiting: deque[Ticket] = deque()
        self._running: list[Ticket] = []
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._finished = dict.fromkeys(FINISH_REASONS, 0)
        self._created = time.time()
        self.overrides: tuple[float | None, float | None, float | None] = (None, None, None)
        self.enabled = True

    @property
    def running(self) -> int:
        """Requests being answered now (call with the lock held)."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Requests in line for a slot (call with the lock held)."""
        return len(self._waiting)

    def ticket(self) -> Ticket:
        """A ticket for one request, not yet admitted.

        >>> import threading
        >>> Engine(threading.Condition(), max_num_seqs=None, kv_cache_tokens=1).ticket().state
        'new'
        """
        return Ticket(self)

    def snapshot(self) -> MetricsSnapshot:
        """What ``/metrics`` reports now, overrides applied (call with the lock held).

        >>> import threading
        >>> engine = Engine(threading.Condition(), max_num_seqs=None, kv_cache_tokens=1)
        >>> engine.overrides = (4, None, 0.5)
        >>> engine.snapshot().running, engine.snapshot().kv_cache
        (4, 0.5)
        """
        used = sum(t.admit.prompt_tokens + t.generated for t in self._running if t.admit)
        running, waiting, kv_cache = self.overrides
        return MetricsSnapshot(
            running=len(self._running) if running is None else running,
            waiting=len(self._waiting) if waiting is None else waiting,
            kv_cache=min(used / self.kv_cache_tokens, 1.0) if kv_cache is None else kv_cache,
            prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generation_tokens,
            finished=dict(self._finished),
            created=self._created,
        )

    def track(self, ticket: Ticket, actions: Iterator[Action]) -> Iterator[Action]:
        """Pass ``actions`` on, turning the script's :class:`Admit` into queueing and load.

        The request joins the engine at its ``Admit``, at once; when it has to wait for a
        slot, it waits after the response headers (which vLLM sends at once) and before
        anything else, so before its TTFT starts.
        """
        queued = False
        try:
            for action in actions:
                if isinstance(action, Admit):
                    queued = not self._join(ticket, action)
                    continue
                if queued and not isinstance(action, Head):
                    queued = False
                    while not self._try_start(ticket):
                        yield Wait(_QUEUE_POLL)
                if isinstance(action, Cut | Refuse):
                    # The connection is about to go: the request ends with it.
                    ticket.end("abort")
                elif isinstance(action, Send) and action.event:
                    # Counted before it leaves, so a client that has read it sees it counted.
                    self._sent(ticket)
                yield action
            ticket.end(ticket.admit.finish_reason if ticket.admit else None)
        finally:
            # Closed early (the shell dropped the answer): nothing is counted.
            ticket.end(None)

    def _join(self, ticket: Ticket, admit: Admit) -> bool:
        """Put ``ticket`` in line; whether it got a slot at once."""
        with self._lock:
            if ticket.state != "new":
                return True
            ticket.admit = admit
            ticket.state = "waiting"
            self._waiting.append(ticket)
            self._lock.notify_all()
        return self._try_start(ticket)

    def _try_start(self, ticket: Ticket) -> bool:
        with self._lock:
            if ticket.state != "waiting":
                return True  # ended while in line; the shell notices the client left
            room = self.max_num_seqs is None or len(self._running) < self.max_num_seqs
            if not (room and self._waiting and self._waiting[0] is ticket):
                return False
            self._waiting.popleft()
            self._running.append(ticket)
            ticket.state = "running"
            assert ticket.admit is not None
            self._prompt_tokens += ticket.admit.prompt_tokens
            self._lock.notify_all()
            return True

    def _sent(self, ticket: Ticket) -> None:
        # Each event after the first (the role chunk) stands for one generated token: close
        # enough for a load signal. The end of a whole answer settles the count exactly.
        with self._lock:
            admit = ticket.admit
            ticket.events += 1
            if ticket.state != "running" or admit is None or ticket.events == 1:
                return
            if ticket.generated < admit.completion_tokens:
                ticket.generated += 1
                self._generation_tokens += 1

    def _end(self, ticket: Ticket, reason: str | None) -> None:
        with self._lock:
            if ticket.state == "waiting":
                self._waiting.remove(ticket)
            elif ticket.state == "running":
                self._running.remove(ticket)
                assert ticket.admit is not None
                if reason == ticket.admit.finish_reason:
                    self._generation_tokens += ticket.admit.completion_tokens - ticket.generated
                    ticket.generated = ticket.admit.completion_tokens
            else:
                ticket.state = "ended"
                return
            ticket.state = "ended"
            if reason is not None:
                self._finished[reason] = self._finished.get(reason, 0) + 1
            self._lock.notify_all()
