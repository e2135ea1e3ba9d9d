"""`adaptive-mllm serve`: the deadline-aware chat endpoint on LitServe.

    adaptive-mllm serve --config recipes/tiny.yaml --ckpt_path runs/tiny/checkpoints/last.ckpt \\
        --profile profiles/tiny-cpu.json --port 8000 --image_dir data/images

Endpoints: ``POST /v1/chat/completions`` (OpenAI style, plus ``budget`` or ``deadline_ms``),
``GET /v1/models`` (the one served model), ``GET /health`` (LitServe's: 200 once the model is loaded and warmed up),
``GET /metrics`` (request counts, deadlines met, the online correction). The server listens on 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from adaptive_mllm.lora import merge_adapters
from adaptive_mllm.serving.api import (
    API_PATH,
    MODELS_PATH,
    PREPARE_THREADS,
    SERVED_MODEL_NAME,
    DeadlineAPI,
    read_metrics,
)
from adaptive_mllm.serving.latency import LatencyModel
from adaptive_mllm.serving.lifecycle import DeadlineServer, ServerProcesses, interrupt
from adaptive_mllm.serving.overhead import ServerTimeMiddleware, ServerTimes
from adaptive_mllm.serving.requests import MAX_ASPECT_RATIO, RequestError, RequestLimits


def build_model(
    config: str | None, ckpt_path: str | None, export_dir: str | None, overrides: list[str], device: str = "cpu"
) -> Any:
    """The AdaptiveMLLM to serve: an exported directory, a recipe + Lightning checkpoint, or a recipe with
    random weights (drawn on ``device``; for load tests and latency profiles). LoRA adapters (``model.lora``) are
    merged into the weights: a served model only answers, at the base model's cost."""
    if export_dir is not None:
        from adaptive_mllm.export import load_exported

        return load_exported(export_dir)
    if config is None:
        raise ValueError("give --export_dir, or --config (with --ckpt_path for trained weights)")
    if ckpt_path is not None:
        from adaptive_mllm.export import module_from_checkpoint

        module = module_from_checkpoint(ckpt_path, config, overrides)[0]
    else:
        from adaptive_mllm.recipe import UNUSED_TRAINER
        from adaptive_mllm.recipe import build_model as build_recipe_model

        module = build_recipe_model(["--config", str(config), *overrides, *UNUSED_TRAINER], device)
    merge_adapters(module.backbone.decoder_layers)
    return module


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adaptive-mllm serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="the recipe (with --ckpt_path: the one the checkpoint was trained with)")
    p.add_argument("--ckpt_path", help="Lightning checkpoint; without it and --export_dir, random weights")
    p.add_argument("--export_dir", help="a directory written by `adaptive-mllm export` (instead of --config)")
    p.add_argument("--profile", help="latency profile JSON (`adaptive-mllm profile`); needed for deadline_ms")
    p.add_argument("--served_model_name", default=SERVED_MODEL_NAME,
                   help="the model id replies carry and GET /v1/models lists (a request's own \"model\" is not checked)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--image_dir", help="the only folder image paths may point into (default: paths refused)")
    p.add_argument("--max_image_bytes", type=int, default=RequestLimits.max_image_bytes)
    p.add_argument("--max_image_pixels", type=int, default=RequestLimits.max_image_pixels,
                   help="largest square an image fits in (its longest side squared: LLaVA pads to that square), "
                        "refused (413) from the header, before decoding; the long side may also be at most "
                        f"{MAX_ASPECT_RATIO}x the short one")
    p.add_argument("--max_text_chars", type=int, default=RequestLimits.max_text_chars,
                   help="most characters of text per request, refused (413) before tokenizing")
    p.add_argument("--lax", action="store_true", help="ignore unknown request fields instead of answering 400")
    p.add_argument("--max_batch_size", type=int, default=8)
    p.add_argument("--batch_timeout", type=float, default=0.0,
                   help="seconds a batch waits to fill (0: no waiting; requests queued while a batch runs form the next)")
    p.add_argument("--margin", type=float, default=0.2, help="safety margin of deadline -> budget")
    p.add_argument("--pinned_budget", type=float, help="answer everything at this budget (a baseline)")
    p.add_argument("--metrics_path",
                   help="where the worker writes its counts (default: a temporary folder, removed when the server stops)")
    p.add_argument("--timeout", type=float, default=60,
                   help="seconds from a request's arrival to its answer: past it the client gets 504 at once (the "
                        "worker drops the request when it collects it; one already in a batch is answered, unsent)")
    p.add_argument("--threads", type=int, help="torch threads in the worker (default: one per core)")
    p.add_argument("--prepare_threads", type=int, default=PREPARE_THREADS,
                   help="threads decoding images ahead while the model runs (0: in the model's loop, one batch at a time)")
    return p


