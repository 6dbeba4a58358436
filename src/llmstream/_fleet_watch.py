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

import logging
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

import anyio
import httpx

from ._deadlines import blocking_wait
from ._fleet_pages import InThread, NotAsked, OnLoop, running_loop
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
        self._sender: InThread | OnLoop | None = None  # None: a client of its own
        self._on_loop: OnLoop | None = None  # the sender, when it needs the calls' loop

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
            self._sender = self._on_loop = OnLoop(http, self._cond)
        else:
            self._sender, self._on_loop = InThread(http), None

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
            on_loop.loop = running_loop()
        # The thread sets _sleeping before it reads _woken_at for the last time, and
        # this reads _sleeping after writing _woken_at: one of the two sees the other.
        if self._thread is None or self._sleeping:
            with self._cond:
                if self._closed:
                    return
                if on_loop is not None:
                    # After a pause the calls may run in another loop (a second
                    # asyncio.run()): the one this call runs in is the one to send on.
                    on_loop.loop = running_loop() or on_loop.loop
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
                    self._loop(InThread(http))
        except Exception as exc:  # the loop catches per task; this is a last resort
            logger.debug("fleet watcher stopped by %s", type(exc).__name__)
        finally:
            with self._cond:
                self._thread = None  # the next wake() starts a new one, unless closed

    def _loop(self, sender: InThread | OnLoop) -> None:
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

    def _scrape_all(self, sender: InThread | OnLoop) -> None:
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
            except NotAsked:
                return  # no event loop to send on: the round waits for the next call
            except Exception as exc:
                logger.debug("fleet watcher: scraping failed (%s)", type(exc).__name__)

    def _probe_all(self, sender: InThread | OnLoop) -> None:
        timeout = min(self._probe_interval, MAX_REQUEST_TIMEOUT)
        for endpoint in self._state.endpoints:
            if self._closed:
                return
            try:
                ok = self._get(sender, endpoint, "/health", timeout, text=False) is not None
                self._state.record_probe(endpoint, ok, self._clock())
            except NotAsked:
                return
            except Exception as exc:
                logger.debug("fleet watcher: probing failed (%s)", type(exc).__name__)

    def _get(
        self,
        sender: InThread | OnLoop,
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


def _root(endpoint: WatchedEndpoint) -> str:
    return service_root(endpoint.url)


def _sendable(key: str) -> bool:
    """Whether ``key`` is a valid header value: visible ASCII, inner spaces only."""
    return key.isascii() and key.isprintable() and key == key.strip()
