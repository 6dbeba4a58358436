"""Run the same scenario through the async client and the sync client.

Tests are async (both anyio backends); the sync client runs in a worker
thread, as it would in a threaded application.
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

import llmstream
from llmstream.testing import FakeVLLM
from llmstream.testing._fake import Exchange
from llmstream.testing._script import Action, HttpRequest, Send, is_chat_request
from llmstream.testing._transport import FakeTransport

MODES = ["async", "sync"]
# The async client on aiohttp, over loopback sockets (asyncio and uvloop; not trio, which
# conftest deselects). For tests whose server is real, or an emulator that collect()
# can serve over a socket instead of in process.
AIOHTTP = "async-aiohttp"
# The async client on llmstream's own HTTP/1.1 over asyncio: the same, without aiohttp.
ASYNCIO = "async-asyncio"
SOCKET_MODES = (
    [*MODES, AIOHTTP, ASYNCIO] if importlib.util.find_spec("aiohttp") else [*MODES, ASYNCIO]
)


@contextlib.contextmanager
def reach(mode: str, fake: FakeVLLM) -> Iterator[tuple[str, dict[str, Any]]]:
    """The base URL and client arguments that reach ``fake`` in ``mode``.

    In process for httpx; over a loopback socket for aiohttp and asyncio, which have no
    other way.

    Example::

        with reach(mode, fake) as (url, kwargs):
            client = llmstream.AsyncClient(url, **kwargs)
    """
    if mode in (AIOHTTP, ASYNCIO):
        with fake.serve() as server:
            yield server.base_url, async_client_kwargs(mode)
    else:
        yield "http://fake-vllm.test/v1", {"transport": fake.transport()}


def async_client_kwargs(mode: str) -> dict[str, Any]:
    """What an ``AsyncClient`` needs for ``mode``: the aiohttp or asyncio transport, or nothing.

    Example::

        llmstream.AsyncClient(url, **async_client_kwargs("async-aiohttp"))
    """
    if mode == AIOHTTP:
        return {"transport": llmstream.AiohttpTransport()}
    if mode == ASYNCIO:
        return {"transport": llmstream.AsyncioTransport()}
    return {}


@dataclass
class Outcome:
    """What a consumer saw: the text pieces, and the result or the error."""

    pieces: list[str] = field(default_factory=list)
    result: llmstream.StreamResult | None = None
    error: llmstream.LLMStreamError | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def final(self) -> llmstream.StreamResult:
        """The result, or the error's partial result."""
        if self.result is not None:
            return self.result
        assert self.error is not None and self.error.partial is not None
        return self.error.partial


async def collect(
    mode: str,
    *,
    base_url: str = "http://fake-vllm.test/v1",
    transport: Any = None,
    prompt: llmstream.PromptOrMessages = "Hi",
    client_kwargs: dict[str, Any] | None = None,
    on_piece: Callable[[llmstream.StreamResult], bool] | None = None,
    busy: float = 0.0,
    **stream_kwargs: Any,
) -> Outcome:
    """Stream one request to the end (or until ``on_piece`` says stop) in ``mode``.

    ``busy``: seconds of the consumer's own work after the first piece, during which
    the stream's reader runs on (the async consumer awaits, the sync one sleeps).
    """
    kwargs = dict(client_kwargs or {})
    outcome = Outcome()
    if mode.startswith("async"):
        try:
            async with contextlib.AsyncExitStack() as stack:
                if mode == AIOHTTP and isinstance(transport, FakeTransport):
                    # aiohttp sends over sockets only: the emulator is served on loopback.
                    base_url = stack.enter_context(transport.fake.serve()).base_url
                    transport = None
                assert transport is None or mode != AIOHTTP, "aiohttp takes no httpx transport"
                kwargs.update(async_client_kwargs(mode))
                if transport is not None:
                    kwargs["transport"] = transport
                client = await stack.enter_async_context(llmstream.AsyncClient(base_url, **kwargs))
                stream = await stack.enter_async_context(client.stream(prompt, **stream_kwargs))
                async for piece in stream:
                    outcome.pieces.append(piece)
                    if busy and len(outcome.pieces) == 1:
                        await anyio.sleep(busy)
                    if on_piece is not None and on_piece(stream.snapshot()):
                        break
            outcome.result = stream.result
        except llmstream.LLMStreamError as exc:
            outcome.error = exc
        return outcome
    if transport is not None:
        kwargs["transport"] = transport

    def run_sync() -> None:
        try:
            with (
                llmstream.Client(base_url, **kwargs) as client,
                client.stream(prompt, **stream_kwargs) as stream,
            ):
                for piece in stream:
                    outcome.pieces.append(piece)
                    if busy and len(outcome.pieces) == 1:
                        time.sleep(busy)
                    if on_piece is not None and on_piece(stream.snapshot()):
                        break
            outcome.result = stream.result
        except llmstream.LLMStreamError as exc:
            outcome.error = exc

    await anyio.to_thread.run_sync(run_sync)
    return outcome


