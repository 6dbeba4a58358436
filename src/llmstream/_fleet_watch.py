"""The fleet's watcher: one daemon thread per client that keeps the fleet's picture fresh.

While calls are being made it reads every endpoint's ``/metrics`` each
``scrape_interval``, asks every endpoint's ``/health`` each ``probe_interval``, and
re-resolves the discovery DNS name each ``interval`` (on a short-lived thread of its own,
one lookup at a time: a resolver can hang). When no
call has started for two intervals it sleeps until the next call wakes it, so an idle
client costs nothing. Sync and async clients share it: the event loop never waits on a
scrape.

It sends with an HTTP client of its own, unless :meth:`FleetWatcher.send_with` gives it
the one the calls go through (a caller's transport or client, so that scrapes and probes
reach the endpoints the calls' way): a blocking one is used from the thread, an async one
on the event loop the calls run in, where only the requests run, each a task of its own.

It depends on the fleet's state only through :class:`WatchedFleet` (what it reads and
what it reports), so it can be driven by any object with those members.

Example::

    watcher = FleetWatcher(state, scrape_interval=1.0, probe_interval=1.0,
                           discovery=fleet.discovery)
    watcher.wake()     # on every call start: starts the thread, or wakes it
    ...
    watcher.close()    # stops and joins it
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from typing import Generic, Protocol, TypeVar, cast

import anyio
import httpx

from ._deadlines import blocking_wait
from ._httpx_transport import unbind
from ._vllm_metrics import LoadReport, parse_vllm_load

__all__ = [
    "FleetWatcher",
    "WatchedBreaker",
    "WatchedDiscovery",
    "WatchedEndpoint",
    "WatchedFleet",
    "WatchedKey",
]

logger = logging.getLogger("llmstream")

# A /metrics page of a large vLLM deployment is a few hundred kB; anything far bigger is
# not one, and must not be buffered.
MAX_PAGE_BYTES = 8 * 1024 * 1024
# Requests are sequential on one thread: a slow endpoint must not hold up the others for
# long, and a request in progress when close() is called must end within its join. Shorter
# intervals shorten it further.
MAX_REQUEST_TIMEOUT = 0.75
CLOSE_JOIN_TIMEOUT = 1.0
# How long a call waits for the first DNS answer of a discovered fleet: one try of a
# resolver (resolv.conf's default timeout). A lookup cannot be interrupted; one that takes
# longer goes on in the background, and later calls find what it answers.
DISCOVER_WAIT = 5.0
# How often an event loop looks whether the lookup has ended: it must not wait on a
# thread's event, and a few milliseconds are nothing beside a first call.
_DISCOVER_POLL = 0.005
# A request run on an event loop is cut after this many of its timeouts (connecting, the
# headers, the body): a transport may not honour timeouts at all (httpx.ASGITransport).
_LOOP_TIMEOUTS = 3
# How much longer the thread waits for a request handed to an event loop: a loop busy with
# many streams runs it late. Past that the loop is taken to have ended (or to be blocked),
# and nothing is recorded: the endpoint is not to blame.
_LOOP_GRACE = 1.0


class _Lookup:
    """One DNS lookup on a thread of its own: ``done`` once it ended, ``ok`` if it found any."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False


class WatchedKey(Protocol):
    """The part of an endpoint's settings the watcher reads: its API key.

    Example::

        llmstream.Endpoint("http://gpu-1:8000/v1", api_key="sk-1")   # a WatchedKey
    """

    @property
    def api_key(self) -> str | None:
        """Sent as ``Authorization: Bearer ...``; ``None``: no header."""
        ...


class WatchedBreaker(Protocol):
    """The part of an endpoint's circuit breaker the watcher reads: its state.

    Example::

        breaker.state(time.monotonic())   # "closed", "open" or "half_open"
    """

    def state(self, now: float) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"`` at ``now``."""
        ...


