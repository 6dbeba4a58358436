"""The load figures of a vLLM server, read from its ``/metrics`` (Prometheus text format).

Only the scheduler gauges that routing needs are read: requests running, requests
waiting and KV-cache use (a fraction, 1.0 = full). vLLM exports one series per engine
(data parallel) and served model; running and waiting add up across them, and the KV
cache of the fullest engine counts. Everything else in the page is skipped unparsed.

Example::

    report = parse_vllm_load(httpx.get("http://gpu-1:8000/metrics").text)
    if report is not None:
        report.running, report.waiting, report.kv_cache   # 3.0, 7.0, 0.42
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["LoadReport", "parse_vllm_load"]


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What one ``/metrics`` page says about a server's load.

    ``running``: requests in the running batch; ``waiting``: requests queued (summed
    over engines); ``kv_cache``: KV-cache use of the fullest engine, 0.0 to 1.0, or
    ``None`` when the server does not export it.

    Example::

        LoadReport(running=3.0, waiting=7.0, kv_cache=0.42)
    """

    running: float
    waiting: float
    kv_cache: float | None


_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
# vLLM 0.12 renamed the KV-cache gauge; older servers (still common in fleets) use the
# first name. Both are fractions in [0, 1].
_KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")

# A sample line of vLLM is well under 1 kB (a model name is its longest label): a longer
# line is none of its samples, and is skipped unread, which bounds what one line can cost.
_MAX_LINE_CHARS = 64 * 1024

# The wanted series' names, searched for to find the lines worth matching. The page is
# read one line at a time, never matched as a whole: searching the whole page for a
# sample, a label set that never closes was re-read from every later name to the end of
# its line, quadratic time (a 58 kB line took 5 s, holding the GIL all along).
_NAME_PATTERN = (
    r"vllm:(?:num_requests_running|num_requests_waiting|kv_cache_usage_perc|gpu_cache_usage_perc)"
)
_NAME = re.compile(_NAME_PATTERN)
# One sample line of a wanted series, matched from the start of its line: blanks, name,
# optional label set, value (a timestamp may follow). The label set is matched
# quote-aware, so '}' or '"' inside an escaped label value cannot end it early; the
# alternatives never overlap, so a malformed line costs time linear in its length.
# Names must end where the label set or the value starts:
# vllm:num_requests_waiting_by_reason is another series.
_SAMPLE = re.compile(
    rf"[ \t]*({_NAME_PATTERN})"
    r"[ \t]*(?:\{(?:[^\"}\n\\]|\"(?:[^\"\\\n]|\\.)*\")*\})?"
    r"[ \t]+([+-]?(?:[0-9]+\.?[0-9]*(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?"
    r"|[Ii]nf|NaN|nan))"
    r"(?=[ \t\r]|$)",
    re.ASCII,
)


def parse_vllm_load(text: str) -> LoadReport | None:
    """The load figures in a vLLM ``/metrics`` page, or ``None`` when it has none.

    ``None`` means the page has no ``vllm:num_requests_running`` or
    ``vllm:num_requests_waiting`` sample (not a vLLM server, or not its metrics). A
    sample that is not a finite number >= 0 (``NaN``, ``+Inf``) is skipped, and so is
    a line longer than 64 KiB. Never raises, whatever ``text`` holds, in time linear
    in its length.

    Example::

        parse_vllm_load('vllm:num_requests_running{engine="0"} 2.0\\n')
        # LoadReport(running=2.0, waiting=0.0, kv_cache=None)
    """
    if "vllm:" not in text:
        return None
    running = waiting = 0.0
    kv_cache: float | None = None
    seen = False
    for start, end in _lines_naming(text):
        if end - start > _MAX_LINE_CHARS:
            continue
        # Anchored at the line's start: a name inside a comment (# HELP vllm:...) or
        # inside another sample's labels is not a sample.
        match = _SAMPLE.match(text, start, end)
        if match is None:
            continue
        value = float(match.group(2))
        if not (math.isfinite(value) and value >= 0.0):
            continue
        name = match.group(1)
        if name == _RUNNING:
            running += value
            seen = True
        elif name == _WAITING:
            waiting += value
            seen = True
        elif kv_cache is None or value > kv_cache:
            kv_cache = value
    if not seen:
        return None
    return LoadReport(running=running, waiting=waiting, kv_cache=kv_cache)


def _lines_naming(text: str) -> Iterator[tuple[int, int]]:
    """The bounds (start, end without its newline) of each line naming a wanted series.

    Every character is read at most twice, however the lines are shaped: the page is
    searched for a name (fast: most of a vLLM page is other series and their comments),
    then from each hit back to the line's start and on to its end, and the search
    resumes past that end.
    """
    line_start = 0
    while (found := _NAME.search(text, line_start)) is not None:
        hit = found.start()
        newline = text.rfind("\n", line_start, hit)
        if newline >= 0:
            line_start = newline + 1
        end = text.find("\n", hit)
        if end < 0:
            end = len(text)
        yield line_start, end
        line_start = end + 1
