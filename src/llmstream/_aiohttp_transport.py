"""The transport seam on aiohttp, for ``AsyncClient`` on asyncio (and uvloop).

aiohttp is imported when an :class:`AiohttpTransport` is made, never by ``import
llmstream``; it is the ``aiohttp`` extra. Its session belongs to one event loop, so it
is made on the first request, in the loop that sends it (and made anew in a later loop,
after a second ``asyncio.run()``).

What it keeps the same as the httpx transport:

- every aiohttp failure becomes the llmstream error the same failure gets on httpx
  (:func:`~llmstream._http_errors.send_failure_error` for a request that got no
  response; :meth:`read_failure` for a body read), and the environment's proxies are
  read by the same rules (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``);
- :meth:`_AiohttpResponse.abort` shuts the socket down before returning, so the server
  sees the close at once (vLLM aborts the generation and frees its KV cache), and the
  connection is closed, not pooled; a body read to its end gives the connection back to
  the pool;
- a body is read a network read at a time, up to ``READ_SIZE`` bytes a read.

Example::

    async with llmstream.AsyncClient(transport=llmstream.AiohttpTransport()) as client:
        ...
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import anyio
import httpx

from ._body import READ_SIZE
from ._call import ReadFailure
from ._config import EnvProxy, env_proxy, http_proxy_settings
from ._errors import InvalidRequestError
from ._header_wait import shut_down
from ._http_errors import SendFailure, send_failure_error
from ._httpx_transport import closed_error
from ._read_cut import cut_after
from ._transport import (
    CountedResponse,
    HeaderTimeout,
    HTTPRequest,
    InFlight,
    PooledTransport,
    asyncio_loop,
    json_body,
    proxy_port,
    request_headers,
)

if TYPE_CHECKING:
    import aiohttp

__all__ = ["AiohttpTransport"]

# httpx's keep-alive expiry: below uvicorn's (vLLM's server) 5 s keep-alive, so a pooled
# connection is not reused just as the server closes it.
_KEEPALIVE_SECONDS = 4.0


def _import_aiohttp() -> None:
    try:
        import aiohttp  # noqa: F401
    except ImportError as exc:
        raise InvalidRequestError(
            'The aiohttp transport needs aiohttp: pip install "llmstream-sdk[aiohttp]". '
            "Or use the default httpx transport (unset LLMSTREAM_HTTP_BACKEND, or drop "
            "transport=AiohttpTransport())."
        ) from exc


def _failure_kind(exc: aiohttp.ClientError) -> SendFailure:
    """What a failed request was, in the words shared with the httpx transport."""
    import aiohttp

    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connect_timeout"  # a connection not made, or none free, in time
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return "proxy"  # the proxy answered CONNECT with an error
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"  # refused, DNS, TLS, an unreachable proxy
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return "bad_url"
    return "other"  # the server hung up, or answered something that is not HTTP


def _read_failure(exc: Exception) -> ReadFailure | None:
    import aiohttp

    if isinstance(exc, aiohttp.ServerTimeoutError):
        return ReadFailure("timeout", f"{type(exc).__name__}: {exc}")
    if isinstance(exc, aiohttp.ClientPayloadError) and isinstance(
        exc.__cause__, aiohttp.http_exceptions.ContentEncodingError
    ):
        return ReadFailure("decode", str(exc))  # a compressed body that would not decompress
    if isinstance(exc, aiohttp.ClientError):
        return ReadFailure("broken", f"{type(exc).__name__}: {exc}")
    return None


class _Body:
    """A response's body by network read: what the socket brought, up to ``READ_SIZE``."""

    __slots__ = ("_read", "ended")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._read = response.content.read
        self.ended = False

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        data = await self._read(READ_SIZE)
        if data:
            return data
        self.ended = True  # aiohttp gives the connection back to its pool at this end
        raise StopAsyncIteration


