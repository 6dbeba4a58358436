"""Errors that point the right way: a wrong URL, port, proxy or scheme, and misuse.

Each case is a mistake a user makes against a real server on loopback (a small
``http.server`` that answers as the wrong service would, or the emulator), through the
sync and the async client alike (the async one on httpx and on aiohttp). The message must
say what happened and what to do; no httpx, aiohttp or Python exception escapes.
"""

from __future__ import annotations

import asyncio
import gc
import http.server
import importlib.util
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

import llmstream
from llmstream.relay import relay_response
from llmstream.testing import FakeVLLM

from .drivers import AIOHTTP, ASYNCIO, async_client_kwargs

MODES = ["async", "sync"]
# The server is real in every test here: the async client on aiohttp too.
SOCKET_MODES = (
    [*MODES, AIOHTTP, ASYNCIO] if importlib.util.find_spec("aiohttp") else [*MODES, ASYNCIO]
)
PROXY_VARIABLES = ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"]

# What vLLM (FastAPI) answers for a path it does not serve.
FASTAPI_404 = (404, "application/json", b'{"detail":"Not Found"}')
JUPYTER = b"<!DOCTYPE html><html><head><title>Jupyter Server</title></head><body></body></html>"

Answer = tuple[int, str, bytes]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        status, content_type, body = self.server.routes.get(self.path, FASTAPI_404)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a TLS hello read as a request line is logged as an error: not ours to show


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, routes: dict[str, Answer]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes = routes

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def _serve(routes: dict[str, Answer]) -> Iterator[_Server]:
    server = _Server(routes)
    # shutdown() is seen at the next poll: 0.5 s by default, at each test's end.
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def routes() -> dict[str, Answer]:
    """What the server answers, by path; anything else is FastAPI's 404."""
    return {}


@pytest.fixture
def server(routes: dict[str, Answer]) -> Iterator[_Server]:
    yield from _serve(routes)


@pytest.fixture
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens on it once closed


def _run(mode: str, base_url: str, action: str, **client_kwargs: Any) -> object:
    """``client.models()`` or one stream read to its end, in ``mode``; retries off."""
    kwargs: dict[str, Any] = {"retry": 0, **client_kwargs}
    if mode == "sync":
        with llmstream.Client(base_url, **kwargs) as client:
            if action == "models":
                return client.models()
            with client.stream("Hi") as stream:
                return "".join(stream)

    async def main() -> object:
        async with llmstream.AsyncClient(base_url, **kwargs, **async_client_kwargs(mode)) as client:
            if action == "models":
                return await client.models()
            async with client.stream("Hi") as stream:
                return "".join([text async for text in stream])

    return anyio.run(main)


def _failure(mode: str, base_url: str, action: str, **client_kwargs: Any) -> str:
    """The message of the llmstream error the call raises."""
    with pytest.raises(llmstream.LLMStreamError) as info:
        _run(mode, base_url, action, **client_kwargs)
    return str(info.value)


# -- a base URL without /v1 --------------------------------------------------------------


@pytest.mark.parametrize("action", ["models", "stream"])
@pytest.mark.parametrize("mode", SOCKET_MODES)
def test_404_for_a_base_url_without_v1_names_the_request_and_suggests_v1(
    mode: str, action: str, server: _Server
) -> None:
    # No model given: the stream's first request is GET /models, as the models command's.
    with pytest.raises(llmstream.NotFoundError) as info:
        _run(mode, server.url, action)
    exc = info.value
    assert (exc.method, exc.url) == ("GET", f"{server.url}/models")
    assert str(exc).startswith(f"GET {server.url}/models: HTTP 404 Not Found: Not Found.")
    assert f"the base URL: it usually ends in /v1; try {server.url}/v1" in str(exc)
    assert "model name" not in str(exc)


@pytest.mark.parametrize("mode", SOCKET_MODES)
def test_404_on_the_chat_request_names_it_and_suggests_v1(mode: str, server: _Server) -> None:
    with pytest.raises(llmstream.NotFoundError) as info:
        _run(mode, server.url, "stream", model="m")
    exc = info.value
    assert (exc.method, exc.url) == ("POST", f"{server.url}/chat/completions")
    assert str(exc).startswith(f"POST {server.url}/chat/completions: HTTP 404")
    assert f"try {server.url}/v1" in str(exc)


# -- a port where another service answers -----------------------------------------------


