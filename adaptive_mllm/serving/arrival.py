"""The worker's batched loop: every payload stamped with the time its request reached the server (a
deadline counts the time spent waiting for the worker), and batches collected without waiting.

LitServe's batched loop waits ``batch_timeout`` for a batch to fill, a delay every request pays even when
it is alone. With ``batch_timeout=0`` (the server's default) the loop here blocks until a request comes,
then takes whatever else is already queued, up to ``max_batch_size``: an idle server answers at once, and
under load requests pile up while a batch runs, so the next batch is full by itself. (LitServe's own
``batch_timeout=0`` polls the queue in a busy loop, which would take a core from the model.)

LitServe queues ``(response queue id, uid, time.monotonic() at arrival, payload)``; the worker's loop
sees the time but ``decode_request`` only the payload. ``time.monotonic`` is one clock for every process
of the machine, so the worker can subtract. The stamp is written over any same-named field a client sent.

With ``prepare_threads`` > 0 the loop collects from a :class:`~adaptive_mllm.serving.preparing.PreparingQueue`:
each request's image is decoded ahead (the API's ``prepare_request``) while the model runs, and a request
joins a batch once it is ready.
"""

from __future__ import annotations

import time
from queue import Empty
from typing import Any

from litserve.loops import BatchedLoop
from litserve.loops.base import collate_requests

from adaptive_mllm.serving.preparing import PreparingQueue, is_request

RECEIVED = "__received_monotonic"
IDLE_WAIT_S = 0.1  # an idle worker wakes this often (to see LitServe's stop signal), not a request delay


def waited_ms(received: float | None) -> float:
    """Milliseconds since ``received`` (0 when unknown)."""
    return 0.0 if received is None else max(1000 * (time.monotonic() - received), 0.0)


def _stamp(item: Any) -> Any:
    if is_request(item):
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


class _HeldFirst:
    """A queue whose first item was already taken (to wait for it without polling): it is handed out again
    first, so LitServe's collection sees every request."""

    def __init__(self, first: Any, queue: Any) -> None:
        self.first = first
        self.queue = queue

    def get_nowait(self) -> Any:
        if self.first is not None:
            item, self.first = self.first, None
            return item
        return self.queue.get_nowait()


class StampingLoop(BatchedLoop):
    """LitServe's BatchedLoop reading a stamping view of the request queue, collecting greedily when the
    API's ``batch_timeout`` is 0 (LitServe's waiting collection otherwise).

    Args:
        prepare_threads: threads decoding requests ahead through the API's ``prepare_request(payload) ->
            payload`` (0: none, LitServe's order: a batch's requests are decoded when it is collected).
    """

    def __init__(self, prepare_threads: int = 0) -> None:
        super().__init__()
        self.prepare_threads = prepare_threads
        self.prepared: PreparingQueue | None = None  # started in the worker, on the first collection

    def _queue(self, lit_api: Any, request_queue: Any) -> Any:
        stamped = _StampingQueue(request_queue)
        if self.prepare_threads == 0:
            return stamped
        if self.prepared is None:
            ahead = 2 * lit_api.max_batch_size  # the next batch is ready while this one runs
            self.prepared = PreparingQueue(stamped, lit_api.prepare_request, self.prepare_threads, ahead)
        return self.prepared

    def get_batch_requests(self, lit_api: Any, request_queue: Any, transport: Any) -> tuple[list, list]:
        queue = self._queue(lit_api, request_queue)
        if lit_api.batch_timeout > 0:
            return super().get_batch_requests(lit_api, queue, transport)
        try:
            first = queue.get(timeout=IDLE_WAIT_S)
        except Empty:
            return [], []
        # LitServe's no-wait collection (marks each request started, drops timed-out ones, stops on the
        # stop signal), fed the held request first and then only what is already queued
        return collate_requests(loop=self, lit_api=lit_api, request_queue=_HeldFirst(first, queue), transport=transport)
