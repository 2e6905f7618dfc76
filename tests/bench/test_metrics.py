"""bench/metrics.py and the arrival process of bench/driver.py: the numbers every bench reports."""

from __future__ import annotations

import math
import statistics

import pytest

from bench.driver import arrival_gaps
from bench.metrics import RequestRecord, percentile, summarize


def test_percentile_interpolates_like_numpy():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0
    assert percentile(values, 50) == 3.0
    assert percentile(values, 90) == pytest.approx(4.6)
    assert percentile([], 50) == 0.0


def test_summary_of_known_timings():
    # Sent at 0 and 1 s; tokens arrive as listed (two of the second request's arrive together).
    a = RequestRecord(prompt_len=10, sent_s=0.0, token_times_s=[0.5, 0.7, 0.9])
    b = RequestRecord(prompt_len=20, sent_s=1.0, token_times_s=[2.0, 2.0, 2.5, 3.0])
    s = summarize([a, b], duration_s=3.0)
    assert s["output_tokens"] == 7 and s["prompt_tokens"] == 30
    assert s["output_tokens_per_s"] == pytest.approx(7 / 3, abs=1e-3)
    assert s["total_tokens_per_s"] == pytest.approx(37 / 3, abs=1e-3)
    assert s["ttft_ms"]["mean"] == pytest.approx((500 + 1000) / 2, abs=0.01)
    assert s["e2e_ms"]["median"] == pytest.approx((900 + 2000) / 2, abs=0.01)
    assert s["tpot_ms"]["mean"] == pytest.approx((200 + 1000 / 3) / 2, abs=0.01)
    # ITL: gaps between distinct arrivals: 0.2, 0.2 and 0.5, 0.5.
    assert s["itl_ms"]["mean"] == pytest.approx(350, abs=0.01)


def test_all_at_once_and_poisson_arrivals():
    assert arrival_gaps(4, math.inf, 1.0, 0) == [0.0] * 4
    gaps = arrival_gaps(20001, 4.0, 1.0, seed=1)
    assert gaps[0] == 0.0
    assert statistics.mean(gaps[1:]) == pytest.approx(0.25, rel=0.03)
    assert statistics.pstdev(gaps[1:]) == pytest.approx(0.25, rel=0.05)  # exponential: sd = mean
    bursty = arrival_gaps(20001, 4.0, 0.25, seed=1)  # gamma shape 0.25: same mean, sd twice as large
    assert statistics.mean(bursty[1:]) == pytest.approx(0.25, rel=0.05)
    assert statistics.pstdev(bursty[1:]) == pytest.approx(0.5, rel=0.08)
    assert arrival_gaps(5, 2.0, 1.0, seed=3) == arrival_gaps(5, 2.0, 1.0, seed=3)
