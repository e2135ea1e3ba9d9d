"""Greedy generation under a plan fixed at prefill, with a KV cache that knows the plan (grown, or static:
``decode``, see :mod:`adaptive_mllm.decoding`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from adaptive_mllm.decoding import DECODE_MODES, DecodeSteps, resolve_mode
from adaptive_mllm.engine import Engine, PlanCache, PlanRequest
from adaptive_mllm.inputs import position_ids_from_mask
from adaptive_mllm.schedulers.plan import ExecutionPlan
from adaptive_mllm.sharding import on_every_rank
from adaptive_mllm.token_selection.base import TokenLayout, TokenSelector

__all__ = ["DECODE_MODES", "Generation", "greedy_generate"]


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per example, the stop token excluded
    plan: ExecutionPlan | None
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    layout: TokenLayout | None = None  # what an in-LLM token selector kept at prefill


def _timestamp(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def greedy_generate(
    engine: Engine,
    embeds: torch.Tensor,  # [B, T, H], left-padded prompt embeddings (latency token included)
    attention_mask: torch.Tensor,  # [B, T]
    max_new_tokens: int,
    stop_token_ids: list[int],
    plan: ExecutionPlan | PlanRequest | None = None,
    latency_positions: torch.Tensor | None = None,
    token_selector: TokenSelector | None = None,
    image_mask: torch.Tensor | None = None,  # [B, T] bool, needed by a selector that drops tokens inside the LLM
    decode: str = "eager",  # eager | static | captured | auto: how decode steps run (adaptive_mllm.decoding)
    row_max_new_tokens: list[int] | None = None,  # [B] each row's own cap (<= max_new_tokens), e.g. a client's max_tokens
) -> Generation:
    """Greedy answers; the plan and any in-LLM token drop are decided at prefill and kept while decoding
    (the dropped tokens are not in the cache of the layers after the drop). A static cache holds at most the
    prompt plus ``max_new_tokens``; setting it up (and growing it) counts as decode time. A row that reaches its own cap is
    done, as if it had stopped; the batch decodes until every row is."""
    backbone = engine.backbone
    device = embeds.device
    batch = embeds.shape[0]
    limits = [max_new_tokens] * batch if row_max_new_tokens is None else list(row_max_new_tokens)
    if len(limits) != batch or not all(1 <= limit <= max_new_tokens for limit in limits):
        raise ValueError(f"row_max_new_tokens {limits} must hold {batch} values in [1, {max_new_tokens}]")
    cache = PlanCache()
    positions = position_ids_from_mask(attention_mask)
    layout = None
    if token_selector is not None and token_selector.layer_index is not None:
        if image_mask is None:
            raise ValueError(f"{type(token_selector).__name__} drops image tokens inside the LLM: pass `image_mask`")
        layout = TokenLayout(image_mask)

    start = _timestamp(device)
    hidden, plan = engine(
        embeds, attention_mask, positions, plan, latency_positions, gated=False, cache=cache,
        token_selector=token_selector, layout=layout,
    )  # fmt: skip
    logits = backbone.lm_head(backbone.final_norm(hidden[:, -1:]))  # [B, 1, V]
    prefill_seconds = _timestamp(device) - start

    stop = torch.tensor(stop_token_ids, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    row_limits = torch.tensor(limits, device=device)  # [B]
    tokens: list[list[int]] = [[] for _ in range(batch)]
    next_position = positions[:, -1:] + 1  # [B, 1]
    steps = 0
    start = _timestamp(device)
    mode = resolve_mode(decode, device) if max_new_tokens > 1 else "eager"  # one token: no decode step, nothing to allocate
    decode_step = DecodeSteps(engine, cache, mode, cache.length + max_new_tokens - 1, device, plan)
    for step in range(max_new_tokens):
        next_token = logits[:, -1].argmax(-1)  # [B]
        finished_now = torch.isin(next_token, stop)
        for index in (~finished & ~finished_now).nonzero().flatten().tolist():
            tokens[index].append(int(next_token[index]))
        finished |= finished_now | (row_limits <= step + 1)
        # sharded layers are gathered by collectives: every rank decodes until the last rank's batch is done
        if on_every_rank(bool(finished.all()), backbone.decoder_layers, device) or step == max_new_tokens - 1:
            break
        hidden = decode_step(backbone.embed(next_token[:, None]), next_position)
        logits = backbone.lm_head(backbone.final_norm(hidden))
        next_position = next_position + 1
        steps += 1
    decode_seconds = _timestamp(device) - start
    return Generation(tokens, plan, prefill_seconds, decode_seconds, steps, layout)
