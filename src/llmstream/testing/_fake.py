"""``FakeVLLM``: the emulator's settings, its fault queue and what it observed."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from ._config import Config, Disconnect, Fault, RecordedRequest, ToolCallSpec
from ._script import Action, HttpRequest, is_chat_request, respond

if TYPE_CHECKING:
    from ._server import FakeServer
    from ._transport import FakeTransport

__all__ = ["Exchange", "FakeVLLM"]


@dataclass
class Exchange:
    """One request being answered: where it was recorded and the actions to run.

    The shells call :meth:`client_left` when the client goes before the response ends.
    """

    fake: FakeVLLM
    request_index: int
    actions: Iterator[Action]

    def client_left(self, chunks_sent: int) -> None:
        """Record that the client went away after ``chunks_sent`` events.

        >>> fake = FakeVLLM("Hi")
        >>> ex = fake.exchange(HttpRequest("GET", "/health", {}, b""))
        >>> ex.client_left(0)
        >>> fake.disconnects[0].chunks_sent
        0
        """
        self.fake._record_disconnect(
            Disconnect(self.request_index, time.perf_counter(), chunks_sent)
        )


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
    completions, one each.

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

    def add_fault(self, fault: Fault) -> None:
        """Queue ``fault`` for the next chat completion that has none yet.

        >>> fake = FakeVLLM("Hi")
        >>> fake.add_fault(Fault.disconnect(after_chunks=2))
        """
        with self._lock:
            self._faults.append(fault)

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
        """Forget recorded requests and disconnects, and drop queued faults.

        >>> fake = FakeVLLM(); fake.add_fault(Fault.no_done()); fake.reset()
        """
        with self._lock:
            self._faults.clear()
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

    def serve(self) -> FakeServer:
        """A real HTTP/1.1 server on 127.0.0.1 (ephemeral port), run in a thread.

        Use it as a context manager, or call ``start()`` and ``stop()``.

        >>> with FakeVLLM().serve() as server:
        ...     server.base_url.startswith("http://127.0.0.1:")
        True
        """
        from ._server import FakeServer

        return FakeServer(self)

    def exchange(self, request: HttpRequest) -> Exchange:
        """Record ``request`` and plan its answer (used by the transports and the server).

        >>> ex = FakeVLLM().exchange(HttpRequest("GET", "/health", {}, b""))
        >>> ex.request_index
        0
        """
        try:
            parsed: object = json.loads(request.body) if request.body else None
        except ValueError:
            parsed = None
        # Only an object is recorded: every chat, tokenize or completion request body is one.
        body = parsed if isinstance(parsed, dict) else None
        with self._lock:
            fault = None
            if is_chat_request(request.method, request.path) and self._faults:
                fault = self._faults.popleft()
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
        return Exchange(self, index, respond(request, config, fault))

    def _record_disconnect(self, disconnect: Disconnect) -> None:
        with self._lock:
            self._disconnects.append(disconnect)
            self._lock.notify_all()
