"""``llmstream bench --fake``: the built-in vLLM emulator on loopback, in a child process.

In its own process so that the generator's CPU figure counts the generator alone, and so
that the emulator's work does not delay the generator's event loop (on a machine of two
cores or more).
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection

from ._errors import BenchError
from ._signals import ignore_sigint, sigint_blocked

__all__ = ["EmulatorProcess", "emulator_process"]

_START_TIMEOUT = 60.0


def _serve(parent: Connection, tokens: int, ttft: float, token_delay: float) -> None:
    """The child: serve until the parent says stop; answer CPU-time questions meanwhile."""
    ignore_sigint()
    import time

    from ..testing import FakeVLLM

    # Every answer is `tokens` tokens, cut to the request's max_tokens ("length"), so
    # output lengths are as asked, as with vLLM's ignore_eos.
    fake = FakeVLLM(tokens=[" token"] * tokens, ttft=ttft, token_delay=token_delay)
    with fake.serve() as server:
        parent.send(server.base_url)
        with contextlib.suppress(EOFError):
            while parent.recv() == "cpu":
                parent.send(time.process_time())


@dataclass
class EmulatorProcess:
    """The running emulator: its base URL, and its CPU time on request."""

    base_url: str
    _conn: Connection

    def cpu(self) -> float:
        """The emulator process's CPU time so far, in seconds."""
        self._conn.send("cpu")
        value: float = self._conn.recv()
        return value


@contextlib.contextmanager
def emulator_process(*, tokens: int, ttft: float, token_delay: float) -> Iterator[EmulatorProcess]:
    """Run the emulator in a child process for the duration of the block.

    Example::

        with emulator_process(tokens=128, ttft=0.0, token_delay=0.02) as emulator:
            print(emulator.base_url)
    """
    spawn = multiprocessing.get_context("spawn")
    here, there = spawn.Pipe()
    process = spawn.Process(
        target=_serve, args=(there, max(tokens, 1), ttft, token_delay), daemon=True
    )
    with sigint_blocked():
        process.start()
    there.close()
    try:
        if not here.poll(_START_TIMEOUT):
            raise BenchError(
                f"the emulator did not start within {_START_TIMEOUT:.0f} s; run without "
                "--fake against a server with --base-url."
            )
        try:
            base_url: str = here.recv()
        except EOFError:
            raise BenchError(
                f"the emulator process exited at start (exit code {process.exitcode}); "
                "run without --fake against a server with --base-url."
            ) from None
        yield EmulatorProcess(base_url, here)
    finally:
        with contextlib.suppress(OSError):
            here.send("stop")
        here.close()
        process.join(10)
        if process.is_alive():
            process.terminate()
            process.join(5)
