"""The fleet watcher reaches the endpoints the way the calls do: through the client's transport.

The endpoints' URLs are loopback ports where nothing answers: a listener there takes
connections and never reads them, so a scrape or a probe sent over the network shows
there (and fails, which would open the endpoint's circuit). The transport the client is
given routes each URL, by its port, to an emulated replica in process; the watcher's
scrapes must reach it, and the routing must see what the replica's ``/metrics`` says.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import anyio
import httpx
import pytest
import trio

from llmstream import _fleet_pages
from llmstream._fleet_pages import NotAsked, OnLoop, running_loop
from llmstream._fleet_watch import FleetWatcher
from llmstream.testing import FakeVLLM
from llmstream.testing._transport import FakeTransport

from .conftest import DATA
from .fleet_drivers import call_many, fleet_config, open_client, until_loads_show
from .test_fleet_watch import KEY, REPORT, FakeEndpoint, FakeFleet, FakeKey, closes_at_once

METRICS = (DATA / "vllm_metrics_0_33.txt").read_bytes()

# (mode, anyio backend): the clients that take an httpx transport. aiohttp and the
# asyncio transport go over the network only, as the watcher's own client does.
_PAIRS = [("sync", "asyncio"), ("async", "asyncio"), ("async", "trio")]
httpx_clients = pytest.mark.parametrize(
    ("mode", "anyio_backend"), _PAIRS, ids=[f"{m}-{b}" for m, b in _PAIRS]
)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy would take the network's requests away from the listeners.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


class Listeners:
    """Loopback ports that accept connections (the kernel does) and answer nothing."""

    def __init__(self, count: int) -> None:
        self.sockets: list[socket.socket] = []
        for _ in range(count):
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
            listener.setblocking(False)
            self.sockets.append(listener)
        self.ports = [s.getsockname()[1] for s in self.sockets]
        self.urls = [f"http://127.0.0.1:{port}/v1" for port in self.ports]

    def connections(self) -> int:
        """How many connections were made to any of them so far."""
        made = 0
        for listener in self.sockets:
            while True:
                try:
                    connection, _ = listener.accept()
                except BlockingIOError:
                    break
                connection.close()
                made += 1
        return made

    def close(self) -> None:
        for listener in self.sockets:
            listener.close()


@pytest.fixture
def unreachable() -> Iterator[Listeners]:
    listeners = Listeners(2)
    yield listeners
    listeners.close()


class _Routes:
    """Each request goes to the replica of its URL's port; who sent it is recorded."""

    def __init__(self, replicas: dict[int, FakeVLLM]) -> None:
        self.transports = {port: fake.transport() for port, fake in replicas.items()}
        self.senders: list[tuple[int, str]] = []  # (thread id, thread name)

    def route(self, request: httpx.Request) -> FakeTransport:
        thread = threading.current_thread()
        self.senders.append((thread.ident or 0, thread.name))
        return self.transports[request.url.port or 80]


class SyncReplicas(httpx.BaseTransport, _Routes):
    """A blocking transport only: it has no async side."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.route(request).handle_request(request)


class AsyncReplicas(httpx.AsyncBaseTransport, _Routes):
    """An async transport only: it can be used on an event loop and nowhere else."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.route(request).handle_async_request(request)


def _probed(fake: FakeVLLM) -> bool:
    return any(request.path == "/health" for request in fake.requests)


@contextlib.asynccontextmanager
async def _their_client(
    mode: str, routes: _Routes
) -> AsyncIterator[httpx.Client | httpx.AsyncClient]:
    """The caller's own httpx client over ``routes``, closed at the end."""
    if mode == "sync":
        assert isinstance(routes, httpx.BaseTransport)
        with httpx.Client(transport=routes) as http:
            yield http
    else:
        assert isinstance(routes, httpx.AsyncBaseTransport)
        async with httpx.AsyncClient(transport=routes) as ahttp:
            yield ahttp


