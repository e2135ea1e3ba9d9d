"""`adaptive-mllm benchmark`: measured prefill and decode time against budget, beside the plan's
analytic FLOPs fraction, and the full-budget time beside plain transformers with the same weights.

Every figure is a ratio measured inside one run (machines are noisy); the median of ``repeats`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from adaptive_mllm.engine import PlanCache
from adaptive_mllm.inputs import embed_multimodal, insert_token, position_ids_from_mask
from adaptive_mllm.module import AdaptiveMLLM
from adaptive_mllm.reporting import print_table


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = _now(device)
        fn()
        times.append(_now(device) - start)
    return statistics.median(times)


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
    size = backbone.llava_config.vision_config.image_size
    images = torch.randn(batch_size, 3, size, size, generator=generator)
    return ids.to(device), images.to(device)


def _measure_budget(
    model: AdaptiveMLLM, embeds: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor, budget: float,
    batch_size: int, decode_tokens: int, repeats: int, device: torch.device,
) -> dict[str, Any]:
    """Median prefill and per-token decode time under one budget, and the plan's FLOPs fraction."""
    backbone, engine, scheduler = model.backbone, model.engine, model.scheduler
    budgets_t = torch.full((batch_size,), float(budget), device=device)
    run_embeds, run_mask, latency_positions = embeds, mask, None
    seq_lens = mask.sum(-1) + int(model._uses_latency_token())
    if scheduler is not None:
        scheduler.check_budgets(budgets_t, seq_lens)
        if model._uses_latency_token():
            latency_positions = torch.full((batch_size,), ids.shape[1], device=device)
            token = scheduler.latency_token(budgets_t, seq_lens)
            run_embeds, run_mask, _ = insert_token(embeds, token, latency_positions, mask)
    positions = position_ids_from_mask(run_mask)
    request = model._plan_request(budgets_t, seq_lens)

    def prefill(cache: PlanCache | None = None):
        hidden, plan = engine(run_embeds, run_mask, positions, request, latency_positions, gated=False, cache=cache)
        return backbone.lm_head(backbone.final_norm(hidden[:, -1:])), plan

    prefill_s = _median_seconds(prefill, repeats, device)
    cache = PlanCache()
    logits, plan = prefill(cache)
    start_length = cache.length

    def decode():
        cache.length = start_length
        for group_list in cache.groups:
            for group in group_list:
                if group.keys is not None:
                    group.keys = group.keys[:, :, :start_length]
                    group.values = group.values[:, :, :start_length]
        cache.attention_mask = cache.attention_mask[:, :start_length]
        token = logits[:, -1].argmax(-1)[:, None]
        position = positions[:, -1:] + 1
        for _ in range(decode_tokens):
            hidden, _ = engine(backbone.embed(token), torch.ones_like(token), position, plan, gated=False, cache=cache)
            token = backbone.lm_head(backbone.final_norm(hidden)).argmax(-1)
            position = position + 1

    decode_s = _median_seconds(decode, repeats, device) / decode_tokens
    flops_fraction = 1.0
    units = float("nan")
    if scheduler is not None and plan is not None:
        full = torch.tensor([scheduler.cost.full_flops(int(n)) for n in seq_lens], dtype=torch.float64)
        flops_fraction = float((scheduler.cost.plan_flops(plan, seq_lens).double().cpu() / full).mean())
        units = float(plan.units.float().mean()) if plan.units is not None else units
    return {"budget": budget, "units": units, "flops_fraction": flops_fraction, "prefill_s": prefill_s, "decode_s": decode_s}


@torch.no_grad()
def run_benchmark(
    model: AdaptiveMLLM,
    budgets: list[float],
    prompt_length: int,
    batch_size: int = 1,
    decode_tokens: int = 16,
    repeats: int = 5,
    compare_transformers: bool = True,
) -> list[dict[str, Any]]:
    model.eval()
    device = next(model.backbone.parameters()).device
    backbone = model.backbone
    ids, images = synthetic_prompt(model, prompt_length, batch_size, device)
    mask = torch.ones_like(ids)
    embeds = embed_multimodal(backbone, ids, images)
    rows = [
        _measure_budget(model, embeds, mask, ids, budget, batch_size, decode_tokens, repeats, device) for budget in budgets
    ]
    reference = max(rows, key=lambda row: row["budget"])
    for row in rows:
        row["prefill_ratio"] = row["prefill_s"] / reference["prefill_s"]
        row["decode_ratio"] = row["decode_s"] / reference["decode_s"]

    if compare_transformers:
        # same input embeddings, same weights: transformers' own Llama forward vs our full-budget prefill
        hf = backbone.model

        def hf_prefill():
            return hf(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1, use_cache=True)

        hf_s = _median_seconds(hf_prefill, repeats, device)
        rows.append({"budget": "transformers", "prefill_s": hf_s, "ratio": reference["prefill_s"] / hf_s})
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    header = ["budget", "units", "FLOPs fraction", "prefill ms", "prefill ratio", "decode ms/token", "decode ratio"]
    table = []
    for row in rows:
        if row["budget"] == "transformers":
            continue
        table.append(
            [
                f"{row['budget']:g}",
                f"{row['units']:.0f}" if row["units"] == row["units"] else "-",
                f"{row['flops_fraction']:.3f}",
                f"{1000 * row['prefill_s']:.1f}",
                f"{row['prefill_ratio']:.3f}",
                f"{1000 * row['decode_s']:.2f}",
                f"{row['decode_ratio']:.3f}",
            ]
        )
    print_table("prefill / decode time vs budget (ratios to the largest budget)", header, table)
    for row in rows:
        if row["budget"] == "transformers":
            print(
                f"prefill at the largest budget vs transformers LlavaForConditionalGeneration (same weights and "
                f"embeddings): {1000 * row['prefill_s']:.1f} ms for transformers, ratio ours / transformers = {row['ratio']:.3f}"
            )


def main(argv: list[str]) -> list[dict[str, Any]]:
    from adaptive_mllm.cli import build_cli

    parser = argparse.ArgumentParser(prog="adaptive-mllm benchmark", description=__doc__)
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.7, 0.6, 0.55])
    parser.add_argument("--prompt_length", type=int, default=600, help="prompt tokens, image placeholders included")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--decode_tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no_transformers", action="store_true", help="skip the comparison with plain transformers")
    own, rest = parser.parse_known_args(argv)
    cli = build_cli(rest, run=False)
    datamodule = cli.datamodule
    if datamodule is not None and hasattr(datamodule, "prepare_data"):
        datamodule.prepare_data()
    model = cli.model
    model.configure_model()
    model.to(own.device)
    torch.set_grad_enabled(False)
    rows = run_benchmark(
        model, own.budgets, own.prompt_length, own.batch_size, own.decode_tokens, own.repeats, not own.no_transformers
    )
    print_rows(rows)
    return rows
