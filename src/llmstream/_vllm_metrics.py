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

# One sample line of a wanted series: name, optional label set, value (a timestamp may
# follow). The label set is matched quote-aware, so '}' or '"' inside an escaped label
# value cannot end it early; neither part can cross a line, and the alternatives never
# overlap, so a malformed page costs linear time. Names must end where the label set or
# the value starts: vllm:num_requests_waiting_by_reason is another series. The pattern
# starts with a literal, which the regex engine scans for six times faster than it tries
# a line anchor at every offset; that the name starts its line is checked afterwards.
_SAMPLE = re.compile(
    r"(vllm:(?:num_requests_running|num_requests_waiting"
    r"|kv_cache_usage_perc|gpu_cache_usage_perc))"
    r"[ \t]*(?:\{(?:[^\"}\n\\]|\"(?:[^\"\\\n]|\\.)*\")*\})?"
    r"[ \t]+([+-]?(?:[0-9]+\.?[0-9]*(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?"
    r"|[Ii]nf|NaN|nan))"
    r"(?=[ \t\r]|$)",
    re.MULTILINE | re.ASCII,
)


def parse_vllm_load(text: str) -> LoadReport | None:
    """The load figures in a vLLM ``/metrics`` page, or ``None`` when it has none.

    ``None`` means the page has no ``vllm:num_requests_running`` or
    ``vllm:num_requests_waiting`` sample (not a vLLM server, or not its metrics). A
    sample that is not a finite number >= 0 (``NaN``, ``+Inf``) is skipped. Never
    raises, whatever ``text`` holds.

    Example::

        parse_vllm_load('vllm:num_requests_running{engine="0"} 2.0\\n')
        # LoadReport(running=2.0, waiting=0.0, kv_cache=None)
    """
    if "vllm:" not in text:
        return None
    running = waiting = 0.0
    kv_cache: float | None = None
    seen = False
    for match in _SAMPLE.finditer(text):
        start = match.start()
        if start and text[start - 1] != "\n" and not _starts_line(text, start):
            continue  # inside a comment (# HELP vllm:...) or another sample's labels
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


def _starts_line(text: str, start: int) -> bool:
    """Whether only blanks precede ``start`` on its line."""
    line_start = text.rfind("\n", 0, start) + 1
    return not text[line_start:start].strip(" \t")
