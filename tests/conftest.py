"""Shared fixtures: both anyio backends, the recorded vLLM vectors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def load_vector(path: Path) -> tuple[bytes, dict[str, Any]]:
    """The SSE body and the JSON description (request + expected) of one vector."""
    return path.read_bytes(), json.loads(path.with_suffix(".json").read_text("utf-8"))


VECTOR_PATHS = sorted((DATA / "vllm").glob("*.sse")) + sorted(
    (DATA / "vllm" / "v0.33.0").glob("*.sse")
)


def vector_id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}" if path.parent.name != "vllm" else path.stem
