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
    assert times.outside_ms < 20.0
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
