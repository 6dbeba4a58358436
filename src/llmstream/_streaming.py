"""The stream objects: ``AsyncChatStream`` and its sync twin ``ChatStream``.

Both are thin I/O shells around :class:`~llmstream._session.StreamSession`:
they send the request, pass each network read to the session with a
timestamp, and hand out what it decoded. Everything they share without I/O
lives in :class:`_StreamBase`.

Closing is prompt on purpose: leaving the ``with`` block for any reason closes
the HTTP response before it is fully read, which makes httpcore close the
connection instead of returning it to the pool. vLLM sees the disconnect and
aborts the request, freeing its KV cache.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

import anyio
import httpx

from ._chunks import ChatCompletionChunk
from ._errors import LLMStreamError, ProtocolError, StreamTimeout
from ._http_errors import MAX_ERROR_BODY_BYTES, connection_error, status_error
from ._result import StreamResult
from ._session import StreamItem, StreamSession

if TYPE_CHECKING:
    from ._client import AsyncClient, Client

__all__ = ["AsyncChatStream", "ChatStream"]

_now = time.perf_counter
_T = TypeVar("_T")


def _text_of(item: StreamItem) -> str | None:
    return item[1] or None


def _chunk_of(item: StreamItem) -> ChatCompletionChunk:
    return item[0]


class _StreamBase:
    """State and decisions shared by the two stream classes (no I/O here)."""

    def __init__(self, body: dict[str, object], *, owns_client: bool) -> None:
        self._body = body
        self._owns_client = owns_client
        self._session: StreamSession | None = None
        self._pending: deque[StreamItem] = deque()
        self._result: StreamResult | None = None
        self._error: LLMStreamError | None = None
        self._entered = False
        self._exhausted = False
        self._closed = False

    @property
    def result(self) -> StreamResult:
        """The assembled result, once the stream has ended or been closed.

        After a full read ``result.complete`` is ``True``; after ``break`` or
        ``close()`` it is the partial result with ``status == "cancelled"``;
        after an error it is the error's ``partial``.

        Example::

            with client.stream("Hi") as stream:
                text = "".join(stream)
            print(stream.result.usage)
        """
        if self._result is None:
            raise LLMStreamError(
                "The stream has not ended yet: read it to the end or close it before "
                "asking for .result (use .snapshot() for the result so far)."
            )
        return self._result

    def snapshot(self) -> StreamResult:
        """The result assembled so far, while the stream is still running.

        Example::

            async for text in stream:
                if len(stream.snapshot().text) > 1000:
                    break
        """
        if self._result is not None:
            return self._result
        if self._session is None:
            return StreamResult()
        return self._session.result(_now())

    @property
    def request_body(self) -> dict[str, object]:
        """The JSON body sent (or to be sent) to the server.

        Example::

            stream.request_body["max_tokens"]
        """
        return self._body

    def _start_session(
        self, response: httpx.Response, started: float, max_line: int, max_event: int
    ) -> StreamSession:
        session = StreamSession(started=started, max_line_bytes=max_line, max_event_bytes=max_event)
        session.headers(_now(), response.headers.get("x-request-id"))
        content_type = response.headers.get("content-type", "")
        if not content_type.lower().startswith("text/event-stream"):
            raise session.fail(
                ProtocolError(
                    f"The server answered {response.status_code} with content type "
                    f"{content_type or 'none'!r}, not text/event-stream: this is not a "
                    "streaming chat completion endpoint. Check the base URL (it usually "
                    "ends in /v1) and that the server speaks the OpenAI protocol."
                ),
                _now(),
            )
        self._session = session
        return session

    def _record_error(self, exc: LLMStreamError) -> LLMStreamError:
        self._error = exc
        if exc.partial is not None:
            self._result = exc.partial
        elif self._session is not None:
            self._result = self._session.cancel(_now())
        return exc

    def _transport_failure(self, exc: httpx.HTTPError) -> LLMStreamError | None:
        """The error for a failure mid-body, or None when the answer was already complete."""
        session = self._session
        assert session is not None
        if session.all_finished:
            # Every choice had finished: only the trailer ([DONE], usage) was lost.
            return None
        if isinstance(exc, httpx.TimeoutException):
            return session.interrupted(
                "The server stopped sending for longer than the read timeout "
                f"({type(exc).__name__}). exc.partial holds what arrived; raise the timeout "
                "or retry.",
                _now(),
                StreamTimeout,
            )
        if isinstance(exc, httpx.DecodingError):
            return session.fail(ProtocolError(f"Could not decode the response body: {exc}"), _now())
        return session.interrupted(
            f"The connection broke while streaming ({type(exc).__name__}: {exc}). "
            "exc.partial holds what arrived; retry the request to get the full answer.",
            _now(),
        )

    @staticmethod
    def _raw_reader(response: httpx.Response) -> bool:
        # Content-encoded bodies (a gzipping proxy) need httpx's decoders; plain
        # ones skip that layer, which costs measurable CPU per chunk.
        return "content-encoding" not in response.headers

    def _take_text(self) -> str | None:
        """The next non-empty text already decoded, or None."""
        pending = self._pending
        while pending:
            text = pending.popleft()[1]
            if text:
                return text
        return None


class AsyncChatStream(_StreamBase):
    """A streamed chat completion, for ``async with`` and ``async for``.

    Iterating yields the text deltas of choice 0; :meth:`chunks` yields the
    typed chunks instead. Leaving the ``async with`` block closes the
    connection at once, whatever the reason (end, ``break``, an exception,
    cancellation), so the server aborts the generation.

    Example::

        async with client.stream("Tell me a joke", max_tokens=64) as stream:
            async for text in stream:
                print(text, end="", flush=True)
        print(stream.result.metrics.time_to_first_token)
    """

    def __init__(self, client: AsyncClient, body: dict[str, object], *, owns_client: bool = False):
        super().__init__(body, owns_client=owns_client)
        self._client = client
        self._response: httpx.Response | None = None
        self._reader: AsyncIterator[bytes] | None = None

    async def __aenter__(self) -> AsyncChatStream:
        self._entered = True
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate(_text_of)

    def chunks(self) -> AsyncIterator[ChatCompletionChunk]:
        """Iterate the typed chunks (every choice, usage chunks included) instead of text.

        Example::

            async with client.stream("Hi", n=2) as stream:
                async for chunk in stream.chunks():
                    print([c.delta.content for c in chunk.choices])
        """
        return self._iterate(_chunk_of)

    async def final_result(self) -> StreamResult:
        """Read whatever is left and return the result.

        Example::

            async with client.stream("Hi") as stream:
                result = await stream.final_result()
        """
        while await self._next_item() is not None:
            pass
        return self.result

    async def aclose(self) -> None:
        """Close the connection now. Reading stops; the result becomes final.

        Safe to call more than once, and from a cancelled task: the close is
        shielded so the socket is always released.

        Example::

            await stream.aclose()
            stream.result.status  # "cancelled" if the answer was not finished
        """
        if self._closed:
            return
        self._closed = True
        if self._result is None and self._session is not None:
            self._result = self._session.cancel(_now())
        with anyio.CancelScope(shield=True):
            reader = self._reader
            if reader is not None and hasattr(reader, "aclose"):
                await reader.aclose()
            if self._response is not None:
                await self._response.aclose()
            if self._owns_client:
                await self._client.aclose()

    def _iterate(self, pick: Callable[[StreamItem], _T | None]) -> AsyncIterator[_T]:
        return _AsyncItems(self, pick)

    async def _next_item(self) -> StreamItem | None:
        pending = self._pending
        while not pending:
            if self._exhausted:
                return None
            if self._error is not None:
                raise self._error
            if self._closed:
                return None
            await self._read()
        return pending.popleft()

    async def _open(self) -> None:
        if self._response is not None or self._closed:
            return
        client = self._client
        try:
            request = await client._request_for(self._body)
            started = _now()
            try:
                response = await client._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise connection_error(exc, str(request.url)) from exc
            self._response = response
            if response.status_code >= 300:
                body = await _read_capped(response)
                raise status_error(
                    response.status_code, response.reason_phrase, response.headers, body
                )
            self._start_session(
                response,
                started,
                client._max_line_bytes,
                client._max_event_bytes,
            )
            self._reader = (
                response.aiter_raw() if self._raw_reader(response) else response.aiter_bytes()
            )
        except LLMStreamError as exc:
            self._record_error(exc)
            await self.aclose()
            raise

    async def _read(self) -> None:
        if self._reader is None:
            await self._open()
            return
        session = self._session
        assert session is not None
        try:
            try:
                data = await self._reader.__anext__()
            except StopAsyncIteration:
                self._result = session.end_of_body(_now())
                self._exhausted = True
                await self.aclose()
                return
            except httpx.HTTPError as exc:
                if self._closed:
                    return  # closed by the caller, from another task or thread
                failure = self._transport_failure(exc)
                if failure is not None:
                    raise failure from exc
                self._result = session.finish(_now())
                self._exhausted = True
                await self.aclose()
                return
            self._pending.extend(session.feed(data, _now()))
            if session.error is not None:
                raise session.error
        except LLMStreamError as exc:
            # Raised to the reader once the chunks decoded before it are consumed.
            self._record_error(exc)
            await self.aclose()


class _AsyncItems(AsyncIterator[_T]):
    """Iterates a stream's items, picking text or chunks.

    A class rather than an async generator: an abandoned async generator is
    finalised by the event loop at some later point (and trio warns about it),
    while this holds nothing that needs finalising. Iterating a stream that was
    not entered with ``async with`` opens it on first use and closes it at the
    end of the loop or on an error; after a ``break`` call ``aclose()``, or use
    ``async with``.
    """

    __slots__ = ("_implicit", "_pick", "_stream")

    def __init__(self, stream: AsyncChatStream, pick: Callable[[StreamItem], _T | None]) -> None:
        self._stream = stream
        self._pick = pick
        self._implicit = not stream._entered

    async def __anext__(self) -> _T:
        stream = self._stream
        pending = stream._pending
        pick = self._pick
        while True:
            if pending:
                item = pending.popleft()
            else:
                try:
                    next_item = await stream._next_item()
                except BaseException:
                    if self._implicit:
                        await stream.aclose()
                    raise
                if next_item is None:
                    if self._implicit:
                        await stream.aclose()
                    raise StopAsyncIteration
                item = next_item
            value = pick(item)
            if value is not None:
                return value


class ChatStream(_StreamBase):
    """A streamed chat completion, for ``with`` and ``for`` (the sync twin of AsyncChatStream).

    Example::

        with client.stream("Tell me a joke", max_tokens=64) as stream:
            for text in stream:
                print(text, end="", flush=True)
        print(stream.result.metrics.time_to_first_token)
    """

    def __init__(self, client: Client, body: dict[str, object], *, owns_client: bool = False):
        super().__init__(body, owns_client=owns_client)
        self._client = client
        self._response: httpx.Response | None = None
        self._reader: Iterator[bytes] | None = None

    def __enter__(self) -> ChatStream:
        self._entered = True
        self._open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return self._iterate(_text_of)

    def chunks(self) -> Iterator[ChatCompletionChunk]:
        """Iterate the typed chunks (every choice, usage chunks included) instead of text.

        Example::

            with client.stream("Hi", n=2) as stream:
                for chunk in stream.chunks():
                    print([c.delta.content for c in chunk.choices])
        """
        return self._iterate(_chunk_of)

    def final_result(self) -> StreamResult:
        """Read whatever is left and return the result.

        Example::

            with client.stream("Hi") as stream:
                result = stream.final_result()
        """
        while self._next_item() is not None:
            pass
        return self.result

    def close(self) -> None:
        """Close the connection now. Reading stops; the result becomes final.

        Example::

            stream.close()
            stream.result.status  # "cancelled" if the answer was not finished
        """
        if self._closed:
            return
        self._closed = True
        if self._result is None and self._session is not None:
            self._result = self._session.cancel(_now())
        if self._response is not None:
            if not self._exhausted:
                # Unread body: the connection cannot be reused, and a reader in
                # another thread must be woken.
                _shutdown_socket(self._response)
            self._response.close()
        if self._owns_client:
            self._client.close()

    def _iterate(self, pick: Callable[[StreamItem], _T | None]) -> Iterator[_T]:
        implicit = not self._entered
        try:
            while True:
                item = self._next_item()
                if item is None:
                    return
                value = pick(item)
                if value is not None:
                    yield value
        finally:
            if implicit:
                self.close()

    def _next_item(self) -> StreamItem | None:
        pending = self._pending
        while not pending:
            if self._exhausted:
                return None
            if self._error is not None:
                raise self._error
            if self._closed:
                return None
            self._read()
        return pending.popleft()

    def _open(self) -> None:
        if self._response is not None or self._closed:
            return
        client = self._client
        try:
            request = client._request_for(self._body)
            started = _now()
            try:
                response = client._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise connection_error(exc, str(request.url)) from exc
            self._response = response
            if response.status_code >= 300:
                body = _read_capped_sync(response)
                raise status_error(
                    response.status_code, response.reason_phrase, response.headers, body
                )
            self._start_session(
                response,
                started,
                client._max_line_bytes,
                client._max_event_bytes,
            )
            self._reader = (
                response.iter_raw() if self._raw_reader(response) else response.iter_bytes()
            )
        except LLMStreamError as exc:
            self._record_error(exc)
            self.close()
            raise

    def _read(self) -> None:
        if self._reader is None:
            self._open()
            return
        session = self._session
        assert session is not None
        try:
            try:
                data = next(self._reader)
            except StopIteration:
                self._result = session.end_of_body(_now())
                self._exhausted = True
                self.close()
                return
            except httpx.HTTPError as exc:
                if self._closed:
                    return  # closed by the caller, from another task or thread
                failure = self._transport_failure(exc)
                if failure is not None:
                    raise failure from exc
                self._result = session.finish(_now())
                self._exhausted = True
                self.close()
                return
            self._pending.extend(session.feed(data, _now()))
            if session.error is not None:
                raise session.error
        except LLMStreamError as exc:
            # Raised to the reader once the chunks decoded before it are consumed.
            self._record_error(exc)
            self.close()


async def _read_capped(response: httpx.Response) -> bytes:
    body = bytearray()
    try:
        async for part in response.aiter_bytes():
            body += part
            if len(body) >= MAX_ERROR_BODY_BYTES:
                break
    except httpx.HTTPError:
        pass  # the status is the error; a body cut short still tells what it can
    return bytes(body)


def _read_capped_sync(response: httpx.Response) -> bytes:
    body = bytearray()
    try:
        for part in response.iter_bytes():
            body += part
            if len(body) >= MAX_ERROR_BODY_BYTES:
                break
    except httpx.HTTPError:
        pass
    return bytes(body)


def _shutdown_socket(response: httpx.Response) -> None:
    """Shut the socket down so a read blocked in another thread returns at once.

    Closing a file descriptor does not wake a thread blocked in ``recv()`` on
    it; ``shutdown()`` does, and sends the FIN that tells the server to abort.
    """
    stream = response.extensions.get("network_stream")
    get_extra_info = getattr(stream, "get_extra_info", None)
    sock = get_extra_info("socket") if get_extra_info is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
