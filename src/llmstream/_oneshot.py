"""One call, one stream of text: the direct port of a ``streamLLMRequest`` helper."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from ._client import AsyncClient, Client

__all__ = ["stream_llm_request", "stream_llm_request_sync"]


async def stream_llm_request(
    prompt: str,
    max_tokens: int = 512,
    *,
    base_url: str | None = None,
    model: str | None = None,
    temperature: float = 0.7,
    api_key: str | None = None,
    **extra_params: Any,
) -> AsyncIterator[str]:
    """Stream the answer to ``prompt`` as text deltas, with a client made for the call.

    The connection closes when the loop ends, breaks or raises. Errors are the
    same as the client's: ``APIStatusError`` for a non-2xx answer,
    ``StreamInterrupted`` when the stream breaks off.

    Example::

        async for text in llmstream.stream_llm_request("Hi", 64, base_url=url):
            print(text, end="", flush=True)
    """
    async with (
        AsyncClient(base_url, model=model, api_key=api_key) as client,
        client.stream(
            prompt, max_tokens=max_tokens, temperature=temperature, **extra_params
        ) as stream,
    ):
        async for text in stream:
            yield text


def stream_llm_request_sync(
    prompt: str,
    max_tokens: int = 512,
    *,
    base_url: str | None = None,
    model: str | None = None,
    temperature: float = 0.7,
    api_key: str | None = None,
    **extra_params: Any,
) -> Iterator[str]:
    """The sync twin of :func:`stream_llm_request`.

    Example::

        for text in llmstream.stream_llm_request_sync("Hi", 64, base_url=url):
            print(text, end="", flush=True)
    """
    with (
        Client(base_url, model=model, api_key=api_key) as client,
        client.stream(
            prompt, max_tokens=max_tokens, temperature=temperature, **extra_params
        ) as stream,
    ):
        yield from stream
