"""`adaptive-mllm benchmark`: measured prefill and decode time against budget, beside the plan's
analytic FLOPs fraction, and the full-budget time beside plain transformers with the same weights.

Every figure is a ratio measured inside one run (machines are noisy): the median of ``repeats`` rounds,\neach round timing every configuration once, so that a slow spell hits all of them alike.
With a token selector in the model, every budget is measured twice in the same run, with the selector
and without it, and every ratio is taken to the plain full model (no selector, budget 1.0, always timed).
"prefill" is the LLM's prefill on the projected image features; the vision tower, the selector's
before-LLM work and the projector are timed apart ("encode").

Decoding is timed twice in the same rounds: with the eager, growing cache ("decode ms/token") and with the
``--decode`` mode (default: the recipe's ``model.decode``, ``auto``: a static cache; ``captured`` adds per-layer CUDA graphs on a GPU; see
:mod:`adaptive_mllm.decoding`). "weights fraction" is the bytes of weights one decode step reads under the
plan (each kept layer's, or its kept slices, the final norm and the LM head; the embedding's few rows are
left out) over the full model's; on a GPU, "vs limit" divides the decode time by those bytes over the
device's memory bandwidth (:data:`BANDWIDTH_GBS`, or ``--bandwidth_gbs``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import torch
from PIL import Image

from adaptive_mllm.decoding import DecodeSteps, resolve_mode
from adaptive_mllm.engine import PlanCache
from adaptive_mllm.inputs import SelectedInputs, embed_multimodal, embed_selected
from adaptive_mllm.layers import adapter_for
from adaptive_mllm.module import AdaptiveMLLM
from adaptive_mllm.planning import Planner
from adaptive_mllm.recipe import build_model
from adaptive_mllm.reporting import format_table
from adaptive_mllm.serving.requests import tokens_left
from adaptive_mllm.token_selection.base import TokenSelector


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def interleaved_medians(fns: dict[Any, Any], repeats: int, device: torch.device) -> dict[Any, float]:
    """Median seconds of each function, timed round-robin (one call of each per round), so that a slow
    spell of a shared machine hits every configuration alike instead of the one measured at that moment."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[Any, list[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = _now(device)
            fn()
            times[key].append(_now(device) - start)
    return {key: statistics.median(values) for key, values in times.items()}


# Peak memory bandwidth in GB/s by device name (the vendors' data sheets); the first match counts, so the
# more specific names come first. Anything else: pass --bandwidth_gbs.
BANDWIDTH_GBS = {
    "H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0, "A100 80GB PCIe": 1935.0,
    "A100": 1555.0, "L40S": 864.0, "A10G": 600.0, "L4": 300.0, "RTX 4090": 1008.0,
}  # fmt: skip


def device_bandwidth(device: torch.device, given: float | None = None) -> float | None:
    """GB/s of ``device``: ``given`` when set, else the table's entry for a known GPU; None on the CPU or unknown."""
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in BANDWIDTH_GBS.items() if key in name), None)


