"""The asyncio transport: how it is chosen, and what only it can get wrong.

The behaviour suite runs on it as well (the ``async-asyncio`` mode of ``drivers.collect``
and the ``asyncio`` value of the ``async_http_backend`` fixture); this module covers the
choice (argument, environment, the sync client, trio) and the transport's own parts: its
pool (reuse, a connection the server closed, the limit), the header wait, headers it
cannot send, proxies, and reading bounded by what the stream has taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import llmstream
from llmstream import _asyncio_transport as asyncio_transport
from llmstream._asyncio_transport import _HIGH_WATER
from llmstream._config import DEFAULT_LIMITS
from llmstream._httpx_transport import HttpxAsyncTransport
from llmstream._transport import HeaderTimeout, HTTPRequest
from llmstream.testing import FakeVLLM

from .conftest import WithheldHeaders

asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])
# The transports with a pool of their own: this one, and aiohttp's.
POOLED = [llmstream.AsyncioTransport, llmstream.AiohttpTransport]

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _answer(text: str) -> bytes:
    """A whole chat stream with one content event, then [DONE], chunked."""
    event = (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{"content":"' + text.encode() + b'"},'
        b'"finish_reason":"stop"}]}\n\n'
    )
    return SSE_HEAD + _chunk(event) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


def _read_request(conn: socket.socket) -> bytes:
    """One request's head and body (by Content-Length); b"" if the client hung up."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = conn.recv(65536)
        if not part:
            return b""
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += conn.recv(65536)
    return head


class ScriptedServer:
    """A loopback server: ``serve(conn, n)`` handles connection ``n`` (from 0) on a thread.

    ``accepted`` counts connections; ``heads`` keeps every request head read.
    """

    def __init__(self, serve: Callable[[ScriptedServer, socket.socket, int], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.accepted = 0
        self.heads: list[bytes] = []
        self._serve = serve
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1"

    def read(self, conn: socket.socket) -> bytes:
        head = _read_request(conn)
        if head:
            self.heads.append(head)
        return head

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            n = self.accepted
            self.accepted += 1
            threading.Thread(target=self._run, args=(conn, n), daemon=True).start()

    def _run(self, conn: socket.socket, n: int) -> None:
        with conn, contextlib.suppress(OSError):
            self._serve(self, conn, n)

    def close(self) -> None:
        _stop_listening(self.listener)


def _stop_listening(listener: socket.socket) -> None:
    with contextlib.suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
    listener.close()


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedServer]]:
    made: list[ScriptedServer] = []

    def make(serve: Callable[[ScriptedServer, socket.socket, int], None]) -> ScriptedServer:
        server = ScriptedServer(serve)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def _keep_answering(server: ScriptedServer, conn: socket.socket, n: int) -> None:
    while server.read(conn):
        conn.sendall(_answer(f"answer {len(server.heads)}"))


async def _text(client: llmstream.AsyncClient) -> str:
    async with client.stream("Hi") as stream:
        return "".join([t async for t in stream])


async def _error(url: str, expected: type[llmstream.LLMStreamError]) -> str:
    """The message of the error a stream from ``url`` fails with (no retries)."""
    async with llmstream.AsyncClient(
        url, model="m", transport=llmstream.AsyncioTransport(), retry=0
    ) as client:
        with pytest.raises(expected) as info:
            await _text(client)
    return str(info.value)


# -- choosing it ------------------------------------------------------------------------


def test_the_argument_and_the_environment_choose_it(monkeypatch: pytest.MonkeyPatch) -> None:
    transport = llmstream.AsyncioTransport()
    assert llmstream.AsyncClient(transport=transport)._transport is transport
    monkeypatch.setenv("LLMSTREAM_HTTP_BACKEND", " Asyncio ")
    assert isinstance(llmstream.AsyncClient()._transport, llmstream.AsyncioTransport)
    # An argument wins over the environment.
    client = llmstream.AsyncClient(http_client=httpx.AsyncClient())
    assert isinstance(client._transport, HttpxAsyncTransport)