class WatchedEndpoint(Protocol):
    """One endpoint as the watcher sees it: base URL, settings, circuit breaker.

    Example::

        endpoint.url                      # "http://gpu-1:8000/v1"
        endpoint.endpoint.api_key         # "sk-1" or None
        endpoint.breaker.state(now)       # "closed"
    """

    @property
    def url(self) -> str:
        """The base URL (``/metrics`` and ``/health`` are beside its trailing ``/v1``)."""
        ...

    @property
    def endpoint(self) -> WatchedKey:
        """The endpoint's settings."""
        ...

    @property
    def breaker(self) -> WatchedBreaker:
        """The endpoint's circuit breaker."""
        ...


E = TypeVar("E", bound=WatchedEndpoint)


class WatchedFleet(Protocol[E]):
    """What the watcher needs of the fleet's live state: the contract between the two.

    ``endpoints`` is read each round (a snapshot), ``last_call_at`` tells whether calls
    are being made (same clock as the watcher's), and the three ``record``/``replace``
    methods take what was learnt. They are called from the watcher's thread.

    Example::

        class Fleet:
            endpoints: list[Endpoint]
            last_call_at: float | None
            def record_load(self, endpoint, report, now): ...
            def record_probe(self, endpoint, ok, now): ...
            def replace_discovered(self, urls, now): ...
    """

    @property
    def endpoints(self) -> Sequence[E]:
        """The endpoints to watch, now."""
        ...

    @property
    def last_call_at(self) -> float | None:
        """When the last call started (``None``: never)."""
        ...

    def record_load(self, endpoint: E, report: LoadReport | None, now: float) -> None:
        """``/metrics`` was read at ``now``: its figures, or ``None`` (no usable answer)."""
        ...

    def record_probe(self, endpoint: E, ok: bool, now: float) -> None:
        """``/health`` was asked at ``now``: ``ok`` when it answered 200."""
        ...

    def replace_discovered(self, urls: Sequence[str], now: float) -> None:
        """DNS answered at ``now``: the base URLs of the addresses it gave."""
        ...


class WatchedDiscovery(Protocol):
    """A DNS name to re-resolve, and how its addresses become base URLs.

    ``llmstream.DNSDiscovery`` is one.

    Example::

        llmstream.DNSDiscovery("vllm.ns.svc.cluster.local", port=8000, interval=10.0)
    """

    @property
    def host(self) -> str:
        """The name to resolve."""
        ...

    @property
    def port(self) -> int:
        """The port the servers listen on."""
        ...

    @property
    def interval(self) -> float:
        """Seconds between resolutions."""
        ...

    def url_for(self, address: str) -> str:
        """The base URL of the server at ``address``."""
        ...


def service_root(base_url: str) -> str:
    """Where ``/metrics`` and ``/health`` are: the base URL without its ``/v1``.

    Example::

        service_root("http://gpu-1:8000/v1")   # "http://gpu-1:8000"
    """
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


