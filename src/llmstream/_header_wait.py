"""Cutting a blocking request short while it waits for its response headers.

vLLM sends a response's headers as soon as it has accepted the request, but a proxy or
gateway in front of it may hold them back until the first token, and an overloaded server
may be slow to answer at all: ``httpx.Client.send()`` stays blocked in ``recv()`` for as
long as that takes. Another thread that wants the request stopped cannot reach the socket
through httpx until ``send()`` returns. So the sync client's own connection pool hands out
sockets that say which request they are carrying: a :class:`HeaderWait` set for the
calling thread by :func:`waiting_for_headers` is told of the socket as the request is
written to it, and its :meth:`~HeaderWait.cut` shuts that socket down from any thread.
The blocked ``recv()`` returns at once, and the server sees the connection close (vLLM
then aborts the request and frees its KV cache).

A new connection that the request waits for is cut the same way: its socket is opened
here, not by ``socket.create_connection()``, so that the wait can reach it while the
connect is under way (a ``shutdown()`` aborts a connect in progress). A server that
never answers the connect then costs a cancelled or closed call nothing, not its connect
timeout.

Only the pools llmstream makes for itself are watched this way (:func:`watch_pool`); a
``http_client`` or ``transport`` of the caller's own is left as it is. httpx builds its
pools itself and has no public way to give them a network backend, so :func:`watch_pool`
replaces a private attribute, and the connected socket is wrapped in httpcore's own
private stream class: that is part of the fast path (:mod:`llmstream._fastpath`). With
the fast path off, the sync client's own pool keeps no idle connection, and each request
tells its wait of the connection it opens through httpx's public ``trace`` extension
(:func:`connect_tracer`); a connect under way then ends at its connect timeout.
Everything else here uses httpcore's public network stream interface.

Example::

    wait = HeaderWait()
    with waiting_for_headers(wait):
        response = http.send(request, stream=True)  # another thread may call wait.cut()
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import selectors
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import httpx

from . import _fastpath
from ._timer_thread import fire_after

__all__ = [
    "HeaderWait",
    "connect_tracer",
    "cut_after",
    "shut_down",
    "waiting_for_headers",
    "watch_pool",
]


class _Stream(Protocol):
    """The part of httpcore's blocking NetworkStream that is wrapped here."""

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes: ...

    def write(self, buffer: bytes, timeout: float | None = None) -> None: ...

    def close(self) -> None: ...

    def start_tls(self, *args: Any, **kwargs: Any) -> Any: ...

    def get_extra_info(self, info: str) -> Any: ...


class HeaderWait:
    """The socket one blocking request was written to, so another thread can cut it.

    Example::

        wait = HeaderWait()
        wait.cut()  # before the request was written: it is cut as soon as it is
    """

    __slots__ = ("_cut", "_lock", "_socket", "_stream", "over")

    def __init__(self) -> None:
        # Reentrant: a signal handler may call cut() on the thread that is in attach().
        self._lock = threading.RLock()
        self._stream: _Stream | None = None
        self._socket: socket.socket | None = None
        self._cut = False
        self.over = False
        """Set once the wait ended (headers, or a failure): a timed cut then does nothing."""

    @property
    def was_cut(self) -> bool:
        """Whether :meth:`cut` was called."""
        return self._cut

    def connecting(self, sock: socket.socket) -> bool:
        """A connection for the request is being opened on ``sock``; False: cut already."""
        with self._lock:
            self._socket = sock
            return not self._cut

    def attach(self, stream: _Stream) -> None:
        """The request is being written to ``stream``."""
        with self._lock:
            self._stream = stream
            cut = self._cut
        if cut:
            shut_down(stream)

    def fire(self) -> None:
        """Its time is up (see :func:`cut_after`): cut it."""
        self.cut()

    def cut(self) -> None:
        """Shut the request's socket down now, or as soon as the request is written."""
        with self._lock:
            self._cut = True
            stream, sock = self._stream, self._socket
        if stream is not None:
            shut_down(stream)
        elif sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # a connect in progress fails at once


def cut_after(wait: HeaderWait, seconds: float) -> None:
    """Cut ``wait`` in ``seconds`` unless it is over by then.

    A thread blocked in a send cannot watch its own deadline, and a transport's read
    timeout restarts with every byte: a server that trickles a header, or sends
    ``100 Continue`` without end, would hold it for ever. The shared timer thread cuts it.

    Example::

        wait = HeaderWait()
        cut_after(wait, 5.0)
        try:
            ...  # send, and wait for the headers
        finally:
            wait.over = True
    """
    fire_after(wait, seconds)


_current = threading.local()


@contextlib.contextmanager
def waiting_for_headers(wait: HeaderWait) -> Iterator[None]:
    """Tell ``wait`` which socket the calling thread's request is written to, inside."""
    _current.wait = wait
    try:
        yield
    finally:
        _current.wait = None


def shut_down(stream: object) -> bool:
    """Shut a network stream's socket down: the peer sees the close, a blocked read returns.

    Closing a file descriptor does not wake a thread blocked in ``recv()`` on it;
    ``shutdown()`` does, and sends the FIN that tells the server to abort. Returns False
    when there is no socket (an in-process transport).
    """
    get_extra_info = getattr(stream, "get_extra_info", None)
    sock = get_extra_info("socket") if get_extra_info is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        return True
    if sock is None or not hasattr(sock, "fileno"):
        return False
    # The socket under an event loop's transport (asyncio's TransportSocket, uvloop's
    # PseudoSocket, a trio socket). uvloop refuses shutdown() on it, so the shutdown is
    # done on a duplicate of the descriptor: it acts on the connection, not the descriptor.
    with contextlib.suppress(OSError), socket.fromfd(sock.fileno(), sock.family, sock.type) as dup:
        dup.shutdown(socket.SHUT_RDWR)
    return True


