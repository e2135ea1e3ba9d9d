"""bench/load_test.py: the summary's percentiles, hit rate and throughput, worked by hand."""

from __future__ import annotations

import pytest

from bench.load_test import summarise


def test_summary_counts_errors_as_misses():
    records = [{"t": i, "latency_ms": float(latency), "status": 200, "budget": budget}
               for i, (latency, budget) in enumerate([(10, 1.0), (20, 0.5), (30, 0.5), (40, 1.0)])]  # fmt: skip
    records.append({"t": 5, "latency_ms": 1.0, "status": 400, "budget": None})
    row = summarise("adaptive", "light", {"records": records, "seconds": 2.0, "hog_span": None}, deadline_ms=25)
    assert (row["requests"], row["errors"]) == (5, 1)
    assert row["throughput_rps"] == 2.0  # 4 answered in 2 s
    # numpy's linear percentile of 10, 20, 30, 40: p50 = 25, p95 = 30 + 0.85 * 10, p99 = 30 + 0.97 * 10
    assert row["p50_ms"] == pytest.approx(25) and row["p95_ms"] == pytest.approx(38.5) and row["p99_ms"] == pytest.approx(39.7)
    assert row["deadline_hit"] == 2 / 5  # 10 and 20 ms of 5 requests; the rejected one is a miss
    assert row["mean_budget"] == 0.75