def test_an_unknown_backend_names_the_three(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSTREAM_HTTP_BACKEND", "asyncoi")
    with pytest.raises(llmstream.InvalidRequestError, match="httpx, aiohttp or asyncio"):
        llmstream.AsyncClient()


def test_the_sync_client_refuses_it_and_an_http_client_beside_it_is_refused() -> None:
    with pytest.raises(llmstream.InvalidRequestError, match="AsyncClient only"):
        llmstream.Client(transport=llmstream.AsyncioTransport())  # type: ignore[arg-type]
    with pytest.raises(llmstream.InvalidRequestError, match="not both"):
        llmstream.AsyncClient(
            http_client=httpx.AsyncClient(), transport=llmstream.AsyncioTransport()
        )


@pytest.mark.parametrize("make", POOLED)
def test_the_pool_allows_as_many_connections_as_the_httpx_one(
    make: type[llmstream.AsyncioTransport | llmstream.AiohttpTransport],
) -> None:
    assert make().max_connections == DEFAULT_LIMITS.max_connections
    with pytest.raises(llmstream.InvalidRequestError, match="max_connections"):
        make(max_connections=0)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.parametrize("make", POOLED)
async def test_under_trio_a_request_says_the_transport_needs_asyncio(
    make: type[llmstream.AsyncioTransport | llmstream.AiohttpTransport],
) -> None:
    fake = FakeVLLM("Hi")
    with fake.serve() as server:
        async with llmstream.AsyncClient(server.base_url, transport=make()) as client:
            with pytest.raises(llmstream.InvalidRequestError) as info:
                await _text(client)
            with pytest.raises(llmstream.InvalidRequestError):
                await client.models()
    message = str(info.value)
    assert "runs only on asyncio" in message and "under trio" in message
    assert "httpx transport" in message
    assert fake.requests == []  # refused before anything was sent, and not retried


# -- the pool ---------------------------------------------------------------------------


@pytest.mark.anyio
@asyncio_only
async def test_a_finished_stream_gives_its_connection_back_and_the_next_one_reuses_it(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted(_keep_answering)
    async with llmstream.AsyncClient(
        server.base_url, model="m", transport=llmstream.AsyncioTransport()
    ) as client:
        assert [await _text(client) for _ in range(3)] == ["answer 1", "answer 2", "answer 3"]
    assert server.accepted == 1
    assert b"Connection: close" not in b"".join(server.heads)


def _idle(transport: llmstream.AsyncioTransport | llmstream.AiohttpTransport) -> int:
    if isinstance(transport, llmstream.AsyncioTransport):
        return sum(map(len, transport._idle.values()))
    session: Any = transport._session
    return sum(len(idle) for idle in session.connector._conns.values())


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("make", POOLED)
async def test_a_cut_connection_is_closed_and_a_finished_one_is_reused(
    make: type[llmstream.AsyncioTransport | llmstream.AiohttpTransport],
) -> None:
    fake = FakeVLLM("one two three", token_delay=0.01)
    transport = make()
    with fake.serve() as server:
        async with llmstream.AsyncClient(server.base_url, transport=transport) as client:
            async with client.stream("Hi") as stream:
                async for _ in stream:
                    break
            assert _idle(transport) == 0  # cut: not pooled
            await fake.await_disconnect()  # the server saw the close
            for _ in range(2):
                assert await _text(client) == "one two three"
                assert _idle(transport) == 1  # read whole: back in the pool, and reused
            assert transport.requests_in_flight == 0
    assert len(fake.disconnects) == 1


@pytest.mark.anyio
@asyncio_only
async def test_a_pooled_connection_the_server_closed_is_not_reused(
    scripted: Callable[..., ScriptedServer],
) -> None:
    hung_up = threading.Event()

    def answer_then_hang_up(server: ScriptedServer, conn: socket.socket, n: int) -> None:
        server.read(conn)
        conn.sendall(_answer(f"connection {n}"))
        conn.shutdown(socket.SHUT_RDWR)  # an idle connection closed, as uvicorn after 5 s
        hung_up.set()

    server = scripted(answer_then_hang_up)
    transport = llmstream.AsyncioTransport()
    async with llmstream.AsyncClient(
        server.base_url, model="m", transport=transport, retry=0
    ) as client:
        assert await _text(client) == "connection 0"
        assert await anyio.to_thread.run_sync(hung_up.wait, 5)
        (pooled,) = [c for idle in transport._idle.values() for c in idle] or [None]
        while pooled is not None and pooled.idle_usable:
            await anyio.sleep(0.005)  # until the loop reads the close: a condition, not a delay
        # retry=0: a request sent on the closed connection would fail.
        assert await _text(client) == "connection 1"
    assert server.accepted == 2


class _Clock:
    """Stands for the ``time`` module in the transport: a monotonic clock moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.mark.anyio
@asyncio_only
async def test_idle_connections_expire_after_4_s_and_the_oldest_are_closed_first(
    scripted: Callable[..., ScriptedServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[int] = []
    both_asked = threading.Barrier(2, timeout=5)

    def answer_until_closed(server: ScriptedServer, conn: socket.socket, n: int) -> None:
        first = True
        while server.read(conn):
            if first and n < 2:
                both_asked.wait()  # the first two requests are in flight at once
            first = False
            conn.sendall(_answer(f"connection {n}"))
        closed.append(n)

    clock = _Clock()
    monkeypatch.setattr(asyncio_transport, "time", clock)
    server = scripted(answer_until_closed)
    transport = llmstream.AsyncioTransport()
    async with llmstream.AsyncClient(server.base_url, model="m", transport=transport) as client:
        await asyncio.gather(_text(client), _text(client))  # two connections, both pooled
        (older, newer) = transport._idle[next(iter(transport._idle))]
        clock.now += 3.0
        await _text(client)  # takes the newer one (the last given back) and returns it
        clock.now += 2.0  # the older one is now 5 s idle, the newer one 2 s
        assert await _text(client) in ("connection 0", "connection 1")
        # Given back, the newer connection swept the expired one out, without waiting
        # for the pool to reach it.
        assert list(transport._idle[older.key]) == [newer]
        assert older.closed and not newer.closed
        clock.now += 4.0  # and a connection idle for 4 s is not used again
        assert await _text(client) == "connection 2"
    with anyio.fail_after(5):
        while len(closed) < 3:  # the server sees each close: a condition, not a delay
            await anyio.sleep(0.005)
    assert server.accepted == 3


# -- host names --------------------------------------------------------------------------


AddrInfo = tuple[int, int, int, str, tuple[str, int]]


@pytest.mark.anyio
@asyncio_only
async def test_a_host_name_is_looked_up_once_for_a_burst_and_again_after_10_s(
    scripted: Callable[..., ScriptedServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = scripted(_keep_answering)
    port = server.listener.getsockname()[1]
    lookups: list[str] = []

    async def getaddrinfo(host: str, port: int, **options: object) -> list[AddrInfo]:
        lookups.append(host)
        await asyncio.sleep(0)  # a lookup takes a while: the other requests wait for it
        # The first address refuses (nothing listens there): the next one is tried.
        inet, tcp = socket.AF_INET, socket.SOCK_STREAM
        return [(inet, tcp, 6, "", ("127.0.0.2", port)), (inet, tcp, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    clock = _Clock()
    monkeypatch.setattr(asyncio_transport, "time", clock)
    url = f"http://vllm.test:{port}/v1"
    async with llmstream.AsyncClient(
        url, model="m", transport=llmstream.AsyncioTransport()
    ) as client:
        await asyncio.gather(*(_text(client) for _ in range(5)))
        assert lookups == ["vllm.test"]  # one lookup for five new connections
        assert server.accepted == 5
        clock.now += 11.0  # the addresses (and the idle connections) have expired
        await _text(client)
        assert lookups == ["vllm.test", "vllm.test"]
    assert server.accepted == 6
    assert all(f"Host: vllm.test:{port}".encode() in head for head in server.heads)


@pytest.mark.anyio
@asyncio_only
async def test_a_name_that_does_not_resolve_is_a_connection_error_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def getaddrinfo(host: str, port: int, **options: object) -> list[AddrInfo]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    message = await _error("http://vllm.test:8000/v1", llmstream.APIConnectionError)
    assert "http://vllm.test:8000/v1" in message
    assert "Name or service not known" in message


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("make", POOLED)
async def test_a_full_pool_makes_the_next_request_wait_then_time_out(
    make: type[llmstream.AsyncioTransport | llmstream.AiohttpTransport],
) -> None:
    fake = FakeVLLM("one two three", token_delay=5.0)
    timeouts = llmstream.Timeouts(connect=0.3)
    transport = make(max_connections=1)
    with fake.serve() as server:
        async with llmstream.AsyncClient(
            server.base_url, transport=transport, timeout=timeouts, retry=0
        ) as client:
            async with client.stream("Hi") as first:
                assert await first.__aiter__().__anext__() == "one"
                # The one connection is taken: the next request waits for it, in vain.
                with pytest.raises(llmstream.ConnectTimeout, match=r"connect=0\.3 s"):
                    async with client.stream("Hi"):
                        pass
    assert [r.path for r in fake.requests].count("/v1/chat/completions") == 1


@pytest.mark.anyio
@asyncio_only
async def test_a_full_pool_hands_a_released_connection_to_the_request_waiting(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted(_keep_answering)
    async with llmstream.AsyncClient(
        server.base_url, model="m", transport=llmstream.AsyncioTransport(max_connections=1)
    ) as client:
        texts = await asyncio.gather(*(_text(client) for _ in range(4)))
    assert sorted(texts) == [f"answer {i}" for i in range(1, 5)]
    assert server.accepted == 1  # one at a time, on the one connection


# -- the header wait and what cannot be sent ---------------------------------------------


def _request(url: str, *, stream: bool, headers: dict[str, str] | None = None) -> HTTPRequest:
    return HTTPRequest(
        "POST", f"{url}/chat/completions", headers or {}, {"x": 1}, 5.0, 0.2, stream=stream
    )


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize(
    ("make", "says"),
    [
        (llmstream.AsyncioTransport, "TimeoutError"),
        (llmstream.AiohttpTransport, "SocketTimeoutError"),
    ],
)
async def test_headers_not_in_time_end_a_stream_request_with_header_timeout(
    make: type[llmstream.AsyncioTransport | llmstream.AiohttpTransport],
    says: str,
    withheld_headers: WithheldHeaders,
) -> None:
    transport = make()
    try:
        with pytest.raises(HeaderTimeout):
            await transport.send(_request(withheld_headers.base_url, stream=True))
        assert await anyio.to_thread.run_sync(withheld_headers.hung_up.wait, 5)
        assert transport.requests_in_flight == 0
        # Not a stream (GET /models...): an APITimeoutError.
        with pytest.raises(llmstream.APITimeoutError, match=says):
            await transport.send(_request(withheld_headers.base_url, stream=False))
    finally:
        await transport.aclose()


@pytest.mark.anyio
@asyncio_only
async def test_a_header_it_cannot_send_is_refused_without_showing_its_value() -> None:
    transport = llmstream.AsyncioTransport()
    url = "http://127.0.0.1:9/v1"  # never reached
    with pytest.raises(llmstream.InvalidRequestError, match="line break"):
        await transport.send(_request(url, stream=True, headers={"X-A": "1\r\nX-B: 2"}))
    key = "sk-caf\u00e9\u2019s-secret"
    with pytest.raises(llmstream.InvalidRequestError) as info:
        await transport.send(_request(url, stream=True, headers={"Authorization": key}))
    assert "not ASCII" in str(info.value) and "secret" not in str(info.value)
    # Raised where the request is made, outside any handler: no context to hold the head.
    assert info.value.__context__ is None and info.value.__cause__ is None
    assert transport.requests_in_flight == 0


# -- TLS, and HTTPS through a proxy's tunnel ---------------------------------------------

CERT = Path(__file__).parent / "data" / "loopback-tls.pem"  # for 127.0.0.1, self-signed
KEY = CERT.with_suffix(".key")


def _trusting() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(CERT))


@pytest.fixture
def tls_server() -> Iterator[ScriptedServer]:
    """A chat server on TLS (the loopback certificate) that answers every request."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(CERT, KEY)

    def serve(server: ScriptedServer, conn: socket.socket, n: int) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            _keep_answering(server, tls, n)  # type: ignore[arg-type]

    server = ScriptedServer(serve)
    yield server
    server.close()


class TunnelProxy:
    """An HTTP proxy that answers CONNECT (or refuses it with ``refuse``) and relays bytes."""

    def __init__(self, refuse: bytes | None = None) -> None:
        self.refuse = refuse
        self.heads: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def close(self) -> None:
        _stop_listening(self.listener)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(conn,), daemon=True).start()

    def _tunnel(self, conn: socket.socket) -> None:
        with conn:
            head = _read_request(conn)
            self.heads.append(head)
            if self.refuse is not None:
                conn.sendall(self.refuse)
                return
            host, _, port = head.split(b" ")[1].decode().rpartition(":")
            with socket.create_connection((host, int(port))) as upstream:
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                pipe = threading.Thread(target=_pipe, args=(upstream, conn), daemon=True)
                pipe.start()
                _pipe(conn, upstream)
                pipe.join(5)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)