class _AiohttpResponse(CountedResponse):
    """A response whose headers arrived, on aiohttp."""

    __slots__ = ("_ended", "_headers", "_reader", "_response")

    def __init__(self, response: aiohttp.ClientResponse, in_flight: InFlight | None) -> None:
        super().__init__(in_flight)
        self._response = response
        # httpx's Headers, as the httpx transport gives them: lowercase names when listed
        # (what an error's `headers` holds), case-insensitive lookup.
        self._headers = httpx.Headers(list(response.raw_headers))
        self._reader: _Body | None = None
        self._ended = False

    @property
    def status_code(self) -> int:
        return self._response.status

    @property
    def reason_phrase(self) -> str:
        return self._response.reason or ""

    @property
    def headers(self) -> Mapping[str, str]:
        return self._headers

    @property
    def body_done(self) -> bool:
        return self._ended or (self._reader is not None and self._reader.ended)

    async def read(self, limit: int) -> bytes:
        import aiohttp

        body = bytearray()
        read = self._response.content.read
        try:
            while len(body) < limit:
                part = await read(limit - len(body))
                if not part:
                    self._ended = True  # read whole: the connection can be reused
                    break
                body += part
        except aiohttp.ClientError:
            pass  # the status is the error; a body cut short still tells what it can
        return bytes(body)

    def stream(self, body_timeout: float | None) -> AsyncIterator[bytes]:
        # body_timeout is not armed: the shell watches the call's deadlines beside every
        # read and cancels the one a deadline ends (as the httpx fast path's watched
        # reads do), and aiohttp's own read timeout would re-arm a timer on every read.
        reader = self._reader = _Body(self._response)
        return reader

    def read_failure(self, exc: Exception) -> ReadFailure | None:
        return _read_failure(exc)

    def body_ended(self) -> None:
        self._ended = True

    def abort(self) -> None:
        if self.body_done:
            return
        self._cut()
        # A stream dropped unclosed is aborted and never closed: closing the response gave
        # its pool slot back; its place in the in-flight count goes now (once: a later
        # aclose() does nothing), or every request would soon be sent Connection: close.
        self._release()

    def _cut(self) -> None:
        connection = self._response.connection
        if connection is not None:
            # asyncio closes a transport's socket on the loop's next turn; shutdown() sends
            # the FIN now, even if the loop is held up, and ends a read in progress.
            shut_down(connection.transport)
        # Closed, not pooled; a read in progress fails with "Connection closed".
        self._response.close()

    async def aclose(self) -> None:
        if not self._release():
            return
        if self.body_done:
            self._response.release()  # back to the pool (aiohttp did it at the body's end)
        else:
            self._cut()  # an unread body: the server must see the close now


