"""StampingLoop: payloads get their arrival time (a client cannot forge it, the rest passes), and with
``batch_timeout=0`` a batch is what is already queued, collected without waiting."""

from __future__ import annotations

import queue
import threading
import time

import pytest
from litserve.loops.base import _StopLoopError

from adaptive_mllm.serving.arrival import IDLE_WAIT_S, RECEIVED, StampingLoop, _StampingQueue, waited_ms


def test_payloads_are_stamped_with_their_queue_time_and_other_items_pass_unchanged():
    source: queue.Queue = queue.Queue()
    source.put(("q0", "uid-1", 123.5, {"messages": [], RECEIVED: 1.0}))  # a forged stamp is overwritten
    source.put(("q0", "uid-2", 124.0, [1, 2]))  # not a JSON object: left for decode_request to reject
    source.put("sentinel")
    view = _StampingQueue(source)
    assert view.get(timeout=1) == ("q0", "uid-1", 123.5, {"messages": [], RECEIVED: 123.5})
    assert view.get_nowait() == ("q0", "uid-2", 124.0, [1, 2])
    assert view.get() == "sentinel"


def test_waited_ms():
    assert waited_ms(None) == 0.0
    assert 250 <= waited_ms(time.monotonic() - 0.25) < 1250
    assert waited_ms(time.monotonic() + 10) == 0.0  # never negative


class _Api:
    """What LitServe's collection reads of a LitAPI."""

    max_batch_size = 3
    batch_timeout = 0.0
    request_timeout = -1
    stream = False


class _Transport:
    def __init__(self) -> None:
        self.sent: list = []

    def send(self, item, consumer_id) -> None:
        self.sent.append((consumer_id, item))


def test_greedy_collection_takes_what_is_queued_without_waiting_and_stops_on_the_sentinel():
    loop, api, transport = StampingLoop(), _Api(), _Transport()
    source: queue.Queue = queue.Queue()
    start = time.monotonic()
    assert loop.get_batch_requests(api, source, transport) == ([], [])  # idle: one blocking wait, no spinning
    assert IDLE_WAIT_S * 0.9 <= time.monotonic() - start < IDLE_WAIT_S + 1.0
    for number in range(5):
        source.put((0, f"uid-{number}", 100.0 + number, {"n": number}))
    start = time.monotonic()
    first, timed_out = loop.get_batch_requests(api, source, transport)
    second, _ = loop.get_batch_requests(api, source, transport)
    assert time.monotonic() - start < IDLE_WAIT_S  # nothing waited for more requests
    assert timed_out == []
    # in order, full batches first, each payload stamped with its queue time
    assert first == [(0, f"uid-{n}", {"n": n, RECEIVED: 100.0 + n}) for n in range(3)]
    assert second == [(0, f"uid-{n}", {"n": n, RECEIVED: 100.0 + n}) for n in range(3, 5)]
    source.put((None, None, None, None))  # LitServe's stop signal
    with pytest.raises(_StopLoopError):
        loop.get_batch_requests(api, source, transport)


def test_a_positive_batch_timeout_keeps_litserves_waiting_collection():
    loop, api, transport = StampingLoop(), _Api(), _Transport()
    api.batch_timeout = 0.3
    source: queue.Queue = queue.Queue()
    source.put((0, "uid-0", 1.0, {}))
    start = time.monotonic()
    batch, _ = loop.get_batch_requests(api, source, transport)
    assert batch == [(0, "uid-0", {RECEIVED: 1.0})]
    assert time.monotonic() - start >= 0.25  # it waited for the batch to fill


class _PreparingApi(_Api):
    """An API whose ``prepare_request`` is slow for one request."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def prepare_request(self, payload: dict) -> dict:
        if payload.get("slow"):
            self.release.wait(10)
        return {**payload, "prepared": True}


def _next_batch(loop: StampingLoop, api: _Api, source: queue.Queue, transport: _Transport) -> list:
    """The first non-empty batch (an idle collection returns none after IDLE_WAIT_S)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        batch, _ = loop.get_batch_requests(api, source, transport)
        if batch:
            return batch
    raise AssertionError("no batch within 10 s")


def test_with_prepare_threads_a_batch_is_collected_from_prepared_requests_and_a_slow_one_waits_alone():
    loop, api, transport = StampingLoop(prepare_threads=2), _PreparingApi(), _Transport()
    source: queue.Queue = queue.Queue()
    source.put((0, "uid-slow", 100.0, {"slow": True}))
    source.put((0, "uid-quick", 101.0, {}))
    batch = _next_batch(loop, api, source, transport)
    assert batch == [(0, "uid-quick", {RECEIVED: 101.0, "prepared": True})]  # stamped, prepared, not held up
    assert loop.get_batch_requests(api, source, transport) == ([], [])  # the slow one is not ready
    api.release.set()
    batch = _next_batch(loop, api, source, transport)
    assert batch == [(0, "uid-slow", {"slow": True, RECEIVED: 100.0, "prepared": True})]
    source.put((None, None, None, None))
    with pytest.raises(_StopLoopError):
        loop.get_batch_requests(api, source, transport)
