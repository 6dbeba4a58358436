"""Every program in examples/ runs to the end against the built-in emulator."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# What each example must print (stdout), run as `python examples/NAME.py`.
EXPECTED: dict[str, list[str]] = {
    "quickstart_async.py": ["PagedAttention stores the KV cache", "finish reason:  stop"],
    "quickstart_sync.py": ["models: llmstream/fake-model", "[complete, finish_reason=stop"],
    "one_call_port.py": [
        "stream_llm_request:\n1. Say what happened.",
        "stream_llm_request_sync:\n1. Say what happened.",
        "first line only: 1. Say what happened.\n",
    ],
    "tool_calls.py": [
        "finish reason: tool_calls",
        "get_weather({'city': 'Paris'})",
        "It is 18 °C and sunny in Paris.",
    ],
    "reasoning.py": ["--- thinking ---\n17 * 23", "--- answer ---\n391", "reasoning tokens:"],
    "typed_chunks.py": ["chunk: choice 1 role='assistant'", "choice 1: 'Biscuit' (stop)"],
    "errors_and_partials.py": [
        "server error mid-stream: code 503",
        "partial: status='error'",
        "partial: status='interrupted'",
        "HTTP 503, retry after 2 s",
        "attempt 4:\nMercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune.",
    ],
    "testing_your_app.py": ["5 passed"],
    "fastapi_relay.py": [
        "[browser] 'word0 '",
        "[browser] closing the tab",
        "[vLLM emulator] request cancelled",
        "[app] upstream: cancelled",
    ],
}


def _env() -> dict[str, str]:
    """The environment without a server configured, so the examples use the emulator."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMSTREAM_", "OPENAI_"))}
    paths = [str(ROOT / "src"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
    )


def test_every_example_is_checked() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_has_a_docstring_saying_how_to_run_it(name: str) -> None:
    doc = ast.get_docstring(ast.parse((EXAMPLES / name).read_text("utf-8")))
    assert doc and f"examples/{name}" in doc


@pytest.mark.parametrize("name", sorted(set(EXPECTED) - {"testing_your_app.py"}))
def test_example_runs_against_the_emulator(name: str) -> None:
    done = _run(str(EXAMPLES / name))
    assert done.returncode == 0, done.stderr
    for expected in EXPECTED[name]:
        assert expected in done.stdout, done.stdout


def test_testing_example_passes_under_pytest() -> None:
    done = _run(
        "-m", "pytest", str(EXAMPLES / "testing_your_app.py"), "-q", "-p", "no:cacheprovider"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for expected in EXPECTED["testing_your_app.py"]:
        assert expected in done.stdout
