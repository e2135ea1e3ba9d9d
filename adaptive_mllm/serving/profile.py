"""`adaptive-mllm profile`: measure, on this machine, prefill and per-token decode time against budget,
prompt length and batch size, and write the latency profile (JSON) that the server's LatencyModel fits.

    adaptive-mllm profile --config recipes/tiny.yaml --ckpt_path runs/tiny/checkpoints/last.ckpt \\
        --out profiles/tiny-cpu.json [--device cuda]

Timing follows ``adaptive-mllm benchmark``: a warm-up call of every configuration, then the median of
``--repeats`` rounds, each round timing every point of the grid once, so a slow spell hits all points
alike. "prefill" here is what the server waits for before the first token:
vision tower + projector + LLM prefill.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from adaptive_mllm.benchmark import interleaved_medians, prepare_budget, synthetic_prompt
from adaptive_mllm.decoding import resolve_mode
from adaptive_mllm.inputs import embed_selected
from adaptive_mllm.reporting import refuse_existing_output, unwritable_reason
from adaptive_mllm.serving.latency import MIN_MEASUREMENTS, LatencyModel, Measurement, save_profile
from adaptive_mllm.serving.requests import tokens_left

MAX_FIT_ERROR = 0.5  # a fit error above this on its own grid is warned about
NEGLIGIBLE_TERM = 0.01  # of a stage's fastest measured time: a negative term smaller than this is rounding


def default_prompt_lengths(model: Any, new_tokens: int) -> list[int]:
    """Two lengths: the image plus a short question, and about the longest prompt the model admits."""
    backbone = model.backbone
    shortest = backbone.num_image_tokens + 8
    fits = tokens_left(new_tokens, backbone.max_length, model.planner.uses_latency_token)  # beside the answer
    longest = max(shortest + 1, min(fits, backbone.num_image_tokens + 512))
    return [shortest, longest]


@torch.no_grad()
def measure(
    model: Any, budgets: list[float], prompt_lengths: list[int], batch_sizes: list[int], decode_tokens: int, repeats: int
) -> list[Measurement]:
    """One Measurement per (budget, prompt length, batch size); budgets below a length's admissible
    minimum are measured at that minimum. Every grid point is timed once per round, the whole grid
    round-robin (not one point after the other), so that a busy spell of a shared machine is spread over
    all points and the medians drop it instead of bending the fit. All points' KV caches are held at once."""
    model.eval()
    backbone = model.backbone
    device = next(backbone.parameters()).device
    mode = resolve_mode(getattr(model, "decode", "eager"), device)  # decode as the server will (model.decode)
    encode_fns, prefill_fns, decode_fns, points = {}, {}, {}, []
    for length in prompt_lengths:
        for batch_size in batch_sizes:
            ids, images = synthetic_prompt(model, length, batch_size, device)
            mask = torch.ones_like(ids)
            inputs = embed_selected(backbone, ids, mask, images, model.token_selector)
            seq_len = length + int(model.planner.uses_latency_token)
            minimum = model.scheduler.cost.min_budget(seq_len) if model.scheduler is not None else 1.0
            encode_fns[(length, batch_size)] = lambda ids=ids, mask=mask, images=images: embed_selected(
                backbone, ids, mask, images, model.token_selector
            )
            for budget in sorted({max(budget, minimum) for budget in budgets}, reverse=True):
                row, prefill, decode, mode_decode = prepare_budget(model, inputs, ids, budget, decode_tokens, model.token_selector, mode)
                key = (budget, length, batch_size)
                prefill_fns[key], decode_fns[key] = prefill, decode if mode_decode is None else mode_decode
                points.append((key, seq_len, float(row["flops_fraction"])))
    encode_s = interleaved_medians(encode_fns, repeats, device)
    prefill_s = interleaved_medians(prefill_fns, repeats, device)
    decode_s = interleaved_medians(decode_fns, repeats, device)
    rows = []
    for (budget, length, batch_size), seq_len, flops_fraction in points:
        key = (budget, length, batch_size)
        rows.append(
            Measurement(
                budget=float(budget), flops_fraction=flops_fraction, prompt_tokens=seq_len, batch_size=batch_size,
                prefill_ms=1000 * (encode_s[(length, batch_size)] + prefill_s[key]),
                decode_ms_per_token=1000 * decode_s[key] / decode_tokens,
            )
        )  # fmt: skip
    return rows


