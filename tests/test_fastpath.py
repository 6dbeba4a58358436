"""The fast path's gate: on only for tested versions, off by LLMSTREAM_FASTPATH=0 or a
missing private attribute, logged once, and streams work the public way when it is off.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
import time
from collections.abc import Callable, Iterator

import anyio
import h11
import httpx
import pytest

import llmstream
from llmstream import _fastpath
from llmstream._body import iter_body, sync_body_reader
from llmstream._header_wait import watch_pool
from llmstream.testing import FakeVLLM

from .conftest import WithheldHeaders, requires_fastpath

ANSWER = "one two three four five six seven eight"
STREAM_BODY = {
    "model": "llmstream/fake-model",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
}


@pytest.fixture(autouse=True)
def fresh_gate() -> Iterator[None]:
    # Each test decides the gate anew; the rest of the suite gets it undecided again.
    _fastpath._reset()
    yield
    _fastpath._reset()


@pytest.fixture
def debug_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="llmstream")
    return caplog


def _off_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "llmstream" and "fast path off" in record.getMessage()
    ]


def _pretend_installed(monkeypatch: pytest.MonkeyPatch, **versions: str) -> None:
    real = _fastpath._installed_version

    def installed(distribution: str) -> str:
        return versions.get(distribution) or real(distribution)

    monkeypatch.setattr(_fastpath, "_installed_version", installed)


def _rename_in_internals(
    monkeypatch: pytest.MonkeyPatch, change: Callable[[_fastpath._Internals], _fastpath._Internals]
) -> None:
    # As if a new release of httpx or httpcore had renamed an attribute the path reads.
    real = _fastpath._import_internals
    monkeypatch.setattr(_fastpath, "_import_internals", lambda: change(real()))


def _renamed_layer(internals: _fastpath._Internals) -> _fastpath._Internals:
    def rename(layers: tuple[tuple[type, str], ...]) -> tuple[tuple[type, str], ...]:
        return tuple(
            (layer, "_httpcore_stream_v2" if name == "_httpcore_stream" else name)
            for layer, name in layers
        )

    return internals._replace(
        sync_layers=rename(internals.sync_layers), async_layers=rename(internals.async_layers)
    )


def _h11_keeping_its_footer_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if h11 kept the rest of a chunk's CRLF as another type (before 0.16: a count),
    # with h11 itself still working.
    from h11._readers import ChunkedReader

    real_init = ChunkedReader.__init__

    def init(self: ChunkedReader) -> None:
        real_init(self)
        self._bytes_to_discard = bytearray()  # type: ignore[assignment]

    monkeypatch.setattr(ChunkedReader, "__init__", init)


def _moved_module(monkeypatch: pytest.MonkeyPatch) -> None:
    def gone() -> _fastpath._Internals:
        raise ImportError("No module named 'httpcore._sync.http11'", name="httpcore._sync.http11")

    monkeypatch.setattr(_fastpath, "_import_internals", gone)


# Each way the path turns off, and what its log line must say.
WAYS_OFF: dict[str, tuple[Callable[[pytest.MonkeyPatch], None], str]] = {
    "env": (lambda mp: mp.setenv("LLMSTREAM_FASTPATH", "0"), "LLMSTREAM_FASTPATH=0"),
    "httpcore-too-new": (
        lambda mp: _pretend_installed(mp, httpcore="1.1.0"),
        "httpcore 1.1.0 is outside the tested range >=1.0.9,<1.1",
    ),
    "h11-too-old": (
        lambda mp: _pretend_installed(mp, h11="0.14.0"),
        "h11 0.14.0 is outside the tested range",
    ),
    "attribute-renamed": (
        lambda mp: _rename_in_internals(mp, _renamed_layer),
        "ResponseStream._httpcore_stream_v2 is missing",
    ),
    "h11-reader-changed": (
        _h11_keeping_its_footer_otherwise,
        "ChunkedReader._bytes_to_discard is not bytes",
    ),
    "module-moved": (_moved_module, "cannot import httpcore._sync.http11"),
}


@pytest.fixture(params=sorted(WAYS_OFF))
def way_off(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Turns the fast path off one way; the text its log line must hold."""
    monkeypatch.delenv("LLMSTREAM_FASTPATH", raising=False)
    if _fastpath._version_problem() is not None:
        pytest.skip("the installed versions already turn the fast path off")
    turn_off, reason = WAYS_OFF[request.param]
    turn_off(monkeypatch)
    return reason


@pytest.fixture
def server() -> Iterator[str]:
    with FakeVLLM(ANSWER).serve() as running:
        yield running.base_url


# -- the gate -----------------------------------------------------------------------------


@requires_fastpath
def test_the_path_is_on_for_the_installed_versions(debug_log: pytest.LogCaptureFixture) -> None:
    assert _fastpath.enabled()
    assert _off_messages(debug_log) == []