def make_server(args: argparse.Namespace, overrides: list[str]) -> DeadlineServer:
    """The LitServer (not yet running), with ``/v1/models`` and ``/metrics`` added. Without ``--metrics_path`` the
    counts go to a temporary folder made here, named in ``server.own_metrics_dir`` (None with a path given) for
    :func:`remove_own_metrics_dir` to remove when the server stops."""
    own_metrics_dir = None if args.metrics_path else Path(tempfile.mkdtemp(prefix="adaptive-mllm-"))
    try:
        server = _make_server(args, overrides, args.metrics_path or str(own_metrics_dir / "metrics.json"))
    except BaseException:
        if own_metrics_dir is not None:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)
        raise
    server.own_metrics_dir = own_metrics_dir
    return server


def _make_server(args: argparse.Namespace, overrides: list[str], metrics_path: str) -> DeadlineServer:
    limits = RequestLimits(args.image_dir, args.max_image_bytes, args.max_image_pixels, args.max_text_chars, strict=not args.lax)
    builder = partial(build_model, args.config, args.ckpt_path, args.export_dir, overrides, args.device)
    times = ServerTimes()
    processes = ServerProcesses()
    api = DeadlineAPI(
        builder, args.profile, limits, args.margin, metrics_path, args.pinned_budget, args.max_batch_size,
        args.batch_timeout, args.threads, times, args.prepare_threads, args.served_model_name, processes,
    )
    accelerator = "cuda" if args.device.startswith("cuda") else "cpu"
    # a body is at most one base64 image (4/3 of its bytes) plus the text: anything larger is refused (413) unread
    max_payload = args.max_image_bytes * 4 // 3 + 4 * args.max_text_chars + 1024 * 1024  # 4: UTF-8's widest character
    server = DeadlineServer(
        api, accelerator=accelerator, devices=1, workers_per_device=1, timeout=args.timeout, max_payload_size=max_payload,
        processes=processes,
    )
    server.app.add_exception_handler(RequestValidationError, body_not_accepted)
    server.app.add_exception_handler(HTTPException, partial(body_refused, max_payload))
    server.app.add_api_route(MODELS_PATH, partial(served_models, args.served_model_name, int(time.time())), methods=["GET"])
    server.app.add_api_route("/metrics", partial(server_metrics, metrics_path, times), methods=["GET"])
    server.app.add_middleware(PayloadLimitMiddleware, max_size=max_payload)  # inside the timing one: counted in /metrics
    server.app.add_middleware(ServerTimeMiddleware, times=times, path=API_PATH, timeout_s=args.timeout)
    return server


def remove_own_metrics_dir(server: DeadlineServer) -> None:
    """Remove the temporary folder :func:`make_server` made for the worker's counts (never a ``--metrics_path``):
    every start left one in /tmp."""
    folder = getattr(server, "own_metrics_dir", None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def served_models(name: str, created: int) -> dict[str, Any]:
    """OpenAI's model list, with the one model this server answers with."""
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "adaptive-mllm"}]}


