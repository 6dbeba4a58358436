"""``stream_llm_request`` and its sync twin: a break closes the connection at once.

Real loopback sockets: the emulator's server reads the socket while it waits between
tokens, like vLLM's, and records when each client went away. Each async test runs its own
event loop (asyncio, trio, uvloop) to its end, so that whatever the generator leaves behind
(a finaliser, a task, a socket for the garbage collector) has run before the checks.
"""

from __future__ import annotations

import collections.abc
import contextlib
import gc
import logging
import re
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from contextlib import aclosing

import anyio
import pytest

import llmstream
from llmstream.testing import FakeServer, FakeVLLM

# Tokens come 2 s apart: a disconnect seen sooner than that was caused by the close.
SLOW = 2.0
LIMIT = 0.100


@pytest.fixture
def fake() -> FakeVLLM:
    return FakeVLLM("one two three four five", token_delay=SLOW)


@pytest.fixture
def server(fake: FakeVLLM) -> Iterator[FakeServer]:
    with fake.serve() as server:
        yield server


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def nothing_escapes() -> Iterator[None]:
    """Fail if an unraisable exception, a warning or a logged error comes out inside."""
    unraisable: list[str] = []
    hook, sys.unraisablehook = sys.unraisablehook, lambda u: unraisable.append(repr(u.exc_value))
    logged = _Records()
    logging.getLogger().addHandler(logged)
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            yield
            gc.collect()  # what was left to the garbage collector is finalised now
    finally:
        sys.unraisablehook = hook
        logging.getLogger().removeHandler(logged)
    assert unraisable == []
    # With the fast path off, httpx reads a body through nested async generators; when the
    # response is closed early, trio finalises the inner one itself and says so (the same
    # warning pyproject.toml lets through). That is httpx's, not a connection left open.
    httpx_finalised = re.compile(r"Async generator 'http(x|core)\.")
    assert [
        str(w.message)
        for w in warned
        if not (issubclass(w.category, ResourceWarning) and httpx_finalised.match(str(w.message)))
    ] == []
    assert [f"{r.name}: {r.getMessage()}" for r in logged.records] == []


def run(backend: object, main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main`` on a loop of its own, to its end (the loop's shutdown included)."""
    name, options = backend if isinstance(backend, tuple) else (backend, {})
    with nothing_escapes():
        anyio.run(main, backend=name, backend_options=options)


def seen_after(fake: FakeVLLM, t0: float) -> float:
    # Blocks the event loop on purpose: the disconnect must not need the loop to run.
    return fake.wait_for_disconnect(timeout=5).time - t0


def test_break_closes_connection_within_100ms(
    anyio_backend: object, fake: FakeVLLM, server: FakeServer
) -> None:
    seen: list[float] = []

    async def main() -> None:
        async for text in llmstream.stream_llm_request("Hi", base_url=server.base_url):
            assert text == "one"
            t0 = time.perf_counter()
            break
        seen.append(seen_after(fake, t0))

    run(anyio_backend, main)
    assert seen[0] < LIMIT


def test_aclose_closes_connection_within_100ms(
    anyio_backend: object, fake: FakeVLLM, server: FakeServer
) -> None:
    seen: list[float] = []

    async def main() -> None:
        texts = llmstream.stream_llm_request("Hi", base_url=server.base_url)
        async with aclosing(texts):
            async for _ in texts:
                t0 = time.perf_counter()
                break
        seen.append(seen_after(fake, t0))
        with pytest.raises(StopAsyncIteration):
            await texts.__anext__()  # closed: as an async generator after aclose()

    run(anyio_backend, main)
    assert seen[0] < LIMIT


def test_cancelling_the_consumer_closes_connection_within_100ms(
    anyio_backend: object, fake: FakeVLLM, server: FakeServer
) -> None:
    seen: list[float] = []

    async def main() -> None:
        first = anyio.Event()

        async def consume() -> None:
            async for _ in llmstream.stream_llm_request("Hi", base_url=server.base_url):
                first.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await first.wait()  # the consumer now waits for token 2, 2 s away
            t0 = time.perf_counter()
            tg.cancel_scope.cancel()
        seen.append(seen_after(fake, t0))

    run(anyio_backend, main)
    assert seen[0] < LIMIT


def test_athrow_closes_connection_and_raises(
    anyio_backend: object, fake: FakeVLLM, server: FakeServer
) -> None:
    seen: list[float] = []

    async def main() -> None:
        texts = llmstream.stream_llm_request("Hi", base_url=server.base_url)
        assert await texts.__anext__() == "one"
        t0 = time.perf_counter()
        with pytest.raises(KeyError, match="consumer failed"):
            await texts.athrow(KeyError("consumer failed"))
        seen.append(seen_after(fake, t0))
        with pytest.raises(StopAsyncIteration):
            await texts.asend(None)

    run(anyio_backend, main)
    assert seen[0] < LIMIT


def test_a_complete_answer_leaves_nothing_open(anyio_backend: object) -> None:
    fake = FakeVLLM("the whole answer")
    pieces: list[str] = []

    async def main() -> None:
        with fake.serve() as server:
            async for text in llmstream.stream_llm_request("Hi", 16, base_url=server.base_url):
                pieces.append(text)

    run(anyio_backend, main)
    assert "".join(pieces) == "the whole answer"
    assert fake.disconnects == []


def test_an_error_is_the_clients_and_ends_the_generator(anyio_backend: object) -> None:
    fake = FakeVLLM("unused")

    async def main() -> None:
        with fake.serve() as server:
            texts = llmstream.stream_llm_request("Hi", base_url=server.base_url, model="nope")
            with pytest.raises(llmstream.NotFoundError):
                await texts.__anext__()
            with pytest.raises(StopAsyncIteration):
                await texts.__anext__()

    run(anyio_backend, main)


def test_nothing_is_sent_before_the_first_iteration(fake: FakeVLLM, server: FakeServer) -> None:
    texts = llmstream.stream_llm_request("Hi", base_url=server.base_url)
    del texts
    assert fake.requests == []


def test_it_is_an_async_generator() -> None:
    texts: collections.abc.AsyncGenerator[str, None] = llmstream.stream_llm_request("Hi")
    assert isinstance(texts, collections.abc.AsyncGenerator)
    assert texts.__aiter__() is texts


def test_sync_break_closes_connection_within_100ms(fake: FakeVLLM, server: FakeServer) -> None:
    with nothing_escapes():
        for text in llmstream.stream_llm_request_sync("Hi", base_url=server.base_url):
            assert text == "one"
            t0 = time.perf_counter()
            break
        assert seen_after(fake, t0) < LIMIT


def test_sync_close_closes_connection_within_100ms(fake: FakeVLLM, server: FakeServer) -> None:
    texts = llmstream.stream_llm_request_sync("Hi", base_url=server.base_url)
    assert next(texts) == "one"
    t0 = time.perf_counter()
    texts.close()
    assert seen_after(fake, t0) < LIMIT
