"""The emulator's behaviour, with no I/O: a request in, a list of actions out.

:func:`respond` turns one HTTP request (plus the emulator's :class:`Config` and the fault
queued for it) into a lazy sequence of :data:`Action`: send the status line and headers,
send bytes, wait, hang, cut the connection. The httpx transports and the socket server
only execute these actions, so every protocol rule lives here once.

>>> req = HttpRequest("GET", "/health", {}, b"")
>>> [type(a).__name__ for a in respond(req, Config(), None, ids_seed="x")]
['Head', 'Send']
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass

from ._config import Config, Fault
from ._tokenize import count_prompt_tokens, message_text, split_text
from ._validate import Invalid, check_request, check_sampling
from ._wire import (
    DONE_EVENT,
    KEEP_ALIVE,
    ChunkIds,
    completion_body,
    content_chunk,
    dumps,
    encode_event,
    error_body,
    error_event,
    finish_chunk,
    model_list,
    role_chunk,
    usage_chunk,
    usage_info,
)

__all__ = [
    "CHAT_PATH",
    "Action",
    "Admit",
    "Cut",
    "Hang",
    "Head",
    "HttpRequest",
    "Refuse",
    "Send",
    "Wait",
    "is_chat_request",
    "respond",
]

CHAT_PATH = "/v1/chat/completions"
JSON = dict[str, object]

_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
# vLLM's ErrorResponse "type" per status, for faults that ask for a default body.
_ERROR_TYPES = {
    400: ("BadRequestError", "Bad request."),
    401: ("Unauthorized", "Unauthorized"),
    404: ("NotFoundError", "Not found."),
    429: ("TooManyRequests", "Too many requests."),
    500: ("InternalServerError", "The server had an error while processing your request."),
    501: ("NotImplementedError", "Not implemented."),
    503: (
        "Service Unavailable",
        "The engine is currently busy and cannot accept new requests. "
        "Please try again later or on a different instance.",
    ),
}


def reason_phrase(status: int) -> str:
    """The reason phrase for a status line.

    >>> reason_phrase(404)
    'Not Found'
    """
    return _REASONS.get(status, "OK" if status < 300 else "Error")


@dataclass(frozen=True)
class HttpRequest:
    """A request as the shells hand it over: header names lower-case, body complete.

    >>> HttpRequest("POST", "/v1/chat/completions", {"content-type": "application/json"}, b"{}")
    ... # doctest: +ELLIPSIS
    HttpRequest(method='POST', ...)
    """

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class Head:
    """Send the status line and headers. ``chunked``: body is chunked, one chunk per send.

    >>> Head(200, (("content-type", "text/plain"),), chunked=False).status
    200
    """

    status: int
    headers: tuple[tuple[str, str], ...]
    chunked: bool


@dataclass(frozen=True)
class Send:
    """Write ``data`` (one HTTP chunk when chunked). ``event``: a ``data:`` event to count.

    >>> Send(b": keep-alive\\n\\n", event=False).event
    False
    """

    data: bytes
    event: bool = True


@dataclass(frozen=True)
class Wait:
    """Send nothing for ``seconds``; the client may leave meanwhile.

    >>> Wait(0.5).seconds
    0.5
    """

    seconds: float


@dataclass(frozen=True)
class Hang:
    """Send nothing until the client leaves.

    >>> Hang()
    Hang()
    """


@dataclass(frozen=True)
class Cut:
    """Close the connection now, without ending the body properly.

    >>> Cut()
    Cut()
    """


@dataclass(frozen=True)
class Refuse:
    """Close the connection without sending any response byte.

    >>> Refuse()
    Refuse()
    """


@dataclass(frozen=True)
class Admit:
    """The engine takes a chat request: what it will cost, and how it will finish.

    A marker, not an action for the shells: :class:`~llmstream.testing.FakeVLLM` consumes
    it (queueing the request behind ``max_num_seqs`` and counting it in ``/metrics``) and
    never passes it on. ``finish_reason`` is vLLM's engine-side reason (``stop``,
    ``length`` or ``error``), which ``vllm:request_success_total`` is labelled with.

    >>> Admit(prompt_tokens=12, completion_tokens=5, finish_reason="stop").finish_reason
    'stop'
    """

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


Action = Head | Send | Wait | Hang | Cut | Refuse | Admit


def is_chat_request(method: str, path: str) -> bool:
    """Whether a request is a chat completion (the only kind faults apply to).

    >>> is_chat_request("POST", "/v1/chat/completions")
    True
    """
    return method == "POST" and path == CHAT_PATH


def _json_response(
    status: int, body: object, extra: Sequence[tuple[str, str]] = ()
) -> list[Action]:
    data = dumps(body)
    headers = (
        ("content-length", str(len(data))),
        ("content-type", "application/json"),
        *extra,
    )
    return [Head(status, headers, chunked=False), Send(data, event=False)]


def _error(status: int, message: str, type: str, param: str | None = None) -> list[Action]:
    return _json_response(status, error_body(message, type, status, param))


def _invalid(invalid: Invalid) -> list[Action]:
    return _error(invalid.code, invalid.message, invalid.type, invalid.param)


def _validation_error(detail: str, param: str | None) -> list[Action]:
    return _error(400, f"1 validation error:\n  {detail}", "Bad Request", param)


def respond(
    request: HttpRequest, config: Config, fault: Fault | None, *, ids_seed: str | None = None
) -> Iterator[Action]:
    """The actions answering ``request``; ``fault`` is the fault queued for it, if any.

    ``ids_seed`` fixes the random parts of ids (for reproducible output).

    >>> req = HttpRequest("GET", "/v1/models", {}, b"")
    >>> head = next(respond(req, Config(), None))
    >>> head.status
    200
    """
    if fault is not None and fault.kind == "disconnect_before_headers":
        return iter([Refuse()])
    if fault is not None and fault.kind == "disconnect_mid_headers":
        return iter([Send(b"HTTP/1.1 200 OK\r\ncontent-type: text/ev", event=False), Refuse()])
    if fault is not None and fault.kind == "http_status":
        return iter(_fault_response(fault))
    guarded = config.api_key is not None and request.path.startswith(("/v1/", "/v2/"))
    if guarded and request.headers.get("authorization") != f"Bearer {config.api_key}":
        return iter(_json_response(401, {"error": "Unauthorized"}))
    route = (request.method, request.path)
    if route == ("GET", "/health"):
        # vLLM answers 503 with an empty body once its engine is dead.
        status = 200 if config.healthy else 503
        head = Head(status, (("content-length", "0"),), chunked=False)
        return iter([head, Send(b"", event=False)])
    if route == ("GET", "/v1/models"):
        now = int(time.time())
        perm = f"modelperm-{_hex(ids_seed, 'perm')}"
        return iter(_json_response(200, model_list(config.model, config.max_model_len, now, perm)))
    if route == ("POST", "/tokenize"):
        return iter(_tokenize(request, config))
    if route == ("POST", CHAT_PATH):
        return _chat(request, config, fault, ids_seed)
    known = {"/health": "GET", "/v1/models": "GET", "/tokenize": "POST", CHAT_PATH: "POST"}
    if request.path in known:
        return iter(_json_response(405, {"detail": "Method Not Allowed"}))
    return iter(_json_response(404, {"detail": "Not Found"}))


def _hex(seed: str | None, salt: str) -> str:
    if seed is None:
        return secrets.token_hex(8)
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{seed}/{salt}").hex[:16]


def _fault_response(fault: Fault) -> list[Action]:
    extra = list(fault.headers)
    names = {k for k, _ in extra}
    if isinstance(fault.body, str):
        data = fault.body.encode()
        if "content-type" not in names:
            extra.append(("content-type", "text/plain; charset=utf-8"))
    else:
        body = fault.body
        if body is None:
            type_, message = _ERROR_TYPES.get(
                fault.status, (reason_phrase(fault.status), reason_phrase(fault.status))
            )
            body = error_body(message, type_, fault.status)
        data = dumps(body)
        if "content-type" not in names:
            extra.append(("content-type", "application/json"))
    headers = (("content-length", str(len(data))), *extra)
    return [Head(fault.status, headers, chunked=False), Send(data, event=False)]


def _parse_json(request: HttpRequest) -> tuple[object, list[Action] | None]:
    content_type = request.headers.get("content-type", "")
    if "application/json" not in content_type.lower():
        detail = "Unsupported Media Type: Only 'application/json' is allowed"
        return None, _validation_error(detail, None)
    try:
        return json.loads(request.body or b"null"), None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        pos = exc.pos if isinstance(exc, json.JSONDecodeError) else 0
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "Invalid UTF-8"
        detail = (
            f"{{'type': 'json_invalid', 'loc': 'body.{pos}', 'msg': 'JSON decode error', "
            f"'input': '<dict of 0 items>', 'ctx': {{'error': '{msg}'}}}}"
        )
        return None, _validation_error(detail, f"body.{pos}")


def _tokenize(request: HttpRequest, config: Config) -> list[Action]:
    body, error = _parse_json(request)
    if error is not None:
        return error
    if not isinstance(body, dict):
        return _validation_error("Input should be a valid dictionary", "body")
    messages = body.get("messages")
    if isinstance(messages, list):
        count = config.prompt_tokens or count_prompt_tokens(messages)
    elif isinstance(body.get("prompt"), str):
        count = len(split_text(str(body["prompt"])))
    else:
        return _validation_error("Either `messages` or `prompt` is required", "body")
    model = body.get("model")
    if model is not None and model != config.model:
        return _model_not_found(str(model), config)
    result = {
        "count": count,
        "max_model_len": config.max_model_len,
        "tokens": list(range(1, count + 1)),
        "token_strs": None,
    }
    return _json_response(200, result)


def _model_not_found(model: str, config: Config) -> list[Action]:
    message = f"The model `{model}` does not exist. Valid aliases: {config.model}."
    return _error(404, message, "NotFoundError", "model")


@dataclass(frozen=True)
class _Token:
    # delta None: the token yields no event (think tags, tool-call markup), like vLLM's
    # parsers holding text back; it still counts in usage.
    delta: JSON | None
    reasoning: bool = False


@dataclass(frozen=True)
class _Plan:
    steps: list[_Token]
    finish_reason: str
    final_delta: JSON
    content: str
    reasoning: str | None
    tool_calls: list[JSON]


def _continue_after(pieces: list[str], written: str) -> list[str]:
    """The pieces that continue ``written`` (continue_final_message), as a model would.

    When ``written`` is a prefix of the scripted answer, the answer goes on from there
    (mid-piece too); otherwise the scripted answer follows whatever was written.
    """
    answer = "".join(pieces)
    if not answer.startswith(written):
        return pieces
    done = 0
    for i, piece in enumerate(pieces):
        if done + len(piece) > len(written):
            head = written[done:]
            return [piece[len(head) :], *pieces[i + 1 :]] if head else pieces[i:]
        done += len(piece)
    return []


def _plan(
    config: Config,
    answer: str | None,
    cap: int,
    ids_seed: str | None,
    continuing: str | None = None,
) -> _Plan:
    tokens: list[_Token] = []
    if config.reasoning and continuing is None:
        tokens.append(_Token(None))
        tokens += [_Token({"reasoning": p}, True) for p in split_text(config.reasoning)]
        tokens.append(_Token(None))
    pieces = list(config.tokens) if config.tokens is not None else split_text(answer or "")
    if continuing is not None:
        pieces = _continue_after(pieces, continuing)
    tokens += [_Token({"content": p}) for p in pieces]
    calls: list[JSON] = []
    for k, call in enumerate(config.tool_calls):
        call_id = f"chatcmpl-tool-{_hex(ids_seed, f'tool{k}')}"
        opening = split_text(f'{{"name": "{call.name}", "arguments":')
        tokens += [_Token(None), _Token(None)]  # "<tool_call>", "\n"
        tokens += [_Token(None) for _ in opening[:-1]]
        head = {"id": call_id, "type": "function", "index": k, "function": {"name": call.name}}
        tokens.append(_Token({"content": None, "tool_calls": [head]}))
        for frag in split_text(call.arguments):
            entry = {"index": k, "function": {"arguments": frag}}
            tokens.append(_Token({"content": None, "tool_calls": [entry]}))
        # The call's closing brace rides on its last argument token (the parser holds it
        # back); "\n" and "</tool_call>" remain.
        tokens += [_Token(None), _Token(None)]
        calls.append(
            {
                "id": call_id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
        )
    tool_mode = bool(config.tool_calls)
    empty: JSON = {} if tool_mode else {"content": ""}
    if len(tokens) < cap:
        # The end-of-sequence token: not detokenized, but counted.
        steps = [*tokens, _Token(None)]
        finish = "tool_calls" if tool_mode else "stop"
        final = empty
    else:
        steps = tokens[:cap]
        finish = "length"
        final = steps[-1].delta or empty
        calls = []
    content = "".join(str(t.delta["content"]) for t in steps if t.delta and t.delta.get("content"))
    reasoning = "".join(
        str(t.delta["reasoning"]) for t in steps if t.delta and "reasoning" in t.delta
    )
    return _Plan(
        steps=steps,
        finish_reason=finish,
        final_delta=final,
        content=content,
        reasoning=reasoning if config.reasoning is not None else None,
        tool_calls=calls,
    )


def _chat(
    request: HttpRequest, config: Config, fault: Fault | None, ids_seed: str | None
) -> Iterator[Action]:
    raw, error = _parse_json(request)
    if error is not None:
        return iter(error)
    checked = check_request(raw)
    if isinstance(checked, Invalid):
        return iter(_invalid(checked))
    # From here on the body holds the values vLLM's request model read (coerced).
    body = checked
    messages = body["messages"]
    assert isinstance(messages, list)
    stream = body.get("stream") is True
    add_generation_prompt = body.get("add_generation_prompt", True) is not False
    model = body.get("model")
    if model is not None and model != config.model:
        return iter(_model_not_found(str(model), config))
    cap_param = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    requested = body.get(cap_param)
    assert requested is None or isinstance(requested, int)
    if requested is not None and requested > config.max_model_len:
        message = (
            f"{cap_param}={requested} cannot be greater than max_model_len="
            f"{config.max_model_len}. Please request fewer output tokens. "
            f"(parameter={cap_param}, value={requested})"
        )
        return iter(_error(400, message, "BadRequestError", cap_param))
    prompt_tokens = config.prompt_tokens or count_prompt_tokens(messages)
    if prompt_tokens > config.max_model_len:
        message = (
            f"This model's maximum context length is {config.max_model_len} tokens. However, "
            f"your prompt contains {prompt_tokens} input tokens, which exceeds this limit even "
            "without any output tokens. Please reduce the length of the input prompt. "
            f"(parameter=input_tokens, value={prompt_tokens})"
        )
        return iter(_error(400, message, "BadRequestError", "input_tokens"))
    cap = config.max_model_len - prompt_tokens
    if requested is not None:
        cap = min(cap, requested)
    invalid = check_sampling(body, cap)
    if invalid is not None:
        return iter(_invalid(invalid))
    answer = config.text
    if answer is None and not config.tool_calls:
        users = [m for m in messages if isinstance(m, Mapping) and m.get("role") == "user"]
        answer = message_text(users[-1]) if users else ""
    role = "assistant"
    continuing: str | None = None
    if not add_generation_prompt and messages and isinstance(messages[-1], Mapping):
        role = str(messages[-1].get("role", "assistant"))
        written = messages[-1].get("content")
        if body.get("continue_final_message") is True and isinstance(written, str):
            continuing = written
    plan = _plan(config, answer, cap, ids_seed, continuing)
    n = body.get("n")
    n = n if isinstance(n, int) else 1
    request_id = request.headers.get("x-request-id")
    base_id = request_id or (
        str(body["request_id"]) if body.get("request_id") else _hex(ids_seed, "id")
    )
    ids = ChunkIds(f"chatcmpl-{base_id}", int(time.time()), config.model, config.system_fingerprint)
    extra: list[tuple[str, str]] = []
    if config.request_id_headers:
        extra.append(("x-request-id", request_id or _hex(ids_seed, "rid") + _hex(ids_seed, "r2")))
    # The engine sees tool-call finishes as plain stops; an in-band error is its "error".
    engine_reason = "length" if plan.finish_reason == "length" else "stop"
    if fault is not None and fault.kind == "inband_error":
        engine_reason = "error"
    admit = Admit(prompt_tokens, len(plan.steps) * n, engine_reason)
    if not stream:
        return _non_streaming(config, plan, ids, prompt_tokens, n, role, fault, extra, admit)
    options = body.get("stream_options")
    include_usage = isinstance(options, Mapping) and options.get("include_usage") is True
    continuous = (
        include_usage
        and isinstance(options, Mapping)
        and (options.get("continuous_usage_stats") is True)
    )
    events = _stream_events(config, plan, ids, prompt_tokens, n, role, include_usage, continuous)
    return _streaming(config, events, fault, extra, admit)


def _stream_events(
    config: Config,
    plan: _Plan,
    ids: ChunkIds,
    prompt_tokens: int,
    n: int,
    role: str,
    include_usage: bool,
    continuous: bool,
) -> list[tuple[float, bytes]]:
    """The events of a normal stream, each with the delay before it."""
    parser = config.reasoning is not None

    def usage(done: int, reasoning: int) -> JSON | None:
        if not continuous:
            return None
        return usage_info(
            prompt_tokens, done, reasoning=reasoning if parser else None, per_chunk=True
        )

    events: list[tuple[float, bytes]] = []
    pending = config.ttft
    for index in range(n):
        chunk = role_chunk(ids, index, role, usage(0, 0))
        events.append((pending, encode_event(chunk)))
        pending = 0.0
    reasoning_done = 0
    last = len(plan.steps) - 1
    for position, token in enumerate(plan.steps):
        if position > 0:
            pending += config.token_delay
        reasoning_done += token.reasoning
        for index in range(n):
            chunk_usage = usage(position + 1, reasoning_done)
            if position == last:
                chunk = finish_chunk(
                    ids,
                    index,
                    plan.final_delta,
                    plan.finish_reason,
                    usage=chunk_usage,
                    with_fingerprint=not include_usage,
                )
            elif token.delta is not None:
                chunk = content_chunk(ids, index, token.delta, chunk_usage)
            else:
                continue
            events.append((pending, encode_event(chunk)))
            pending = 0.0
    if include_usage:
        total = len(plan.steps) * n
        reasoning_total = reasoning_done * n
        final = usage_info(
            prompt_tokens, total, reasoning=reasoning_total if parser else None, per_chunk=False
        )
        events.append((0.0, encode_event(usage_chunk(ids, final))))
    events.append((0.0, DONE_EVENT))
    return events


def _wait(
    seconds: float | None, keep_alive: float | None, idle: float
) -> Generator[Action, None, float]:
    """Wait ``seconds`` (None: forever), writing keep-alive comments when idle that long.

    ``idle`` is the time since the last write; the new value is returned.
    """
    if keep_alive is None or keep_alive <= 0:
        if seconds is None:
            yield Hang()
        elif seconds > 0:
            yield Wait(seconds)
        return 0.0
    remaining = float("inf") if seconds is None else seconds
    while remaining > 0:
        step = min(remaining, keep_alive - idle)
        yield Wait(step)
        remaining -= step
        idle += step
        if idle >= keep_alive - 1e-9:
            yield Send(KEEP_ALIVE, event=False)
            idle = 0.0
    return idle


def _streaming(
    config: Config,
    events: list[tuple[float, bytes]],
    fault: Fault | None,
    extra: list[tuple[str, str]],
    admit: Admit,
) -> Iterator[Action]:
    headers = (
        ("content-type", "text/event-stream; charset=utf-8"),
        ("transfer-encoding", "chunked"),
        *extra,
    )
    # The engine gets the request as the headers go out; one queued waits after them.
    yield admit
    yield Head(200, headers, chunked=True)
    kind = fault.kind if fault is not None else None
    at = fault.after_chunks if fault is not None else -1
    if kind == "no_done":
        events = events[:-1]
    if kind == "inband_error":
        # The error replaces whatever was left, but [DONE] still closes the stream.
        at = min(at, len(events) - 1)
    keep_alive = config.keep_alive
    sent = 0
    idle = 0.0
    for delay, data in [*events, (0.0, b"")]:
        if fault is not None and sent == at:
            if kind == "disconnect":
                yield Cut()
                return
            if kind == "truncate":
                return
            if kind == "stall":
                idle = yield from _wait(fault.seconds, keep_alive, idle)
            if kind == "malformed_chunk":
                yield Send(b"data: " + fault.data.encode() + b"\n\n")
                sent += 1
                idle = 0.0
            if kind == "inband_error":
                yield Send(error_event(fault.message, fault.type, fault.code))
                yield Send(DONE_EVENT)
                return
        if not data:
            return
        yield from _wait(delay, keep_alive, idle)
        yield Send(data)
        sent += 1
        idle = 0.0


def _non_streaming(
    config: Config,
    plan: _Plan,
    ids: ChunkIds,
    prompt_tokens: int,
    n: int,
    role: str,
    fault: Fault | None,
    extra: list[tuple[str, str]],
    admit: Admit,
) -> Iterator[Action]:
    yield admit
    message: JSON = {
        "role": role,
        "content": plan.content if plan.content or not plan.tool_calls else None,
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
    }
    if plan.tool_calls:
        message["tool_calls"] = plan.tool_calls
    message["reasoning"] = plan.reasoning or None
    choices: list[JSON] = [
        {
            "index": index,
            "message": message,
            "logprobs": None,
            "finish_reason": plan.finish_reason,
            "stop_reason": None,
            "token_ids": None,
            "routed_experts": None,
            "weight_versions": None,
        }
        for index in range(n)
    ]
    reasoning_tokens = sum(t.reasoning for t in plan.steps) * n
    completion = len(plan.steps) * n
    usage: JSON = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None,
        "completion_tokens_details": (
            {"reasoning_tokens": reasoning_tokens} if config.reasoning is not None else None
        ),
    }
    data = dumps(completion_body(ids, choices, usage))
    delay = config.ttft + config.token_delay * (len(plan.steps) - 1)
    kind = fault.kind if fault is not None else None
    if kind == "stall":
        assert fault is not None
        yield from _wait(fault.seconds, None, 0.0)
    yield from _wait(delay, None, 0.0)
    headers = (("content-length", str(len(data))), ("content-type", "application/json"), *extra)
    yield Head(200, headers, chunked=False)
    if kind == "disconnect":
        yield Cut()
        return
    yield Send(data)
