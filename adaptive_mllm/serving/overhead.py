"""The time a request spends in the server outside the model's worker, so a deadline can count it.

The worker sees a request from its arrival in LitServe's queue to the end of its batch's ``generate``.
Before that the HTTP server reads and parses the body; after it the answer is encoded, crosses back to
the HTTP server and is written out: a few milliseconds on a CPU, the same order as a tiny model's whole
answer. An ASGI middleware in the HTTP server times every chat request end to end, subtracts what the
worker reported in the reply (``queued_ms`` + ``measured_ms``), and keeps the last times of the rest in
shared memory; the worker (another process) takes their 90th percentile off every deadline (a high
quantile, as the latency correction: when another process shares the cores, the HTTP server's time
spreads too, and the slow requests are the ones that miss). Knowing each
request's whole time in the server, the middleware also counts the deadlines met.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from typing import Any

from adaptive_mllm.serving.correction import upper_quantile

WINDOW = 20  # the last requests that count
QUANTILE = 0.9


class ServerTimes:
    """Shared between the HTTP server and the worker processes (``multiprocessing`` values: LitServe forks
    the HTTP server and spawns the worker with the API as an argument, and both inherit them): the running
    90th percentile of the milliseconds recent requests spent outside the worker, and the deadlines met in
    the server."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._recent = context.Array("d", WINDOW)  # a ring of the last outside times (ms)
        self._seen = context.Value("l", 0)
        self._deadline_requests = context.Value("l", 0)
        self._deadline_met = context.Value("l", 0)

    @property
    def outside_ms(self) -> float:
        """The 90th percentile of the last ``WINDOW`` requests' times outside the worker (0 before any)."""
        with self._recent.get_lock():
            count = min(self._seen.value, WINDOW)
            return upper_quantile(self._recent[:count], QUANTILE) if count else 0.0

    def update(self, outside_ms: float) -> float:
        """Fold in one request's time outside the worker."""
        with self._recent.get_lock():
            self._recent[self._seen.value % WINDOW] = max(outside_ms, 0.0)
            self._seen.value += 1
        return self.outside_ms

    def count_deadline(self, met: bool) -> None:
        with self._deadline_requests.get_lock():
            self._deadline_requests.value += 1
            self._deadline_met.value += int(met)

    def counts(self) -> dict[str, float]:
        return {"outside_worker_ms": self.outside_ms, "server_deadline_requests": int(self._deadline_requests.value),
                "server_deadline_met": int(self._deadline_met.value)}  # fmt: skip


class ServerTimeMiddleware:
    """ASGI middleware timing ``path`` requests from the first byte in to the last byte out; a 200 reply's
    ``adaptive.queued_ms`` + ``adaptive.measured_ms`` are the worker's share, the rest is folded into
    ``times``, and a reply to a request with a deadline counts as met when the whole time fits."""

    def __init__(self, app: Any, times: ServerTimes, path: str) -> None:
        self.app = app
        self.times = times
        self.path = path

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("path") != self.path:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0
        body: list[bytes] = []

        async def timed_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status == 200:
                body.append(message.get("body", b""))
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False) and status == 200:
                self._record(1000 * (time.perf_counter() - start), b"".join(body))

        await self.app(scope, receive, timed_send)

    def _record(self, total_ms: float, body: bytes) -> None:
        try:
            adaptive = json.loads(body)["adaptive"]
            worker_ms = float(adaptive["queued_ms"]) + float(adaptive["measured_ms"])
            deadline_ms = adaptive.get("deadline_ms")
        except (ValueError, KeyError, TypeError):
            return  # not a chat completion (nothing to learn from it)
        self.times.update(total_ms - worker_ms)
        if deadline_ms is not None:
            self.times.count_deadline(total_ms <= float(deadline_ms))