def body_not_accepted(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for a body that is not a JSON object, in the error format of every other refusal. FastAPI's
    own handler echoed the whole body back (a base64 image), and failed with a 500 on one that is not UTF-8 (an
    image uploaded as multipart or octet-stream)."""
    problems = []
    for item in error.errors():
        cause = (item.get("ctx") or {}).get("error")
        problems.append(f"{item.get('msg', 'invalid')}" + (f": {cause}" if cause else ""))
    message = "must be a JSON object, sent with Content-Type: application/json"
    if problems:
        message += f" ({'; '.join(dict.fromkeys(problems))})"
    refused = RequestError(422, message, "body")
    return JSONResponse(refused.body(), status_code=refused.status)


# FastAPI's 400 for a body its JSON parser refuses, and LitServe's 413 for one that outgrows the payload limit as it arrives
PARSE_ERROR = "There was an error parsing the body"
PAYLOAD_TOO_LARGE = "Payload too large"
_UNPARSED = {UnicodeDecodeError: "not UTF-8", RecursionError: "nested too deeply",
             ValueError: "an integer of more than 4,300 digits (Python's limit)"}  # fmt: skip


async def body_refused(max_payload: int, request: Request, error: HTTPException) -> Response:
    """FastAPI's and LitServe's refusals of a body (one the JSON parser cannot read: not UTF-8, a huge integer,
    deep nesting; one over the payload limit, sent without a length) in the error format of every other refusal,
    where they were ``{"detail": ...}``; any other HTTPException as FastAPI answers it."""
    if error.status_code == 400 and error.detail == PARSE_ERROR:
        reason = next((text for kind, text in _UNPARSED.items() if isinstance(error.__cause__, kind)), "not parsable")
        refused = RequestError(400, f"must be a JSON object, sent with Content-Type: application/json (JSON {reason})", "body")
    elif error.status_code == 413 and error.detail == PAYLOAD_TOO_LARGE:
        refused = RequestError(413, f"the body is larger than this server's payload limit of {max_payload} bytes", "body")
    else:
        return await http_exception_handler(request, error)
    return JSONResponse(refused.body(), status_code=refused.status)


class PayloadLimitMiddleware:
    """ASGI middleware refusing (413), from its ``Content-Length`` header and before a byte of it is read, a body
    over ``max_size``: LitServe counts the bytes as they arrive, so a client declaring a gigabyte and sending a few
    bytes held its connection until ``--timeout`` and got a 504. A body sent without a length (chunked) is still
    counted by LitServe as it arrives."""

    def __init__(self, app: Any, max_size: int) -> None:
        self.app = app
        self.max_size = max_size

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        length = _content_length(scope) if scope.get("type") == "http" else None
        if length is None or length <= self.max_size:
            await self.app(scope, receive, send)
            return
        message = f"the body is {length} bytes (its Content-Length), more than this server's payload limit of {self.max_size} bytes"
        refused = RequestError(413, message, "body")
        # the connection is left open: uvicorn drops the rest of the body as it comes (closed with the body unread, the
        # connection could be reset under a client that sends it whole before reading its reply, as most do, losing it)
        response = JSONResponse(refused.body(), status_code=refused.status)
        await response(scope, receive, send)


def _content_length(scope: dict) -> int | None:
    """A request's ``Content-Length`` (the HTTP server has checked its form), None without one."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def server_metrics(metrics_path: str, times: ServerTimes) -> dict[str, Any]:
    """The worker's counts and the HTTP server's own: time outside the worker, deadlines met end to end, and
    ``requests`` / ``answered`` / ``rejected`` / ``timed_out`` / ``failed`` / ``disconnected`` by what each client got (these
    replace the worker's, which miss what the HTTP layer refused or timed out)."""
    return {**read_metrics(metrics_path), **times.counts()}


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace, overrides: list[str]) -> None:
    """Refuse at startup what would fail every request later (argparse's own usage error, exit 2)."""
    if args.pinned_budget is not None and not 0.0 <= args.pinned_budget <= 1.0:
        p.error(f"--pinned_budget {args.pinned_budget} must be in [0, 1]")
    check_margin(p, args.margin)
    if args.image_dir is not None and not Path(args.image_dir).is_dir():
        problem = "is not a directory" if Path(args.image_dir).exists() else "does not exist"
        p.error(f"--image_dir {args.image_dir} {problem}")
    check_device(p, args.device)
    if args.max_batch_size < 1:
        p.error(f"--max_batch_size {args.max_batch_size} must be >= 1")
    if args.batch_timeout < 0:
        p.error(f"--batch_timeout {args.batch_timeout} must be >= 0")
    if args.timeout <= 0:
        p.error(f"--timeout {args.timeout} must be > 0")
    check_threads(p, args.threads)
    if args.prepare_threads < 0:
        p.error(f"--prepare_threads {args.prepare_threads} must be >= 0")
    if not args.served_model_name.strip():
        p.error("--served_model_name must not be empty")
    if args.export_dir is not None and overrides:
        p.error(f"--export_dir takes no recipe flags, got {overrides}")
    if args.export_dir is None and args.config is None:
        p.error("give --export_dir, or --config (with --ckpt_path for trained weights)")


def check_margin(p: argparse.ArgumentParser, margin: float) -> None:
    """``--margin`` (the share of a deadline kept free) a finite number >= 0: NaN slipped past ``< 0`` and put every
    deadline at the smallest budget."""
    if not (math.isfinite(margin) and margin >= 0):
        p.error(f"--margin {margin} must be a finite number >= 0")