NOT_OPENAI = {
    "html": ((200, "text/html; charset=utf-8", JUPYTER), "text/html ('Jupyter Server')"),
    "text": (
        (200, "text/plain", b"# HELP up Whether the target is up.\nup 1\n"),
        "text/plain ('# HELP up Whether the target is up. up 1')",
    ),
    "json": ((200, "application/json", b'{"status": "ok"}'), 'not a model list ({"status": "ok"})'),
}


@pytest.mark.parametrize("kind", NOT_OPENAI)
@pytest.mark.parametrize("action", ["models", "stream"])
@pytest.mark.parametrize("mode", SOCKET_MODES)
def test_a_port_that_is_not_an_openai_server_is_named_as_such(
    mode: str, action: str, kind: str, routes: dict[str, Answer], server: _Server
) -> None:
    answer, quoted = NOT_OPENAI[kind]
    routes["/v1/models"] = answer
    with pytest.raises(llmstream.ProtocolError) as info:
        _run(mode, f"{server.url}/v1", action)
    message = str(info.value)
    assert message.startswith(f"GET {server.url}/v1/models: the server at {server.url} ")
    assert "does not speak the OpenAI API" in message
    assert quoted in message
    assert "Check the base URL and its port" in message
    assert "model=" not in message  # naming a model would not help


@pytest.mark.parametrize("mode", SOCKET_MODES)
def test_a_server_that_lists_no_model_asks_for_one(
    mode: str, routes: dict[str, Answer], server: _Server
) -> None:
    routes["/v1/models"] = (200, "application/json", b'{"object": "list", "data": []}')
    message = _failure(mode, f"{server.url}/v1", "stream")
    assert "lists no model" in message
    assert "pass model=... or set LLMSTREAM_MODEL" in message


# -- count_prompt="server" without /tokenize ---------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [FASTAPI_404, (405, "application/json", b'{"detail":"Method Not Allowed"}')],
    ids=["404", "405"],
)
@pytest.mark.parametrize("mode", SOCKET_MODES)
def test_a_server_without_tokenize_says_so_and_how_to_count_instead(
    mode: str, answer: Answer, routes: dict[str, Answer], server: _Server
) -> None:
    routes["/tokenize"] = answer
    with pytest.raises(llmstream.APIStatusError) as info:
        _run(mode, f"{server.url}/v1", "stream", model="m", count_prompt="server")
    exc = info.value
    assert (exc.status_code, exc.method, exc.url) == (answer[0], "POST", f"{server.url}/tokenize")
    assert "The server has no tokenize endpoint" in str(exc)
    assert 'count_prompt="estimate"' in str(exc)
    assert "counter_from_text_tokenizer" in str(exc)


# -- a dead proxy in the environment -----------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "scheme"),
    [
        ("HTTP_PROXY", "http"),
        ("http_proxy", "http"),
        ("ALL_PROXY", "http"),
        ("HTTPS_PROXY", "https"),
    ],
)
@pytest.mark.parametrize("action", ["models", "stream"])
@pytest.mark.parametrize("mode", SOCKET_MODES)
def test_a_dead_proxy_is_named_not_the_server(
    mode: str, action: str, variable: str, scheme: str, server: _Server, no_proxies: Any
) -> None:
    proxy = f"http://127.0.0.1:{_dead_port()}"
    no_proxies.setenv(variable, proxy)
    port = server.server_address[1]
    with pytest.raises(llmstream.APIConnectionError) as info:
        _run(mode, f"{scheme}://127.0.0.1:{port}/v1", action, model="m")
    message = str(info.value)
    assert f"Could not reach the proxy {proxy} (from {variable})" in message
    assert f"Fix or unset {variable}" in message
    assert "Is the server running" not in message


@pytest.mark.parametrize("mode", SOCKET_MODES)
def test_a_proxy_that_no_proxy_bypasses_is_not_blamed(mode: str, no_proxies: Any) -> None:
    no_proxies.setenv("HTTP_PROXY", f"http://127.0.0.1:{_dead_port()}")
    no_proxies.setenv("NO_PROXY", "127.0.0.1")
    message = _failure(mode, f"http://127.0.0.1:{_dead_port()}/v1", "stream", model="m")
    assert "Is the server running" in message
    assert "proxy" not in message


PASSWORD = "Pr0xyPassw0rd"