@httpx_clients
@pytest.mark.parametrize("given", ["transport", "http_client"])
@pytest.mark.anyio
async def test_scrapes_and_probes_go_through_the_clients_transport(
    mode: str, anyio_backend: object, given: str, unreachable: Listeners
) -> None:
    replicas = [FakeVLLM(), FakeVLLM()]
    replicas[0].set_metrics(waiting=60, kv_cache=0.97)  # saturated (kv_limit 0.85)
    replicas[1].set_metrics(waiting=3, kv_cache=0.2)
    by_port = dict(zip(unreachable.ports, replicas, strict=True))
    routes: _Routes = SyncReplicas(by_port) if mode == "sync" else AsyncReplicas(by_port)
    loop_thread = threading.get_ident()

    async with _their_client(mode, routes) as http:
        reach: dict[str, Any] = {given: routes if given == "transport" else http}
        async with open_client(mode, fleet_config(unreachable.urls), **reach) as client:
            await until_loads_show(
                client,
                lambda loads: (
                    (loads[0].waiting, loads[0].kv_cache, loads[1].waiting) == (60, 0.97, 3)
                ),
                "the replicas' scripted figures",
            )
            await until_loads_show(
                client, lambda _: all(map(_probed, replicas)), "a probe of each replica"
            )
            # The routing sees them: the saturated replica gets no call.
            outcomes = await call_many(client, 6)
            assert {o.result.endpoint if o.result else None for o in outcomes} == {
                unreachable.urls[1]
            }
            assert [load.state for load in client.endpoint_loads()] == ["closed", "closed"]

    assert unreachable.connections() == 0  # nothing went over the network
    scrapes = [r for fake in replicas for r in fake.requests if r.path == "/metrics"]
    assert {r.headers.get("accept-encoding") for r in scrapes} == {"identity"}
    if mode == "sync":  # sent from the watcher's thread too
        assert "llmstream-fleet-watch" in {name for _, name in routes.senders}
    else:  # sent on the event loop only, never from the watcher's thread
        assert {ident for ident, _ in routes.senders} == {loop_thread}


class SpiedFakeTransport(FakeTransport):
    """The emulator's transport (sync and async), telling whether its sync side was used."""

    sync_requests = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sync_requests += 1
        return super().handle_request(request)


@httpx_clients
@pytest.mark.anyio
async def test_the_emulators_transport_is_used_from_the_side_the_calls_use(
    mode: str, anyio_backend: object, unreachable: Listeners
) -> None:
    # FakeVLLM().transport() is both sync and async: the async client's calls use its
    # async side, and so must the watcher; the sync client's use its sync side.
    fake = FakeVLLM()
    fake.set_metrics(waiting=5, kv_cache=0.4)
    transport = SpiedFakeTransport(fake)
    async with open_client(mode, fleet_config(unreachable.urls[:1]), transport=transport) as client:
        await until_loads_show(
            client,
            lambda loads: (loads[0].waiting, loads[0].kv_cache) == (5, 0.4),
            "the replica's scripted figures",
        )
        await until_loads_show(client, lambda _: _probed(fake), "a probe")
    assert unreachable.connections() == 0
    assert (transport.sync_requests > 0) == (mode == "sync")


# -- the watcher on an event loop ------------------------------------------------------


async def watch_on_loop(
    fleet: FakeFleet,
    answer: Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]
    | httpx.AsyncBaseTransport,
    until: Callable[[], bool],
) -> None:
    """Watch ``fleet`` through ``answer`` (a transport, or a MockTransport's handler).

    The watcher sends with an ``httpx.AsyncClient``, on this test's event loop, until
    ``until()`` holds.
    """
    # A request's time limit is its interval: long enough for a loaded machine's loop.
    watcher = FleetWatcher(fleet, scrape_interval=0.2, probe_interval=0.2)
    transport = (
        answer if isinstance(answer, httpx.AsyncBaseTransport) else httpx.MockTransport(answer)
    )
    async with httpx.AsyncClient(transport=transport) as http:
        watcher.send_with(http)
        try:
            watcher.wake()
            await anyio.to_thread.run_sync(fleet.wait_for, until)
        finally:
            watcher.close()


@pytest.mark.anyio
async def test_an_async_client_is_used_on_the_event_loop_only(anyio_backend: object) -> None:
    # httpx.MockTransport is sync and async, but with an async handler only its async
    # side works: called from the thread, it would fail (and leave a coroutine unawaited).
    loop_thread = threading.get_ident()
    seen: list[tuple[int, httpx.Request]] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        seen.append((threading.get_ident(), request))
        return httpx.Response(200, content=METRICS)

    endpoint = FakeEndpoint("https://gpu-1.internal:8443/v1", FakeKey(KEY))
    fleet = FakeFleet(endpoint)
    await watch_on_loop(fleet, answer, lambda: len(fleet.loads) >= 2 and len(fleet.probes) >= 2)
    assert set(fleet.loads_of(endpoint)) == {REPORT}
    with fleet.cond:
        assert {ok for _, ok in fleet.probes} == {True}
    assert {ident for ident, _ in seen} == {loop_thread}
    first = seen[0][1]
    assert str(first.url) == "https://gpu-1.internal:8443/metrics"
    assert first.headers["Authorization"] == f"Bearer {KEY}"
    assert first.headers["Accept-Encoding"] == "identity"