def check_threads(p: argparse.ArgumentParser, threads: int | None) -> None:
    """``--threads`` (torch's, as the worker, ``profile`` and ``ask`` set them) unset or >= 1."""
    if threads is not None and threads < 1:
        p.error(f"--threads {threads} must be >= 1")


def check_device(p: argparse.ArgumentParser, device: str) -> None:
    """Refuse a ``--device`` torch cannot run on here (a CUDA device on a machine without one) before the model
    loads: it failed deep inside, naming the driver, not the option."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        p.error(f"--device {device}: not a device ({error})")
    if parsed.type != "cuda":
        return
    if not torch.cuda.is_available():
        p.error(f"--device {device}: CUDA is not available on this machine (no usable NVIDIA GPU or driver); use --device cpu")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        p.error(f"--device {device}: this machine has {count} CUDA device(s), numbered from 0")


def check_model_files(args: argparse.Namespace) -> None:
    """Refuse, before the server starts, the model files its worker would fail to load (LitServe shows that as
    the worker's traceback): what is cheap to check, the weights themselves are read by the worker."""
    if args.export_dir is not None:
        from adaptive_mllm.export import check_export_dir

        try:
            check_export_dir(args.export_dir)
        except (OSError, ValueError) as error:  # FileNotFoundError, NotADirectoryError, CheckpointError
            raise SystemExit(f"--export_dir: {error}") from None
        return  # --config and --ckpt_path are not read
    if args.config is not None and not Path(args.config).is_file():
        raise SystemExit(f"--config {args.config} does not exist")
    if args.ckpt_path is not None:
        from adaptive_mllm.checkpoints import CheckpointError, check_checkpoint

        try:
            check_checkpoint(args.ckpt_path, required=("state_dict",))  # what module_from_checkpoint reads
        except CheckpointError as error:
            raise SystemExit(f"--ckpt_path: {error}") from None


def check_profile(args: argparse.Namespace) -> LatencyModel | None:
    """Read the latency profile as the worker will, so a bad one is one line naming it, before the model loads
    (in the worker it was two chained tracebacks and LitServe's "workers failed to start")."""
    if args.profile is None:
        return None
    if not Path(args.profile).is_file():
        raise SystemExit(f"--profile {args.profile} does not exist (write one with `adaptive-mllm profile`)")
    try:
        return LatencyModel.load(args.profile, args.margin)
    except (OSError, ValueError) as error:
        raise SystemExit(f"--profile: {error}") from None


def check_recipe(args: argparse.Namespace, overrides: list[str]) -> None:
    """Parse the recipe with its flags as the worker will (no weights are built or read): a flag neither serve
    nor the recipe knows is argparse's usage error here (exit 2), where in the worker it ended the worker and
    left the server waiting for it forever."""
    if args.export_dir is not None:
        return  # an export takes no recipe flags (check_arguments)
    from adaptive_mllm.recipe import UNUSED_TRAINER, parse_recipe

    parse_recipe(["--config", str(args.config), *overrides, *UNUSED_TRAINER])


def main(argv: list[str]) -> None:
    p = parser()
    args, overrides = p.parse_known_args(argv)
    check_arguments(p, args, overrides)
    check_profile(args)
    check_model_files(args)
    check_recipe(args, overrides)
    server = make_server(args, overrides)
    # SIGTERM (kill, docker stop, a supervisor) shuts down as Ctrl+C does, workers included: LitServe stops them
    # on KeyboardInterrupt only, and the default action left them running, still answering /health. Sent to the
    # whole process group (Ctrl+C is), only this process acts on them: see lifecycle
    signal.signal(signal.SIGTERM, partial(interrupt, os.getpid()))
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where it is ignored (nohup, a `&` job)
        signal.signal(signal.SIGINT, partial(interrupt, os.getpid()))
    try:
        server.run(host=args.host, port=args.port, generate_client_file=False, num_api_servers=1)
    except KeyboardInterrupt:  # a second signal during the orderly shutdown, or one while the model loads
        server.kill_now()
        raise SystemExit(130) from None
    finally:  # the worker has stopped (or was killed): nothing writes the counts any more
        remove_own_metrics_dir(server)
    if server.unexpected_exit is not None:
        raise SystemExit(f"adaptive-mllm serve: {server.unexpected_exit}; the server stopped")


if __name__ == "__main__":
    main(sys.argv[1:])
