"""Load test of the deadline-aware server: does it hold deadlines while the machine slows down?

Starts `adaptive-mllm serve` on 127.0.0.1 twice with the same model: (a) adaptive, each request carrying
``deadline_ms``; (b) pinned to budget 1.0 (deadlines ignored). Each server gets three phases of the same
request mix: light load (one client), heavy load (``--heavy_clients`` clients), and light load with a
CPU hog running while the middle third of the phase's requests is sent: one busy process on each of the server's
cores (``--server_cpus``, the server and everything it starts pinned there, the clients on the other cores), so
the server keeps about half its compute, the seed's "50% compute resources". Every phase is
bounded by ``--requests`` and ``--phase_seconds``; nothing leaves the loopback interface.

    python bench/load_test.py --config recipes/tiny.yaml --out runs/load_test [--ckpt_path C] [--profile P]

Prints throughput, p50 / p95 / p99 end-to-end latency and the deadline hit rate per server and phase,
and writes ``<out>/requests.csv``, ``<out>/summary.md`` and ``<out>/latency.png`` (latency over time,
the deadline line, the budgets chosen, the hog's span). Without ``--profile`` one is measured first
(``<out>/profile.json``). The deadline defaults to ``--deadline_factor`` x what one request at budget
1.0 takes end to end, measured while warming up the first server (one request at a time, quiet machine).
Other flags are recipe overrides, passed to every model build, e.g.
``--data.init_args.data_dir=data/shapes-small --data.init_args.num_train=500
--model.backbone.init_args.tokenizer=data/shapes-small/tokenizer`` (random weights need only the tokenizer the
datamodule writes; a set of other sizes needs a data_dir of its own).
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import litserve as ls
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
QUESTIONS = ["What colour is the circle ?", "What shape is red ?", "How many squares are there ?", "Is there a blue triangle ?"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _images(count: int, size: int = 64) -> list[str]:
    rng = np.random.default_rng(0)
    urls = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(buffer, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


class EchoAPI(ls.LitAPI):
    """LitServe's floor: the same route, batching and request body as `adaptive-mllm serve`, and no model,
    no image decoding, no middleware: each request is answered with a fixed chat completion. What it
    takes end to end is what any LitServe server costs here before it does any work."""

    def setup(self, device: str) -> None:
        pass

    def decode_request(self, request: dict) -> int:
        return len(request["messages"])

    def batch(self, inputs: list) -> list:
        return list(inputs)

    def predict(self, items: list) -> list:
        return [("yes", len(items))] * len(items)

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output: tuple[str, int]) -> dict:
        text, batch_size = output
        return {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
                "adaptive": {"batch_size": batch_size}}  # fmt: skip


def serve_echo(port: int, max_batch_size: int, batch_timeout: float) -> None:
    api = EchoAPI(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/v1/chat/completions")
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1)
    server.run(host="127.0.0.1", port=port, generate_client_file=False, num_api_servers=1)


def start_server(args: argparse.Namespace, profile: Path | None, pinned: bool, log_path: Path) -> tuple[subprocess.Popen, str]:
    """`adaptive-mllm serve` on a free loopback port (adaptive, or pinned to budget 1.0)."""
    port = _free_port()
    command = [sys.executable, "-c", "import sys; from adaptive_mllm.serving import serve; serve(sys.argv[1:])",
               "--config", args.config, "--host", "127.0.0.1", "--port", str(port),
               "--max_batch_size", str(args.max_batch_size), "--batch_timeout", str(args.batch_timeout)]  # fmt: skip
    command += ["--profile", str(profile)] if profile is not None else []
    if args.ckpt_path:
        command += ["--ckpt_path", args.ckpt_path]
    if pinned:
        command += ["--pinned_budget", "1.0"]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    return _launch(command + args.overrides, port, args.server_cpus, log_path)


def start_echo_server(args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, str]:
    """The echo API (LitServe's floor) on a free loopback port, with the same batching as the real server."""
    port = _free_port()
    command = [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from load_test import serve_echo; "
               "serve_echo(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))",
               str(Path(__file__).parent), str(port), str(args.max_batch_size), str(args.batch_timeout)]  # fmt: skip
    return _launch(command, port, args.server_cpus, log_path)


def _launch(command: list[str], port: int, cpus: set[int], log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start a server process in its own session and wait until its /health answers 200."""
    log = open(log_path, "w")
    # the server's processes (HTTP, queue manager, worker) run on --server_cpus only; children inherit it
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=subprocess.STDOUT,
                               preexec_fn=lambda: os.sched_setaffinity(0, cpus),
                               start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(process)
    raise RuntimeError(f"the server did not start; see {log_path}")


def stop(process: subprocess.Popen) -> None:
    """The server and the workers it spawned (its own session)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def start_hog(cpus: set[int]) -> list[subprocess.Popen]:
    """One busy process pinned to each of the server's cores: the server keeps about half its compute."""
    return [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=lambda cpu=cpu: os.sched_setaffinity(0, {cpu}))
        for cpu in sorted(cpus)
    ]


def stop_hog(hogs: list[subprocess.Popen]) -> None:
    for process in hogs:
        process.kill()
        process.wait()


def warm_up(base: str, images: list[str], burst: int) -> float:
    """Requests at budget 1.0 before timing starts (first calls allocate and compile; the first ``burst``
    requests sent at once cost LitServe's HTTP process about 250 ms more, once: its threads connect to the
    queue manager); returns the median end-to-end time of ten, one at a time (ms)."""
    served_batch_ms(base, images, burst, 2)
    times = []
    with httpx.Client(timeout=120) as http:
        for number in range(13):
            begin = time.perf_counter()
            http.post(f"{base}/v1/chat/completions", json=_body(images, number, budget=1.0)).raise_for_status()
            times.append(1000 * (time.perf_counter() - begin))
    return statistics.median(times[3:])


def run_phase(base: str, clients: int, args: argparse.Namespace, deadline_ms: float, images: list[str], hog: bool) -> dict:
    """Send requests from ``clients`` threads until ``--requests`` are sent or ``--phase_seconds`` pass."""
    records: list[dict] = []
    lock = threading.Lock()
    sent = [0]
    ready = threading.Barrier(clients + 1)  # clients are built before the clock starts (it costs CPU and the GIL)
    clock = {}

    def client(index: int) -> None:
        with httpx.Client(timeout=120) as http:
            ready.wait()
            start, stop_at = clock["start"], clock["stop_at"]
            while time.perf_counter() < stop_at:
                with lock:
                    if sent[0] >= args.requests:
                        return
                    number = sent[0]
                    sent[0] += 1
                begin = time.perf_counter()
                reply = http.post(f"{base}/v1/chat/completions", json=_body(images, number, deadline_ms=deadline_ms))
                end = time.perf_counter()
                extra = reply.json().get("adaptive", {}) if reply.status_code == 200 else {}
                with lock:
                    records.append({"t": begin - start, "latency_ms": 1000 * (end - begin), "status": reply.status_code,
                                    "budget": extra.get("budget"), "batch_size": extra.get("batch_size"),
                                    "correction": extra.get("correction")})  # fmt: skip

    hogs: list[subprocess.Popen] = []
    hog_span: list[float] = []  # when the hog actually started and stopped, seconds into the phase
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    start = time.perf_counter()
    clock.update(start=start, stop_at=start + args.phase_seconds)
    ready.wait()
    try:
        while any(thread.is_alive() for thread in threads):
            # the hog runs while the middle third of the requests is sent
            if hog and not hog_span and sent[0] >= args.requests / 3:
                hogs = start_hog(args.server_cpus)
                hog_span.append(time.perf_counter() - start)
            if hogs and sent[0] >= 2 * args.requests / 3:
                stop_hog(hogs)
                hogs = []
                hog_span.append(time.perf_counter() - start)
            time.sleep(0.02)
    finally:
        stop_hog(hogs)
        if len(hog_span) == 1:
            hog_span.append(time.perf_counter() - start)
    return {"records": sorted(records, key=lambda r: r["t"]), "seconds": time.perf_counter() - start, "hog_span": tuple(hog_span) or None}


def _body(images: list[str], number: int, **extra: float) -> dict:
    return {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": images[number % len(images)]}},
        {"type": "text", "text": QUESTIONS[number % len(QUESTIONS)]}]}], **extra}  # fmt: skip


