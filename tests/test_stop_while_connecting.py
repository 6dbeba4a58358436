"""A stream stopped while its connection is still being opened ends at once.

A replica that is overloaded, or a host that is gone, can leave a connect waiting for
its whole connect timeout (the SYN unanswered). A caller that cancels the stream, or a
service that closes its client, must not wait that out: the connect is abandoned at
once, on every client, the blocking one included (its thread is cut out of ``connect()``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest

import llmstream
from llmstream import _fastpath

from .drivers import SOCKET_MODES, async_client_kwargs

pytestmark = pytest.mark.anyio

CONNECT = 5.0  # the connect timeout: what a stop must not wait for
WITHIN = 1.0  # far above a loaded machine's delays, far below the connect timeout
# With the fast path off the blocking client's pools are httpx's own, whose connects
# nothing can reach: a stop ends at the connect timeout, so that one is short.
CONNECT_PUBLIC_PATH = 1.0

HOW = ["cancel", "close the client"]


def _settings(on_sent: Callable[[], None], connect: float) -> dict[str, Any]:
    """A client's arguments: no retry, the connect timeout, ``on_sent()`` as a request goes."""

    def hook(event: object) -> None:
        if isinstance(event, llmstream.RequestSent):
            on_sent()

    return {
        "model": "m",
        "retry": 0,
        "timeout": llmstream.Timeouts(connect=connect),
        "hooks": [hook],
    }


def _check(how: str, error: BaseException | None, result: llmstream.StreamResult) -> None:
    if how == "cancel":
        assert error is None, error
        assert result.status == "cancelled"
    else:
        assert isinstance(error, llmstream.ClientClosed), error
        assert result.status == "aborted"
    assert result.text == ""


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_a_stream_stopped_while_it_connects_ends_at_once(
    mode: str, how: str, unanswered_port: int
) -> None:
    base_url = f"http://127.0.0.1:{unanswered_port}/v1"
    if mode == "sync":
        _stop_sync_while_connecting(base_url, how)
        return
    sent = anyio.Event()
    client = llmstream.AsyncClient(
        base_url, **_settings(sent.set, CONNECT), **async_client_kwargs(mode)
    )
    stream = client.stream("Hi")
    error: BaseException | None = None

    async def consume() -> None:
        nonlocal error
        try:
            async with stream:
                async for _ in stream:
                    pass
        except llmstream.LLMStreamError as exc:
            error = exc

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(consume)
            await sent.wait()
            if how == "cancel":
                stream.cancel()
            else:
                await client.aclose()
            group.cancel_scope.deadline = anyio.current_time() + WITHIN
        assert not group.cancel_scope.cancelled_caught, f"not done {WITHIN} s after the stop"
    finally:
        await client.aclose()
    _check(how, error, stream.result)


def _stop_sync_while_connecting(base_url: str, how: str) -> None:
    fast = _fastpath.enabled()
    sent = threading.Event()
    client = llmstream.Client(
        base_url, **_settings(sent.set, CONNECT if fast else CONNECT_PUBLIC_PATH)
    )
    stream = client.stream("Hi")
    error: BaseException | None = None

    def consume() -> None:
        nonlocal error
        try:
            with stream:
                for _ in stream:
                    pass
        except llmstream.LLMStreamError as exc:
            error = exc

    thread = threading.Thread(target=consume)
    thread.start()
    try:
        assert sent.wait(5)
        stopped = time.monotonic()
        if how == "cancel":
            stream.cancel()
        else:
            client.close()
        thread.join(WITHIN if fast else CONNECT_PUBLIC_PATH + WITHIN)
        took = time.monotonic() - stopped
        assert not thread.is_alive(), f"not done {took:.2f} s after the stop"
    finally:
        client.close()
        thread.join()
    _check(how, error, stream.result)