@pytest.mark.parametrize(
    ("distribution", "version", "on"),
    [
        ("httpx", "0.26.0", False),
        ("httpx", "0.27.0", True),
        ("httpx", "0.29.9", True),
        ("httpx", "0.30.0", False),
        ("httpx", "1.0.0", False),
        ("httpcore", "1.0.8", False),
        ("httpcore", "1.0.9", True),
        ("httpcore", "1.0.10", True),
        ("httpcore", "1.1.0rc1", False),
        ("h11", "0.15.0", False),
        ("h11", "0.16.0", True),
        ("h11", "0.17.0", False),
    ],
)
def test_versions_outside_the_tested_ranges_turn_it_off(
    monkeypatch: pytest.MonkeyPatch, distribution: str, version: str, on: bool
) -> None:
    # Every other distribution as tested: only the one given decides.
    tested = {name: low for name, (low, _high) in _fastpath.TESTED.items()}
    monkeypatch.setattr(_fastpath, "_installed_version", {**tested, distribution: version}.get)
    assert (_fastpath._version_problem() is None) is on


def test_a_distribution_without_metadata_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(distribution: str) -> str:
        raise importlib.metadata.PackageNotFoundError(distribution)

    monkeypatch.setattr(_fastpath, "_installed_version", missing)
    assert _fastpath._version_problem() == "httpx has no installed distribution metadata"


def test_the_decision_is_made_once_on_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    lookups: list[str] = []
    real = _fastpath._installed_version

    def counting(distribution: str) -> str:
        lookups.append(distribution)
        return real(distribution)

    monkeypatch.setattr(_fastpath, "_installed_version", counting)
    monkeypatch.delenv("LLMSTREAM_FASTPATH", raising=False)
    assert lookups == []  # nothing is looked up before the path is asked for
    first = _fastpath.enabled()
    for _ in range(3):
        assert _fastpath.enabled() is first
    assert sorted(lookups) == sorted(_fastpath.TESTED)


@pytest.mark.parametrize("value", ["0", " 0 ", "false", "off"])
def test_the_environment_variable_turns_it_off(
    monkeypatch: pytest.MonkeyPatch, debug_log: pytest.LogCaptureFixture, value: str
) -> None:
    monkeypatch.setenv("LLMSTREAM_FASTPATH", value)
    assert not _fastpath.enabled()
    assert len(_off_messages(debug_log)) == 1


