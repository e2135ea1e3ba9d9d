"""Do large images slow down everyone else's answers? The server with its images decoded ahead
(``--prepare_threads 2``, the default) against decoding in the model's loop (``--prepare_threads 0``,
LitServe's order).

Starts `adaptive-mllm serve` on 127.0.0.1 with each setting in turn (random weights, budget 1.0 per
request). One client sends small-image requests one after another, first alone, then while a second
client sends 4096x4096 JPEGs (6.5 MB each). Prints the small requests' p50 / p95 / max end-to-end latency
in both phases, their ratio, and the large requests' own latency; bounded by ``--requests`` and
``--phase_seconds`` per phase.

The large client runs in its own process (its JSON encoding of 8.7 MB bodies would otherwise hold the small
client's interpreter lock). By default it sends back to back, so the load it offers depends on how fast the
server answers it; ``--large_every_s S`` sends one large image every S seconds instead (or right after the last
answer when that took longer), the same load under both settings.

    python bench/large_images.py --config recipes/tiny.yaml --requests 200 --phase_seconds 60 --large_every_s 1.5

Other flags are recipe overrides, passed to the server.
"""

from __future__ import annotations

import argparse
import base64
import io
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from load_test import QUESTIONS, _free_port, _images, _launch, stop  # noqa: E402

LARGE_SIDE = 4096


def large_image(side: int = LARGE_SIDE) -> str:
    """A photo-sized JPEG data URL (a gradient with noise, so it neither compresses away nor exceeds 8 MB)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side]
    pixels = np.stack([(x // 16) % 256, (y // 16) % 256, ((x + y) // 32) % 256], -1).astype("uint8")
    pixels += rng.integers(0, 16, pixels.shape, dtype="uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def body(image: str, number: int) -> dict:
    content = [
        {"type": "image_url", "image_url": {"url": image}},
        {"type": "text", "text": QUESTIONS[number % len(QUESTIONS)]},
    ]
    return {"messages": [{"role": "user", "content": content}], "budget": 1.0}


def small_client(base: str, images: list[str], requests: int, seconds: float) -> list[float]:
    """End-to-end milliseconds of small-image requests sent one after another."""
    times = []
    end = time.monotonic() + seconds
    with httpx.Client(timeout=120) as http:
        for number in range(requests):
            if time.monotonic() > end:
                break
            begin = time.perf_counter()
            http.post(
                f"{base}/v1/chat/completions", json=body(images[number % len(images)], number)
            ).raise_for_status()
            times.append(1000 * (time.perf_counter() - begin))
    return times


def large_client(base: str, image: str, stop_event: Any, times: Any, every_s: float) -> None:
    """Large-image requests until told to stop: back to back (``every_s`` 0), or one every ``every_s`` seconds."""
    with httpx.Client(timeout=120) as http:
        number = 0
        while not stop_event.is_set():
            begin = time.perf_counter()
            http.post(f"{base}/v1/chat/completions", json=body(image, number)).raise_for_status()
            times.append(1000 * (time.perf_counter() - begin))
            number += 1
            stop_event.wait(max(0.0, every_s - (time.perf_counter() - begin)))


def summary(times: list[float]) -> str:
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return (
        f"n {len(times)}, p50 {statistics.median(times):.1f} ms, p95 {p95:.1f} ms, max {ordered[-1]:.1f} ms"
    )


def run(
    args: argparse.Namespace, overrides: list[str], prepare_threads: int, images: list[str], large: str
) -> dict:
    port = _free_port()
    command = [sys.executable, "-c", "import sys; from adaptive_mllm.serving import serve; serve(sys.argv[1:])",
               "--config", args.config, "--host", "127.0.0.1", "--port", str(port), "--max_image_bytes", str(16 << 20),
               "--prepare_threads", str(prepare_threads)]  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    process, base = _launch(
        command + overrides, port, set(os.sched_getaffinity(0)), args.out / f"server-{prepare_threads}.log"
    )
    try:
        small_client(base, images, 20, 60)  # warm-up
        alone = small_client(base, images, args.requests, args.phase_seconds)
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager:
            stop_event, large_times = manager.Event(), manager.list()
            sender = context.Process(target=large_client, args=(base, large, stop_event, large_times, args.large_every_s))
            sender.start()
            time.sleep(1.0)  # the large client is sending
            beside = small_client(base, images, args.requests, args.phase_seconds)
            stop_event.set()
            sender.join()
            large_times = list(large_times)
    finally:
        stop(process)
    return {"alone": alone, "beside": beside, "large": large_times}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="recipes/tiny.yaml")
    p.add_argument("--requests", type=int, default=200, help="small requests per phase (at most)")
    p.add_argument("--phase_seconds", type=float, default=60.0, help="longest a phase runs")
    p.add_argument("--out", type=Path, default=Path("runs/large_images"), help="where the server logs go")
    p.add_argument("--large_every_s", type=float, default=0.0, help="one large image every S seconds (0: back to back)")
    args, overrides = p.parse_known_args()
    images, large = _images(8), large_image()
    print(f"large image: {LARGE_SIDE}x{LARGE_SIDE} JPEG, {len(large) * 3 // 4 / 1e6:.1f} MB")
    results = {threads: run(args, overrides, threads, images, large) for threads in (2, 0)}
    for threads, result in results.items():
        name = (
            "decoded ahead (--prepare_threads 2)" if threads else "decoded in the loop (--prepare_threads 0)"
        )
        print(f"{name}")
        print(f"  small, alone:        {summary(result['alone'])}")
        print(f"  small, beside large: {summary(result['beside'])}")
        print(f"  large:               {summary(result['large'])}")
        ratio = statistics.median(result["beside"]) / statistics.median(result["alone"])
        print(f"  small p50 beside large / alone: {ratio:.2f}")
    ahead, loop = results[2]["beside"], results[0]["beside"]
    print(
        f"small p50 beside large, ahead / in the loop: {statistics.median(ahead) / statistics.median(loop):.2f}"
    )


if __name__ == "__main__":
    main()
