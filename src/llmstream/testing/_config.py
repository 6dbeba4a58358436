"""Plain data shared by the emulator's parts: its settings, faults, and what it observed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Config", "Disconnect", "Fault", "RecordedRequest", "ToolCallSpec"]


@dataclass(frozen=True)
class ToolCallSpec:
    """One tool call the fake model makes.

    >>> ToolCallSpec("get_weather", '{"city": "Paris"}').name
    'get_weather'
    """

    name: str
    arguments: str


@dataclass(frozen=True)
class Config:
    """The settings of a :class:`~llmstream.testing.FakeVLLM`, frozen per request.

    >>> Config(text="Hi").max_model_len
    8192
    """

    text: str | None = None
    tokens: tuple[str, ...] | None = None
    model: str = "llmstream/fake-model"
    max_model_len: int = 8192
    ttft: float = 0.0
    token_delay: float = 0.0
    reasoning: str | None = None
    tool_calls: tuple[ToolCallSpec, ...] = ()
    api_key: str | None = None
    request_id_headers: bool = False
    keep_alive: float | None = None
    prompt_tokens: int | None = None
    system_fingerprint: str = "vllm-0.33.0-llmstrm0"
    healthy: bool = True


@dataclass(frozen=True)
class Fault:
    """One misbehaviour applied to one chat-completions request.

    Build faults with the class methods; queue them with ``FakeVLLM.add_fault``. Event
    counts (``after_chunks``) count every ``data:`` event: the role chunk is event 1, the
    first token event 2, and so on.

    >>> Fault.disconnect(after_chunks=3).after_chunks
    3
    """

    kind: str
    after_chunks: int = 0
    status: int = 0
    body: object = None
    headers: tuple[tuple[str, str], ...] = ()
    seconds: float | None = None
    code: int = 500
    message: str = ""
    type: str = ""
    data: str = ""

    @classmethod
    def http_status(
        cls,
        status: int,
        body: object | str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        retry_after: str | float | None = None,
    ) -> Fault:
        """Answer with ``status`` instead of streaming.

        ``body``: a dict (or list) is sent as JSON, a str as ``text/plain``, None as the
        JSON error vLLM sends for that status.

        >>> Fault.http_status(503, retry_after=2).headers
        (('retry-after', '2'),)
        """
        pairs = [(k.lower(), v) for k, v in (headers or {}).items()]
        if retry_after is not None:
            value = retry_after if isinstance(retry_after, str) else f"{retry_after:g}"
            pairs.append(("retry-after", value))
        return cls("http_status", status=status, body=body, headers=tuple(pairs))

    @classmethod
    def disconnect(cls, after_chunks: int = 0) -> Fault:
        """Close the connection abruptly after ``after_chunks`` events (0: after headers).

        >>> Fault.disconnect(2).kind
        'disconnect'
        """
        return cls("disconnect", after_chunks=after_chunks)

    @classmethod
    def disconnect_before_headers(cls) -> Fault:
        """Read the request, then close the connection without answering.

        >>> Fault.disconnect_before_headers().kind
        'disconnect_before_headers'
        """
        return cls("disconnect_before_headers")

    @classmethod
    def disconnect_mid_headers(cls) -> Fault:
        """Send half a status line and headers, then close the connection.

        >>> Fault.disconnect_mid_headers().kind
        'disconnect_mid_headers'
        """
        return cls("disconnect_mid_headers")

    @classmethod
    def inband_error(
        cls,
        after_chunks: int = 1,
        *,
        code: int = 500,
        message: str = "The server had an error while processing your request.",
        type: str = "InternalServerError",
    ) -> Fault:
        """After ``after_chunks`` events, send vLLM's in-stream error event, then ``[DONE]``.

        >>> Fault.inband_error(3, code=503).code
        503
        """
        return cls("inband_error", after_chunks=after_chunks, code=code, message=message, type=type)

    @classmethod
    def malformed_chunk(
        cls, after_chunks: int = 1, data: str = '{"id": "chatcmpl-broken", "choices": ['
    ) -> Fault:
        """Insert one ``data:`` event that is not valid JSON; the stream then goes on.

        >>> Fault.malformed_chunk(2).data
        '{"id": "chatcmpl-broken", "choices": ['
        """
        return cls("malformed_chunk", after_chunks=after_chunks, data=data)

    @classmethod
    def stall(cls, after_chunks: int = 0, seconds: float | None = None) -> Fault:
        """Stop sending after ``after_chunks`` events, forever (None) or for ``seconds``.

        >>> Fault.stall(1, seconds=0.5).seconds
        0.5
        """
        return cls("stall", after_chunks=after_chunks, seconds=seconds)

    @classmethod
    def no_done(cls) -> Fault:
        """Send the whole stream except the final ``data: [DONE]``.

        >>> Fault.no_done().kind
        'no_done'
        """
        return cls("no_done")

    @classmethod
    def truncate(cls, after_chunks: int) -> Fault:
        """End the body cleanly after ``after_chunks`` events: no finish chunk, no ``[DONE]``.

        >>> Fault.truncate(4).after_chunks
        4
        """
        return cls("truncate", after_chunks=after_chunks)


@dataclass(frozen=True)
class RecordedRequest:
    """One request the emulator received.

    ``json`` is the body parsed as a JSON object (``None`` for a request without
    one, such as a ``GET``), typed ``dict[str, Any]`` so a test can index into it.

    >>> RecordedRequest("GET", "/health", {}, None, 0.0).path
    '/health'
    >>> RecordedRequest("POST", "/v1/chat/completions", {}, {"n": 2}, 0.0).json["n"]
    2
    """

    method: str
    path: str
    headers: dict[str, str]
    json: dict[str, Any] | None
    time: float


@dataclass(frozen=True)
class Disconnect:
    """The client went away before its response was complete.

    ``request_index`` indexes ``FakeVLLM.requests``; ``time`` is ``time.perf_counter()``
    when the emulator noticed; ``chunks_sent`` counts the ``data:`` events written before.

    >>> Disconnect(0, 1.5, 3).chunks_sent
    3
    """

    request_index: int
    time: float
    chunks_sent: int
