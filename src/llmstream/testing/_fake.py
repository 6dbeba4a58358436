"""``FakeVLLM``: the emulator's settings, its fault queue and what it observed."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from ._config import Config, Disconnect, Fault, RecordedRequest, ToolCallSpec
from ._engine import Engine, Ticket
from ._metrics import metrics_response, render_metrics
from ._script import Action, Head, HttpRequest, Send, is_chat_request, respond
from ._wire import dumps, error_body

if TYPE_CHECKING:
    from ._server import FakeServer
    from ._transport import FakeTransport

__all__ = ["Exchange", "FakeVLLM"]


@dataclass
class Exchange:
    """One request being answered: where it was recorded and the actions to run.

    The shells call :meth:`client_left` when the client goes before the response ends,
    and :meth:`end` when they stop answering for any reason (the server stopping too).
    """

    fake: FakeVLLM
    request_index: int
    actions: Iterator[Action]
    ticket: Ticket | None = None

    def client_left(self, chunks_sent: int) -> None:
        """Record that the client went away after ``chunks_sent`` events.

        >>> fake = FakeVLLM("Hi")
        >>> ex = fake.exchange(HttpRequest("GET", "/health", {}, b""))
        >>> ex.client_left(0)
        >>> fake.disconnects[0].chunks_sent
        0
        """
        if self.ticket is not None:
            self.ticket.end("abort")
        self.fake._record_disconnect(
            Disconnect(self.request_index, time.perf_counter(), chunks_sent)
        )

    def end(self) -> None:
        """Take the request out of the emulator's load, if it is still in it.

        >>> fake = FakeVLLM("Hi")
        >>> fake.exchange(HttpRequest("GET", "/health", {}, b"")).end()
        """
        if self.ticket is not None:
            self.ticket.end(None)


def _tool_spec(call: Mapping[str, object]) -> ToolCallSpec:
    arguments = call.get("arguments", {})
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCallSpec(str(call["name"]), text)


class FakeVLLM:
    """An emulator of vLLM's OpenAI-compatible server, for tests.

    It answers ``POST /v1/chat/completions`` (streaming and not), ``GET /v1/models``,
    ``GET /health`` and ``POST /tokenize`` with the bytes vLLM 0.33.0 sends, through an
    in-process httpx transport (:meth:`transport`) or a real HTTP/1.1 server on loopback
    (:meth:`serve`). Faults queued with :meth:`add_fault` apply to the next chat
    completions, one each; :meth:`fail_always` sets one for every chat completion.

    ``GET /metrics`` reports the engine's load in vLLM's Prometheus format: chat requests
    being answered (``vllm:num_requests_running``), requests in line for one of
    ``max_num_seqs`` slots (``vllm:num_requests_waiting``; None: no limit, nobody waits)
    and the KV cache they fill (their prompt and generated tokens over
    ``kv_cache_tokens``). :meth:`set_metrics` pins the reported values;
    :attr:`metrics_enabled` turns the endpoint off. :meth:`set_ttft` and
    :meth:`set_health` change the behaviour from then on, from any thread.

    The answer is ``text`` (None: the last user message, echoed) split into token pieces
    by :func:`~llmstream.testing._tokenize.split_text`, or ``tokens`` verbatim; an
    end-of-sequence token follows, which sends no text but counts in ``usage``. The
    prompt costs 4 tokens per message plus its text pieces (``prompt_tokens`` overrides),
    the same count ``/tokenize`` reports. ``reasoning`` (``""`` included) behaves like a
    server with a reasoning parser: ``<think>`` and ``</think>`` count as tokens and
    ``usage`` gets ``completion_tokens_details``.

    Example::

        fake = FakeVLLM("Hello! How can I help?", token_delay=0.01)
        async with httpx.AsyncClient(transport=fake.transport(),
                                     base_url="http://vllm/v1") as client:
            r = await client.post("/chat/completions", json={...})
    """

    def __init__(
        self,
        text: str | None = None,
        *,
        tokens: Sequence[str] | None = None,
        model: str = "llmstream/fake-model",
        max_model_len: int = 8192,
        ttft: float = 0.0,
        token_delay: float = 0.0,
        reasoning: str | None = None,
        tool_calls: Sequence[Mapping[str, object]] | None = None,
        api_key: str | None = None,
        request_id_headers: bool = False,
        keep_alive: float | None = None,
        prompt_tokens: int | None = None,
        max_num_seqs: int | None = None,
        kv_cache_tokens: int = 131_072,
    ) -> None:
        self.config = Config(
            text=text,
            tokens=tuple(tokens) if tokens is not None else None,
            model=model,
            max_model_len=max_model_len,
            ttft=ttft,
            token_delay=token_delay,
            reasoning=reasoning,
            tool_calls=tuple(_tool_spec(c) for c in tool_calls or ()),
            api_key=api_key,
            request_id_headers=request_id_headers,
            keep_alive=keep_alive,
            prompt_tokens=prompt_tokens,
        )
        self._lock = threading.Condition()
        self._faults: deque[Fault] = deque()
        self._requests: list[RecordedRequest] = []
        self._disconnects: list[Disconnect] = []
        self._sticky: Fault | None = None
        self._engine = Engine(
            self._lock, max_num_seqs=max_num_seqs, kv_cache_tokens=kv_cache_tokens
        )

    def add_fault(self, fault: Fault) -> None:
        """Queue ``fault`` for the next chat completion that has none yet.

        >>> fake = FakeVLLM("Hi")
        >>> fake.add_fault(Fault.disconnect(after_chunks=2))
        """
        with self._lock:
            self._faults.append(fault)

    def fail_always(self, fault: Fault | None) -> None:
        """Apply ``fault`` to every chat completion from now on (None: stop).

        Queued faults (:meth:`add_fault`) still come first, one per request.

        >>> fake = FakeVLLM("Hi")
        >>> fake.fail_always(Fault.http_status(503))
        >>> fake.fail_always(None)  # answer normally again
        """
        with self._lock:
            self._sticky = fault

    def clear_faults(self) -> None:
        """Drop the queued faults and the one set by :meth:`fail_always`.

        >>> fake = FakeVLLM(); fake.fail_always(Fault.disconnect(2)); fake.clear_faults()
        """
        with self._lock:
            self._faults.clear()
            self._sticky = None

    def set_ttft(self, seconds: float) -> None:
        """Wait ``seconds`` before the first token of every chat completion from now on.

        Answers already under way keep their pace.

        >>> fake = FakeVLLM("Hi"); fake.set_ttft(0.5); fake.config.ttft
        0.5
        """
        if seconds < 0:
            raise ValueError(f"ttft must be 0 or more seconds, not {seconds}")
        with self._lock:
            self.config = replace(self.config, ttft=seconds)

    def set_health(self, ok: bool) -> None:
        """Answer ``GET /health`` with 200 (``True``) or 503, as vLLM with a dead engine.

        >>> fake = FakeVLLM(); fake.set_health(False); fake.healthy
        False
        """
        with self._lock:
            self.config = replace(self.config, healthy=ok)

    @property
    def healthy(self) -> bool:
        """Whether ``GET /health`` answers 200.

        >>> FakeVLLM().healthy
        True
        """
        return self.config.healthy

    def set_metrics(
        self,
        *,
        running: float | None = None,
        waiting: float | None = None,
        kv_cache: float | None = None,
    ) -> None:
        """Make ``/metrics`` report these values; each None reports the live value.

        Every call sets all three, so ``set_metrics()`` goes back to live values. Only
        the report changes: requests are queued and answered as before.

        >>> fake = FakeVLLM()
        >>> fake.set_metrics(waiting=80, kv_cache=0.97)  # looks saturated
        >>> fake.set_metrics()  # live again
        """
        if kv_cache is not None and not 0.0 <= kv_cache <= 1.0:
            raise ValueError(f"kv_cache is a fraction from 0 to 1, not {kv_cache}")
        with self._lock:
            self._engine.overrides = (running, waiting, kv_cache)

    @property
    def metrics_enabled(self) -> bool:
        """Whether ``GET /metrics`` is served; False answers 404, like a gateway in front.

        >>> fake = FakeVLLM(); fake.metrics_enabled = False; fake.metrics_enabled
        False
        """
        with self._lock:
            return self._engine.enabled

    @metrics_enabled.setter
    def metrics_enabled(self, enabled: bool) -> None:
        with self._lock:
            self._engine.enabled = enabled

    @property
    def running(self) -> int:
        """Chat completions being answered now (live, whatever :meth:`set_metrics` says).

        >>> FakeVLLM().running
        0
        """
        with self._lock:
            return self._engine.running

    @property
    def waiting(self) -> int:
        """Chat completions in line for a ``max_num_seqs`` slot now (live).

        >>> FakeVLLM(max_num_seqs=4).waiting
        0
        """
        with self._lock:
            return self._engine.waiting

    def wait_for_load(
        self, *, running: int | None = None, waiting: int | None = None, timeout: float = 5.0
    ) -> None:
        """Block until the live counts equal the given ones (None: any).

        Raises :class:`TimeoutError` after ``timeout`` seconds.

        >>> FakeVLLM().wait_for_load(running=0, waiting=0)
        >>> FakeVLLM().wait_for_load(running=1, timeout=0.01)
        Traceback (most recent call last):
        ...
        TimeoutError: load stayed at 0 running, 0 waiting, not 1 running, any waiting within 0.01 s
        """

        def reached() -> bool:
            engine = self._engine
            return (running is None or engine.running == running) and (
                waiting is None or engine.waiting == waiting
            )

        with self._lock:
            if not self._lock.wait_for(reached, timeout):
                want = f"{_count(running)} running, {_count(waiting)} waiting"
                raise TimeoutError(
                    f"load stayed at {self._engine.running} running, {self._engine.waiting} "
                    f"waiting, not {want} within {timeout} s"
                )

    async def await_load(
        self, *, running: int | None = None, waiting: int | None = None, timeout: float = 5.0
    ) -> None:
        """:meth:`wait_for_load` for async code (asyncio or trio).

        Example::

            await fake.await_load(running=1)  # a stream is being answered
        """

        def wait() -> None:
            self.wait_for_load(running=running, waiting=waiting, timeout=timeout)

        await anyio.to_thread.run_sync(wait)

    @property
    def requests(self) -> list[RecordedRequest]:
        """The requests received so far (a copy), oldest first.

        >>> FakeVLLM().requests
        []
        """
        with self._lock:
            return list(self._requests)

    @property
    def disconnects(self) -> list[Disconnect]:
        """Clients that went away before their response ended (a copy), oldest first.

        >>> FakeVLLM().disconnects
        []
        """
        with self._lock:
            return list(self._disconnects)

    def wait_for_disconnect(self, count: int = 1, timeout: float = 5.0) -> Disconnect:
        """Block until ``count`` disconnects were seen; return the ``count``-th.

        Raises :class:`TimeoutError` after ``timeout`` seconds.

        >>> fake = FakeVLLM()
        >>> fake.wait_for_disconnect(timeout=0.01)
        Traceback (most recent call last):
        ...
        TimeoutError: saw 0 of 1 disconnects within 0.01 s
        """
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._disconnects) >= count, timeout):
                seen = len(self._disconnects)
                raise TimeoutError(f"saw {seen} of {count} disconnects within {timeout} s")
            return self._disconnects[count - 1]

    async def await_disconnect(self, count: int = 1, timeout: float = 5.0) -> Disconnect:
        """:meth:`wait_for_disconnect` for async code (asyncio or trio).

        Example::

            seen = await fake.await_disconnect(timeout=1.0)
        """
        return await anyio.to_thread.run_sync(self.wait_for_disconnect, count, timeout)

    def reset(self) -> None:
        """Forget recorded requests and disconnects, and drop all faults (:meth:`clear_faults`).

        >>> fake = FakeVLLM(); fake.add_fault(Fault.no_done()); fake.reset()
        """
        with self._lock:
            self._faults.clear()
            self._sticky = None
            self._requests.clear()
            self._disconnects.clear()

    def transport(self) -> FakeTransport:
        """An in-process httpx transport (sync and async) answering as this emulator.

        >>> import httpx
        >>> client = httpx.Client(transport=FakeVLLM().transport())
        >>> client.get("http://vllm/health").status_code
        200
        """
        from ._transport import FakeTransport

        return FakeTransport(self)

    def serve(self, port: int = 0, *, host: str = "127.0.0.1") -> FakeServer:
        """A real HTTP/1.1 server on ``host`` (``port``; 0: ephemeral), run in a thread.

        Use it as a context manager, or call ``start()`` and ``stop()``; a stopped server
        starts again on the same port. ``host`` is a loopback address: on Linux any of
        127.0.0.0/8, so that several servers can share one port, as the pods behind a
        Kubernetes Service do.

        >>> with FakeVLLM().serve() as server:
        ...     server.base_url.startswith("http://127.0.0.1:")
        True
        """
        from ._server import FakeServer

        return FakeServer(self, port=port, host=host)

    def exchange(self, request: HttpRequest) -> Exchange:
        """Record ``request`` and plan its answer (used by the transports and the server).

        >>> ex = FakeVLLM().exchange(HttpRequest("GET", "/health", {}, b""))
        >>> ex.request_index
        0
        """
        try:
            parsed: object = json.loads(request.body) if request.body else None
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            parsed = None
        # Only an object is recorded: every chat, tokenize or completion request body is one.
        body = parsed if isinstance(parsed, dict) else None
        chat = is_chat_request(request.method, request.path)
        scrape = request.method == "GET" and request.path in ("/metrics", "/metrics/")
        with self._lock:
            fault = None
            if chat:
                fault = self._faults.popleft() if self._faults else self._sticky
            index = len(self._requests)
            self._requests.append(
                RecordedRequest(
                    request.method,
                    request.path,
                    dict(request.headers),
                    body,
                    time.perf_counter(),
                )
            )
            config = self.config
            # Disabled, /metrics falls through to the script's 404.
            metrics = self._engine.snapshot() if scrape and self._engine.enabled else None
        if metrics is not None:
            body_bytes = render_metrics(config.model, metrics)
            encoding = request.headers.get("accept-encoding", "")
            return Exchange(self, index, iter(metrics_response(body_bytes, encoding)))
        ticket = self._engine.ticket()
        try:
            script = respond(request, config, fault)
        except RecursionError:
            if not request.body:
                raise
            # The only recursion a request can drive is json.loads of its body, nested
            # deeper than the interpreter's limit. FastAPI answers any failure to parse
            # but a JSONDecodeError with HTTPException(400, "There was an error parsing
            # the body"), which vLLM's http_exception_handler renders as an ErrorResponse.
            script = iter(_unparsable_body())
        actions = self._engine.track(ticket, script)
        return Exchange(self, index, actions, ticket)

    def _record_disconnect(self, disconnect: Disconnect) -> None:
        with self._lock:
            self._disconnects.append(disconnect)
            self._lock.notify_all()


def _unparsable_body() -> list[Action]:
    data = dumps(error_body("There was an error parsing the body", "Bad Request", 400))
    headers = (("content-length", str(len(data))), ("content-type", "application/json"))
    return [Head(400, headers, chunked=False), Send(data, event=False)]


def _count(value: int | None) -> str:
    return "any" if value is None else str(value)
