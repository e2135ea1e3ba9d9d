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


def test_hit_rate_while_the_hog_ran_counts_only_the_requests_sent_then():
    records = [{"t": t, "latency_ms": latency, "status": status, "budget": 1.0}
               for t, latency, status in [(0.5, 10.0, 200), (1.5, 30.0, 200), (2.0, 10.0, 200), (2.5, 10.0, 500), (3.5, 30.0, 200)]]  # fmt: skip
    row = summarise("pinned", "hog", {"records": records, "seconds": 4.0, "hog_span": (1.0, 3.0)}, deadline_ms=20)
    assert row["hit_during_hog"] == 1 / 3  # of 1.5 (late), 2.0 (met), 2.5 (error): one met
    assert row["deadline_hit"] == 2 / 5
    assert summarise("a", "light", {"records": records, "seconds": 4.0, "hog_span": None}, 20)["hit_during_hog"] != 0.5  # nan


def test_echo_api_answers_every_request_of_a_batch_with_its_size():
    from bench.load_test import EchoAPI

    api = EchoAPI(max_batch_size=4)
    items = api.batch([api.decode_request({"messages": [{"role": "user", "content": "hi"}]}) for _ in range(3)])
    replies = [api.encode_response(output) for output in api.unbatch(api.predict(items))]
    assert [reply["adaptive"]["batch_size"] for reply in replies] == [3, 3, 3]
    assert replies[0]["choices"][0]["message"]["content"] == "yes"


def test_after_idle_times_the_call_and_not_the_pause():
    import time

    from bench.load_test import after_idle_ms

    calls = []
    ms = after_idle_ms(lambda: (calls.append(1), time.sleep(0.01)), idle_s=0.05, rounds=3)
    assert len(calls) == 3
    assert 10 <= ms < 45  # the 10 ms call, without the 50 ms pause before it
