"""The flags of ``llmstream bench``: vLLM's names (``vllm bench serve``) wherever it has one.

Only argparse here, so that building the command line costs nothing more.
"""

from __future__ import annotations

import argparse
import math

from .._argtypes import at_least, finite_seconds, fraction, positive
from .._json import loads as loads_json

__all__ = ["add_arguments"]

_COUNT = at_least(1)
_NATURAL = at_least(0)


def _json_object(text: str) -> dict[str, object]:
    try:
        value = loads_json(text)
    except ValueError:  # nested too deeply too
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text[:80]!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _header(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return name.strip(), value.strip()


def _slo(text: str) -> tuple[str, float]:
    name, colon, value = text.partition(":")
    allowed = ("ttft", "tpot", "e2el")
    if not colon or name not in allowed:
        raise argparse.ArgumentTypeError(
            f"expected KEY:MILLISECONDS with KEY one of {', '.join(allowed)}, got {text!r}"
        )
    try:
        limit = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected milliseconds after {name}:, got {value!r}"
        ) from None
    if not limit >= 0:
        raise argparse.ArgumentTypeError(f"{name}: must be 0 ms or more, got {value}")
    return name, limit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's flags (the server ones, ``--base-url``, ``--fake``..., are shared)."""
    parser.add_argument(
        "--model", metavar="ID", help="model id (default: the first the server lists)"
    )
    parser.add_argument(
        "--fake-token-delay",
        type=finite_seconds,
        default=0.02,
        metavar="SECONDS",
        help="with --fake: seconds between the emulator's tokens (default: 0.02)",
    )
    parser.add_argument(
        "--fake-ttft",
        type=finite_seconds,
        default=0.0,
        metavar="SECONDS",
        help="with --fake: seconds before the emulator's first token (default: 0)",
    )

    data = parser.add_argument_group("prompts (vLLM's dataset options)")
    data.add_argument(
        "--dataset-name",
        choices=("random", "custom", "sharegpt"),
        default="random",
        help="random: synthetic prompts of --random-input-len words asking "
        '--random-output-len tokens; custom: a JSONL file of {"prompt": ..., '
        '"output_tokens": ...}; sharegpt: a ShareGPT JSON file (default: random)',
    )
    data.add_argument("--dataset-path", metavar="PATH", help="the file, for custom and sharegpt")
    data.add_argument(
        "--num-prompts", type=_COUNT, default=1000, metavar="N", help="requests (default: 1000)"
    )
    data.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of prompts, arrivals and cancellations (default: 0)",
    )
    data.add_argument(
        "--disable-shuffle", action="store_true", help="take the file's prompts in order"
    )
    data.add_argument(
        "--input-len",
        type=_COUNT,
        metavar="N",
        help="sets --random-input-len (random only: custom and sharegpt prompts are sent "
        "as the file has them)",
    )
    data.add_argument(
        "--output-len",
        type=_COUNT,
        metavar="N",
        help="sets --random-output-len, --sharegpt-output-len and --custom-output-len",
    )
    data.add_argument(
        "--random-input-len",
        type=_COUNT,
        default=1024,
        metavar="N",
        help="prompt length in words, about one token each (default: 1024)",
    )
    data.add_argument(
        "--random-output-len",
        type=_COUNT,
        default=128,
        metavar="N",
        help="output tokens asked (max_tokens, with ignore_eos) (default: 128)",
    )
    data.add_argument(
        "--random-range-ratio",
        type=fraction,
        default=0.0,
        metavar="R",
        help="draw each length uniformly within +-R of it (default: 0)",
    )
    data.add_argument(
        "--random-prefix-len",
        type=_NATURAL,
        default=0,
        metavar="N",
        help="words every prompt starts with, for prefix caching (default: 0)",
    )
    data.add_argument(
        "--sharegpt-output-len",
        type=_COUNT,
        metavar="N",
        help="output tokens of every sharegpt request (default: the answer's length, "
        "estimated at 4 characters per token)",
    )
    data.add_argument(
        "--custom-output-len",
        type=int,
        default=256,
        metavar="N",
        help="output tokens of every custom request; -1 reads each line's output_tokens "
        "(default: 256)",
    )

    load = parser.add_argument_group("load")
    load.add_argument(
        "--max-concurrency",
        type=_COUNT,
        metavar="N",
        help="at most N requests in flight; an arriving request waits for a slot "
        "(default: unlimited)",
    )
    load.add_argument(
        "--request-rate",
        type=positive,
        default=math.inf,
        metavar="R",
        help="requests per second, Poisson arrivals (default: inf, all at once)",
    )
    load.add_argument(
        "--burstiness",
        type=positive,
        default=1.0,
        metavar="B",
        help="gamma arrivals of shape B: 1 Poisson, below 1 burstier, above 1 more even "
        "(default: 1)",
    )
    load.add_argument(
        "--ramp-up-strategy",
        choices=("linear", "exponential"),
        help="grow the request rate from --ramp-up-start-rps to --ramp-up-end-rps over the run",
    )
    load.add_argument("--ramp-up-start-rps", type=positive, metavar="R")
    load.add_argument("--ramp-up-end-rps", type=positive, metavar="R")
    load.add_argument(
        "--num-warmups",
        type=_NATURAL,
        default=0,
        metavar="N",
        help="unmeasured requests first, to open connections (default: 0)",
    )
    load.add_argument(
        "--cancel-fraction",
        type=fraction,
        default=0.0,
        metavar="F",
        help="cancel this share of the requests mid-stream (the connection is closed, so "
        "vLLM aborts them); reported apart, not as errors (default: 0)",
    )
    load.add_argument(
        "--workers",
        type=_COUNT,
        default=1,
        metavar="N",
        help="spread the load over N processes (default: 1)",
    )

    request = parser.add_argument_group("requests")
    request.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ask vLLM to ignore the end-of-sequence token, so outputs are as long as "
        "asked (default: on for random, off otherwise)",
    )
    for flag, kind in (
        ("--temperature", float),
        ("--top-p", float),
        ("--top-k", int),
        ("--min-p", float),
        ("--frequency-penalty", float),
        ("--presence-penalty", float),
        ("--repetition-penalty", float),
    ):
        request.add_argument(
            flag, type=kind, metavar="X", help="sampling parameter (default: the server's)"
        )
    request.add_argument(
        "--extra-body",
        type=_json_object,
        metavar="JSON",
        help='more body fields for every request: \'{"chat_template_kwargs": '
        '{"enable_thinking": false}}\'',
    )
    request.add_argument(
        "--header",
        type=_header,
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="HTTP headers for every request",
    )

    output = parser.add_argument_group("results")
    output.add_argument(
        "--goodput",
        type=_slo,
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY:MS",
        help="service level objectives in ms, e.g. ttft:500 tpot:50 (keys ttft, tpot, e2el): "
        "goodput counts the completed requests within all of them",
    )
    output.add_argument(
        "--json",
        metavar="FILE",
        help="write the results as JSON to FILE; '-' writes them to standard output "
        "(the table then goes to standard error)",
    )
    output.add_argument(
        "--save-detailed",
        action="store_true",
        help="with --json: add every request's raw measurements",
    )
    output.add_argument(
        "--plot",
        metavar="FILE.png",
        help='draw latency over the run to a PNG (needs "llmstream-sdk[plot]")',
    )
    output.add_argument(
        "--disable-tqdm",
        "--no-progress",
        dest="no_progress",
        action="store_true",
        help="no live progress on standard error",
    )
