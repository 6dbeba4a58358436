"""``AsyncClient`` and its sync twin ``Client``, over a shared ``_BaseClient``.

The base holds the configuration and builds requests (no I/O); the twins own
an httpx client and differ only in how they wait for the network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import weakref
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import NamedTuple, Protocol

import anyio
import httpx
import tenacity
from typing_extensions import Unpack

from ._accounting import BudgetOptions, PromptCounting
from ._aiohttp_transport import AiohttpTransport
from ._async_stream import AsyncChatStream
from ._asyncio_transport import AsyncioTransport
from ._budget import CallBudget
from ._call import Need, NeedContextLength, NeedModel, NeedPromptCount
from ._call_route import CallRoute
from ._config import (
    Secret,
    resolve_api_key,
    resolve_base_url,
    resolve_model,
    resolve_retry,
    resolve_timeout,
)
from ._counts import require_count
from ._deadlines import Timeouts
from ._errors import InvalidRequestError, LLMStreamError, ProtocolError
from ._events import endpoint_of
from ._fleet_config import Fleet
from ._fleet_state import EndpointLoad, EndpointState, FleetState
from ._fleet_watch import DISCOVER_WAIT, FleetWatcher
from ._flow import DEFAULT_BUFFER, DEFAULT_MAX_PAUSE, OnFull, StreamOptions
from ._hooks import Hook, check_hooks
from ._http_backend import async_transport, check_sync_transport
from ._http_errors import not_an_openai_answer, not_json_error, status_error
from ._httpx_transport import (
    HttpxAsyncTransport,
    HttpxSyncTransport,
    own_cuttable_sync_client,
    own_sync_client,
)
from ._json import loads as loads_json
from ._params import (
    BODY_PARAMS,
    StreamParams,
    check_budget_settings,
    check_params,
    require_flag,
)
from ._request import PromptOrMessages, build_body, build_messages
from ._result import StreamResult
from ._retry import RetryPolicy
from ._sse import DEFAULT_MAX_EVENT_BYTES, DEFAULT_MAX_LINE_BYTES
from ._sync_stream import ChatStream
from ._token_budget import TokenBudget
from ._tokenize import (
    parse_tokenize_max_model_len,
    parse_tokenize_response,
    tokenize_request_body,
)
from ._transport import AsyncResponse, HTTPRequest, SyncResponse
from ._version import __version__

# A JSON answer (GET /models, POST /tokenize) is never read past this.
_MAX_JSON_BYTES = 16 * 1024 * 1024

__all__ = ["AsyncClient", "Client"]


class _CallSpec(NamedTuple):
    """One call's request body and settings, as ``stream()`` was asked."""

    body: dict[str, object]
    options: StreamOptions
    timeouts: Timeouts
    retry: RetryPolicy
    budget: BudgetOptions
    headers: dict[str, str]
    hooks: tuple[Hook, ...]
    route: CallRoute | None


def _merge_headers(headers: dict[str, str], extra: Mapping[str, str]) -> None:
    """Per-call headers win, case-insensitively (an ``authorization`` replaces the client's)."""
    for name, value in extra.items():
        for existing in [k for k in headers if k.lower() == name.lower()]:
            del headers[existing]
        headers[name] = value


def _mapping(params: Mapping[str, object], name: str) -> Mapping[str, object]:
    value = params.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidRequestError(f"{name} must be a mapping, got {type(value).__name__}.")
    return value


def _header_map(params: Mapping[str, object], name: str) -> dict[str, str]:
    """``headers=`` or ``extra_headers=``, checked: a mapping of str names to str values.

    A header value may be a secret (an API key), so a message names its type only.
    """
    checked: dict[str, str] = {}
    for key, value in _mapping(params, name).items():
        if not isinstance(key, str):
            raise InvalidRequestError(
                f"{name} names must be str, got a name of type {type(key).__name__}: "
                'pass e.g. {"X-Request-ID": "abc"}.'
            )
        if not isinstance(value, str):
            raise InvalidRequestError(
                f"{name}[{key!r}] must be a str, got {type(value).__name__}: pass the value "
                "as text (str(number), or bytes.decode())."
            )
        checked[key] = value
    return checked