def main(argv: list[str]) -> LatencyModel:
    """Measure, write the profile, print the fitted model's error on its own grid."""
    from adaptive_mllm.serving.server import build_model, check_device

    parser = argparse.ArgumentParser(prog="adaptive-mllm profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the recipe (with --ckpt_path: the one the checkpoint was trained with)")
    parser.add_argument("--ckpt_path", help="Lightning checkpoint; without it, random weights (timing does not depend on them)")
    parser.add_argument("--export_dir", help="a directory written by `adaptive-mllm export` (instead of --config)")
    parser.add_argument("--out", required=True, help="profile JSON to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.85, 0.7, 0.55, 0.0], help="0 = the smallest admissible")
    parser.add_argument("--prompt_lengths", type=int, nargs="+", help="default: the image + 8 tokens, and a long prompt")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--decode_tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads, as the server will use (default: one per core)")
    own, overrides = parser.parse_known_args(argv)
    counts = {"--prompt_lengths": own.prompt_lengths or [1], "--batch_sizes": own.batch_sizes,
              "--decode_tokens": [own.decode_tokens], "--repeats": [own.repeats], "--threads": [own.threads or 1]}
    for name, values in counts.items():
        if not values or min(values) < 1:
            parser.error(f"{name} must be >= 1, got {values}")
    check_grid(parser, own)
    check_out(parser, Path(own.out), own.overwrite)
    check_device(parser, own.device)
    if own.threads is not None:
        torch.set_num_threads(own.threads)
    model = build_model(own.config, own.ckpt_path, own.export_dir, overrides, own.device)
    model.to(own.device)
    lengths = own.prompt_lengths or default_prompt_lengths(model, max(model.max_new_tokens, own.decode_tokens))
    check_against_model(parser, model, own.budgets, lengths, own.batch_sizes, own.decode_tokens)
    rows = measure(model, own.budgets, lengths, own.batch_sizes, own.decode_tokens, own.repeats)
    device = torch.device(own.device)
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": str(next(model.backbone.parameters()).dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "grid": {"budgets": own.budgets, "prompt_lengths": lengths, "batch_sizes": own.batch_sizes,
                 "decode_tokens": own.decode_tokens, "repeats": own.repeats},
    }  # fmt: skip
    path = save_profile(own.out, rows, meta)
    latency = LatencyModel.fit(rows, meta=meta)
    print(f"wrote {path}: {len(rows)} measurements on {meta['device']}")
    for row, error in zip(rows, fit_errors(latency, rows), strict=True):
        print(f"budget {row.budget:.3f}  T={row.prompt_tokens:4d}  B={row.batch_size:3d}  prefill {row.prefill_ms:8.2f} ms  "
              f"decode {row.decode_ms_per_token:7.2f} ms/token  fit error (2 tokens) {100 * error:+.1f}%")  # fmt: skip
    for warning in fit_warnings(latency, rows):
        print(f"warning: {warning}", file=sys.stderr)
    return latency


def check_grid(parser: argparse.ArgumentParser, own: argparse.Namespace) -> None:
    """Refuse, before the model loads, budgets outside [0, 1] and a grid too small for the latency model's fit."""
    for budget in own.budgets:
        if not (math.isfinite(budget) and 0.0 <= budget <= 1.0):
            parser.error(f"--budgets: {budget} is outside [0, 1]")
    lengths = len(set(own.prompt_lengths)) if own.prompt_lengths else 2  # the default: two lengths
    points = len(set(own.budgets)) * lengths * len(set(own.batch_sizes))
    if points < MIN_MEASUREMENTS:
        parser.error(
            f"the grid has {points} points ({len(set(own.budgets))} --budgets x {lengths} --prompt_lengths x "
            f"{len(set(own.batch_sizes))} --batch_sizes); the latency model needs at least {MIN_MEASUREMENTS} to fit"
        )


def check_out(parser: argparse.ArgumentParser, out: Path, overwrite: bool) -> None:
    """Refuse, before the model loads, an ``--out`` that is a directory, exists (without ``--overwrite``) or cannot
    be created: found only once the grid was measured, these lost the whole measurement."""
    refuse_existing_output(parser, out, overwrite)
    problem = unwritable_reason(out.absolute().parent)  # save_profile makes the folders missing
    if problem is not None:
        parser.error(f"--out {out}: {problem}")


