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

Only the pools llmstream makes for itself are watched this way (:func:`watch_pool`); a
``http_client`` or ``transport`` of the caller's own is left as it is. A connection still
being opened is not cut: the connect timeout bounds that wait. httpx builds its pools
itself and has no public way to give them a network backend, so :func:`watch_pool`
replaces a private attribute: that is part of the fast path (:mod:`llmstream._fastpath`),
and with the fast path off a request waiting for its headers ends at its first-token
deadline. Everything else here uses httpcore's public network stream interface.

Example::

    wait = HeaderWait()
    with waiting_for_headers(wait):
        response = http.send(request, stream=True)  # another thread may call wait.cut()
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import httpx

from . import _fastpath
from ._timer_thread import fire_after

__all__ = ["HeaderWait", "cut_after", "shut_down", "waiting_for_headers", "watch_pool"]


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

    __slots__ = ("_cut", "_lock", "_stream", "over")

    def __init__(self) -> None:
        # Reentrant: a signal handler may call cut() on the thread that is in attach().
        self._lock = threading.RLock()
        self._stream: _Stream | None = None
        self._cut = False
        self.over = False
        """Set once the wait ended (headers, or a failure): a timed cut then does nothing."""

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
            stream = self._stream
        if stream is not None:
            shut_down(stream)


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

    def connect_tcp(self, *args: Any, **kwargs: Any) -> _WatchedStream:
        return _WatchedStream(self._backend.connect_tcp(*args, **kwargs))

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> _WatchedStream:
        return _WatchedStream(self._backend.connect_unix_socket(*args, **kwargs))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


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
