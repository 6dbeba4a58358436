"""Locust users that stream chat completions, reporting TTFT and ITL as Locust metrics.

Needs Locust (``pip install "llmstream-sdk[locust]"``); importing this module without it
raises :class:`~llmstream.InvalidRequestError` (also an ``ImportError``) saying so.

Each streamed answer fires Locust request events, so Locust's statistics, charts, CSV
files and its master/worker cluster show them like any HTTP request:

* type ``TTFT``: from sending the chat request to the first chunk carrying output, one
  per stream (with ``model`` unset, the lookup of the model, once per user, comes first
  and is not counted);
* type ``ITL``: every gap between two output chunks (one event per gap: Locust pools them,
  as ``vllm bench serve`` pools its ITL);
* type ``STREAM``: the whole stream, sent to its end, with its output tokens as the
  response length; a failed stream (an llmstream error) is a Locust failure here.

The timings are vLLM's benchmark's, as in ``llmstream bench`` (docs/load-testing.md).

Example::

    from locust import between, task
    from llmstream.locust import LLMStreamUser

    class ChatUser(LLMStreamUser):
        wait_time = between(1, 2)
        max_tokens = 128

        @task
        def ask(self) -> None:
            self.stream_chat("Explain PagedAttention in one sentence.")

    # locust -f locustfile.py --host http://localhost:8000/v1
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, ClassVar

from ._bench._runner import carries_output
from ._client import Client
from ._errors import InvalidRequestError, LLMStreamError

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._params import StreamParams
    from ._request import PromptOrMessages
    from ._result import StreamResult


class _MissingLocust(InvalidRequestError, ImportError):
    """Locust is not installed: ``llmstream.locust`` needs the ``locust`` extra."""


try:
    from locust import User
    from locust.env import Environment
except ImportError:
    raise _MissingLocust(
        'llmstream.locust needs Locust: pip install "llmstream-sdk[locust]" '
        "(or pip install locust)."
    ) from None

__all__ = ["LLMStreamUser"]


class LLMStreamUser(User):
    """A Locust user with an llmstream :class:`~llmstream.Client` and :meth:`stream_chat`.

    Subclass it, add ``@task`` methods that call :meth:`stream_chat`, and run Locust with
    ``--host`` set to the server's base URL ending in ``/v1``. Class attributes set the
    client: ``model`` (default: the first the server lists), ``api_key`` (default:
    ``$LLMSTREAM_API_KEY`` / ``$OPENAI_API_KEY``), ``timeout``, and each request's
    ``max_tokens``. The client does not retry, so every failure counts.

    Example::

        class ChatUser(LLMStreamUser):
            max_tokens = 64

            @task
            def ask(self) -> None:
                self.stream_chat("Hi", name="greeting", temperature=0)
    """

    abstract = True
    model: ClassVar[str | None] = None
    api_key: ClassVar[str | None] = None
    timeout: ClassVar[float | None] = None
    max_tokens: ClassVar[int] = 128

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.client = Client(
            self.host, model=self.model, api_key=self.api_key, timeout=self.timeout, retry=0
        )

    def on_stop(self) -> None:
        """Close the client's connections when Locust stops this user."""
        self.client.close()

    def stream_chat(
        self,
        prompt_or_messages: PromptOrMessages,
        *,
        name: str = "chat",
        **params: Unpack[StreamParams],
    ) -> StreamResult | None:
        """Stream one answer to its end and report it to Locust; the result, or None if it failed.

        ``name`` groups the events in Locust's statistics; ``params`` are
        :meth:`Client.stream`'s (``max_tokens`` defaults to the class's).

        Example::

            result = self.stream_chat("Hi", name="short", max_tokens=16)
        """
        fire = self.environment.events.request.fire
        params.setdefault("max_tokens", self.max_tokens)
        sent = time.perf_counter()
        last = sent
        chunks = 0
        try:
            if "model" not in params:
                # The model (GET /models, once per user) before the clock starts: TTFT
                # counts from sending the chat request, as in vLLM's benchmark.
                self.client._resolve_model()
                sent = last = time.perf_counter()
            with self.client.stream(prompt_or_messages, **params) as stream:
                for chunk in stream.chunks():
                    now = time.perf_counter()
                    if not carries_output(chunk):
                        continue
                    kind = "ITL" if chunks else "TTFT"
                    fire(
                        request_type=kind,
                        name=name,
                        response_time=(now - last) * 1000,
                        response_length=0,
                        exception=None,
                        context={},
                    )
                    last = now
                    chunks += 1
            result = stream.result
            if not chunks:
                raise LLMStreamError(f"the stream ended ({result.status}) without any output")
        except LLMStreamError as exc:
            fire(
                request_type="STREAM",
                name=name,
                response_time=(time.perf_counter() - sent) * 1000,
                response_length=chunks,
                exception=exc,
                context={},
            )
            return None
        fire(
            request_type="STREAM",
            name=name,
            response_time=(last - sent) * 1000,
            response_length=result.metrics.completion_tokens,
            exception=None,
            context={},
        )
        return result
