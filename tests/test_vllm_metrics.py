"""Reading load figures from vLLM's /metrics page (Prometheus text exposition format)."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmstream._vllm_metrics import LoadReport, parse_vllm_load

from .conftest import DATA


def test_the_page_of_vllm_0_33_with_two_engines() -> None:
    # vLLM 0.33.0's own PrometheusStatLogger and /metrics router, two data-parallel
    # engines recorded as (running 3, waiting 2, kv 0.25) and (1, 5, 0.5). The page also
    # holds vllm:num_requests_waiting_by_reason (2, 5, 0, 0), which must not count.
    text = (DATA / "vllm_metrics_0_33.txt").read_text()
    assert parse_vllm_load(text) == LoadReport(running=4.0, waiting=7.0, kv_cache=0.5)


def test_the_kv_cache_name_before_vllm_0_12() -> None:
    text = (
        "# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.\n"
        "# TYPE vllm:gpu_cache_usage_perc gauge\n"
        'vllm:gpu_cache_usage_perc{model_name="m"} 0.75\n'
        'vllm:num_requests_running{model_name="m"} 1.0\n'
        'vllm:num_requests_waiting{model_name="m"} 0.0\n'
    )
    assert parse_vllm_load(text) == LoadReport(running=1.0, waiting=0.0, kv_cache=0.75)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "vllm:",
        "# HELP vllm:num_requests_running Number of requests.\n"
        "# TYPE vllm:num_requests_running gauge\n",
        'vllm:kv_cache_usage_perc{engine="0"} 0.5\n',
        'vllm:num_requests_waiting_by_reason{reason="capacity"} 3.0\n',
        "vllm:num_requests_running_created 1.7e9\nvllm:num_requests_runningx 2\n",
        "python_gc_objects_collected_total 12.0\n",
        "<html><body>404 Not Found</body></html>",
        'vllm:num_requests_running{engine="0"} NaN\n',
    ],
    ids=[
        "empty",
        "prefix-only",
        "help-and-type-only",
        "kv-only",
        "look-alike-name",
        "created-and-longer-names",
        "other-metrics",
        "html",
        "only-nan",
    ],
)
def test_none_without_running_or_waiting_samples(text: str) -> None:
    assert parse_vllm_load(text) is None


def test_timestamps_comments_blank_lines_and_crlf() -> None:
    text = (
        "# a comment with vllm:num_requests_running 100\r\n"
        "\r\n"
        "vllm:num_requests_running 2 1712345678000\r\n"
        "  vllm:num_requests_waiting\t3.5e0\t1712345678000\r\n"
        'vllm:kv_cache_usage_perc{engine="0"} 1e-1\r\n'
        "# EOF\r\n"
    )
    assert parse_vllm_load(text) == LoadReport(running=2.0, waiting=3.5, kv_cache=0.1)


def test_label_values_with_escapes_braces_commas_and_look_alike_samples() -> None:
    text = (
        'vllm:num_requests_running{model_name="a\\"b,c}d{",engine="0"} 1\n'
        'vllm:num_requests_running{model_name="back\\\\slash\\nnewline",engine="1"} 2\n'
        'vllm:num_requests_waiting{model_name="vllm:num_requests_running 99",} 4\n'
        'other{label="x"} vllm:num_requests_running 50\n'
        'vllm:num_requests_waiting{model_name="} 7"} 1\n'
    )
    assert parse_vllm_load(text) == LoadReport(running=3.0, waiting=5.0, kv_cache=None)


def test_non_finite_and_negative_samples_are_skipped() -> None:
    text = (
        'vllm:num_requests_running{engine="0"} NaN\n'
        'vllm:num_requests_running{engine="1"} +Inf\n'
        'vllm:num_requests_running{engine="2"} 2\n'
        'vllm:num_requests_waiting{engine="0"} -1\n'
        'vllm:num_requests_waiting{engine="1"} -Inf\n'
        'vllm:kv_cache_usage_perc{engine="0"} NaN\n'
        'vllm:kv_cache_usage_perc{engine="1"} 0.3\n'
    )
    assert parse_vllm_load(text) == LoadReport(running=2.0, waiting=0.0, kv_cache=0.3)


def test_malformed_sample_lines_are_skipped() -> None:
    text = (
        'vllm:num_requests_running{engine="0" 5\n'  # unclosed label set
        'vllm:num_requests_running{engine="0} 5\n'  # unclosed quote
        "vllm:num_requests_running 5abc\n"  # not a number
        "vllm:num_requests_running\n"  # no value
        "vllm:num_requests_running 1_000\n"  # Python accepts it, the format does not
        "vllm:num_requests_running \u0661\n"  # an Arabic-Indic digit, likewise
        "vllm:num_requests_waiting 1\n"
    )
    assert parse_vllm_load(text) == LoadReport(running=0.0, waiting=1.0, kv_cache=None)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_NAMES = st.sampled_from(
    [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
    ]
)
_NOISE = st.sampled_from(
    [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_waiting gauge",
        'vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 9.0',
        "vllm:num_requests_running_created 1.7e9",
        'vllm:kv_cache_usage_perc_total{engine="0"} 9.0',
        'http_requests_total{handler="/metrics"} 9.0',
        "",
    ]
)


@st.composite
def _sample_lines(draw: st.DrawFn) -> tuple[str, str, float]:
    name = draw(_NAMES)
    labels = draw(st.lists(st.tuples(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), st.text())))
    value = draw(st.floats(min_value=0.0, max_value=1e6, allow_nan=False))
    label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    labelled = f"{{{label_text}}}" if labels or draw(st.booleans()) else ""
    stamp = draw(st.sampled_from(["", " 1712345678000", "\t-5"]))
    return name, f"{name}{labelled} {value!r}{stamp}", value


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_sample_lines(), _NOISE)))
def test_well_formed_pages_sum_running_and_waiting_and_take_the_largest_kv(
    lines: list[tuple[str, str, float] | str],
) -> None:
    running = waiting = 0.0
    kv: float | None = None
    seen = False
    text_lines = []
    for line in lines:
        if isinstance(line, str):
            text_lines.append(line)
            continue
        name, text, value = line
        text_lines.append(text)
        if name.endswith("running"):
            running, seen = running + value, True
        elif name.endswith("waiting"):
            waiting, seen = waiting + value, True
        else:
            kv = value if kv is None else max(kv, value)
    report = parse_vllm_load("\n".join(text_lines))
    if not seen:
        assert report is None
        return
    assert report is not None
    assert math.isclose(report.running, running, rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(report.waiting, waiting, rel_tol=1e-9, abs_tol=1e-9)
    assert report.kv_cache == kv


_FRAGMENTS = st.sampled_from(
    [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "{",
        "}",
        '"',
        "\\",
        "=",
        ",",
        " ",
        "\t",
        "\n",
        "\r",
        "#",
        "1",
        ".5",
        "e",
        "+",
        "-",
        "NaN",
        "Inf",
        "engine",
    ]
)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(), st.lists(_FRAGMENTS).map("".join)))
def test_never_raises_and_reports_only_finite_non_negative_figures(text: str) -> None:
    report = parse_vllm_load(text)
    if report is not None:
        for figure in (report.running, report.waiting, report.kv_cache or 0.0):
            assert math.isfinite(figure) and figure >= 0.0


def test_a_large_page_is_read_quickly() -> None:
    # Linear time: a page of 200k unclosed label sets must not backtrack for long.
    text = 'vllm:num_requests_running{a="' + '\\"{,' * 200_000 + "\n"
    text += "vllm:num_requests_waiting 1\n"
    assert parse_vllm_load(text) == LoadReport(running=0.0, waiting=1.0, kv_cache=None)


@pytest.mark.parametrize(
    ("unit", "line_chars"),
    [
        ('vllm:num_requests_running{a="', None),
        ('vllm:num_requests_running{a="x",', None),
        ('vllm:num_requests_running{a="', 60_000),
        ('vllm:num_requests_running{"a"b"', 60_000),
    ],
    ids=["one-line-open-quotes", "one-line-open-labels", "lines-open-quotes", "lines-odd-quotes"],
)
def test_a_hostile_page_of_1_mb_is_parsed_in_linear_time(unit: str, line_chars: int | None) -> None:
    # Label sets that never close, on one line or on lines just under the length that is
    # skipped unread. 64 kB first: a parser in quadratic time fails there in seconds, not
    # after hours at 1 MB. The bound is generous: it takes a few hundredths of a second.
    for page_bytes in (64_000, 1_000_000):
        line = unit * ((line_chars or page_bytes) // len(unit))
        text = "\n".join([line] * max(1, page_bytes // len(line)))
        text += "\nvllm:num_requests_waiting 1\n"
        started = time.perf_counter()
        report = parse_vllm_load(text)
        elapsed = time.perf_counter() - started
        assert elapsed < 2.0, f"{len(text)} characters took {elapsed:.1f} s"
        assert report == LoadReport(running=0.0, waiting=1.0, kv_cache=None)


def test_a_line_longer_than_64_kib_is_skipped() -> None:
    model = "m" * 60_000
    text = (
        f'vllm:num_requests_running{{model_name="{model}"}} 2\n'
        f'vllm:num_requests_running{{model_name="{model}{model}"}} 50\n'
        "vllm:num_requests_waiting 1\n"
    )
    assert parse_vllm_load(text) == LoadReport(running=2.0, waiting=1.0, kv_cache=None)