@pytest.mark.parametrize("mode", SOCKET_MODES)
def test_a_proxys_credentials_are_masked_in_the_error_and_the_retry_log(
    mode: str, server: _Server, no_proxies: Any, caplog: pytest.LogCaptureFixture
) -> None:
    port = _dead_port()
    no_proxies.setenv("HTTP_PROXY", f"http://ann:{PASSWORD}@127.0.0.1:{port}")
    caplog.set_level("DEBUG", logger="llmstream")
    with pytest.raises(llmstream.APIConnectionError) as info:
        _run(mode, f"{server.url}/v1", "stream", model="m", retry=1)
    message = str(info.value)
    assert f"Could not reach the proxy http://***@127.0.0.1:{port} (from HTTP_PROXY)" in message
    assert "retry" in caplog.text  # the retry was logged, with the same masked message
    for text in (message, repr(info.value), caplog.text):
        assert PASSWORD not in text and "ann:" not in text


@pytest.mark.parametrize("mode", [*SOCKET_MODES[2:], "socksio"])
def test_a_socks_proxys_credentials_are_masked_where_it_is_refused(
    mode: str, no_proxies: Any
) -> None:
    no_proxies.setenv("ALL_PROXY", f"socks5://ann:{PASSWORD}@127.0.0.1:1080")
    with pytest.raises(llmstream.InvalidRequestError) as info:
        if mode == "socksio":  # httpx without socksio refuses at the client's construction
            no_proxies.setitem(sys.modules, "socksio", None)
            llmstream.Client("http://localhost:8000/v1")
        else:
            _run(mode, "http://127.0.0.1:9/v1", "stream", model="m")
    assert "ALL_PROXY=socks5://***@127.0.0.1:1080" in str(info.value)
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize("mode", SOCKET_MODES[2:])  # the transports that parse it themselves
def test_a_malformed_proxy_url_is_refused_by_its_variable(mode: str, no_proxies: Any) -> None:
    no_proxies.setenv("HTTP_PROXY", f"http://ann:{PASSWORD}@[::1")
    with pytest.raises(llmstream.InvalidRequestError) as info:
        _run(mode, "http://127.0.0.1:9/v1", "stream", model="m")
    assert "HTTP_PROXY=http://***@[::1 is not a valid proxy URL" in str(info.value)
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize(
    ("base_url", "why"),
    [
        (f"ftp://bob:{PASSWORD}@gpu/v1", "must be an http:// or https:// URL"),
        (f"bob:{PASSWORD}@gpu:8000/v1", "must be an http:// or https:// URL"),
        (f"http://bob:{PASSWORD}@gpu:80a/v1", "is not a valid URL"),
        (f"http://bob:{PASSWORD}@[::1/v1", "is not a valid URL"),
        (f"http://bob:{PASSWORD}@gpu/v1", "must not carry credentials"),
    ],
)
def test_a_base_url_with_credentials_is_refused_without_echoing_them(
    base_url: str, why: str
) -> None:
    for make in (llmstream.Client, llmstream.AsyncClient, llmstream.Endpoint):
        with pytest.raises(llmstream.InvalidRequestError, match=why) as info:
            make(base_url)
        assert PASSWORD not in str(info.value) and PASSWORD not in repr(info.value)


@pytest.mark.parametrize("port", [0, 65536, 70000])
def test_a_port_out_of_range_is_refused_before_anything_is_sent(port: int) -> None:
    for make in (llmstream.Client, llmstream.AsyncClient, llmstream.Endpoint):
        with pytest.raises(llmstream.InvalidRequestError, match=f"has port {port}; a port is"):
            make(f"http://127.0.0.1:{port}/v1")


# -- https:// to a plain HTTP port -------------------------------------------------------


@pytest.mark.parametrize("action", ["models", "stream"])
@pytest.mark.parametrize("mode", SOCKET_MODES)
def test_https_to_a_plain_http_port_says_use_http(
    mode: str, action: str, server: _Server, no_proxies: Any
) -> None:
    port = server.server_address[1]
    with pytest.raises(llmstream.APIConnectionError) as info:
        _run(mode, f"https://127.0.0.1:{port}/v1", action, model="m")
    assert f"The server speaks plain HTTP: use http:// (http://127.0.0.1:{port}/v1)" in str(
        info.value
    )


# -- misuse: no raw exception escapes ----------------------------------------------------


@pytest.mark.parametrize("action", ["models", "stream"])
@pytest.mark.parametrize("mode", SOCKET_MODES)
def test_a_closed_client_says_so(mode: str, action: str, server: _Server) -> None:
    base_url = f"{server.url}/v1"
    if mode == "sync":
        client = llmstream.Client(base_url, model="m")
        client.close()
        with pytest.raises(llmstream.InvalidRequestError, match=r"The client .* was closed"):
            client.models() if action == "models" else list(client.stream("Hi"))
        return

    async def main() -> None:
        client = llmstream.AsyncClient(base_url, model="m", **async_client_kwargs(mode))
        async with client:
            pass
        with pytest.raises(llmstream.InvalidRequestError, match="async with` block ended"):
            if action == "models":
                await client.models()
            else:
                async with client.stream("Hi"):
                    pass

    anyio.run(main)


