"""A real HTTP/1.1 server on loopback that runs the emulator's actions.

Hand-written on anyio (no web framework): it parses the request line, headers and a
``Content-Length`` body, answers with one HTTP chunk per action, keeps connections alive
for a client's pool, and reads the socket while it answers so that a client closing the
connection is noticed at once, even in the middle of a wait, as vLLM notices it and
aborts the request.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from email.utils import formatdate
from types import TracebackType

import anyio
import anyio.abc
import anyio.from_thread
from anyio.abc import SocketAttribute

from ._fake import Exchange, FakeVLLM
from ._script import Cut, Hang, Head, HttpRequest, Refuse, Send, Wait, reason_phrase
from ._wire import JSON, dumps, error_body

__all__ = ["MAX_BODY_BYTES", "MAX_HEADER_BYTES", "FakeServer"]

logger = logging.getLogger("llmstream.testing")

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 8 * 1024 * 1024
_CLIENT_GONE = (
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    ConnectionError,
    OSError,
)


class _Reject(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class _Progress:
    sent: int = 0
    started: bool = False  # some of the answer is on the wire
    complete: bool = False
    cut: bool = False
    left: bool = False


@dataclass
class _Parsed:
    request: HttpRequest
    keep_alive: bool


class FakeServer:
    """The emulator served over TCP on ``127.0.0.1``, from a background thread.

    ``port`` 0 picks a free port at the first start; a stopped server starts again on
    the port it had (the listener sets ``SO_REUSEADDR``, so connections it closed do not
    hold the port).

    >>> with FakeVLLM("Hi").serve() as server:
    ...     server.base_url == f"http://127.0.0.1:{server.port}/v1"
    True
    """

    def __init__(self, fake: FakeVLLM, port: int = 0, *, host: str = "127.0.0.1") -> None:
        self.fake = fake
        self.port = port
        self.host = host
        """The loopback address it listens on (any of 127.0.0.0/8 on Linux)."""
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._scope: anyio.CancelScope | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, ``http://127.0.0.1:PORT/v1``.

        >>> FakeVLLM().serve().base_url
        'http://127.0.0.1:0/v1'
        """
        return f"http://{self.host}:{self.port}/v1"

    @property
    def serving(self) -> bool:
        """Whether the server is started (accepting connections).

        >>> FakeVLLM().serve().serving
        False
        """
        return self._thread is not None

    def start(self) -> FakeServer:
        """Bind the port and start serving; returns once it accepts connections.

        >>> server = FakeVLLM().serve().start(); server.stop()
        >>> server.start().stop()  # again, on the same port
        """
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._ready = threading.Event()
        self._error = None
        self._portal = self._scope = None
        self._thread = threading.Thread(
            target=anyio.run, args=(self._main,), name="llmstream-fake-vllm", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join(timeout=10)
            self._thread = None
            raise RuntimeError(
                f"fake vLLM server failed to start on {self.host}:{self.port}"
            ) from self._error
        return self

    def stop(self) -> None:
        """Close the listener and every connection, and join the server thread.

        Streams under way end abruptly, as when a server process dies: the client sees
        the connection close in the middle of the body.

        >>> FakeVLLM().serve().stop()
        """
        thread, portal, scope = self._thread, self._portal, self._scope
        if thread is None:
            return
        if portal is not None and scope is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the event loop already ended
                portal.call(scope.cancel)
        thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def _main(self) -> None:
        try:
            async with anyio.from_thread.BlockingPortal() as portal:
                listener = await anyio.create_tcp_listener(
                    local_host=self.host, local_port=self.port
                )
                self.port = int(listener.extra(SocketAttribute.local_port))
                with anyio.CancelScope() as scope:
                    self._portal, self._scope = portal, scope
                    self._ready.set()
                    async with listener:
                        await listener.serve(self._connection)
        except BaseException as exc:  # surfaced to start(); a started server stops quietly
            if not self._ready.is_set():
                self._error = exc
            raise
        finally:
            self._ready.set()

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        buffer = bytearray()
        try:
            while True:
                try:
                    parsed = await _read_request(stream, buffer)
                except _Reject as reject:
                    await _write_simple(stream, reject.status, reject.detail)
                    return
                if parsed is None:
                    return
                try:
                    exchange = self.fake.exchange(parsed.request)
                except Exception as exc:
                    await _fail(stream, exc)
                    return
                progress = await self._answer(stream, buffer, exchange, parsed.keep_alive)
                if not (progress.complete and parsed.keep_alive):
                    return
        except _CLIENT_GONE:
            return
        except Exception as exc:
            # A last resort: out of here, it would end the listener's task group, and
            # with it every connection and the server.
            _log_failure(exc)
        finally:
            await anyio.aclose_forcefully(stream)

    async def _answer(
        self,
        stream: anyio.abc.SocketStream,
        buffer: bytearray,
        exchange: Exchange,
        keep_alive: bool,
    ) -> _Progress:
        progress = _Progress()

        def client_left() -> None:
            if not (progress.left or progress.complete or progress.cut):
                progress.left = True
                exchange.client_left(progress.sent)

        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                # The client sends nothing while it waits for a response, so any read
                # result is either the next pipelined request or the connection ending.
                try:
                    while True:
                        data = await stream.receive()
                        buffer.extend(data)
                        if len(buffer) > MAX_HEADER_BYTES + MAX_BODY_BYTES:
                            break
                except _CLIENT_GONE:
                    pass
                client_left()
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            failure: Exception | None = None
            try:
                await _perform(stream, exchange, progress, keep_alive)
            except _CLIENT_GONE:
                client_left()
            except Exception as exc:  # caught here: out of the task group, it ends the server
                failure = exc
            finally:
                # Also when the server stops mid-answer: the request leaves the load.
                exchange.end()
            tg.cancel_scope.cancel()
        if failure is not None:
            if progress.started:
                _log_failure(failure)  # uvicorn then just closes the connection
            else:
                await _fail(stream, failure)
        return progress


async def _perform(
    stream: anyio.abc.SocketStream, exchange: Exchange, progress: _Progress, keep_alive: bool
) -> None:
    chunked = False
    for action in exchange.actions:
        if isinstance(action, Head):
            chunked = action.chunked
            lines = [f"HTTP/1.1 {action.status} {reason_phrase(action.status)}"]
            lines.append(f"date: {formatdate(time.time(), usegmt=True)}")
            lines += [f"{name}: {value}" for name, value in action.headers]
            if not keep_alive:
                lines.append("connection: close")
            progress.started = True
            await stream.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        elif isinstance(action, Send):
            progress.started = progress.started or bool(action.data)
            if chunked and action.data:
                await stream.send(b"%x\r\n%b\r\n" % (len(action.data), action.data))
            elif action.data:
                await stream.send(action.data)
            if action.event:
                progress.sent += 1
        elif isinstance(action, Wait):
            await anyio.sleep(action.seconds)
        elif isinstance(action, Hang):
            await anyio.sleep_forever()
        elif isinstance(action, Cut | Refuse):
            progress.cut = True
            return
    if chunked:
        await stream.send(b"0\r\n\r\n")
    progress.complete = True


async def _read_request(stream: anyio.abc.SocketStream, buffer: bytearray) -> _Parsed | None:
    """The next request on the connection, or None when the client closed it."""
    while True:
        while buffer[:2] == b"\r\n":  # tolerated before a request line (RFC 9112 2.2)
            del buffer[:2]
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(buffer) > MAX_HEADER_BYTES:
            raise _Reject(431, "Request Header Fields Too Large")
        try:
            buffer.extend(await stream.receive())
        except _CLIENT_GONE:
            return None
    if end > MAX_HEADER_BYTES:
        raise _Reject(431, "Request Header Fields Too Large")
    head = bytes(buffer[:end]).decode("latin-1")
    del buffer[: end + 4]
    request_line, *header_lines = head.split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _Reject(400, "Bad Request")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _Reject(400, "Bad Request")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    if "transfer-encoding" in headers:
        raise _Reject(501, "Chunked request bodies are not supported")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise _Reject(400, "Bad Request") from None
    if length < 0:
        raise _Reject(400, "Bad Request")
    if length > MAX_BODY_BYTES:
        raise _Reject(413, "Content Too Large")
    while len(buffer) < length:
        try:
            buffer.extend(await stream.receive())
        except _CLIENT_GONE:
            return None
    body = bytes(buffer[:length])
    del buffer[:length]
    connection = headers.get("connection", "").lower()
    keep_alive = version == "HTTP/1.1" and "close" not in connection
    path = target.split("?", 1)[0]
    return _Parsed(HttpRequest(method, path, headers, body), keep_alive)


async def _fail(stream: anyio.abc.SocketStream, exc: Exception) -> None:
    """Answer 500 to a request whose handling raised, as vLLM does, and log it.

    vLLM's catch-all handler (``server_utils.exception_handler``) answers an unexpected
    exception with an ``InternalServerError`` body; uvicorn logs the traceback and closes
    the connection. Other connections are served on: one request must not end the server.
    """
    _log_failure(exc)
    body = error_body(str(exc) or type(exc).__name__, "InternalServerError", 500)
    await _write_simple(stream, 500, body)


def _log_failure(exc: Exception) -> None:
    logger.error("Exception in the fake vLLM server", exc_info=exc)


async def _write_simple(stream: anyio.abc.SocketStream, status: int, detail: str | JSON) -> None:
    body = dumps({"detail": detail} if isinstance(detail, str) else detail)
    head = (
        f"HTTP/1.1 {status} {reason_phrase(status)}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    with contextlib.suppress(*_CLIENT_GONE):
        await stream.send(head.encode("latin-1") + body)
