"""``llmstream bench``: plan the run, send it, report it."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .._client import Client
from .._config import resolve_base_url
from .._errors import InvalidRequestError
from ._emulator import EmulatorProcess, emulator_process
from ._errors import BenchError, BenchUsageError
from ._prompts import BenchPrompt, custom_prompts, random_prompts, sharegpt_prompts
from ._report import (
    GeneratorLoad,
    ProgressDisplay,
    describe_arrivals,
    format_table,
    generator_warnings,
    to_json,
)
from ._runner import LoadResult, PlannedRequest, Progress, Target, run_load
from ._schedule import RampUp, arrival_times
from ._stats import RequestSample, summarize_run
from ._workers import run_async, run_workers, split

__all__ = ["plan_requests", "run"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_SAMPLING_FLAGS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
)


def _prompts(args: argparse.Namespace, rng: random.Random) -> list[BenchPrompt]:
    name = args.dataset_name
    if name == "random":
        if args.dataset_path is not None:
            raise BenchUsageError(
                "--dataset-path is for --dataset-name custom or sharegpt, not random."
            )
        return random_prompts(
            args.num_prompts,
            input_len=args.input_len or args.random_input_len,
            output_len=args.output_len or args.random_output_len,
            range_ratio=args.random_range_ratio,
            prefix_len=args.random_prefix_len,
            rng=rng,
        )
    if args.dataset_path is None:
        raise BenchUsageError(f"--dataset-name {name} needs --dataset-path FILE.")
    path = Path(args.dataset_path)
    shuffle = not args.disable_shuffle
    if name == "custom":
        output_len = args.output_len or args.custom_output_len
        if output_len == 0 or output_len < -1:
            raise BenchUsageError("--custom-output-len must be 1 or more, or -1.")
        return custom_prompts(
            path, args.num_prompts, output_len=output_len, rng=rng, shuffle=shuffle
        )
    return sharegpt_prompts(
        path,
        args.num_prompts,
        output_len=args.output_len or args.sharegpt_output_len,
        rng=rng,
        shuffle=shuffle,
    )


def _ramp_up(args: argparse.Namespace) -> RampUp | None:
    if args.ramp_up_strategy is None:
        if args.ramp_up_start_rps is not None or args.ramp_up_end_rps is not None:
            raise BenchUsageError(
                "--ramp-up-start-rps and --ramp-up-end-rps need --ramp-up-strategy."
            )
        return None
    if not math.isinf(args.request_rate):
        raise BenchUsageError("--ramp-up-strategy sets the rate itself: leave --request-rate out.")
    start, end = args.ramp_up_start_rps, args.ramp_up_end_rps
    if start is None or end is None:
        raise BenchUsageError("--ramp-up-strategy needs --ramp-up-start-rps and --ramp-up-end-rps.")
    if start > end:
        raise BenchUsageError("--ramp-up-start-rps must not be above --ramp-up-end-rps.")
    return RampUp(args.ramp_up_strategy, start, end)


def plan_requests(args: argparse.Namespace) -> list[PlannedRequest]:
    """Every request of the run: its prompt, arrival time and cancel point, from ``--seed``.

    Example::

        plan = plan_requests(parser.parse_args(["bench", "--num-prompts", "10"]))
    """
    prompts = _prompts(args, random.Random(args.seed))
    arrivals = arrival_times(
        len(prompts),
        args.request_rate,
        args.burstiness,
        ramp_up=_ramp_up(args),
        rng=random.Random(args.seed + 1),
    )
    chooser = random.Random(args.seed + 2)
    chosen = set(chooser.sample(range(len(prompts)), round(args.cancel_fraction * len(prompts))))
    plan = []
    for i, (prompt, arrival) in enumerate(zip(prompts, arrivals, strict=True)):
        cancel_after = None
        if i in chosen:
            # Somewhere mid-stream: after 1 to (asked - 1) output chunks.
            cancel_after = chooser.randint(1, max(1, prompt.output_len - 1))
        plan.append(PlannedRequest(i, arrival, prompt, cancel_after))
    return plan


def _body(args: argparse.Namespace) -> dict[str, object]:
    body: dict[str, object] = {}
    ignore_eos = args.ignore_eos if args.ignore_eos is not None else args.dataset_name == "random"
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM's; other servers ignore an unknown field
    for name in _SAMPLING_FLAGS:
        value = getattr(args, name)
        if value is not None:
            body[name] = value
    body.update(args.extra_body or {})
    return body


def _check_body(args: argparse.Namespace, plan: Sequence[PlannedRequest]) -> None:
    """Refuse a request body the client would refuse, before the run sends anything.

    Building a stream checks its arguments and sends nothing; the model and address are
    placeholders, as neither is known yet (nor needed for the check).
    """
    body = _body(args)
    try:
        json.dumps(body, allow_nan=False)
    except ValueError:
        raise BenchUsageError(
            "the request body holds a value JSON cannot send (nan or infinity): "
            "check --extra-body and the sampling flags."
        ) from None
    prompt = plan[0].prompt if plan else None
    with Client("http://127.0.0.1", model=args.model or "check") as client:
        try:
            client.stream(
                prompt.text if prompt else "",
                max_tokens=prompt.output_len if prompt else 1,
                extra_body=body,
            )
        except InvalidRequestError as exc:
            raise BenchUsageError(str(exc)) from None


def _config(args: argparse.Namespace, base_url: str, model: str) -> dict[str, object]:
    """The run's settings for the JSON document: no API key, no header values."""
    skip = {"api_key", "header", "command", "json", "plot", "no_progress", "save_detailed"}
    config = {k: v for k, v in vars(args).items() if k not in skip}
    config["request_rate"] = "inf" if math.isinf(args.request_rate) else args.request_rate
    config["header_names"] = [name for name, _ in args.header]
    config["base_url"] = base_url
    config["model"] = model
    config["body"] = _body(args)
    return config


