"""What every transport refuses, bounds or gives back alike.

Headers are checked once, where every request is made (``HTTPRequest``); infinite
timeouts mean no limit; a host name or a proxy that cannot be used is an llmstream
error; a stream dropped without ``aclose()`` gives its pool slot and its place in the
in-flight count back. Each runs on every transport, on real loopback sockets.
"""

from __future__ import annotations

import gc
import math
import os
import socket
import threading
import zlib
from collections.abc import Callable, Iterator

import anyio
import httpx
import pytest

import llmstream
from llmstream._asyncio_transport import _HIGH_WATER
from llmstream._http11 import DECODE_STEP
from llmstream._transport import HTTPRequest
from llmstream.testing import FakeVLLM

from .test_asyncio_transport import ScriptedServer, _keep_answering

asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])
SECRET = "sk-SECRET-4242"
MODEL = "llmstream/fake-model"


def _chain(exc: BaseException | None) -> str:
    """Every message, repr and argument along ``exc``'s cause and context."""
    seen = []
    while exc is not None:
        seen.append(f"{exc!s} {exc!r} {exc.args!r}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(seen)


def _async_client(backend: str, url: str, **options: object) -> llmstream.AsyncClient:
    transports: dict[str, Callable[[], object]] = {
        "asyncio": llmstream.AsyncioTransport,
        "aiohttp": llmstream.AiohttpTransport,
    }
    if backend in transports:
        options["transport"] = transports[backend]()
    return llmstream.AsyncClient(url, model=MODEL, **options)  # type: ignore[arg-type]


ASYNC_BACKENDS = ["httpx", "asyncio", "aiohttp"]


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedServer]]:
    made: list[ScriptedServer] = []

    def make(serve: Callable[[ScriptedServer, socket.socket, int], None]) -> ScriptedServer:
        made.append(ScriptedServer(serve))
        return made[-1]

    yield make
    for server in made:
        server.close()


