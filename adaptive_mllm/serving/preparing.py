"""Requests prepared ahead: the worker reads its queue in a thread and decodes images in a small pool
while the model answers the batch before.

LitServe's batched loop decodes a batch's requests one after another, then runs the model: a large image
(a 4096x4096 JPEG is about half a second of CPU to decode and resize) stalls the model, and every request
queued behind it waits, deadlines included. Here a request reaches the batch collection only once its image
is decoded, so a slow image delays its own answer and, only while every preparing thread is busy with such
an image, the requests read after it; the model keeps answering what is ready. At most ``ahead`` requests
are read from the queue and not yet collected (the rest stay in LitServe's queue, where its request timeout
still applies). LitServe's stop signal is handed out after the requests read before it are prepared.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)
STOP = (None, None, None, None)  # LitServe's stop signal (litserve.loops.base._SENTINEL_VALUE)


def is_request(item: Any) -> bool:
    """LitServe's queued request: (response queue id, uid, arrival time, JSON-object payload)."""
    return isinstance(item, tuple) and len(item) == 4 and isinstance(item[3], dict)


class PreparingQueue:
    """``source`` read by a thread, each request's payload passed through ``prepare`` in a pool of
    ``threads``, handed out (``get``, ``get_nowait``) in the order they are ready. Anything that is not a
    request (LitServe's stop signal, a payload that is no JSON object) is handed out as it came."""

    def __init__(self, source: Any, prepare: Callable[[dict], dict], threads: int, ahead: int) -> None:
        if threads < 1 or ahead < 1:
            raise ValueError(f"threads ({threads}) and ahead ({ahead}) must be >= 1")
        self.source = source
        self.prepare = prepare
        self.ready: queue.Queue = queue.Queue()
        self.room = threading.Semaphore(ahead)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="adaptive-mllm-prepare")
        self.reader = threading.Thread(target=self._read, name="adaptive-mllm-reader", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            self.room.acquire()  # released when the item is handed out
            try:
                item = self.source.get()
            except Exception:  # a broken queue: stop the loop (LitServe's stop signal) rather than wait forever
                log.exception("reading the request queue failed; the worker stops")
                self.ready.put(STOP)
                return
            if is_request(item):
                self.pool.submit(self._prepare, item)
            elif item == STOP:  # after the requests read before it, and nothing read after it
                self.pool.shutdown(wait=True)
                self.ready.put(item)
                return
            else:
                self.ready.put(item)

    def _prepare(self, item: tuple) -> None:
        queue_id, uid, received, payload = item
        try:
            payload = self.prepare(payload)
        except Exception:  # the loop's decode_request meets the same problem and answers it (a 500)
            log.exception("preparing request %s failed; it is decoded in the model's loop instead", uid)
        self.ready.put((queue_id, uid, received, payload))

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        item = self.ready.get(block, timeout)
        self.room.release()
        return item

    def get_nowait(self) -> Any:
        return self.get(block=False)
