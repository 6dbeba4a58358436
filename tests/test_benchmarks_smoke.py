"""The benchmarks run end to end in their quick modes (no timing is checked: CI machines vary).

Each benchmark is started as a script, the way the README runs it, so a change to the
library that breaks one shows up here instead of the next time someone measures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def run(script: str, *args: str, timeout: float = 120) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_bench_clients_quick() -> None:
    out = run("bench_clients.py", "--chunks", "300", "--rounds", "1")
    for row in ("llmstream-async", "llmstream-sync", "hand-rolled", "httpx-bytes", "raw-floor"):
        assert row in out
    assert "openai" in out  # its row, or the message saying it was skipped


def test_bench_concurrency_quick() -> None:
    out = run(
        "bench_concurrency.py",
        "--streams",
        "8",
        "--tokens",
        "5",
        "--delay",
        "0.005",
        "--rounds",
        "1",
    )
    assert "llmstream-async" in out
    assert "!!" not in out  # every stream received every chunk
    assert "TTFT p99" in out and "targets at 8 streams" in out
    assert "p99 once open" in out and "(once open: p99" in out


def test_bench_concurrency_find_max() -> None:
    # A limit no client meets, so the search ends at its first steps.
    out = run(
        "bench_concurrency.py",
        *("--find-max", "llmstream-async", "--max-delay", "0.0001"),
        *("--tokens", "2", "--delay", "0.005", "--rounds", "1"),
    )
    assert "llmstream-async: holds 0 streams with p99 added delay under 0.0001 ms" in out


def test_bench_stream_open_quick() -> None:
    out = run("bench_stream_open.py", "--streams", "16", "--rounds", "2", "--repeat", "1")
    assert "us of CPU per stream" in out


def test_bench_concurrency_options() -> None:
    # The garbage-collector tuning, the read-ahead and (when installed) uvloop.
    loop = ["--loop", "uvloop"] if importlib.util.find_spec("uvloop") else []
    out = run(
        "bench_concurrency.py",
        *("--streams", "4", "--tokens", "3", "--delay", "0.005", "--rounds", "1"),
        *("--clients", "llmstream-async,raw-floor", "--buffer", "0"),
        *("--gc-threshold", "10000", "--gc-freeze", *loop),
    )
    assert "GC threshold 10000, frozen after warm-up" in out
    assert "full GCs" in out and "steal" in out and "wakes from a 1 ms sleep" in out
    assert "!!" not in out


def test_bench_concurrency_emulator() -> None:
    out = run(
        "bench_concurrency.py",
        "--emulator",
        "--streams",
        "4",
        "--tokens",
        "5",
        "--delay",
        "0.005",
        "--rounds",
        "1",
    )
    assert "chunks/s" in out


def test_bench_import_quick() -> None:
    out = run("bench_import.py", "--quick", "--top", "3")
    assert "llmstream" in out
    assert "its deps" in out and "llmstream's own share" in out


def test_bench_micro_quick() -> None:
    out = run("bench_micro.py", "--number", "200", "--repeat", "1")
    assert "StreamSession.feed" in out


def test_bench_hooks_quick() -> None:
    out = run(
        "bench_hooks.py",
        *("--chunks", "200", "--calls", "2", "--rounds", "1", "--baseline", "HEAD"),
    )
    for row in ("async before", "async none", "async noop", "sync noop", "otel", "prometheus"):
        assert row in out


def test_profile_cprofile_quick() -> None:
    out = run("profile_clients.py", "--cprofile", "--chunks", "500")
    assert "calls per chunk" in out


def test_profile_pyinstrument_quick() -> None:
    pytest.importorskip("pyinstrument")
    out = run("profile_clients.py", "--chunks", "500")
    assert "chunks" in out


def test_bench_fleet_quick(tmp_path: Path) -> None:
    numbers = tmp_path / "fleet.json"
    out = run("bench_fleet.py", "--calls", "24", "--concurrency", "4", "--json", str(numbers))
    for row in ("round-robin", "load-aware", "hedged", "healthy-3", "targets:"):
        assert row in out
    assert "hedged p99 TTFT <= 1.5 x healthy-3 p99 TTFT" in out
    data = json.loads(numbers.read_text("utf-8"))
    assert [s["strategy"] for s in data["strategies"]] == [
        "round-robin",
        "load-aware",
        "hedged",
        "healthy-3",
    ]
    assert all(s["calls"] == 24 for s in data["strategies"])
    assert len(data["targets"]) == 3


def test_bench_fleet_repeat_pools_the_runs(tmp_path: Path) -> None:
    numbers = tmp_path / "fleet.json"
    out = run(
        "bench_fleet.py",
        *("--calls", "12", "--concurrency", "4", "--warmup", "20", "--repeat", "2"),
        *("--strategies", "hedged,healthy-3", "--json", str(numbers)),
    )
    assert "run by run" in out and "of 2)" in out
    data = json.loads(numbers.read_text("utf-8"))
    for strategy in data["strategies"]:
        assert strategy["calls"] == 24 and strategy["runs"] == 2
        assert len(strategy["ttft_p99_runs"]) == 2
