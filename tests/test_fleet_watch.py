"""The fleet watcher's thread against real loopback servers: scraping, probing, DNS, idling.

The watcher talks to the fleet's state only through the ``WatchedFleet`` protocol; here a
test double (``FakeFleet``) implements it and records what it is told.
"""

from __future__ import annotations

import http.server
import itertools
import logging
import socket
import struct
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest

from llmstream import _fleet_pages
from llmstream._fleet_watch import FleetWatcher, service_root
from llmstream._vllm_metrics import LoadReport

from .conftest import DATA

METRICS = (DATA / "vllm_metrics_0_33.txt").read_bytes()
REPORT = LoadReport(running=4.0, waiting=7.0, kv_cache=0.5)
KEY = "sk-fleet-watch-0123456789"
WAIT = 5.0  # bound on every wait for something that must happen

Answer = tuple[int, bytes]


# -- a loopback server that records every request -------------------------------------


@dataclass
class Seen:
    path: str
    authorization: str | None
    at: float
    accept_encoding: str | None = None


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Recorder
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        server = self.server
        with server.cond:
            server.seen.append(
                Seen(
                    self.path,
                    self.headers.get("Authorization"),
                    time.monotonic(),
                    self.headers.get("Accept-Encoding"),
                )
            )
            server.cond.notify_all()
        answer = server.routes.get(self.path, (404, b'{"detail":"Not Found"}'))
        if callable(answer):
            answer = answer()
        status, body = answer
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in server.headers.get(self.path, {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Recorder(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, Answer | Callable[[], Answer]] = {}
        self.headers: dict[str, dict[str, str]] = {}  # more headers of a path's answer
        self.seen: list[Seen] = []
        self.cond = threading.Condition()

    def base(self, prefix: str = "") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{prefix}/v1"

    def requests(self, path: str) -> list[Seen]:
        with self.cond:
            return [s for s in self.seen if s.path == path]

    def gaps(self, path: str) -> list[float]:
        """Seconds between successive requests for ``path``."""
        return [b.at - a.at for a, b in itertools.pairwise(self.requests(path))]

    def wait_for(self, path: str, count: int, timeout: float = WAIT) -> bool:
        """Whether ``path`` has been asked ``count`` times within ``timeout`` seconds."""
        with self.cond:
            return self.cond.wait_for(
                lambda: sum(s.path == path for s in self.seen) >= count, timeout
            )


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    recorder = Recorder()
    thread = threading.Thread(target=recorder.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield recorder
    recorder.shutdown()
    recorder.server_close()
    thread.join(WAIT)


def _refused_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"  # nobody listens once closed


# -- the test double of the fleet state (implements WatchedFleet) ----------------------


@dataclass
class FakeKey:
    api_key: str | None = None


@dataclass
class FakeBreaker:
    current: str = "closed"

    def state(self, now: float) -> str:
        return self.current


@dataclass(eq=False)
class FakeEndpoint:
    url: str
    endpoint: FakeKey = field(default_factory=FakeKey)
    breaker: FakeBreaker = field(default_factory=FakeBreaker)


class FakeFleet:
    """Records what the watcher reports. ``busy``: a call starts at every instant."""

    def __init__(self, *endpoints: FakeEndpoint, busy: bool = True) -> None:
        self.endpoints = list(endpoints)
        self.busy = busy
        self.loads: list[tuple[FakeEndpoint, LoadReport | None]] = []
        self.probes: list[tuple[FakeEndpoint, bool]] = []
        self.discovered: list[list[str]] = []
        self.cond = threading.Condition()
        self.fail_next_record = False

    @property
    def last_call_at(self) -> float | None:
        return time.monotonic() if self.busy else None

    def _record(self, into: list[Any], item: Any) -> None:
        with self.cond:
            into.append(item)
            self.cond.notify_all()
            if self.fail_next_record:
                self.fail_next_record = False
                raise RuntimeError("a bug in the state")

    def record_load(self, endpoint: FakeEndpoint, report: LoadReport | None, now: float) -> None:
        self._record(self.loads, (endpoint, report))

    def record_probe(self, endpoint: FakeEndpoint, ok: bool, now: float) -> None:
        self._record(self.probes, (endpoint, ok))

    def replace_discovered(self, urls: Any, now: float) -> None:
        self._record(self.discovered, list(urls))

    def wait_for(self, predicate: Callable[[], bool]) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, WAIT)

    def loads_of(self, endpoint: FakeEndpoint) -> list[LoadReport | None]:
        with self.cond:
            return [report for e, report in self.loads if e is endpoint]


class ManualClock:
    """A clock that moves only when told; :meth:`hold` makes other threads' readings wait.

    Holding it stands for a watcher thread that runs late (a loaded machine): the test
    moves the clock on meanwhile, and the thread reads the new time when released.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self._free = threading.Event()
        self._free.set()
        self._test = threading.get_ident()

    def __call__(self) -> float:
        if threading.get_ident() != self._test:
            assert self._free.wait(WAIT), "the clock was held too long"
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def hold(self) -> None:
        self._free.clear()

    def release(self) -> None:
        self._free.set()


def _asleep(watcher: FleetWatcher[Any]) -> bool:
    """Whether the thread falls asleep (for want of calls) within ``WAIT`` seconds."""
    with watcher._cond:
        return watcher._cond.wait_for(lambda: watcher._sleeping, WAIT)


@pytest.fixture
def watchers() -> Iterator[list[FleetWatcher[FakeEndpoint]]]:
    made: list[FleetWatcher[FakeEndpoint]] = []
    yield made
    for watcher in made:
        watcher.close()


def _watch(
    made: list[FleetWatcher[FakeEndpoint]],
    fleet: FakeFleet,
    *,
    scrape: float | None = 0.05,
    probe: float = 0.05,
    discovery: Any = None,
    clock: Callable[[], float] = time.monotonic,
) -> FleetWatcher[FakeEndpoint]:
    watcher = FleetWatcher(
        fleet, scrape_interval=scrape, probe_interval=probe, discovery=discovery, clock=clock
    )
    made.append(watcher)
    return watcher


# -- scraping ---------------------------------------------------------------------------


def test_the_service_root_is_the_base_url_without_v1() -> None:
    assert service_root("http://gpu-1:8000/v1") == "http://gpu-1:8000"
    assert service_root("http://gpu-1:8000/v1/") == "http://gpu-1:8000"
    assert service_root("https://proxy/vllm-a/v1") == "https://proxy/vllm-a"
    assert service_root("http://gpu-1:8000") == "http://gpu-1:8000"
    assert service_root("http://gpu-1:8000/openai") == "http://gpu-1:8000/openai"


def test_scrapes_every_interval_while_calls_are_made(server: Recorder, watchers: Any) -> None:
    server.routes["/metrics"] = (200, METRICS)
    endpoint = FakeEndpoint(server.base(), FakeKey(KEY))
    fleet = FakeFleet(endpoint)
    # A scrape's time limit is its interval: one long enough that a loaded machine's
    # loopback answers in time (a scrape that runs out records no load, rightly).
    watcher = _watch(watchers, fleet, scrape=0.25)
    assert server.requests("/metrics") == []  # nothing before the first call

    watcher.wake()
    assert server.wait_for("/metrics", 4)
    fleet.wait_for(lambda: len(fleet.loads) >= 4)
    assert set(fleet.loads_of(endpoint)) == {REPORT}
    gaps = server.gaps("/metrics")
    assert min(gaps) >= 0.2, gaps  # at the interval, not faster
    assert {s.authorization for s in server.requests("/metrics")} == {f"Bearer {KEY}"}
    assert {s.authorization for s in server.requests("/health")} <= {f"Bearer {KEY}"}


def test_no_scraping_without_a_scrape_interval(server: Recorder, watchers: Any) -> None:
    server.routes["/metrics"] = (200, METRICS)
    closed = FakeEndpoint(server.base("/a"))
    down = FakeEndpoint(server.base("/b"), breaker=FakeBreaker("open"))
    fleet = FakeFleet(closed, down)
    watcher = _watch(watchers, fleet, scrape=None, probe=0.05)
    watcher.wake()
    assert server.wait_for("/b/health", 3)  # the thread runs, and probes
    assert server.requests("/a/metrics") == server.requests("/b/metrics") == []
    assert fleet.loads == []


def test_sleeps_while_idle_and_wakes_on_the_next_call(server: Recorder, watchers: Any) -> None:
    # The watcher's clock moves only when the test says: no real time is measured.
    server.routes["/metrics"] = (200, METRICS)
    clock = ManualClock()
    fleet = FakeFleet(FakeEndpoint(server.base()), busy=False)
    watcher = _watch(watchers, fleet, scrape=0.05, clock=clock)
    watcher.wake()  # one call, at 0: idle after two intervals (0.1)
    assert server.wait_for("/metrics", 1)  # a round at once
    clock.advance(0.05)
    assert server.wait_for("/metrics", 2)  # and one each interval
    clock.advance(0.06)  # more than two intervals since the call: asleep, no third round
    assert _asleep(watcher)
    clock.advance(10.0)  # 200 intervals: asleep, it reads nothing
    assert len(server.requests("/metrics")) == 2

    watcher.wake()  # the next call: a round at once (the clock stands still: not after an interval)
    assert server.wait_for("/metrics", 3)
    assert len(server.requests("/metrics")) == 3


@pytest.mark.parametrize("asleep", [False, True], ids=["starting", "asleep"])
def test_a_wake_gets_a_round_however_late_the_thread_runs(
    server: Recorder, watchers: Any, asleep: bool
) -> None:
    # A thread that starts (or wakes) late must not judge by its clock alone that the
    # call that woke it is two intervals old, and go to sleep without a round for it.
    server.routes["/metrics"] = (200, METRICS)
    clock = ManualClock()
    fleet = FakeFleet(FakeEndpoint(server.base()), busy=False)
    watcher = _watch(watchers, fleet, scrape=0.05, clock=clock)
    if asleep:
        watcher.wake()
        assert server.wait_for("/metrics", 1)
        clock.advance(1.0)
        assert _asleep(watcher)
    seen = len(server.requests("/metrics"))
    clock.hold()  # the thread reads the clock only once released: it runs late
    watcher.wake()  # a call, now
    clock.advance(1.0)  # 20 intervals pass before the thread runs
    clock.release()
    assert server.wait_for("/metrics", seen + 1)


@pytest.mark.parametrize("scrape", [0.05, None], ids=["scrape", "probe-only"])
def test_waits_between_rounds_without_spinning(server: Recorder, scrape: float | None) -> None:
    server.routes["/metrics"] = (200, METRICS)
    server.routes["/health"] = (503, b"")
    ticks = 0

    def clock() -> float:
        nonlocal ticks
        ticks += 1
        return time.monotonic()

    breaker = FakeBreaker("closed" if scrape else "open")
    watcher = FleetWatcher(
        FakeFleet(FakeEndpoint(server.base(), breaker=breaker)),
        scrape_interval=scrape,
        probe_interval=0.05,
        clock=clock,
    )
    try:
        watcher.wake()
        assert server.wait_for("/metrics" if scrape else "/health", 6)
    finally:
        watcher.close()
    assert ticks < 100  # under ten a round; a loop that does not wait asks thousands


def test_a_call_recorded_by_the_state_keeps_it_awake(server: Recorder, watchers: Any) -> None:
    server.routes["/metrics"] = (200, METRICS)
    fleet = FakeFleet(FakeEndpoint(server.base()), busy=True)
    watcher = _watch(watchers, fleet, scrape=0.05)
    watcher.wake()  # once; the state's last_call_at says calls go on
    assert server.wait_for("/metrics", 10)  # 0.5 s: five times the idle time


@pytest.mark.parametrize(
    "answer",
    [
        (404, b'{"detail":"Not Found"}'),
        (500, b"Internal Server Error"),
        (200, b"<html><body>Jupyter Server</body></html>"),
        (200, b"\xff\xfe\x00garbage{{{\n"),
        (401, b'{"error":"Unauthorized"}'),
    ],
    ids=["404", "500", "html", "binary", "401"],
)
def test_no_usable_page_is_reported_as_no_load(
    server: Recorder, watchers: Any, answer: Answer
) -> None:
    server.routes["/metrics"] = answer
    endpoint = FakeEndpoint(server.base())
    fleet = FakeFleet(endpoint)
    _watch(watchers, fleet).wake()
    fleet.wait_for(lambda: len(fleet.loads) >= 2)  # a second round: the thread lives on
    assert set(fleet.loads_of(endpoint)) == {None}


def test_a_refused_connection_is_no_load_and_others_are_still_read(
    server: Recorder, watchers: Any
) -> None:
    server.routes["/metrics"] = (200, METRICS)
    dead, alive = FakeEndpoint(_refused_url()), FakeEndpoint(server.base())
    fleet = FakeFleet(dead, alive)
    _watch(watchers, fleet, scrape=0.25).wake()  # time enough for a loaded machine
    fleet.wait_for(lambda: len(fleet.loads) >= 4)
    assert set(fleet.loads_of(dead)) == {None}
    assert set(fleet.loads_of(alive)) == {REPORT}


def test_an_oversized_page_is_not_read(
    server: Recorder, watchers: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_fleet_pages, "MAX_PAGE_BYTES", 1000)
    server.routes["/metrics"] = (200, b"vllm:num_requests_running 1\n" * 100)
    endpoint = FakeEndpoint(server.base())
    fleet = FakeFleet(endpoint)
    _watch(watchers, fleet).wake()
    fleet.wait_for(lambda: len(fleet.loads) >= 1)
    assert fleet.loads_of(endpoint)[0] is None


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    """A 1 MB gzip body that decodes to 1 GiB of zeros."""
    # One MiB compressed once and repeated: a full flush ends a deflate block on a byte
    # and forgets the history, so copies of it follow each other (compressing the whole
    # GiB would take seconds).
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(1024):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    trailer = struct.pack("<II", crc, (1 << 30) & 0xFFFFFFFF)
    return header + block * 1024 + compressor.flush() + trailer


def test_a_compression_bomb_is_neither_asked_for_nor_decoded(
    server: Recorder, watchers: Any, gzip_bomb: bytes
) -> None:
    # A server that compresses anyway, though the watcher asks for no encoding: the body
    # is read as sent (1 MB, under MAX_PAGE_BYTES) and refused, and the 200 of /health
    # still counts. Decoded, one 64 kB read alone would be 64 MB.
    for path in ("/metrics", "/health"):
        server.routes[path] = (200, gzip_bomb)
        server.headers[path] = {"Content-Encoding": "gzip"}
    endpoint = FakeEndpoint(server.base())
    fleet = FakeFleet(endpoint)
    tracemalloc.start()
    try:
        _watch(watchers, fleet).wake()
        fleet.wait_for(lambda: len(fleet.loads) >= 2 and len(fleet.probes) >= 2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * _fleet_pages.MAX_PAGE_BYTES, f"{peak / 2**20:.0f} MiB at the peak"
    assert set(fleet.loads_of(endpoint)) == {None}
    with fleet.cond:
        assert {ok for _, ok in fleet.probes} == {True}
    assert {s.accept_encoding for s in server.requests("/metrics")} == {"identity"}
    assert {s.accept_encoding for s in server.requests("/health")} == {"identity"}


def test_an_identity_encoded_page_is_read(server: Recorder, watchers: Any) -> None:
    server.routes["/metrics"] = (200, METRICS)
    server.headers["/metrics"] = {"Content-Encoding": "identity"}
    endpoint = FakeEndpoint(server.base())
    fleet = FakeFleet(endpoint)
    _watch(watchers, fleet).wake()
    fleet.wait_for(lambda: len(fleet.loads) >= 1)
    assert fleet.loads_of(endpoint)[0] == REPORT


def test_an_error_in_the_state_does_not_stop_the_thread(server: Recorder, watchers: Any) -> None:
    server.routes["/metrics"] = (200, METRICS)
    fleet = FakeFleet(FakeEndpoint(server.base()))
    fleet.fail_next_record = True
    _watch(watchers, fleet).wake()
    fleet.wait_for(lambda: len(fleet.loads) >= 3)


# -- probing ----------------------------------------------------------------------------


def test_probes_health_of_every_endpoint_and_scrapes_only_those_not_open(
    server: Recorder, watchers: Any
) -> None:
    server.routes["/closed/metrics"] = server.routes["/half/metrics"] = (200, METRICS)
    server.routes["/open/health"] = (503, b"")
    server.routes["/half/health"] = (200, b"")
    server.routes["/closed/health"] = (200, b"")
    closed = FakeEndpoint(server.base("/closed"), FakeKey(KEY))
    down = FakeEndpoint(server.base("/open"), FakeKey(KEY), FakeBreaker("open"))
    half = FakeEndpoint(server.base("/half"), FakeKey(KEY), FakeBreaker("half_open"))
    fleet = FakeFleet(closed, down, half)
    _watch(watchers, fleet, scrape=0.05, probe=0.05).wake()

    every = {(down.url, False), (half.url, True), (closed.url, True)}
    fleet.wait_for(lambda: {(e.url, ok) for e, ok in fleet.probes} >= every)
    assert server.requests("/open/metrics") == []  # down: probed, not scraped
    assert server.wait_for("/half/metrics", 1)  # half-open: scraped too
    assert server.wait_for("/closed/metrics", 1)
    assert {s.authorization for s in server.requests("/open/health")} == {f"Bearer {KEY}"}

    down.breaker.current = "closed"  # the probe (or a call) closed it
    assert server.wait_for("/open/metrics", 2)  # back to being scraped


def test_probes_every_probe_interval(server: Recorder, watchers: Any) -> None:
    server.routes["/health"] = (200, b"")
    fleet = FakeFleet(FakeEndpoint(server.base(), breaker=FakeBreaker("open")))
    _watch(watchers, fleet, scrape=0.02, probe=0.1).wake()
    assert server.wait_for("/health", 3)
    gaps = server.gaps("/health")
    assert min(gaps) >= 0.09, gaps


# -- DNS discovery ----------------------------------------------------------------------


@dataclass(frozen=True)
class FakeDiscovery:
    """Shaped like llmstream.DNSDiscovery: what the watcher reads of it."""

    host: str = "vllm.fleet.test"
    port: int = 8000
    interval: float = 0.05

    def url_for(self, address: str) -> str:
        host = f"[{address}]" if ":" in address else address
        return f"http://{host}:{self.port}/v1"


class FakeDNS:
    """Answers for one name, in turn (a list of addresses, or an exception); the rest real."""

    def __init__(self, host: str, answers: list[list[str] | Exception]) -> None:
        self.host = host
        self.answers = answers
        self.asked: list[tuple[Any, ...]] = []
        self.real = socket.getaddrinfo

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != self.host:
            return self.real(host, port, *args, **kwargs)
        self.asked.append((port, args, kwargs))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return [
            (
                socket.AF_INET6 if ":" in a else socket.AF_INET,
                socket.SOCK_STREAM,
                6,
                "",
                (a, port, 0, 0) if ":" in a else (a, port),
            )
            for a in answer
            for _ in range(2)  # duplicates, as for several protocols
        ]


def test_re_resolves_dns_every_interval(
    watchers: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="llmstream")
    dns = FakeDNS(
        "vllm.fleet.test",
        [
            ["10.0.0.1", "10.0.0.2"],
            ["10.0.0.2", "fd00::3"],
            socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
            [],
            ["10.0.0.4"],
        ],
    )
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    fleet = FakeFleet()
    watcher = _watch(watchers, fleet, scrape=None, discovery=FakeDiscovery())
    watcher.wake()
    fleet.wait_for(lambda: len(fleet.discovered) >= 3)
    # A failed or empty answer keeps the endpoints known so far: no call for them.
    assert fleet.discovered[:3] == [
        ["http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1"],
        ["http://10.0.0.2:8000/v1", "http://[fd00::3]:8000/v1"],
        ["http://10.0.0.4:8000/v1"],
    ]
    assert len(dns.asked) >= 5
    assert dns.asked[0] == (8000, (), {"type": socket.SOCK_STREAM})
    logged = [r.getMessage() for r in caplog.records if "vllm.fleet.test" in r.getMessage()]
    assert len(logged) >= 2, logged  # the failure and the empty answer


def test_discover_now_resolves_and_tells_whether_it_found_any(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dns = FakeDNS("vllm.fleet.test", [["10.0.0.9"]])
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    fleet = FakeFleet()
    watcher = FleetWatcher(
        fleet, scrape_interval=1.0, probe_interval=1.0, discovery=FakeDiscovery()
    )
    assert watcher.discover_now() is True
    assert fleet.discovered == [["http://10.0.0.9:8000/v1"]]
    dns.answers[:] = [socket.gaierror(socket.EAI_NONAME, "Name or service not known")]
    assert watcher.discover_now() is False
    assert fleet.discovered == [["http://10.0.0.9:8000/v1"]]
    assert FleetWatcher(fleet, scrape_interval=1.0, probe_interval=1.0).discover_now() is False
    dns.answers[:] = [ValueError("embedded null byte")]  # what getaddrinfo raises for "a\0b"
    assert watcher.discover_now() is False


def _slow_dns(monkeypatch: pytest.MonkeyPatch, seconds: float) -> FakeDNS:
    """FakeDNS answering 10.0.0.9 after ``seconds``, as a resolver that lost a packet."""
    dns = FakeDNS("vllm.fleet.test", [["10.0.0.9"]])

    def slow(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == dns.host:
            time.sleep(seconds)
        return dns(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    return dns


def test_discover_now_waits_for_a_slow_lookup_at_most_its_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dns = _slow_dns(monkeypatch, 0.5)
    fleet = FakeFleet()
    watcher = FleetWatcher(
        fleet, scrape_interval=1.0, probe_interval=1.0, discovery=FakeDiscovery()
    )
    try:
        started = time.monotonic()
        results: list[bool] = []
        callers = [
            threading.Thread(target=lambda: results.append(watcher.discover_now(timeout=0.1)))
            for _ in range(3)
        ]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(WAIT)
        assert results == [False] * 3
        assert time.monotonic() - started < 0.4
        # The lookup goes on, once for all three, and the state gets its answer.
        fleet.wait_for(lambda: fleet.discovered == [["http://10.0.0.9:8000/v1"]])
        assert len(dns.asked) == 1
        assert watcher.discover_now(timeout=WAIT) is True
    finally:
        watcher.close()


@pytest.mark.anyio
async def test_discover_async_lets_the_event_loop_run(
    monkeypatch: pytest.MonkeyPatch, anyio_backend: object
) -> None:
    _slow_dns(monkeypatch, 0.5)
    fleet = FakeFleet()
    watcher = FleetWatcher(
        fleet, scrape_interval=1.0, probe_interval=1.0, discovery=FakeDiscovery()
    )
    gaps: list[float] = []

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await anyio.sleep(0.01)
            gaps.append(time.monotonic() - last)
            last = time.monotonic()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(tick)
            assert await watcher.discover_async(timeout=0.05) is False  # bounded
            assert await watcher.discover_async(timeout=WAIT) is True
            tg.cancel_scope.cancel()
    finally:
        watcher.close()
    assert fleet.discovered == [["http://10.0.0.9:8000/v1"]]
    assert max(gaps) < 0.25, max(gaps)


# -- closing ----------------------------------------------------------------------------


def closes_at_once(watcher: FleetWatcher[Any], within: float = 0.5) -> None:
    """``close()`` stops the running thread within ``within`` seconds."""
    thread = watcher._thread
    assert thread is not None
    started = time.monotonic()
    watcher.close()
    assert time.monotonic() - started < within
    assert not thread.is_alive()


def test_close_stops_a_sleeping_or_waiting_thread_at_once(server: Recorder) -> None:
    server.routes["/metrics"] = (200, METRICS)
    for busy in (False, True):
        fleet = FakeFleet(FakeEndpoint(server.base()), busy=busy)
        watcher = FleetWatcher(fleet, scrape_interval=30.0, probe_interval=30.0)
        watcher.wake()
        assert server.wait_for("/metrics", 1 + busy)  # the first round of each watcher
        closes_at_once(watcher)


def test_close_during_a_hung_request_returns_within_a_second(server: Recorder) -> None:
    asked, release = threading.Event(), threading.Event()

    def hang() -> Answer:
        asked.set()
        release.wait(WAIT)
        return (200, METRICS)

    server.routes["/metrics"] = hang
    watcher = FleetWatcher(
        FakeFleet(FakeEndpoint(server.base())), scrape_interval=5.0, probe_interval=5.0
    )
    try:
        watcher.wake()
        assert asked.wait(WAIT)
        closes_at_once(watcher, within=1.5)
    finally:
        release.set()


def test_requests_go_through_the_given_transport() -> None:
    seen: list[httpx.Request] = []
    fleet = FakeFleet(FakeEndpoint("https://gpu-1.internal:8443/v1", FakeKey(KEY)))

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=METRICS)

    watcher = FleetWatcher(
        fleet, scrape_interval=0.05, probe_interval=0.05, transport=httpx.MockTransport(answer)
    )
    try:
        watcher.wake()
        fleet.wait_for(lambda: len(fleet.loads) >= 1)
    finally:
        watcher.close()
    assert str(seen[0].url) == "https://gpu-1.internal:8443/metrics"
    assert seen[0].headers["Authorization"] == f"Bearer {KEY}"
    assert fleet.loads[0][1] == REPORT


def test_a_closed_watcher_is_not_started_again(server: Recorder) -> None:
    server.routes["/metrics"] = (200, METRICS)
    watcher = FleetWatcher(
        FakeFleet(FakeEndpoint(server.base())), scrape_interval=0.05, probe_interval=0.05
    )
    watcher.close()
    watcher.wake()
    assert watcher._thread is None
    assert not server.wait_for("/metrics", 1, timeout=0.2)


# -- keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [KEY, "sk-bad\r\nX-Injected: 1", "sk-caf\u00e9", "sk-trailing "],
    ids=["key", "newline", "non-ascii", "trailing-space"],
)
def test_the_key_is_sent_but_never_logged(
    server: Recorder, watchers: Any, caplog: pytest.LogCaptureFixture, key: str
) -> None:
    caplog.set_level(logging.DEBUG)
    server.routes["/ok/metrics"] = (200, METRICS)
    server.routes["/down/health"] = (503, b"")
    endpoints = [
        FakeEndpoint(server.base("/ok"), FakeKey(key)),
        FakeEndpoint(server.base("/missing"), FakeKey(key)),
        FakeEndpoint(server.base("/down"), FakeKey(key), FakeBreaker("open")),
        FakeEndpoint(_refused_url(), FakeKey(key)),
    ]
    fleet = FakeFleet(*endpoints)
    _watch(watchers, fleet, scrape=0.25).wake()  # time enough for a loaded machine
    fleet.wait_for(lambda: len(fleet.loads) >= 6 and len(fleet.probes) >= 2)
    if key == KEY:
        assert {s.authorization for s in server.requests("/ok/metrics")} == {f"Bearer {key}"}
        assert set(fleet.loads_of(endpoints[0])) == {REPORT}
    else:  # not a valid header value: nothing is sent, nothing is read
        assert server.requests("/ok/metrics") == []
        assert set(fleet.loads_of(endpoints[0])) == {None}
    assert caplog.records  # the failures were logged...
    assert "sk-" not in caplog.text  # ...without the key
