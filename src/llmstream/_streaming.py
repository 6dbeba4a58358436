"""What both stream classes share: the public state of a call, read from its core.

:class:`~llmstream.AsyncChatStream` (:mod:`llmstream._async_stream`) and
:class:`~llmstream.ChatStream` (:mod:`llmstream._sync_stream`) are thin I/O shells
around one :class:`~llmstream._call.CallCore`: they send the requests it says, hand it
each network read with a timestamp, and follow the step it returns. This base holds
what needs no I/O at all: the result, snapshots, pausing.

One call may take several requests: a failure before any output is retried from
scratch, and, with ``RetryPolicy(resume=True)``, a stream that broke mid-answer is
continued on a new request; the consumer sees one stream.

Closing is prompt on purpose: leaving the ``with`` block for any reason closes the HTTP
response before it is fully read, which closes the connection instead of returning it
to the pool. vLLM sees the disconnect and aborts the request, freeing its KV cache.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ._accounting import BudgetOptions
from ._call import CallCore
from ._call_route import CallRoute
from ._chunks import ChatCompletionChunk
from ._deadlines import Timeouts
from ._errors import LLMStreamError
from ._flow import StreamOptions
from ._hooks import Hook, HookRunner
from ._result import StreamResult
from ._retry import RetryPolicy
from ._session import StreamItem

if TYPE_CHECKING:
    from ._client import AsyncClient, Client

__all__ = ["StreamBase", "chunk_of", "item_of", "now", "text_of", "unexpected"]

now = time.perf_counter
"""The clock of every stream: monotonic, and the one the metrics are taken with."""


def text_of(item: StreamItem) -> str | None:
    """The text a stream item adds to choice 0, or None (nothing to yield)."""
    return item[1] or None


def item_of(item: StreamItem) -> StreamItem:
    """The stream item itself (for iterators that look at the whole item)."""
    return item


def chunk_of(item: StreamItem) -> ChatCompletionChunk:
    """The typed chunk of a stream item."""
    return item[0]


def unexpected(exc: Exception, partial: StreamResult | None) -> LLMStreamError:
    """A reader that died of something unforeseen, as an error the consumer can catch."""
    message = f"Reading the stream failed: {type(exc).__name__}: {exc}"
    return LLMStreamError(message, partial=partial)


class StreamBase:
    """The public state both stream classes read from their :class:`CallCore`."""

    def __init__(
        self,
        client: AsyncClient | Client,
        body: dict[str, object],
        options: StreamOptions | None,
        timeouts: Timeouts | None,
        retry: RetryPolicy | None,
        budget: BudgetOptions | None,
        owns_client: bool,
        headers: Mapping[str, str] | None = None,
        hooks: tuple[Hook, ...] = (),
        route: CallRoute | None = None,
    ) -> None:
        # No hooks, no runner: the shells test `self._hooks is not None` and do nothing else.
        self._hooks = HookRunner(hooks) if hooks else None
        self._core = CallCore(
            body,
            options or StreamOptions(),
            timeouts or client.timeouts,
            retry or client.retry,
            budget,
            max_line_bytes=client._max_line_bytes,
            max_event_bytes=client._max_event_bytes,
            headers=headers,
            observer=self._hooks.queue if self._hooks is not None else None,
            endpoint=client._endpoint,
            route=route,
        )
        client._track(self)
        self._owns_client = owns_client
        self._entered = False
        self._closed = False  # the shell released what it held

    @property
    def result(self) -> StreamResult:
        """The assembled result, once the stream has ended or been closed.

        After a full read ``result.complete`` is ``True``; after ``break``,
        ``close()`` or ``cancel()`` it is the partial result with ``status ==
        "cancelled"`` (also when the stream was stopped before any answer); after
        an error it is the error's ``partial``. With read-ahead the partial result
        holds everything received, which can be a few chunks more than the loop
        consumed. Raises the error that ended the call when it failed before
        streaming.

        Example::

            with client.stream("Hi") as stream:
                text = "".join(stream)
            print(stream.result.usage)
        """
        core = self._core
        if core.result is None:
            if core.error is not None:
                raise core.error  # it failed before streaming: there is no result
            raise LLMStreamError(
                "The stream has not ended yet: read it to the end or close it before "
                "asking for .result (use .snapshot() for the result so far)."
            )
        return core.result

    def _client_closed(self) -> None:
        """The client is closing: the stream fails with ClientClosed, at once (each shell)."""
        raise NotImplementedError

    def snapshot(self) -> StreamResult:
        """The result assembled so far, while the stream is still running.

        Example::

            async for text in stream:
                if len(stream.snapshot().text) > 1000:
                    break
        """
        return self._core.snapshot(now())

    @property
    def request_body(self) -> dict[str, object]:
        """The JSON body of the (first) request.

        Example::

            stream.request_body["max_tokens"]
        """
        return self._core.body

    @property
    def paused(self) -> bool:
        """True between :meth:`pause` and :meth:`resume`.

        Example::

            stream.pause()
            assert stream.paused
        """
        return self._core.pause_clock.paused

    @property
    def _reading(self) -> bool:
        # A network read is in progress (what a deadline would cut).
        attempt = self._core.current
        return attempt is not None and attempt.reading
