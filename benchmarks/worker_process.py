"""A benchmark's worker: a child process that measures one client on request.

The parent starts it, waits for ``READY``, then writes one line per measurement and reads
one JSON line back; closing its standard input ends it. Each client runs in a process of
its own, so one client's imports, garbage and event loop never weigh on another's.
"""

from __future__ import annotations

import json
import subprocess


class WorkerProcess:
    """One worker child process, spoken to a line at a time."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        ready = self._readline()
        if ready != "READY":
            raise RuntimeError(f"worker {name} did not start: {ready!r}")

    def _readline(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def ask(self, request: str) -> dict:
        """Send one request line; the worker's JSON answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        line = self._readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died (exit code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
