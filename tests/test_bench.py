"""``llmstream bench``: vLLM's definitions, pooled percentiles, arrivals, prompts, the runner.

The numbers-on-a-clock checks run the command against the emulator on loopback; the
definitions are checked on hand-made samples, where every figure is known exactly.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from llmstream import _cli
from llmstream._bench import _plot
from llmstream._bench._command import plan_requests
from llmstream._bench._errors import BenchUsageError
from llmstream._bench._prompts import custom_prompts, random_prompts, sharegpt_prompts
from llmstream._bench._report import (
    GeneratorLoad,
    ProgressDisplay,
    format_table,
    generator_warnings,
    to_json,
)
from llmstream._bench._runner import PlannedRequest, Progress, Target, run_load
from llmstream._bench._schedule import RampUp, arrival_times
from llmstream._bench._stats import RequestSample, distribution, percentile, summarize_run
from llmstream._bench._workers import split
from llmstream.testing import FakeVLLM, Fault

from .processes import as_at_a_terminal

ROOT = Path(__file__).resolve().parents[1]


def _bench_args(*argv: str) -> argparse.Namespace:
    return _cli._parser().parse_args(["bench", *argv])


def _cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMSTREAM_", "OPENAI_"))}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmstream", "bench", *argv],
        capture_output=True,
        text=True,
        env=_cli_env(),
        timeout=timeout,
    )


def _ok(index: int, ttft: float, gaps: list[float], tokens: int | None = None) -> RequestSample:
    return RequestSample(
        index=index,
        arrived=0.0,
        sent=0.0,
        outcome="ok",
        ttft=ttft,
        e2e=ttft + sum(gaps),
        itl=gaps,
        output_tokens=tokens if tokens is not None else len(gaps) + 1,
        tokens_source="server",
        prompt_tokens=10,
        prompt_tokens_source="server",
    )


# -- definitions ---------------------------------------------------------------------------


def test_percentiles_interpolate_linearly_as_numpy_does() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile([5.0], 99) == 5.0


def test_tpot_is_decode_time_over_tokens_after_the_first() -> None:
    # 5 tokens: TTFT 100 ms, then 4 gaps adding up to 400 ms -> TPOT 100 ms.
    sample = _ok(0, 0.1, [0.05, 0.15, 0.1, 0.1])
    assert sample.tpot == pytest.approx(0.1)
    # The server's count wins over the chunks: 9 tokens in 5 chunks -> 400 ms / 8.
    assert _ok(0, 0.1, [0.05, 0.15, 0.1, 0.1], tokens=9).tpot == pytest.approx(0.05)
    assert _ok(0, 0.1, [], tokens=1).tpot is None


def test_itl_pools_every_gap_of_every_request() -> None:
    # One long stream of 10 ms gaps and one short one of 100 ms gaps: pooled, the median
    # gap is 10 ms; a median of per-request medians would say 55 ms.
    samples = [_ok(0, 0.1, [0.01] * 9), _ok(1, 0.1, [0.1] * 2)]
    summary = summarize_run(samples, duration=1.0)
    assert summary.itl is not None
    assert summary.itl.count == 11
    assert summary.itl.p50 == pytest.approx(10.0)
    assert summary.itl.mean == pytest.approx((0.09 + 0.2) / 11 * 1000)


def test_cancelled_and_failed_requests_stay_out_of_latencies_and_throughput() -> None:
    samples = [
        _ok(0, 0.1, [0.02] * 3),
        RequestSample(
            1, 0.0, 0.0, "cancelled", ttft=5.0, e2e=5.1, itl=[0.1], output_tokens=2, closed_in=0.002
        ),
        RequestSample(2, 0.0, 0.0, "error", error_type="InternalServerError", error="boom"),
        RequestSample(3, 0.0, 0.0, "error", error_type="InternalServerError", error="again"),
        RequestSample(4, 0.0, 0.0, "error", error_type="FirstTokenTimeout", error="slow"),
    ]
    s = summarize_run(samples, duration=2.0)
    assert (s.completed, s.cancelled, s.failed) == (1, 1, 3)
    assert s.ttft is not None and s.ttft.max == pytest.approx(100.0)
    assert s.total_output_tokens == 4 and s.output_throughput == pytest.approx(2.0)
    assert s.cancelled_output_tokens == 2
    assert s.cancel_close is not None and s.cancel_close.p50 == pytest.approx(2.0)
    assert [(e.type, e.count, e.example) for e in s.errors] == [
        ("InternalServerError", 2, "boom"),
        ("FirstTokenTimeout", 1, "slow"),
    ]


def test_goodput_counts_requests_within_every_objective() -> None:
    samples = [
        _ok(0, 0.2, [0.04] * 4),  # TTFT 200, TPOT 40: good
        _ok(1, 0.6, [0.04] * 4),  # TTFT 600: too slow to start
        _ok(2, 0.2, [0.06] * 4),  # TPOT 60: too slow to decode
        _ok(3, 0.3, [], tokens=1),  # one token: TPOT counts as 0, as vLLM does
    ]
    s = summarize_run(samples, duration=2.0, slos_ms={"ttft": 500, "tpot": 50})
    assert s.good_requests == 2 and s.goodput == pytest.approx(1.0)
    assert summarize_run(samples, duration=2.0).goodput is None


def test_json_keeps_the_definitions_and_milliseconds() -> None:
    s = summarize_run([_ok(0, 0.1, [0.02] * 3)], duration=1.0)
    load = GeneratorLoad(cpu=(0.1,), wall=(1.0,), cores=2)
    doc = to_json(s, load, config={"num_prompts": 1}, warnings=[])
    assert doc["ttft_ms"] == {
        "count": 1,
        "mean": 100.0,
        "p50": 100.0,
        "p90": 100.0,
        "p99": 100.0,
        "max": 100.0,
    }
    assert "(E2E - TTFT) / (output tokens - 1)" in json.dumps(doc["definitions"])
    assert doc["generator"]["core_share"] == [pytest.approx(0.1)]  # type: ignore[index]
    json.dumps(doc, allow_nan=False)


# -- the generator's honesty ---------------------------------------------------------------


def test_a_busy_generator_is_named_as_the_possible_bottleneck() -> None:
    s = summarize_run([_ok(0, 0.1, [0.02])], duration=1.0)
    busy = generator_warnings(s, GeneratorLoad(cpu=(0.95,), wall=(1.0,), cores=8))
    assert len(busy) == 1 and "not the server" in busy[0] and "--workers 2" in busy[0]
    assert generator_warnings(s, GeneratorLoad(cpu=(0.3,), wall=(1.0,), cores=8)) == []
    machine = generator_warnings(
        s, GeneratorLoad(cpu=(0.7, 0.7), wall=(1.0, 1.0), cores=2, emulator_cpu=0.5)
    )
    assert any("cores were about" in w and "emulator" in w for w in machine)


def test_late_dispatch_is_reported() -> None:
    late = [_ok(i, 0.1, [0.02]) for i in range(10)]
    for sample in late:
        sample.dispatch_lag = 0.2
    s = summarize_run(late, duration=1.0)
    warnings = generator_warnings(s, GeneratorLoad(cpu=(0.1,), wall=(1.0,), cores=2))
    assert any("could not keep the requested rate" in w for w in warnings)
    # Every request due at once: dispatching them takes time, and is no one's fault.
    at_once = generator_warnings(s, GeneratorLoad(cpu=(0.1,), wall=(1.0,), cores=2), paced=False)
    assert at_once == []


# -- arrivals ------------------------------------------------------------------------------


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip([0.0, *times], times, strict=False)]


def test_poisson_arrivals_last_at_n_over_rate_with_exponential_gaps() -> None:
    times = arrival_times(2000, rate=10.0, rng=random.Random(1))
    assert times[-1] == pytest.approx(200.0)
    assert times == sorted(times)
    gaps = _gaps(times)
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
    assert 0.9 < cv < 1.1  # exponential: the standard deviation equals the mean


@pytest.mark.parametrize(("burstiness", "cv"), [(0.25, 2.0), (4.0, 0.5)])
def test_burstiness_is_the_gamma_shape(burstiness: float, cv: float) -> None:
    gaps = _gaps(arrival_times(4000, rate=10.0, burstiness=burstiness, rng=random.Random(2)))
    measured = statistics.pstdev(gaps) / statistics.fmean(gaps)
    assert measured == pytest.approx(cv, rel=0.15)  # gamma(k): cv = 1 / sqrt(k)


def test_infinite_rate_sends_everything_at_once_and_infinite_burstiness_evenly() -> None:
    assert arrival_times(3, rate=math.inf) == [0.0, 0.0, 0.0]
    assert arrival_times(4, rate=2.0, burstiness=math.inf) == pytest.approx([0.5, 1.0, 1.5, 2.0])


def test_ramp_up_shortens_the_gaps() -> None:
    times = arrival_times(20, rate=math.inf, burstiness=math.inf, ramp_up=RampUp("linear", 1, 20))
    gaps = _gaps(times)
    assert gaps[0] == pytest.approx(1.0) and gaps[-1] == pytest.approx(1 / 20)
    assert gaps == sorted(gaps, reverse=True)
    assert RampUp("exponential", 1, 16).rate_at(0.5) == pytest.approx(4.0)


def test_the_plan_is_the_same_for_the_same_seed_and_cancels_the_share_asked() -> None:
    argv = (
        "--num-prompts",
        "40",
        "--request-rate",
        "5",
        "--cancel-fraction",
        "0.25",
        "--random-input-len",
        "8",
        "--random-output-len",
        "10",
    )
    one, two = plan_requests(_bench_args(*argv)), plan_requests(_bench_args(*argv))
    assert one == two
    cancelled = [r for r in one if r.cancel_after is not None]
    assert len(cancelled) == 10
    assert all(1 <= r.cancel_after <= 9 for r in cancelled)  # type: ignore[operator]
    other = plan_requests(_bench_args(*argv, "--seed", "1"))
    assert [r.arrival for r in other] != [r.arrival for r in one]


# -- prompts -------------------------------------------------------------------------------


def test_random_prompts_have_the_lengths_asked() -> None:
    prompts = random_prompts(
        50, input_len=100, output_len=20, range_ratio=0.5, prefix_len=5, rng=random.Random(0)
    )
    assert all(10 <= p.output_len <= 30 for p in prompts)
    assert all(55 <= len(p.text.split()) <= 155 for p in prompts)
    assert all(p.prompt_len == len(p.text.split()) for p in prompts)
    prefixes = {tuple(p.text.split()[:5]) for p in prompts}
    assert len(prefixes) == 1  # the shared prefix
    assert len({p.text for p in prompts}) == 50


def test_custom_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "one two", "output_tokens": 7}\n\n{"prompt": "three"}\n')
    fixed = custom_prompts(path, 3, output_len=16, rng=random.Random(0), shuffle=False)
    assert [p.text for p in fixed[:2]] == ["one two", "three"] and len(fixed) == 3
    assert {p.output_len for p in fixed} == {16}
    with pytest.raises(BenchUsageError, match=r"line 3 has no \"output_tokens\""):
        custom_prompts(path, 2, output_len=-1, rng=random.Random(0))
    path.write_text("not json\n")
    with pytest.raises(BenchUsageError, match="line 1 is not JSON"):
        custom_prompts(path, 1, output_len=16, rng=random.Random(0))
    with pytest.raises(BenchUsageError, match="cannot read --dataset-path"):
        custom_prompts(tmp_path / "missing.jsonl", 1, output_len=16, rng=random.Random(0))


def test_sharegpt(tmp_path: Path) -> None:
    long_prompt = "word " * 40  # 200 characters: 50 tokens by the estimate
    data = [
        {
            "conversations": [
                {"from": "human", "value": long_prompt},
                {"from": "gpt", "value": "x" * 400},
            ]
        },
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "y" * 80}]},
        {"conversations": [{"from": "human", "value": long_prompt}]},
        {"id": "no conversations"},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    prompts = sharegpt_prompts(path, 2, output_len=None, rng=random.Random(0))
    # Only the first is usable ("hi" is under 4 tokens, the third has one turn): drawn twice.
    assert [(p.text, p.output_len, p.prompt_len) for p in prompts] == [(long_prompt, 100, 50)] * 2
    fixed = sharegpt_prompts(path, 1, output_len=12, rng=random.Random(0))
    assert fixed[0].output_len == 12
    path.write_text('{"not": "a list"}')
    with pytest.raises(BenchUsageError, match="expected a JSON list"):
        sharegpt_prompts(path, 1, output_len=None, rng=random.Random(0))


# -- the runner, on loopback -----------------------------------------------------------------


def _plan(
    count: int, output_len: int, cancel: dict[int, int] | None = None
) -> list[PlannedRequest]:
    prompts = random_prompts(count, input_len=8, output_len=output_len, rng=random.Random(0))
    return [PlannedRequest(i, 0.0, p, (cancel or {}).get(i)) for i, p in enumerate(prompts)]


@pytest.mark.anyio
async def test_runner_times_every_chunk_and_asks_for_the_output_length() -> None:
    fake = FakeVLLM(tokens=["tok "] * 50, token_delay=0.001)
    with fake.serve() as server:
        target = Target(server.base_url, "llmstream/fake-model", body={"ignore_eos": True})
        result = await run_load(target, _plan(4, 6), max_concurrency=2)
    bodies = [r.json for r in fake.requests if r.path.endswith("/chat/completions")]
    assert len(bodies) == 4
    assert all(b is not None and b["max_tokens"] == 6 and b["ignore_eos"] is True for b in bodies)
    for s in result.samples:
        assert s.outcome == "ok" and s.output_tokens == 6 and s.tokens_source == "server"
        assert len(s.itl) == 5 and s.ttft is not None and s.e2e is not None
        assert s.e2e == pytest.approx(s.ttft + sum(s.itl))
        assert s.prompt_tokens_source == "server" and s.prompt_tokens == 4 + 8
    assert result.cpu > 0 and result.wall > 0


@pytest.mark.anyio
async def test_cancelled_requests_close_their_connection_and_are_not_errors() -> None:
    fake = FakeVLLM(tokens=["tok "] * 50, token_delay=0.005)
    with fake.serve() as server:
        target = Target(server.base_url, "llmstream/fake-model")
        result = await run_load(target, _plan(4, 20, cancel={1: 3, 3: 5}))
        seen = await fake.await_disconnect(count=2)
    assert seen is not None
    outcomes = {s.index: s.outcome for s in result.samples}
    assert outcomes == {0: "ok", 1: "cancelled", 2: "ok", 3: "cancelled"}
    cancelled = [s for s in result.samples if s.outcome == "cancelled"]
    assert [s.output_tokens for s in cancelled] == [3, 5]
    assert all(s.closed_in is not None and s.error_type is None for s in cancelled)
    assert len(fake.disconnects) == 2


@pytest.mark.anyio
async def test_errors_are_recorded_by_type() -> None:
    fake = FakeVLLM(tokens=["tok "] * 10)
    fake.add_fault(Fault.http_status(500))
    fake.add_fault(Fault.inband_error(after_chunks=3))
    with fake.serve() as server:
        target = Target(server.base_url, "llmstream/fake-model")
        result = await run_load(target, _plan(4, 5), max_concurrency=1)
    summary = summarize_run(result.samples, duration=result.wall)
    assert (summary.completed, summary.failed) == (2, 2)
    assert sorted(e.type for e in summary.errors) == ["InternalServerError", "ServerStreamError"]


def test_split_deals_requests_and_concurrency_round_robin() -> None:
    target = Target("http://x/v1", "m")
    jobs = split(target, _plan(7, 3), 3, max_concurrency=4, num_warmups=2)
    assert [[r.index for r in j.requests] for j in jobs] == [[0, 3, 6], [1, 4], [2, 5]]
    assert [j.max_concurrency for j in jobs] == [2, 1, 1]
    assert [j.num_warmups for j in jobs] == [1, 1, 0]


def test_an_api_key_never_shows() -> None:
    target = Target("http://x/v1", "m", api_key="sk-very-secret", headers={"X-Key": "sk-2"})
    assert "sk-very-secret" not in repr(target) and "sk-2" not in repr(target)


# -- the display -----------------------------------------------------------------------------


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_one_line_on_a_terminal() -> None:
    stream = _Tty()
    display = ProgressDisplay(stream)
    display.update(Progress(total=10, sent=4, completed=2))
    display.close(Progress(total=10, sent=10, completed=9, failed=1))
    text = stream.getvalue()
    assert text.count("\r\x1b[K") == 2 and text.endswith("\n")
    assert "[2/10] 2 ok, 0 failed, 0 cancelled, 2 in flight" in text
    assert "[10/10] 9 ok, 1 failed" in text


def test_progress_writes_a_line_per_tenth_elsewhere() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(stream)
    for done in range(0, 101, 5):
        display.update(Progress(total=100, sent=100, completed=done))
    display.close(Progress(total=100, sent=100, completed=100))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in stream.getvalue()
    assert lines[0].startswith("[10/100]") and lines[-1].startswith("[100/100]")


def test_the_table_states_the_definitions_and_the_token_source() -> None:
    s = summarize_run([_ok(0, 0.1, [0.02] * 3)], duration=1.0, slos_ms={"ttft": 500})
    text = format_table(
        s,
        GeneratorLoad(cpu=(0.1,), wall=(1.0,), cores=2),
        max_concurrency=4,
        request_rate=math.inf,
        warnings=["look out"],
    )
    assert "TPOT = (E2E - TTFT) / (output tokens - 1)" in text
    assert "ITL = every gap between output chunks, pooled" in text
    assert "Output tokens counted from: server usage (1 requests)" in text
    assert "Request goodput (req/s):" in text and "ttft <= 500 ms" in text
    assert "WARNING: look out" in text


# -- plotting ------------------------------------------------------------------------------


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    samples = [_ok(i, 0.1, [0.02] * 5) for i in range(5)]
    samples.append(RequestSample(5, 0.0, 0.3, "error", error_type="X"))
    path = tmp_path / "run.png"
    _plot.plot_run(samples, path, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("gaps", "steps"), [(24, [0, 1, 2]), (27, [0, 1, 2, 2.75])])
def test_the_plot_rate_has_no_false_drop_at_the_end(gaps: int, steps: list[float]) -> None:
    # 10 chunks a second, from 0.05 s to 2.45 s (a tail too short to count: left out) or
    # to 2.75 s (its 8 chunks over 0.75 s: about 10 a second, not 8).
    seconds, rates = _plot.chunk_rates([_ok(0, 0.05, [0.1] * gaps)])
    assert seconds == pytest.approx(steps)
    assert all(9.5 <= r <= 11 for r in rates), rates


def test_plot_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(BenchUsageError, match=r'pip install "llmstream-sdk\[plot\]"'):
        _plot.check_plotting()


# -- the command, end to end -----------------------------------------------------------------


def test_emulator_paced_at_20ms_gives_20ms_itl_and_tpot() -> None:
    """A 20 ms-per-token emulator: median ITL and TPOT of 20 ms.

    The emulator sleeps 20 ms after each token it writes, so a gap is never shorter than
    20 ms on its side; on ours a gap can shrink only by as much as the previous chunk was
    late. Sleeps overshoot (a fraction of a millisecond idle, a few on a loaded 2-core
    machine; measured medians 20.4 to 20.9 ms), so the bounds are 19.5 ms below and 23 ms
    above. The medians are over 124 gaps (4 requests of 32 tokens), so that a few late
    wake-ups cannot move them. TTFT is checked against the 200 ms first-token delay,
    so that TPOT cannot hide it (E2E / tokens would be about 25.6 ms here, above 23).
    """
    done = _run_cli(
        "--fake",
        "--fake-token-delay",
        "0.02",
        "--fake-ttft",
        "0.2",
        "--num-prompts",
        "4",
        "--max-concurrency",
        "2",
        "--random-input-len",
        "8",
        "--random-output-len",
        "32",
        "--json",
        "-",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["completed"] == 4 and result["failed"] == 0
    assert result["output_tokens_from"] == {"server": 4, "chunks": 0}
    assert result["total_output_tokens"] == 128
    assert 19.5 <= result["itl_ms"]["p50"] <= 23.0, result["itl_ms"]
    assert 19.5 <= result["tpot_ms"]["p50"] <= 23.0, result["tpot_ms"]
    assert 199.0 <= result["ttft_ms"]["p50"] <= 230.0, result["ttft_ms"]
    assert result["itl_ms"]["count"] == 4 * 31
    assert "TTFT" in done.stderr and "TPOT" in done.stderr  # the table went to stderr


def test_workers_merge_raw_samples_into_exact_percentiles(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    done = _run_cli(
        "--fake",
        "--fake-token-delay",
        "0.002",
        "--num-prompts",
        "12",
        "--workers",
        "2",
        "--max-concurrency",
        "4",
        "--random-input-len",
        "4",
        "--random-output-len",
        "8",
        "--cancel-fraction",
        "0.25",
        "--json",
        str(out),
        "--save-detailed",
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    assert "Cancelled on purpose (--cancel-fraction):   3" in done.stdout
    result = json.loads(out.read_text())
    assert result["generator"]["workers"] == 2 and len(result["generator"]["cpu_s"]) == 2
    assert (result["completed"], result["cancelled"], result["failed"]) == (9, 3, 0)
    rows = result["requests"]
    assert sorted(r["index"] for r in rows) == list(range(12))
    assert {r["worker"] for r in rows} == {0, 1}
    pooled = distribution(g for r in rows if r["outcome"] == "ok" for g in r["itl"])
    assert pooled is not None
    for key in ("mean", "p50", "p90", "p99", "max", "count"):
        assert result["itl_ms"][key] == pytest.approx(getattr(pooled, key))


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT are POSIX")
@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_stops_the_run_quietly(workers: str) -> None:
    # A run of about 4 s (40 requests of 20 tokens at 10 ms, 2 at a time), stopped as a
    # terminal stops it, once the first tenth has ended (the workers are sending): SIGINT
    # to the whole process group, children included.
    argv = ["--fake", "--fake-token-delay", "0.01", "--num-prompts", "40", "--workers", workers]
    argv += ["--max-concurrency", "2", "--random-input-len", "4"]
    process = subprocess.Popen(
        [sys.executable, "-m", "llmstream", "bench", *argv, "--random-output-len", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_cli_env(),
        start_new_session=True,
        preexec_fn=as_at_a_terminal(),  # Ctrl-C works even if this run ignores SIGINT
    )
    try:
        assert process.stderr is not None
        seen = []
        for line in process.stderr:  # wait for the first progress line
            seen.append(line)
            if line.startswith("[") and "/40] " in line:
                break
        else:
            pytest.fail("".join(seen))
        os.killpg(process.pid, signal.SIGINT)
        _, rest = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    err = "".join(seen) + rest
    assert process.returncode == 130, err
    assert "Traceback" not in err, err
    assert "[stopped]" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset-name", "custom"], "--dataset-name custom needs --dataset-path FILE"),
        (["--dataset-path", "x.jsonl"], "--dataset-path is for --dataset-name custom or sharegpt"),
        (["--ramp-up-strategy", "linear", "--request-rate", "3"], "leave --request-rate out"),
        (["--ramp-up-strategy", "linear"], "needs --ramp-up-start-rps and --ramp-up-end-rps"),
        (["--save-detailed"], "--save-detailed adds to --json"),
        (["--workers", "3", "--max-concurrency", "2"], "--max-concurrency 2 is below --workers 3"),
        (["--extra-body", '{"stream": false}'], "stream cannot be passed in extra_body"),
        (["--extra-body", '{"messages": []}', "--workers", "2"], "messages cannot be passed"),
        (["--extra-body", "[" * 100_000], "expected a JSON object, got '[[["),
        (["--temperature", "nan"], "a value JSON cannot send"),
        (["--timeout", "0"], "argument --timeout: must be above 0 seconds, got 0"),
        (["--json", "/nonexistent-dir/run.json"], "cannot write --json /nonexistent-dir/run.json"),
        (["--plot", "/nonexistent-dir/run.png"], "cannot write --plot /nonexistent-dir/run.png"),
    ],
)
def test_bad_command_lines_exit_2_before_sending(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeVLLM()
    with fake.serve() as server:
        code = _cli.main(["bench", "--base-url", server.base_url, "--num-prompts", "2", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not [r for r in fake.requests if r.path.endswith("/chat/completions")]


def test_repeated_goodput_flags_add_up() -> None:
    args = _bench_args("--goodput", "ttft:500", "--goodput", "tpot:50", "e2el:900")
    assert dict(args.goodput) == {"ttft": 500, "tpot": 50, "e2el": 900}
    assert _bench_args().goodput == []


def test_goodput_keys_are_checked_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli.main(["bench", "--fake", "--goodput", "latency:5"]) == 2
    assert "KEY one of ttft, tpot, e2el" in capsys.readouterr().err


def test_against_a_server_with_a_key_that_never_shows(tmp_path: Path) -> None:
    fake = FakeVLLM(tokens=["tok "] * 8, api_key="sk-very-secret")
    out = tmp_path / "r.json"
    with fake.serve() as server:
        done = _run_cli(
            "--base-url",
            server.base_url,
            "--api-key",
            "sk-very-secret",
            "--num-prompts",
            "3",
            "--random-input-len",
            "4",
            "--random-output-len",
            "4",
            "--json",
            str(out),
            "--header",
            "X-Team=sk-header-secret",
        )
    assert done.returncode == 0, done.stderr
    text = done.stdout + done.stderr + out.read_text()
    assert "sk-very-secret" not in text and "sk-header-secret" not in text
    assert json.loads(out.read_text())["config"]["header_names"] == ["X-Team"]
    chats = [r for r in fake.requests if r.path.endswith("/chat/completions")]
    assert len(chats) == 3 and all(r.headers.get("x-team") == "sk-header-secret" for r in chats)


@pytest.mark.parametrize(
    ("argv", "arrivals"),
    [
        (
            ["--ramp-up-strategy", "linear", "--ramp-up-start-rps", "50"],
            "linear ramp-up from 50 to 400 req/s, burstiness 1",
        ),
        (["--request-rate", "200", "--burstiness", "0.5"], "200 req/s, burstiness 0.5"),
        ([], "inf (all at once)"),
    ],
)
def test_header_and_table_say_how_requests_arrive(
    argv: list[str], arrivals: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if "--ramp-up-strategy" in argv:
        argv = [*argv, "--ramp-up-end-rps", "400"]
    fake = FakeVLLM(tokens=["tok "] * 2)
    with fake.serve() as server:
        code = _cli.main(
            ["bench", "--base-url", server.base_url, "--num-prompts", "3", "--no-progress", *argv]
        )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"request rate {arrivals}, 1 worker(s)" in captured.err
    assert f"{'Request arrivals:':<44}{arrivals}\n" in captured.out


def test_every_request_failing_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeVLLM()
    for _ in range(2):
        fake.add_fault(Fault.http_status(503))
    with fake.serve() as server:
        code = _cli.main(
            [
                "bench",
                "--base-url",
                server.base_url,
                "--num-prompts",
                "2",
                "--model",
                "llmstream/fake-model",
                "--no-progress",
            ]
        )
    captured = capsys.readouterr()
    assert code == 1
    assert "no request completed" in captured.err
    assert "Failed requests:                            2" in captured.out


def test_every_request_cancelled_on_purpose_exits_0_and_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake = FakeVLLM(tokens=["tok "] * 8)
    with fake.serve() as server:
        argv = ["--base-url", server.base_url, "--num-prompts", "2", "--no-progress"]
        code = _cli.main(["bench", *argv, "--random-output-len", "8", "--cancel-fraction", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "every request was cancelled on purpose (--cancel-fraction 1)" in captured.err
    assert "the errors above say why" not in captured.err
    assert "Cancelled on purpose (--cancel-fraction):   2" in captured.out
