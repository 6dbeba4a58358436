"""Stream metrics: exact for short streams, constant memory for long ones."""

from __future__ import annotations

import pytest

from llmstream._metrics import RESERVOIR_SIZE, MetricsRecorder, summarize


def test_ttft_itl_and_decode_speed() -> None:
    rec = MetricsRecorder(started=10.0)
    rec.headers(10.05)
    for t in (10.1, 10.2, 10.3, 10.5):
        rec.token(t)
    m = rec.summary(completion_tokens=None, ended=11.0)
    assert m.time_to_headers == pytest.approx(0.05)
    assert m.time_to_first_token == pytest.approx(0.1)
    assert m.completion_tokens == 4 and m.completion_tokens_source == "chunks"
    assert m.tokens_per_second == pytest.approx(3 / 0.4)
    itl = m.inter_token_latency
    assert itl is not None
    assert (itl.count, itl.p50, itl.max) == (3, pytest.approx(0.1), pytest.approx(0.2))
    assert itl.mean == pytest.approx(0.4 / 3)


def test_server_count_wins() -> None:
    rec = MetricsRecorder(started=0.0)
    rec.token(1.0)
    rec.token(2.0)
    m = rec.summary(completion_tokens=7, ended=3.0)
    assert (m.completion_tokens, m.completion_tokens_source) == (7, "server")


def test_no_tokens() -> None:
    m = MetricsRecorder(started=0.0).summary(completion_tokens=None, ended=1.0)
    assert m.time_to_first_token is None and m.inter_token_latency is None
    assert m.tokens_per_second == 0.0 and m.duration == 1.0


def test_long_streams_keep_a_bounded_sample_but_exact_count_mean_max() -> None:
    rec = MetricsRecorder(started=0.0)
    n = 50_000
    for i in range(n):
        rec.token(i * 0.01 + (0.5 if i == 40_000 else 0.0))
    assert len(rec._gaps) == RESERVOIR_SIZE
    itl = rec.summary(completion_tokens=None, ended=n).inter_token_latency
    assert itl is not None
    assert itl.count == n - 1
    assert itl.max == pytest.approx(0.51)
    assert itl.p50 == pytest.approx(0.01)
    assert itl.mean == pytest.approx((n - 1) * 0.01 / (n - 1) + 0.0, rel=0.01)


def test_summarize_nearest_rank() -> None:
    s = summarize([0.03, 0.01, 0.02])
    assert s is not None and (s.p50, s.p90, s.max) == (0.02, 0.03, 0.03)
    assert summarize([]) is None
