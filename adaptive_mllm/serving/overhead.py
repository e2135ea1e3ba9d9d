"""The time a request spends in the server outside the model's worker, so a deadline can count it.

The worker sees a request from its arrival in LitServe's queue to the end of its batch's ``generate``.
Before that the HTTP server reads and parses the body; after it the answer is encoded, crosses back to
the HTTP server and is written out: a few milliseconds on a CPU, the same order as a tiny model's whole
answer. An ASGI middleware in the HTTP server times every chat request from the moment its body has been
received (the time a client takes to upload it is the network's, not the server's: counted, one slow uploader
would be taken off every other client's deadline) to its last byte out, subtracts what the
worker reported in the reply (``queued_ms`` + ``measured_ms``), and keeps the last times of the rest in
shared memory; the worker (another process) takes their 90th percentile off every deadline (a high
quantile, as the latency correction: when another process shares the cores, the HTTP server's time
spreads too, and the slow requests are the ones that miss). Knowing each
request's whole time in the server, the middleware also counts the deadlines met.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import multiprocessing
import time
from typing import Any

import anyio

from adaptive_mllm.serving.correction import upper_quantile

log = logging.getLogger(__name__)

WINDOW = 20  # the last requests that count
QUANTILE = 0.9
# what a chat request's client got: 2xx, 4xx (refused by the HTTP layer or by the worker), 504, any other status
# (an exception before any reply: Starlette's 500), or nothing: it had gone before its reply was sent
REPLIES = ("answered", "rejected", "timed_out", "failed", "disconnected")


class ServerTimes:
    """Shared between the HTTP server and the worker processes (``multiprocessing`` values: LitServe forks
    the HTTP server and spawns the worker with the API as an argument, and both inherit them): the running
    90th percentile of the milliseconds recent requests spent outside the worker, the deadlines met in
    the server, and every chat request by what its client got (the worker sees neither the requests the HTTP
    layer refuses nor the 504s, and may answer a request whose client already got its 504)."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._recent = context.Array("d", WINDOW)  # a ring of the last outside times (ms)
        self._seen = context.Value("l", 0)
        self._deadline_requests = context.Value("l", 0)
        self._deadline_met = context.Value("l", 0)
        self._replies = context.Array("l", len(REPLIES))  # per kind of REPLIES

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

    def count_reply(self, status: int, deadline_ms: float | None = None, gone: bool = False) -> None:
        """One chat request's reply (``gone``: its client had disconnected, it got nothing); a 504's deadline is
        missed (its client got no answer)."""
        kind = "answered" if 200 <= status < 300 else "timed_out" if status == 504 else "rejected" if 400 <= status < 500 else "failed"
        kind = "disconnected" if gone else kind
        with self._replies.get_lock():
            self._replies[REPLIES.index(kind)] += 1
        if kind == "timed_out" and deadline_ms is not None:
            self.count_deadline(False)

    def counts(self) -> dict[str, float]:
        with self._replies.get_lock():
            replies = dict(zip(REPLIES, (int(count) for count in self._replies), strict=True))
        return {"outside_worker_ms": self.outside_ms, "server_deadline_requests": int(self._deadline_requests.value),
                "server_deadline_met": int(self._deadline_met.value), "requests": sum(replies.values()), **replies}  # fmt: skip


