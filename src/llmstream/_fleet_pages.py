"""How the fleet watcher fetches a page: from its own thread, or on the calls' event loop.

:class:`InThread` sends with a blocking ``httpx.Client`` from the watcher's thread.
:class:`OnLoop` hands each request to the event loop the calls run in, as a task of its
own (an async transport must never be used from a thread), and waits for its page on the
thread. Either way a page is read as sent, never decoded, and refused past
``MAX_PAGE_BYTES`` or its time: a compressed page was not asked for, and one 64 kB read of
gzip decodes to 64 MB.

Example::

    sender = InThread(httpx.Client())
    page = sender.get("http://10.0.0.5:8000/metrics", {}, 0.75, text=True)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from typing import Protocol, cast

import anyio
import httpx

from ._httpx_transport import unbind

__all__ = ["MAX_PAGE_BYTES", "InThread", "NotAsked", "OnLoop", "running_loop"]

logger = logging.getLogger("llmstream")

# A /metrics page of a large vLLM deployment is a few hundred kB; anything far bigger is
# not one, and must not be buffered.
MAX_PAGE_BYTES = 8 * 1024 * 1024
# A request run on an event loop is cut after this many of its timeouts (connecting, the
# headers, the body): a transport may not honour timeouts at all (httpx.ASGITransport).
_LOOP_TIMEOUTS = 3
# How much longer the thread waits for a request handed to an event loop: a loop busy with
# many streams runs it late. Past that the loop is taken to have ended (or to be blocked),
# and nothing is recorded: the endpoint is not to blame.
_LOOP_GRACE = 1.0


class NotAsked(Exception):
    """A request handed to an event loop was not sent: no loop ran it (nothing to record)."""


class InThread:
    """Sends from the watcher's thread, with a blocking httpx client."""

    def __init__(self, http: httpx.Client) -> None:
        self._http = http

    def get(
        self, url: str, headers: Mapping[str, str], timeout: float, *, text: bool
    ) -> str | None:
        """The page at ``url`` (see :func:`_read_page`); ``None``: no usable answer."""
        try:
            # Not followed: a client of the caller's may follow redirects, and one to
            # another host would carry the key.
            with self._http.stream(
                "GET", url, headers=headers, timeout=timeout, follow_redirects=False
            ) as response:
                page = _read_page(response, url, timeout, text=text)
        except httpx.HTTPError as exc:
            # Only the type: a refused header's error message may quote the key.
            logger.debug("%s did not answer (%s)", url, type(exc).__name__)
            return None
        unbind(response)
        return page


class OnLoop:
    """Sends with an ``httpx.AsyncClient``, on the event loop the calls run in.

    ``loop`` is the loop a call last woke the watcher from. Each request runs there as a
    task of its own, so the loop never waits on one, while the thread waits for its page
    (and parses it: that costs the loop nothing either). The wait ends at once when the
    watcher closes. A request the loop did not run (the loop ended, or is blocked)
    raises :class:`NotAsked`, and the loop is forgotten until the next call tells
    which one runs the calls now.
    """

    def __init__(self, http: httpx.AsyncClient, cond: threading.Condition) -> None:
        self.http = http
        self.cond = cond  # the watcher's
        self.closed = False  # set with the watcher's, under its condition
        self.loop: _AsyncioLoop | _TrioLoop | None = None

    def get(
        self, url: str, headers: Mapping[str, str], timeout: float, *, text: bool
    ) -> str | None:
        """The page at ``url``, fetched on the loop; raises :class:`NotAsked`."""
        loop = self.loop
        if loop is None:
            raise NotAsked
        request = _LoopRequest(self, url, headers, timeout, text=text)
        if loop.start(request):
            with self.cond:
                self.cond.wait_for(
                    lambda: request.done or self.closed,
                    _LOOP_TIMEOUTS * timeout + _LOOP_GRACE,
                )
        if not request.answered:
            if self.loop is loop and not self.closed:
                self.loop = None
            raise NotAsked
        return request.page


class _LoopRequest:
    """One GET handed to an event loop, and what came of it."""

    def __init__(
        self, sender: OnLoop, url: str, headers: Mapping[str, str], timeout: float, *, text: bool
    ) -> None:
        self._sender = sender
        self._url = url
        self._headers = headers
        self._timeout = timeout
        self._text = text
        self.done = False  # under the watcher's condition
        self.answered = False  # it was sent, and page is what came of it
        self.page: str | None = None

    async def run(self) -> None:
        """Send it and read the answer; never raises but the loop's own cancellation."""
        try:
            if not self._sender.closed:
                with anyio.move_on_after(_LOOP_TIMEOUTS * self._timeout) as scope:
                    self.page = await self._fetch()
                if scope.cancelled_caught:
                    logger.debug("%s did not answer in time", self._url)
                self.answered = True
        except Exception as exc:
            # No caller to raise to, and an error escaping a trio system task ends the run.
            logger.debug("fleet watcher: a request failed (%s)", type(exc).__name__)
        finally:
            self.finish()

    def finish(self) -> None:
        """Tell the waiting thread it is over (answered or not)."""
        with self._sender.cond:
            self.done = True
            self._sender.cond.notify_all()

    async def _fetch(self) -> str | None:
        url, timeout = self._url, self._timeout
        try:
            async with self._sender.http.stream(
                "GET", url, headers=self._headers, timeout=timeout, follow_redirects=False
            ) as response:
                page = await _aread_page(response, url, timeout, text=self._text)
        except httpx.HTTPError as exc:
            logger.debug("%s did not answer (%s)", url, type(exc).__name__)
            return None
        unbind(response)
        return page


