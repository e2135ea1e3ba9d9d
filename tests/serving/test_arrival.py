"""StampingLoop's queue view: payloads get their arrival time, a client cannot forge it, the rest passes."""

from __future__ import annotations

import queue
import time

from adaptive_mllm.serving.arrival import RECEIVED, _StampingQueue, waited_ms


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
