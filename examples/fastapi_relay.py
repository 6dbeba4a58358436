"""Relay vLLM tokens to a browser over SSE; a browser that leaves cancels the vLLM request.

Shows: ``llmstream.relay.relay_response`` in a FastAPI app, one shared ``AsyncClient``
opened and closed with the app, and what happens when the browser disconnects: the app's
request to vLLM is closed at once, so vLLM aborts it and frees its KV cache.

Needs FastAPI and uvicorn (``pip install fastapi uvicorn``). Run the demo (it starts the
app, plays a browser that leaves after three tokens, and reports what the server saw):

    python examples/fastapi_relay.py
    LLMSTREAM_BASE_URL=http://localhost:8000/v1 python examples/fastapi_relay.py

or serve the app and open http://127.0.0.1:8001/chat?q=Hello in a browser:

    python examples/fastapi_relay.py --serve
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator

import httpx
import uvicorn
from fastapi import FastAPI

import llmstream
from llmstream.relay import relay_response
from llmstream.testing import FakeVLLM

BASE_URL = os.environ.get("LLMSTREAM_BASE_URL")
# Without a server, the built-in emulator plays vLLM, slowly enough to leave mid-answer.
FAKE = None if BASE_URL else FakeVLLM(tokens=[f"word{i} " for i in range(50)], token_delay=0.2)


def create_app(base_url: str | None) -> FastAPI:
    """The web app: one client for all requests, opened and closed with the app."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with llmstream.AsyncClient(base_url) as client:
            app.state.llm = client
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/chat")
    async def chat(q: str = "Tell me a story.") -> object:
        stream = app.state.llm.stream(q, max_tokens=256)
        return relay_response(stream, on_result=lambda r: print(f"[app] upstream: {r.status}"))

    return app


def demo(app: FastAPI) -> None:
    """Serve the app on loopback, read three tokens like a browser, then leave."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/chat?q=Tell+me+a+story."
    try:
        with httpx.Client(timeout=30) as browser, browser.stream("GET", url) as response:
            received = 0
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    print(f"[browser] {json.loads(line[6:])['text']!r}")
                    received += 1
                if received == 3:
                    break
            left_at = time.perf_counter()
            print("[browser] closing the tab")
        if FAKE is not None:
            seen = FAKE.wait_for_disconnect()
            delay_ms = (seen.time - left_at) * 1000
            print(f"[vLLM emulator] request cancelled {delay_ms:.1f} ms after the browser left")
    finally:
        server.should_exit = True
        thread.join(10)


def main() -> None:
    if FAKE is None:
        app = create_app(BASE_URL)
        if "--serve" in sys.argv:
            uvicorn.run(app, host="127.0.0.1", port=8001)
        else:
            demo(app)
        return
    with FAKE.serve() as upstream:
        app = create_app(upstream.base_url)
        if "--serve" in sys.argv:
            uvicorn.run(app, host="127.0.0.1", port=8001)
        else:
            demo(app)


if __name__ == "__main__":
    main()
