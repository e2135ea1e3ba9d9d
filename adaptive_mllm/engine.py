"""The engine: the one place that walks the LLM's decoder layers under an ExecutionPlan.

Two ways to honour a plan, with the same result:
- gated (training): every layer runs on every example; an off layer's residual updates are multiplied
  by 0, head outputs by their mask before ``o_proj`` and MLP activations by theirs before
  ``down_proj``, so straight-through gradients reach the scheduler;
- skipping (inference): an off layer is not computed at all; a layer is run only on the examples whose
  plan keeps it; a partly kept layer runs with sliced q/k/v/o and gate/up/down weights, so the matrix
  products are physically smaller. The KV cache stores nothing for a skipped layer and only the kept
  key/value heads of a sliced one; the plan and its slices are fixed at prefill and reused while
  decoding.

A token selector with an in-LLM hook (FastV) drops tokens after the first ``layer_index`` layers: layer
``layer_index - 1`` alone computes its attention probabilities explicitly (every other layer keeps SDPA)
so the selector can rank positions by the attention they received; the kept positions are then taken
out of the sequence (``token_selection.compact``), keeping their rotary positions, and the later layers
run, and cache, only those. See ``token_selection/base.py`` for how positions and labels follow.

The weights are the backbone's own transformers modules (``LlamaDecoderLayer``, ``PhiDecoderLayer``);
the engine only reads their parameters, so checkpoints stay in the transformers layout. What differs
between layer types (sequential or parallel residual, full or partial rotary, gated or plain MLP) is
read through a small per-type adapter (:mod:`adaptive_mllm.layers`); the loop, gates, slices and cache
here are the same for every architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from adaptive_mllm.backbones.base import Backbone
from adaptive_mllm.layers import LayerAdapter, adapter_for
from adaptive_mllm.schedulers.plan import ExecutionPlan, mlp_group_neurons, widen_mlp_mask
from adaptive_mllm.token_selection.base import (
    TokenLayout,
    TokenSelector,
    compact,
    gather_positions,
    remap_positions,
)


@dataclass
class PlanRequest:
    """A plan still to be made: at the input of layer ``num_prefix_layers`` the engine hands the
    latency token's hidden state [B, hidden] to ``make``, which returns the plan."""

    num_prefix_layers: int
    make: Callable[[torch.Tensor], ExecutionPlan]

    def __call__(self, latency_hidden: torch.Tensor) -> ExecutionPlan:
        return self.make(latency_hidden)


@dataclass
class SlicedWeights:
    """The kept rows/columns of one layer's projections. ``mlp_in`` None: the whole MLP."""

    q: torch.Tensor
    q_bias: torch.Tensor | None
    k: torch.Tensor
    k_bias: torch.Tensor | None
    v: torch.Tensor
    v_bias: torch.Tensor | None
    o: torch.Tensor
    mlp_in: list[tuple[torch.Tensor, torch.Tensor | None]] | None  # (weight [n, H], bias [n]) per input projection
    mlp_out: torch.Tensor | None  # [H, n], the output projection's kept columns
    kv_keep: torch.Tensor  # [kept] indices of the kept key/value heads

    @property
    def num_kv_heads(self) -> int:
        return self.kv_keep.numel()

    @property
    def num_neurons(self) -> int | None:
        return None if self.mlp_in is None else self.mlp_in[0][0].shape[0]


@dataclass
class RowGroup:
    """Examples that run one layer the same way: which rows, and with which slices."""

    rows: torch.Tensor | None  # [b] indices into the batch; None = the whole batch
    weights: SlicedWeights | None = None  # None = the layer's full weights
    keys: torch.Tensor | None = None  # [b, kv_heads_kept, T_cached, head_dim]
    values: torch.Tensor | None = None
    # decoding rows whose head-level plans differ: one pass with full weights and 0/1 gates (as in training),
    # [b, heads] and [b, intermediate]; see Engine._merged_for_decoding
    head_gate: torch.Tensor | None = None
    neuron_gate: torch.Tensor | None = None


@dataclass
class PlanCache:
    """KV cache that knows the plan: per layer, one entry per row group (none for a skipped layer)."""

    plan: ExecutionPlan | None = None
    groups: list[list[RowGroup]] = field(default_factory=list)
    attention_mask: torch.Tensor | None = None  # [B, T_cached] bool, real tokens
    length: int = 0
    # after an in-LLM token drop: layers from `selected_from` on cache only the kept positions
    selected_from: int | None = None
    selected_attention_mask: torch.Tensor | None = None  # [B, T'_cached] bool
    selected_length: int = 0


