"""Start-up: ``import llmstream`` against ``import openai``, and a first request's first token.

Each import run is ``python -X importtime -c "import <module>"`` in a new process; the
total is the cumulative time of the top-level import (the interpreter's own start-up,
``site`` and ``encodings``, is not in it). Medians over ``--runs`` runs, the modules
interleaved. Also lists the modules that cost ``import llmstream`` the most (their own
"self" time, median over the runs).

The first request is timed in a fresh process too, after ``import llmstream``: from
making the client (and, in process, the emulator) to the first token of its first
stream, against the emulator in process (``FakeVLLM().transport()``, what
``llmstream chat --fake`` uses) and against it on a loopback socket (a client with
httpx's own transport, as against a real server; the server is started first and is
not timed). ``TTFT`` is the stream's own ``metrics.time_to_first_token``, what the
command line prints.

Run::

    PYTHONPATH=src python benchmarks/bench_import.py            # ~20 s
    PYTHONPATH=src python benchmarks/bench_import.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_MS = 150.0


# llmstream's runtime dependencies, imported as llmstream uses them: what `import llmstream`
# cannot cost less than on a machine. pydantic imports much of itself (its field machinery,
# its plugin loader and with it importlib.metadata) only when the first model class is
# built, ~40 ms here, so the floor builds one; without it that cost looks like llmstream's.
DEPENDENCIES = (
    "import httpx, anyio, tenacity, pydantic\nclass Floor(pydantic.BaseModel):\n    x: int = 0"
)

# One first request in a fresh process; prints JSON seconds. argv[1]: "emulator" or
# "loopback". The emulator is made inside the timed span (it is part of `--fake`); the
# loopback server is started before it, as a real server would be running already.
FIRST_REQUEST = """
import json, sys, time
import llmstream
from llmstream.testing import FakeVLLM

kind = sys.argv[1]
server = FakeVLLM("Hello there, how are you?").serve().start() if kind == "loopback" else None
start = time.perf_counter()
if server is None:
    client = llmstream.Client("http://fake-vllm.invalid/v1", transport=FakeVLLM("Hi").transport())
else:
    client = llmstream.Client(server.base_url)
made = time.perf_counter()
with client, client.stream("Hi", max_tokens=4) as stream:
    for _ in stream:
        first = time.perf_counter()
        break
print(json.dumps({
    "client_to_first": first - start,
    "stream_to_first": first - made,
    "ttft": stream.result.metrics.time_to_first_token,
}))
if server is not None:
    server.stop()
"""


def import_times(module: str) -> tuple[float, dict[str, float]]:
    """One fresh run: (total ms for ``import module``, self ms per module imported by it).

    ``module`` may also be a statement (see ``DEPENDENCIES``): its total is then every
    top-level import it made.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*filter(None, [env.get("PYTHONPATH")]), str(ROOT / "src")])
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", module if " " in module else f"import {module}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line[len("import time:") :].split("|", 2)
        rows.append((int(self_us), int(cumulative_us), name.rstrip()))
    # Everything logged after the interpreter's own start-up belongs to this import; its
    # top-level (unindented) rows add up to the total.
    start = max(i for i, (_s, _c, n) in enumerate(rows) if n.strip() in ("site", "encodings"))
    mine = rows[start + 1 :]
    total = sum(c for _s, c, n in mine if not n.startswith("  "))
    own = {n.strip(): s / 1e3 for s, _c, n in mine}
    return total / 1e3, own


def first_request(kind: str) -> dict[str, float]:
    """One fresh process's first request (see ``FIRST_REQUEST``): its timings in seconds."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*filter(None, [env.get("PYTHONPATH")]), str(ROOT / "src")])
    proc = subprocess.run(
        [sys.executable, "-c", FIRST_REQUEST, kind],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    timings: dict[str, float] = json.loads(proc.stdout)
    return timings


def report_first_requests(runs: int) -> None:
    """Print the medians of ``runs`` fresh first requests, in process and on loopback."""
    kinds = ("emulator", "loopback")
    for kind in kinds:  # warm the bytecode caches
        first_request(kind)
    samples: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    for _ in range(runs):
        for kind in kinds:
            samples[kind].append(first_request(kind))
    print(f"\nFirst request to its first token, {runs} fresh processes, median ms (min-max):")
    labels = {
        "client_to_first": "client made -> first token",
        "stream_to_first": "stream() -> first token",
        "ttft": "TTFT (metrics)",
    }
    for kind in kinds:
        where = "emulator in process" if kind == "emulator" else "emulator on loopback"
        print(f"  {where}:")
        for key, label in labels.items():
            ms = [sample[key] * 1e3 for sample in samples[kind]]
            print(
                f"    {label:<27} {statistics.median(ms):7.1f} ms   ({min(ms):.1f}-{max(ms):.1f})"
            )


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Import time of llmstream vs openai.")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--first-request-runs", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="3 runs of each")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args(argv)
    runs = 3 if args.quick else args.runs
    first_runs = 3 if args.quick else args.first_request_runs

    modules = ["llmstream", DEPENDENCIES]
    if _importable("openai"):
        modules.append("openai")
    else:
        print("openai is not installed: skipping it (pip install openai).")
    for module in modules:  # warm the bytecode caches
        import_times(module)

    totals: dict[str, list[float]] = {m: [] for m in modules}
    self_ms: dict[str, list[float]] = defaultdict(list)
    for _ in range(runs):
        for module in modules:
            total, own = import_times(module)
            totals[module].append(total)
            if module == "llmstream":
                for name, ms in own.items():
                    self_ms[name].append(ms)

    print(f"python -X importtime -c 'import X', {runs} fresh runs, median (min-max):")
    for module in modules:
        t = totals[module]
        label = "its deps" if module == DEPENDENCIES else module
        print(f"  {label:<10} {statistics.median(t):7.1f} ms   ({min(t):.1f}-{max(t):.1f})")
    median = statistics.median(totals["llmstream"])
    deps = statistics.median(totals[DEPENDENCIES])
    print("  (its deps: httpx, httpx_sse, anyio, tenacity, pydantic and one pydantic model class)")
    print(f"  llmstream's own share: {median - deps:.1f} ms (llmstream - its deps, medians)")
    verdict = "PASS" if median < TARGET_MS else "FAIL"
    print(f"  llmstream target < {TARGET_MS:.0f} ms: {verdict}")
    if verdict == "FAIL" and deps >= TARGET_MS * 0.8:
        print(
            f"  its dependencies alone take {deps:.1f} ms here: this machine imports too "
            "slowly for the target"
        )
    if "openai" in totals:
        print(f"  openai / llmstream: {statistics.median(totals['openai']) / median:.2f}x")

    heaviest = sorted(self_ms.items(), key=lambda kv: statistics.median(kv[1]), reverse=True)
    print(f"\nThe {args.top} heaviest modules under `import llmstream` (self time, median):")
    for name, values in heaviest[: args.top]:
        print(f"  {statistics.median(values):7.2f} ms  {name}")
    by_package: dict[str, float] = defaultdict(float)
    for name, values in self_ms.items():
        by_package[name.split(".")[0]] += statistics.median(values)
    print("\nBy top-level package (sum of self times):")
    for name, ms in sorted(by_package.items(), key=lambda kv: kv[1], reverse=True)[: args.top]:
        print(f"  {ms:7.2f} ms  {name}")
    report_first_requests(first_runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
