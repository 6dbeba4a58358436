"""Non-2xx answers, wrong content types and unreachable servers, on both clients."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import respx

import llmstream

from .conftest import DATA

ERRORS: dict[str, dict[str, Any]] = json.loads((DATA / "vllm" / "http_errors.json").read_text())
CASES = [
    (f"{group}/{name}", case) for group, cases in ERRORS.items() for name, case in cases.items()
]

URL = "http://vllm.test/v1"

EXPECTED_CLASS = {
    400: llmstream.BadRequestError,
    401: llmstream.AuthenticationError,
    404: llmstream.NotFoundError,
    422: llmstream.UnprocessableEntityError,
    429: llmstream.RateLimitError,
    500: llmstream.InternalServerError,
    502: llmstream.InternalServerError,
    503: llmstream.InternalServerError,
}


def _response(case: dict[str, Any]) -> httpx.Response:
    headers = dict(case.get("headers", {}))
    if "body_text" in case:
        headers.setdefault("content-type", "text/plain")
        return httpx.Response(case["status"], headers=headers, text=case["body_text"])
    return httpx.Response(case["status"], headers=headers, json=case["body"])


def _said(case: dict[str, Any]) -> str:
    """What the error message must quote from the body."""
    if "body_text" in case:
        text: str = case["body_text"]
        return "502 Bad Gateway" if text.startswith("<html>") else text
    body = case["body"]
    if "detail" in body:
        return "body.messages: Field required"
    error = body["error"]
    return error if isinstance(error, str) else error["message"]


# Retries are off here: these tests are about the error each answer becomes.
def _run_sync(retry: llmstream.RetryPolicy | int = 0) -> None:
    with llmstream.Client(URL, model="m", retry=retry) as client, client.stream("Hi") as stream:
        list(stream)


async def _run_async() -> None:
    client = llmstream.AsyncClient(URL, model="m", retry=0)
    async with client, client.stream("Hi") as stream:
        async for _ in stream:
            pass


@pytest.mark.parametrize(("name", "case"), CASES, ids=[n for n, _ in CASES])
@respx.mock
def test_status_error_sync(name: str, case: dict[str, Any]) -> None:
    respx.post(f"{URL}/chat/completions").mock(return_value=_response(case))
    with pytest.raises(llmstream.APIStatusError) as info:
        _run_sync()
    _check(info.value, case)


@pytest.mark.anyio
@pytest.mark.parametrize(("name", "case"), CASES, ids=[n for n, _ in CASES])
async def test_status_error_async(name: str, case: dict[str, Any]) -> None:
    with respx.mock:
        respx.post(f"{URL}/chat/completions").mock(return_value=_response(case))
        with pytest.raises(llmstream.APIStatusError) as info:
            await _run_async()
    _check(info.value, case)


def _check(exc: llmstream.APIStatusError, case: dict[str, Any]) -> None:
    assert type(exc) is EXPECTED_CLASS[case["status"]]
    assert exc.status_code == case["status"]
    assert _said(case) in str(exc)
    assert str(case["status"]) in str(exc)
    if "body" in case and isinstance(case["body"].get("error"), dict):
        assert exc.error_type == case["body"]["error"]["type"]
        assert exc.error_code == case["body"]["error"]["code"]
    for key, value in case.get("headers", {}).items():
        assert exc.headers[key] == value


def _not_sse() -> httpx.Response:
    return httpx.Response(200, json={"id": "x", "choices": []})


@respx.mock
def test_200_that_is_not_an_event_stream_is_a_protocol_error_sync() -> None:
    respx.post(f"{URL}/chat/completions").mock(return_value=_not_sse())
    with pytest.raises(llmstream.ProtocolError, match="not text/event-stream"):
        _run_sync()


@pytest.mark.anyio
async def test_200_that_is_not_an_event_stream_is_a_protocol_error_async() -> None:
    with respx.mock:
        respx.post(f"{URL}/chat/completions").mock(return_value=_not_sse())
        with pytest.raises(llmstream.ProtocolError, match="not text/event-stream"):
            await _run_async()


@respx.mock
def test_html_200_is_a_protocol_error() -> None:
    respx.post(f"{URL}/chat/completions").mock(
        return_value=httpx.Response(200, html="<html><body>login</body></html>")
    )
    with pytest.raises(llmstream.ProtocolError, match="text/html"):
        _run_sync()


RAISERS: list[Exception] = [
    httpx.ConnectError("refused"),
    httpx.ConnectTimeout("slow"),
    httpx.RemoteProtocolError("closed before headers"),
]


@pytest.mark.parametrize("make", RAISERS, ids=["connect", "connect-timeout", "closed"])
@respx.mock
def test_transport_failures_before_the_response_are_typed_sync(
    make: Exception,
) -> None:
    respx.post(f"{URL}/chat/completions").mock(side_effect=make)
    with pytest.raises(llmstream.APIConnectionError) as info:
        _run_sync()
    assert not isinstance(info.value, httpx.HTTPError)
    assert URL in str(info.value)


@pytest.mark.anyio
@pytest.mark.parametrize("make", RAISERS, ids=["connect", "connect-timeout", "closed"])
async def test_transport_failures_before_the_response_are_typed_async(
    make: Exception,
) -> None:
    with respx.mock:
        respx.post(f"{URL}/chat/completions").mock(side_effect=make)
        with pytest.raises(llmstream.APIConnectionError):
            await _run_async()


def test_connection_refused_on_a_real_port() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on the port now.
    with pytest.raises(llmstream.APIConnectionError, match="Is the server running"):
        with llmstream.Client(f"http://127.0.0.1:{port}/v1", model="m") as client:
            with client.stream("Hi") as stream:
                list(stream)


@respx.mock
def test_no_response_headers_in_time_is_a_first_token_timeout() -> None:
    route = respx.post(f"{URL}/chat/completions").mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(llmstream.FirstTokenTimeout):
        _run_sync(llmstream.RetryPolicy(initial_backoff=0.001))
    assert route.call_count == 3  # retried twice, as timeouts before the first token are


@respx.mock
def test_connect_timeout_is_its_own_type() -> None:
    respx.post(f"{URL}/chat/completions").mock(side_effect=httpx.ConnectTimeout("slow"))
    with pytest.raises(llmstream.ConnectTimeout) as info:
        _run_sync()
    assert isinstance(info.value, llmstream.APITimeoutError)
