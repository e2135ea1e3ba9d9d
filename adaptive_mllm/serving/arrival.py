"""When each request reached the server: LitServe's batched loop, with every payload stamped with the
time its request was queued, so that a deadline counts the time spent waiting for the worker.

LitServe queues ``(response queue id, uid, time.monotonic() at arrival, payload)``; the worker's loop
sees the time but ``decode_request`` only the payload. ``time.monotonic`` is one clock for every process
of the machine, so the worker can subtract. The stamp is written over any same-named field a client sent.
"""

from __future__ import annotations

import time
from typing import Any

from litserve.loops import BatchedLoop

RECEIVED = "__received_monotonic"


def waited_ms(received: float | None) -> float:
    """Milliseconds since ``received`` (0 when unknown)."""
    return 0.0 if received is None else max(1000 * (time.monotonic() - received), 0.0)


def _stamp(item: Any) -> Any:
    if isinstance(item, tuple) and len(item) == 4 and isinstance(item[3], dict):
        queue_id, uid, received, payload = item
        return queue_id, uid, received, {**payload, RECEIVED: received}
    return item  # the stop sentinel, or a payload that is no JSON object (decode_request rejects it)


class _StampingQueue:
    """The request queue as the batched loop reads it, each payload stamped."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def get(self, *args: Any, **kwargs: Any) -> Any:
        return _stamp(self.queue.get(*args, **kwargs))

    def get_nowait(self) -> Any:
        return _stamp(self.queue.get_nowait())


class StampingLoop(BatchedLoop):
    """LitServe's BatchedLoop reading a stamping view of the request queue."""

    def get_batch_requests(self, lit_api: Any, request_queue: Any, transport: Any) -> tuple[list, list]:
        return super().get_batch_requests(lit_api, _StampingQueue(request_queue), transport)