# The asyncio tasks running requests: the loop keeps only weak references to its tasks.
_loop_tasks: set[asyncio.Task[None]] = set()


class _AsyncioLoop:
    """An asyncio event loop (uvloop's too), started from another thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def start(self, request: _LoopRequest) -> bool:
        """Run ``request`` in a task of the loop, soon; ``False``: the loop has stopped."""

        def spawn() -> None:
            try:
                task = self._loop.create_task(request.run())
            except RuntimeError:  # the loop is closing
                request.finish()
                return
            _loop_tasks.add(task)
            task.add_done_callback(_loop_tasks.discard)

        if not self._loop.is_running():
            return False  # a callback would wait for a run that may never come
        try:
            self._loop.call_soon_threadsafe(spawn)
        except RuntimeError:  # closed
            return False
        return True


class _TrioToken(Protocol):
    def run_sync_soon(self, sync_fn: Callable[[], None]) -> None: ...


class _TrioLoop:
    """A trio run, started from another thread through its token."""

    def __init__(self, token: _TrioToken) -> None:
        self._token = token

    def start(self, request: _LoopRequest) -> bool:
        """Run ``request`` in a system task of the run, soon; ``False``: the run has ended."""
        trio = sys.modules["trio"]

        def spawn() -> None:
            # Must not raise: an error in a run_sync_soon callback ends the run.
            try:
                trio.lowlevel.spawn_system_task(request.run, name="llmstream-fleet-watch")
            except Exception:  # the run is ending
                request.finish()

        try:
            self._token.run_sync_soon(spawn)
        except Exception:  # trio.RunFinishedError
            return False
        return True


def running_loop() -> _AsyncioLoop | _TrioLoop | None:
    """The event loop the caller runs in, or ``None`` outside one."""
    try:
        return _AsyncioLoop(asyncio.get_running_loop())
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            return _TrioLoop(trio.lowlevel.current_trio_token())
        except RuntimeError:
            pass
    return None


def _answered_200(response: httpx.Response, url: str) -> bool:
    if response.status_code != 200:
        logger.debug("%s answered %d", url, response.status_code)
        return False
    return True


class _Body:
    """A body read as sent, never decoded: refused past ``MAX_PAGE_BYTES`` or its time."""

    # Never decoded: httpx decodes each chunk whole before handing it over, and one 64 kB
    # read of gzip decodes to 64 MB: the size of the page would be checked too late.

    def __init__(self, url: str, timeout: float) -> None:
        self._url = url
        # The timeout bounds each read, not the whole body: a server that trickles must
        # not hold the thread (or close()) either.
        self._deadline = time.monotonic() + timeout
        self._data = bytearray()

    def take(self, chunk: bytes) -> bool:
        """Add ``chunk``; ``False``: the body is too large or too slow, and refused."""
        self._data += chunk
        if len(self._data) > MAX_PAGE_BYTES or time.monotonic() > self._deadline:
            logger.debug("%s: too large or too slow, not read", self._url)
            return False
        return True

    def page(self, response: httpx.Response, *, text: bool) -> str | None:
        """The body as text (``""`` when not ``text``); ``None`` when content-encoded."""
        if not text:
            return ""
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            logger.debug(
                "%s answered in the %r content-encoding, not asked for", self._url, encoding[:20]
            )
            return None
        return self._data.decode("utf-8", errors="replace")


def _read_page(response: httpx.Response, url: str, timeout: float, *, text: bool) -> str | None:
    """The body of a 200 answer (``""`` when not ``text``), or ``None``.

    At most ``MAX_PAGE_BYTES`` are read, as sent: a body in a content-encoding is
    refused, never decoded, since it was not asked for.
    """
    if not _answered_200(response, url):
        return None
    body = _Body(url, timeout)
    try:
        # A transport may answer with a body already in memory (httpx.MockTransport).
        chunks: Iterable[bytes] = (response.content,)
    except httpx.ResponseNotRead:
        chunks = response.iter_raw()
    # all() stops at the first chunk refused: nothing more is read.
    return body.page(response, text=text) if all(map(body.take, chunks)) else None


async def _aread_page(
    response: httpx.Response, url: str, timeout: float, *, text: bool
) -> str | None:
    """:func:`_read_page` on an event loop."""
    if not _answered_200(response, url):
        return None
    body = _Body(url, timeout)
    try:
        whole = response.content
    except httpx.ResponseNotRead:
        chunks = cast(AsyncGenerator[bytes, None], response.aiter_raw())
        # Closed here, not left for the loop to finalise when the page is refused.
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                if not body.take(chunk):
                    return None
    else:
        if not body.take(whole):
            return None
    return body.page(response, text=text)