def served_batch_ms(base: str, images: list[str], batch_size: int, rounds: int) -> tuple[float, list[int]]:
    """Median over rounds of the slowest of ``batch_size`` budget-1.0 requests sent at once (end to end),
    and the batch sizes the server reported (all equal to ``batch_size`` when it batched them together)."""
    from concurrent.futures import ThreadPoolExecutor

    times, sizes = [], []
    with ThreadPoolExecutor(batch_size) as pool, httpx.Client(timeout=120) as http:
        for _ in range(rounds):
            def one(number: int) -> tuple[float, int]:
                begin = time.perf_counter()
                reply = http.post(f"{base}/v1/chat/completions", json=_body(images, number, budget=1.0))
                reply.raise_for_status()
                return time.perf_counter() - begin, reply.json()["adaptive"]["batch_size"]

            results = list(pool.map(one, range(batch_size)))
            times.append(1000 * max(t for t, _ in results))
            sizes += [size for _, size in results]
    return statistics.median(times), sizes


def served_throughput(base: str, images: list[str], clients: int, requests: int) -> float:
    """Requests per second of budget-1.0 requests from ``clients`` clients that keep the queue full (each
    sends its next request as soon as its answer comes): the server's throughput when batches are full."""
    from concurrent.futures import ThreadPoolExecutor

    def client(index: int) -> None:
        with httpx.Client(timeout=120) as http:
            for number in range(index, requests, clients):
                http.post(f"{base}/v1/chat/completions", json=_body(images, number, budget=1.0)).raise_for_status()

    begin = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return requests / (time.perf_counter() - begin)


