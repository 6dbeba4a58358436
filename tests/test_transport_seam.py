"""The shells reach the network only through the transport seam.

A transport written here from the protocols alone, with no httpx in it, carries whole
calls for both shells: a stream, a retry after a 503, and a stop that aborts the body.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import anyio
import pytest

import llmstream
from llmstream._call import ReadFailure
from llmstream._header_wait import HeaderWait
from llmstream._transport import HTTPRequest

pytestmark = pytest.mark.anyio


def _event(text: str | None, finish: str | None = None) -> bytes:
    delta = {"content": text} if text is not None else {}
    body = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body)}\n\n".encode()


class _Broken(Exception):
    """How this transport's reads fail once aborted."""


class _Response:
    def __init__(self, status: int, parts: list[bytes], log: list[str]) -> None:
        self.status_code = status
        self.reason_phrase = "OK" if status == 200 else "Service Unavailable"
        ctype = "text/event-stream" if status == 200 else "application/json"
        self.headers: Mapping[str, str] = {"content-type": ctype}
        self._parts = parts
        self._log = log
        self._aborted = False
        self._done = False

    @property
    def body_done(self) -> bool:
        return self._done

    def _next(self) -> bytes:
        if self._aborted:
            raise _Broken("aborted")
        if not self._parts:
            self._done = True
            raise StopIteration
        return self._parts.pop(0)

    def body_ended(self) -> None:
        self._done = True

    def read_failure(self, exc: Exception) -> ReadFailure | None:
        return ReadFailure("broken", str(exc)) if isinstance(exc, _Broken) else None

    def abort(self) -> None:
        if not self._done:
            self._aborted = True
            self._log.append("abort")


class _AsyncResponse(_Response):
    async def read(self, limit: int) -> bytes:
        self._done = True
        return b"".join(self._parts)[:limit]

    async def _next_async(self) -> bytes:
        await anyio.sleep(0)
        try:
            return self._next()
        except StopIteration:
            raise StopAsyncIteration from None

    def stream(self, body_timeout: float | None) -> AsyncIterator[bytes]:
        response = self

        class Reader:
            def __aiter__(self) -> Reader:
                return self

            async def __anext__(self) -> bytes:
                return await response._next_async()

        return Reader()

    async def aclose(self) -> None:
        self._log.append("release" if self._done else "release unread")


class _SyncResponse(_Response):
    def read(self, limit: int) -> bytes:
        self._done = True
        return b"".join(self._parts)[:limit]

    def stream(self, body_timeout: float | None) -> Iterator[bytes]:
        while True:
            try:
                yield self._next()
            except StopIteration:
                return

    def close(self) -> None:
        self._log.append("release" if self._done else "release unread")


ANSWERS = [
    (503, [b'{"error": {"message": "busy"}}']),
    (200, [_event("Hello"), _event(" there"), _event(None, "stop"), b"data: [DONE]\n\n"]),
]


class _Transport:
    def __init__(self, answers: list[tuple[int, list[bytes]]], blocking: bool) -> None:
        self.answers = list(answers)
        self.blocking = blocking
        self.sent: list[HTTPRequest] = []
        self.log: list[str] = []

    @property
    def requests_in_flight(self) -> int:
        return 0

    def _respond(self, request: HTTPRequest) -> Any:
        self.sent.append(request)
        status, parts = self.answers.pop(0)
        cls = _SyncResponse if self.blocking else _AsyncResponse
        return cls(status, list(parts), self.log)

    def close(self) -> None:
        pass


class _AsyncTransport(_Transport):
    async def send(self, request: HTTPRequest) -> Any:
        return self._respond(request)

    async def aclose(self) -> None:
        pass


class _SyncTransport(_Transport):
    def send(self, request: HTTPRequest, header_wait: HeaderWait | None = None) -> Any:
        return self._respond(request)


RETRY = llmstream.RetryPolicy(initial_backoff=0, max_backoff=0)


async def test_a_transport_of_its_own_carries_an_async_call_and_its_retry() -> None:
    transport = _AsyncTransport(ANSWERS, blocking=False)
    async with llmstream.AsyncClient("http://seam/v1", model="m", retry=RETRY) as client:
        client._transport = transport  # type: ignore[assignment]
        async with client.stream("Hi") as stream:
            text = "".join([t async for t in stream])
    assert text == "Hello there" and stream.result.complete and stream.result.retries == 1
    assert [r.method for r in transport.sent] == ["POST", "POST"]
    assert transport.sent[0].json == transport.sent[1].json
    assert transport.log == ["release", "release"]


def test_a_transport_of_its_own_carries_a_sync_call_and_its_retry() -> None:
    transport = _SyncTransport(ANSWERS, blocking=True)
    with llmstream.Client("http://seam/v1", model="m", retry=RETRY) as client:
        client._transport = transport  # type: ignore[assignment]
        with client.stream("Hi") as stream:
            text = "".join(stream)
    assert text == "Hello there" and stream.result.complete and stream.result.retries == 1
    assert transport.log == ["release", "release"]


@pytest.mark.parametrize("how", ["break", "cancel"])
async def test_a_stop_cuts_the_body_through_the_seam(how: str) -> None:
    long = [_event(f"w{i} ") for i in range(1000)]
    transport = _AsyncTransport([(200, long)], blocking=False)
    async with llmstream.AsyncClient("http://seam/v1", model="m", buffer=2) as client:
        client._transport = transport  # type: ignore[assignment]
        async with client.stream("Hi") as stream:
            async for _ in stream:
                if how == "cancel":
                    stream.cancel()
                    assert transport.log == ["abort"]  # at once, before anything is awaited
                break
    assert stream.result.status == "cancelled"
    assert transport.log[-1] == "release unread"  # released with its body unread: cut


class _DeafResponse(_AsyncResponse):
    """Its read, once the parts run out, waits forever: abort() does not wake it."""

    async def _next_async(self) -> bytes:
        await anyio.sleep(0)
        if not self._parts:
            await anyio.sleep_forever()
        return self._parts.pop(0)


@pytest.mark.parametrize(
    ("buffer", "scope"),
    [(64, "scope"), (0, "cut"), (0, "scope")],
    ids=["read-ahead", "pull", "pull-without-cut"],
)
async def test_a_deadline_cuts_a_read_that_an_abort_cannot_wake(
    buffer: int, scope: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The deadline must end the call however the transport's reads wait; the read-ahead
    # reader is cut by its scope, a pull read (buffer=0) by the cut the loop's timer fires
    # (an anyio scope per read where there is none: Python 3.10, other loops).
    if scope == "scope":
        monkeypatch.setattr("llmstream._async_stream.read_cut", lambda: None)
    transport = _AsyncTransport([(200, [_event("Hello")])], blocking=False)
    transport._respond = lambda request: _DeafResponse(200, [_event("Hello")], transport.log)  # type: ignore[method-assign]
    timeouts = llmstream.Timeouts(idle=0.2)
    async with llmstream.AsyncClient(
        "http://seam/v1", model="m", buffer=buffer, timeout=timeouts, retry=0
    ) as client:
        client._transport = transport  # type: ignore[assignment]
        started = anyio.current_time()
        with anyio.move_on_after(5):  # the test's own guard: a deadline that never fires
            async with client.stream("Hi") as stream:
                with pytest.raises(llmstream.IdleTimeout) as caught:
                    async for _ in stream:
                        pass
        waited = anyio.current_time() - started
    assert waited < 2, f"the idle deadline of 0.2 s ended the read after {waited:.2f} s"
    assert caught.value.partial is not None and caught.value.partial.text == "Hello"
    assert stream.result.status != "complete"