def _resolve_model(args: argparse.Namespace, base_url: str) -> str:
    if args.model:
        return str(args.model)
    with Client(base_url, api_key=args.api_key, timeout=args.timeout) as client:
        models = client.models()
    if not models:
        raise BenchUsageError(f"{base_url} lists no model: name one with --model.")
    return models[0]


@contextlib.contextmanager
def _server(
    args: argparse.Namespace, plan: Sequence[PlannedRequest]
) -> Iterator[tuple[str, EmulatorProcess | None]]:
    if not args.fake:
        yield resolve_base_url(args.base_url), None
        return
    longest = max((r.prompt.output_len for r in plan), default=1)
    with emulator_process(
        tokens=longest, ttft=args.fake_ttft, token_delay=args.fake_token_delay
    ) as emulator:
        yield emulator.base_url, emulator


def _load(
    args: argparse.Namespace,
    target: Target,
    plan: Sequence[PlannedRequest],
    display: ProgressDisplay,
) -> list[LoadResult]:
    if args.workers == 1:
        return [
            run_async(
                lambda: run_load(
                    target,
                    plan,
                    max_concurrency=args.max_concurrency,
                    num_warmups=args.num_warmups,
                    on_progress=display.update,
                )
            )
        ]
    if args.max_concurrency is not None and args.max_concurrency < args.workers:
        raise BenchUsageError(
            f"--max-concurrency {args.max_concurrency} is below --workers {args.workers}: "
            "each worker needs at least one slot."
        )
    jobs = split(
        target,
        plan,
        args.workers,
        max_concurrency=args.max_concurrency,
        num_warmups=args.num_warmups,
    )
    return run_workers(jobs, display.update)


@dataclass(frozen=True)
class _Outputs:
    table: TextIO
    json_path: str | None


def _check_writable(flag: str, path: str) -> None:
    """Fail now, not after the whole run, when an output file cannot be written."""
    target = Path(path)
    existed = target.exists()
    try:
        with target.open("a"):  # appending truncates nothing
            pass
    except OSError as exc:
        raise BenchUsageError(f"cannot write {flag} {path}: {exc.strerror or exc}.") from None
    if not existed:
        target.unlink(missing_ok=True)


