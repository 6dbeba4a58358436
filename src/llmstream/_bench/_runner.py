"""Send one process's share of a run: each request at its arrival time, timed chunk by chunk.

Timestamps are taken where the application sees each chunk (``stream.chunks()``), as vLLM's
benchmark takes them where its client parses each event; the output tokens come from the
result (``result.metrics``: the server's usage, else the counted output chunks).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import anyio

from .._client import AsyncClient
from .._errors import LLMStreamError
from .._result import StreamResult
from ._prompts import BenchPrompt
from ._stats import RequestSample

__all__ = ["LoadResult", "PlannedRequest", "Progress", "Target", "run_load"]

PROGRESS_EVERY = 0.25  # seconds between progress snapshots


@dataclass(frozen=True)
class Target:
    """Where the requests go and what every one of them carries besides its prompt."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)  # never in a repr
    timeout: float | None = None
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    body: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class PlannedRequest:
    """One request: when it arrives (seconds from the start), its prompt, when to cancel it."""

    index: int
    arrival: float
    prompt: BenchPrompt
    cancel_after: int | None = None  # output chunks after which the stream is cancelled


@dataclass
class Progress:
    """Counters of a run in progress, for the live display."""

    total: int
    sent: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    output_chunks: int = 0

    @property
    def finished(self) -> int:
        """Requests that ended, however."""
        return self.completed + self.failed + self.cancelled

    def copy(self) -> Progress:
        """A snapshot."""
        return Progress(
            self.total, self.sent, self.completed, self.failed, self.cancelled, self.output_chunks
        )


@dataclass
class LoadResult:
    """What one process measured: every request's sample, its own CPU and wall time."""

    samples: list[RequestSample]
    cpu: float
    wall: float
    worker: int = 0


def carries_output(chunk: object) -> bool:
    """Whether a chunk carries generated output, as vLLM's benchmark decides it.

    Text, reasoning or a tool call; or an empty ``content`` without a ``role``: a token
    that decodes to nothing (the end-of-sequence token of a finish chunk).
    """
    choices = getattr(chunk, "choices", None)
    if not choices:
        return False
    delta = choices[0].delta
    if delta.content or delta.reasoning or delta.reasoning_content or delta.tool_calls:
        return True
    return bool(delta.function_call) or (delta.content == "" and delta.role is None)


class _Sender:
    """Sends requests on one client and records each as a :class:`RequestSample`."""

    def __init__(self, client: AsyncClient, target: Target, progress: Progress, worker: int):
        self._client = client
        self._body = dict(target.body)
        self._progress = progress
        self._worker = worker

    async def send(self, request: PlannedRequest, start: float, lag: float) -> RequestSample:
        progress = self._progress
        progress.sent += 1
        sent = time.perf_counter()
        sample = RequestSample(
            index=request.index,
            arrived=request.arrival + lag,
            sent=sent - start,
            outcome="error",
            dispatch_lag=lag,
            worker=self._worker,
        )
        last = sent
        itl = sample.itl
        chunks = 0
        cancelled_at: float | None = None
        stream = self._client.stream(
            request.prompt.text, max_tokens=request.prompt.output_len, extra_body=self._body
        )
        try:
            async with stream:
                async for chunk in stream.chunks():
                    now = time.perf_counter()
                    if not carries_output(chunk):
                        continue
                    if chunks:
                        itl.append(now - last)
                    else:
                        sample.ttft = now - sent
                    last = now
                    chunks += 1
                    progress.output_chunks += 1
                    if request.cancel_after is not None and chunks >= request.cancel_after:
                        cancelled_at = time.perf_counter()
                        stream.cancel()
                        break
            result = stream.result
        except LLMStreamError as exc:
            sample.error_type = type(exc).__name__
            sample.error = str(exc)[:500]
            sample.output_tokens = chunks
            progress.failed += 1
            return sample
        if chunks:
            sample.e2e = last - sent
        if cancelled_at is not None:
            sample.outcome = "cancelled"
            sample.closed_in = time.perf_counter() - cancelled_at
            sample.output_tokens = chunks
            progress.cancelled += 1
            return sample
        self._record(sample, result, request.prompt, chunks)
        return sample

    def _record(
        self, sample: RequestSample, result: StreamResult, prompt: BenchPrompt, chunks: int
    ) -> None:
        metrics = result.metrics
        sample.output_tokens = metrics.completion_tokens
        sample.tokens_source = metrics.completion_tokens_source
        if result.tokens.prompt_source == "server" and result.tokens.prompt_tokens is not None:
            sample.prompt_tokens = result.tokens.prompt_tokens
            sample.prompt_tokens_source = "server"
        else:
            sample.prompt_tokens = prompt.prompt_len
        if chunks:
            sample.outcome = "ok"
            self._progress.completed += 1
        else:
            # As vLLM: a stream that ended without a single output chunk has no TTFT.
            sample.error_type = "NoOutput"
            sample.error = f"the stream ended ({result.status}) without any output chunk"
            self._progress.failed += 1