def served_single_ms(base: str, images: list[str], rounds: int) -> float:
    """Median end-to-end time of one budget-1.0 request at a time (a batch of one, nothing queued)."""
    times = []
    with httpx.Client(timeout=120) as http:
        for _ in range(rounds):
            begin = time.perf_counter()
            http.post(f"{base}/v1/chat/completions", json=_body(images, 0, budget=1.0)).raise_for_status()
            times.append(1000 * (time.perf_counter() - begin))
    return statistics.median(times)


def after_idle_ms(fn: Callable[[], object], idle_s: float, rounds: int) -> float:
    """Median ms of ``fn`` called after ``idle_s`` of sleep each time, as a server's worker runs a lone request
    after waiting for it (on this project's VMs a call after an idle pause of even 5 ms ran about 2x slower
    than back to back; busy-waiting instead of sleeping kept it fast)."""
    times = []
    for _ in range(rounds):
        time.sleep(idle_s)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def engine_checks(args: argparse.Namespace, images: list[str], batch_size: int, rounds: int, idle_s: float = 0.0) -> dict[str, float]:
    """In this process, on the same model: ``generate`` at budget 1.0 on the batch the server would build
    (back to back, and after ``idle_s`` of idling, as the worker between lone requests), and a mixed-budget
    batch against the same requests grouped by budget (medians of interleaved rounds)."""
    from unittest import mock

    import torch

    from adaptive_mllm.benchmark import interleaved_medians
    from adaptive_mllm.serving.api import collate
    from adaptive_mllm.serving.requests import RequestLimits, parse_chat_request
    from adaptive_mllm.serving.server import build_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = build_model(args.config, args.ckpt_path, None, args.overrides).eval()
    processor = model.backbone.input_processor()
    requests = [parse_chat_request(_body(images, n), processor, model.max_new_tokens, RequestLimits()) for n in range(batch_size)]
    dtype = next(model.backbone.parameters()).dtype
    batch = collate(requests, processor.pad_token_id, torch.device("cpu"), dtype)
    single = collate(requests[:1], processor.pad_token_id, torch.device("cpu"), dtype)
    levels = [1.0, 0.85, 0.7, 0.55]
    assigned = [levels[n % len(levels)] for n in range(batch_size)]  # Python floats: float32 0.85 != 0.85
    budgets = torch.tensor(assigned)
    groups = {}
    for level in levels:
        members = [r for r, b in zip(requests, assigned, strict=True) if b == level]
        if members:
            groups[level] = collate(members, processor.pad_token_id, torch.device("cpu"), dtype)
    assert sum(len(group["prompt_ids"]) for group in groups.values()) == batch_size  # every request in one group
    with torch.no_grad():
        # the answers the server gave (the same requests at budget 1.0, stopping where they stop)
        seconds = interleaved_medians(
            {"single": lambda: model.generate(single, 1.0), "full": lambda: model.generate(batch, 1.0)}, rounds, torch.device("cpu")
        )
        seconds["single_after_idle"] = after_idle_ms(lambda: model.generate(single, 1.0), idle_s, 3 * rounds) / 1000
        # every call decodes max_new_tokens: with random weights the answers' lengths differ between budgets,
        # and the calls compared here must do the same work
        with mock.patch.object(type(model.backbone.chat_template), "stop_token_ids", lambda self, tokenizer: []):
            seconds |= interleaved_medians(
                {
                    "mixed": lambda: model.generate(batch, budgets),
                    "grouped": lambda: [model.generate(group, level) for level, group in groups.items()],
                },
                rounds,
                torch.device("cpu"),
            )
    return {key: 1000 * value for key, value in seconds.items()}