class FleetWatcher(Generic[E]):
    """Scrapes ``/metrics``, probes ``/health`` and re-resolves DNS for one fleet state.

    ``scrape_interval``: seconds between ``/metrics`` rounds (``None``: never read
    them). ``probe_interval``: seconds between ``/health`` probes of every endpoint
    (open ones are probed, not scraped). ``discovery``: the DNS name to re-resolve, or
    ``None``. ``transport``, ``verify``: for its own small HTTP client, unless
    :meth:`send_with` gives it another. ``clock`` must be the clock of the state's
    timestamps.

    The thread starts on the first :meth:`wake` and sleeps when no call has started
    for two intervals; a wake always gets a round. It never raises: an endpoint that
    does not answer, answers 4xx/5xx or answers something else than vLLM metrics is
    reported as ``record_load(endpoint, None, now)``. API keys are sent as ``Bearer``
    headers and never logged.

    Example::

        watcher = FleetWatcher(state, scrape_interval=1.0, probe_interval=1.0)
        watcher.wake()
        watcher.close()
    """

    def __init__(
        self,
        state: WatchedFleet[E],
        *,
        scrape_interval: float | None,
        probe_interval: float,
        discovery: WatchedDiscovery | None = None,
        transport: httpx.BaseTransport | None = None,
        verify: ssl.SSLContext | str | bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._state = state
        self._scrape_interval = scrape_interval
        self._probe_interval = probe_interval
        self._discovery = discovery
        self._transport = transport
        self._verify = verify
        self._clock = clock
        # Two rounds without a call: the client is idle, the thread sleeps.
        self._idle_after = 2.0 * (scrape_interval if scrape_interval else probe_interval)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._sleeping = False
        self._woken_at = -math.inf
        self._lookup: _Lookup | None = None  # the last DNS lookup started
        self._sender: _InThread | _OnLoop | None = None  # None: a client of its own
        self._on_loop: _OnLoop | None = None  # the sender, when it needs the calls' loop

    def send_with(self, http: httpx.Client | httpx.AsyncClient) -> None:
        """Send the scrapes and probes with ``http`` instead of a client of its own.

        For a client given a transport or an httpx client of the caller's: what the
        calls go through is the only way to their endpoints (an in-process server, a
        Unix socket, a proxy of its own). A blocking ``httpx.Client`` is used from the
        thread; an ``httpx.AsyncClient`` only on the event loop that the last call
        woke the watcher from, never from the thread. The watcher never closes it.
        Call it before the first :meth:`wake`.

        Example::

            watcher.send_with(httpx.AsyncClient(transport=FakeVLLM().transport()))
        """
        if isinstance(http, httpx.AsyncClient):
            self._sender = self._on_loop = _OnLoop(http, self._cond)
        else:
            self._sender, self._on_loop = _InThread(http), None

    def wake(self) -> None:
        """A call is starting: start the thread if it is not running, wake it if asleep.

        Cheap enough to call on every call: an attribute write and a test, unless the
        thread must be started or woken (or, sending on an event loop, none is known).

        Example::

            watcher.wake()
        """
        self._woken_at = self._clock()
        on_loop = self._on_loop
        if on_loop is not None and on_loop.loop is None:
            on_loop.loop = _running_loop()
        # The thread sets _sleeping before it reads _woken_at for the last time, and
        # this reads _sleeping after writing _woken_at: one of the two sees the other.
        if self._thread is None or self._sleeping:
            with self._cond:
                if self._closed:
                    return
                if on_loop is not None:
                    # After a pause the calls may run in another loop (a second
                    # asyncio.run()): the one this call runs in is the one to send on.
                    on_loop.loop = _running_loop() or on_loop.loop
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="llmstream-fleet-watch", daemon=True
                    )
                    self._thread.start()
                self._cond.notify_all()

    def close(self) -> None:
        """Stop the thread and wait for it (at most about a second). Idempotent.

        Example::

            watcher.close()
        """
        with self._cond:
            self._closed = True
            if self._on_loop is not None:
                self._on_loop.closed = True  # its wait ends, and no request starts
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            # A request in progress ends within its timeout (< the join's); the thread
            # does not wait for one handed to an event loop (the caller's, maybe, which
            # cannot run it while it waits here), which ends on its own. DNS lookups,
            # which cannot be interrupted, run on threads of their own, daemons that do
            # not keep the process alive.
            thread.join(CLOSE_JOIN_TIMEOUT)

    def discover_now(self, timeout: float = DISCOVER_WAIT) -> bool:
        """Resolve the discovery name now, waiting at most ``timeout`` seconds for it.

        For a fleet known only from DNS, before its first call. ``False``: the lookup
        failed, found nothing or is not over yet (it goes on, and the state gets what it
        answers). The lookup runs on a thread of its own, never the caller's: a resolver
        can hang (a lost UDP packet, Kubernetes search domains) and cannot be
        interrupted. Callers that come while one is under way wait for that one.

        Example::

            watcher.discover_now()   # True: the state has the endpoints DNS gave
        """
        lookup = self._start_lookup()
        return lookup is not None and lookup.done.wait(blocking_wait(timeout)) and lookup.ok

    async def discover_async(self, timeout: float = DISCOVER_WAIT) -> bool:
        """:meth:`discover_now` for an event loop: the loop runs on while DNS answers.

        Example::

            await watcher.discover_async(timeout=2.0)
        """
        lookup = self._start_lookup()
        if lookup is None:
            return False
        deadline = time.monotonic() + timeout
        while not lookup.done.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await anyio.sleep(min(_DISCOVER_POLL, left))
        return lookup.ok

    def _start_lookup(self) -> _Lookup | None:
        """The lookup under way, or a new one; ``None`` without discovery or once closed."""
        if self._discovery is None:
            return None
        with self._cond:
            if self._closed:
                return None
            lookup = self._lookup
            if lookup is None or lookup.done.is_set():
                lookup = self._lookup = _Lookup()
                threading.Thread(
                    target=self._run_lookup, args=(lookup,), name="llmstream-fleet-dns", daemon=True
                ).start()
            return lookup

    def _run_lookup(self, lookup: _Lookup) -> None:
        try:
            lookup.ok = self._discover(self._clock())
        except Exception as exc:  # _discover catches per step; this is a last resort
            logger.debug("fleet watcher: discovery failed (%s)", type(exc).__name__)
        finally:
            lookup.done.set()

    # -- the thread --------------------------------------------------------------------

    def _idle(self, now: float) -> bool:
        last_call = self._state.last_call_at
        last = self._woken_at if last_call is None else max(last_call, self._woken_at)
        return now - last > self._idle_after

    def _woken_since(self, then: float) -> bool:
        # A wake the thread has not answered with a round: the thread may run late (a
        # loaded machine), and by its clock the call may already look two intervals old.
        return self._woken_at > then

    def _run(self) -> None:
        try:
            if self._sender is not None:
                self._loop(self._sender)
            else:
                with httpx.Client(
                    transport=self._transport,
                    verify=self._verify,
                    follow_redirects=False,
                    timeout=MAX_REQUEST_TIMEOUT,
                ) as http:
                    self._loop(_InThread(http))
        except Exception as exc:  # the loop catches per task; this is a last resort
            logger.debug("fleet watcher stopped by %s", type(exc).__name__)
        finally:
            with self._cond:
                self._thread = None  # the next wake() starts a new one, unless closed

    def _loop(self, sender: _InThread | _OnLoop) -> None:
        # -inf: due at once; +inf: never (a task that is off must not make the wait 0).
        next_scrape = -math.inf if self._scrape_interval is not None else math.inf
        next_dns = -math.inf if self._discovery is not None else math.inf
        next_probe = -math.inf
        looked = -math.inf  # when the thread last found it had calls to watch
        while True:
            with self._cond:
                if self._closed:
                    return
                now = self._clock()
                if self._idle(now) and not self._woken_since(looked):
                    self._sleeping = True
                    # Anyone waiting to see the thread asleep (a test) is told.
                    self._cond.notify_all()
                    while (
                        not self._closed
                        and self._idle(self._clock())
                        and not self._woken_since(looked)
                    ):
                        self._cond.wait()
                    self._sleeping = False
                    # Asleep only after two intervals without a call: the scrape and
                    # the probes are overdue, so the next round runs at once.
                    continue
                looked = now
            now = self._clock()
            if self._scrape_interval is not None and now >= next_scrape:
                next_scrape = now + self._scrape_interval
                self._scrape_all(sender)
            now = self._clock()
            if now >= next_probe:
                next_probe = now + self._probe_interval
                self._probe_all(sender)
            now = self._clock()
            if self._discovery is not None and now >= next_dns:
                next_dns = now + self._discovery.interval
                # Not on this thread: a resolver that hangs must hold up neither the
                # scrapes nor close() (a lookup cannot be interrupted).
                self._start_lookup()
            with self._cond:
                if not self._closed:
                    due = min(next_scrape, next_probe, next_dns)
                    self._cond.wait(blocking_wait(due - self._clock()))

    def _scrape_all(self, sender: _InThread | _OnLoop) -> None:
        assert self._scrape_interval is not None
        timeout = min(self._scrape_interval, MAX_REQUEST_TIMEOUT)
        for endpoint in self._state.endpoints:
            if self._closed:
                return
            try:
                if endpoint.breaker.state(self._clock()) == "open":
                    continue  # probed instead; scraped again once half-open
                page = self._get(sender, endpoint, "/metrics", timeout)
                report = parse_vllm_load(page) if page is not None else None
                if page is not None and report is None:
                    logger.debug("%s/metrics has no vLLM load figures", _root(endpoint))
                self._state.record_load(endpoint, report, self._clock())
            except _NotAsked:
                return  # no event loop to send on: the round waits for the next call
            except Exception as exc:
                logger.debug("fleet watcher: scraping failed (%s)", type(exc).__name__)

    def _probe_all(self, sender: _InThread | _OnLoop) -> None:
        timeout = min(self._probe_interval, MAX_REQUEST_TIMEOUT)
        for endpoint in self._state.endpoints:
            if self._closed:
                return
            try:
                ok = self._get(sender, endpoint, "/health", timeout, text=False) is not None
                self._state.record_probe(endpoint, ok, self._clock())
            except _NotAsked:
                return
            except Exception as exc:
                logger.debug("fleet watcher: probing failed (%s)", type(exc).__name__)

    def _get(
        self,
        sender: _InThread | _OnLoop,
        endpoint: E,
        path: str,
        timeout: float,
        *,
        text: bool = True,
    ) -> str | None:
        """The body of a 200 answer to GET ``path``, or ``None``.

        ``text=False``: only whether it answered 200 matters; the body is read (to keep
        the connection) but not decoded, and ``""`` stands for it.
        """
        url = _root(endpoint) + path
        key = endpoint.endpoint.api_key
        # identity: httpx asks for gzip, brotli and zstd by default, and a compressed
        # body is a bomb in waiting (1.6 kB of brotli decode to 1 GiB). vLLM's /metrics
        # (prometheus_client) is compressed only when gzip is asked for.
        headers = {"Accept-Encoding": "identity"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if key and not _sendable(key):
            # The HTTP library would refuse it, and its own debug log quotes refused values.
            logger.debug("%s not asked: the API key is not a valid header value", url)
            return None
        return sender.get(url, headers, timeout, text=text)

    def _discover(self, now: float) -> bool:
        discovery = self._discovery
        if discovery is None:
            return False
        try:
            answers = socket.getaddrinfo(discovery.host, discovery.port, type=socket.SOCK_STREAM)
        except (OSError, ValueError) as exc:  # ValueError: a name with a NUL, say
            # Keep the endpoints known so far: a DNS hiccup must not empty the fleet.
            logger.debug("resolving %s failed (%s)", discovery.host, type(exc).__name__)
            return False
        urls: list[str] = []
        for family, _type, _proto, _name, sockaddr in answers:
            address = sockaddr[0]
            if family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, str):
                url = discovery.url_for(address)
                if url not in urls:
                    urls.append(url)
        if not urls:
            logger.debug("%s resolved to no addresses", discovery.host)
            return False
        try:
            self._state.replace_discovered(urls, now)
        except Exception as exc:
            logger.debug("fleet watcher: discovery failed (%s)", type(exc).__name__)
            return False
        return True