def check_against_model(
    parser: argparse.ArgumentParser, model: Any, budgets: list[float], lengths: list[int], batch_sizes: list[int], decode_tokens: int
) -> None:
    """Refuse, before anything is measured, prompt lengths the model cannot take (the image placeholders alone, or
    with the latency token and ``--decode_tokens`` over its maximum length), and a grid whose budgets, raised to each
    length's smallest admissible, leave too few distinct points to fit."""
    backbone = model.backbone
    latency_token = int(model.planner.uses_latency_token)
    points = 0
    for length in sorted(set(lengths)):
        if length <= backbone.num_image_tokens:
            parser.error(f"--prompt_lengths {length} must exceed the model's {backbone.num_image_tokens} image placeholders")
        if decode_tokens > tokens_left(length, backbone.max_length, bool(latency_token)):
            total = length + latency_token + decode_tokens
            parser.error(
                f"--prompt_lengths {length}: with --decode_tokens {decode_tokens}"
                + (" and the latency token" if latency_token else "")
                + f" it is {total} tokens, more than the model's maximum length {backbone.max_length}"
            )
        minimum = model.scheduler.cost.min_budget(length + latency_token) if model.scheduler is not None else 1.0
        points += len({max(budget, minimum) for budget in budgets}) * len(set(batch_sizes))
    if points < MIN_MEASUREMENTS:
        parser.error(
            f"the grid has {points} distinct points once --budgets below a length's smallest admissible budget are "
            f"raised to it; the latency model needs at least {MIN_MEASUREMENTS} to fit"
        )


def fit_errors(latency: LatencyModel, rows: list[Measurement]) -> list[float]:
    """Each grid point's relative error of the fit (predicted / measured - 1), for a 2-token answer."""
    return [
        latency.predict_ms(row.budget, row.prompt_tokens, 2, row.batch_size) / (row.prefill_ms + row.decode_ms_per_token) - 1
        for row in rows
    ]


def fit_warnings(latency: LatencyModel, rows: list[Measurement]) -> list[str]:
    """What makes a fit unfit to serve with, said rather than written silently: a negative per-unit coefficient
    predicts larger batches, longer prompts or larger budgets faster (a deadline then picks a larger budget in a
    larger batch), and large errors mean the measurements were noise (a busy machine). A negative coefficient
    whose term moves no grid point by 1% of its stage's fastest time is rounding, not said."""
    prefill_floor = NEGLIGIBLE_TERM * min(row.prefill_ms for row in rows)
    decode_floor = NEGLIGIBLE_TERM * min(row.decode_ms_per_token for row in rows)
    largest = {  # each term's largest value on the grid
        "B*T": max(row.batch_size * row.prompt_tokens for row in rows),
        "b*B*T": max(row.budget * row.batch_size * row.prompt_tokens for row in rows),
        "B": max(row.batch_size for row in rows),
        "b*B": max(row.budget * row.batch_size for row in rows),
        "b": max(row.budget for row in rows),
    }
    terms = {  # name: (coefficient, its term's largest value, what is negligible)
        "p1 (prefill per B*T)": (latency.prefill[1], largest["B*T"], prefill_floor),
        "p2 (prefill per b*B*T)": (latency.prefill[2], largest["b*B*T"], prefill_floor),
        "p3 (prefill per b)": (latency.prefill[3], largest["b"], prefill_floor),
        "d1 (decode per B)": (latency.decode[1], largest["B"], decode_floor),
        "d2 (decode per b*B)": (latency.decode[2], largest["b*B"], decode_floor),
        "d3 (decode per b)": (latency.decode[3], largest["b"], decode_floor),
    }
    advice = "measure again on a quiet machine, with more --repeats"
    warnings = [f"the fitted {name} is {value:.4g} < 0: it predicts more work to run faster; {advice}"
                for name, (value, term, negligible) in terms.items() if value * term < -negligible]  # fmt: skip
    worst = max(fit_errors(latency, rows), key=abs)
    if abs(worst) > MAX_FIT_ERROR:
        warnings.append(f"the worst fit error is {100 * worst:+.1f}% (over {100 * MAX_FIT_ERROR:.0f}%): the "
                        f"measurements are too noisy to predict deadlines with; {advice}")  # fmt: skip
    return warnings