class _ClosableStream(Protocol):
    def _client_closed(self) -> None: ...


class _BaseClient:
    """Configuration and request building shared by both clients (no I/O)."""

    # How long a call waits in _route() for a discovered fleet's first lookup.
    _discover_wait = DISCOVER_WAIT

    def __init__(
        self,
        base_url: str | None,
        *,
        model: str | None,
        api_key: str | None,
        timeout: float | Timeouts | None,
        retry: RetryPolicy | int | tenacity.BaseRetrying | None,
        headers: Mapping[str, str] | None,
        include_usage: bool,
        max_line_bytes: int,
        max_event_bytes: int,
        options: StreamOptions,
        budget: BudgetOptions,
        hooks: Sequence[Hook] | None,
        fleet: Fleet | None = None,
    ) -> None:
        # Every argument is checked before anything is built (a fleet's watcher, say).
        checked_headers = _header_map({"headers": headers}, "headers")
        require_flag("include_usage", include_usage)
        require_count("max_line_bytes", max_line_bytes)
        require_count("max_event_bytes", max_event_bytes)
        self.options = options
        check_budget_settings(
            {
                "budget": budget.budget,
                "token_budget": budget.shared,
                "budget_wait": budget.wait,
                "count_prompt": budget.count_prompt,
            }
        )
        self.budget = budget
        # Its streams that may still be open, so that closing the client ends them.
        self._streams: weakref.WeakSet[_ClosableStream] = weakref.WeakSet()
        self._streams_lock = threading.Lock()  # sync streams start on many threads
        self.hooks = check_hooks(hooks, sync=self._sync_hooks)
        """The hooks every call of this client tells its events to (see ``hooks=``)."""
        # Context lengths (vLLM's max_model_len) from GET /models, by model id.
        self._context_lengths: dict[str, int | None] = {}
        self.fleet = fleet
        """The replicas this client spreads its calls over (None: one base URL)."""
        self._fleet_state: FleetState | None = None
        self._watcher: FleetWatcher[EndpointState] | None = None
        if fleet is not None:
            if base_url is not None:
                raise InvalidRequestError(
                    "Pass base_url or fleet=, not both: a fleet lists its endpoints' URLs."
                )
            base_url, model = _fleet_defaults(fleet, model)
            self._fleet_state = FleetState(fleet)
            self._watcher = FleetWatcher(
                self._fleet_state,
                scrape_interval=fleet.scrape_interval,
                probe_interval=fleet.breaker.probe_interval,
                discovery=fleet.discovery,
            )
            self._fleet_state.on_wait = self._watcher.wake
        self.base_url = resolve_base_url(base_url)
        self._endpoint = endpoint_of(self.base_url)
        self._model = resolve_model(model)
        self._api_key: Secret | None = resolve_api_key(api_key)
        self.timeouts = resolve_timeout(timeout)
        self.retry = resolve_retry(retry)
        self._headers = checked_headers
        self.include_usage = include_usage
        self._max_line_bytes = max_line_bytes
        self._max_event_bytes = max_event_bytes

    _sync_hooks = False  # the sync client refuses async hooks

    @property
    def model(self) -> str | None:
        """The model requests use; ``None`` until asked of the server when not configured."""
        return self._model

    def __repr__(self) -> str:
        # The API key is deliberately left out.
        if self.fleet is not None:
            return f"{type(self).__name__}(fleet={self.fleet!r})"
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self._model!r})"

    def endpoint_loads(self) -> list[EndpointLoad]:
        """Over a fleet: each endpoint's load and health as this client sees them now.

        Empty without a fleet.

        Example::

            for load in client.endpoint_loads():
                print(load.name, load.in_flight, load.waiting, load.kv_cache, load.state)
        """
        state = self._fleet_state
        return state.loads() if state is not None else []

    def _route(self, params: Mapping[str, object], headers: Mapping[str, str]) -> CallRoute | None:
        """A new call's routing over the fleet (None without one); wakes the watcher."""
        state = self._fleet_state
        if state is None or self.fleet is None:
            return None
        watcher = self._watcher
        assert watcher is not None
        if self.fleet.discovery is not None and not state.endpoints:
            # The first call of a discovered fleet: nothing to choose from until the
            # name is resolved (once; the watcher re-resolves in the background). The
            # lookup starts now; the sync client waits for it here, the async one in
            # its stream, where the event loop runs on meanwhile.
            watcher.discover_now(timeout=self._discover_wait)
        session = params.get("session")
        if session is None and self.fleet.session_header is not None:
            wanted = self.fleet.session_header.lower()
            session = next((v for k, v in headers.items() if k.lower() == wanted), None)
        if session is not None and not isinstance(session, str):
            raise InvalidRequestError(f"session must be a str, got {type(session).__name__}.")
        state.note_call(state.clock())
        watcher.wake()
        return CallRoute(state, session=session)

    def _watch_through(self, http: httpx.Client | httpx.AsyncClient) -> None:
        """The fleet watcher's scrapes and probes go through ``http``, as the calls do.

        For a client given a transport or an httpx client: only that reaches the
        endpoints the calls' way (an in-process server, a Unix socket, a proxy of its own).
        """
        if self._watcher is not None:
            self._watcher.send_with(http)

    def _track(self, stream: _ClosableStream) -> None:
        """Count ``stream`` among the client's own, to end it if the client closes first."""
        with self._streams_lock:
            self._streams.add(stream)

    def _close_streams(self) -> None:
        """End the client's streams still in flight: each fails with ClientClosed."""
        with self._streams_lock:
            streams = list(self._streams)
        for stream in streams:
            stream._client_closed()

    def _close_fleet(self) -> None:
        if self._watcher is not None:
            self._watcher.close()

    def _default_headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"llmstream/{__version__}", **self._headers}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key.get_secret()}"
        return headers

    def _call_spec(
        self, prompt_or_messages: PromptOrMessages | None, params: Mapping[str, object]
    ) -> _CallSpec:
        """Check ``stream()``'s arguments and split them into the call's parts (no I/O)."""
        check_params(params)
        messages = params.get("messages")
        if (prompt_or_messages is None) == (messages is None):
            raise InvalidRequestError(
                "Pass the prompt (or a list of messages) as the first argument, or "
                "messages=[...], but not both."
            )
        chosen = prompt_or_messages if prompt_or_messages is not None else messages
        body = build_body(
            build_messages(chosen),  # type: ignore[arg-type]
            params={k: v for k, v in params.items() if k in BODY_PARAMS},
            include_usage=self.include_usage,
            extra_body=_mapping(params, "extra_body"),
        )
        timeout = params.get("timeout")
        retry = params.get("retry")
        hooks = self.hooks + check_hooks(params.get("hooks"), sync=self._sync_hooks)  # type: ignore[arg-type]
        headers = _header_map(params, "extra_headers")
        return _CallSpec(
            body,
            self._call_options(params),
            resolve_timeout(timeout) if timeout is not None else self.timeouts,  # type: ignore[arg-type]
            resolve_retry(retry) if retry is not None else self.retry,  # type: ignore[arg-type]
            self._call_budget(params),
            headers,
            hooks,
            self._route(params, headers),
        )

    def _call_options(self, params: Mapping[str, object]) -> StreamOptions:
        base = self.options
        names = ("buffer", "on_full", "max_pause", "max_chunks", "max_bytes")
        given = {name: params[name] for name in names if params.get(name) is not None}
        if not given:
            return base
        return dataclasses.replace(base, **given)  # type: ignore[arg-type]

    def _call_budget(self, params: Mapping[str, object]) -> BudgetOptions:
        base = self.budget
        # dataclasses.replace checks no types: a wrong one would fail only in planning.
        check_budget_settings(params)
        names = {"budget": "budget", "token_budget": "shared", "budget_wait": "wait"}
        given = {
            field: params[name] for name, field in names.items() if params.get(name) is not None
        }
        if params.get("count_prompt") is not None:
            given["count_prompt"] = params["count_prompt"]
        return dataclasses.replace(base, **given) if given else base  # type: ignore[arg-type]

    def _stream_request(
        self,
        body: dict[str, object],
        wait: float | None,
        extra_headers: Mapping[str, str],
        target: EndpointState | None = None,
    ) -> HTTPRequest:
        """The request for one attempt; ``wait`` bounds the wait for its headers.

        ``target`` is the fleet endpoint it goes to (its own key, if it has one).
        """
        headers = self._default_headers()
        base_url = self.base_url
        if target is not None:
            base_url = target.url
            if target.api_key is not None:
                headers["Authorization"] = f"Bearer {target.api_key.get_secret()}"
        _merge_headers(headers, extra_headers)
        headers["Accept"] = "text/event-stream"
        # identity: a compressing proxy would hold tokens back to fill its buffers.
        headers["Accept-Encoding"] = "identity"
        connect = self.timeouts.connect
        if wait is not None:
            wait = max(wait, 0.001)
            # Connecting is part of the wait for the headers: it ends with it too (the
            # first token's or the total deadline), not after its own longer limit.
            connect = wait if connect is None else min(connect, wait)
        return HTTPRequest("POST", f"{base_url}/chat/completions", headers, body, connect, wait)

    @property
    def _requests_in_flight(self) -> int:
        # Streams of this client sent and not yet released.
        return self._transport_in_flight()

    def _transport_in_flight(self) -> int:
        raise NotImplementedError

    def _json_request(self, method: str, url: str, body: object | None = None) -> HTTPRequest:
        connect = self.timeouts.connect
        return HTTPRequest(
            method,
            url,
            self._default_headers(),
            body,
            connect,
            max(connect or 0.0, 30.0),
            stream=False,
        )

    def _models_url(self) -> str:
        return f"{self.base_url}/models"

    def _record_models(self, data: object) -> None:
        listed = data.get("data") if isinstance(data, dict) else None
        for entry in listed if isinstance(listed, list) else []:
            if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                length = entry.get("max_model_len")
                self._context_lengths[entry["id"]] = length if isinstance(length, int) else None

    def _tokenize_url(self) -> str:
        # vLLM serves /tokenize beside /v1, not under it.
        root = self.base_url.removesuffix("/v1")
        return f"{root}/tokenize"

    def _prompt_count(self, model: str, answer: object) -> int:
        """The count in a ``/tokenize`` answer; vLLM adds the context length, kept too."""
        length = parse_tokenize_max_model_len(answer)
        if length is not None:
            self._context_lengths.setdefault(model, length)
        return parse_tokenize_response(answer)

    def _first_model(self, data: object) -> str:
        models = _model_list(data, self._models_url())
        self._record_models(data)
        if not models:
            raise ProtocolError(
                f"GET {self._models_url()} lists no model (is the server still loading one?); "
                "pass model=... or set LLMSTREAM_MODEL."
            )
        return models[0]

    def _model_ids(self, data: object) -> list[str]:
        return _model_list(data, self._models_url())


