"""Deadlines hold in every phase of a call, connecting included.

Each case is a server that keeps the call in one phase for far longer than the call's
deadline; the call must end at its deadline, with the deadline's own error, on every
client. (A fleet's wait for room: ``test_call_core``.)
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest

import llmstream

from .drivers import SOCKET_MODES, collect

pytestmark = pytest.mark.anyio

TOTAL = 0.5
# Far above what a loaded machine adds to a deadline, far below the limits it stands for.
LATE = 3.0


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A port whose listener never accepts, its backlog full: a connect waits there."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers = []
    for _ in range(8):  # what the kernel queues beyond listen(0) before it drops SYNs
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for filler in fillers:
        filler.close()
    listener.close()


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
