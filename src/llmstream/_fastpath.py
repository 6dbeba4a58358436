"""The one module that reads or writes private internals of httpx, httpcore and h11.

Two things are faster or only possible below httpx's public API:

- reading a response body a network read at a time, through the connection's h11 state,
  with the plain chunked framing decoded by :mod:`llmstream._chunked` (see
  :mod:`llmstream._body`): httpx's own iteration costs more per token than everything
  llmstream does with the token;
- cutting a blocking request that still waits for its headers from another thread: the
  sync client's own connection pools hand out sockets that say which request they carry
  (see :mod:`llmstream._header_wait`).

Both are a *fast path*: the public path (httpx's iterators; a header wait that ends at
the first-token deadline) is the reference and gives the same results. One gate decides
whether the fast path is taken. It is on only when the installed httpx, httpcore and h11
are within :data:`TESTED` and the environment variable ``LLMSTREAM_FASTPATH`` is not
``0``. Every private attribute is probed through this module; one that is missing, or a
private class that cannot be imported, turns the whole path off for the process. Each
way of turning it off logs once, at DEBUG on the ``llmstream`` logger, saying why.

Nothing is imported from httpcore or h11 until the first response (or the first sync
client) asks: ``import llmstream`` stays as light as ``import httpx``.

Example::

    from llmstream import _fastpath

    if _fastpath.enabled():
        found = _fastpath.body_connection(response, blocking=True)
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NamedTuple

import anyio.abc
import httpx

if TYPE_CHECKING:
    import h11

__all__ = [
    "ENV_VAR",
    "TESTED",
    "BodyConnection",
    "body_connection",
    "disable",
    "enabled",
    "raw_receive",
    "sync_stream",
    "take_over_chunked",
    "watch_backends",
]

logger = logging.getLogger("llmstream")

ENV_VAR = "LLMSTREAM_FASTPATH"

# The versions the fast path was tested with (tests/test_fastpath.py and the whole suite,
# with the oldest and the newest of each): from the first, up to but not including the
# second. pyproject.toml declares the same ranges for httpcore and h11, and caps httpx.
# h11 0.16 is also where ChunkedReader keeps its chunk footer as bytes, which the chunked
# lane continues from (0.13-0.15 kept a count).
TESTED: dict[str, tuple[str, str]] = {
    "httpx": ("0.27.0", "0.30"),
    "httpcore": ("1.0.9", "1.1"),
    "h11": ("0.16.0", "0.17"),
}

_OFF_VALUES = frozenset({"0", "false", "no", "off"})

_lock = threading.Lock()
_off_reason: str | None = None
_decided = False


def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: "1.0.9" -> (1, 0, 9), "0.30.0rc1" -> (0, 30, 0)."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in match.group().split(".")) if match else ()


def _installed_version(distribution: str) -> str:
    # Its own function so tests can pretend another version is installed.
    return importlib.metadata.version(distribution)


def _version_problem() -> str | None:
    """Why the installed versions are not ones the fast path was tested with, or None."""
    for distribution, (low, high) in TESTED.items():
        try:
            version = _installed_version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return f"{distribution} has no installed distribution metadata"
        release = _release(version)
        if not _release(low) <= release < _release(high):
            return f"{distribution} {version} is outside the tested range >={low},<{high}"
    return None


def _first_decision() -> str | None:
    """Why the fast path is off from the start (environment, versions), or None."""
    value = os.environ.get(ENV_VAR, "")
    if value.strip().lower() in _OFF_VALUES:
        return f"{ENV_VAR}={value}"
    return _version_problem()


def _log_off(reason: str) -> None:
    logger.debug(
        "llmstream fast path off (%s): response bodies are read through httpx's public "
        "API, and the blocking client's own pool keeps no idle connection (each stream "
        "opens its own, which cancel(), close() and deadlines can cut while it waits for "
        "its headers); a connect under way is not cut: it ends at its connect timeout.",
        reason,
    )


def enabled() -> bool:
    """Whether the fast path may be taken; decided once, on first call, and logged if off.

    Example::

        reader = fast_reader(response) if enabled() else response.iter_raw()
    """
    global _decided, _off_reason
    if _decided:
        return _off_reason is None
    with _lock:
        if not _decided:
            _off_reason = _first_decision()
            _decided = True
            if _off_reason is not None:
                _log_off(_off_reason)
    return _off_reason is None


def disable(reason: str) -> None:
    """Turn the fast path off for the rest of the process (logged once, with ``reason``).

    Example::

        disable("httpcore.ConnectionPool._network_backend is missing")
    """
    global _decided, _off_reason
    with _lock:
        if _decided and _off_reason is not None:
            return  # already off, and said so
        _off_reason = reason
        _decided = True
    _log_off(reason)


def _reset() -> None:
    """Forget the decision, so the next :func:`enabled` decides (and logs) again. Tests only."""
    global _decided, _off_reason
    global _cache
    with _lock:
        _decided = False
        _off_reason = None
        _cache = None


class _Missing(Exception):
    """A private attribute the fast path reads is not there: its library changed."""


def _probe(obj: object, attribute: str) -> object:
    value = getattr(obj, attribute, _Missing)
    if value is _Missing:
        raise _Missing(f"{type(obj).__module__}.{type(obj).__qualname__}.{attribute} is missing")
    return value


class _Internals(NamedTuple):
    """The private classes the fast path recognises, imported once."""

    async_layers: tuple[tuple[type, str], ...]
    async_connection: type
    anyio_stream: type
    sync_layers: tuple[tuple[type, str], ...]
    sync_connection: type
    chunked_reader: type
    http_transport: type
    connection_pool: type
    sync_stream: Callable[[socket.socket], object]  # httpcore's blocking stream on a socket
    pool_backend: str = "_network_backend"  # where a httpcore pool keeps its backend


_cache: _Internals | None = None


def _loaded() -> _Internals | None:
    """The private classes, once imported; None when the fast path is (or just went) off."""
    global _cache
    if not enabled():
        return None
    if _cache is None:
        try:
            _cache = _import_internals()
        except ImportError as exc:
            disable(f"cannot import {exc.name or exc}: {exc}")
            return None
    return _cache


def _import_internals() -> _Internals:
    # Imported on first use: httpx (from 0.28) imports httpcore and h11 only when a
    # client is made, and `import llmstream` should not import them either.
    import httpcore
    from h11._readers import ChunkedReader
    from httpcore._async.connection_pool import PoolByteStream as AsyncPoolStream
    from httpcore._async.http11 import AsyncHTTP11Connection
    from httpcore._async.http11 import HTTP11ConnectionByteStream as AsyncH11Stream
    from httpcore._backends.anyio import AnyIOStream
    from httpcore._backends.sync import SyncStream
    from httpcore._sync.connection_pool import PoolByteStream as SyncPoolStream
    from httpcore._sync.http11 import HTTP11Connection
    from httpcore._sync.http11 import HTTP11ConnectionByteStream as SyncH11Stream
    from httpx._client import BoundAsyncStream, BoundSyncStream
    from httpx._transports.default import AsyncResponseStream, ResponseStream

    return _Internals(
        # Each layer of httpx's and httpcore's body stream, and where it keeps the next.
        async_layers=(
            (BoundAsyncStream, "_stream"),
            (AsyncResponseStream, "_httpcore_stream"),
            (AsyncPoolStream, "_stream"),
            (AsyncH11Stream, "_connection"),
        ),
        async_connection=AsyncHTTP11Connection,
        anyio_stream=AnyIOStream,
        sync_layers=(
            (BoundSyncStream, "_stream"),
            (ResponseStream, "_httpcore_stream"),
            (SyncPoolStream, "_stream"),
            (SyncH11Stream, "_connection"),
        ),
        sync_connection=HTTP11Connection,
        chunked_reader=ChunkedReader,
        http_transport=httpx.HTTPTransport,
        connection_pool=httpcore.ConnectionPool,
        sync_stream=SyncStream,
    )


# -- reading a body ----------------------------------------------------------------------


class BodyConnection(NamedTuple):
    """The h11 state and the socket of the HTTP/1.1 connection a response's body is on."""

    state: h11.Connection
    network: object  # httpcore's (Async)NetworkStream: its public read()
    lane: bool  # whether h11's chunked framing may be taken over (take_over_chunked)