async def _tick(progress: Progress, report: Callable[[Progress], None]) -> None:
    while True:
        report(progress.copy())
        await anyio.sleep(PROGRESS_EVERY)


async def run_load(
    target: Target,
    requests: Sequence[PlannedRequest],
    *,
    max_concurrency: int | None = None,
    num_warmups: int = 0,
    on_progress: Callable[[Progress], None] | None = None,
    ready: Callable[[], Awaitable[float]] | None = None,
    worker: int = 0,
) -> LoadResult:
    """Send ``requests``, each at its arrival time, at most ``max_concurrency`` at once.

    ``num_warmups`` requests (the first prompt, not recorded) go first; then ``ready()``
    returns the ``time.perf_counter()`` moment the run starts (default: now), so that
    several processes can start together.

    Example::

        result = await run_load(target, plan, max_concurrency=8)
        summarize_run(result.samples, duration=result.wall)
    """
    progress = Progress(total=len(requests))
    report = on_progress or (lambda _: None)
    # retry=0: a failure shows as one, as in vLLM's benchmark, instead of hiding in a retry.
    async with AsyncClient(
        target.base_url,
        model=target.model,
        api_key=target.api_key,
        timeout=target.timeout,
        retry=0,
        headers=target.headers,
    ) as client:
        sender = _Sender(client, target, Progress(total=0), worker)
        limiter = anyio.CapacityLimiter(max_concurrency or math.inf)
        if num_warmups and requests:
            warmup = PlannedRequest(-1, 0.0, requests[0].prompt)
            async with anyio.create_task_group() as group:
                for _ in range(num_warmups):
                    group.start_soon(_limited, limiter, sender.send, warmup, 0.0, 0.0)
        sender = _Sender(client, target, progress, worker)
        start = await ready() if ready is not None else time.perf_counter()
        await anyio.sleep(max(0.0, start - time.perf_counter()))
        cpu = time.process_time()
        samples: list[RequestSample] = []

        async def one(request: PlannedRequest, lag: float) -> None:
            samples.append(await _limited(limiter, sender.send, request, start, lag))

        async with anyio.create_task_group() as ticker:
            ticker.start_soon(_tick, progress, report)
            async with anyio.create_task_group() as group:
                for request in requests:
                    due = start + request.arrival
                    wait = due - time.perf_counter()
                    if wait > 0:
                        await anyio.sleep(wait)
                    group.start_soon(one, request, max(0.0, time.perf_counter() - due))
            ticker.cancel_scope.cancel()
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu
    report(progress.copy())
    samples.sort(key=lambda s: s.index)
    return LoadResult(samples, cpu=cpu, wall=wall, worker=worker)


async def _limited(
    limiter: anyio.CapacityLimiter,
    send: Callable[[PlannedRequest, float, float], Awaitable[RequestSample]],
    request: PlannedRequest,
    start: float,
    lag: float,
) -> RequestSample:
    async with limiter:
        return await send(request, start, lag)