def _outputs(args: argparse.Namespace, out: TextIO, err: TextIO) -> _Outputs:
    if args.save_detailed and not args.json:
        raise BenchUsageError("--save-detailed adds to --json: give --json FILE (or -) too.")
    if args.json is not None and args.json != "-":
        _check_writable("--json", args.json)
    if args.plot:
        _check_writable("--plot", args.plot)
    return _Outputs(table=err if args.json == "-" else out, json_path=args.json)


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run ``llmstream bench`` as parsed; returns the exit status.

    Example::

        run(parser.parse_args(["bench", "--fake", "--num-prompts", "4"]), sys.stdout, sys.stderr)
    """
    try:
        return _run(args, out, err)
    except BenchUsageError as exc:
        print(f"llmstream bench: error: {exc}", file=err)
        return EXIT_USAGE


def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    outputs = _outputs(args, out, err)
    if args.plot:
        from ._plot import check_plotting

        check_plotting()
    plan = plan_requests(args)
    _check_body(args, plan)
    with _server(args, plan) as (base_url, emulator):
        model = _resolve_model(args, base_url)
        target = Target(
            base_url=base_url,
            model=model,
            api_key=args.api_key,
            timeout=args.timeout,
            headers=dict(args.header),
            body=_body(args),
        )
        where = "the built-in emulator (--fake)" if emulator is not None else base_url
        print(
            f"llmstream bench: {len(plan)} requests to {where}, model {model}, "
            f"max concurrency {args.max_concurrency or 'unlimited'}, request rate "
            f"{describe_arrivals(args.request_rate, args.burstiness, _ramp_up(args))}, "
            f"{args.workers} worker(s)",
            file=err,
        )
        display = ProgressDisplay(err, enabled=not args.no_progress)
        emulator_cpu = emulator.cpu() if emulator is not None else None
        results = _load(args, target, plan, display)
        if emulator is not None and emulator_cpu is not None:
            emulator_cpu = emulator.cpu() - emulator_cpu
    samples: list[RequestSample] = sorted(
        (s for r in results for s in r.samples), key=lambda s: s.index
    )
    display.close(_final_progress(samples))
    summary = summarize_run(
        samples,
        duration=max(r.wall for r in results),
        slos_ms=dict(args.goodput),
    )
    load = GeneratorLoad(
        cpu=tuple(r.cpu for r in results),
        wall=tuple(r.wall for r in results),
        cores=os.cpu_count() or 1,
        emulator_cpu=emulator_cpu,
    )
    paced = not math.isinf(args.request_rate) or args.ramp_up_strategy is not None
    warnings = generator_warnings(summary, load, paced=paced)
    print(
        format_table(
            summary,
            load,
            max_concurrency=args.max_concurrency,
            request_rate=args.request_rate,
            burstiness=args.burstiness,
            ramp_up=_ramp_up(args),
            warnings=warnings,
        ),
        file=outputs.table,
    )
    if outputs.json_path is not None:
        document = to_json(
            summary,
            load,
            config=_config(args, base_url, model),
            warnings=warnings,
            samples=samples if args.save_detailed else None,
        )
        _write_json(document, outputs.json_path, out)
    if args.plot:
        from ._plot import plot_run

        plot_run(samples, Path(args.plot), title=f"llmstream bench: {model} at {where}")
    if summary.completed == 0 and summary.failed == 0 and summary.cancelled:
        # Every request was cancelled, as --cancel-fraction 1 asks: the run did what it
        # was told, so this is no failure; but there are no latencies to read.
        print(
            f"llmstream bench: every request was cancelled on purpose (--cancel-fraction "
            f"{args.cancel_fraction:g}): no request completed, so the table has no latencies.",
            file=err,
        )
        return EXIT_OK
    if summary.completed == 0:
        print(
            "llmstream bench: error: no request completed; the errors above say why.",
            file=err,
        )
        return EXIT_FAILED
    return EXIT_OK


def _final_progress(samples: Sequence[RequestSample]) -> Progress:
    p = Progress(total=len(samples), sent=len(samples))
    p.completed = sum(s.outcome == "ok" for s in samples)
    p.cancelled = sum(s.outcome == "cancelled" for s in samples)
    p.failed = sum(s.outcome == "error" for s in samples)
    p.output_chunks = sum(len(s.itl) + (s.ttft is not None) for s in samples)
    return p


def _write_json(document: dict[str, object], path: str, out: TextIO) -> None:
    text = json.dumps(document, indent=2, allow_nan=False)
    if path == "-":
        out.write(text + "\n")
        out.flush()
        return
    try:
        Path(path).write_text(text + "\n", "utf-8")
    except OSError as exc:
        # After the run, so no usage error (exit 2 says nothing was sent).
        raise BenchError(f"cannot write --json {path}: {exc.strerror or exc}.") from None