@pytest.mark.parametrize("mode", MODES)  # an httpx client of the caller's own
def test_a_closed_http_client_of_the_callers_says_so(mode: str, server: _Server) -> None:
    if mode == "sync":
        http = httpx.Client()
        http.close()
        with pytest.raises(llmstream.InvalidRequestError, match="was closed"):
            llmstream.Client(f"{server.url}/v1", http_client=http).models()
        return

    async def main() -> None:
        http = httpx.AsyncClient()
        await http.aclose()
        with pytest.raises(llmstream.InvalidRequestError, match="was closed"):
            await llmstream.AsyncClient(f"{server.url}/v1", http_client=http).models()

    anyio.run(main)


@pytest.mark.parametrize("client_class", [llmstream.Client, llmstream.AsyncClient])
def test_a_socks_proxy_without_socksio_names_the_variable_and_the_extra(
    client_class: type[llmstream.Client | llmstream.AsyncClient], no_proxies: Any
) -> None:
    no_proxies.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    no_proxies.setenv("NO_PROXY", "localhost")  # httpx fails for every host, even these
    no_proxies.setitem(sys.modules, "socksio", None)  # not installed
    with pytest.raises(llmstream.InvalidRequestError) as info:
        client_class("http://localhost:8000/v1")
    assert "ALL_PROXY=socks5://127.0.0.1:1080 names a SOCKS proxy" in str(info.value)
    assert 'pip install "httpx[socks]"' in str(info.value)


def _stream_in_a_new_loop(client: llmstream.AsyncClient) -> str:
    async def main() -> str:
        async with client.stream("Hi") as stream:
            return "".join([text async for text in stream])

    return asyncio.run(main())


# The connections of the first loop cannot be closed without it: asyncio closes their
# sockets when they are collected, and says so.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.parametrize("mode", ["async", AIOHTTP, ASYNCIO])
def test_an_async_client_works_across_two_asyncio_runs(mode: str) -> None:
    fake = FakeVLLM("Hello there")
    with fake.serve() as server:
        client = llmstream.AsyncClient(server.base_url, retry=0, **async_client_kwargs(mode))
        assert _stream_in_a_new_loop(client) == "Hello there"
        assert _stream_in_a_new_loop(client) == "Hello there"
        asyncio.run(client.aclose())
        gc.collect()
    # The second loop's request went out once, on a new connection.
    chats = [r for r in fake.requests if r.path.endswith("/chat/completions")]
    assert len(chats) == 2


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_a_callers_http_client_across_two_asyncio_runs_is_explained() -> None:
    fake = FakeVLLM("Hello there")
    with fake.serve() as server:
        http = httpx.AsyncClient()
        client = llmstream.AsyncClient(server.base_url, retry=0, http_client=http)
        assert _stream_in_a_new_loop(client) == "Hello there"
        with pytest.raises(llmstream.InvalidRequestError) as info:
            _stream_in_a_new_loop(client)
        assert "a client belongs to one event loop" in str(info.value)
        asyncio.run(http.aclose())
        del info  # its traceback holds the first loop's connection
        gc.collect()


def test_relay_response_without_starlette_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "starlette.responses", None)  # not installed

    async def main() -> None:
        async with llmstream.AsyncClient(transport=FakeVLLM("Hi").transport()) as client:
            stream = client.stream("Hi")
            with pytest.raises(llmstream.InvalidRequestError) as info:
                relay_response(stream)
            await stream.aclose()
        assert 'pip install "llmstream-sdk[relay]"' in str(info.value)

    anyio.run(main)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://ann:pw@proxy:3128", "http://***@proxy:3128"),
        ("http://ann@proxy:3128/", "http://***@proxy:3128/"),
        ("http://a:b@c@proxy", "http://***@proxy"),  # the last @ ends the credentials
        ("ann:pw@proxy:3128", "***@proxy:3128"),
        ("http://proxy:3128/a@b?c@d#e@f", "http://proxy:3128/a@b?c@d#e@f"),  # not credentials
        ("http://[::1", "http://[::1"),
    ],
)
def test_shown_url_masks_credentials_and_only_them(url: str, shown: str) -> None:
    from llmstream._config import shown_url

    assert shown_url(url) == shown