class AiohttpTransport(PooledTransport):
    """Sends an :class:`~llmstream.AsyncClient`'s requests with aiohttp (asyncio only).

    Pass it as ``transport=``; the client closes it with itself. One aiohttp session
    per event loop, with a pool of up to ``max_connections`` connections (llmstream's
    default, 1,000, as for httpx). ``trust_env`` takes proxies from the environment as
    the httpx transport does; ``verify`` is ``True`` (the system's CA certificates),
    ``False``, or an :class:`ssl.SSLContext`. Needs ``pip install
    "llmstream-sdk[aiohttp]"``; under trio, a request raises
    :class:`~llmstream.InvalidRequestError` (aiohttp runs only on asyncio).

    ``LLMSTREAM_HTTP_BACKEND=aiohttp`` in the environment makes an ``AsyncClient``
    without ``http_client`` or ``transport`` use one with the defaults.

    Example::

        async with llmstream.AsyncClient(transport=llmstream.AiohttpTransport()) as client:
            async with client.stream("Hi") as stream:
                async for text in stream:
                    print(text, end="")
    """

    def _set_up(self) -> None:
        _import_aiohttp()
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # The environment's proxy for each URL, read once (as httpx reads it when a
        # client is made): a client sends to a handful of URLs.
        self._proxies: dict[str, EnvProxy | None] = {}

    def _session_for(self, loop: asyncio.AbstractEventLoop) -> aiohttp.ClientSession:
        session = self._session
        if session is not None and self._loop is not loop:
            if self._loop is not None and self._loop.is_running():
                raise InvalidRequestError(
                    "This client is in use in another event loop (another thread's); a "
                    "client belongs to one event loop: make one in each."
                )
            # The loop its connections belong to has ended (a second asyncio.run()): they
            # cannot be closed without it, and asyncio closes their sockets when they are
            # collected. A new session serves this loop.
            session.detach()
            session = None
        if session is None:
            session = self._session = self._new_session()
            self._loop = loop
        return session

    def _new_session(self) -> aiohttp.ClientSession:
        import aiohttp

        connector = aiohttp.TCPConnector(
            limit=self.max_connections,
            limit_per_host=0,
            keepalive_timeout=_KEEPALIVE_SECONDS,
            ssl=self._verify,
        )
        # The environment's proxies are applied per request (_proxy), by httpx's rules:
        # aiohttp's own reading of them ignores ALL_PROXY.
        return aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None), trust_env=False
        )

    def _proxy(self, url: str) -> EnvProxy | None:
        if not self.trust_env:
            return None
        try:
            return self._proxies[url]
        except KeyError:
            found = self._proxies[url] = env_proxy(url)
            return found

    async def send(self, request: HTTPRequest) -> _AiohttpResponse:
        """Send ``request``; returns once the response headers arrived."""
        import aiohttp

        if self._closed:
            raise closed_error("async with")
        session = self._session_for(asyncio_loop("AiohttpTransport", "aiohttp is built on it"))
        proxy = self._proxy(request.url)
        proxy_url, proxy_headers = http_proxy_settings(proxy, "aiohttp") if proxy else (None, {})
        if proxy is not None and proxy_url is not None:
            proxy_port(proxy, urlsplit(proxy_url))  # refused by name, not as the base URL
        headers = request_headers(request, self._in_flight)
        if proxy_headers and request.url.startswith("http://"):
            # Plain HTTP goes to the proxy as is; aiohttp sends proxy_headers only in the
            # CONNECT of a tunnel, which keeps them from an https:// server.
            headers.update(proxy_headers)
        data = None
        if request.json is not None:
            data = json_body(request.json)
            headers["Content-Type"] = "application/json"
        connect = request.connect_timeout
        # A stream's header wait is bounded below; aiohttp's read timeout would then go on
        # bounding each body read, which the shell's deadlines do instead.
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=connect,
            sock_connect=connect,
            sock_read=None if request.stream else request.read_timeout,
        )
        counted = self._in_flight if request.stream else None
        if counted is not None:
            counted.add(1)
        try:
            with cut_after(request.read_timeout if request.stream else None) as header_wait:
                response = await session.request(
                    request.method,
                    request.url,
                    data=data,
                    headers=headers,
                    timeout=timeout,
                    # A redirect to another host would carry the API key.
                    allow_redirects=False,
                    proxy=proxy_url,
                    proxy_headers=proxy_headers or None,
                )
        except BaseException as exc:
            if counted is not None:
                counted.add(-1)
            if isinstance(exc, aiohttp.ClientError):
                kind = _failure_kind(exc)
                raise send_failure_error(kind, exc, request.url, connect, proxy=proxy) from exc
            if type(exc) is UnicodeError:
                # The resolver IDNA-encodes the host name first: an empty label (a..b) or
                # one over 63 characters fails there. A name that cannot be resolved, as
                # httpx reports it.
                invalid = socket.gaierror(
                    socket.EAI_NONAME, f"the host name is not a valid one ({exc})"
                )
                error = send_failure_error("connect", invalid, request.url, connect, proxy=proxy)
                raise error from None
            if isinstance(exc, RuntimeError) and session.closed:
                raise closed_error("async with") from exc
            raise
        if header_wait.cancelled_caught:  # no headers in time: a deadline of the call
            if counted is not None:
                counted.add(-1)
            raise HeaderTimeout(f"no response headers within {request.read_timeout:g} s")
        return _AiohttpResponse(response, counted)

    async def aclose(self) -> None:
        """Close the connection pool.

        Example::

            await transport.aclose()
        """
        self._closed = True
        session, self._session = self._session, None
        if session is None:
            return
        loop = self._loop
        if loop is not None and not loop.is_running():
            session.detach()  # its loop has ended (see _session_for)
            return
        with anyio.CancelScope(shield=True):
            await session.close()
