"""The aiohttp transport: how it is chosen, and what only it can get wrong.

The behaviour suite runs on it as well (the ``async-aiohttp`` mode of ``drivers.collect``
and the ``async_http_backend`` fixture); this module covers the choice (argument,
environment, the sync client, trio, a missing extra) and the transport's own parts: the
pool and its limit, the header wait, a body that will not decode, proxies.
"""

from __future__ import annotations

import gzip
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import pytest

import llmstream
from llmstream._config import EnvProxy, http_proxy_settings
from llmstream._httpx_transport import HttpxAsyncTransport
from llmstream.testing import FakeVLLM

pytest.importorskip("aiohttp")

asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])


# -- choosing it ------------------------------------------------------------------------


def test_import_llmstream_does_not_import_aiohttp() -> None:
    code = "import sys, llmstream; print('aiohttp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_argument_chooses_it_and_the_default_is_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMSTREAM_HTTP_BACKEND", raising=False)
    transport = llmstream.AiohttpTransport()
    assert llmstream.AsyncClient(transport=transport)._transport is transport
    assert isinstance(llmstream.AsyncClient()._transport, HttpxAsyncTransport)


@pytest.mark.parametrize("value", ["aiohttp", "AIOHTTP", " aiohttp "])
def test_the_environment_chooses_it(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("LLMSTREAM_HTTP_BACKEND", value)
    assert isinstance(llmstream.AsyncClient()._transport, llmstream.AiohttpTransport)


def test_an_argument_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSTREAM_HTTP_BACKEND", "aiohttp")
    client = llmstream.AsyncClient(http_client=httpx.AsyncClient())
    assert isinstance(client._transport, HttpxAsyncTransport)
    client = llmstream.AsyncClient(transport=FakeVLLM().transport())
    assert isinstance(client._transport, HttpxAsyncTransport)
    monkeypatch.setenv("LLMSTREAM_HTTP_BACKEND", "httpx")
    assert isinstance(llmstream.AsyncClient()._transport, HttpxAsyncTransport)


def test_an_unknown_backend_in_the_environment_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSTREAM_HTTP_BACKEND", "aiohtp")
    with pytest.raises(llmstream.InvalidRequestError) as info:
        llmstream.AsyncClient()
    assert "LLMSTREAM_HTTP_BACKEND='aiohtp'" in str(info.value)
    assert "httpx, aiohttp or asyncio" in str(info.value)


def test_the_sync_client_ignores_the_environment_and_refuses_the_transport(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLMSTREAM_HTTP_BACKEND", "aiohttp")
    with llmstream.Client() as client:
        assert client._transport.http is client._http  # httpx, as always
    with pytest.raises(llmstream.InvalidRequestError, match="AsyncClient only"):
        llmstream.Client(transport=llmstream.AiohttpTransport())  # type: ignore[arg-type]


def test_an_http_client_and_an_aiohttp_transport_together_are_refused() -> None:
    with pytest.raises(llmstream.InvalidRequestError, match="not both"):
        llmstream.AsyncClient(
            http_client=httpx.AsyncClient(), transport=llmstream.AiohttpTransport()
        )


def test_without_aiohttp_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # not installed
    with pytest.raises(llmstream.InvalidRequestError) as info:
        llmstream.AiohttpTransport()
    assert 'pip install "llmstream-sdk[aiohttp]"' in str(info.value)
    monkeypatch.setenv("LLMSTREAM_HTTP_BACKEND", "aiohttp")
    with pytest.raises(llmstream.InvalidRequestError, match=r"llmstream-sdk\[aiohttp\]"):
        llmstream.AsyncClient()


# -- the pool ---------------------------------------------------------------------------


# -- a body that will not decode --------------------------------------------------------


@pytest.fixture
def bad_gzip() -> Iterator[str]:
    """A server that says its event stream is gzipped, and sends something else."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            good = gzip.compress(b'data: {"id": "c", "object": "chat.completion.chunk"')
            body = good[:20] + b"not gzip at all" * 10
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"content-encoding: gzip\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            conn.recv(65536)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    listener.close()
    thread.join(5)


@pytest.mark.anyio
@pytest.mark.usefixtures("async_http_backend")
async def test_a_body_that_will_not_decode_is_a_protocol_error_on_either_library(
    bad_gzip: str,
) -> None:
    async with llmstream.AsyncClient(bad_gzip, model="m", retry=0) as client:
        with pytest.raises(llmstream.ProtocolError, match="Could not decode the response body"):
            async with client.stream("Hi") as stream:
                [t async for t in stream]


# -- proxies ----------------------------------------------------------------------------


def test_proxy_credentials_become_a_header_and_a_socks_proxy_is_refused() -> None:
    url, headers = http_proxy_settings(
        EnvProxy("http://ann:p%40ss@proxy:3128", "HTTP_PROXY"), "aiohttp"
    )
    assert url == "http://proxy:3128"
    assert headers == {"Proxy-Authorization": "Basic YW5uOnBAc3M="}  # ann:p@ss
    assert http_proxy_settings(EnvProxy("http://proxy:3128", "HTTP_PROXY"), "aiohttp") == (
        "http://proxy:3128",
        {},
    )
    with pytest.raises(llmstream.InvalidRequestError) as info:
        http_proxy_settings(EnvProxy("socks5://proxy:1080", "ALL_PROXY"), "aiohttp")
    assert "ALL_PROXY=socks5://proxy:1080 names a socks5 proxy" in str(info.value)


@pytest.fixture
def answering_proxy() -> Iterator[tuple[str, list[bytes]]]:
    """A proxy that answers every request itself with a model list, and records it."""
    listener = socket.create_server(("127.0.0.1", 0))
    heads: list[bytes] = []
    body = json.dumps({"object": "list", "data": [{"id": "via-proxy"}]}).encode()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536)
            heads.append(head)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", heads
    listener.close()
    thread.join(5)


@pytest.mark.anyio
@asyncio_only
@pytest.mark.parametrize("variable", ["HTTP_PROXY", "ALL_PROXY"])
@pytest.mark.parametrize("make", [llmstream.AiohttpTransport, llmstream.AsyncioTransport])
async def test_the_environments_proxy_carries_the_request_with_its_credentials(
    variable: str,
    make: type[llmstream.AiohttpTransport | llmstream.AsyncioTransport],
    answering_proxy: tuple[str, list[bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy, heads = answering_proxy
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv(variable, proxy.replace("http://", "http://ann:secret@"))
    transport = make()
    async with llmstream.AsyncClient("http://vllm.invalid:8000/v1", transport=transport) as client:
        assert await client.models() == ["via-proxy"]
    request_line, *lines = heads[0].decode().split("\r\n")
    assert request_line == "GET http://vllm.invalid:8000/v1/models HTTP/1.1"
    assert "Proxy-Authorization: Basic YW5uOnNlY3JldA==" in lines  # ann:secret