@requires_fastpath
@pytest.mark.parametrize("value", ["", "1", "yes"])
def test_other_values_leave_it_on(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("LLMSTREAM_FASTPATH", value)
    assert _fastpath.enabled()


# -- with the path off, the public path reads everything -----------------------------------


def test_off_logs_once_why_and_bodies_are_read_the_public_way(
    way_off: str, server: str, debug_log: pytest.LogCaptureFixture
) -> None:
    with httpx.Client() as http:
        for _ in range(3):
            url = f"{server}/chat/completions"
            with http.stream("POST", url, json=STREAM_BODY) as response:
                assert sync_body_reader(response) is None
                body = b"".join(iter_body(response))
            assert body.count(b"data: ") > len(ANSWER.split())
            assert body.endswith(b"data: [DONE]\n\n")
    messages = _off_messages(debug_log)
    assert len(messages) == 1, messages
    assert way_off in messages[0]


def test_a_sync_stream_works_end_to_end_with_the_path_off(
    way_off: str, debug_log: pytest.LogCaptureFixture
) -> None:
    fake = FakeVLLM(ANSWER)
    with fake.serve() as server, llmstream.Client(server.base_url) as client:
        for _ in range(2):
            with client.stream("Hi") as stream:
                assert "".join(stream) == ANSWER
            assert stream.result.status == "complete"
    assert fake.disconnects == []  # read to its end: the connection was kept for reuse
    assert len(_off_messages(debug_log)) == 1


@pytest.mark.anyio
async def test_an_async_stream_works_end_to_end_with_the_path_off(
    way_off: str, debug_log: pytest.LogCaptureFixture
) -> None:
    fake = FakeVLLM(ANSWER)
    with fake.serve() as server:
        async with llmstream.AsyncClient(server.base_url) as client:
            for _ in range(2):
                async with client.stream("Hi") as stream:
                    assert "".join([piece async for piece in stream]) == ANSWER
                assert stream.result.status == "complete"
    assert fake.disconnects == []
    assert len(_off_messages(debug_log)) == 1


@pytest.mark.anyio
async def test_an_async_break_still_closes_at_once_with_the_path_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLMSTREAM_FASTPATH", "0")
    fake = FakeVLLM("one two three", token_delay=2.0)
    with fake.serve() as server:
        async with llmstream.AsyncClient(server.base_url) as client:
            async with client.stream("Hi") as stream:
                async for _ in stream:
                    t0 = time.perf_counter()
                    break
        disconnect = fake.wait_for_disconnect(timeout=5)
    assert disconnect.time - t0 < 0.1  # the next token is 2 s away


@pytest.mark.anyio
@pytest.mark.parametrize("buffer", [64, 0], ids=["read-ahead", "pull"])
async def test_an_aclose_from_another_task_mid_read_with_the_path_off(
    monkeypatch: pytest.MonkeyPatch, buffer: int
) -> None:
    # httpx's body iterator is an async generator: closing it while the stream's reading
    # task is inside it raised "aclose(): asynchronous generator is already running".
    # buffer=0: the reading task is the consumer's own.
    monkeypatch.setenv("LLMSTREAM_FASTPATH", "0")
    fake = FakeVLLM("never sent", ttft=30)
    with fake.serve() as server:
        async with llmstream.AsyncClient(server.base_url) as client:
            stream = client.stream("hi", buffer=buffer)
            reading = anyio.Event()

            async def stop() -> None:
                await reading.wait()
                await fake_request_seen(fake)
                await stream.aclose()

            with anyio.fail_after(5):  # not the 30 s the first token would take
                async with anyio.create_task_group() as tg:
                    tg.start_soon(stop)
                    async with stream:
                        reading.set()
                        pieces = [piece async for piece in stream]
            assert pieces == [] and stream.result.status == "cancelled"
            fake.wait_for_disconnect(timeout=5)


async def fake_request_seen(fake: FakeVLLM) -> None:
    while not any(r.path.endswith("/chat/completions") for r in fake.requests):
        await anyio.sleep(0.005)  # polls the emulator's record: a condition, not a delay


# -- the sync header wait ------------------------------------------------------------------


def _renamed_pool_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    _rename_in_internals(
        monkeypatch, lambda internals: internals._replace(pool_backend="_network_backend_v2")
    )


@pytest.mark.parametrize(
    ("turn_off", "reason"),
    [
        (lambda mp: mp.setenv("LLMSTREAM_FASTPATH", "0"), "LLMSTREAM_FASTPATH=0"),
        (_renamed_pool_backend, "ConnectionPool._network_backend_v2 is missing"),
    ],
    ids=["env", "backend-renamed"],
)
def test_without_the_path_a_sync_header_wait_is_cut_through_the_public_trace_extension(
    turn_off: Callable[[pytest.MonkeyPatch], None],
    reason: str,
    monkeypatch: pytest.MonkeyPatch,
    debug_log: pytest.LogCaptureFixture,
    withheld_headers: WithheldHeaders,
) -> None:
    # The pool is httpx's own, left as it is; it keeps no idle connection, so each request
    # opens one, which httpx's trace extension hands to the header wait: cancel() cuts it.
    monkeypatch.delenv("LLMSTREAM_FASTPATH", raising=False)
    turn_off(monkeypatch)
    server = withheld_headers
    timeouts = llmstream.Timeouts(first_token=20)  # a failure, not a hang, if the cut fails
    with llmstream.Client(server.base_url, model="m", timeout=timeouts) as client:
        pool = client._http._transport._pool  # type: ignore[attr-defined]
        assert type(pool._network_backend).__name__ != "_WatchedBackend"
        assert pool._max_keepalive_connections == 0
        messages = _off_messages(debug_log)
        assert len(messages) == 1 and reason in messages[0]
        assert "keeps no idle connection" in messages[0]  # says what changes

        stream = client.stream("hi")
        stopper = threading.Thread(
            target=lambda: (server.wait_for_request(), stream.cancel()), daemon=True
        )
        stopper.start()
        started = time.monotonic()
        with stream:
            pieces = list(stream)
        waited = time.monotonic() - started
        stopper.join(5)
    assert pieces == [] and stream.result.status == "cancelled"
    assert waited < 2.0, waited
    assert server.hung_up.wait(5)
    assert not server.requests.acquire(timeout=0.2)
    assert len(_off_messages(debug_log)) == 1


@requires_fastpath
def test_watch_pool_wraps_each_pool_once(debug_log: pytest.LogCaptureFixture) -> None:
    with httpx.Client() as http:
        assert watch_pool(http)
        assert not watch_pool(http)  # already watched: not wrapped twice
        backend = http._transport._pool._network_backend  # type: ignore[attr-defined]
        assert type(backend).__name__ == "_WatchedBackend"
    assert _off_messages(debug_log) == []


@requires_fastpath
@pytest.mark.parametrize(
    ("received", "taken"),
    [(b"3\r\nab", (1, b"")), (b"3\r\nabc\r", (0, b"\n"))],
    ids=["mid-chunk", "mid-footer"],
)
def test_the_h11_in_use_hands_over_where_the_chunked_lane_continues(
    received: bytes, taken: tuple[int, bytes]
) -> None:
    # The lane takes over h11's ChunkedReader mid-body (see _fastpath.take_over_chunked):
    # the chunk data still to come, the part of its CRLF not yet seen.
    connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    connection.send(h11.EndOfMessage())
    connection.receive_data(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + received)
    assert type(connection.next_event()) is h11.Response
    assert type(connection.next_event()) is h11.Data
    assert connection.next_event() is h11.NEED_DATA
    assert _fastpath.take_over_chunked(connection) == taken
    # h11 is left between two chunks: the lane hands the next chunk header back to it.
    connection.receive_data(b"0\r\n\r\n")
    assert type(connection.next_event()) is h11.EndOfMessage
