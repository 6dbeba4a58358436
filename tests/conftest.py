"""Shared fixtures: both anyio backends (and asyncio on uvloop), the recorded vLLM vectors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).parent / "data"


BACKENDS: list[Any] = ["asyncio", "trio"]
if importlib.util.find_spec("uvloop") is not None:
    # uvicorn's loop when it is installed: its transports and sockets are its own, not
    # asyncio's, and a client that reaches below httpx must work on them too.
    BACKENDS.append(pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"))


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return request.param


def load_vector(path: Path) -> tuple[bytes, dict[str, Any]]:
    """The SSE body and the JSON description (request + expected) of one vector."""
    return path.read_bytes(), json.loads(path.with_suffix(".json").read_text("utf-8"))


VECTOR_PATHS = sorted((DATA / "vllm").glob("*.sse")) + sorted(
    (DATA / "vllm" / "v0.33.0").glob("*.sse")
)


def vector_id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}" if path.parent.name != "vllm" else path.stem