def summarise(name: str, phase: str, result: dict, deadline_ms: float) -> dict:
    ok = [r for r in result["records"] if r["status"] == 200]
    latencies = sorted(r["latency_ms"] for r in ok)

    def pct(q: float) -> float:
        return float(np.percentile(latencies, q)) if latencies else float("nan")

    budgets = [r["budget"] for r in ok if r["budget"] is not None]
    span = result.get("hog_span")  # requests sent while the hog ran (errors count as misses)
    during = [r for r in result["records"] if span is not None and span[0] <= r["t"] < span[1]]
    return {
        "server": name, "phase": phase, "requests": len(result["records"]), "errors": len(result["records"]) - len(ok),
        "throughput_rps": len(ok) / result["seconds"], "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
        "deadline_hit": sum(lat <= deadline_ms for lat in latencies) / max(len(result["records"]), 1),
        "mean_budget": statistics.mean(budgets) if budgets else float("nan"),
        "hit_during_hog": (sum(r["status"] == 200 and r["latency_ms"] <= deadline_ms for r in during) / len(during)
                           if during else float("nan")),
    }  # fmt: skip


def plot(results: dict, deadline_ms: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({name for name, _ in results})
    phases = ["light", "heavy", "hog"]
    figure, axes = plt.subplots(len(names), len(phases), figsize=(5 * len(phases), 3.5 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        for column, phase in enumerate(phases):
            axis = axes[row][column]
            result = results[(name, phase)]
            ok = [r for r in result["records"] if r["status"] == 200]
            axis.scatter([r["t"] for r in ok], [r["latency_ms"] for r in ok], s=8, label="latency")
            axis.axhline(deadline_ms, color="red", linestyle="--", label="deadline")
            if result["hog_span"]:
                axis.axvspan(*result["hog_span"], color="grey", alpha=0.2, label="CPU hog")
            axis.set_title(f"{name}, {phase}")
            axis.set_xlabel("time in phase (s)")
            axis.set_ylabel("latency (ms)")
            twin = axis.twinx()
            twin.plot([r["t"] for r in ok], [r["budget"] for r in ok], color="green", marker=".", linewidth=0.8, label="budget")
            twin.set_ylim(0, 1.05)
            twin.set_ylabel("budget")
            if row == 0 and column == 0:
                axis.legend(loc="upper left", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "recipes" / "tiny.yaml"))
    parser.add_argument("--ckpt_path", help="trained weights (default: random weights; timing does not depend on them)")
    parser.add_argument("--profile", help="latency profile (default: measured into <out>/profile.json)")
    parser.add_argument("--out", default="runs/load_test")
    parser.add_argument("--requests", type=int, default=60, help="at most this many requests per phase")
    parser.add_argument("--phase_seconds", type=float, default=60, help="at most this long per phase")
    parser.add_argument("--heavy_clients", type=int, default=8)
    parser.add_argument("--deadline_ms", type=float, help="default: --deadline_factor x the measured full-budget time")
    parser.add_argument("--deadline_factor", type=float, default=1.5)
    parser.add_argument("--server_cpus", type=int, nargs="+", default=[0],
                        help="cores the server runs on (and the hog busies); the clients and checks get the others")
    parser.add_argument("--max_batch_size", type=int, default=8)
    parser.add_argument("--batch_timeout", type=float, default=0.0)
    parser.add_argument("--threads", type=int, help="torch threads of the servers, the profile and the checks")
    parser.add_argument("--check_rounds", type=int, default=7, help="rounds of the overhead / mixed-batch checks (0: skip)")
    parser.add_argument("--checks_only", action="store_true",
                        help="only the overhead / mixed-batch checks (no profile, no adaptive server, no phases)")
    args, overrides = parser.parse_known_args(argv)
    if args.checks_only and not args.check_rounds:
        parser.error("--checks_only needs --check_rounds > 0")
    args.overrides = overrides  # recipe flags for every model build
    args.server_cpus = set(args.server_cpus)
    others = set(os.sched_getaffinity(0)) - args.server_cpus
    if others:
        os.sched_setaffinity(0, others)  # the clients (this process) stay off the server's cores
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    profile = None if args.checks_only else Path(args.profile) if args.profile else out / "profile.json"
    if profile is not None and not profile.is_file():
        from adaptive_mllm.serving import profile as measure_profile

        command = ["--config", args.config, "--out", str(profile)] + (["--ckpt_path", args.ckpt_path] if args.ckpt_path else [])
        threads = ["--threads", str(args.threads)] if args.threads is not None else []
        measure_profile(command + threads + args.overrides)
    deadline_ms = args.deadline_ms
    images = _images(16)
    results: dict[tuple[str, str], dict] = {}
    rows = []
    servers = [("pinned 1.0", True)] if args.checks_only else [("adaptive", False), ("pinned 1.0", True)]
    for name, pinned in servers:
        process, base = start_server(args, profile, pinned, out / f"server-{name.split()[0]}.log")
        try:
            full_ms = warm_up(base, images, args.max_batch_size)
            if deadline_ms is None:  # what budget 1.0 takes end to end on the quiet machine, with some room
                deadline_ms = args.deadline_factor * full_ms
            phases = [] if args.checks_only else [("light", 1, False), ("heavy", args.heavy_clients, False), ("hog", 1, True)]
            for phase, clients, hog in phases:
                results[(name, phase)] = run_phase(base, clients, args, deadline_ms, images, hog)
                rows.append(summarise(name, phase, results[(name, phase)], deadline_ms))
                print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
            if pinned and args.check_rounds:
                served_ms, sizes = served_batch_ms(base, images, args.max_batch_size, args.check_rounds)
                served_one_ms = served_single_ms(base, images, args.check_rounds)
                served_rps = served_throughput(base, images, 2 * args.max_batch_size, 4 * args.max_batch_size * args.check_rounds)
        finally:
            stop(process)
    checks = []
    if args.check_rounds:
        process, base = start_echo_server(args, out / "server-echo.log")
        try:
            warm_up(base, images, args.max_batch_size)
            echo_one_ms = served_single_ms(base, images, args.check_rounds)
            echo_rps = served_throughput(base, images, 2 * args.max_batch_size, 4 * args.max_batch_size * args.check_rounds)
        finally:
            stop(process)
        engine = engine_checks(args, images, args.max_batch_size, args.check_rounds, idle_s=echo_one_ms / 1000)
        checks = [
            f"serving overhead at budget 1.0, one request at a time: {served_one_ms:.1f} ms end to end vs "
            f"{engine['single']:.1f} ms for module.generate on it back to back ({100 * (served_one_ms / engine['single'] - 1):+.1f}%) "
            f"and {engine['single_after_idle']:.1f} ms after idling {echo_one_ms:.1f} ms before each call, as the worker "
            f"does between lone requests ({100 * (served_one_ms / engine['single_after_idle'] - 1):+.1f}%); "
            f"LitServe's floor (the same request to an echo API, no model): {echo_one_ms:.1f} ms "
            f"(= {100 * echo_one_ms / engine['single']:.1f}% of module.generate back to back)",
            f"serving overhead at budget 1.0, batch {args.max_batch_size} (server batched them as {sorted(set(sizes))}): "
            f"{served_ms:.1f} ms end to end vs {engine['full']:.1f} ms for module.generate on the same batch "
            f"({100 * (served_ms / engine['full'] - 1):+.1f}%)",
            f"serving overhead at budget 1.0 under full load ({2 * args.max_batch_size} clients): {served_rps:.1f} requests/s "
            f"vs {1000 * args.max_batch_size / engine['full']:.1f} for module.generate on batches of {args.max_batch_size} "
            f"({100 * (1000 * args.max_batch_size / engine['full'] / served_rps - 1):+.1f}% time per request); "
            f"the echo API under the same load: {echo_rps:.1f} requests/s ({1000 / echo_rps:.2f} ms per request "
            f"= {100 * (1000 / echo_rps) / (engine['full'] / args.max_batch_size):.1f}% of module.generate's)",
            f"mixed budgets 1.0 / 0.85 / 0.7 / 0.55 in one batch of {args.max_batch_size}: {engine['mixed']:.1f} ms vs "
            f"{engine['grouped']:.1f} ms grouped by budget: {engine['grouped'] / engine['mixed']:.2f}x the grouped throughput",
        ]
    if args.checks_only:
        print("\n".join(f"- {line}" for line in checks))
        (out / "summary.md").write_text("\n".join(f"- {line}" for line in checks) + "\n")
        return []
    header = ["server", "phase", "requests", "errors", "throughput (req/s)", "p50 ms", "p95 ms", "p99 ms", "deadline hit",
              "hit while the hog ran", "mean budget"]  # fmt: skip
    lines = [f"deadline {deadline_ms:.1f} ms", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        during_hog = "" if math.isnan(r["hit_during_hog"]) else f"{100 * r['hit_during_hog']:.1f}%"
        lines.append(f"| {r['server']} | {r['phase']} | {r['requests']} | {r['errors']} | {r['throughput_rps']:.2f} | "
                     f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {100 * r['deadline_hit']:.1f}% | "
                     f"{during_hog} | {r['mean_budget']:.2f} |")  # fmt: skip
    table = "\n".join(lines + [""] + [f"- {line}" for line in checks])
    print(table)
    (out / "summary.md").write_text(table + "\n")
    with open(out / "requests.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["server", "phase", "t", "latency_ms", "status", "budget", "batch_size", "correction"])
        writer.writeheader()
        for (name, phase), result in results.items():
            for record in result["records"]:
                writer.writerow({"server": name, "phase": phase, **record})
    plot(results, deadline_ms, out / "latency.png")
    print(f"wrote {out / 'summary.md'}, {out / 'requests.csv'}, {out / 'latency.png'}")
    return rows


if __name__ == "__main__":
    main()
