"""Relaying to a browser: when the browser goes, the upstream request is cancelled.

A real uvicorn server on loopback runs a Starlette app that relays from the
emulator (also on loopback); a plain HTTP client plays the browser.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import llmstream
from llmstream.relay import SSERelay, relay_response
from llmstream.testing import FakeVLLM


def _serve(app: object) -> Iterator[str]:
    # A socket bound before the server starts: connections wait in its backlog,
    # so nothing has to poll for the server to be ready.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def upstream() -> FakeVLLM:
    return FakeVLLM(tokens=["one", " two", " three", " four"], token_delay=1.0)


def _app(base_url: str) -> Starlette:
    """The app under test: one shared client, opened and closed with the app."""
    state: dict[str, llmstream.AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with llmstream.AsyncClient(base_url) as client:
            state["client"] = client
            yield

    async def chat(request: Request) -> Response:
        prompt = request.query_params.get("q", "Hi")
        return relay_response(state["client"].stream(prompt))

    async def raw(scope: object, receive: object, send: object) -> None:
        await SSERelay(state["client"].stream("Hi"))(scope, receive, send)  # type: ignore[arg-type]

    app = Starlette(routes=[Route("/chat", chat)], lifespan=lifespan)
    app.mount("/raw", raw)  # type: ignore[arg-type]
    return app


@pytest.fixture
def app_url(upstream: FakeVLLM) -> Iterator[str]:
    with upstream.serve() as server:
        yield from _serve(_app(server.base_url))


def _events(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if line.startswith("data: "):
            yield line[len("data: ") :]


@pytest.mark.parametrize("path", ["/chat", "/raw/"])
def test_browser_disconnect_cancels_upstream_within_100ms(
    upstream: FakeVLLM, app_url: str, path: str
) -> None:
    with httpx.Client(timeout=10) as browser:
        with browser.stream("GET", app_url + path) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            first = next(_events(response.iter_lines()))
            t0 = time.perf_counter()
            # Leaving the block closes the browser's connection mid-answer.
    assert json.loads(first) == {"text": "one"}
    disconnect = upstream.wait_for_disconnect()
    assert disconnect.time - t0 < 0.100
    assert disconnect.chunks_sent < 6


def test_relay_streams_every_delta_then_done() -> None:
    fake = FakeVLLM("relayed answer ✨")
    with fake.serve() as server:
        for url in _serve(_app(server.base_url)):
            with httpx.Client(timeout=10) as browser:
                lines = browser.get(url + "/chat").text.splitlines()
    events = list(_events(iter(lines)))
    texts = [json.loads(e)["text"] for e in events[:-2]]
    assert "".join(texts) == "relayed answer ✨"
    assert json.loads(events[-2])["finish_reason"] == "stop"
    assert events[-1] == "[DONE]"
    assert "event: done" in lines


def test_upstream_failure_becomes_an_error_event() -> None:
    from llmstream.testing import Fault

    fake = FakeVLLM("a b c d")
    fake.add_fault(Fault.inband_error(after_chunks=2))
    with fake.serve() as server:
        for url in _serve(_app(server.base_url)):
            with httpx.Client(timeout=10) as browser:
                text = browser.get(url + "/chat").text
    assert "event: error" in text and "ServerStreamError" in text
    assert "[DONE]" not in text


@pytest.mark.parametrize("fails_at", [0, 1, 3], ids=["response-start", "first-delta", "later"])
@pytest.mark.anyio
async def test_a_send_that_fails_is_a_disconnect_and_on_result_still_runs(fails_at: int) -> None:
    # ASGI servers raise OSError from send() once the browser has gone: the relay ends
    # quietly, the upstream request is closed, and the usage callback gets what arrived.
    fake = FakeVLLM(tokens=["one", " two", " three", " four"], token_delay=0.05)
    results: list[llmstream.StreamResult] = []
    sent: list[object] = []

    async def receive() -> dict[str, object]:
        await anyio.sleep_forever()
        raise AssertionError

    async def send(message: dict[str, object]) -> None:
        if len(sent) == fails_at:
            raise OSError("the browser went away")
        sent.append(message)

    async with llmstream.AsyncClient("http://v.test/v1", transport=fake.transport()) as client:
        relay = SSERelay(client.stream("Hi"), on_result=results.append)
        await relay({"type": "http"}, receive, send)  # no exception, no ExceptionGroup
    assert len(results) == 1 and results[0].status == "cancelled"
    # What the stream had read when the send failed: the delta it was sending too.
    assert results[0].text == ["", "one", "one two three"][[0, 1, 3].index(fails_at)]
    if fails_at:
        assert len(fake.disconnects) == 1  # the upstream request was closed
    else:
        assert fake.requests == []  # nothing was sent upstream
