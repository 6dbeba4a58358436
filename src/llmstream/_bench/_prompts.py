"""The prompts of a run: synthetic ones of given lengths, a JSONL file, or a ShareGPT file.

The dataset names and their options are vLLM's (``vllm/benchmarks/datasets``):

* ``random``: prompts of ``--random-input-len`` words (each a common English word that is
  one token in the usual BPE vocabularies, so about as many tokens) and outputs of
  ``--random-output-len`` tokens, both varied by ``--random-range-ratio``; an optional
  shared prefix of ``--random-prefix-len`` words. vLLM draws random token ids through the
  model's tokenizer; without a tokenizer, the input length here is close, not exact: the
  server's count (its ``usage.prompt_tokens``) is what the report shows.
* ``custom``: a JSONL file, one ``{"prompt": "...", "output_tokens": 128}`` per line
  (``output_tokens`` is read when ``--custom-output-len`` is -1).
* ``sharegpt``: a JSON list of ``{"conversations": [{"value": prompt}, {"value": answer},
  ...]}``; the output length is the answer's, estimated at 4 characters per token, unless
  ``--sharegpt-output-len`` sets it. Conversations are filtered as vLLM filters them
  (prompt 4-1024 tokens, prompt and answer at most 2048), with the same estimate.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from .._json import loads as loads_json
from ._errors import BenchUsageError

__all__ = ["BenchPrompt", "custom_prompts", "estimate_tokens", "random_prompts", "sharegpt_prompts"]

# Common words, each a single token (with its leading space) in GPT-2, Llama and Qwen
# vocabularies: one word is about one token, the nearest a tokenizer-free prompt gets.
_WORD_LIST = (
    "the of and to in is was for on that with as by at from his her are this be have "
    "not but had they you which one were all we an been their has would there can more "
    "will when who so if out up about into than them time only some could new other two "
    "may first then do any like my now over such our man me even most made after also "
    "did many before must well back through years where much your way down should because "
    "each just those people how too little state good very make world still own see men "
    "work long here get both between life being under never day same another know while "
    "last might us great old year off come since against go came right used take three"
)
_WORDS = tuple(_WORD_LIST.split())

CHARS_PER_TOKEN = 4
"""The estimate of tokens in a text without a tokenizer: English prose averages about 4."""


@dataclass(frozen=True)
class BenchPrompt:
    """One request's prompt (the user message) and the tokens it asks for.

    ``prompt_len`` is an estimate; the server's count replaces it once it answers.

    Example::

        BenchPrompt("the of and", output_len=128, prompt_len=3)
    """

    text: str
    output_len: int
    prompt_len: int


def estimate_tokens(text: str) -> int:
    """Tokens in ``text`` without a tokenizer: one per 4 characters, at least one.

    Example::

        estimate_tokens("Hello, world!")  # 4
    """
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def _length(rng: random.Random, mean: int, ratio: float, floor: int) -> int:
    # vLLM draws uniformly from [mean * (1 - ratio), mean * (1 + ratio)].
    low = max(floor, math.floor(mean * (1 - ratio)))
    high = max(low, math.ceil(mean * (1 + ratio)))
    return rng.randint(low, high)


def random_prompts(
    count: int,
    *,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    prefix_len: int = 0,
    rng: random.Random,
) -> list[BenchPrompt]:
    """``count`` synthetic prompts of about ``input_len`` tokens, asking ``output_len``.

    Each prompt is a different draw of words, so a prefix cache shares only the
    ``prefix_len`` words that every prompt starts with.

    Example::

        random_prompts(2, input_len=16, output_len=8, rng=random.Random(0))[0].output_len  # 8
    """
    prefix = rng.choices(_WORDS, k=prefix_len)
    prompts = []
    for _ in range(count):
        words = prefix + rng.choices(_WORDS, k=_length(rng, input_len, range_ratio, 1))
        prompts.append(
            BenchPrompt(
                " ".join(words),
                output_len=_length(rng, output_len, range_ratio, 1),
                prompt_len=len(words),
            )
        )
    return prompts


def _oversample(prompts: list[BenchPrompt], count: int, rng: random.Random) -> list[BenchPrompt]:
    # As vLLM: a file with fewer usable prompts than asked is drawn from again.
    if len(prompts) >= count:
        return prompts[:count]
    return prompts + rng.choices(prompts, k=count - len(prompts))


def _read(path: Path) -> str:
    try:
        return path.read_text("utf-8")
    except OSError as exc:
        raise BenchUsageError(
            f"cannot read --dataset-path {path}: {exc.strerror or exc}. Check the path."
        ) from None
    except UnicodeDecodeError:
        raise BenchUsageError(f"--dataset-path {path} is not UTF-8 text.") from None


def custom_prompts(
    path: Path, count: int, *, output_len: int, rng: random.Random, shuffle: bool = True
) -> list[BenchPrompt]:
    """Prompts from a JSONL file of ``{"prompt": ..., "output_tokens": ...}`` lines.

    ``output_len`` -1 takes each line's ``output_tokens``.

    Example::

        custom_prompts(Path("prompts.jsonl"), 100, output_len=256, rng=random.Random(0))
    """
    prompts = []
    for number, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"--dataset-path {path}, line {number}"
        try:
            row = loads_json(line)
        except ValueError:
            raise BenchUsageError(f'{where} is not JSON: expected {{"prompt": ...}}.') from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise BenchUsageError(f'{where} has no "prompt" string.')
        wanted = output_len
        if wanted == -1:
            tokens = row.get("output_tokens")
            if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
                raise BenchUsageError(
                    f'{where} has no "output_tokens" whole number, which '
                    "--custom-output-len -1 reads; give it, or set --custom-output-len N."
                )
            wanted = tokens
        prompts.append(BenchPrompt(row["prompt"], wanted, estimate_tokens(row["prompt"])))
    if not prompts:
        raise BenchUsageError(f"--dataset-path {path} holds no prompt.")
    if shuffle:
        rng.shuffle(prompts)
    return _oversample(prompts, count, rng)


def _turn_text(turn: object) -> str | None:
    if isinstance(turn, dict):
        value = turn.get("value")
        return value if isinstance(value, str) else None
    return None


def sharegpt_prompts(
    path: Path,
    count: int,
    *,
    output_len: int | None,
    rng: random.Random,
    shuffle: bool = True,
) -> list[BenchPrompt]:
    """Prompts from a ShareGPT file: each conversation's first turn, its answer's length.

    Example::

        sharegpt_prompts(Path("ShareGPT_V3.json"), 1000, output_len=None, rng=random.Random(0))
    """
    try:
        data = loads_json(_read(path))
    except ValueError:
        raise BenchUsageError(f"--dataset-path {path} is not a JSON file.") from None
    if not isinstance(data, list):
        raise BenchUsageError(
            f'--dataset-path {path}: expected a JSON list of {{"conversations": [...]}}.'
        )
    entries = [e for e in data if isinstance(e, dict) and isinstance(e.get("conversations"), list)]
    if shuffle:
        rng.shuffle(entries)
    prompts = []
    for entry in entries:
        turns = entry["conversations"]
        if len(turns) < 2:
            continue
        prompt, answer = _turn_text(turns[0]), _turn_text(turns[1])
        if prompt is None or answer is None:
            continue
        prompt_len = estimate_tokens(prompt)
        wanted = output_len if output_len is not None else estimate_tokens(answer)
        # vLLM's is_valid_sequence, on estimated lengths.
        if prompt_len < 4 or prompt_len > 1024 or prompt_len + wanted > 2048:
            continue
        if output_len is None and wanted < 4:
            continue
        prompts.append(BenchPrompt(prompt, wanted, prompt_len))
        if len(prompts) >= count:
            break
    if not prompts:
        raise BenchUsageError(
            f"--dataset-path {path} holds no usable ShareGPT conversation (two turns, "
            "a prompt of 4-1024 tokens)."
        )
    return _oversample(prompts, count, rng)
