"""Reading bodies by network read (`_body`): same bytes, same connection reuse, same errors."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from llmstream._body import aiter_body, async_body_reader, iter_body, sync_body_reader
from llmstream.testing import FakeVLLM, Fault

from .conftest import requires_fastpath

ANSWER = "one two three four five six seven eight nine ten"
BODY = {"model": "llmstream/fake-model", "messages": [{"role": "user", "content": "hi"}]}
STREAM_BODY = {**BODY, "stream": True}


@pytest.fixture
def server() -> Iterator[str]:
    with FakeVLLM(ANSWER).serve() as running:
        yield running.base_url


def _local_port(response: httpx.Response) -> int:
    stream = response.extensions["network_stream"]
    return int(stream.get_extra_info("socket").getsockname()[1])


def _same_shape(body: bytes) -> bytes:
    """The body without what differs between two requests (ids, timestamps)."""
    body = re.sub(rb'"id": ?"[^"]*"', b'"id":""', body)
    return re.sub(rb'"created": ?\d+', b'"created":0', body)


def _expected(url: str) -> bytes:
    with httpx.Client() as http:
        response = http.post(f"{url}/chat/completions", json=STREAM_BODY)
        return _same_shape(response.content)


@requires_fastpath
def test_sync_reader_gives_httpx_bytes_and_reuses_the_connection(server: str) -> None:
    expected = _expected(server)
    ports = []
    with httpx.Client() as http:
        for _ in range(2):
            request = http.build_request("POST", f"{server}/chat/completions", json=STREAM_BODY)
            response = http.send(request, stream=True)
            assert sync_body_reader(response) is not None  # the fast path is taken
            ports.append(_local_port(response))
            assert _same_shape(b"".join(iter_body(response))) == expected
            response.close()
    assert ports[0] == ports[1]  # read to its end, the connection went back to the pool


@requires_fastpath
@pytest.mark.anyio
async def test_async_reader_gives_httpx_bytes_and_reuses_the_connection(server: str) -> None:
    expected = _expected(server)
    ports = []
    async with httpx.AsyncClient() as http:
        for _ in range(2):
            request = http.build_request("POST", f"{server}/chat/completions", json=STREAM_BODY)
            response = await http.send(request, stream=True)
            assert async_body_reader(response) is not None
            ports.append(_local_port(response))
            body = b"".join([part async for part in aiter_body(response)])
            assert _same_shape(body) == expected
            await response.aclose()
    assert ports[0] == ports[1]


@pytest.fixture
def one_write_server() -> Iterator[str]:
    """Answers one request with a chunked body of 20 events, headers and all in one write."""
    events = [b'data: {"n": %d}\n\n' % i for i in range(20)]
    chunks = b"".join(b"%x\r\n%b\r\n" % (len(event), event) for event in events)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while b"\r\n\r\n" not in conn.recv(65536):
                pass
            conn.sendall(head + b"\r\n" + chunks + b"0\r\n\r\n")
            conn.recv(1)  # until the client closes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    thread.join(5)
    listener.close()


@requires_fastpath
def test_a_read_holds_every_chunk_it_completed(one_write_server: str) -> None:
    # The whole body arrives in one write: httpx would hand it over one chunk at a time.
    with httpx.Client() as http:
        with http.stream("GET", one_write_server) as response:
            reads = list(iter_body(response))
    assert b"".join(reads).count(b"\n\n") == 20
    assert len(reads) == 1


def test_a_body_cut_short_is_httpx_remote_protocol_error() -> None:
    fake = FakeVLLM(ANSWER)
    fake.add_fault(Fault.disconnect(after_chunks=3))
    with fake.serve() as running, httpx.Client() as http:
        url = f"{running.base_url}/chat/completions"
        with http.stream("POST", url, json=STREAM_BODY) as response:
            received = b""
            with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
                for part in iter_body(response):
                    received += part
    assert received.count(b"data: ") >= 1  # what came before the cut was delivered


@pytest.mark.anyio
async def test_a_stalled_body_is_httpx_read_timeout() -> None:
    fake = FakeVLLM(ANSWER)
    fake.add_fault(Fault.stall(after_chunks=2, seconds=5))
    with fake.serve() as running:
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=0.2)) as http:
            request = http.build_request(
                "POST", f"{running.base_url}/chat/completions", json=STREAM_BODY
            )
            response = await http.send(request, stream=True)
            with pytest.raises(httpx.ReadTimeout):
                async for _ in aiter_body(response):
                    pass
            await response.aclose()


def test_other_transports_keep_httpx_iteration() -> None:
    fake = FakeVLLM(ANSWER)
    with httpx.Client(transport=fake.transport()) as http:
        url = "http://fake/v1/chat/completions"
        with http.stream("POST", url, json=STREAM_BODY) as response:
            assert sync_body_reader(response) is None
            assert b"data: [DONE]" in b"".join(iter_body(response))


def test_content_encoded_bodies_are_decoded() -> None:
    import gzip

    payload = b'data: {"x": 1}\n\ndata: [DONE]\n\n'

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-encoding": "gzip"}, content=gzip.compress(payload)
        )

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        with http.stream("POST", "http://x/v1/chat/completions") as response:
            assert sync_body_reader(response) is None
            assert b"".join(iter_body(response)) == payload


@pytest.mark.anyio
async def test_a_watched_reader_reads_the_same_bytes_and_a_cancel_cuts_its_wait(
    server: str,
) -> None:
    expected = _expected(server)
    async with httpx.AsyncClient() as http:
        url = f"{server}/chat/completions"
        async with http.stream("POST", url, json=STREAM_BODY) as response:
            body = b"".join([part async for part in aiter_body(response, watched=True)])
        assert _same_shape(body) == expected

    fake = FakeVLLM(ANSWER)
    fake.add_fault(Fault.stall(after_chunks=2, seconds=30))
    with fake.serve() as running:
        async with httpx.AsyncClient() as http:
            url = f"{running.base_url}/chat/completions"
            async with http.stream("POST", url, json=STREAM_BODY) as response:
                reader = aiter_body(response, watched=True)
                # No timeout of its own: the caller's deadline (a cancel scope) cuts the wait.
                with anyio.move_on_after(0.2) as scope:
                    async for _ in reader:
                        pass
                assert scope.cancelled_caught


@pytest.mark.anyio
async def test_a_watched_reader_cut_short_is_httpx_remote_protocol_error() -> None:
    fake = FakeVLLM(ANSWER)
    fake.add_fault(Fault.disconnect(after_chunks=3))
    with fake.serve() as running:
        async with httpx.AsyncClient() as http:
            url = f"{running.base_url}/chat/completions"
            async with http.stream("POST", url, json=STREAM_BODY) as response:
                with pytest.raises(httpx.RemoteProtocolError):
                    async for _ in aiter_body(response, watched=True):
                        pass


def test_importing_llmstream_imports_no_more_than_httpx_does() -> None:
    # httpx from 0.28 imports httpcore (and h11, and trio when installed) only when a
    # client is made (0.27 at once); the fast path loads them, and decides whether it is
    # on, on first use, so `import llmstream` costs no more than `import httpx`.
    code = (
        "import sys; heavy = {'httpcore', 'h11', 'trio'}\n"
        "import httpx; before = heavy & set(sys.modules)\n"
        "import llmstream, llmstream._fastpath as fp\n"
        "print(sorted(heavy & set(sys.modules) - before), fp._decided)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=_env()
    )
    assert out.stdout.strip() == "[] False"


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parent.parent / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def test_a_transport_of_its_own_does_not_import_httpcore() -> None:
    # Only httpx's own transport reads through httpcore; importing it for the emulator's
    # first body read put ~70 ms on `llmstream chat --fake`'s first token. httpx before 0.28
    # imports httpcore (and with it h11 and trio) itself: only what llmstream adds counts.
    code = (
        "import sys, httpx\n"
        "before = set(sys.modules)\n"
        "import llmstream\n"
        "from llmstream.testing import FakeVLLM\n"
        "client = llmstream.Client('http://vllm/v1', transport=FakeVLLM('Hi there').transport())\n"
        "with client, client.stream('Hi') as stream:\n"
        "    text = ''.join(stream)\n"
        "print(text, sorted({'httpcore', 'h11', 'trio'} & (set(sys.modules) - before)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=_env()
    )
    assert out.stdout.strip() == "Hi there []"
