"""``llmstream bench``: a load generator for OpenAI-compatible servers, after ``vllm bench serve``.

Its modules, each one job: ``_options`` (the flags), ``_prompts`` (the datasets),
``_schedule`` (arrival times), ``_runner`` (one process sending its share, timing every
chunk), ``_workers`` (several processes, raw samples merged), ``_stats`` (vLLM's
definitions, pooled percentiles), ``_report`` (progress, table, JSON), ``_plot``
(matplotlib, imported only for ``--plot``), ``_emulator`` (``--fake``), ``_command``.
"""

from __future__ import annotations

import argparse
from typing import TextIO

from ._options import add_arguments

__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run the command as parsed; the exit status (0, 1, or 2 for a bad command line)."""
    from ._command import run as run_command  # the runner's imports, only when it runs

    return run_command(args, out, err)
