"""Decoder-layer adapters: what the engine needs to know about one transformers layer type.

The engine (:mod:`adaptive_mllm.engine`) owns the loop over layers, the gates, the weight slices and the
KV cache, for every architecture alike. An adapter only names a layer's parts and the few operations
that differ between architectures, so a new decoder type is one small class here, not an ``if`` in
every engine function:

- Llama (``LlamaDecoderLayer``): sequential residual ``h + attn(ln1(h))``, then ``+ mlp(ln2(.))``; full
  rotary; gated MLP ``down(act(gate(x)) * up(x))``; q/k/v/o may carry biases;
- Phi (``PhiDecoderLayer``, Phi-2 in Mipha): parallel residual ``h + attn(ln(h)) + mlp(ln(h))`` with one
  shared LayerNorm; partial rotary (only the first ``rotary_ndims`` of each head rotate); q/k/v and the
  ``dense`` output projection carry biases; optional per-head ``q_layernorm`` / ``k_layernorm``; plain
  MLP ``fc2(act(fc1(x)))``.

MLP neurons are the rows of every ``mlp_inputs`` projection and the columns of ``mlp_output``, so MLP
groups slice the same way for both (contiguous neuron ranges); an output bias is added once.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rotary
from transformers.models.phi.modeling_phi import PhiDecoderLayer
from transformers.models.phi.modeling_phi import apply_rotary_pos_emb as phi_rotary


def mlp_group_sizes(intermediate_size: int, num_groups: int) -> list[int]:
    """Neurons in each of ``num_groups`` contiguous MLP groups: ``I // G``, the first ``I mod G`` one more."""
    if not 1 <= num_groups <= intermediate_size:
        raise ValueError(f"{intermediate_size} MLP neurons cannot be split into {num_groups} non-empty groups")
    width, remainder = divmod(intermediate_size, num_groups)
    return [width + 1] * remainder + [width] * (num_groups - remainder)


class LayerAdapter:
    """How the engine reads one decoder-layer type. Stateless: one shared instance per type."""

    #: attention and MLP read the same normalised input and add to the same residual (Phi)
    parallel: bool = False

    def input_norm(self, layer: nn.Module) -> nn.Module:
        return layer.input_layernorm

    def post_attention_norm(self, layer: nn.Module) -> nn.Module | None:
        """The MLP's own norm of a sequential layer; None for a parallel one."""
        return None

    def projections(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        """(q, k, v, output) projections."""
        raise NotImplementedError

    def mlp_inputs(self, layer: nn.Module) -> tuple[nn.Linear, ...]:
        """The MLP's input projections; their rows are the neurons."""
        raise NotImplementedError

    def mlp_output(self, layer: nn.Module) -> nn.Linear:
        """The MLP's output projection; its columns are the neurons."""
        raise NotImplementedError

    def mlp_activation(self, layer: nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The outputs of ``mlp_inputs`` (each [b, T, n]) -> the activation fed to ``mlp_output`` [b, T, n]."""
        raise NotImplementedError

    def rotate(
        self, layer: nn.Module, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary position embedding of q [b, heads, T, D] and k [b, kv_heads, T, D]."""
        raise NotImplementedError

    def normalise_qk(self, layer: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head q / k norms where the architecture has them (before rotary)."""
        return q, k

    def residual_dropout(self, layer: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """Dropout on a block's output before the residual add (identity in eval mode)."""
        return out


class LlamaLayer(LayerAdapter):
    parallel = False

    def post_attention_norm(self, layer: LlamaDecoderLayer) -> nn.Module:
        return layer.post_attention_layernorm

    def projections(self, layer: LlamaDecoderLayer) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        attn = layer.self_attn
        return attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj

    def mlp_inputs(self, layer: LlamaDecoderLayer) -> tuple[nn.Linear, ...]:
        return layer.mlp.gate_proj, layer.mlp.up_proj

    def mlp_output(self, layer: LlamaDecoderLayer) -> nn.Linear:
        return layer.mlp.down_proj

    def mlp_activation(self, layer: LlamaDecoderLayer, inputs: list[torch.Tensor]) -> torch.Tensor:
        gate, up = inputs
        return layer.mlp.act_fn(gate) * up

    def rotate(self, layer, q, k, cos, sin):
        return llama_rotary(q, k, cos, sin)


class PhiLayer(LayerAdapter):
    parallel = True

    def projections(self, layer: PhiDecoderLayer) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        attn = layer.self_attn
        return attn.q_proj, attn.k_proj, attn.v_proj, attn.dense

    def mlp_inputs(self, layer: PhiDecoderLayer) -> tuple[nn.Linear, ...]:
        return (layer.mlp.fc1,)

    def mlp_output(self, layer: PhiDecoderLayer) -> nn.Linear:
        return layer.mlp.fc2

    def mlp_activation(self, layer: PhiDecoderLayer, inputs: list[torch.Tensor]) -> torch.Tensor:
        return layer.mlp.activation_fn(inputs[0])

    def rotate(self, layer, q, k, cos, sin):
        rotary = layer.self_attn.rotary_ndims  # cos / sin are [B, T, rotary] already
        q_rot, k_rot = phi_rotary(q[..., :rotary], k[..., :rotary], cos, sin)
        return torch.cat([q_rot, q[..., rotary:]], dim=-1), torch.cat([k_rot, k[..., rotary:]], dim=-1)

    def normalise_qk(self, layer, q, k):
        attn = layer.self_attn
        if not attn.qk_layernorm:
            return q, k
        return attn.q_layernorm(q), attn.k_layernorm(k)  # LayerNorm over head_dim, per head

    def residual_dropout(self, layer: PhiDecoderLayer, out: torch.Tensor) -> torch.Tensor:
        return layer.resid_dropout(out)


ADAPTERS: dict[type[nn.Module], LayerAdapter] = {LlamaDecoderLayer: LlamaLayer(), PhiDecoderLayer: PhiLayer()}


def adapter_for(layer: nn.Module) -> LayerAdapter:
    """The adapter of ``layer``'s exact type (under FSDP2's wrapper class, when the layer is sharded); a
    TypeError names the supported types otherwise."""
    adapter = ADAPTERS.get(_own_type(layer))
    if adapter is None:
        known = ", ".join(t.__name__ for t in ADAPTERS)
        raise TypeError(f"the engine does not know how to run {type(layer).__name__} (known decoder layers: {known})")
    return adapter


def _own_type(layer: nn.Module) -> type:
    """``fully_shard`` turns a layer's class X into ``FSDPX(FSDPModule, X)``: the adapter is X's."""
    cls = type(layer)
    bases = cls.__bases__
    if len(bases) == 2 and bases[0].__name__ == "FSDPModule" and cls.__name__ == f"FSDP{bases[1].__name__}":
        return bases[1]
    return cls
