"""Behaviour the call core decides and both shells must carry out on real sockets.

A budget stop cuts the connection at once; planning a budgeted call asks the server once
per model and client, and not at all for a prompt the budget alone refuses; a stream
stopped at any moment, before its headers included, has a cancelled result.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import anyio
import httpx
import pytest

import llmstream
from llmstream.testing import FakeVLLM

from .conftest import EndlessServer
from .drivers import SOCKET_MODES, async_client_kwargs, collect, reach

pytestmark = pytest.mark.anyio

MODEL = "llmstream/fake-model"


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_a_budget_stop_cuts_the_connection_before_the_block_ends(
    mode: str, endless: EndlessServer
) -> None:
    budget = llmstream.CallBudget(completion_tokens=5)
    kwargs: dict[str, Any] = {"model": "m", "include_usage": False}
    if mode != "sync":
        kwargs.update(async_client_kwargs(mode))
        async with llmstream.AsyncClient(endless.base_url, **kwargs) as client:
            async with client.stream("Hi", budget=budget) as stream:
                pieces = [p async for p in stream]
                # Still inside the block: the server must already see the close.
                gone = await anyio.to_thread.run_sync(endless.gone.wait, 2.0)
    else:

        def run() -> tuple[list[str], bool, str]:
            with llmstream.Client(endless.base_url, **kwargs) as client:
                with client.stream("Hi", budget=budget) as stream:
                    pieces = list(stream)
                    return pieces, endless.gone.wait(2.0), stream.result.status

        pieces, gone, status = await anyio.to_thread.run_sync(run)
    if mode != "sync":
        status = stream.result.status
    assert len(pieces) == 5 and status == "budget"
    assert gone, "the server kept streaming until the with block ended"
    assert endless.sent[0] < 400  # cut within a couple of seconds, not after all 2,000


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_concurrent_budgeted_calls_ask_for_the_models_once(mode: str) -> None:
    fake = FakeVLLM("ok", model=MODEL)  # the model is known: only the context length is asked
    budget = llmstream.CallBudget(total_tokens=1000)

    async def one_async(client: llmstream.AsyncClient) -> None:
        async with client.stream("Hi", budget=budget) as stream:
            await stream.final_result()

    def one_sync(client: llmstream.Client) -> None:
        with client.stream("Hi", budget=budget) as stream:
            stream.final_result()

    with fake.serve() as server:
        if mode != "sync":
            kwargs = async_client_kwargs(mode)
            async with llmstream.AsyncClient(server.base_url, model=MODEL, **kwargs) as client:
                async with anyio.create_task_group() as tg:
                    for _ in range(50):
                        tg.start_soon(one_async, client)
        else:

            def run() -> None:
                with llmstream.Client(server.base_url, model=MODEL) as client:
                    threads = [threading.Thread(target=one_sync, args=(client,)) for _ in range(20)]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()

            await anyio.to_thread.run_sync(run)
    paths = [r.path for r in fake.requests]
    assert paths.count("/v1/models") == 1
    assert paths.count("/v1/chat/completions") == (20 if mode == "sync" else 50)


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_a_prompt_the_budget_refuses_sends_no_request_at_all(mode: str) -> None:
    fake = FakeVLLM("ok")
    budget = llmstream.CallBudget(prompt_tokens=10)
    prompt = "word " * 200
    if mode != "sync":
        with reach(mode, fake) as (url, kwargs):
            async with llmstream.AsyncClient(url, **kwargs) as client:
                with pytest.raises(llmstream.BudgetExceeded):
                    async with client.stream(prompt, budget=budget):
                        pass
    else:
        with llmstream.Client("http://fake/v1", transport=fake.transport()) as client:
            with pytest.raises(llmstream.BudgetExceeded):
                with client.stream(prompt, budget=budget):
                    pass
    assert fake.requests == []  # not even GET /models


class _Interrupt(BaseException):
    """Stands for Ctrl-C arriving while the request waits for its headers."""


def _interrupting_transport(seen: list[str]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        raise _Interrupt

    return httpx.MockTransport(handler)


def test_a_sync_stream_interrupted_before_its_headers_has_a_cancelled_result() -> None:
    seen: list[str] = []
    client = llmstream.Client("http://x/v1", model="m", transport=_interrupting_transport(seen))
    stream = client.stream("Hi")
    with pytest.raises(_Interrupt):
        with stream:
            pass
    assert seen == ["/v1/chat/completions"]
    assert stream.result.status == "cancelled"
    assert stream.snapshot().status == "cancelled"


@pytest.mark.usefixtures("async_http_backend")
async def test_an_async_stream_cancelled_before_its_headers_has_a_cancelled_result() -> None:
    # vLLM sends its headers at once, but a proxy may hold them until the first token.
    listener = socket.create_server(("127.0.0.1", 0))
    received = threading.Event()

    def hold() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            received.set()
            conn.recv(65536)  # until the client goes away

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    try:
        async with llmstream.AsyncClient(url, model="m") as client:
            stream = client.stream("Hi")
            with anyio.CancelScope() as scope:

                async def cancel_once_sent() -> None:
                    await anyio.to_thread.run_sync(received.wait, 5.0)
                    scope.cancel()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(cancel_once_sent)
                    async with stream:
                        pass
        assert stream.result.status == "cancelled"
        assert stream.snapshot().status == "cancelled"
    finally:
        listener.close()
        thread.join(5)


@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_a_server_count_includes_the_tools_and_needs_no_model_list(mode: str) -> None:
    fake = FakeVLLM("ok", model=MODEL)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    kwargs: dict[str, object] = {
        "budget": llmstream.CallBudget(total_tokens=1000),
        "count_prompt": "server",
        "tools": tools,
    }
    if mode != "sync":
        with reach(mode, fake) as (url, client_kwargs):
            async with llmstream.AsyncClient(url, model=MODEL, **client_kwargs) as c:
                await c.complete("Hi", **kwargs)  # type: ignore[arg-type]
    else:
        with llmstream.Client("http://f/v1", model=MODEL, transport=fake.transport()) as c:
            c.complete("Hi", **kwargs)  # type: ignore[arg-type]
    tokenize = [r for r in fake.requests if r.path == "/tokenize"]
    assert tokenize and tokenize[0].json is not None and tokenize[0].json["tools"] == tools
    # /tokenize told the context length too: no GET /models was needed for it.
    assert [r.path for r in fake.requests].count("/v1/models") == 0


@pytest.mark.parametrize("mode", SOCKET_MODES)
@pytest.mark.parametrize("deadline", ["idle", "total"])
async def test_a_deadline_cuts_a_read_the_transport_would_wait_on(mode: str, deadline: str) -> None:
    # The transport's own read timeout is max(first_token, idle): 30 s here. Only the
    # stream's watch of its deadlines (a timer or a watchdog beside the reader) can end
    # the stalled read at 0.3 s.
    from llmstream.testing import Fault

    fake = FakeVLLM("one two three four")
    fake.add_fault(Fault.stall(after_chunks=2, seconds=30))
    timeouts = (
        llmstream.Timeouts(first_token=30, idle=0.3)
        if deadline == "idle"
        else llmstream.Timeouts(first_token=30, idle=30, total=0.5)
    )
    expected = llmstream.IdleTimeout if deadline == "idle" else llmstream.TotalTimeout
    with fake.serve() as running:
        started = time.monotonic()
        with anyio.fail_after(10):
            outcome = await collect(
                mode, base_url=running.base_url, timeout=timeouts, retry=0, model=MODEL
            )
    assert isinstance(outcome.error, expected), outcome.error
    assert outcome.text == "one"
    assert time.monotonic() - started < 5  # the deadline, not the transport's 30 s
