"""`adaptive-mllm ask`: one question about one image, answered at each budget (or deadline) asked for.

    adaptive-mllm ask --config recipes/tiny.yaml --ckpt_path runs/tiny/checkpoints/last.ckpt \\
        --image data/shapes-vqa/images/test/shapes-test-000000.png --question "What colour is the circle?" --budgets 1.0 0.55 0.3
    adaptive-mllm ask ... --profile profiles/tiny-cpu.json --deadline_ms 40 20 10

The quickest look at a trained model (as LLaVA's ``run_llava.py`` or ``litgpt generate``): the model is built as
``serve`` builds it (an export directory, or a recipe with its checkpoint; LoRA adapters merged), the prompt as a
server request with that question and image would be encoded, and each budget is one greedy ``generate`` call,
timed on its own after a warm-up call at that budget (``--threads`` as given to ``profile`` and ``serve``, so the
times compare with the profile's). A deadline becomes a budget as ``serve`` turns one into a
budget for a lone request: the largest the latency profile predicts to finish in time, with the same margin. A
budget below the smallest the scheduler admits for this prompt runs at that smallest one, and the line says so.
One line per budget: the budget that ran, the units and FLOPs fraction of its plan, the time and the answer
(and for a deadline, the predicted time and whether the measured one met it); ``--json`` prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from adaptive_mllm.serving.api import budget_that_ran, collate, smallest_budget
from adaptive_mllm.serving.latency import LatencyModel
from adaptive_mllm.serving.requests import (
    ChatRequest,
    RequestError,
    RequestLimits,
    parse_chat_request,
    read_request_image,
    tokens_left,
)
from adaptive_mllm.serving.server import (
    build_model,
    check_device,
    check_margin,
    check_model_files,
    check_profile,
    check_threads,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adaptive-mllm ask", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="the recipe (with --ckpt_path: the one the checkpoint was trained with)")
    p.add_argument("--ckpt_path", help="Lightning checkpoint; without it and --export_dir, random weights")
    p.add_argument("--export_dir", help="a directory written by `adaptive-mllm export` (instead of --config)")
    p.add_argument("--image", required=True, help="the image file")
    p.add_argument("--question", required=True, help="the question; the image goes before it, as in LLaVA's data")
    p.add_argument("--budgets", type=float, nargs="+", help="compute budgets in [0, 1], one answer each (default: 1.0)")
    p.add_argument("--deadline_ms", type=float, nargs="+", default=[], help="deadlines, one answer each (needs --profile)")
    p.add_argument("--profile", help="latency profile JSON (`adaptive-mllm profile` on this machine) for --deadline_ms")
    p.add_argument("--margin", type=float, default=0.2, help="safety margin of deadline -> budget, as serve's")
    p.add_argument("--max_new_tokens", type=int, help="the answer's most tokens (default: the model's max_new_tokens)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, help="torch threads, as the server will use (default: one per core)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    return p


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace, overrides: list[str]) -> None:
    if not args.question.strip():  # e.g. an unset shell variable: the model would answer the image alone, unasked
        p.error("--question: empty; ask a question about the image")
    if args.budgets is None:
        args.budgets = [] if args.deadline_ms else [1.0]
    for budget in args.budgets:
        if not 0.0 <= budget <= 1.0:
            p.error(f"--budgets: {budget} is outside [0, 1]")
    for deadline in args.deadline_ms:
        if not deadline > 0:
            p.error(f"--deadline_ms: {deadline} must be > 0")
    if args.deadline_ms and args.profile is None:
        p.error("--deadline_ms needs --profile: a latency profile of this machine (`adaptive-mllm profile`)")
    check_margin(p, args.margin)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        p.error(f"--max_new_tokens {args.max_new_tokens} must be >= 1")
    check_threads(p, args.threads)
    if args.export_dir is not None and overrides:
        p.error(f"--export_dir takes no recipe flags, got {overrides}")
    if args.export_dir is None and args.config is None:
        p.error("give --export_dir, or --config (with --ckpt_path for trained weights)")
    check_device(p, args.device)


def encode_question(model: Any, image: Path, question: str, max_new_tokens: int | None) -> ChatRequest:
    """The prompt a server request with this question and image gets, with the same checks (a readable image of a
    sane size, a prompt that fits the model); the image may be any file, its own folder is the one allowed."""
    if image.is_dir():
        raise SystemExit(f"--image {image} is a directory; name an image file")
    if not image.is_file():
        raise SystemExit(f"--image {image}: no such file")
    if "<image>" in question:
        raise SystemExit("--question: leave <image> out; the image goes before the question, as in LLaVA's data")
    image = image.resolve()  # the file given, wherever a link leads: its folder is the one allowed
    # "./": a path whatever the name (a name starting "data:" would be read as a data URL)
    url = f"./{image.name}"
    body: dict[str, Any] = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]}]}
    if max_new_tokens is not None:
        body["max_tokens"] = max_new_tokens
    limits = RequestLimits(str(image.parent))
    processor = model.backbone.input_processor()
    latency_token = model.planner.uses_latency_token
    pixels = read_request_image(body, processor, limits)  # read once: a second parse below reuses it
    try:
        return parse_chat_request(body, processor, model.max_new_tokens, limits, pixels, latency_token)
    except RequestError as error:
        if "image" in error.field:  # the server's path in the message is the option's file here
            message = error.message.removeprefix(f"{url}: ").replace(repr(url), repr(str(image))).replace(url, str(image))
            raise SystemExit(f"--image {image}: {message}") from None
        if error.field == "messages" and max_new_tokens is not None:
            _answer_too_long(body, processor, model.max_new_tokens, limits, pixels, latency_token, max_new_tokens)
        option = "--max_new_tokens" if error.field == "max_tokens" else "--question"
        raise SystemExit(f"{option}: {error.message}") from None


def _answer_too_long(
    body: dict[str, Any], processor: Any, cap: int, limits: RequestLimits, pixels: Any, latency_token: bool, max_new_tokens: int
) -> None:
    """SystemExit naming --max_new_tokens when the prompt fits the model with a one-token answer, so that the answer's
    length is what makes it too long (else the caller names --question)."""
    try:
        prompt = parse_chat_request({**body, "max_tokens": 1}, processor, cap, limits, pixels, latency_token)
    except RequestError:
        return  # too long even so: the question is
    room = tokens_left(len(prompt.prompt_ids), processor.max_length, latency_token)
    raise SystemExit(
        f"--max_new_tokens {max_new_tokens}: the prompt is {len(prompt.prompt_ids)} tokens; with {max_new_tokens} "
        f"answer tokens it exceeds the model's maximum length {processor.max_length} (at most {room} fit)"
    )


def answer(model: Any, request: ChatRequest, budget: float, device: torch.device) -> dict[str, Any]:
    """One greedy answer at ``budget`` (raised to the prompt's smallest admissible one), timed alone."""
    dtype = next(model.backbone.parameters()).dtype
    batch = collate([request], model.backbone.input_processor().pad_token_id, device, dtype)
    limits = [request.max_tokens or model.max_new_tokens]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(batch, torch.tensor([budget], device=device), limits, at_least_minimum=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {
        "budget": budget_that_ran(budget, out["budgets"][0]),
        "requested_budget": budget,
        "units": out["units_per_example"][0],
        "flops_fraction": out["flops_fractions"][0],
        "ms": 1000 * (time.perf_counter() - start),
        "answer": out["answers"][0],
    }


def deadline_budgets(model: Any, request: ChatRequest, deadlines: list[float], latency: LatencyModel) -> list[dict[str, Any]]:
    """Each deadline's budget for this request alone, as ``serve`` picks it: the largest predicted to finish in time
    at the answer's full length, within what the scheduler admits for the prompt."""
    prompt_tokens = len(request.prompt_ids) + int(model.planner.uses_latency_token)
    new_tokens = request.max_tokens or model.max_new_tokens
    minimum = smallest_budget(model, request.prompt_ids)
    choices = []
    for deadline in deadlines:
        choice = latency.budget_for_deadline(deadline, prompt_tokens, new_tokens, 1, minimum)
        choices.append({"deadline_ms": deadline, "budget": choice.budget, "predicted_ms": choice.predicted_ms, "feasible": choice.met})
    return choices


def describe(row: dict[str, Any]) -> str:
    """One line of the table."""
    raised = f" (asked {row['requested_budget']:g}: below this prompt's smallest)" if row["budget"] != row["requested_budget"] else ""
    units = "" if math.isnan(row["units"]) else f"  units {row['units']:g}"  # nan: no scheduler, no units
    line = f"budget {row['budget']:.3g}{raised}{units}  FLOPs {row['flops_fraction']:.2f}  {row['ms']:.1f} ms"
    if "deadline_ms" in row:
        verdict = "met" if row["ms"] <= row["deadline_ms"] else "missed"
        flag = "" if row["feasible"] else ", predicted to miss even at the smallest budget"
        line = f"deadline {row['deadline_ms']:g} ms -> {line} ({verdict}; predicted {row['predicted_ms']:.1f} ms{flag})"
    return f"{line}  {row['answer']}"


def main(argv: list[str]) -> list[dict[str, Any]]:
    p = parser()
    args, overrides = p.parse_known_args(argv)
    check_arguments(p, args, overrides)
    check_model_files(args)
    latency = check_profile(args)
    if args.threads is not None:  # as serve's worker and profile set them: times comparable with the profile's
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args.config, args.ckpt_path, args.export_dir, overrides, args.device)
    model.to(device).eval()
    if args.max_new_tokens is not None:  # the answer's length is this command's to set, above the model's too
        model.max_new_tokens = max(model.max_new_tokens, args.max_new_tokens)
    if model.scheduler is None and (args.deadline_ms or any(budget != 1.0 for budget in args.budgets)):
        raise SystemExit("--budgets / --deadline_ms: this model has no scheduler, it always runs whole (budget 1.0)")
    request = encode_question(model, Path(args.image), args.question, args.max_new_tokens)
    deadlines = deadline_budgets(model, request, args.deadline_ms, latency) if latency is not None else []
    budgets = [*args.budgets, *(choice["budget"] for choice in deadlines)]
    for budget in sorted(set(budgets)):  # warm-up calls: a plan's first call also pays one-time setup
        answer(model, request, budget, device)
    rows = [answer(model, request, budget, device) for budget in args.budgets]
    rows += [{**choice, **answer(model, request, choice["budget"], device)} for choice in deadlines]
    for row in rows:
        print(json.dumps(row) if args.json else describe(row))
    return rows
