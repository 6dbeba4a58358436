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
    "retries_and_resume.py": [
        "1. 503, then a dropped connection mid-answer:\n"
        "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune.\n"
        "  -> complete, retries=1, resumes=1",
        "  on_retry: retry, attempt 2, after InternalServerError\n"
        "  on_retry: resume, attempt 3, after StreamInterrupted",
        "continue_final_message=True, add_generation_prompt=False, max_tokens=",
        "2. the same drop, resume off:\nMercury, Venus,\n  -> StreamInterrupted: kept 15 chars",
        "3. a stall mid-answer:\n"
        "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune.\n"
        "  -> complete, retries=0, resumes=1",
        "  on_retry: resume, attempt 2, after IdleTimeout",
        "  -> FirstTokenTimeout: kept 0 chars (interrupted)",
    ],
    "budgets.py": [
        "1. a prompt over its budget:\n  refused before sending: limit=prompt_tokens, allowed=200,",
        "  asked for max_tokens=500, sent max_tokens=28\n"
        "  status=complete, finish_reason=length\n"
        "  tokens: prompt 12 (server) + completion 28 (server) = 40 (budget 40)",
        "  status=budget, complete=False, max_tokens=12 per choice\n"
        "  tokens: prompt 24 (estimate) + completion 12 (chunks) = 36",
        "  on_exhausted='error': BudgetExceeded after 12 tokens,\n  partial: status=budget,",
        "  ran: max_tokens=60, length\n"
        "  ran: max_tokens=60, length\n"
        "  ran: max_tokens=43 (clamped to what the budget had left), length\n"
        "  refused: shared budget had 0 tokens left\n"
        "  charged 208 = the calls' result.tokens.total_tokens, 208",
        "TokenBudget(limit=250, balance=42, reserved=0, spent=208)",
    ],
    "per_user_quotas.py": [
        "[alice] 200, 440 chars, finish_reason=stop, 91 tokens;",
        "[alice] 429, Retry-After: ",
        "Token quota used up; try again in ",
        "[bob] 200, 440 chars, finish_reason=stop, 91 tokens;",
        "as Retry-After says\n[alice] 200, ",
    ],
    "testing_your_app.py": ["5 passed"],
    "fleet_routing.py": [
        # Both turns of a session on one replica (rendezvous hashing on the session).
        "; turn 2 on the same replica: True\n",
        # A break mid-answer is continued (resume) without repeating a character.
        "  every character once: True; resumes: 1\n",
        # replica-b is down: every call moves to another replica before its first token.
        "  6 of 6 answered, 0 by replica-b\n"
        "  back up: replica-a closed, replica-b closed, replica-c closed\n",
        # Every replica's waiting queue over the admission limit: refused, with a hint.
        "4. every replica reports a full queue: OverloadedError, not a longer queue\n"
        "  OverloadedError; an endpoint may have room in ",
        "  replica-a: waiting=100.0, in flight=0\n"
        "  replica-b: waiting=100.0, in flight=0\n"
        "  replica-c: waiting=100.0, in flight=0\n",
    ],
    "bench.py": [
        "8 streams x 64 tokens, against the built-in emulator",
        "time to first token   p50 ",
        "inter-token latency   p50 ",
        "tokens/s overall (512 tokens in ",
        "client CPU ",
        " us per chunk (",
    ],
    "observability.py": [
        "1. a call retried once, then complete:\n"
        "  [call 1] request 1 to localhost\n"
        "  [call 1] HTTP 503\n"
        "  [call 1] retry after InternalServerError\n"
        "  [call 1] request 2 to localhost\n"
        "  [call 1] HTTP 200\n"
        "  [call 1] finished: complete, 17 tokens, retries=1\n",
        "  [call 2] finished: cancelled, ",
        "first tokens queued by the async hook: 2",
        "  chat llmstream/fake-model: UNSET, error.type=-, events: request, response_headers, "
        "retry, request, response_headers, first_token",
        "  chat llmstream/fake-model: ERROR, error.type=cancelled,",
        "OpenTelemetry metrics: gen_ai.client.operation.duration, "
        "gen_ai.client.operation.time_per_output_chunk, "
        "gen_ai.client.operation.time_to_first_chunk, gen_ai.client.token.usage",
        'finish_reason="stop",model="llmstream/fake-model",status="complete"} 1.0',
        'finish_reason="",model="llmstream/fake-model",status="cancelled"} 1.0',
    ],
    "locustfile.py": [
        "type    name      requests  failures  median ms  p99 ms\n",
        "\nITL     short ",
        "\nSTREAM  short ",
        "\nTTFT    short ",
    ],
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
