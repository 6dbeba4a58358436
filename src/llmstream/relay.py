"""Relay a stream to a browser over SSE, and cancel upstream when the browser goes.

A web app that streams tokens to a browser holds two connections: browser to
app, and app to vLLM. When the browser goes away (tab closed, navigation), the
request to vLLM must be cancelled too, or the server keeps generating into the
void while holding the sequence's KV cache. :class:`SSERelay` is a plain ASGI
application that does exactly that: it listens for ``http.disconnect`` while
it streams, and leaving the upstream stream's ``async with`` block closes the
connection to vLLM, which aborts the request.

It needs no web framework. With Starlette or FastAPI, return
:func:`relay_response` (it imports Starlette lazily, from the ``relay`` extra).

Example (FastAPI)::

    from llmstream.relay import relay_response

    @app.post("/chat")
    async def chat(body: ChatIn):
        return relay_response(client.stream(body.prompt, max_tokens=256))
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import anyio

from ._async_stream import AsyncChatStream
from ._errors import InvalidRequestError, LLMStreamError
from ._result import StreamResult

if TYPE_CHECKING:
    from starlette.responses import Response

__all__ = ["SSERelay", "default_event", "relay_response"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
EventFormatter = Callable[[str], bytes]


def default_event(text: str) -> bytes:
    """One text delta as an SSE event: ``data: {"text": "..."}``.

    Example::

        default_event("Hi")  # b'data: {"text": "Hi"}\\n\\n'
    """
    return b"data: " + json.dumps({"text": text}, ensure_ascii=False).encode() + b"\n\n"


def _summary_event(result: StreamResult) -> bytes:
    summary = {
        "finish_reason": result.finish_reason,
        "usage": result.usage.model_dump() if result.usage is not None else None,
    }
    return b"event: done\ndata: " + json.dumps(summary).encode() + b"\n\ndata: [DONE]\n\n"


def _error_event(exc: LLMStreamError) -> bytes:
    # The browser learns that the answer is incomplete, not the upstream's details.
    body = {"error": {"type": type(exc).__name__, "message": "the upstream stream failed"}}
    return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"


class SSERelay:
    """An ASGI app that streams one :class:`~llmstream.AsyncChatStream` as SSE.

    Each text delta becomes an event (``event_format``, by default
    ``data: {"text": ...}``); the end sends ``event: done`` with the finish
    reason and usage, then ``data: [DONE]``; a failure upstream sends
    ``event: error``. When the client disconnects, the upstream request is
    closed at once, so vLLM aborts it. ``on_result`` is called with the
    final (or partial) result, e.g. to record usage.

    Example::

        async def app(scope, receive, send):
            stream = client.stream("Tell me a story")
            await SSERelay(stream)(scope, receive, send)
    """

    def __init__(
        self,
        stream: AsyncChatStream,
        *,
        event_format: EventFormatter = default_event,
        headers: dict[str, str] | None = None,
        on_result: Callable[[StreamResult], object] | None = None,
    ) -> None:
        self.stream = stream
        self.event_format = event_format
        self.headers = {
            "content-type": "text/event-stream; charset=utf-8",
            "cache-control": "no-cache",
            # Tell nginx-style proxies not to buffer the events.
            "x-accel-buffering": "no",
            **(headers or {}),
        }
        self.on_result = on_result

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one HTTP request (ASGI)."""
        self._final: StreamResult | None = None
        try:
            try:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [(k.encode(), v.encode()) for k, v in self.headers.items()],
                    }
                )
            except OSError:  # the browser left before the answer began
                await self.stream.aclose()
                return
            async with anyio.create_task_group() as tg:

                async def watch_for_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()  # the browser left: stop relaying, close upstream

                tg.start_soon(watch_for_disconnect)
                await self._relay(send)
                tg.cancel_scope.cancel()
        finally:
            # However the relay ended (a disconnect, a failed send, the server's own
            # cancellation): the usage of what was generated is reported.
            if self.on_result is not None:
                self.on_result(self._final or self._stopped())

    def _stopped(self) -> StreamResult:
        # The browser left: the result as the stream froze it, or an empty cancelled one.
        try:
            return self.stream.result
        except LLMStreamError as exc:
            return exc.partial or StreamResult(status="cancelled")

    async def _relay(self, send: Send) -> None:
        # ASGI servers raise OSError from send() once the browser has gone (a disconnect
        # they saw before telling receive()): as a disconnect, the relay stops there, and
        # leaving `async with stream` closes the upstream request.
        stream = self.stream
        try:
            async with stream:
                async for text in stream:
                    await send(
                        {
                            "type": "http.response.body",
                            "body": self.event_format(text),
                            "more_body": True,
                        }
                    )
            self._final = stream.result
            tail = _summary_event(stream.result)
        except LLMStreamError as exc:
            self._final = exc.partial or StreamResult(status="error")
            tail = _error_event(exc)
        except OSError:
            return
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": tail, "more_body": False})


def relay_response(
    stream: AsyncChatStream,
    *,
    event_format: EventFormatter = default_event,
    headers: dict[str, str] | None = None,
    on_result: Callable[[StreamResult], object] | None = None,
) -> Response:
    """A Starlette/FastAPI response relaying ``stream`` as SSE (see :class:`SSERelay`).

    Needs Starlette (``pip install "llmstream-sdk[relay]"``); imported only here.
    Without it, raises :class:`~llmstream.InvalidRequestError` saying so.

    Example::

        @app.get("/chat")
        async def chat(q: str):
            return relay_response(client.stream(q))
    """
    try:
        from starlette.responses import Response
    except ImportError as exc:
        raise InvalidRequestError(
            "relay_response() needs Starlette, which is not installed: "
            'pip install "llmstream-sdk[relay]" (or use SSERelay, a plain ASGI app that '
            f"needs no framework). ({exc})"
        ) from exc

    relay = SSERelay(stream, event_format=event_format, headers=headers, on_result=on_result)

    class _RelayResponse(Response):
        media_type = "text/event-stream"

        def __init__(self) -> None:
            super().__init__(headers=relay.headers)

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await relay(scope, receive, send)

    return _RelayResponse()
