"""LoRA adapters on the LLM's decoder layers: LLaVA's ``--lora_enable`` training mode.

The adapters are peft's (``inject_adapter_in_model``), placed inside the decoder layers themselves rather than
around the model (a ``PeftModel``): the engine walks those layers, so their paths stay as they were (each adapted
projection gains ``base_layer``, ``lora_A``, ``lora_B``). Where the engine runs a projection whole it calls it, and
peft adds the adapter; where it slices weights (a partly kept AdaLLaVA-H layer at inference) it reads them here,
base and adapter together (:func:`kept_rows`, :func:`kept_columns`). An export merges them into plain weights
while it writes (:func:`merged_adapters`: the transformers layout LLaVA's ``merge_lora_weights.py`` also writes), a
server for good (:func:`merge_adapters`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

ADAPTER_MARK = "lora_"  # in the name of every adapter parameter (peft's lora_A / lora_B)


@dataclass
class LoRA:
    """LoRA on every linear layer of the LLM's decoder layers: the attention and MLP projections, as LLaVA's
    ``find_all_linear_names`` picks them (not ``lm_head``, nothing of the vision tower or projector). The LLM's own
    weights stay frozen and its adapters train at the ``llm`` learning rate.

    Args:
        rank: the adapters' rank r (LLaVA-1.5's ``finetune_lora.sh``: 128).
        alpha: the scale numerator: an adapter adds ``alpha / rank * B A x`` (LLaVA-1.5: 256).
        dropout: dropout on an adapter's input while training (LLaVA: 0.05).
    """

    rank: int = 128
    alpha: float = 256.0
    dropout: float = 0.05

    def check(self) -> None:
        """Refuse settings no adapter can have (called by the module when a recipe is parsed, not by the dataclass:
        an error raised while jsonargparse builds it is buried in its report on every type the field accepts)."""
        if self.rank < 1:
            raise ValueError(f"lora.rank={self.rank} must be >= 1")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout} must be in [0, 1)")


def add_adapters(layers: nn.ModuleList, lora: LoRA) -> None:
    """Put an adapter on every linear layer of ``layers`` (in place; a second call adds nothing)."""
    if has_adapters(layers):
        return
    lora.check()
    from peft import LoraConfig, inject_adapter_in_model  # imported here: peft takes seconds to import

    targets = [name for name, module in layers.named_modules() if isinstance(module, nn.Linear)]
    if not targets:
        raise ValueError(f"lora: the LLM's decoder layers ({type(layers[0]).__name__}) hold no linear layer to adapt")
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none")
    inject_adapter_in_model(config, layers)


def has_adapters(module: nn.Module) -> bool:
    return any(is_adapted(child) for child in module.modules())


def is_adapter_parameter(name: str) -> bool:
    return ADAPTER_MARK in name


def kept_rows(linear: nn.Module, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight rows (output features) ``index`` of ``linear`` with its adapters added, and its bias there:
    ``W[index] + s * B[index] @ A``. Only the kept rows of ``B`` are multiplied, [n, r] x [r, in]."""
    base = linear.base_layer if is_adapted(linear) else linear
    weight = base.weight[index]
    for down, up, scale in _active_adapters(linear):
        weight = weight + scale * (up[index] @ down).to(weight.dtype)
    bias = None if base.bias is None else base.bias[index]
    return weight, bias


def kept_columns(linear: nn.Module, index: torch.Tensor) -> torch.Tensor:
    """The weight columns (input features) ``index`` of ``linear`` with its adapters added: ``W[:, index] + s * B @
    A[:, index]``."""
    base = linear.base_layer if is_adapted(linear) else linear
    weight = base.weight[:, index]
    for down, up, scale in _active_adapters(linear):
        weight = weight + scale * (up @ down[:, index]).to(weight.dtype)
    return weight


def without_bias_where(linear: nn.Module, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` whose bias counts only where ``kept`` is 1 ([b, 1, 1]), for a projection called whole (peft
    adds its adapter there, with its dropout while training)."""
    out = linear(x)
    bias = (linear.base_layer if is_adapted(linear) else linear).bias
    return out if bias is None else out - (1 - kept) * bias


@contextmanager
def merged_adapters(layers: nn.ModuleList) -> Iterator[None]:
    """Within the block every adapted projection of ``layers`` is a plain ``nn.Linear`` holding ``W + s * B @ A``
    (computed in float32, stored in W's dtype), so a model saves in its own layout; the adapters are back after.
    Costs one more copy of the adapted weights while it lasts."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for parent, name, child in _adapted_children(layers):
            parent._modules[name] = _merged_linear(child)
            swapped.append((parent, name, child))
        yield
    finally:
        for parent, name, child in swapped:
            parent._modules[name] = child


def merge_adapters(layers: nn.ModuleList) -> None:
    """Every adapted projection of ``layers`` becomes, for good, a plain ``nn.Linear`` holding ``W + s * B @ A``: a
    model that only answers (a server) then runs at the base model's cost."""
    for parent, name, child in _adapted_children(layers):
        parent._modules[name] = _merged_linear(child)


def _adapted_children(layers: nn.ModuleList) -> list[tuple[nn.Module, str, nn.Module]]:
    return [(parent, name, child) for parent in list(layers.modules()) for name, child in parent.named_children() if is_adapted(child)]


def _merged_linear(adapted: nn.Module) -> nn.Linear:
    base = adapted.base_layer
    merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
    weight = base.weight.detach().float()
    for down, up, scale in _active_adapters(adapted):
        weight = weight + scale * (up.detach().float() @ down.detach().float())
    merged.weight = nn.Parameter(weight.to(base.weight.dtype), requires_grad=False)
    if base.bias is not None:
        merged.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
    return merged


def adapter_activation_elements(layer: nn.Module) -> float:
    """Elements the adapters of ``layer`` keep per token for backward: each one's rank-r middle and, with dropout,
    its dropped input (the projection's input width)."""
    total = 0.0
    for projection in layer.modules():
        if is_adapted(projection):
            for name in projection.active_adapters:
                dropped = not isinstance(projection.lora_dropout[name], nn.Identity)
                total += projection.r[name] + (projection.in_features if dropped else 0)
    return total


def is_adapted(module: nn.Module) -> bool:
    """Whether ``module`` is a projection peft has put an adapter on."""
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def _active_adapters(linear: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(A [r, in], B [out, r], scale) of each adapter that ``linear(x)`` would add; none once merged or disabled."""
    if not is_adapted(linear) or linear.merged or linear.disable_adapters:
        return []
    return [
        (linear.lora_A[name].weight, linear.lora_B[name].weight, linear.scaling[name])
        for name in linear.active_adapters
        if name in linear.lora_A
    ]
