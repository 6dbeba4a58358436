"""Run the same scenario through the async client and the sync client.

Tests are async (both anyio backends); the sync client runs in a worker
thread, as it would in a threaded application.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

import llmstream

MODES = ["async", "sync"]


@dataclass
class Outcome:
    """What a consumer saw: the text pieces, and the result or the error."""

    pieces: list[str] = field(default_factory=list)
    result: llmstream.StreamResult | None = None
    error: llmstream.LLMStreamError | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def final(self) -> llmstream.StreamResult:
        """The result, or the error's partial result."""
        if self.result is not None:
            return self.result
        assert self.error is not None and self.error.partial is not None
        return self.error.partial


async def collect(
    mode: str,
    *,
    base_url: str = "http://fake-vllm.test/v1",
    transport: Any = None,
    prompt: llmstream.PromptOrMessages = "Hi",
    client_kwargs: dict[str, Any] | None = None,
    on_piece: Callable[[llmstream.StreamResult], bool] | None = None,
    **stream_kwargs: Any,
) -> Outcome:
    """Stream one request to the end (or until ``on_piece`` says stop) in ``mode``."""
    kwargs = dict(client_kwargs or {})
    if transport is not None:
        kwargs["transport"] = transport
    outcome = Outcome()
    if mode == "async":
        try:
            async with (
                llmstream.AsyncClient(base_url, **kwargs) as client,
                client.stream(prompt, **stream_kwargs) as stream,
            ):
                async for piece in stream:
                    outcome.pieces.append(piece)
                    if on_piece is not None and on_piece(stream.snapshot()):
                        break
            outcome.result = stream.result
        except llmstream.LLMStreamError as exc:
            outcome.error = exc
        return outcome

    def run_sync() -> None:
        try:
            with (
                llmstream.Client(base_url, **kwargs) as client,
                client.stream(prompt, **stream_kwargs) as stream,
            ):
                for piece in stream:
                    outcome.pieces.append(piece)
                    if on_piece is not None and on_piece(stream.snapshot()):
                        break
            outcome.result = stream.result
        except llmstream.LLMStreamError as exc:
            outcome.error = exc

    await anyio.to_thread.run_sync(run_sync)
    return outcome


def no_raw_httpx(exc: BaseException | None) -> bool:
    """True when no httpx exception escapes (it may be the cause, never the error)."""
    return not isinstance(exc, httpx.HTTPError)