@pytest.fixture
def clean_proxies(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


@pytest.fixture
def fake_server() -> Iterator[tuple[FakeVLLM, str]]:
    fake = FakeVLLM("one two three", api_key=SECRET)
    with fake.serve() as server:
        yield fake, server.base_url


# -- headers, checked once for every transport -----------------------------------------

BAD_VALUES = {
    "a trailing newline": (f"Bearer {SECRET}\n", "line break"),
    "an injected header": (f"Bearer {SECRET}\r\nX-Evil: 1", "line break"),
    "NUL": (f"Bearer {SECRET}\0", "NUL"),
    "Latin-1": (f"Bearer {SECRET}\u00e9", "not ASCII"),
    "beyond Latin-1": (f"Bearer {SECRET}\u20ac", "not ASCII"),
    "a control character": (f"Bearer {SECRET}\x1b", "control character"),
    "a trailing space": (f"Bearer {SECRET} ", "starts or ends with whitespace"),
    "a leading tab": (f"\tBearer {SECRET}", "starts or ends with whitespace"),
}


@pytest.mark.parametrize(("value", "says"), BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_a_header_value_http_cannot_carry_is_refused_by_name_without_its_value(
    value: str, says: str
) -> None:
    with pytest.raises(llmstream.InvalidRequestError, match=says) as info:
        HTTPRequest("POST", "http://h/v1", {"Authorization": value}, None, 1.0, 1.0)
    assert "'Authorization'" in str(info.value)
    assert SECRET not in _chain(info.value)


@pytest.mark.parametrize(
    "name", ["X-A: injected\tX-B", "X-A\r\nX-B", f"Authorization: Bearer {SECRET}", "", "X A"]
)
def test_a_header_name_that_is_not_a_token_is_refused_without_what_follows(name: str) -> None:
    with pytest.raises(llmstream.InvalidRequestError, match="header name") as info:
        HTTPRequest("POST", "http://h/v1", {name: "1"}, None, 1.0, 1.0)
    assert SECRET not in _chain(info.value)


def test_a_tab_and_visible_ascii_are_sent_as_they_are() -> None:
    headers = {"Authorization": f"Bearer {SECRET}", "X-List": "a,\tb c ~!"}
    assert HTTPRequest("GET", "http://h/v1", headers, None, 1.0, 1.0).headers == headers


def test_the_requests_repr_does_not_show_its_headers() -> None:
    request = HTTPRequest("GET", "http://h/v1", {"Authorization": f"Bearer {SECRET}"}, None, 1, 1)
    assert SECRET not in repr(request)
    assert "http://h/v1" in repr(request)


@pytest.mark.parametrize("value", [f"{SECRET}\n", f"{SECRET}\u20ac", f"{SECRET}\u00e9"])
def test_the_sync_client_refuses_an_api_key_it_cannot_send_without_retrying(
    fake_server: tuple[FakeVLLM, str], value: str
) -> None:
    fake, url = fake_server
    with llmstream.Client(url, api_key=value, model=MODEL, retry=2) as client:
        with pytest.raises(llmstream.InvalidRequestError, match="'Authorization'") as info:
            with client.stream("Hi") as stream:
                list(stream)
    assert SECRET not in _chain(info.value)
    assert fake.requests == []  # refused before sending, and not retried


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("backend", ASYNC_BACKENDS)
@pytest.mark.parametrize("where", ["api_key", "extra_headers"])
@pytest.mark.parametrize("value", [f"{SECRET}\n", f"{SECRET}\u20ac", f"{SECRET}\u00e9"])
async def test_every_transport_refuses_a_header_it_cannot_send_without_showing_it(
    fake_server: tuple[FakeVLLM, str], backend: str, where: str, value: str
) -> None:
    fake, url = fake_server
    key, extra = (value, {}) if where == "api_key" else (SECRET, {"X-Key": value})
    async with _async_client(backend, url, api_key=key, retry=2) as client:
        with pytest.raises(llmstream.InvalidRequestError) as info:
            async with client.stream("Hi", extra_headers=extra) as stream:
                [t async for t in stream]
    assert ("'Authorization'" if where == "api_key" else "'X-Key'") in str(info.value)
    assert SECRET not in _chain(info.value)
    assert fake.requests == []


@pytest.mark.anyio
@asyncio_only
async def test_the_asyncio_transport_sends_no_header_name_holding_a_separator(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted(_keep_answering)
    async with _async_client("asyncio", server.base_url, retry=0) as client:
        with pytest.raises(llmstream.InvalidRequestError, match="header name 'X-A'"):
            async with client.stream("Hi", extra_headers={"X-A: injected\tX-B": "1"}):
                pass
    assert server.heads == []


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("name", ["Content-Length", "transfer-encoding"])
async def test_the_asyncio_transport_refuses_a_header_that_would_reframe_the_body(
    scripted: Callable[..., ScriptedServer], name: str
) -> None:
    server = scripted(_keep_answering)
    async with _async_client("asyncio", server.base_url, retry=0) as client:
        with pytest.raises(llmstream.InvalidRequestError, match=f"the {name} header"):
            async with client.stream("Hi", extra_headers={name: "0"}):
                pass
        assert client._transport.requests_in_flight == 0
    assert server.heads == []


@pytest.mark.anyio
@asyncio_only
async def test_the_asyncio_transport_sends_a_callers_host_header_in_place_of_its_own(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted(_keep_answering)
    async with _async_client("asyncio", server.base_url) as client:
        async with client.stream("Hi", extra_headers={"host": "vllm.example"}) as stream:
            assert "".join([t async for t in stream]) == "answer 1"
    hosts = [line for line in server.heads[0].split(b"\r\n") if line.lower().startswith(b"host:")]
    assert hosts == [b"Host: vllm.example"]


# -- the request target, encoded as httpx encodes it -----------------------------------


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("path", ["/v1 x", "/v1/caf\u00e9", "/v1/\u20ac", "/v1/a%20b"])
async def test_the_asyncio_transport_percent_encodes_the_path_as_httpx_does(
    scripted: Callable[..., ScriptedServer], path: str
) -> None:
    server = scripted(_keep_answering)
    url = server.base_url.removesuffix("/v1") + path
    async with _async_client("asyncio", url) as client:
        assert "".join([t async for t in client.stream("Hi")]) == "answer 1"
    expected = httpx.URL(f"{url}/chat/completions").raw_path
    assert server.heads[0].split(b"\r\n")[0] == b"POST " + expected + b" HTTP/1.1"


# -- infinite timeouts: no limit --------------------------------------------------------


@pytest.mark.parametrize(
    "timeout",
    [math.inf, llmstream.Timeouts(math.inf, math.inf, math.inf, math.inf)],
    ids=["number", "every-deadline"],
)
def test_the_sync_client_takes_an_infinite_timeout_as_no_limit(
    fake_server: tuple[FakeVLLM, str], timeout: float | llmstream.Timeouts
) -> None:
    _, url = fake_server
    with llmstream.Client(url, api_key=SECRET, model=MODEL, timeout=timeout) as client:
        assert client.models() == [MODEL]
        for buffer in (0, 4):  # read by the consumer, and by a reader thread
            with client.stream("Hi", buffer=buffer) as stream:
                assert "".join(stream)
            assert stream.result.status == "complete"


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("backend", ASYNC_BACKENDS)
async def test_every_async_transport_takes_an_infinite_timeout_as_no_limit(
    fake_server: tuple[FakeVLLM, str], backend: str
) -> None:
    _, url = fake_server
    async with _async_client(backend, url, api_key=SECRET, timeout=math.inf) as client:
        assert await client.models() == [MODEL]
        async with client.stream("Hi") as stream:
            assert "".join([t async for t in stream]) == "one two three"


def test_a_request_keeps_finite_timeouts_and_drops_infinite_ones() -> None:
    request = HTTPRequest("GET", "http://h/v1", {}, None, math.inf, 2.5)
    assert (request.connect_timeout, request.read_timeout) == (None, 2.5)


# -- a host name that cannot be encoded, a proxy port out of range ----------------------


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("backend", ASYNC_BACKENDS)
@pytest.mark.parametrize("host", ["a..b", "a" * 64 + ".example"])
async def test_a_host_name_idna_refuses_is_a_connection_error_naming_it(
    clean_proxies: pytest.MonkeyPatch, backend: str, host: str
) -> None:
    url = f"http://{host}:8000/v1"
    async with _async_client(backend, url, retry=0) as client:
        with pytest.raises(llmstream.APIConnectionError) as info:
            async with client.stream("Hi"):
                pass
    assert host in str(info.value)


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("backend", ASYNC_BACKENDS)
async def test_a_proxy_port_out_of_range_is_refused_naming_the_variable(
    clean_proxies: pytest.MonkeyPatch, backend: str
) -> None:
    clean_proxies.setenv("HTTP_PROXY", "http://ann:pw-SECRET@127.0.0.1:99999")
    async with _async_client(backend, "http://vllm.invalid/v1", retry=0) as client:
        with pytest.raises(llmstream.InvalidRequestError) as info:
            async with client.stream("Hi"):
                pass
    assert "HTTP_PROXY=http://***@127.0.0.1:99999" in str(info.value)
    assert "port" in str(info.value) and "SECRET" not in _chain(info.value)


def test_the_sync_client_refuses_a_proxy_port_out_of_range_naming_the_variable(
    clean_proxies: pytest.MonkeyPatch,
) -> None:
    clean_proxies.setenv("HTTP_PROXY", "http://ann:pw-SECRET@127.0.0.1:99999")
    with llmstream.Client("http://vllm.invalid/v1", model=MODEL, retry=0) as client:
        with pytest.raises(llmstream.InvalidRequestError, match="HTTP_PROXY=") as info:
            client.models()
    assert "SECRET" not in _chain(info.value)


# -- compressed bodies come out in bounded steps ----------------------------------------


@pytest.mark.anyio
@asyncio_only
async def test_a_compressed_body_is_read_in_bounded_pieces_and_whole(
    scripted: Callable[..., ScriptedServer],
) -> None:
    body = b"data: " + b"x" * (20 * 1024 * 1024) + b"\n\n"
    packed = zlib.compress(body, 9)  # about 20 KB that decode to 20 MB

    def serve(server: ScriptedServer, conn: socket.socket, n: int) -> None:
        server.read(conn)
        head = b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nContent-Length: %d\r\n\r\n"
        conn.sendall(head % len(packed) + packed)

    server = scripted(serve)
    transport = llmstream.AsyncioTransport()
    request = HTTPRequest("GET", f"{server.base_url}/models", {}, None, 5.0, 5.0)
    try:
        response = await transport.send(request)
        sizes = []
        received = bytearray()
        async for data in response.stream(None):
            sizes.append(len(data))
            received += data
        await response.aclose()
    finally:
        await transport.aclose()
    assert received == body
    # What one read hands over, and so what the connection holds, stays bounded.
    assert max(sizes) <= _HIGH_WATER + DECODE_STEP


@pytest.mark.anyio
@asyncio_only
async def test_compressed_bytes_not_yet_decoded_count_towards_the_high_water_mark(
    scripted: Callable[..., ScriptedServer],
) -> None:
    # Bytes that barely compress: each read brings more input than one step decodes.
    packed = zlib.compress(os.urandom(8 * 1024 * 1024), 1)
    blocked = threading.Event()

    def serve(server: ScriptedServer, conn: socket.socket, n: int) -> None:
        server.read(conn)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        head = b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nContent-Length: %d\r\n\r\n"
        conn.sendall(head % len(packed))
        conn.settimeout(1.0)
        try:
            conn.sendall(packed)
        except TimeoutError:
            blocked.set()  # the client stopped reading: TCP holds the server back

    server = scripted(serve)
    transport = llmstream.AsyncioTransport()
    request = HTTPRequest("GET", f"{server.base_url}/models", {}, None, 5.0, 5.0)
    try:
        response = await transport.send(request)
        assert await anyio.to_thread.run_sync(blocked.wait, 10)
        connection = response._connection  # type: ignore[attr-defined]
        held = connection._buffered + connection.parser.backlog
        await response.aclose()
    finally:
        await transport.aclose()
    # The high-water mark plus one network read (asyncio reads up to 256 KiB at a time).
    assert 0 < held <= _HIGH_WATER + 256 * 1024


# -- a stream dropped without aclose() gives its slot back ------------------------------


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("backend", ASYNC_BACKENDS)
async def test_a_stream_dropped_unclosed_frees_its_connection_slot_and_in_flight_count(
    backend: str,
) -> None:
    fake = FakeVLLM("one two three four five six seven eight " * 50, token_delay=0.01)
    options: dict[str, object] = {"retry": 0, "timeout": llmstream.Timeouts(connect=5.0)}
    http = None
    if backend == "httpx":
        http = options["http_client"] = httpx.AsyncClient(limits=httpx.Limits(max_connections=1))
    elif backend == "asyncio":
        options["transport"] = llmstream.AsyncioTransport(max_connections=1)
    else:
        options["transport"] = llmstream.AiohttpTransport(max_connections=1)
    with fake.serve() as server:
        async with llmstream.AsyncClient(server.base_url, model=MODEL, **options) as client:  # type: ignore[arg-type]
            for _ in range(3):  # the one connection is needed again each time
                stream = await client.stream("Hi")
                async for _text in stream:
                    break
                del stream
                gc.collect()
                assert client._transport.requests_in_flight == 0
            async with client.stream("Again", max_tokens=3) as last:
                assert (await last.final_result()).text == "one two three"
            assert client._transport.requests_in_flight == 0
    if http is not None:
        await http.aclose()


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("backend", ASYNC_BACKENDS)
async def test_abort_then_aclose_releases_a_response_once(
    fake_server: tuple[FakeVLLM, str], backend: str
) -> None:
    _, url = fake_server
    async with _async_client(backend, url, api_key=SECRET) as client:
        transport = client._transport
        request = HTTPRequest(
            "POST",
            f"{url}/chat/completions",
            {"Authorization": f"Bearer {SECRET}"},
            {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True},
            5.0,
            5.0,
        )
        responses = [await transport.send(request) for _ in range(2)]
        assert transport.requests_in_flight == 2
        responses[0].abort()
        responses[0].abort()
        assert transport.requests_in_flight == 1
        await responses[0].aclose()
        await responses[1].aclose()
        assert transport.requests_in_flight == 0
        if backend == "asyncio":
            assert transport._open == 0  # type: ignore[attr-defined]
