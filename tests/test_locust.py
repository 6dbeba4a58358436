"""``llmstream.locust``: streams reported to Locust, on its local runner and on a cluster.

Locust monkey-patches the standard library with gevent when it is imported, so it is
only ever imported in child processes here, never in the test process; the emulator
they load-test serves from the test process, on loopback.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmstream.testing import FakeVLLM, Fault

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None,
    reason='Locust is not installed (pip install "llmstream-sdk[locust]", in the test extra)',
)

LOCUSTFILE = """
from locust import constant, task

from llmstream.locust import LLMStreamUser


class ChatUser(LLMStreamUser):
    wait_time = constant(0.05)
    max_tokens = 8

    @task
    def ask(self) -> None:
        self.stream_chat("Hello there", name="hello")
"""

LOCAL_RUN = """
import json, sys, time
from locust.env import Environment
from locustfile import ChatUser

env = Environment(user_classes=[ChatUser], host=sys.argv[1])
runner = env.create_local_runner()
runner.start(int(sys.argv[2]), spawn_rate=100)
time.sleep(float(sys.argv[3]))
runner.quit()
print(json.dumps({
    f"{kind} {name}": {
        "requests": e.num_requests,
        "failures": e.num_failures,
        "median": e.median_response_time,
        "lengths": e.total_content_length,
    }
    for (name, kind), e in env.stats.entries.items()
}))
print(json.dumps([str(e.error) for e in env.stats.errors.values()]))
"""


ONE_STREAM = """
import json, sys, time
from locust.env import Environment
from llmstream._client import Client

# A server slow to list its models (300 ms), as a cold one can be.
get_json = Client._get_json
def slow_models(self, request):
    if request.url.endswith("/models"):
        time.sleep(0.3)
    return get_json(self, request)
Client._get_json = slow_models

from locustfile import ChatUser

ChatUser.host = sys.argv[1]  # as Locust's runner sets it
env = Environment(user_classes=[ChatUser], host=sys.argv[1])
events = []
env.events.request.add_listener(
    lambda request_type, response_time, **_: events.append([request_type, response_time])
)
user = ChatUser(env)
user.ask()
user.on_stop()
print(json.dumps(events))
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMSTREAM_", "OPENAI_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def _files(tmp_path: Path) -> Path:
    (tmp_path / "locustfile.py").write_text(LOCUSTFILE)
    (tmp_path / "local_run.py").write_text(LOCAL_RUN)
    return tmp_path


def _local_run(tmp_path: Path, host: str, users: int, seconds: float) -> tuple[dict, list[str]]:  # type: ignore[type-arg]
    done = subprocess.run(
        [sys.executable, "local_run.py", host, str(users), str(seconds)],
        cwd=_files(tmp_path),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    stats, errors = done.stdout.strip().splitlines()[-2:]
    return json.loads(stats), json.loads(errors)


def test_ttft_itl_and_streams_are_locust_metrics(tmp_path: Path) -> None:
    fake = FakeVLLM(tokens=[" t"] * 16, ttft=0.1, token_delay=0.02)
    with fake.serve() as server:
        stats, errors = _local_run(tmp_path, server.base_url, users=2, seconds=2.0)
    assert errors == []
    ttft, itl, stream = stats["TTFT hello"], stats["ITL hello"], stats["STREAM hello"]
    assert stream["requests"] >= 2 and stream["failures"] == 0
    # 8 tokens a stream: 7 gaps each; output tokens are each stream's length.
    assert itl["requests"] >= 7 * stream["requests"]
    assert stream["lengths"] == 8 * stream["requests"]
    # Locust rounds its medians (to 1 ms below 100 ms, to 10 ms above).
    assert 100 <= ttft["median"] <= 140, ttft
    assert 20 <= itl["median"] <= 26, itl
    assert 240 <= stream["median"] <= 300, stream  # 100 ms + 7 x 20 ms


def test_ttft_counts_from_the_chat_request_not_the_model_lookup(tmp_path: Path) -> None:
    (_files(tmp_path) / "one_stream.py").write_text(ONE_STREAM)
    fake = FakeVLLM(tokens=[" t"] * 16, ttft=0.1, token_delay=0.01)
    with fake.serve() as server:
        done = subprocess.run(
            [sys.executable, "one_stream.py", server.base_url],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        paths = [r.path for r in fake.requests]
    assert done.returncode == 0, done.stderr
    assert paths == ["/v1/models", "/v1/chat/completions"]  # the model was looked up
    times = dict(json.loads(done.stdout.strip().splitlines()[-1])[:1])
    assert 100 <= times["TTFT"] < 300, times  # 100 ms to the first token, not 400


def test_a_failed_stream_is_a_locust_failure(tmp_path: Path) -> None:
    fake = FakeVLLM(tokens=[" t"] * 16, token_delay=0.01)
    fake.add_fault(Fault.http_status(500))
    fake.add_fault(Fault.disconnect(after_chunks=3))
    with fake.serve() as server:
        stats, errors = _local_run(tmp_path, server.base_url, users=1, seconds=1.0)
    stream = stats["STREAM hello"]
    assert stream["failures"] == 2 and stream["requests"] > 2
    assert any("HTTP 500 Internal Server Error" in e for e in errors), errors
    assert any("retry the request to get the full answer" in e for e in errors), errors


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_master_and_a_worker_on_loopback(tmp_path: Path) -> None:
    """Locust's own cluster: the worker streams, the master's CSV has the metrics."""
    _files(tmp_path)
    port = str(_free_port())
    fake = FakeVLLM(tokens=[" t"] * 16, token_delay=0.005)
    with fake.serve() as server:
        common = ["-m", "locust", "-f", "locustfile.py", "--headless"]
        master = subprocess.Popen(
            [sys.executable, *common, "--master", "--master-bind-host", "127.0.0.1",
             "--master-bind-port", port, "--expect-workers", "1", "-u", "2", "-r", "2",
             "-t", "3s", "--host", server.base_url, "--csv", "run", "--only-summary"],
            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        worker = subprocess.Popen(
            [sys.executable, *common, "--worker", "--master-host", "127.0.0.1",
             "--master-port", port],
            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            out, _ = master.communicate(timeout=60)
            worker.communicate(timeout=30)
        finally:
            for process in (master, worker):
                if process.poll() is None:
                    process.kill()
                    process.wait()
    assert master.returncode == 0, out
    with (tmp_path / "run_stats.csv").open() as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    for kind in ("TTFT", "ITL", "STREAM"):
        assert int(rows[(kind, "hello")]["Request Count"]) > 0, rows
    assert int(rows[("STREAM", "hello")]["Failure Count"]) == 0


def test_without_locust_the_error_names_the_extra() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["locust"] = None  # as if it were not installed
        import llmstream
        try:
            import llmstream.locust
        except ImportError as exc:
            assert isinstance(exc, llmstream.InvalidRequestError)
            print(exc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert 'pip install "llmstream-sdk[locust]"' in done.stdout
