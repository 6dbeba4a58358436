"""Non-2xx answers, wrong content types and unreachable servers, on both clients."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
import respx

import llmstream
from llmstream._config import EnvProxy
from llmstream._http_errors import connection_error, not_json_error, status_error

from .conftest import DATA
from .drivers import SOCKET_MODES, collect, no_raw_httpx

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


@pytest.mark.anyio
@pytest.mark.parametrize("mode", SOCKET_MODES)
async def test_connection_refused_on_a_real_port(mode: str) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on the port now.
    url = f"http://127.0.0.1:{port}/v1"
    outcome = await collect(mode, base_url=url, client_kwargs={"model": "m", "retry": 0})
    assert isinstance(outcome.error, llmstream.APIConnectionError)
    assert "Is the server running" in str(outcome.error) and url in str(outcome.error)
    assert no_raw_httpx(outcome.error)


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


# -- the request in the message, and advice that follows from its URL ----------------------

NOT_FOUND = b'{"detail":"Not Found"}'


def test_status_error_names_the_method_and_url() -> None:
    url = "http://gpu-1:8000/v1/chat/completions"
    exc = status_error(503, "Service Unavailable", {}, b"busy", method="POST", url=url)
    assert str(exc).startswith(f"POST {url}: HTTP 503 Service Unavailable: busy.")
    assert (exc.method, exc.url) == ("POST", url)


def test_status_error_without_the_request_reads_as_before() -> None:
    exc = status_error(404, "Not Found", {}, NOT_FOUND)
    assert str(exc).startswith("HTTP 404 Not Found: Not Found.")
    assert (exc.method, exc.url) == (None, None)


@pytest.mark.parametrize(
    ("url", "suggested"),
    [
        ("http://h:8000/chat/completions", "http://h:8000/v1"),
        ("http://h:8000/models", "http://h:8000/v1"),
        ("https://h/openai/chat/completions", "https://h/openai/v1"),
        ("http://h:8000/v1/chat/chat/completions", "http://h:8000/v1"),
    ],
)
def test_404_for_a_base_url_without_v1_suggests_one(url: str, suggested: str) -> None:
    exc = status_error(404, "Not Found", {}, NOT_FOUND, method="POST", url=url)
    assert str(exc).endswith(f"Check the base URL: it usually ends in /v1; try {suggested}")


def test_404_for_a_base_url_with_v1_is_about_the_model() -> None:
    url = "http://h:8000/v1/chat/completions"
    body = b'{"error": {"message": "The model `x` does not exist.", "code": 404}}'
    exc = status_error(404, "Not Found", {}, body, method="POST", url=url)
    assert "The model `x` does not exist." in str(exc)
    assert "Check the model name (GET /models lists them) and the base URL." in str(exc)
    assert "try" not in str(exc)


def test_404_for_the_model_list_under_v1_is_about_the_host_and_port() -> None:
    url = "http://h:8888/v1/models"
    exc = status_error(404, "Not Found", {"content-type": "text/html"}, b"<h1>404</h1>", url=url)
    assert "No OpenAI-compatible server answers at this base URL" in str(exc)
    assert "model name" not in str(exc)


@pytest.mark.parametrize("status", [404, 405])
def test_no_tokenize_endpoint_says_how_to_count_instead(status: int) -> None:
    exc = status_error(status, "", {}, NOT_FOUND, method="POST", url="http://h:8080/tokenize")
    assert "The server has no tokenize endpoint" in str(exc)
    assert 'count_prompt="estimate"' in str(exc)


def test_not_json_quotes_an_html_title() -> None:
    page = b"<html><head><title>Grafana</title></head><body>...</body></html>"
    exc = not_json_error("GET", "http://h:3000/v1/models", 200, "text/html", page)
    assert "the server at http://h:3000 does not speak the OpenAI API" in str(exc)
    assert "it answered text/html ('Grafana')" in str(exc)


def test_not_json_says_when_the_body_was_empty() -> None:
    exc = not_json_error("GET", "http://h:3000/v1/models", 204, "", b"")
    assert "it answered 204 with an empty body" in str(exc)


def test_a_connect_error_through_a_proxy_names_the_proxy() -> None:
    proxy = EnvProxy("http://proxy:3128", "https_proxy")
    exc = connection_error(httpx.ConnectError("refused"), "https://h/v1/models", proxy=proxy)
    assert isinstance(exc, llmstream.APIConnectionError)
    assert "Could not reach the proxy http://proxy:3128 (from https_proxy)" in str(exc)


def test_a_connect_timeout_through_a_proxy_is_still_a_connect_timeout() -> None:
    proxy = EnvProxy("http://proxy:3128", "HTTP_PROXY")
    exc = connection_error(httpx.ConnectTimeout("slow"), "http://h/v1", 2.0, proxy=proxy)
    assert isinstance(exc, llmstream.ConnectTimeout)
    assert "proxy http://proxy:3128 (from HTTP_PROXY) within connect=2 s" in str(exc)


def test_a_proxy_that_refuses_the_tunnel_is_named() -> None:
    proxy = EnvProxy("http://proxy:3128", "HTTPS_PROXY")
    error = httpx.ProxyError("403 Forbidden")
    exc = connection_error(error, "https://h/v1/models", proxy=proxy)
    assert "The proxy http://proxy:3128 (from HTTPS_PROXY) would not forward" in str(exc)
    assert "403 Forbidden" in str(exc)


@pytest.mark.parametrize(
    "said",
    [
        "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)",
        "[SSL: RECORD_LAYER_FAILURE] record layer failure (_ssl.c:1029)",
    ],
)
def test_tls_to_a_plain_http_port_says_use_http(said: str) -> None:
    exc = connection_error(httpx.ConnectError(said), "https://h:8000/v1/chat/completions")
    assert "The server speaks plain HTTP: use http:// (http://h:8000/v1)" in str(exc)


def test_other_tls_failures_get_no_plain_http_hint() -> None:
    said = "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"
    exc = connection_error(httpx.ConnectError(said), "https://h:8000/v1/models")
    assert "plain HTTP" not in str(exc)


# JSON nested past Python's recursion limit: a broken or hostile server's answer must fail
# as malformed JSON does (an LLMStreamError), never as a RecursionError.
_DEEP = "[" * 100_000 + "]" * 100_000


def _deep_answers() -> None:
    respx.get(f"{URL}/models").mock(
        return_value=httpx.Response(200, text=_DEEP, headers={"content-type": "application/json"})
    )
    respx.post(f"{URL}/chat/completions").mock(
        return_value=httpx.Response(400, text=_DEEP, headers={"content-type": "application/json"})
    )


@respx.mock
def test_json_nested_too_deeply_is_an_error_of_the_answer_sync() -> None:
    _deep_answers()
    with llmstream.Client(URL, retry=0) as client:
        with pytest.raises(llmstream.ProtocolError, match="does not speak the OpenAI API"):
            client.models()
        with pytest.raises(llmstream.BadRequestError, match=r"HTTP 400 Bad Request: \[\[\["):
            with client.stream("Hi", model="m") as stream:
                list(stream)


@pytest.mark.anyio
async def test_json_nested_too_deeply_is_an_error_of_the_answer_async() -> None:
    with respx.mock:
        _deep_answers()
        async with llmstream.AsyncClient(URL, retry=0) as client:
            with pytest.raises(llmstream.ProtocolError, match="does not speak the OpenAI API"):
                await client.models()
            with pytest.raises(llmstream.BadRequestError, match=r"HTTP 400 Bad Request: \[\[\["):
                await client.stream("Hi", model="m").final_result()


def test_an_error_event_nested_too_deeply_is_a_server_stream_error() -> None:
    body = f"event: error\ndata: {_DEEP}\n\n".encode()
    with respx.mock:
        respx.post(f"{URL}/chat/completions").mock(
            return_value=httpx.Response(
                200, content=body, headers={"content-type": "text/event-stream"}
            )
        )
        with pytest.raises(llmstream.ServerStreamError):
            _run_sync()


def test_tool_arguments_nested_too_deeply_are_a_tool_arguments_error() -> None:
    call = llmstream.ToolCall(id="c", function=llmstream.FunctionCall(name="f", arguments=_DEEP))
    with pytest.raises(llmstream.ToolArgumentsError, match="not valid JSON"):
        call.function.parsed()


_CHAT = "http://gw.test/v1/chat/completions"


@pytest.mark.parametrize(
    ("location", "says"),
    [
        (
            "https://gpu-1.test/v1/chat/completions?token=s3cret#x",
            "redirects to https://gpu-1.test/v1/chat/completions; redirects are not followed "
            "(the request's body and API key would go on to it): "
            "try base_url='https://gpu-1.test/v1'.",
        ),
        ("/v1/chat/completions/", "the same base URL, so point base_url at the server behind"),
        ("https://user:pw@login.test/sso", "redirects to https://login.test/sso;"),
        ("", "Redirects are not followed; check the base URL."),
    ],
    ids=["to-https", "trailing-slash", "to-a-login-page", "no-location"],
)
def test_a_redirect_says_where_it_points_and_which_base_url_to_use(
    location: str, says: str
) -> None:
    headers = {"location": location} if location else {}
    exc = status_error(301, "Moved Permanently", headers, b"", method="POST", url=_CHAT)
    assert type(exc) is llmstream.APIStatusError and exc.status_code == 301
    assert says in str(exc)
    assert "s3cret" not in str(exc) and "pw" not in str(exc)  # a gateway's tokens stay out


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.anyio
async def test_a_redirected_stream_names_the_new_base_url(mode: str) -> None:
    moved = httpx.Response(308, headers={"location": "https://gpu-1.test/v1/chat/completions"})
    with respx.mock:
        respx.post(f"{URL}/chat/completions").mock(return_value=moved)
        with pytest.raises(
            llmstream.APIStatusError, match=re.escape("try base_url='https://gpu-1.test/v1'")
        ):
            if mode == "sync":
                _run_sync()
            else:
                await _run_async()