class ServerTimeMiddleware:
    """ASGI middleware timing ``path`` requests from the last byte of the body in (the ``http.request`` message
    with no more body: the client's upload is not the server's time) to the last byte out; a 200 reply's
    ``adaptive.queued_ms`` + ``adaptive.measured_ms`` are the worker's share, the rest is folded into
    ``times``, and a reply to a request with a deadline counts as met when the whole time fits.

    ``timeout_s``: a request not answered by then gets a 504 at once (LitServe checks its timeout only when
    the worker collects a request, so behind a busy worker a client waited many times the timeout); the
    request itself goes on to the worker, which drops it when it collects it, and any later answer is
    discarded. Every reply is counted in ``times`` by its status, a request whose client had gone before its reply
    as ``disconnected``, and one the app failed on before replying as a 500 (Starlette's error middleware, outside
    this one, writes that reply)."""

    def __init__(self, app: Any, times: ServerTimes, path: str, timeout_s: float | None = None) -> None:
        self.app = app
        self.times = times
        self.path = path
        self.timeout_s = timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("path") != self.path:
            await self.app(scope, receive, send)
            return
        called = time.perf_counter()
        start: float | None = None  # the server's clock: from when the whole body has been received
        status = 0
        late = False  # the timeout answered the client: the app's reply goes nowhere
        body: list[bytes] = []
        request: list[bytes] = []  # read again only for a 504's deadline

        async def read() -> dict:
            nonlocal start
            message = await receive()
            if message["type"] == "http.request":
                request.append(message.get("body", b""))
                if not message.get("more_body", False) and start is None:
                    start = time.perf_counter()
            return message

        gone = False  # the client disconnected before its reply started

        async def timed_send(message: dict) -> None:
            nonlocal status, gone
            if late:
                return
            if message["type"] == "http.response.start":
                status = message["status"]
                gone = await _disconnected(receive)
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                # an app that answered without reading the whole body waited for no upload: timed from its call
                total_ms = 1000 * (time.perf_counter() - (called if start is None else start))
                self._record(status, total_ms, b"".join(body), request, gone)

        task = asyncio.ensure_future(self.app(scope, read, timed_send))
        try:
            done, _ = await asyncio.wait({task}, timeout=self.timeout_s)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done and status == 0:  # nothing sent yet (no await between this check and setting late)
            late = True
            await self._time_out(send, request)
        try:
            await task
        except Exception:
            if not late:
                if status == 0:  # nothing sent: the 500 comes from outside, uncounted by timed_send
                    self.times.count_reply(500)
                raise
            log.debug("a request answered by the timeout failed afterwards", exc_info=True)

    async def _time_out(self, send: Any, request: list[bytes]) -> None:
        message = f"no answer within the server's --timeout of {self.timeout_s:g} s"
        content = json.dumps({"error": {"message": message, "type": "timeout", "param": None}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        await send({"type": "http.response.start", "status": 504, "headers": headers})
        await send({"type": "http.response.body", "body": content})
        self.times.count_reply(504, _deadline_ms(request))

    def _record(self, status: int, total_ms: float, body: bytes, request: list[bytes], gone: bool) -> None:
        self.times.count_reply(status, _deadline_ms(request) if status == 504 else None, gone)  # LitServe's 504 too
        if status != 200 or gone:
            return
        try:
            adaptive = json.loads(body)["adaptive"]
            worker_ms = float(adaptive["queued_ms"]) + float(adaptive["measured_ms"])
            deadline_ms = adaptive.get("deadline_ms")
        except (ValueError, KeyError, TypeError):
            return  # not a chat completion (nothing to learn from it)
        self.times.update(total_ms - worker_ms)
        if deadline_ms is not None:
            self.times.count_deadline(total_ms <= float(deadline_ms))


async def _disconnected(receive: Any) -> bool:
    """Whether the client has gone (the server has seen its connection close), without waiting: Starlette's
    ``Request.is_disconnected``. Once the app has read the body a client still there sends nothing more."""
    message: dict = {}
    with anyio.CancelScope() as scope:
        scope.cancel()
        message = await receive()
    return message.get("type") == "http.disconnect"


def _deadline_ms(request: list[bytes]) -> float | None:
    """The ``deadline_ms`` of a request's body, if it has a usable one."""
    try:
        value = json.loads(b"".join(request)).get("deadline_ms")
    except (ValueError, AttributeError, RecursionError):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        return None
    return float(value) if isinstance(value, float) or value < 10**300 else math.inf