class _NotAsked(Exception):
    """A request handed to an event loop was not sent: no loop ran it (nothing to record)."""


class _InThread:
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


class _OnLoop:
    """Sends with an ``httpx.AsyncClient``, on the event loop the calls run in.

    ``loop`` is the loop a call last woke the watcher from. Each request runs there as a
    task of its own, so the loop never waits on one, while the thread waits for its page
    (and parses it: that costs the loop nothing either). The wait ends at once when the
    watcher closes. A request the loop did not run (the loop ended, or is blocked)
    raises :class:`_NotAsked`, and the loop is forgotten until the next call tells
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
        """The page at ``url``, fetched on the loop; raises :class:`_NotAsked`."""
        loop = self.loop
        if loop is None:
            raise _NotAsked
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
            raise _NotAsked
        return request.page


class _LoopRequest:
    """One GET handed to an event loop, and what came of it."""

    def __init__(
        self, sender: _OnLoop, url: str, headers: Mapping[str, str], timeout: float, *, text: bool
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


def _running_loop() -> _AsyncioLoop | _TrioLoop | None:
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


def _root(endpoint: WatchedEndpoint) -> str:
    return service_root(endpoint.url)


def _sendable(key: str) -> bool:
    """Whether ``key`` is a valid header value: visible ASCII, inner spaces only."""
    return key.isascii() and key.isprintable() and key == key.strip()