def body_connection(response: httpx.Response, *, blocking: bool) -> BodyConnection | None:
    """Walk httpx's body stream down to httpcore's HTTP/1.1 connection; None if not there.

    None when the fast path is off, and whenever the response is not of the shape it reads:
    HTTP/2, a proxy tunnel's or a custom or mock transport's stream, a content-encoded
    body, a trace hook (which wants httpcore's own body events).

    Example::

        found = body_connection(response, blocking=True)
    """
    if not (
        response.http_version == "HTTP/1.1"
        and "content-encoding" not in response.headers
        and "trace" not in response.request.extensions
    ):
        return None
    if "httpcore" not in sys.modules:
        # Only httpx's own transport reads a body through httpcore, and httpx imports it
        # when it makes that transport: until then no response can be httpcore's. A client
        # on a transport of its own (the emulator's, a mock) is spared importing httpcore,
        # h11 and trio (~70 ms, most of ``llmstream chat --fake``'s first token).
        return None
    internals = _loaded()
    if internals is None:
        return None
    if blocking:
        layers, connection_type = internals.sync_layers, internals.sync_connection
    else:
        layers, connection_type = internals.async_layers, internals.async_connection
    try:
        return _walk(response.stream, layers, connection_type, internals)
    except _Missing as exc:
        disable(str(exc))
        return None