class _WatchedStream:
    """A blocking network stream that tells the calling thread's HeaderWait of a write."""

    def __init__(self, stream: _Stream) -> None:
        self._stream = stream
        # Bound once: a read costs no more than on the stream itself.
        self.read = stream.read
        self.close = stream.close
        self.get_extra_info = stream.get_extra_info

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        wait = getattr(_current, "wait", None)
        if wait is not None:
            wait.attach(self._stream)
        self._stream.write(buffer, timeout)

    def start_tls(self, *args: Any, **kwargs: Any) -> _WatchedStream:
        return _WatchedStream(self._stream.start_tls(*args, **kwargs))


class _WatchedBackend:
    """httpcore's blocking network backend, handing out watched streams."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> _WatchedStream:
        wait = getattr(_current, "wait", None)
        if wait is not None and _is_sync_backend(self._backend):
            sock = _connect(wait, host, port, timeout, local_address, socket_options)
            stream = _fastpath.sync_stream(sock)
            if stream is not None:
                return _WatchedStream(stream)  # type: ignore[arg-type]
            sock.close()  # the fast path went off meanwhile: the public way
        return _WatchedStream(
            self._backend.connect_tcp(
                host,
                port,
                timeout=timeout,
                local_address=local_address,
                socket_options=socket_options,
            )
        )

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> _WatchedStream:
        return _WatchedStream(self._backend.connect_unix_socket(*args, **kwargs))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


# httpcore's trace events that hand over a new connection's network stream.
_CONNECTED = frozenset({"connection.connect_tcp.complete", "connection.start_tls.complete"})


def connect_tracer(wait: HeaderWait) -> Callable[[str, dict[str, Any]], None]:
    """A ``trace`` request extension that tells ``wait`` of the connection the request opens.

    httpx's public way (its ``trace`` extension, passed on to httpcore) to learn a
    request's socket without the fast path. Only a connection the request opens is
    seen, so it serves a pool that keeps no idle connection to reuse.

    Example::

        request.extensions["trace"] = connect_tracer(wait)
    """

    def trace(event: str, info: dict[str, Any]) -> None:
        if event in _CONNECTED:
            stream = info.get("return_value")
            if stream is not None:
                wait.attach(stream)

    return trace


def _is_sync_backend(backend: object) -> bool:
    import httpcore

    return type(backend) is httpcore.SyncBackend


def _connect(
    wait: HeaderWait,
    host: str,
    port: int,
    timeout: float | None,
    local_address: str | None,
    socket_options: Iterable[Any] | None,
) -> socket.socket:
    """A socket connected to ``host:port`` as httpcore's ``SyncBackend`` connects, cuttable.

    Each address in turn, ``timeout`` for each, as ``socket.create_connection()``; errors
    are httpcore's, as its backend raises them.
    """
    import httpcore

    try:
        addresses = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except OSError as exc:
        raise httpcore.ConnectError(str(exc)) from exc
    error: OSError | None = None
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            _connect_socket(wait, sock, address, timeout, local_address)
            for option in socket_options or ():
                sock.setsockopt(*option)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            sock.close()
            error = exc
            if wait.was_cut:
                break
            continue
        return sock
    if wait.was_cut:
        raise httpcore.ConnectError("the request was stopped while its connection was opened")
    if isinstance(error, TimeoutError):
        raise httpcore.ConnectTimeout(str(error)) from error
    raise httpcore.ConnectError(str(error or f"no address found for {host}")) from error


def _connect_socket(
    wait: HeaderWait,
    sock: socket.socket,
    address: Any,
    timeout: float | None,
    local_address: str | None,
) -> None:
    if local_address is not None:
        sock.bind((local_address, 0))
    sock.setblocking(False)
    try:
        sock.connect(address)
        pending = False
    except (BlockingIOError, InterruptedError):
        pending = True
    # Told only now that the connect is under way: a shutdown() before it would not stop
    # the connect that follows, one after it aborts the connect.
    if not wait.connecting(sock):
        raise ConnectionAbortedError(errno.ECONNABORTED, "stopped")
    if pending and not _writable(sock, timeout):
        raise TimeoutError("timed out")
    if wait.was_cut:
        raise ConnectionAbortedError(errno.ECONNABORTED, "stopped")
    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code:
        raise OSError(code, os.strerror(code))
    sock.settimeout(timeout)  # as create_connection() leaves it; reads set their own


def _writable(sock: socket.socket, timeout: float | None) -> bool:
    """Wait until ``sock``'s connect is done (or failed); False when ``timeout`` passed first."""
    if hasattr(select, "poll"):  # no descriptor of its own to make: cheaper than a selector
        poll = select.poll()
        poll.register(sock, select.POLLOUT)
        return bool(poll.poll(None if timeout is None else max(timeout, 0.0) * 1000))
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_WRITE)
        return bool(selector.select(timeout))


def watch_pool(http: httpx.Client) -> bool:
    """Make ``http``'s own connection pools hand out watched sockets; False if none could.

    The default transport's pool, and those of the proxy transports httpx mounts for the
    environment's proxy settings. This replaces a private attribute of httpx's pools, so
    it is part of the fast path (:mod:`llmstream._fastpath`): when that is off, nothing is
    watched (logged once), and a request waiting for its headers ends at its first-token
    deadline instead of at the cut.

    Example::

        http = httpx.Client()
        watch_pool(http)  # True: requests it sends can be cut while they wait
    """
    return _fastpath.watch_backends(http, _WatchedBackend, _WatchedBackend)