@pytest.fixture
def tunnel_proxy() -> Iterator[Callable[..., TunnelProxy]]:
    made: list[TunnelProxy] = []

    def make(refuse: bytes | None = None) -> TunnelProxy:
        made.append(TunnelProxy(refuse))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


@pytest.fixture
def clean_proxies(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


@pytest.mark.anyio
@asyncio_only
async def test_https_verifies_the_server_against_the_certificates_it_is_given(
    tls_server: ScriptedServer, clean_proxies: pytest.MonkeyPatch
) -> None:
    url = tls_server.base_url.replace("http://", "https://")
    transport = llmstream.AsyncioTransport(verify=_trusting())
    async with llmstream.AsyncClient(url, model="m", transport=transport) as client:
        assert await _text(client) == "answer 1"
    # The system's certificates do not vouch for the loopback one: refused, not sent.
    async with llmstream.AsyncClient(
        url, model="m", transport=llmstream.AsyncioTransport(), retry=0
    ) as client:
        with pytest.raises(llmstream.APIConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await _text(client)
    assert len(tls_server.heads) == 1


@pytest.mark.anyio
@asyncio_only
async def test_https_goes_through_the_environments_proxy_in_a_tunnel_with_its_credentials(
    tls_server: ScriptedServer,
    tunnel_proxy: Callable[..., TunnelProxy],
    clean_proxies: pytest.MonkeyPatch,
) -> None:
    proxy = tunnel_proxy()
    clean_proxies.setenv("HTTPS_PROXY", proxy.url.replace("http://", "http://ann:secret@"))
    url = tls_server.base_url.replace("http://", "https://")
    transport = llmstream.AsyncioTransport(verify=_trusting())
    async with llmstream.AsyncClient(url, model="m", transport=transport) as client:
        assert [await _text(client) for _ in range(2)] == ["answer 1", "answer 2"]
    port = tls_server.listener.getsockname()[1]
    request_line, *lines = proxy.heads[0].decode().split("\r\n")
    assert request_line == f"CONNECT 127.0.0.1:{port} HTTP/1.1"
    assert "Proxy-Authorization: Basic YW5uOnNlY3JldA==" in lines  # ann:secret
    assert len(proxy.heads) == 1  # the tunnel was kept and reused
    # The server saw the requests, not the proxy's credentials.
    assert all(b"Proxy-Authorization" not in head for head in tls_server.heads)


@pytest.mark.anyio
@asyncio_only
async def test_a_proxy_that_refuses_the_tunnel_is_named_not_the_server(
    tunnel_proxy: Callable[..., TunnelProxy], clean_proxies: pytest.MonkeyPatch
) -> None:
    proxy = tunnel_proxy(refuse=b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
    clean_proxies.setenv("HTTPS_PROXY", proxy.url)
    message = await _error("https://vllm.invalid/v1", llmstream.APIConnectionError)
    assert f"The proxy {proxy.url} (from HTTPS_PROXY) would not forward" in message
    assert "407 Proxy Authentication Required" in message


@pytest.mark.anyio
@asyncio_only
async def test_a_socks_proxy_is_refused_by_name(clean_proxies: pytest.MonkeyPatch) -> None:
    clean_proxies.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    message = await _error("http://vllm.invalid/v1", llmstream.InvalidRequestError)
    assert "ALL_PROXY=socks5://127.0.0.1:1080 names a socks5 proxy" in message


# -- reading bounded by the stream --------------------------------------------------------


@pytest.mark.anyio
@asyncio_only
async def test_a_stream_not_read_stops_the_socket_being_read_so_the_server_is_held_back(
    scripted: Callable[..., ScriptedServer],
) -> None:
    sent = 0
    blocked = threading.Event()
    event = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * 1000 + b'"}}]}\n\n'

    def flood(server: ScriptedServer, conn: socket.socket, n: int) -> None:
        nonlocal sent
        server.read(conn)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        conn.sendall(SSE_HEAD)
        conn.settimeout(1.0)
        try:
            for _ in range(100_000):  # 100 MB, far beyond any buffer
                conn.sendall(_chunk(event))
                sent += len(event)
        except TimeoutError:
            blocked.set()  # the client stopped reading: TCP holds the server back

    server = scripted(flood)
    transport = llmstream.AsyncioTransport()
    async with llmstream.AsyncClient(
        server.base_url, model="m", transport=transport, buffer=0, retry=0
    ) as client:
        async with client.stream("Hi") as stream:
            assert await stream.__aiter__().__anext__() == "x" * 1000
            assert await anyio.to_thread.run_sync(blocked.wait, 10)
            connection = stream._response._connection  # type: ignore[attr-defined]
            held = connection._buffered
    # What the client holds is bounded by its high-water mark plus one network read (asyncio
    # reads up to 256 KiB at a time).
    assert 0 < held <= _HIGH_WATER + 256 * 1024
    assert sent < 20 * 1024 * 1024


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("consumer", ["waiting", "busy"])
async def test_a_consumer_waiting_on_the_read_ahead_reads_in_the_reader_tasks_place(
    consumer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With read-ahead, a chunk that finds the consumer waiting wakes the consumer alone.

    The reader task sleeps in its read meanwhile (its read returns no chunk), so a chunk
    costs one task switch, not two. A consumer busy with each chunk gets the next ones
    read ahead by the reader task, as before.
    """
    reads_with_data = 0
    read = asyncio_transport._Body.__anext__

    async def counted(body: asyncio_transport._Body) -> bytes:
        nonlocal reads_with_data
        data = await read(body)
        reads_with_data += bool(data)
        return data

    monkeypatch.setattr(asyncio_transport._Body, "__anext__", counted)
    words = [f"w{i} " for i in range(30)]
    fake = FakeVLLM("".join(words), token_delay=0.01)
    with fake.serve() as server:
        transport = llmstream.AsyncioTransport()
        async with llmstream.AsyncClient(server.base_url, transport=transport) as client:
            async with client.stream("Hi") as stream:
                texts = []
                async for text in stream:
                    texts.append(text)
                    if consumer == "busy":
                        await anyio.sleep(0.03)  # three tokens come meanwhile
    assert "".join(texts) == "".join(words)
    if consumer == "waiting":
        # At most the head's first read and the last one (the end of the body).
        assert reads_with_data <= 3
    else:
        assert reads_with_data >= 10
