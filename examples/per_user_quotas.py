"""Per-user token quotas in a FastAPI app: tokens per minute, and 429 when a user runs out.

Shows: one ``llmstream.TokenBudget`` per user that refills every minute, passed to each of
the user's streams as ``token_budget=`` (the client reserves before sending, clamps
``max_tokens`` to what the user has left, and charges what the server reported), a check
before streaming that answers ``429 Too Many Requests`` with ``Retry-After``, and
``llmstream.relay.relay_response`` relaying the answer as server-sent events.

Needs FastAPI and uvicorn (``pip install fastapi uvicorn``). Run the demo (it starts the
app on loopback and plays two users: alice asks until her quota runs out, bob is not
affected, then alice waits as ``Retry-After`` says and gets a shorter answer):

    python examples/per_user_quotas.py
    LLMSTREAM_BASE_URL=http://localhost:8000/v1 python examples/per_user_quotas.py

or serve the app and try it with curl:

    python examples/per_user_quotas.py --serve
    curl -N -H "X-User: alice" "http://127.0.0.1:8001/chat?q=Hello"
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Annotated

import httpx
import uvicorn
from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse, Response

import llmstream
from llmstream.relay import relay_response
from llmstream.testing import FakeVLLM

TOKENS_PER_MINUTE = 300  # per user; small so that the demo runs out quickly
MAX_TOKENS = 100  # the longest answer one request may get
MIN_ANSWER = 32  # refuse rather than start an answer shorter than this

BASE_URL = os.environ.get("LLMSTREAM_BASE_URL")
SENTENCE = (
    "The KV cache keeps the attention keys and values of every token already processed,"
    " so each new token attends to them without computing them again."
)
FAKE_ANSWER = " ".join([SENTENCE] * 3)
# Without a server, the built-in emulator plays vLLM.
FAKE = None if BASE_URL else FakeVLLM(FAKE_ANSWER, token_delay=0.002)


class Quotas:
    """One token bucket per user: ``TOKENS_PER_MINUTE`` tokens, refilled continuously."""

    def __init__(self, tokens_per_minute: int) -> None:
        self.tokens_per_minute = tokens_per_minute
        self._budgets: dict[str, llmstream.TokenBudget] = {}

    def of(self, user: str) -> llmstream.TokenBudget:
        budget = self._budgets.get(user)
        if budget is None:
            budget = self._budgets[user] = llmstream.TokenBudget(
                self.tokens_per_minute, refill_per_window=self.tokens_per_minute, window=60.0
            )
        return budget


def create_app(base_url: str | None) -> FastAPI:
    """The web app: one client for all requests, and the users' quotas."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with llmstream.AsyncClient(base_url) as client:
            app.state.llm = client
            yield

    app = FastAPI(lifespan=lifespan)
    quotas = Quotas(TOKENS_PER_MINUTE)

    @app.get("/chat")
    async def chat(x_user: Annotated[str, Header()], q: str = "Explain the KV cache.") -> Response:
        budget = quotas.of(x_user)  # in a real app: the authenticated user or API key
        messages = [{"role": "user", "content": q}]
        # The client reserves the prompt (estimated the same way) plus max_tokens, and
        # settles for less; ask for room for a useful answer before starting one.
        needed = llmstream.estimate_prompt_tokens(messages) + MIN_ANSWER
        wait = budget.seconds_until_available(needed)
        if math.isinf(wait):
            return JSONResponse({"error": "This prompt is too long for your quota."}, 413)
        if wait > 0:
            retry_after = math.ceil(wait)
            return JSONResponse(
                {"error": f"Token quota used up; try again in {retry_after} s."},
                status_code=429,
                headers={"Retry-After": str(retry_after)},
            )
        stream = app.state.llm.stream(messages, max_tokens=MAX_TOKENS, token_budget=budget)
        return relay_response(stream)

    @app.get("/quota")
    async def quota(x_user: Annotated[str, Header()]) -> dict[str, int]:
        snap = quotas.of(x_user).snapshot()
        return {"limit": snap.limit, "available": max(snap.balance, 0), "spent": snap.spent}

    return app


def ask(browser: httpx.Client, base: str, user: str) -> float | None:
    """One request as a browser would make it; prints what came back.

    Returns the seconds to wait when the app answered 429, else None.
    """
    with browser.stream("GET", f"{base}/chat", headers={"X-User": user}) as response:
        if response.status_code != 200:
            response.read()
            retry_after = response.headers.get("retry-after")
            error = response.json()["error"]
            print(f"[{user}] {response.status_code}, Retry-After: {retry_after}: {error}")
            return float(retry_after) if retry_after is not None else None
        chars, event, summary = 0, "message", {}
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: {"):
                data = json.loads(line[6:])
                if event == "message":
                    chars += len(data["text"])
                else:
                    summary = data
                event = "message"
    left = browser.get(f"{base}/quota", headers={"X-User": user}).json()
    usage = summary.get("usage") or {}
    print(
        f"[{user}] 200, {chars} chars, finish_reason={summary.get('finish_reason')},"
        f" {usage.get('total_tokens')} tokens; {left['available']} of {left['limit']} left"
    )
    return None


def demo(app: FastAPI) -> None:
    """Serve the app on loopback: alice asks until refused, bob asks, alice waits and asks."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        with httpx.Client(timeout=60) as browser:
            retry_after = None
            for _ in range(10):
                retry_after = ask(browser, base, "alice")
                if retry_after is not None:
                    break
            ask(browser, base, "bob")
            if retry_after is not None:
                print(f"[alice] waiting {retry_after:g} s, as Retry-After says")
                time.sleep(retry_after)
                ask(browser, base, "alice")
    finally:
        server.should_exit = True
        thread.join(10)


def main() -> None:
    with contextlib.ExitStack() as stack:
        base_url = BASE_URL if FAKE is None else stack.enter_context(FAKE.serve()).base_url
        app = create_app(base_url)
        if "--serve" in sys.argv:
            uvicorn.run(app, host="127.0.0.1", port=8001)
        else:
            demo(app)


if __name__ == "__main__":
    main()