def _walk(
    stream: object,
    layers: tuple[tuple[type, str], ...],
    connection_type: type,
    internals: _Internals,
) -> BodyConnection | None:
    for layer, attribute in layers:
        if type(stream) is not layer:
            return None  # another transport's stream: not ours to read
        stream = _probe(stream, attribute)
    if type(stream) is not connection_type:
        return None
    import h11

    state = _probe(stream, "_h11_state")
    network = _probe(stream, "_network_stream")
    if not isinstance(state, h11.Connection):
        raise _Missing(f"{connection_type.__qualname__}._h11_state is not an h11.Connection")
    if state.their_state is not h11.SEND_BODY:
        return None
    return BodyConnection(state, network, _chunked_reader_known(state, internals))


def _chunked_reader_known(state: h11.Connection, internals: _Internals) -> bool:
    """Whether h11's chunked reader has the fields the lane continues from."""
    reader = _probe(state, "_reader")
    if type(reader) is not internals.chunked_reader:
        return False  # a Content-Length body, or no body reader: h11 reads it all
    for attribute, kind in (
        ("_reading_trailer", bool),
        ("_bytes_in_chunk", int),
        ("_bytes_to_discard", bytes),
    ):
        if not isinstance(_probe(reader, attribute), kind):
            raise _Missing(f"h11 ChunkedReader.{attribute} is not {kind.__name__}")
    _probe(state, "_receive_buffer")
    return True


def take_over_chunked(state: h11.Connection) -> tuple[int, bytes] | None:
    """Take the chunked framing over from h11, left between two chunks; None if it can't.

    Only from h11's own chunked reader with nothing in its buffer and no trailer being
    read (checked by :func:`body_connection` for this h11). Its state is then the chunk
    data still to come and the part of the chunk's CRLF not yet seen, which is returned
    and cleared from h11: the caller decodes those bytes itself, then hands the rest of
    the body back at a chunk header.

    Example::

        taken = take_over_chunked(state)
        lane = ChunkedDecoder(*taken) if taken else None
    """
    reader = getattr(state, "_reader", None)
    if (
        reader is None
        or getattr(reader, "_reading_trailer", True)
        or getattr(state, "_receive_buffer", True)
    ):
        return None
    left = getattr(reader, "_bytes_in_chunk", None)
    discard = getattr(reader, "_bytes_to_discard", None)
    if not isinstance(left, int) or not isinstance(discard, bytes):
        return None  # another reader: Content-Length, or h11's own end of message
    reader._bytes_in_chunk = 0
    reader._bytes_to_discard = b""
    return left, discard


def raw_receive(network: object) -> Callable[[int], Awaitable[bytes]] | None:
    """The receive of the anyio stream under httpcore's, which skips its timeout scope.

    None when ``network`` is not httpcore's anyio stream (trio's is read as it is).

    Example::

        receive = raw_receive(found.network)
    """
    internals = _loaded()
    if internals is None or type(network) is not internals.anyio_stream:
        return None
    try:
        raw = _probe(network, "_stream")
    except _Missing as exc:
        disable(str(exc))
        return None
    return raw.receive if isinstance(raw, anyio.abc.ByteReceiveStream) else None


# -- the sync client's connection pools ---------------------------------------------------


def sync_stream(sock: socket.socket) -> object | None:
    """httpcore's blocking network stream on a connected ``sock``; None when the path is off.

    What httpcore's own ``SyncBackend.connect_tcp`` returns, for a socket connected by
    :mod:`llmstream._header_wait` so that another thread can cut its connect.

    Example::

        stream = sync_stream(sock)  # its read(), write(), start_tls(), close()
    """
    internals = _loaded()
    return None if internals is None else internals.sync_stream(sock)


def watch_backends(http: httpx.Client, wrap: Callable[[object], object], wrapped: type) -> bool:
    """Replace the network backend of ``http``'s own pools by ``wrap(backend)``.

    The default transport's pool and those of the proxy transports httpx mounts for the
    environment's proxy settings. httpx has no public way to give its transports a
    network backend; httpcore's pools take one but httpx builds them. Returns False when
    the fast path is off or no pool was found; a pool whose backend is already a
    ``wrapped`` is left as it is.

    Example::

        watch_backends(http, WatchedBackend, WatchedBackend)
    """
    internals = _loaded()
    if internals is None:
        return False
    try:
        transports = [_probe(http, "_transport")]
        mounts = _probe(http, "_mounts")
        if not isinstance(mounts, dict):
            raise _Missing("httpx.Client._mounts is not a dict")
        transports += list(mounts.values())
        pools = [
            _probe(transport, "_pool")
            for transport in transports
            if type(transport) is internals.http_transport
        ]
        watched = False
        for pool in pools:
            if not isinstance(pool, internals.connection_pool):
                continue  # an HTTP/2-only or future pool: left as it is
            backend = _probe(pool, internals.pool_backend)
            if isinstance(backend, wrapped):
                continue
            if not callable(getattr(backend, "connect_tcp", None)):
                raise _Missing("httpcore pool's _network_backend has no connect_tcp()")
            setattr(pool, internals.pool_backend, wrap(backend))
            watched = True
    except _Missing as exc:
        disable(str(exc))
        return False
    return watched
