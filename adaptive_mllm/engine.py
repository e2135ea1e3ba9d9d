"""The engine: the one place that walks the LLM's decoder layers under an ExecutionPlan.

Two ways to honour a plan, with the same result:
- gated (training): every layer runs on every example; an off layer's residual updates are multiplied
  by 0, head outputs by their mask before ``o_proj`` and MLP activations by theirs before
  ``down_proj``, so straight-through gradients reach the scheduler;
- skipping (inference): an off layer is not computed at all; a layer is run only on the examples whose
  plan keeps it; a partly kept layer runs with sliced q/k/v/o and gate/up/down weights, so the matrix
  products are physically smaller. The KV cache stores nothing for a skipped layer and only the kept
  key/value heads of a sliced one; the plan and its slices are fixed at prefill and reused while
  decoding. After a prefill, :meth:`PlanCache.make_static` may move the cache into pre-allocated buffers
  (:mod:`adaptive_mllm.static_cache`); :meth:`Engine.decode_step` then decodes over them in place, one
  (layer, row group) at a time through :func:`decode_group`, the unit :mod:`adaptive_mllm.decoding` captures.

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
from adaptive_mllm.lora import is_adapted, kept_columns, kept_rows, without_bias_where
from adaptive_mllm.schedulers.plan import ExecutionPlan, mlp_group_neurons, widen_mlp_mask
from adaptive_mllm.sharding import through_unit
from adaptive_mllm.static_cache import Cursor, StaticKV, StaticState
from adaptive_mllm.token_selection.base import (
    TokenLayout,
    TokenSelector,
    compact,
    gather_positions,
    last_query_attention,
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
    static: StaticKV | None = None  # after PlanCache.make_static: keys / values in pre-allocated buffers


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
    static: StaticState | None = None  # set by make_static: decoding writes in place (Engine.decode_step)

    def make_static(self, capacity: int, fixed_shapes: bool = False) -> None:
        """Move what the prefill cached into buffers for up to ``capacity`` positions per row (the same layers and
        kv heads), for :meth:`Engine.decode_step`; :class:`~adaptive_mllm.static_cache.CacheFull` when the
        prefill alone exceeds it. ``fixed_shapes``: steps attend over the whole buffer, masked (captured steps),
        allocated whole; else the buffers start smaller and double (:mod:`adaptive_mllm.static_cache`)."""
        if not self.groups or self.attention_mask is None:
            raise ValueError("make_static needs a prefilled cache: run the engine with this cache first")
        selected_mask = None if self.selected_from is None else self.selected_attention_mask
        static = StaticState.from_prefill(self.attention_mask, capacity, fixed_shapes, selected_mask)
        for index, groups in enumerate(self.groups):
            side = static.selected if static.selected is not None and index >= self.selected_from else static.cursor
            for group in groups:
                if group.keys is not None:
                    group.static = StaticKV.from_prefill(group.keys, group.values, side, fixed_shapes)
                    group.keys = group.values = None  # the prefill's tensors are freed: the buffers hold them
        self.static = static


@dataclass
class _Pass:
    """One forward pass's state as it moves through the layers."""

    hidden: torch.Tensor  # [B, T, H]
    cos: torch.Tensor
    sin: torch.Tensor
    key_mask: torch.Tensor  # [B, T_k] bool, the real tokens (cached ones first)
    mask: torch.Tensor | None  # [B, 1, T, T_k] for attention; None = causal, nothing padded
    latency_positions: torch.Tensor | None  # [B]
    plan: ExecutionPlan | None  # None until a request is made (or without a scheduler)
    request: PlanRequest | None  # the plan still to be made at layer num_prefix
    num_prefix: int | None
    past: int  # tokens already cached
    selected_mask: torch.Tensor | None  # [B, 1, T, T'_k]: decoding after a prefill that dropped tokens
    first_prefill: bool  # the cache is empty: this pass fills it
    drop_at: int | None  # the first layer that sees only the selected tokens
    received: list[torch.Tensor] | None = None  # the ranking layer's attention probabilities, when it has run
    host_plan: ExecutionPlan | None = None  # the plan's CPU copy, for the skipping path's decisions


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
        latency_positions: torch.Tensor | None = None,  # [B], needed when `plan` is a request
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
        run = self._start(hidden, attention_mask, position_ids, plan, latency_positions, cache, token_selector, layout)
        for index, layer in enumerate(layers):
            adapter_for(layer)  # fails early, naming the layer type, for an architecture without adapter
            if index == run.drop_at:
                self._drop_tokens(run, index, token_selector, layout, cache)
            elif cache is not None and index == cache.selected_from:
                # decoding after a drop: these layers cached only the kept tokens (None: none of them is padding)
                run.mask = run.selected_mask
            if index == run.num_prefix and run.request is not None:
                self._make_plan(run, cache)
            scheduled = None if run.num_prefix is None or index < run.num_prefix else index - run.num_prefix
            if run.drop_at is not None and index == run.drop_at - 1:
                self._start_ranking(run, index, scheduled, token_selector)
            if gated or cache is None and scheduled is None:
                self._gated_step(run, index, layer, scheduled, cache)
            else:
                self._skipping_step(run, index, layer, scheduled, cache)
        if cache is not None:
            cache.length = run.past + hidden.shape[1]
        return run.hidden, run.plan

    def decode_step(
        self,
        hidden: torch.Tensor,  # [B, 1, H] the new tokens' embeddings
        position_ids: torch.Tensor,  # [B, 1]
        cache: PlanCache,  # prefilled, then made static (PlanCache.make_static)
        run_group: Callable[..., torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One decoded token per row through the layers the prefill's plan keeps, the static cache written in
        place; returns the last layer's hidden states [B, 1, H]. The plan, its row groups and any in-LLM drop
        are the prefill's, and nothing here depends on the step, so ``run_group(index, layer, group, hidden,
        cos, sin, mask)`` may replay a captured step per layer and group (default: run it eagerly)."""
        static = cache.static
        if static is None:
            raise ValueError("decode_step reads a static cache: call cache.make_static(capacity) after the prefill")
        static.advance()  # CacheFull before anything is written
        cos, sin = self.backbone.rotary_embeddings(hidden, position_ids)
        mask = _step_mask(static.cursor, static.fixed_shapes)
        selected_mask = None if static.selected is None else _step_mask(static.selected, static.fixed_shapes)
        run_group = run_group or decode_group
        for index, layer in enumerate(self.backbone.decoder_layers):
            layer_mask = selected_mask if cache.selected_from is not None and index >= cache.selected_from else mask

            def layer_step(
                hidden: torch.Tensor, index: int = index, layer: nn.Module = layer, layer_mask: torch.Tensor | None = layer_mask
            ) -> torch.Tensor:
                for group in cache.groups[index]:
                    hidden = run_group(index, layer, group, hidden, cos, sin, layer_mask)
                return hidden

            hidden = through_unit(layer, layer_step, hidden)  # a sharded layer is gathered around its groups
        cache.length = static.cursor.length
        cache.selected_length = cache.selected_length if static.selected is None else static.selected.length
        return hidden

    # --- the steps of a pass ---------------------------------------------------------------------------
    def _start(self, hidden, attention_mask, position_ids, plan, latency_positions, cache, token_selector, layout) -> _Pass:
        """The pass's state before layer 0: masks (the cache's prepended), rotary tables, the plan or its
        request (a cache's plan wins: it was fixed at prefill), and the layer of an in-LLM token drop."""
        length = hidden.shape[1]
        key_mask, past, selected_mask = _cache_masks(attention_mask, cache)
        if cache is not None and cache.plan is not None:
            plan = cache.plan
        cos, sin = self.backbone.rotary_embeddings(hidden, position_ids)
        return _Pass(
            hidden=hidden, cos=cos, sin=sin, key_mask=key_mask, mask=_maybe_mask(key_mask, length, past),
            latency_positions=latency_positions,
            plan=plan if isinstance(plan, ExecutionPlan) else None,
            request=None if plan is None or isinstance(plan, ExecutionPlan) else plan,
            num_prefix=None if plan is None else plan.num_prefix_layers,
            past=past, selected_mask=selected_mask, first_prefill=cache is not None and not cache.groups,
            drop_at=_drop_layer(token_selector, layout, past, len(self.backbone.decoder_layers)),
        )  # fmt: skip

    def _drop_tokens(self, run: _Pass, index: int, token_selector: TokenSelector, layout: TokenLayout, cache: PlanCache | None) -> None:
        """Take the dropped tokens out of the sequence before layer ``index``; the kept ones keep their rotary positions."""
        keep = layout.keep
        if keep is None:
            received = _received_attention(run.received[0], run.key_mask, layout.query_positions)
            keep = token_selector.after_layer(received, layout.image_mask, run.key_mask)
        keep = keep.bool() & run.key_mask
        source, run.key_mask = compact(keep)  # [B, T'], [B, T']
        run.hidden = gather_positions(run.hidden, source)
        run.cos, run.sin = gather_positions(run.cos, source), gather_positions(run.sin, source)
        run.mask = _maybe_mask(run.key_mask, run.key_mask.shape[1], 0)
        if run.latency_positions is not None:
            run.latency_positions = remap_positions(source, run.latency_positions)
        layout.keep, layout.source_index = keep, source
        run.received = None
        if cache is not None:
            cache.selected_from, cache.selected_attention_mask = index, run.key_mask
            cache.selected_length = run.key_mask.shape[1]

    def _make_plan(self, run: _Pass, cache: PlanCache | None) -> None:
        """At the input of layer ``num_prefix_layers``: the scheduler reads the latency token and the plan is fixed."""
        if run.latency_positions is None:
            raise ValueError("a scheduler needs `latency_positions` to read the latency token")
        rows = torch.arange(run.hidden.shape[0], device=run.hidden.device)
        run.plan, run.request = run.request(run.hidden[rows, run.latency_positions]), None
        if cache is not None:
            cache.plan = run.plan

    def _start_ranking(self, run: _Pass, index: int, scheduled: int | None, token_selector: TokenSelector) -> None:
        """Layer ``index`` ranks the tokens: its attention probabilities are computed explicitly, for all of it."""
        if scheduled is not None and not _runs_fully(run.plan, scheduled):
            raise ValueError(
                f"{type(token_selector).__name__} ranks tokens by layer {index}'s attention, which this plan does "
                f"not run in full: its layer_index ({run.drop_at}) must not exceed the scheduler's num_prefix_layers "
                f"({run.num_prefix})"
            )
        run.received = []

    def _gated_step(self, run: _Pass, index: int, layer: nn.Module, scheduled: int | None, cache: PlanCache | None) -> None:
        """Every row runs the layer; a plan's masks multiply (training), or nothing is scheduled here."""
        if cache is not None and run.first_prefill:
            cache.groups.append([RowGroup(rows=None)])
        entry = cache.groups[index][0] if cache is not None else None
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and cache is None and run.received is None

        def step(hidden: torch.Tensor) -> torch.Tensor:
            if recompute:
                return checkpoint(self._gated_layer, layer, hidden, run.cos, run.sin, run.mask, run.plan, scheduled, None, None, use_reentrant=False)
            return self._gated_layer(layer, hidden, run.cos, run.sin, run.mask, run.plan, scheduled, entry, run.received)

        run.hidden = through_unit(layer, step, run.hidden)  # a sharded layer is gathered around its step

    def _skipping_step(self, run: _Pass, index: int, layer: nn.Module, scheduled: int | None, cache: PlanCache | None) -> None:
        """The rows that keep the layer run it, in groups of equal slices (inference); decoding reuses the
        prefill's groups. A sharded layer is gathered around all of it (slices read its weights)."""
        through_unit(layer, lambda: self._skip_layer(run, index, layer, scheduled, cache))

    def _skip_layer(self, run: _Pass, index: int, layer: nn.Module, scheduled: int | None, cache: PlanCache | None) -> None:
        if cache is not None and not run.first_prefill:
            groups = cache.groups[index]
        else:
            if run.host_plan is None and run.plan is not None:
                run.host_plan = run.plan.to_host()
            groups = self._row_groups(layer, run.host_plan, scheduled, run.hidden.shape[0], run.hidden.device)
            if cache is not None:
                cache.groups.append(groups)
        for group in groups:
            run.hidden = self._run_group(run, layer, group, cache is not None)
        if run.first_prefill and len(groups) > 1:
            cache.groups[index] = [self._merged_for_decoding(groups, run.host_plan, scheduled, run.hidden)]

    @staticmethod
    def _run_group(run: _Pass, layer: nn.Module, group: RowGroup, use_cache: bool) -> torch.Tensor:
        """The hidden states after one row group ran the layer (other rows unchanged)."""
        gates = {"head_gate": group.head_gate, "neuron_gate": group.neuron_gate}
        if group.rows is None:
            return _run_layer(layer, run.hidden, run.cos, run.sin, run.mask, group, use_cache, received=run.received, **gates)
        rows = group.rows
        rows_mask = None if run.mask is None else run.mask[rows]
        out = _run_layer(layer, run.hidden[rows], run.cos[rows], run.sin[rows], rows_mask, group, use_cache, **gates)
        return run.hidden.index_copy(0, rows, out)

    # --- gated (training) ----------------------------------------------------------------------------
    def _gated_layer(self, layer, hidden, cos, sin, mask, plan, scheduled, entry, received=None) -> torch.Tensor:
        layer_gate = head_gate = neuron_gate = None
        if scheduled is not None:
            if plan.head_mask is None and plan.mlp_mask is None:
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
        if plan.head_mask is not None:
            head_gate = plan.head_mask[rows, scheduled].to(dtype).repeat_interleave(shape.queries_per_kv, dim=1)
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
        attn = plan.head_mask[:, scheduled] if plan.head_mask is not None else None
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


def _cache_masks(attention_mask: torch.Tensor, cache: PlanCache | None) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """The real-token mask over every key (the cache's first, then the new tokens'), the number of cached
    tokens, and after an in-LLM drop the attention mask of the layers that cached only the kept tokens.
    Records the new tokens in the cache's masks."""
    key_mask = attention_mask.bool()
    if cache is None:
        return key_mask, 0, None
    if cache.static is not None:
        raise ValueError("a static cache is decoded by Engine.decode_step, not by a forward pass")
    if cache.attention_mask is not None:
        key_mask = torch.cat([cache.attention_mask, key_mask], dim=1)
    cache.attention_mask = key_mask
    selected_mask = None
    if cache.selected_from is not None:
        length = attention_mask.shape[1]
        selected_keys = torch.cat([cache.selected_attention_mask, attention_mask.bool()], dim=1)
        selected_mask = _maybe_mask(selected_keys, length, cache.selected_length)
        cache.selected_attention_mask = selected_keys
        cache.selected_length += length
    return key_mask, cache.length, selected_mask


def _step_mask(cursor: Cursor, fixed_shapes: bool) -> torch.Tensor | None:
    """[B, 1, 1, T_k] the keys one decoded token may see; None (eager, nothing padded): SDPA needs no mask."""
    key_mask = cursor.valid_mask(fixed_shapes)
    if not fixed_shapes and bool(key_mask.all()):
        return None
    return key_mask[:, None, None, :]


def decode_group(
    index: int, layer: nn.Module, group: RowGroup, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """One row group's decode step of layer ``index`` (other rows unchanged): the unit a captured decode replays."""
    gates = {"head_gate": group.head_gate, "neuron_gate": group.neuron_gate}
    if group.rows is None:
        return _run_layer(layer, hidden, cos, sin, mask, group, True, **gates)
    rows = group.rows
    out = _run_layer(layer, hidden[rows], cos[rows], sin[rows], None if mask is None else mask[rows], group, True, **gates)
    return hidden.index_copy(0, rows, out)


def _drop_layer(token_selector: TokenSelector | None, layout: TokenLayout | None, past: int, num_layers: int) -> int | None:
    """The first layer that sees only the tokens an in-LLM selector keeps; None without such a drop (or
    when decoding: the prefill dropped them)."""
    if token_selector is None or token_selector.layer_index is None or past != 0:
        return None
    drop_at = token_selector.layer_index
    if not 1 <= drop_at < num_layers:
        raise ValueError(f"token_selector.layer_index={drop_at} must be in [1, {num_layers - 1}] for {num_layers} layers")
    if layout is None:
        raise ValueError(f"{type(token_selector).__name__} drops image tokens inside the LLM: pass `layout`")
    return drop_at


def _received_attention(probs: torch.Tensor, key_mask: torch.Tensor, query_positions: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] what a token selector ranks positions by: the attention each position received in the
    ranking layer (``probs`` [B, heads, T, T], its probabilities) from each row's last prompt query (its last
    real one, unless ``query_positions`` say), mean over heads, as FastV's official code ranks (averaging
    over all queries would favour early tokens)."""
    return last_query_attention(probs, key_mask, query_positions).mean(1)  # [B, heads, T] -> [B, T]


def _runs_fully(plan: ExecutionPlan, scheduled: int) -> bool:
    """Whether every example runs schedulable layer ``scheduled`` with all its heads and MLP groups."""
    full = plan.layer_mask[:, scheduled] > 0.5  # [B]
    for groups in (plan.head_mask, plan.mlp_mask):
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

    q, q_bias = kept_rows(q_proj, q_index)
    k, k_bias = kept_rows(k_proj, kv_index)
    v, v_bias = kept_rows(v_proj, kv_index)
    o = kept_columns(o_proj, q_index)
    mlp_in = mlp_out = None
    if mlp_keep is not None:
        output = adapter.mlp_output(layer)
        neurons = mlp_group_neurons(mlp_keep, output.in_features, num_mlp_groups)
        mlp_in = [kept_rows(linear, neurons) for linear in adapter.mlp_inputs(layer)]
        mlp_out = kept_columns(output, neurons)
    return SlicedWeights(q, q_bias, k, k_bias, v, v_bias, o, mlp_in, mlp_out, kv_keep)


def _gated_linear(x: torch.Tensor, linear: nn.Linear, gate: torch.Tensor | None) -> torch.Tensor:
    """``linear(x)`` whose bias counts only for examples that keep at least one gated unit ([b, units]
    gate), so a block with every unit off adds nothing, as the skipping path does by not running it."""
    if gate is None:
        return linear(x)
    kept = gate.amax(-1)[:, None, None]  # [b, 1, 1], 1 where any unit is on (straight-through gradient)
    if is_adapted(linear):  # peft adds the adapter (and its dropout) only when the projection is called
        return without_bias_where(linear, x, kept)
    if linear.bias is None:
        return linear(x)
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
    received: list[torch.Tensor] | None = None,  # given: compute attention explicitly, append [b, heads, T, T_k]
) -> torch.Tensor:
    """One decoder layer, honouring slices and gates. Sequential (Llama): x + attn(norm(x)), then
    + mlp(norm(.)); parallel (Phi): x + attn(norm(x)) + mlp(norm(x)), one shared norm.

    With ``received`` the attention probabilities are computed explicitly (not by SDPA) and appended to
    it: what a token selector ranks positions by (:func:`_received_attention`)."""
    adapter: LayerAdapter = adapter_for(layer)
    sliced = group.weights
    runs_attention = sliced is None or sliced.num_kv_heads > 0
    runs_mlp = sliced is None or sliced.mlp_in is None or sliced.num_neurons > 0
    x = adapter.input_norm(layer)(hidden) if runs_attention or adapter.parallel else None  # [b, T, H]
    if runs_attention:
        out = _attention(layer, adapter, x, cos, sin, mask, group, use_cache, head_gate, received)
        hidden = hidden + (out if layer_gate is None else layer_gate * out)
    if runs_mlp:
        if not adapter.parallel:
            x = adapter.post_attention_norm(layer)(hidden)  # sequential: the norm of the updated residual
        out = _mlp(layer, adapter, x, sliced, neuron_gate)
        hidden = hidden + (out if layer_gate is None else layer_gate * out)
    return hidden


def _attention(
    layer: nn.Module,
    adapter: LayerAdapter,
    x: torch.Tensor,  # [b, T, H] normed input
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
    group: RowGroup,
    use_cache: bool,
    head_gate: torch.Tensor | None,
    received: list[torch.Tensor] | None,
) -> torch.Tensor:
    """[b, T, H] the attention block's output (after ``o_proj`` and residual dropout); the group's cache grows."""
    attn = layer.self_attn
    q_proj, k_proj, v_proj, o_proj = adapter.projections(layer)
    sliced = group.weights
    batch, length, _ = x.shape
    head_dim = attn.head_dim
    if sliced is None:
        q, k, v = q_proj(x), k_proj(x), v_proj(x)
    else:
        q, k, v = F.linear(x, sliced.q, sliced.q_bias), F.linear(x, sliced.k, sliced.k_bias), F.linear(x, sliced.v, sliced.v_bias)
    q = q.view(batch, length, -1, head_dim).transpose(1, 2)  # [b, heads, T, D]
    k = k.view(batch, length, -1, head_dim).transpose(1, 2)  # [b, kv_heads, T, D]
    v = v.view(batch, length, -1, head_dim).transpose(1, 2)
    q, k = adapter.normalise_qk(layer, q, k)
    q, k = adapter.rotate(layer, q, k, cos, sin)
    if use_cache and group.static is not None:
        k, v = group.static.append(k, v)  # in place; the valid prefix, or the whole buffer (fixed shapes)
    elif use_cache:
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
        out = _explicit_attention(q, k, v, mask, causal, attn.scaling, received)
    if head_gate is not None:
        out = out * head_gate[:, :, None, None]
    out = out.transpose(1, 2).reshape(batch, length, -1)
    out = _gated_linear(out, o_proj, head_gate) if sliced is None else F.linear(out, sliced.o, o_proj.bias)
    return adapter.residual_dropout(layer, out)


def _explicit_attention(q, k, v, mask, causal: bool, scale: float, received: list[torch.Tensor]) -> torch.Tensor:
    """SDPA's result computed by hand, its probabilities [b, heads, T, T_k] appended to ``received``."""
    length = q.shape[2]
    scores = (q @ k.transpose(-1, -2)).float() * scale  # [b, heads, T, T_k]
    allowed = mask
    if allowed is None and causal:
        allowed = torch.ones(length, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - length)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(-1)  # [b, heads, T, T_k]
    received.append(probs)
    return probs.to(v.dtype) @ v  # [b, heads, T, D]


def _mlp(layer: nn.Module, adapter: LayerAdapter, x: torch.Tensor, sliced: SlicedWeights | None, neuron_gate: torch.Tensor | None) -> torch.Tensor:
    """[b, T, H] the MLP block's output (after residual dropout): full, gated, or on the kept neurons only."""
    output = adapter.mlp_output(layer)
    if sliced is None or sliced.mlp_in is None:
        activation = adapter.mlp_activation(layer, [linear(x) for linear in adapter.mlp_inputs(layer)])  # [b, T, I]
        if neuron_gate is not None:
            activation = activation * neuron_gate[:, None, :]
        out = _gated_linear(activation, output, neuron_gate)
    else:
        activation = adapter.mlp_activation(layer, [F.linear(x, w, b) for w, b in sliced.mlp_in])  # [b, T, n]
        out = F.linear(activation, sliced.mlp_out, output.bias)  # the bias once, whatever was kept
    return adapter.residual_dropout(layer, out)
