"""Deadlines hold in every phase of a call, connecting included.

Each case is a server that keeps the call in one phase for far longer than the call's
deadline; the call must end at its deadline, with the deadline's own error, on every
client. (A fleet's wait for room: ``test_call_core``.)
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

import llmstream
from llmstream.testing import FakeVLLM

from .drivers import SOCKET_MODES, Outcome, collect

pytestmark = pytest.mark.anyio

TOTAL = 0.5
# Far above what a loaded machine adds to a deadline, far below the limits it stands for.
LATE = 3.0


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_the_total_deadline_ends_a_connect_that_never_completes(
    mode: str, unanswered_port: int
) -> None:
    # The connect limit (10 s) is longer than the call may take: the total deadline wins.
    started = time.monotonic()
    outcome = await collect(
        mode,
        base_url=f"http://127.0.0.1:{unanswered_port}/v1",
        client_kwargs={
            "model": "m",
            "retry": 0,
            "timeout": llmstream.Timeouts(connect=10.0, total=TOTAL),
        },
    )
    took = time.monotonic() - started
    assert isinstance(outcome.error, llmstream.TotalTimeout), outcome.error
    assert took + 0.05 >= TOTAL and took < LATE


class _Trickler:
    """A server that answers every request with bytes that never complete a head."""

    def __init__(self, start: bytes, piece: bytes) -> None:
        self._start, self._piece = start, piece
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.port = int(self._listener.getsockname()[1])
        self.closed = threading.Event()  # a client's connection ended
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)  # the request
            conn.sendall(self._start)
            # A byte (or an interim response) at a time, well inside any read timeout; or,
            # with nothing to send, nothing until the client hangs up.
            conn.settimeout(0.05)
            # Ended well after LATE: a client that waits it out fails, it does not hang.
            give_up = time.monotonic() + 2 * LATE
            while not self._stop.is_set() and time.monotonic() < give_up:
                try:
                    if self._piece:
                        conn.sendall(self._piece)
                    if conn.recv(1) == b"":
                        break
                except TimeoutError:
                    continue
                except OSError:
                    break
        self.closed.set()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()


@pytest.mark.parametrize(
    ("start", "piece"),
    [(b"", b"HTTP/1.1 100 Continue\r\n\r\n"), (b"HTTP/1.1 200 OK\r\nX-Pad: ", b"a")],
    ids=["100-continue", "a-header-a-byte-at-a-time"],
)
@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_a_server_that_never_completes_its_head_is_cut_at_the_deadline(
    mode: str, start: bytes, piece: bytes
) -> None:
    # Every few milliseconds a byte: a transport's read timeout never fires, the call's
    # deadline does, and the connection is closed (vLLM then aborts the request).
    server = _Trickler(start, piece)
    try:
        outcome, took = await _timed_call(mode, server, llmstream.Timeouts(total=TOTAL))
        assert isinstance(outcome.error, llmstream.TotalTimeout), outcome.error
        assert took < LATE
        assert server.closed.wait(LATE)
    finally:
        server.close()


async def _timed_call(
    mode: str, server: _Trickler, timeouts: llmstream.Timeouts
) -> tuple[Outcome, float]:
    """One call (no retry) to ``server``: its outcome, and how long it took."""
    started = time.monotonic()
    outcome = await collect(
        mode,
        base_url=f"http://127.0.0.1:{server.port}/v1",
        client_kwargs={"model": "m", "retry": 0, "timeout": timeouts},
    )
    return outcome, time.monotonic() - started


_ERROR_HEAD = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 100000\r\n\r\n"


@pytest.mark.parametrize(
    ("piece", "limit"),
    [(b" ", "total"), (b"", "total"), (b" ", "error body wait")],
    ids=["trickled-within-total", "stalled-within-total", "trickled-without-total"],
)
@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_an_error_body_that_never_ends_is_cut(
    mode: str, piece: bytes, limit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Error headers, then a body a byte at a time (or nothing at all): the status is the
    # error, reported at the total deadline or, without one, after the error body wait.
    monkeypatch.setattr("llmstream._call.ERROR_BODY_WAIT", TOTAL)
    timeouts = llmstream.Timeouts(total=TOTAL if limit == "total" else None)
    server = _Trickler(_ERROR_HEAD, piece)
    try:
        outcome, took = await _timed_call(mode, server, timeouts)
        assert isinstance(outcome.error, llmstream.InternalServerError), outcome.error
        assert outcome.error.status_code == 503
        assert TOTAL - 0.05 <= took < LATE
        assert server.closed.wait(LATE)
    finally:
        server.close()


@pytest.mark.parametrize(
    "timeout",
    [1e10, llmstream.Timeouts(connect=1e10), llmstream.Timeouts(first_token=1e10, idle=1e300)],
    ids=["every-phase", "connect", "first-token-and-idle"],
)
@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_a_timeout_of_centuries_is_no_limit_not_an_overflow(
    mode: str, timeout: float | llmstream.Timeouts
) -> None:
    # Past ~292 years a socket's or a lock's timeout overflows: such a wait has no limit.
    fake = FakeVLLM("Hello there.", model="m")
    with fake.serve() as server:
        outcome = await collect(
            mode, base_url=server.base_url, client_kwargs={"model": "m", "timeout": timeout}
        )
    assert outcome.error is None and outcome.text == "Hello there."