class Engine(nn.Module):
    """Runs ``backbone.decoder_layers`` under a plan. Holds no weights of its own."""

    def __init__(self, backbone: Backbone, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self._backbone = [backbone]  # a plain reference: the backbone's weights belong to the backbone
        # recompute each layer in backward instead of keeping its activations (training memory); the
        # engine calls the layers' sub-modules itself, so transformers' own switch would not apply
        self.activation_checkpointing = activation_checkpointing

    @property
    def backbone(self) -> Backbone:
        return self._backbone[0]

    def forward(
        self,
        hidden: torch.Tensor,  # [B, T, H] input embeddings
        attention_mask: torch.Tensor,  # [B, T] 1 = real token
        position_ids: torch.Tensor,  # [B, T]
        plan: ExecutionPlan | PlanRequest | None = None,
        latency_positions: torch.Tensor | None = None,  # [B], needed when `plan` is a function
        gated: bool = True,
        cache: PlanCache | None = None,
        token_selector: TokenSelector | None = None,
        layout: TokenLayout | None = None,  # where the image tokens are; needed by an in-LLM selector
    ) -> tuple[torch.Tensor, ExecutionPlan | None]:
        """Returns the last layer's hidden states [B, T, H] (before the final norm) and the plan used.

        With a cache, ``attention_mask`` covers only the new tokens; the cache's mask is prepended.
        When ``token_selector`` drops tokens inside the LLM, the result has ``T' <= T`` positions and
        ``layout.source_index`` [B, T'] says where each came from (``layout.keep``: what was kept).
        """
        layers = self.backbone.decoder_layers
        batch, length, _ = hidden.shape
        past = 0
        selected_mask = None  # [B, 1, T, T'_cached + T]: decoding after a prefill that dropped tokens
        if cache is not None:
            past = cache.length
            key_mask = attention_mask.bool()
            if cache.attention_mask is not None:
                key_mask = torch.cat([cache.attention_mask, key_mask], dim=1)
            cache.attention_mask = key_mask
            if cache.plan is not None:
                plan = cache.plan
            if cache.selected_from is not None:
                selected_keys = torch.cat([cache.selected_attention_mask, attention_mask.bool()], dim=1)
                selected_mask = _maybe_mask(selected_keys, length, cache.selected_length)
                cache.selected_attention_mask = selected_keys
                cache.selected_length += length
        else:
            key_mask = attention_mask.bool()
        mask = _maybe_mask(key_mask, length, past)  # [B, 1, T, past + T] or None
        cos, sin = self.backbone.rotary_embeddings(hidden, position_ids)

        num_prefix = None if plan is None else plan.num_prefix_layers
        first_prefill = cache is not None and not cache.groups
        drop_at = None  # the first layer that sees only the selected tokens
        if token_selector is not None and token_selector.layer_index is not None and past == 0:
            drop_at = token_selector.layer_index
            if not 1 <= drop_at < len(layers):
                raise ValueError(f"token_selector.layer_index={drop_at} must be in [1, {len(layers) - 1}] for {len(layers)} layers")
            if layout is None:
                raise ValueError(f"{type(token_selector).__name__} drops image tokens inside the LLM: pass `layout`")
        received: list[torch.Tensor] | None = None
        host_plan: ExecutionPlan | None = None  # the plan's CPU copy, for the skipping path's decisions

        for index, layer in enumerate(layers):
            adapter_for(layer)  # fails early, naming the layer type, for an architecture without adapter
            if index == drop_at:
                # take the dropped tokens out of the sequence; the kept ones keep their rotary positions
                keep = layout.keep
                if keep is None:
                    scores = received[0] * key_mask[:, :, None]  # [B, T_q, T_k], real queries only
                    scores = scores.sum(1) / key_mask.sum(1, keepdim=True).clamp(min=1)  # [B, T_k]
                    keep = token_selector.after_layer(scores, layout.image_mask, key_mask)
                keep = keep.bool() & key_mask
                source, key_mask = compact(keep)  # [B, T'], [B, T']
                hidden = gather_positions(hidden, source)
                cos, sin = gather_positions(cos, source), gather_positions(sin, source)
                mask = _maybe_mask(key_mask, key_mask.shape[1], 0)
                if latency_positions is not None:
                    latency_positions = remap_positions(source, latency_positions)
                layout.keep, layout.source_index = keep, source
                received = None
                if cache is not None:
                    cache.selected_from, cache.selected_attention_mask = index, key_mask
                    cache.selected_length = key_mask.shape[1]
            elif selected_mask is not None and index == cache.selected_from:
                mask = selected_mask
            if num_prefix is not None and index == num_prefix and not isinstance(plan, ExecutionPlan):
                if latency_positions is None:
                    raise ValueError("a scheduler needs `latency_positions` to read the latency token")
                plan = plan(hidden[torch.arange(batch, device=hidden.device), latency_positions])
                if cache is not None:
                    cache.plan = plan
            scheduled = None if num_prefix is None or index < num_prefix else index - num_prefix
            if drop_at is not None and index == drop_at - 1:
                # the ranking layer: its attention probabilities are computed explicitly, for all of it
                if scheduled is not None and not _runs_fully(plan, scheduled):
                    raise ValueError(
                        f"{type(token_selector).__name__} ranks tokens by layer {index}'s attention, which this plan does "
                        f"not run in full: its layer_index ({drop_at}) must not exceed the scheduler's num_prefix_layers "
                        f"({num_prefix})"
                    )
                received = []

            if gated or cache is None and scheduled is None:
                if cache is not None and first_prefill:
                    cache.groups.append([RowGroup(rows=None)])
                entry = cache.groups[index][0] if cache is not None else None
                if self.activation_checkpointing and torch.is_grad_enabled() and cache is None and received is None:
                    hidden = checkpoint(
                        self._gated_layer, layer, hidden, cos, sin, mask, plan, scheduled, None, None, use_reentrant=False
                    )
                else:
                    hidden = self._gated_layer(layer, hidden, cos, sin, mask, plan, scheduled, entry, received)
                continue

            if cache is not None and not first_prefill:
                groups = cache.groups[index]
            else:
                if host_plan is None and isinstance(plan, ExecutionPlan):
                    host_plan = plan.to_host()
                groups = self._row_groups(layer, host_plan, scheduled, batch, hidden.device)
                if cache is not None:
                    cache.groups.append(groups)
            for group in groups:
                rows = group.rows
                gates = {"head_gate": group.head_gate, "neuron_gate": group.neuron_gate}
                if rows is None:
                    hidden = _run_layer(layer, hidden, cos, sin, mask, group, cache is not None, received=received, **gates)
                else:
                    rows_mask = None if mask is None else mask[rows]
                    out = _run_layer(layer, hidden[rows], cos[rows], sin[rows], rows_mask, group, cache is not None, **gates)
                    hidden = hidden.index_copy(0, rows, out)
            if first_prefill and len(groups) > 1:
                cache.groups[index] = [self._merged_for_decoding(groups, host_plan, scheduled, hidden)]
        if cache is not None:
            cache.length = past + length
        return hidden, plan if isinstance(plan, ExecutionPlan) else None

    # --- gated (training) ----------------------------------------------------------------------------
    def _gated_layer(self, layer, hidden, cos, sin, mask, plan, scheduled, entry, received=None) -> torch.Tensor:
        layer_gate = head_gate = neuron_gate = None
        if scheduled is not None:
            if plan.attention_mask is None and plan.mlp_mask is None:
                layer_gate = plan.layer_mask[:, scheduled].to(hidden.dtype)[:, None, None]  # [B, 1, 1]
            else:
                head_gate, neuron_gate = self._unit_gates(plan, scheduled, slice(None), hidden.dtype)
        group = entry if entry is not None else RowGroup(rows=None)
        return _run_layer(layer, hidden, cos, sin, mask, group, entry is not None, layer_gate, head_gate, neuron_gate, received)

    def _unit_gates(self, plan, scheduled, rows, dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A head-level plan's masks of schedulable layer ``scheduled`` for ``rows``, widened to the tensors
        they multiply: [b, heads] (a kv group gates all its query heads) and [b, intermediate]."""
        shape = self.backbone.shape
        head_gate = neuron_gate = None
        if plan.attention_mask is not None:
            head_gate = plan.attention_mask[rows, scheduled].to(dtype).repeat_interleave(shape.queries_per_kv, dim=1)
        if plan.mlp_mask is not None:
            neuron_gate = widen_mlp_mask(plan.mlp_mask[rows, scheduled].to(dtype), shape.intermediate_size)
        return head_gate, neuron_gate

    # --- skipping (inference) ------------------------------------------------------------------------
    def _row_groups(self, layer, plan, scheduled, batch, device) -> list[RowGroup]:
        """Which rows run this layer, and how. ``plan`` is on the CPU: every decision here is made on the host
        and only index tensors travel to ``device``, so no layer waits for the accelerator."""
        if scheduled is None:
            return [RowGroup(rows=None)]
        runs = plan.layer_runs(scheduled)
        if not plan.is_head_level:
            if bool(runs.all()):
                return [RowGroup(rows=None)]
            rows = runs.nonzero().flatten()
            return [RowGroup(rows=rows.to(device))] if rows.numel() else []
        shape = self.backbone.shape
        attn = plan.attention_mask[:, scheduled] if plan.attention_mask is not None else None
        mlp = plan.mlp_mask[:, scheduled] if plan.mlp_mask is not None else None
        keys = torch.cat([m for m in (attn, mlp) if m is not None], dim=1) > 0.5  # [B, G_attn + G_mlp]
        active = runs.nonzero().flatten()
        if active.numel() == 0:
            return []
        patterns, inverse = torch.unique(keys[active], dim=0, return_inverse=True)
        groups = []
        for pattern_index, pattern in enumerate(patterns):
            rows = active[inverse == pattern_index]
            rows = None if rows.numel() == batch else rows.to(device)
            if bool(pattern.all()):  # every group kept: the layer's own weights, nothing to slice
                groups.append(RowGroup(rows=rows))
                continue
            kv_keep = pattern[: attn.shape[1]].nonzero().flatten().to(device) if attn is not None else None
            mlp_keep = pattern[-mlp.shape[1] :].nonzero().flatten().to(device) if mlp is not None else None
            weights = _slice_weights(layer, shape.num_kv_heads, kv_keep, mlp_keep, None if mlp is None else mlp.shape[1])
            groups.append(RowGroup(rows=rows, weights=weights))
        return groups

    def _merged_for_decoding(self, groups: list[RowGroup], plan: ExecutionPlan, scheduled: int, hidden: torch.Tensor) -> RowGroup:
        """One decoding group for rows that keep different heads of a layer.

        Prefill runs one sliced pass per pattern, which follows the FLOPs. Decoding one token per row, the
        per-pattern cost dominates (measured on tiny-h at batch 128: 2.5x the full model's time per
        token), so decoding runs the rows together with full weights and their gates. Their cached keys /
        values are scattered into full-head tensors; a dropped head's zeros are never read, its output is
        gated off."""
        shape = self.backbone.shape
        device, dtype = hidden.device, hidden.dtype
        active = torch.cat([group.rows for group in groups]).sort().values  # [b] rows that run this layer
        # [b, kv_heads, T, head_dim]; T: the prefill's length (first prefill: nothing cached before)
        heads, length = shape.num_kv_heads, hidden.shape[1]
        keys = hidden.new_zeros(active.numel() * heads, length, shape.head_dim)  # [b * kv_heads, T, head_dim]
        values = torch.zeros_like(keys)
        slots, kept_keys, kept_values = [], [], []
        for group in groups:
            if group.keys is None:  # these rows keep no attention head here: their zeros stay
                continue
            at = torch.searchsorted(active, group.rows)  # [b_g] positions among the active rows
            kept = group.weights.kv_keep if group.weights is not None else torch.arange(heads, device=device)
            slots.append((at[:, None] * heads + kept[None, :]).flatten())  # [b_g * kept]
            kept_keys.append(group.keys.flatten(0, 1))  # [b_g * kept, T, head_dim]
            kept_values.append(group.values.flatten(0, 1))
        if slots:  # one scatter for all patterns, not one per pattern
            slot = torch.cat(slots)
            keys[slot], values[slot] = torch.cat(kept_keys), torch.cat(kept_values)
        keys = keys.view(active.numel(), heads, length, shape.head_dim)
        values = values.view(active.numel(), heads, length, shape.head_dim)
        gates = self._unit_gates(plan, scheduled, active.cpu(), dtype)  # the plan is on the host
        head_gate, neuron_gate = (None if gate is None else gate.to(device) for gate in gates)
        rows = None if active.numel() == plan.batch_size else active
        return RowGroup(rows=rows, keys=keys, values=values, head_gate=head_gate, neuron_gate=neuron_gate)


def _maybe_mask(key_mask: torch.Tensor, length: int, past: int) -> torch.Tensor | None:
    """None when nothing is padded (SDPA then uses its causal kernels), else :func:`_attention_mask`."""
    if bool(key_mask.all()) and (past == 0 or length == 1):
        return None
    return _attention_mask(key_mask, length, past)


def _runs_fully(plan: ExecutionPlan | PlanRequest | None, scheduled: int) -> bool:
    """Whether every example runs schedulable layer ``scheduled`` with all its heads and MLP groups."""
    if not isinstance(plan, ExecutionPlan):
        return False
    full = plan.layer_mask[:, scheduled] > 0.5  # [B]
    for groups in (plan.attention_mask, plan.mlp_mask):
        if groups is not None:
            full = full & (groups[:, scheduled] > 0.5).all(-1)
    return bool(full.all())


def _attention_mask(key_mask: torch.Tensor, length: int, past: int) -> torch.Tensor:
    """[B, T_k] real-token mask -> [B, 1, T_q, T_k] bool (True = may attend), causal.

    A padding query may attend to itself, so that no row is fully masked (SDPA would give NaN).
    """
    device = key_mask.device
    query_positions = past + torch.arange(length, device=device)  # [T_q]
    key_positions = torch.arange(key_mask.shape[1], device=device)  # [T_k]
    causal = key_positions[None, :] <= query_positions[:, None]  # [T_q, T_k]
    itself = key_positions[None, :] == query_positions[:, None]
    allowed = (causal[None] & key_mask[:, None, :]) | itself[None]
    return allowed[:, None]


def _slice_weights(
    layer: nn.Module,
    num_kv_heads: int,
    kv_keep: torch.Tensor | None,
    mlp_keep: torch.Tensor | None,
    num_mlp_groups: int | None,
) -> SlicedWeights:
    adapter = adapter_for(layer)
    attn = layer.self_attn
    q_proj, k_proj, v_proj, o_proj = adapter.projections(layer)
    head_dim = attn.head_dim
    queries_per_kv = attn.num_key_value_groups
    device = q_proj.weight.device
    if kv_keep is None:
        kv_keep = torch.arange(num_kv_heads, device=device)
    heads = (kv_keep[:, None] * queries_per_kv + torch.arange(queries_per_kv, device=kv_keep.device)).flatten()
    q_index = (heads[:, None] * head_dim + torch.arange(head_dim, device=kv_keep.device)).flatten()
    kv_index = (kv_keep[:, None] * head_dim + torch.arange(head_dim, device=kv_keep.device)).flatten()

    def rows(linear: nn.Linear, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = None if linear.bias is None else linear.bias[index]
        return linear.weight[index], bias

    q, q_bias = rows(q_proj, q_index)
    k, k_bias = rows(k_proj, kv_index)
    v, v_bias = rows(v_proj, kv_index)
    o = o_proj.weight[:, q_index]
    mlp_in = mlp_out = None
    if mlp_keep is not None:
        output = adapter.mlp_output(layer)
        neurons = mlp_group_neurons(mlp_keep, output.in_features, num_mlp_groups)
        mlp_in = [rows(linear, neurons) for linear in adapter.mlp_inputs(layer)]
        mlp_out = output.weight[:, neurons]
    return SlicedWeights(q, q_bias, k, k_bias, v, v_bias, o, mlp_in, mlp_out, kv_keep)


def _gated_linear(x: torch.Tensor, linear: nn.Linear, gate: torch.Tensor | None) -> torch.Tensor:
    """``linear(x)`` whose bias counts only for examples that keep at least one gated unit ([b, units]
    gate), so a block with every unit off adds nothing, as the skipping path does by not running it."""
    if gate is None or linear.bias is None:
        return linear(x)
    kept = gate.amax(-1)[:, None, None]  # [b, 1, 1], 1 where any unit is on (straight-through gradient)
    return F.linear(x, linear.weight) + kept * linear.bias


def _run_layer(
    layer: nn.Module,
    hidden: torch.Tensor,  # [b, T, H]
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,  # [b, 1, T, T_k]; None = causal, nothing padded
    group: RowGroup,
    use_cache: bool,
    layer_gate: torch.Tensor | None = None,  # [b, 1, 1]
    head_gate: torch.Tensor | None = None,  # [b, heads]
    neuron_gate: torch.Tensor | None = None,  # [b, I]
    received: list[torch.Tensor] | None = None,  # given: compute attention explicitly, append [b, T, T_k]
) -> torch.Tensor:
    """One decoder layer, honouring slices and gates. Sequential (Llama): x + attn(norm(x)), then
    + mlp(norm(.)); parallel (Phi): x + attn(norm(x)) + mlp(norm(x)), one shared norm.

    With ``received`` the attention probabilities are computed explicitly (not by SDPA) and their mean
    over heads is appended to it: what a token selector ranks positions by."""
    adapter: LayerAdapter = adapter_for(layer)
    attn = layer.self_attn
    q_proj, k_proj, v_proj, o_proj = adapter.projections(layer)
    sliced = group.weights
    batch, length, _ = hidden.shape
    head_dim = attn.head_dim
    runs_attention = sliced is None or sliced.num_kv_heads > 0
    runs_mlp = sliced is None or sliced.mlp_in is None or sliced.num_neurons > 0
    x = adapter.input_norm(layer)(hidden) if runs_attention or adapter.parallel else None  # [b, T, H]

    # attention ----------------------------------------------------------------------------------
    if runs_attention:
        if sliced is None:
            q = q_proj(x)
            k = k_proj(x)
            v = v_proj(x)
        else:
            q = F.linear(x, sliced.q, sliced.q_bias)
            k = F.linear(x, sliced.k, sliced.k_bias)
            v = F.linear(x, sliced.v, sliced.v_bias)
        q = q.view(batch, length, -1, head_dim).transpose(1, 2)  # [b, heads, T, D]
        k = k.view(batch, length, -1, head_dim).transpose(1, 2)  # [b, kv_heads, T, D]
        v = v.view(batch, length, -1, head_dim).transpose(1, 2)
        q, k = adapter.normalise_qk(layer, q, k)
        q, k = adapter.rotate(layer, q, k, cos, sin)
        if use_cache:
            if group.keys is not None:
                k = torch.cat([group.keys, k], dim=2)
                v = torch.cat([group.values, v], dim=2)
            group.keys, group.values = k, v
        repeats = q.shape[1] // k.shape[1]
        if repeats > 1:
            k = k.repeat_interleave(repeats, dim=1)
            v = v.repeat_interleave(repeats, dim=1)
        causal = mask is None and length > 1  # a single new query may see the whole cache
        if received is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=attn.scaling)  # [b, heads, T, D]
        else:
            scores = (q @ k.transpose(-1, -2)).float() * attn.scaling  # [b, heads, T, T_k]
            allowed = mask
            if allowed is None and causal:
                allowed = torch.ones(length, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - length)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            probs = scores.softmax(-1)  # [b, heads, T, T_k]
            out = probs.to(v.dtype) @ v  # [b, heads, T, D]
            received.append(probs.mean(1))  # [b, T, T_k]
        if head_gate is not None:
            out = out * head_gate[:, :, None, None]
        out = out.transpose(1, 2).reshape(batch, length, -1)
        out = _gated_linear(out, o_proj, head_gate) if sliced is None else F.linear(out, sliced.o, o_proj.bias)
        out = adapter.residual_dropout(layer, out)
        hidden = hidden + (out if layer_gate is None else layer_gate * out)

    # MLP ----------------------------------------------------------------------------------------
    if runs_mlp:
        if not adapter.parallel:
            x = adapter.post_attention_norm(layer)(hidden)  # sequential: the norm of the updated residual
        output = adapter.mlp_output(layer)
        if sliced is None or sliced.mlp_in is None:
            activation = adapter.mlp_activation(layer, [linear(x) for linear in adapter.mlp_inputs(layer)])  # [b, T, I]
            if neuron_gate is not None:
                activation = activation * neuron_gate[:, None, :]
            out = _gated_linear(activation, output, neuron_gate)
        else:
            activation = adapter.mlp_activation(layer, [F.linear(x, w, b) for w, b in sliced.mlp_in])  # [b, T, n]
            out = F.linear(activation, sliced.mlp_out, output.bias)  # the bias once, whatever was kept
        out = adapter.residual_dropout(layer, out)
        hidden = hidden + (out if layer_gate is None else layer_gate * out)
    return hidden
