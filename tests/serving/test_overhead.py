"""ServerTimes and its middleware: the time outside the worker, worked by hand through a real ASGI app,
and shared with another process."""

from __future__ import annotations

import asyncio
import multiprocessing
import time

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from adaptive_mllm.serving.overhead import ServerTimeMiddleware, ServerTimes


def _app(times: ServerTimes, sleep_s: float, worker_ms: float, deadline_ms: float | None) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat() -> dict:
        await asyncio.sleep(sleep_s)  # the whole time in the server: worker_ms of it the worker's
        return {"adaptive": {"queued_ms": worker_ms / 2, "measured_ms": worker_ms / 2, "deadline_ms": deadline_ms}}

    @app.post("/v1/other")
    async def other() -> JSONResponse:
        return JSONResponse({"adaptive": {"queued_ms": 0, "measured_ms": 0}})

    app.add_middleware(ServerTimeMiddleware, times=times, path="/v1/chat/completions")
    return app


async def _post(app: FastAPI, path: str, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return [await client.post(path, json={}) for _ in range(count)]


def test_time_outside_the_worker_is_the_whole_time_less_the_workers_share():
    times = ServerTimes()
    # 60 ms in the server, of which the worker reports 20: about 40 ms outside it
    replies = asyncio.run(_post(_app(times, 0.06, 20.0, deadline_ms=None), "/v1/chat/completions", 1))
    assert replies[0].status_code == 200 and replies[0].json()["adaptive"]["measured_ms"] == 10.0  # passed unchanged
    first = times.outside_ms
    assert 39.0 <= first < 200.0
    assert times.counts()["server_deadline_requests"] == 0  # no deadline asked
    # fast requests: the slow one is the 90th percentile (nearest rank at or above) of up to 10 times
    asyncio.run(_post(_app(times, 0.0, 0.0, deadline_ms=None), "/v1/chat/completions", 9))
    assert times.outside_ms == first
    asyncio.run(_post(_app(times, 0.0, 0.0, deadline_ms=None), "/v1/chat/completions", 1))
    assert times.outside_ms < 39.0  # the slow one left the window (a fast one on a loaded machine may take 20 ms)
    before = times.outside_ms
    asyncio.run(_post(_app(times, 0.0, 0.0, None), "/v1/other", 3))  # other paths are not timed
    assert times.outside_ms == before


def test_deadlines_count_as_met_when_the_whole_server_time_fits():
    times = ServerTimes()
    asyncio.run(_post(_app(times, 0.05, 1.0, deadline_ms=20.0), "/v1/chat/completions", 2))  # ~50 ms > 20
    asyncio.run(_post(_app(times, 0.0, 1.0, deadline_ms=5000.0), "/v1/chat/completions", 1))
    counts = times.counts()
    assert (counts["server_deadline_requests"], counts["server_deadline_met"]) == (3, 1)


def _add_in_child(times: ServerTimes) -> None:
    times.update(7.0)


def test_values_are_shared_with_a_spawned_process():
    times = ServerTimes()
    process = multiprocessing.get_context("spawn").Process(target=_add_in_child, args=(times,))
    process.start()
    process.join(60)
    assert process.exitcode == 0
    assert times.outside_ms == 7.0


def test_the_90th_percentile_of_the_last_window():
    times = ServerTimes()
    assert times.outside_ms == 0.0
    assert times.update(-3.0) == 0.0  # never negative
    for value in range(1, 40):
        times.update(float(value))
    # the window holds 20 .. 39; nearest rank at or above 0.9 * 19 = 17.1: the 19th smallest, 38
    assert times.outside_ms == 38.0
    start = time.perf_counter()
    for _ in range(1000):
        times.update(1.0)
    assert time.perf_counter() - start < 1.0  # cheap enough to run per request


def _slow_app(times: ServerTimes, sleep_s: float, timeout_s: float) -> FastAPI:
    """A chat route that answers after ``sleep_s`` (a busy worker), a worker-style 4xx, and FastAPI's own checks."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict) -> JSONResponse:
        if body.get("bad"):  # as DeadlineAPI answers a bad request: its own status and an OpenAI error object
            return JSONResponse({"error": {"message": "budget: bad", "type": "invalid_request_error", "param": "budget"}}, 400)
        await asyncio.sleep(sleep_s)
        return JSONResponse({"adaptive": {"queued_ms": 0.0, "measured_ms": 0.0, "deadline_ms": body.get("deadline_ms")}})

    app.add_middleware(ServerTimeMiddleware, times=times, path="/v1/chat/completions", timeout_s=timeout_s)
    return app


async def _send_all(app: FastAPI, bodies: list[bytes]) -> list[tuple[int, float]]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        replies = []
        for body in bodies:
            start = time.perf_counter()
            reply = await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            replies.append((reply.status_code, time.perf_counter() - start))
        return replies


async def _sent_at(app: FastAPI, body: bytes) -> tuple[int, float]:
    """The status the app sends and the seconds until it sent it (an ASGI server writes it out then; httpx's
    ASGITransport would wait for the app to return)."""
    start = time.perf_counter()
    sent: list[tuple[int, float]] = []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}  # fmt: skip
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)  # the client waits for its answer
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            sent.append((message["status"], time.perf_counter() - start))

    await app(scope, receive, send)
    assert len(sent) == 1, sent  # the app's own late answer is not sent after the 504
    return sent[0]


def test_the_timeout_answers_504_at_the_timeout_and_counts_a_missed_deadline():
    """LitServe applies --timeout only when the worker collects a request: a busy worker kept clients waiting
    6.7-11.7 s for the 504 of a 1 s timeout, and the request vanished from every count."""
    times = ServerTimes()
    app = _slow_app(times, sleep_s=1.0, timeout_s=0.2)
    replies = [asyncio.run(_sent_at(app, body)) for body in (b'{"deadline_ms": 100}', b"{}")]
    assert [status for status, _ in replies] == [504, 504]
    assert all(seconds < 0.8 for _, seconds in replies), replies  # at the timeout, not when the worker is done
    counts = times.counts()
    assert counts["timed_out"] == 2
    assert (counts["server_deadline_requests"], counts["server_deadline_met"]) == (1, 0)  # a missed deadline
    fast = asyncio.run(_sent_at(_slow_app(times, sleep_s=0.0, timeout_s=0.2), b'{"deadline_ms": 10000}'))
    assert fast[0] == 200 and times.counts()["server_deadline_met"] == 1


def test_requests_refused_before_the_worker_are_counted():
    """FastAPI's 422 (not JSON, not an object) and the payload limit's 413 never reach the worker: every reply
    is counted on the HTTP side, by what its client got."""
    times = ServerTimes()
    replies = asyncio.run(_send_all(_slow_app(times, sleep_s=0.0, timeout_s=10.0), [b"{bad", b"[1]", b'{"bad": 1}', b"{}"]))
    assert [status for status, _ in replies] == [422, 422, 400, 200]
    counts = times.counts()
    assert {key: counts[key] for key in ("requests", "answered", "rejected", "timed_out", "failed")} == {
        "requests": 4, "answered": 1, "rejected": 3, "timed_out": 0, "failed": 0}  # fmt: skip


def test_metrics_count_replies_as_the_clients_got_them(tmp_path):
    """The worker's counts miss the HTTP layer's refusals and the timeouts, and count a request it answered after
    its client got a 504: /metrics reports the HTTP side's."""
    from adaptive_mllm.serving.server import server_metrics

    times = ServerTimes()
    asyncio.run(_sent_at(_slow_app(times, sleep_s=0.5, timeout_s=0.1), b"{}"))  # the worker answers it, too late
    asyncio.run(_send_all(_slow_app(times, sleep_s=0.0, timeout_s=1.0), [b"{bad"]))
    (tmp_path / "metrics.json").write_text('{"requests": 1, "answered": 1, "rejected": 0, "batches": 1}')
    metrics = server_metrics(str(tmp_path / "metrics.json"), times)
    assert (metrics["requests"], metrics["answered"], metrics["rejected"], metrics["timed_out"]) == (2, 0, 1, 1)
    assert metrics["batches"] == 1  # the worker's own


def test_a_request_the_app_fails_on_before_replying_counts_as_failed():
    """An exception before any reply bypassed the counts (Starlette's error middleware, outside this one, writes
    the 500): ``requests`` no longer summed its kinds."""
    times = ServerTimes()
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat() -> dict:
        raise RuntimeError("a bug")

    app.add_middleware(ServerTimeMiddleware, times=times, path="/v1/chat/completions", timeout_s=10.0)

    async def post() -> int:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return (await client.post("/v1/chat/completions", json={})).status_code

    assert asyncio.run(post()) == 500
    counts = times.counts()
    assert (counts["requests"], counts["failed"], counts["answered"]) == (1, 1, 0)


async def _reply_to_a_client_that_left(app: FastAPI) -> int:
    """The app's status for a client that sent its whole body and closed the connection at once."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}  # fmt: skip
    messages = [{"type": "http.request", "body": b"{}", "more_body": False}]
    sent: list[int] = []

    async def receive() -> dict:
        return messages.pop() if messages else {"type": "http.disconnect"}  # as uvicorn: the connection is gone

    async def send(message: dict) -> None:  # uvicorn drops writes to a closed connection
        if message["type"] == "http.response.start":
            sent.append(message["status"])

    await app(scope, receive, send)
    return sent[0]


def test_a_client_gone_before_its_reply_is_counted_as_disconnected():
    """Such a reply was counted as answered: its client got nothing."""
    times = ServerTimes()
    assert asyncio.run(_reply_to_a_client_that_left(_slow_app(times, sleep_s=0.0, timeout_s=10.0))) == 200
    counts = times.counts()
    assert (counts["requests"], counts["disconnected"], counts["answered"]) == (1, 1, 0)
    assert counts["server_deadline_requests"] == 0 and times.outside_ms == 0.0  # nothing learnt from it
    asyncio.run(_send_all(_slow_app(times, sleep_s=0.0, timeout_s=10.0), [b"{}"]))  # a client that stays
    counts = times.counts()
    assert (counts["requests"], counts["disconnected"], counts["answered"]) == (2, 1, 1)


async def _slow_upload(app: FastAPI, body: bytes, upload_s: float) -> int:
    """The app's status for a client that sends the headers and a first part of its body, then the rest
    ``upload_s`` later (a phone on a poor link, or a client doing it on purpose)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}  # fmt: skip
    parts = [{"type": "http.request", "body": body[:5], "more_body": True},
             {"type": "http.request", "body": body[5:], "more_body": False}]  # fmt: skip
    sent: list[int] = []

    async def receive() -> dict:
        if len(parts) == 1:
            await asyncio.sleep(upload_s)  # the rest of the body is still on the network
        if parts:
            return parts.pop(0)
        await asyncio.sleep(3600)  # the client waits for its answer
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            sent.append(message["status"])

    await app(scope, receive, send)
    return sent[0]


def test_a_slow_upload_is_not_counted_as_server_time():
    """The clock started when the app was called, before the body had arrived: a client's upload time went into the
    shared time outside the worker, which comes off every client's deadline (two slow uploaders put every deadline
    below 1.5 s at the smallest budget), and into its own deadline as a miss. It now starts once the whole body is in."""
    times = ServerTimes()
    app = _slow_app(times, sleep_s=0.0, timeout_s=10.0)
    status = asyncio.run(_slow_upload(app, b'{"deadline_ms": 400}', upload_s=0.6))
    assert status == 200
    assert times.outside_ms < 300.0, times.outside_ms  # the server's own few milliseconds, not the 600 ms upload
    counts = times.counts()
    assert (counts["server_deadline_requests"], counts["server_deadline_met"]) == (1, 1)  # met once the body was in
