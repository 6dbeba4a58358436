"""In-process httpx transports that run the emulator's actions without sockets.

Waits use ``anyio.sleep`` (async) or an event a close wakes (sync) and honour the request's read
timeout, raising ``httpx.ReadTimeout`` as httpcore would. A cut connection raises
``httpx.RemoteProtocolError`` from the body, like httpcore on a peer close mid-body.
Closing a response before its body ended records a disconnect.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx

from ._fake import Exchange, FakeVLLM
from ._script import Action, Cut, Hang, Head, HttpRequest, Refuse, Send, Wait

__all__ = ["FakeTransport"]

_NO_RESPONSE = "Server disconnected without sending a response."
_CUT = "peer closed connection without sending complete message body (incomplete chunked read)"


def _read_timeout(request: httpx.Request) -> float | None:
    timeout = request.extensions.get("timeout")
    if isinstance(timeout, dict):
        value = timeout.get("read")
        return float(value) if value is not None else None
    return None


def _to_http(request: httpx.Request, body: bytes) -> HttpRequest:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers.raw}
    return HttpRequest(request.method, request.url.path, headers, body)


def _response(
    head: Head, stream: httpx.SyncByteStream | httpx.AsyncByteStream, request: httpx.Request
) -> httpx.Response:
    return httpx.Response(head.status, headers=list(head.headers), stream=stream, request=request)


class _SyncBody(httpx.SyncByteStream):
    def __init__(
        self, exchange: Exchange, actions: Iterator[Action], request: httpx.Request
    ) -> None:
        self._exchange = exchange
        self._actions = actions
        self._request = request
        self._timeout = _read_timeout(request)
        self._sent = 0
        self._done = False
        # Set by close(): a client closing from another thread wakes a waiting read,
        # as closing a socket would.
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        for action in self._actions:
            if isinstance(action, Send):
                if action.event:
                    self._sent += 1
                yield action.data
            elif isinstance(action, Wait | Hang):
                _sync_wait(action, self._timeout, self._request, self._closed)
            elif isinstance(action, Cut | Refuse):
                self._done = True
                raise httpx.RemoteProtocolError(_CUT, request=self._request)
        self._done = True

    def close(self) -> None:
        self._closed.set()
        if not self._done:
            self._done = True
            self._exchange.client_left(self._sent)


class _AsyncBody(httpx.AsyncByteStream):
    def __init__(
        self, exchange: Exchange, actions: Iterator[Action], request: httpx.Request
    ) -> None:
        self._exchange = exchange
        self._actions = actions
        self._request = request
        self._timeout = _read_timeout(request)
        self._sent = 0
        self._done = False

    # An iterator object rather than an async generator: a response closed part-way
    # leaves nothing for the event loop to finalise later (trio warns about that).
    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        for action in self._actions:
            if isinstance(action, Send):
                if action.event:
                    self._sent += 1
                return action.data
            if isinstance(action, Wait | Hang):
                await _async_wait(action, self._timeout, self._request)
            elif isinstance(action, Cut | Refuse):
                self._done = True
                raise httpx.RemoteProtocolError(_CUT, request=self._request)
        self._done = True
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._exchange.client_left(self._sent)


def _sync_wait(
    action: Wait | Hang,
    timeout: float | None,
    request: httpx.Request,
    closed: threading.Event | None = None,
) -> None:
    seconds = action.seconds if isinstance(action, Wait) else None
    closed = closed or threading.Event()
    timed_out = timeout is not None and (seconds is None or seconds > timeout)
    # A stalled server with no client timeout blocks until the client closes.
    if closed.wait(timeout if timed_out else seconds):
        raise httpx.ReadError("the connection was closed", request=request)
    if timed_out:
        raise httpx.ReadTimeout("timed out", request=request)


async def _async_wait(action: Wait | Hang, timeout: float | None, request: httpx.Request) -> None:
    seconds = action.seconds if isinstance(action, Wait) else None
    if timeout is not None and (seconds is None or seconds > timeout):
        await anyio.sleep(timeout)
        raise httpx.ReadTimeout("timed out", request=request)
    if seconds is None:
        await anyio.sleep_forever()
    else:
        await anyio.sleep(seconds)


class FakeTransport(httpx.AsyncBaseTransport, httpx.BaseTransport):
    """An httpx transport, sync and async, answering as a :class:`FakeVLLM`.

    >>> client = httpx.Client(transport=FakeVLLM("Hi").transport(), base_url="http://vllm")
    >>> client.get("/v1/models").json()["data"][0]["id"]
    'llmstream/fake-model'
    """

    def __init__(self, fake: FakeVLLM) -> None:
        self.fake = fake

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Answer ``request`` synchronously (``httpx.Client``)."""
        exchange = self.fake.exchange(_to_http(request, request.read()))
        timeout = _read_timeout(request)
        try:
            for action in exchange.actions:
                if isinstance(action, Head):
                    body = _SyncBody(exchange, exchange.actions, request)
                    return _response(action, body, request)
                if isinstance(action, Wait | Hang):
                    _sync_wait(action, timeout, request)
                elif isinstance(action, Refuse | Cut):
                    break
        except BaseException:
            exchange.end()  # a timeout before the headers: the request leaves the load
            raise
        raise httpx.RemoteProtocolError(_NO_RESPONSE, request=request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Answer ``request`` asynchronously (``httpx.AsyncClient``)."""
        exchange = self.fake.exchange(_to_http(request, await request.aread()))
        timeout = _read_timeout(request)
        try:
            for action in exchange.actions:
                if isinstance(action, Head):
                    body = _AsyncBody(exchange, exchange.actions, request)
                    return _response(action, body, request)
                if isinstance(action, Wait | Hang):
                    await _async_wait(action, timeout, request)
                elif isinstance(action, Refuse | Cut):
                    break
        except BaseException:
            exchange.end()  # a timeout or a cancellation before the headers
            raise
        raise httpx.RemoteProtocolError(_NO_RESPONSE, request=request)