def decode_weight_bytes(backbone: Any, cache: PlanCache) -> int:
    """Bytes of weights one decode step reads under the cache's plan: per kept layer each row group's weights
    (the layer's own, or the sliced copies a head-level plan made), the final norm and the LM head."""

    def size(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    total = size(backbone.final_norm.parameters()) + size(backbone.lm_head.parameters())
    for layer, groups in zip(backbone.decoder_layers, cache.groups, strict=True):
        for group in groups:
            sliced = group.weights
            if sliced is None:
                total += size(layer.parameters())
                continue
            total += size([sliced.q, sliced.q_bias, sliced.k, sliced.k_bias, sliced.v, sliced.v_bias, sliced.o])
            if sliced.mlp_in is None:
                total += size(adapter_for(layer).mlp_output(layer).parameters())
                total += size(p for linear in adapter_for(layer).mlp_inputs(layer) for p in linear.parameters())
            else:
                total += size([t for pair in sliced.mlp_in for t in pair] + [sliced.mlp_out])
    return total


def synthetic_prompt(model: AdaptiveMLLM, prompt_length: int, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt of ``prompt_length`` tokens: one image's placeholders, then random text ids."""
    backbone = model.backbone
    placeholders = backbone.num_image_tokens
    if prompt_length <= placeholders:
        raise ValueError(f"--prompt_length {prompt_length} must exceed the {placeholders} image placeholders")
    generator = torch.Generator().manual_seed(0)
    vocab = backbone.shape.vocab_size
    text = torch.randint(0, vocab, (batch_size, prompt_length - placeholders), generator=generator)
    text[text == backbone.image_token_id] = 0
    ids = torch.cat([torch.full((batch_size, placeholders), backbone.image_token_id), text], dim=1)
    # a random image through the backbone's own preprocessing, so any backbone gets its input size
    pixels = torch.randint(0, 256, (64, 64, 3), generator=generator, dtype=torch.uint8).numpy()
    image = backbone.input_processor().preprocess_image(Image.fromarray(pixels))  # [3, H, W]
    images = image[None].expand(batch_size, -1, -1, -1).contiguous()
    return ids.to(device), images.to(device=device, dtype=next(backbone.parameters()).dtype)


def prepare_budget(
    model: AdaptiveMLLM, inputs: SelectedInputs, ids: torch.Tensor, budget: float, decode_tokens: int,
    selector: TokenSelector | None = None, decode_mode: str = "eager",
) -> tuple[dict[str, Any], Any, Any, Any]:
    """The row of one budget (the plan's units and FLOPs fraction, of the full model with the same token
    selection and of the plain full model: no selector, the weight bytes a decode step reads), and its
    prefill and decode functions to time: eager decoding, and ``decode_mode``'s (None when that is eager)."""
    backbone, engine = model.backbone, model.engine
    planner = Planner(backbone, model.scheduler, selector)
    batch_size = ids.shape[0]
    prepared = planner.prepare(inputs, torch.full((batch_size,), float(budget), device=ids.device))
    positions = prepared.position_ids

    def prefill(cache: PlanCache | None = None):
        hidden, plan = engine(
            prepared.embeds, prepared.attention_mask, positions, prepared.plan, prepared.latency_positions, gated=False,
            cache=cache, token_selector=selector, layout=prepared.layout(),
        )  # fmt: skip
        return backbone.lm_head(backbone.final_norm(hidden[:, -1:])), plan

    cache = PlanCache()
    logits, plan = prefill(cache)
    # what the prefill left in the cache, restored before every decoding run (tensors are never modified in place)
    snapshot = [[(group, group.keys, group.values) for group in groups] for groups in cache.groups]
    masks = (cache.length, cache.attention_mask, cache.selected_length, cache.selected_attention_mask)

    def decode():
        for groups in snapshot:
            for group, keys, values in groups:
                group.keys, group.values = keys, values
        cache.length, cache.attention_mask, cache.selected_length, cache.selected_attention_mask = masks
        token = logits[:, -1].argmax(-1)[:, None]
        position = positions[:, -1:] + 1
        for _ in range(decode_tokens):
            hidden, _ = engine(backbone.embed(token), torch.ones_like(token), position, plan, gated=False, cache=cache)
            token = backbone.lm_head(backbone.final_norm(hidden)).argmax(-1)
            position = position + 1

    static_decode = None if decode_mode == "eager" else _static_decode(model, prefill, positions, plan, decode_tokens, decode_mode)
    sizes = prepared.inputs
    full, flops = planner.full_flops(sizes), planner.flops(plan, sizes)
    units = float(plan.units.float().mean()) if plan is not None and plan.units is not None else float("nan")
    prompt_lengths = ids.shape[1] + sizes.seq_lens - inputs.attention_mask.sum(-1)  # no selector
    plain = torch.tensor([planner.cost.full_flops(int(n)) for n in prompt_lengths], dtype=torch.float64)
    row = {
        "budget": budget, "selector": "none" if selector is None else type(selector).__name__, "units": units,
        "flops_fraction": float((flops / full).mean()), "flops_vs_plain": float((flops / plain).mean()),
        "weight_bytes": decode_weight_bytes(backbone, cache),
    }  # fmt: skip
    return row, prefill, decode, static_decode


def _static_decode(model: AdaptiveMLLM, prefill: Any, positions: torch.Tensor, plan: Any, decode_tokens: int, mode: str) -> Any:
    """``decode_tokens`` steps of ``mode`` after the same prefill, into a static cache of its own sized for
    them; each run rewinds it to the prefill. The first run (the warm-up) captures the steps."""
    backbone = model.backbone
    cache = PlanCache()
    logits, _ = prefill(cache)
    steps = DecodeSteps(model.engine, cache, mode, cache.length + decode_tokens, positions.device, plan)

    def decode():
        steps.rewind()
        token = logits[:, -1].argmax(-1)[:, None]
        position = positions[:, -1:] + 1
        for _ in range(decode_tokens):
            token = backbone.lm_head(backbone.final_norm(steps(backbone.embed(token), position))).argmax(-1)
            position = position + 1

    return decode


@torch.no_grad()
def run_benchmark(
    model: AdaptiveMLLM,
    budgets: list[float],
    prompt_length: int,
    batch_size: int = 1,
    decode_tokens: int = 16,
    repeats: int = 5,
    compare_transformers: bool = True,
    decode_mode: str = "auto",
    bandwidth_gbs: float | None = None,
) -> list[dict[str, Any]]:
    model.eval()
    device = next(model.backbone.parameters()).device
    decode_mode = resolve_mode(decode_mode, device)
    backbone = model.backbone
    ids, images = synthetic_prompt(model, prompt_length, batch_size, device)
    mask = torch.ones_like(ids)
    embeds = embed_multimodal(backbone, ids, images)
    if model.scheduler is not None:  # every budget checked before minutes of timing, not after
        seq_len = torch.full((len(budgets),), prompt_length + int(model.planner.uses_latency_token))
        model.scheduler.check_budgets(torch.tensor(budgets, dtype=torch.float32), seq_len)
    # the model's token selector, and none, in the same run
    selectors = [model.token_selector] + ([None] if model.token_selector is not None else [])
    rows, encode_fns, prefill_fns, decode_fns = [], {}, {}, {}
    for selector in selectors:
        inputs = embed_selected(backbone, ids, mask, images, selector)
        encode_fns[id(selector)] = lambda selector=selector: embed_selected(backbone, ids, mask, images, selector)
        for budget in budgets:
            row, prefill, decode, static_decode = prepare_budget(model, inputs, ids, budget, decode_tokens, selector, decode_mode)
            row["llm_tokens"] = float(inputs.attention_mask.sum(-1).float().mean())
            row["_selector"] = id(selector)
            prefill_fns[len(rows)], decode_fns[len(rows)] = prefill, decode
            if static_decode is not None:
                decode_fns[(decode_mode, len(rows))] = static_decode
            rows.append(row)
    if compare_transformers:
        # same input embeddings, same weights: the backbone's own transformers forward, timed in the same rounds
        hf = backbone.model
        prefill_fns["transformers"] = lambda: hf(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1, use_cache=True)
    encode_s = interleaved_medians(encode_fns, repeats, device)
    prefill_s = interleaved_medians(prefill_fns, repeats, device)
    decode_s = interleaved_medians(decode_fns, repeats, device)
    for index, row in enumerate(rows):
        row["encode_s"] = encode_s[row.pop("_selector")]
        row["prefill_s"] = prefill_s[index]
        row["decode_s"] = decode_s[index] / decode_tokens
        _decode_columns(row, decode_s.get((decode_mode, index)), decode_tokens, decode_mode, device_bandwidth(device, bandwidth_gbs))
    # ratios to the plain full model: no selector, the largest budget (1.0: main adds it)
    reference = max((row for row in rows if row["selector"] == "none"), key=lambda row: row["budget"])
    for row in rows:
        row["prefill_ratio"] = row["prefill_s"] / reference["prefill_s"]
        row["decode_ratio"] = row["decode_s"] / reference["decode_s"]
        row["weights_fraction"] = row["weight_bytes"] / reference["weight_bytes"]
        row["mode_decode_ratio"] = row["mode_decode_s"] / reference["mode_decode_s"]
    if compare_transformers:
        hf_s = prefill_s["transformers"]
        rows.append({"budget": "transformers", "prefill_s": hf_s, "ratio": reference["prefill_s"] / hf_s})
    return rows


def _decode_columns(row: dict[str, Any], seconds: float | None, decode_tokens: int, mode: str, bandwidth_gbs: float | None) -> None:
    """The decode mode's columns: its ms per token (the eager one's when the mode is eager), its speed-up
    over eager, and with a known bandwidth the time the kept weights take to read once, and the ratio to it."""
    row["decode_mode"] = mode
    row["mode_decode_s"] = row["decode_s"] if seconds is None else seconds / decode_tokens
    row["decode_speedup"] = row["decode_s"] / row["mode_decode_s"]
    row["bandwidth_gbs"] = bandwidth_gbs
    row["limit_s"] = None if bandwidth_gbs is None else row["weight_bytes"] / (bandwidth_gbs * 1e9)
    row["vs_limit"] = None if bandwidth_gbs is None else row["mode_decode_s"] / row["limit_s"]


def print_rows(rows: list[dict[str, Any]]) -> None:
    header = [
        "selector", "budget", "LLM tokens", "units", "FLOPs fraction", "FLOPs vs plain", "encode ms", "prefill ms",
        "prefill ratio", "decode ms/token", "decode ratio", "weights fraction", f"{rows[0]['decode_mode']} ms/token",
        f"{rows[0]['decode_mode']} ratio", "speed-up", "limit ms", "vs limit",
    ]  # fmt: skip
    table = []
    for row in rows:
        if row["budget"] == "transformers":
            continue
        table.append(
            [
                row["selector"],
                f"{row['budget']:g}",
                f"{row['llm_tokens']:.0f}",
                f"{row['units']:.0f}" if row["units"] == row["units"] else "-",
                f"{row['flops_fraction']:.3f}",
                f"{row['flops_vs_plain']:.3f}",
                f"{1000 * row['encode_s']:.1f}",
                f"{1000 * row['prefill_s']:.1f}",
                f"{row['prefill_ratio']:.3f}",
                f"{1000 * row['decode_s']:.2f}",
                f"{row['decode_ratio']:.3f}",
                f"{row['weights_fraction']:.3f}",
                f"{1000 * row['mode_decode_s']:.2f}",
                f"{row['mode_decode_ratio']:.3f}",
                f"{row['decode_speedup']:.2f}x",
                "-" if row["limit_s"] is None else f"{1000 * row['limit_s']:.2f}",
                "-" if row["vs_limit"] is None else f"{row['vs_limit']:.2f}",
            ]
        )
    title = (
        "prefill / decode time vs budget and token selector (ratios to the plain full model: no selector, largest "
        "budget; FLOPs fraction: of the full model with the same selector)"
    )
    print(title + "\n" + format_table(header, table))  # Markdown: 17 columns are too wide for a terminal table
    first = rows[0]
    limit = "no bandwidth known (CPU or unknown GPU: --bandwidth_gbs)" if first["bandwidth_gbs"] is None else (
        f"limit = weight bytes read per decode step / {first['bandwidth_gbs']:.0f} GB/s"
    )  # fmt: skip
    print(f"decode: eager (growing cache) vs {first['decode_mode']} (speed-up = eager / {first['decode_mode']}); {limit}")
    for row in rows:
        if row["budget"] == "transformers":
            print(
                f"prefill at the largest budget vs transformers LlavaForConditionalGeneration (same weights and "
                f"embeddings): {1000 * row['prefill_s']:.1f} ms for transformers, ratio ours / transformers = {row['ratio']:.3f}"
            )


def check_against_model(parser: argparse.ArgumentParser, model: AdaptiveMLLM, own: argparse.Namespace) -> None:
    """Refuse, before the weights are built and minutes are spent timing, a prompt the model cannot take (no more
    tokens than its image placeholders; with the latency token and ``--decode_tokens``, over its maximum length)
    and budgets its scheduler cannot meet for that prompt. ``model``: the recipe's, on the meta device will do."""
    backbone = model.backbone
    if own.prompt_length <= backbone.num_image_tokens:
        parser.error(f"--prompt_length {own.prompt_length} must exceed the model's {backbone.num_image_tokens} image placeholders")
    seq_len = own.prompt_length + int(model.planner.uses_latency_token)
    if own.decode_tokens > tokens_left(own.prompt_length, backbone.max_length, model.planner.uses_latency_token):
        latency = " + 1 latency token" if seq_len > own.prompt_length else ""
        parser.error(
            f"--prompt_length {own.prompt_length} + --decode_tokens {own.decode_tokens}{latency} is "
            f"{seq_len + own.decode_tokens} tokens, more than the model's maximum length {backbone.max_length}"
        )
    if model.scheduler is not None:
        try:
            model.scheduler.check_budgets(torch.tensor(own.budgets, dtype=torch.float32), torch.full((len(own.budgets),), seq_len))
        except ValueError as error:
            parser.error(f"--budgets: {error}")


def main(argv: list[str]) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="adaptive-mllm benchmark", description=__doc__)
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.7, 0.6, 0.55])
    parser.add_argument("--prompt_length", type=int, default=600, help="prompt tokens, image placeholders included")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--decode_tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no_transformers", action="store_true", help="skip the comparison with plain transformers")
    parser.add_argument(
        "--decode", default=None, choices=["auto", "eager", "static", "captured"],
        help="decode mode timed beside eager (default: the recipe's model.decode; auto = static, on every device)",
    )  # fmt: skip
    parser.add_argument("--bandwidth_gbs", type=float, default=None, help="memory bandwidth for the 'vs limit' column (default: a table of known GPUs)")
    own, rest = parser.parse_known_args(argv)
    for name in ("prompt_length", "batch_size", "decode_tokens", "repeats"):
        if getattr(own, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(own, name)}")
    if not all(0.0 < budget <= 1.0 for budget in own.budgets):
        parser.error(f"--budgets must be in (0, 1], got {own.budgets}")
    if own.bandwidth_gbs is not None and not (math.isfinite(own.bandwidth_gbs) and own.bandwidth_gbs > 0):
        parser.error(f"--bandwidth_gbs {own.bandwidth_gbs} must be a finite number > 0")
    from adaptive_mllm.serving.server import check_device

    check_device(parser, own.device)
    if 1.0 not in own.budgets:  # every ratio is to the full model: it is timed too, not the largest budget asked
        own.budgets = [1.0, *own.budgets]
    check_against_model(parser, build_model(rest, "meta"), own)  # shapes only: no weights made or read
    model = build_model(rest, own.device)
    model.to(own.device)
    rows = run_benchmark(
        model, own.budgets, own.prompt_length, own.batch_size, own.decode_tokens, own.repeats, not own.no_transformers,
        own.decode or model.decode, own.bandwidth_gbs,
    )  # fmt: skip
    print_rows(rows)
    return rows