def no_raw_httpx(exc: BaseException | None) -> bool:
    """True when no httpx (or aiohttp) exception escapes: it may be the cause, never the error."""
    if importlib.util.find_spec("aiohttp") is not None:
        import aiohttp

        if isinstance(exc, aiohttp.ClientError):
            return False
    return not isinstance(exc, httpx.HTTPError)


class WatchedVLLM(FakeVLLM):
    """The emulator, with events a test can wait on instead of sleeping.

    ``events_written`` counts the ``data:`` events that have left the server. The
    server asks for its next action only once the previous one is done: over a
    socket, once its bytes are in the kernel's send buffer; in-process, once the
    client has read them. ``answers_written`` counts chat completions written to
    their end.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._written = threading.Condition()
        self.events_written = 0
        self.answers_written = 0

    def exchange(self, request: HttpRequest) -> Exchange:
        exchange = super().exchange(request)
        if is_chat_request(request.method, request.path):
            exchange.actions = self._watch(exchange.actions)
        return exchange

    def _watch(self, actions: Iterator[Action]) -> Iterator[Action]:
        for action in actions:
            yield action
            if isinstance(action, Send) and action.event:
                with self._written:
                    self.events_written += 1
                    self._written.notify_all()
        with self._written:
            self.answers_written += 1
            self._written.notify_all()

    def wait_for_events(self, count: int, timeout: float = 10.0) -> None:
        """Block until the server has written ``count`` events in all."""
        self._wait(lambda: self.events_written >= count, f"{count} events", timeout)

    def wait_for_answers(self, count: int = 1, timeout: float = 10.0) -> None:
        """Block until the server has written ``count`` chat completions to their end."""
        self._wait(lambda: self.answers_written >= count, f"{count} answers", timeout)

    async def await_events(self, count: int, timeout: float = 10.0) -> None:
        """:meth:`wait_for_events` for async code."""
        await anyio.to_thread.run_sync(self.wait_for_events, count, timeout)

    async def await_answers(self, count: int = 1, timeout: float = 10.0) -> None:
        """:meth:`wait_for_answers` for async code."""
        await anyio.to_thread.run_sync(self.wait_for_answers, count, timeout)

    def _wait(self, done: Callable[[], bool], what: str, timeout: float) -> None:
        with self._written:
            if not self._written.wait_for(done, timeout):
                raise TimeoutError(
                    f"the server wrote {self.events_written} events and "
                    f"{self.answers_written} answers, not {what}, within {timeout} s"
                )


async def close_client_mid_stream(
    mode: str,
    base_url: str,
    *,
    clock: Callable[[], float],
    within: float,
    at_first_token: bool = False,
    **stream_kwargs: Any,
) -> tuple[Outcome, float]:
    """Close the client from another task (or thread) while one of its streams runs.

    The close comes once the consumer has its first piece, or, with ``at_first_token``,
    once the request was sent and waits for it. The consumer must be done ``within``
    seconds of the close. Returns what it saw and when the close began (``clock()``).

    Example::

        outcome, closed_at = await close_client_mid_stream("sync", url, clock=time.time,
                                                           within=1.0)
    """
    outcome = Outcome()
    closed_at = 0.0
    if mode != "sync":
        client = llmstream.AsyncClient(base_url, **async_client_kwargs(mode))
        ready = anyio.Event()

        async def consume() -> None:
            try:
                async with client.stream("Hi", **stream_kwargs) as stream:
                    if at_first_token:
                        ready.set()
                    async for piece in stream:
                        outcome.pieces.append(piece)
                        ready.set()
            except llmstream.LLMStreamError as exc:
                outcome.error = exc

        async with anyio.create_task_group() as group:
            group.start_soon(consume)
            await ready.wait()
            closed_at = clock()
            await client.aclose()
            group.cancel_scope.deadline = anyio.current_time() + within
        assert not group.cancel_scope.cancelled_caught, f"not done {within} s after the close"
        return outcome, closed_at
    sync_client = llmstream.Client(base_url)
    ready_sync = threading.Event()

    def consume_sync() -> None:
        try:
            with sync_client.stream("Hi", **stream_kwargs) as stream:
                iterator = iter(stream)
                if at_first_token:
                    ready_sync.set()
                for piece in iterator:
                    outcome.pieces.append(piece)
                    ready_sync.set()
        except llmstream.LLMStreamError as exc:
            outcome.error = exc

    thread = threading.Thread(target=consume_sync)
    thread.start()
    assert ready_sync.wait(5)
    closed_at = clock()
    sync_client.close()
    thread.join(within)
    assert not thread.is_alive(), f"the consumer was not done {within} s after the close"
    return outcome, closed_at
