"""One call, one stream of text: the direct port of a ``streamLLMRequest`` helper."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator
from types import TracebackType
from typing import Any, overload

from ._async_stream import AsyncChatStream
from ._client import AsyncClient, Client

__all__ = ["stream_llm_request", "stream_llm_request_sync"]

logger = logging.getLogger("llmstream")

# Closes started by a dropped stream: the event loop keeps only weak references to tasks.
_closing: set[asyncio.Task[None]] = set()


def stream_llm_request(
    prompt: str,
    max_tokens: int = 512,
    *,
    base_url: str | None = None,
    model: str | None = None,
    temperature: float = 0.7,
    api_key: str | None = None,
    **extra_params: Any,
) -> AsyncGenerator[str, None]:
    """Stream the answer to ``prompt`` as text deltas, with a client made for the call.

    The connection closes when the loop ends, breaks or raises: a ``break``
    shuts the socket down at once (the server aborts the generation), and
    ``aclose()`` (or ``contextlib.aclosing``) also waits until everything is
    released. Nothing is sent until the first iteration. Errors are the same
    as the client's: ``APIStatusError`` for a non-2xx answer,
    ``StreamInterrupted`` when the stream breaks off.

    Example::

        async for text in llmstream.stream_llm_request("Hi", 64, base_url=url):
            print(text, end="", flush=True)
    """

    def make_client() -> AsyncClient:
        return AsyncClient(base_url, model=model, api_key=api_key)

    def make_stream(client: AsyncClient) -> AsyncChatStream:
        return client.stream(prompt, max_tokens=max_tokens, temperature=temperature, **extra_params)

    return _TextStream(make_client, make_stream)


class _TextStream(AsyncGenerator[str, None]):
    """What :func:`stream_llm_request` returns: an async generator that closes on a break.

    Not an ``async def`` generator. One of those, dropped after a ``break``, is closed
    later by the event loop in a task of its own (asyncio) or a system task (trio): the
    connection stayed open until then, and leaving the stream's ``async with`` from that
    other task broke its cancel scope. This object is dropped right at the ``break``
    (CPython counts references) and its ``__del__`` shuts the socket down at once. It
    iterates the stream without ``async with``: no reader task, no task group that must
    be left from the task that entered it, so closing works from any task.
    """

    __slots__ = ("_client", "_closed", "_make_client", "_make_stream", "_stream", "_texts")

    def __init__(
        self,
        make_client: Callable[[], AsyncClient],
        make_stream: Callable[[AsyncClient], AsyncChatStream],
    ) -> None:
        self._make_client = make_client
        self._make_stream = make_stream
        self._client: AsyncClient | None = None
        self._stream: AsyncChatStream | None = None
        self._texts: AsyncIterator[str] | None = None
        self._closed = False

    def __aiter__(self) -> _TextStream:
        return self

    async def __anext__(self) -> str:
        return await self.asend(None)

    async def asend(self, value: None) -> str:
        """The next text delta (a sent value is ignored, as the text does not depend on it)."""
        if self._closed:
            raise StopAsyncIteration
        try:
            if self._texts is None:
                if value is not None:
                    raise TypeError("can't send non-None value to a just-started async generator")
                self._texts = self._start()
            return await self._texts.__anext__()
        except BaseException:
            # The end, an error or a cancellation: whatever it is, the call is over.
            await self.aclose()
            raise

    @overload
    async def athrow(
        self,
        typ: type[BaseException],
        val: BaseException | object = None,
        tb: TracebackType | None = None,
        /,
    ) -> str: ...
    @overload
    async def athrow(
        self, typ: BaseException, val: None = None, tb: TracebackType | None = None, /
    ) -> str: ...
    async def athrow(
        self,
        typ: type[BaseException] | BaseException,
        val: BaseException | object = None,
        tb: TracebackType | None = None,
        /,
    ) -> str:
        """Raise ``typ`` where the generator waits: the call closes, the exception is raised."""
        await self.aclose()
        if isinstance(typ, BaseException):
            raise typ.with_traceback(tb) if tb is not None else typ
        error = val if isinstance(val, typ) else typ() if val is None else typ(val)
        raise error.with_traceback(tb) if tb is not None else error

    async def aclose(self) -> None:
        """Close the connection and the client made for the call; safe to call more than once."""
        self._closed = True
        stream, self._stream = self._stream, None
        client, self._client = self._client, None
        self._texts = None
        # Both closes are shielded: a cancelled caller still releases the socket.
        if stream is not None:
            await stream.aclose()
        if client is not None:
            await client.aclose()

    def __del__(self) -> None:
        # Dropped without aclose(), as `async for ...: break` does: cut the connection now so
        # the server stops generating, then release the socket and the pool in a task of
        # their own (nothing can be awaited here; left to the garbage collector, the socket
        # would be closed with a ResourceWarning).
        stream, client = self._stream, self._client
        if stream is not None:
            stream.cancel()
        if client is not None:
            _close_soon(stream, client)

    def _start(self) -> AsyncIterator[str]:
        self._client = self._make_client()
        self._stream = self._make_stream(self._client)
        # Not entered with `async with`: the stream opens on the first read and reads only
        # when asked, in whichever task asks.
        return aiter(self._stream)


def _close_soon(stream: AsyncChatStream | None, client: AsyncClient) -> None:
    """Close ``stream`` and ``client`` in a new task of the running event loop, if any."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is not None:
        task = _ReleaseTask(_release(stream, client), loop=loop)
        _closing.add(task)
        task.add_done_callback(_closing.discard)
        return
    trio = sys.modules.get("trio")
    if trio is not None:
        # Outside a trio run too (the loop has ended): the garbage collector closes it.
        with contextlib.suppress(RuntimeError):
            trio.lowlevel.spawn_system_task(_release, stream, client)


class _ReleaseTask(asyncio.Task[None]):
    """A task that releases a socket: not cancellable, so that it runs even at shutdown.

    ``asyncio.run`` cancels every task left when its main coroutine returns, and a task
    cancelled before its first step never runs at all: a ``break`` just before the end
    would leave the socket to the garbage collector. The release does no network wait
    (the connection is shut down already), so it cannot hold the loop's shutdown up.
    """

    def cancel(self, msg: Any | None = None) -> bool:
        return False


async def _release(stream: AsyncChatStream | None, client: AsyncClient) -> None:
    try:
        if stream is not None:
            await stream.aclose()
        await client.aclose()
    except Exception:
        # No caller to raise to; and an error escaping a trio system task ends the run.
        logger.exception("closing an abandoned stream_llm_request failed")


def stream_llm_request_sync(
    prompt: str,
    max_tokens: int = 512,
    *,
    base_url: str | None = None,
    model: str | None = None,
    temperature: float = 0.7,
    api_key: str | None = None,
    **extra_params: Any,
) -> Generator[str, None, None]:
    """The sync twin of :func:`stream_llm_request`.

    A generator: dropping it after a ``break`` closes it at once, which
    closes the connection.

    Example::

        for text in llmstream.stream_llm_request_sync("Hi", 64, base_url=url):
            print(text, end="", flush=True)
    """
    with (
        Client(base_url, model=model, api_key=api_key) as client,
        client.stream(
            prompt, max_tokens=max_tokens, temperature=temperature, **extra_params
        ) as stream,
    ):
        yield from stream
