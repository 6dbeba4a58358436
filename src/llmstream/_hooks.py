"""Hooks: callables a client gives every event of its calls (see :mod:`llmstream._events`).

The core queues events as they happen; the stream delivers them at its next step, outside
the core and its lock, so a hook may call ``stream.cancel()`` and a slow hook never holds
the core. Each hook sees the events of a call in order, one at a time.

A hook that raises is logged on the ``llmstream`` logger, with its traceback, and the
stream goes on. On :class:`~llmstream.AsyncClient` a hook may be an ``async def``: it is
awaited in order, at the stream's next step, before the stream goes on (backpressure, no
task is started), shielded from the stream's own cancellation so a close does not cut it
half-way, and bounded by :data:`ASYNC_HOOK_TIMEOUT` seconds, after which it is cancelled
and logged. :class:`~llmstream.Client` calls hooks synchronously and refuses an
``async def`` when it is given one.

Example::

    runner = HookRunner((print,))
    core = CallCore(body, options, timeouts, retry, observer=runner.queue)
    ...  # after each step of the core:
    runner.deliver()
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

import anyio

from ._errors import InvalidRequestError
from ._events import CallEvent

__all__ = [
    "ASYNC_HOOK_TIMEOUT",
    "Hook",
    "HookRunner",
    "check_hooks",
]

logger = logging.getLogger("llmstream")

Hook = Callable[[CallEvent], object]
"""A hook: called with each :data:`~llmstream.CallEvent` of a call.

A plain function (both clients), or an ``async def`` (:class:`~llmstream.AsyncClient`
only). What it returns is ignored.

Example::

    def log_ends(event: llmstream.CallEvent) -> None:
        if isinstance(event, (llmstream.CallFinished, llmstream.CallFailed)):
            print(event.call.call_id, event.status)

    client = llmstream.Client(hooks=[log_ends])
"""

ASYNC_HOOK_TIMEOUT = 5.0
"""Seconds an async hook may take for one event before it is cancelled (and logged)."""


def check_hooks(hooks: Iterable[object] | None, *, sync: bool) -> tuple[Hook, ...]:
    """The hooks as a tuple, each checked: callable, and not ``async`` for a sync client.

    Example::

        check_hooks([print], sync=True)  # (print,)
    """
    if hooks is None:
        return ()
    if callable(hooks) or isinstance(hooks, str | bytes) or not isinstance(hooks, Iterable):
        raise InvalidRequestError(
            f"hooks takes a list of callables, got {type(hooks).__name__}: "
            "pass hooks=[hook], not hooks=hook."
        )
    checked: list[Hook] = []
    for hook in hooks:
        if not callable(hook):
            raise InvalidRequestError(
                f"hooks must be callables taking one event, got {type(hook).__name__}."
            )
        if sync and _is_async(hook):
            raise InvalidRequestError(
                f"{_name(hook)} is an async function: the sync Client calls hooks "
                "synchronously and cannot await it. Use a plain function, or "
                "llmstream.AsyncClient, which awaits async hooks."
            )
        checked.append(hook)
    return tuple(checked)


def _is_async(hook: object) -> bool:
    call = getattr(hook, "__call__", None)  # noqa: B004 (an object with an async __call__)
    return inspect.iscoroutinefunction(hook) or inspect.iscoroutinefunction(call)


def _name(hook: object) -> str:
    return getattr(hook, "__qualname__", None) or type(hook).__qualname__


class HookRunner:
    """The hooks of one call and the events waiting for them.

    ``queue`` is the core's observer; the stream calls :meth:`deliver` (sync) or
    :meth:`adeliver` (async) after each step. Delivery is in order and one event at
    a time: a thread that finds another delivering leaves the queue to it, and a hook
    that stops the stream (which queues an event) does not deliver it from inside
    itself.

    Example::

        runner = HookRunner((hook,))
        runner.queue(event)
        runner.deliver()
    """

    __slots__ = ("_delivering", "_hooks", "_lock", "pending", "queue")

    def __init__(self, hooks: tuple[Hook, ...]) -> None:
        self._hooks = hooks
        self.pending: deque[CallEvent] = deque()
        """Events emitted and not delivered yet."""
        self.queue: Callable[[CallEvent], None] = self.pending.append
        self._lock = threading.Lock()  # held by the thread delivering (sync client)
        self._delivering = False  # a task is delivering (async client)

    def deliver(self, cannot_await: str = "the sync client cannot await") -> None:
        """Call the hooks with every pending event, in order (sync hooks only).

        An async hook's coroutine is closed unrun and logged, saying why (``cannot_await``).
        """
        pending = self.pending
        while pending:
            if not self._lock.acquire(blocking=False):
                return  # another thread delivers; it looks at the queue again when done
            try:
                while pending:
                    event = pending.popleft()
                    for hook in self._hooks:
                        outcome = self._call(hook, event)
                        if inspect.iscoroutine(outcome):
                            outcome.close()
                            logger.error(
                                "llmstream: hook %s returned a coroutine on %s of call %s, "
                                "which %s; it was not run",
                                _name(hook),
                                type(event).__name__,
                                event.call.call_id,
                                cannot_await,
                            )
            finally:
                self._lock.release()

    async def adeliver(self) -> None:
        """Call the hooks with every pending event, in order, awaiting async ones."""
        if self._delivering:
            return  # another task delivers, and empties the queue before it stops
        self._delivering = True
        pending = self.pending
        try:
            while pending:
                event = pending.popleft()
                for hook in self._hooks:
                    outcome = self._call(hook, event)
                    if inspect.isawaitable(outcome):
                        await self._await(hook, event, outcome)
        finally:
            self._delivering = False

    def _call(self, hook: Hook, event: CallEvent) -> object:
        try:
            return hook(event)
        except Exception:
            _log_failure(hook, event)
            return None

    async def _await(self, hook: Hook, event: CallEvent, outcome: Awaitable[object]) -> None:
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(ASYNC_HOOK_TIMEOUT) as scope:
                try:
                    await outcome
                except Exception:
                    _log_failure(hook, event)
            if scope.cancelled_caught:
                logger.error(
                    "llmstream: async hook %s took longer than %g s on %s of call %s; "
                    "it was cancelled and the stream went on",
                    _name(hook),
                    ASYNC_HOOK_TIMEOUT,
                    type(event).__name__,
                    event.call.call_id,
                )


def _log_failure(hook: Hook, event: CallEvent) -> None:
    # The event itself is not logged: its body holds the prompt.
    logger.exception(
        "llmstream: hook %s raised on %s of call %s; the stream goes on",
        _name(hook),
        type(event).__name__,
        event.call.call_id,
    )