async def _vllm_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An ASGI app: vLLM's ``/metrics``, and a ``/health`` that never answers."""
    if scope["path"] != "/metrics":
        await anyio.sleep_forever()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": METRICS})


@pytest.mark.anyio
async def test_an_asgi_app_is_watched_on_the_event_loop(anyio_backend: object) -> None:
    # httpx.ASGITransport is async only, and honours no timeout: a request that hangs
    # is cut after its timeouts, and counts as no answer.
    endpoint = FakeEndpoint("http://vllm.asgi/v1")
    fleet = FakeFleet(endpoint)
    await watch_on_loop(
        fleet,
        httpx.ASGITransport(app=_vllm_app),
        lambda: len(fleet.loads) >= 1 and len(fleet.probes) >= 1,
    )
    assert fleet.loads_of(endpoint)[0] == REPORT
    with fleet.cond:
        assert fleet.probes[0] == (endpoint, False)


class _Trickle(httpx.AsyncByteStream):
    """A body streamed in pieces, not in memory; ``sent`` counts the pieces taken."""

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self._pieces = iter(pieces)
        self.sent = 0

    # An iterator object, not an async generator: one left part-way would be finalised
    # by the event loop later (and trio warns about it).
    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        piece = next(self._pieces, None)
        if piece is None:
            raise StopAsyncIteration
        self.sent += 1
        return piece


@pytest.mark.parametrize(
    ("pieces", "headers", "expected"),
    [
        ([METRICS[:100], METRICS[100:]], {}, REPORT),
        ([b"# a comment\n" * 80] * 200, {}, None),  # 192 kB, over the cap
        ([b"\x1f\x8b\x08\x00"], {"Content-Encoding": "gzip"}, None),
    ],
    ids=["streamed", "oversized", "content-encoded"],
)
@pytest.mark.anyio
async def test_pages_read_on_the_event_loop_are_bounded(
    anyio_backend: object,
    monkeypatch: pytest.MonkeyPatch,
    pieces: list[bytes],
    headers: dict[str, str],
    expected: object,
) -> None:
    monkeypatch.setattr(_fleet_pages, "MAX_PAGE_BYTES", len(METRICS) + 1000)
    bodies: list[_Trickle] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(_Trickle(pieces))
        return httpx.Response(200, headers=headers, stream=bodies[-1])

    endpoint = FakeEndpoint("http://gpu-1.internal:8000/v1")
    fleet = FakeFleet(endpoint)
    await watch_on_loop(fleet, answer, lambda: len(fleet.loads) >= 1)
    assert fleet.loads_of(endpoint)[0] == expected
    if expected is None and not headers:  # refused once over the cap: the rest is not read
        cap = _fleet_pages.MAX_PAGE_BYTES
        assert bodies[0].sent == cap // len(pieces[0]) + 1 < len(pieces)


@pytest.mark.anyio
async def test_close_does_not_wait_for_a_request_on_the_event_loop(
    anyio_backend: object,
) -> None:
    asked, release = anyio.Event(), anyio.Event()

    async def answer(request: httpx.Request) -> httpx.Response:
        asked.set()
        await release.wait()
        return httpx.Response(200, content=METRICS)

    fleet = FakeFleet(FakeEndpoint("http://gpu-1.internal:8000/v1"))
    watcher = FleetWatcher(fleet, scrape_interval=5.0, probe_interval=5.0)
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        watcher.send_with(http)
        watcher.wake()
        await asked.wait()
        # From the loop's own thread, as AsyncClient.aclose() does: the loop cannot run
        # the request meanwhile, and close() must not wait for it.
        closes_at_once(watcher)
        release.set()
    assert fleet.loads == []  # answered after the close: not recorded


def _loop_of_an_ended_run(backend: str) -> Any:
    async def capture() -> Any:
        return running_loop()

    if backend == "asyncio":
        return asyncio.run(capture())
    return trio.run(capture)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_request_for_an_ended_event_loop_is_not_sent(backend: str) -> None:
    # A probe that no loop can send is not a failed probe: nothing is recorded, and the
    # next call tells the loop in use.
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200)

    sender = OnLoop(httpx.AsyncClient(transport=httpx.MockTransport(answer)), threading.Condition())
    sender.loop = _loop_of_an_ended_run(backend)
    assert sender.loop is not None
    with pytest.raises(NotAsked):
        sender.get("http://gpu-1.internal:8000/health", {}, 0.05, text=False)
    assert sender.loop is None
    assert sent == []


def test_outside_an_event_loop_there_is_none() -> None:
    assert running_loop() is None
