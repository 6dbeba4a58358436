"""Profile llmstream's async client on the bench_clients workload (the numbers in PROFILE.md).

Streams ``--chunks`` chunks from the loopback server (its own process) with
``AsyncClient.stream`` and the defaults, under pyinstrument (a statistical profiler:
low overhead, so the split between layers is honest) and prints the call tree; with
``--cprofile``, runs cProfile instead and prints the functions by own time with their
call counts per chunk (cProfile's overhead inflates absolute times, but the call
counts are exact).

Run::

    pip install pyinstrument
    PYTHONPATH=src python benchmarks/profile_clients.py
    PYTHONPATH=src python benchmarks/profile_clients.py --cprofile
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent / "src"))  # after PYTHONPATH, which wins

from bench_clients import _setup_llmstream_async  # noqa: E402
from vllm_sse_server import serve_in_subprocess  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Profile llmstream's async client.")
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--cprofile", action="store_true", help="cProfile with call counts")
    parser.add_argument("--quick", action="store_true", help="5,000 chunks")
    args = parser.parse_args(argv)
    n = 5_000 if args.quick else args.chunks

    with serve_in_subprocess() as url:
        loop = asyncio.new_event_loop()
        run, close = loop.run_until_complete(_setup_llmstream_async(url))
        loop.run_until_complete(run(min(n, 2_000)))  # warm-up
        if args.cprofile:
            profiler = cProfile.Profile()
            profiler.enable()
            count = loop.run_until_complete(run(n))
            profiler.disable()
            stats = pstats.Stats(profiler)
            print(f"{count:,} chunks; own time per chunk (us) and calls per chunk:")
            rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
            for (file, line, func), (_cc, calls, own, _cum, _callers) in rows[:30]:
                where = f"{Path(file).parent.name}/{Path(file).name}:{line}"
                print(f"  {own / n * 1e6:7.2f} us  {calls / n:6.2f}/chunk  {func}  ({where})")
        else:
            try:
                from pyinstrument import Profiler
            except ImportError:
                print("pyinstrument is not installed: pip install pyinstrument (or use --cprofile)")
                return 0
            profiler = Profiler(interval=0.0005, async_mode="disabled")
            profiler.start()
            count = loop.run_until_complete(run(n))
            profiler.stop()
            print(f"{count:,} chunks")
            print(profiler.output_text(unicode=False, color=False, show_all=False))
        loop.run_until_complete(close())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