class AsyncClient(_BaseClient):
    """Streams chat completions from vLLM or any OpenAI-compatible server (async).

    Arguments default from the environment: ``LLMSTREAM_BASE_URL`` then
    ``OPENAI_BASE_URL`` then ``http://localhost:8000/v1``; ``LLMSTREAM_MODEL``
    (else the first model ``GET /models`` lists, asked once);
    ``LLMSTREAM_API_KEY`` then ``OPENAI_API_KEY``.

    ``timeout`` is seconds for each phase, or a :class:`~llmstream.Timeouts`
    with the four deadlines (connect 10 s, first token 300 s for slow
    prefills, idle 60 s between events, no total by default). ``retry`` is a
    :class:`~llmstream.RetryPolicy` (two retries with jittered backoff by
    default), a number of retries, or a ``tenacity.Retrying`` to take the
    strategies from. ``http_client`` lets you
    bring your own ``httpx.AsyncClient`` (proxies, TLS, limits); the client is
    then yours to close. Without one, the client's own pool opens up to 1,000
    connections, so hundreds of streams run at once, and keeps 20 idle.
    ``transport`` plugs an httpx transport in, e.g.
    ``llmstream.testing.FakeVLLM().transport()``, or sends with aiohttp:
    ``transport=llmstream.AiohttpTransport()`` (asyncio only; also chosen by
    ``LLMSTREAM_HTTP_BACKEND=aiohttp`` when neither is given), or speaks HTTP/1.1
    straight on asyncio, the cheapest for hundreds of streams:
    ``transport=llmstream.AsyncioTransport()`` (or ``LLMSTREAM_HTTP_BACKEND=asyncio``).
    ``include_usage`` asks the server for exact token counts
    (``stream_options.include_usage``).
    ``max_line_bytes``/``max_event_bytes`` bound what one SSE line or event may
    hold (1 MiB by default). ``hooks`` are callables told every event of every
    call (:data:`~llmstream.CallEvent`: request sent, response headers, first
    token, retry or resume, and one :class:`~llmstream.CallFinished` or
    :class:`~llmstream.CallFailed`), e.g. :class:`llmstream.otel.OpenTelemetryHook`;
    ``async def`` hooks are awaited in order at the stream's next step (see
    :data:`~llmstream.Hook`). ``stream(..., hooks=[...])`` adds hooks for one call.

    Flow control, per client and per call: ``buffer`` is how many chunks a
    background reader may run ahead of the consumer (``0``: read only when
    asked, in the consumer's own task: the cheapest at hundreds of streams);
    ``on_full`` is ``"wait"`` (backpressure: stop reading the socket) or
    ``"error"`` (:class:`~llmstream.BufferOverflow`); ``max_pause`` caps a
    :meth:`~AsyncChatStream.pause` in seconds; ``max_chunks``/``max_bytes``
    cap one stream (:class:`~llmstream.StreamLimitExceeded`).

    Example::

        async with llmstream.AsyncClient("http://localhost:8000/v1") as client:
            async with client.stream("Explain KV caching briefly", max_tokens=128) as stream:
                async for text in stream:
                    print(text, end="", flush=True)
    """

    # The first lookup of a discovered fleet is only started in _route(): its stream
    # waits for it without blocking the event loop (AsyncChatStream._send_attempt).
    _discover_wait = 0.0

    def __init__(
        self,
        base_url: str | None = None,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float | Timeouts | None = None,
        retry: RetryPolicy | int | tenacity.BaseRetrying | None = None,
        headers: Mapping[str, str] | None = None,
        include_usage: bool = True,
        buffer: int = DEFAULT_BUFFER,
        on_full: OnFull = "wait",
        max_pause: float = DEFAULT_MAX_PAUSE,
        max_chunks: int | None = None,
        max_bytes: int | None = None,
        budget: CallBudget | None = None,
        token_budget: TokenBudget | None = None,
        budget_wait: bool = False,
        count_prompt: PromptCounting = "estimate",
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        http_client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | AiohttpTransport | AsyncioTransport | None = None,
        hooks: Sequence[Hook] | None = None,
        fleet: Fleet | None = None,
    ) -> None:
        super().__init__(
            base_url,
            model=model,
            api_key=api_key,
            timeout=timeout,
            retry=retry,
            headers=headers,
            include_usage=include_usage,
            max_line_bytes=max_line_bytes,
            max_event_bytes=max_event_bytes,
            options=StreamOptions(
                buffer=buffer,
                on_full=on_full,
                max_pause=max_pause,
                max_chunks=max_chunks,
                max_bytes=max_bytes,
            ),
            budget=BudgetOptions(budget, token_budget, budget_wait, count_prompt),
            hooks=hooks,
            fleet=fleet,
        )
        # httpx, or aiohttp / asyncio when given their transport or LLMSTREAM_HTTP_BACKEND.
        self._transport = async_transport(http_client, transport)
        if isinstance(self._transport, HttpxAsyncTransport) and (
            http_client is not None or transport is not None
        ):
            # Used on the calls' event loop only. aiohttp, asyncio and httpx's default
            # transport go over the network, as the watcher's own client does.
            self._watch_through(self._transport.http)
        # One GET /models at a time: concurrent calls wait for its answer, not send more.
        self._model_lock = anyio.Lock()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (not a client passed in as ``http_client``).

        Example::

            client = llmstream.AsyncClient()
            try:
                ...
            finally:
                await client.aclose()

        Streams of the client still in flight end first: their connections are cut
        (vLLM aborts their requests) and their consumers get
        :class:`~llmstream.ClientClosed`.
        """
        self._close_streams()
        self._close_fleet()
        await self._transport.aclose()

    def stream(
        self,
        prompt_or_messages: PromptOrMessages | None = None,
        /,
        **params: Unpack[StreamParams],
    ) -> AsyncChatStream:
        """Start a streamed chat completion; use it with ``async with`` (or ``await`` it).

        ``prompt_or_messages`` is a prompt (one user message) or a list of chat
        messages (or pass ``messages=``). The sampling parameters vLLM accepts are
        keywords (``max_tokens``, ``temperature``, ``stop``, ``tools``, ``seed``,
        ``logprobs``, ``response_format``, vLLM's ``top_k``, ``min_tokens``...; see
        :class:`~llmstream.SamplingParams`); anything else the server understands goes
        in ``extra_body``, per-call headers in ``extra_headers``. ``buffer``, ``on_full``,
        ``max_pause``, ``max_chunks``, ``max_bytes``, ``timeout``, ``retry`` and the budget
        settings override the client's for this call; ``hooks`` are added to the
        client's for this call. Arguments are checked here,
        before any request: an unknown keyword raises
        :class:`~llmstream.InvalidRequestError` naming the closest one.

        Example::

            async with client.stream("Hi", temperature=0, extra_body={"top_k": 20}) as s:
                async for text in s:
                    print(text, end="")
        """
        spec = self._call_spec(prompt_or_messages, params)
        return AsyncChatStream(
            self,
            spec.body,
            spec.options,
            spec.timeouts,
            spec.retry,
            spec.budget,
            headers=spec.headers,
            hooks=spec.hooks,
            route=spec.route,
        )

    async def complete(
        self,
        prompt_or_messages: PromptOrMessages | None = None,
        /,
        **params: Unpack[StreamParams],
    ) -> StreamResult:
        """The whole answer at once, as the :class:`~llmstream.StreamResult` a stream ends with.

        The same arguments as :meth:`stream`. It streams underneath, so the deadlines,
        retries, resume and budgets all apply, the metrics are taken at the wire, and
        cancelling the call closes the connection (vLLM frees the request's KV cache).
        Raises what the stream would.

        Example::

            result = await client.complete("Name three primes.", max_tokens=32)
            print(result.text, result.finish_reason)
        """
        async with self.stream(prompt_or_messages, **params) as stream:
            return await stream.final_result()

    async def models(self) -> list[str]:
        """The ids of the models the server serves (``GET /models``).

        Example::

            print(await client.models())  # ['Qwen/Qwen3-8B']
        """
        return self._model_ids(await self._get_json(self._json_request("GET", self._models_url())))

    def _transport_in_flight(self) -> int:
        return self._transport.requests_in_flight

    async def _answer(self, need: Need) -> object:
        """What planning a call needs from the server (see :mod:`llmstream._call`)."""
        if isinstance(need, NeedModel):
            return await self._resolve_model()
        if isinstance(need, NeedContextLength):
            return await self._context_length(need.model)
        assert isinstance(need, NeedPromptCount)
        body = tokenize_request_body(need.model, need.messages, **need.template)
        answer = await self._get_json(self._json_request("POST", self._tokenize_url(), body))
        return self._prompt_count(need.model, answer)

    async def _context_length(self, model: str) -> int | None:
        if model not in self._context_lengths:
            async with self._model_lock:
                if model not in self._context_lengths:
                    # Unknown when the server cannot say: it refuses a prompt that does
                    # not fit.
                    with contextlib.suppress(LLMStreamError):
                        self._record_models(
                            await self._get_json(self._json_request("GET", self._models_url()))
                        )
                    self._context_lengths.setdefault(model, None)
        return self._context_lengths[model]

    async def _resolve_model(self) -> str:
        if self._model is not None:
            # Known: no lock. Under load, hundreds of streams queueing on the lock for a
            # value that never changes took seconds to open.
            return self._model
        async with self._model_lock:
            if self._model is None:
                data = await self._get_json(self._json_request("GET", self._models_url()))
                self._model = self._first_model(data)
            return self._model

    async def _get_json(self, request: HTTPRequest) -> object:
        response = await self._transport.send(request)
        try:
            content = await response.read(_MAX_JSON_BYTES)
            return _json_of(response, content, request.url, method=request.method)
        finally:
            await response.aclose()


class Client(_BaseClient):
    """Streams chat completions from vLLM or any OpenAI-compatible server (sync).

    The same arguments and behaviour as :class:`AsyncClient`; safe to share
    between threads. Hooks are called synchronously: an ``async def`` hook is
    refused with :class:`~llmstream.InvalidRequestError`.

    Example::

        with llmstream.Client("http://localhost:8000/v1") as client:
            with client.stream("Explain KV caching briefly", max_tokens=128) as stream:
                for text in stream:
                    print(text, end="", flush=True)
    """

    _sync_hooks = True

    def __init__(
        self,
        base_url: str | None = None,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float | Timeouts | None = None,
        retry: RetryPolicy | int | tenacity.BaseRetrying | None = None,
        headers: Mapping[str, str] | None = None,
        include_usage: bool = True,
        buffer: int = DEFAULT_BUFFER,
        on_full: OnFull = "wait",
        max_pause: float = DEFAULT_MAX_PAUSE,
        max_chunks: int | None = None,
        max_bytes: int | None = None,
        budget: CallBudget | None = None,
        token_budget: TokenBudget | None = None,
        budget_wait: bool = False,
        count_prompt: PromptCounting = "estimate",
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        http_client: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
        hooks: Sequence[Hook] | None = None,
        fleet: Fleet | None = None,
    ) -> None:
        super().__init__(
            base_url,
            model=model,
            api_key=api_key,
            timeout=timeout,
            retry=retry,
            headers=headers,
            include_usage=include_usage,
            max_line_bytes=max_line_bytes,
            max_event_bytes=max_event_bytes,
            options=StreamOptions(
                buffer=buffer,
                on_full=on_full,
                max_pause=max_pause,
                max_chunks=max_chunks,
                max_bytes=max_bytes,
            ),
            budget=BudgetOptions(budget, token_budget, budget_wait, count_prompt),
            hooks=hooks,
            fleet=fleet,
        )
        check_sync_transport(transport)
        self._owns_http = http_client is None
        traced = False
        if http_client is None and transport is None:
            # So that cancel() from another thread, or a deadline, reaches a request still
            # waiting for its headers (see _header_wait).
            self._http, traced = own_cuttable_sync_client()
        else:
            self._http = http_client or own_sync_client(transport)
        self._transport = HttpxSyncTransport(
            self._http, owns_client=self._owns_http, trace_connects=traced
        )
        if http_client is not None or transport is not None:
            self._watch_through(self._http)
        self._model_lock = threading.Lock()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool (not a client passed in as ``http_client``).

        Example::

            client = llmstream.Client()
            try:
                ...
            finally:
                client.close()

        Streams of the client still in flight, on any thread, end first: their
        connections are cut (vLLM aborts their requests) and their consumers get
        :class:`~llmstream.ClientClosed`.
        """
        self._close_streams()
        self._close_fleet()
        self._transport.close()

    def stream(
        self,
        prompt_or_messages: PromptOrMessages | None = None,
        /,
        **params: Unpack[StreamParams],
    ) -> ChatStream:
        """Start a streamed chat completion; use it with ``with``.

        The same arguments as :meth:`AsyncClient.stream`.

        Example::

            with client.stream("Hi", max_tokens=32) as stream:
                for text in stream:
                    print(text, end="")
        """
        spec = self._call_spec(prompt_or_messages, params)
        return ChatStream(
            self,
            spec.body,
            spec.options,
            spec.timeouts,
            spec.retry,
            spec.budget,
            headers=spec.headers,
            hooks=spec.hooks,
            route=spec.route,
        )

    def complete(
        self,
        prompt_or_messages: PromptOrMessages | None = None,
        /,
        **params: Unpack[StreamParams],
    ) -> StreamResult:
        """The whole answer at once, as the :class:`~llmstream.StreamResult` a stream ends with.

        See :meth:`AsyncClient.complete`.

        Example::

            result = client.complete("Name three primes.", max_tokens=32)
            print(result.text)
        """
        with self.stream(prompt_or_messages, **params) as stream:
            return stream.final_result()

    def models(self) -> list[str]:
        """The ids of the models the server serves (``GET /models``).

        Example::

            print(client.models())  # ['Qwen/Qwen3-8B']
        """
        return self._model_ids(self._get_json(self._json_request("GET", self._models_url())))

    def _transport_in_flight(self) -> int:
        return self._transport.requests_in_flight

    def _answer(self, need: Need) -> object:
        """What planning a call needs from the server (see :mod:`llmstream._call`)."""
        if isinstance(need, NeedModel):
            return self._resolve_model()
        if isinstance(need, NeedContextLength):
            return self._context_length(need.model)
        assert isinstance(need, NeedPromptCount)
        body = tokenize_request_body(need.model, need.messages, **need.template)
        answer = self._get_json(self._json_request("POST", self._tokenize_url(), body))
        return self._prompt_count(need.model, answer)

    def _context_length(self, model: str) -> int | None:
        if model not in self._context_lengths:
            with self._model_lock:
                if model not in self._context_lengths:
                    with contextlib.suppress(LLMStreamError):
                        self._record_models(
                            self._get_json(self._json_request("GET", self._models_url()))
                        )
                    self._context_lengths.setdefault(model, None)
        return self._context_lengths[model]

    def _resolve_model(self) -> str:
        if self._model is not None:
            return self._model  # known: no lock (see AsyncClient._resolve_model)
        with self._model_lock:
            if self._model is None:
                data = self._get_json(self._json_request("GET", self._models_url()))
                self._model = self._first_model(data)
            return self._model

    def _get_json(self, request: HTTPRequest) -> object:
        response = self._transport.send(request)
        try:
            content = response.read(_MAX_JSON_BYTES)
            return _json_of(response, content, request.url, method=request.method)
        finally:
            response.close()


def _model_list(data: object, url: str) -> list[str]:
    """The model ids of an OpenAI model list (``{"data": [{"id": ...}, ...]}``)."""
    listed = data.get("data") if isinstance(data, dict) else None
    if isinstance(listed, list):
        ids = [entry.get("id") for entry in listed if isinstance(entry, dict)]
        if len(ids) == len(listed) and all(isinstance(i, str) and i for i in ids):
            return [str(i) for i in ids]
    raise not_an_openai_answer(
        "GET", url, f"its JSON is not a model list ({json.dumps(data)[:200]})"
    )


def _json_of(
    response: AsyncResponse | SyncResponse, content: bytes, url: str, *, method: str = "GET"
) -> object:
    """The JSON answer of a non-stream request, or the error its status means."""
    if response.status_code >= 300:
        raise status_error(
            response.status_code,
            response.reason_phrase,
            response.headers,
            content,
            method=method,
            url=url,
        )
    try:
        data: object = loads_json(content)
    except ValueError:
        content_type = response.headers.get("content-type", "")
        raise not_json_error(method, url, response.status_code, content_type, content) from None
    return data


def _fleet_defaults(fleet: Fleet, model: str | None) -> tuple[str, str | None]:
    """The base URL of a fleet's model list and token counts, and its primary model."""
    first = fleet.endpoints[0] if fleet.endpoints else None
    if first is not None:
        url = first.base_url
    else:
        assert fleet.discovery is not None  # a fleet has endpoints or discovery
        url = fleet.discovery.url_for(fleet.discovery.host)
    if model is None:
        model = fleet.model or (fleet.model_of(first) if first is not None else None)
        if model is None and fleet.discovery is not None:
            model = fleet.discovery.model
    return url, model
