"""PreparingQueue: a request slow to prepare does not hold up the ones behind it, what is no request
passes as it came, a failed preparation still hands the request on, and reading ahead is bounded."""

from __future__ import annotations

import logging
import queue
import threading
import time

import pytest
from litserve.loops.base import _SENTINEL_VALUE

from adaptive_mllm.serving.preparing import STOP, PreparingQueue

SENTINEL = _SENTINEL_VALUE  # LitServe's stop signal


def _request(name: str, **payload) -> tuple:
    return (0, name, 1.0, {"name": name, **payload})


def test_a_slow_request_does_not_hold_up_the_next_one():
    release = threading.Event()

    def prepare(payload: dict) -> dict:
        if payload["name"] == "slow":
            release.wait(10)
        return {**payload, "prepared": True}

    source: queue.Queue = queue.Queue()
    source.put(_request("slow"))
    source.put(_request("quick"))
    prepared = PreparingQueue(source, prepare, threads=2, ahead=4)
    assert prepared.get(timeout=5) == (0, "quick", 1.0, {"name": "quick", "prepared": True})
    with pytest.raises(queue.Empty):
        prepared.get_nowait()  # the slow one is still being prepared
    release.set()
    assert prepared.get(timeout=5) == (0, "slow", 1.0, {"name": "slow", "prepared": True})


def test_what_is_no_request_passes_unprepared():
    source: queue.Queue = queue.Queue()
    source.put((0, "list", 1.0, [1, 2]))  # not a JSON object: decode_request refuses it
    source.put(SENTINEL)
    prepared = PreparingQueue(
        source, lambda payload: pytest.fail("prepared a non-request"), threads=1, ahead=4
    )
    assert prepared.get(timeout=5) == (0, "list", 1.0, [1, 2])
    assert prepared.get(timeout=5) == SENTINEL


def test_a_failed_preparation_hands_the_request_on(caplog: pytest.LogCaptureFixture):
    def prepare(payload: dict) -> dict:
        raise RuntimeError("boom")

    source: queue.Queue = queue.Queue()
    source.put(_request("broken"))
    with caplog.at_level(logging.ERROR, logger="adaptive_mllm.serving.preparing"):
        prepared = PreparingQueue(source, prepare, threads=1, ahead=4)
        assert prepared.get(timeout=5) == _request("broken")  # as it came: the loop decodes it and answers
    assert "preparing request broken failed" in caplog.text


def test_at_most_ahead_requests_are_read_before_they_are_collected():
    source: queue.Queue = queue.Queue()
    for number in range(10):
        source.put(_request(f"r{number}"))
    prepared = PreparingQueue(source, lambda payload: payload, threads=2, ahead=3)
    deadline = time.monotonic() + 5
    while prepared.ready.qsize() < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # time to read more, were it allowed
    assert prepared.ready.qsize() == 3 and source.qsize() == 7
    taken = [prepared.get(timeout=5)[1] for _ in range(10)]
    assert sorted(taken) == sorted(f"r{number}" for number in range(10))  # every request, once
    assert source.qsize() == 0


def test_threads_and_ahead_must_be_positive():
    with pytest.raises(ValueError, match="must be >= 1"):
        PreparingQueue(queue.Queue(), lambda payload: payload, threads=0, ahead=1)


class _BrokenQueue:
    def get(self):
        raise EOFError("the queue's other end is gone")


def test_a_broken_queue_stops_the_loop_instead_of_hanging(caplog: pytest.LogCaptureFixture):
    assert STOP == SENTINEL
    with caplog.at_level(logging.ERROR, logger="adaptive_mllm.serving.preparing"):
        prepared = PreparingQueue(_BrokenQueue(), lambda payload: payload, threads=1, ahead=2)
        assert prepared.get(timeout=5) == SENTINEL
    assert "reading the request queue failed" in caplog.text


def test_the_stop_signal_comes_after_the_requests_read_before_it_and_ends_the_reading():
    release = threading.Event()

    def prepare(payload: dict) -> dict:
        release.wait(10)
        return payload

    source: queue.Queue = queue.Queue()
    source.put(_request("before"))
    source.put(SENTINEL)
    source.put(_request("after"))
    prepared = PreparingQueue(source, prepare, threads=1, ahead=4)
    time.sleep(0.2)
    with pytest.raises(queue.Empty):
        prepared.get_nowait()  # not the stop signal while "before" is being prepared
    release.set()
    assert prepared.get(timeout=5)[1] == "before"
    assert prepared.get(timeout=5) == SENTINEL
    time.sleep(0.1)
    assert source.qsize() == 1  # "after" was not read: the worker is stopping
