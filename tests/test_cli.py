"""The ``llmstream`` command, run as a user runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmstream._cli import main
from llmstream.testing import FakeVLLM

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMSTREAM_", "OPENAI_"))}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_chat_fake_streams_and_prints_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chat", "--fake", "--fake-token-delay", "0", "What is vLLM?"]) == 0
    out, err = capsys.readouterr()
    assert "You asked: What is vLLM?" in out
    assert "emulator" in err and "not a model" in err
    assert "TTFT" in err and "tokens/s" in err and "| stop]" in err


def test_chat_against_a_server(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeVLLM("Served answer.")
    with fake.serve() as server:
        code = main(["chat", "--base-url", server.base_url, "--max-tokens", "2", "Hi"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out == "Served answer\n"  # two tokens: "Served", " answer"
    assert "| length]" in err
    assert fake.requests[-1].json is not None and fake.requests[-1].json["max_tokens"] == 2


def test_models_lists_the_served_models(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeVLLM(model="org/model-a").serve() as server:
        assert main(["models", "--base-url", server.base_url]) == 0
    assert capsys.readouterr().out.strip() == "org/model-a"


def test_errors_are_one_clear_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeVLLM().serve() as server:
        assert main(["chat", "--base-url", server.base_url, "--model", "nope", "Hi"]) == 1
    err = capsys.readouterr().err
    assert "llmstream: error: HTTP 404" in err and "nope" in err
    assert "Traceback" not in err


def test_ctrl_c_stops_the_stream_and_closes_the_connection() -> None:
    fake = FakeVLLM("one two three four five six", token_delay=1.0)
    with fake.serve() as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmstream", "chat", "--base-url", server.base_url, "Hi"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(),
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.read(3) == "one"  # the first token arrived; the next is 1 s away
        sent_at = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        disconnect = fake.wait_for_disconnect(timeout=10)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130
    assert disconnect.time - sent_at < 0.5
    assert "stopped]" in err and "Traceback" not in err
