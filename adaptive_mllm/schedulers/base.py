"""Scheduler: (latency token hidden state, budgets, sequence lengths) -> ExecutionPlan.

A scheduler never touches layers. It is built from YAML with plain arguments, before the backbone is
known; ``configure(shape)`` (called by the LightningModule once the backbone's sizes are known, before
any checkpoint is loaded) creates its parameters and its cost model.

The plan covers the ``L - num_prefix_layers`` schedulable layers, split into switchable **units**
(``units_per_layer`` equal units per layer: a whole layer for AdaLLaVA-L, ``rank`` heads' worth for
AdaLLaVA-H). A budget becomes a number of units through :class:`~adaptive_mllm.cost.CostModel`, so a
plan of ``k`` units never exceeds the budget's FLOPs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adaptive_mllm.backbones.base import DecoderShape
from adaptive_mllm.cost import BudgetRule, CostModel
from adaptive_mllm.schedulers.latency import LatencyEncoder
from adaptive_mllm.schedulers.plan import ExecutionPlan
from adaptive_mllm.schedulers.release import load_release_scheduler
from adaptive_mllm.specs import instantiate, spec_of

#: transformers' ``initializer_range`` of the LLMs the release builds on (Llama / Vicuna; Phi-2 too)
INIT_STD = 0.02


def init_like_transformers(module: nn.Module) -> None:
    """The release's initialisation of the scheduler and the latency encoder: they are sub-modules of its
    transformers model, so ``_init_weights`` gives every Linear ``N(0, initializer_range)`` weights and zero
    biases; LayerNorms keep ones / zeros. (PyTorch's own default is Kaiming-uniform with non-zero biases.)"""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def portable_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` without where its weights first came from (``release_checkpoint``): whatever records a spec holds
    the weights too (a checkpoint's state dict, an export's scheduler.safetensors), and must not need that
    directory again to rebuild the scheduler."""
    init_args = {key: value for key, value in spec.get("init_args", {}).items() if key != "release_checkpoint"}
    return {**spec, "init_args": init_args}


class Scheduler(nn.Module):
    """Base class of every scheduler.

    Args:
        num_prefix_layers: the first LLM layers, which always run; the scheduler reads the latency
            token at the input of this layer.
        budget_rule: how a budget becomes units: ``"release"`` (default: the AdaLLaVA release's
            ``floor(U * b) - U_prefix``, the paper's rows) or ``"flops"`` (a plan never exceeds the budget's FLOPs).
    """

    #: the AdaLLaVA release's ``scheduler_type`` of the same scheduler (None: the release has none)
    release_type: str | None = None
    #: a release checkpoint directory to read the trained weights from, for a scheduler that takes one
    release_checkpoint: str | None = None

    def __init__(self, num_prefix_layers: int, budget_rule: BudgetRule = "release") -> None:
        super().__init__()
        if num_prefix_layers < 0:
            raise ValueError(f"num_prefix_layers={num_prefix_layers} must be >= 0")
        if budget_rule not in ("flops", "release"):
            raise ValueError(f"budget_rule={budget_rule!r} must be 'flops' or 'release'")
        self.num_prefix_layers = num_prefix_layers
        self.budget_rule = budget_rule
        self._shape: DecoderShape | None = None
        self._cost: CostModel | None = None
        self.latency_encoder: LatencyEncoder | None = None  # created by _build where the scheduler reads a token

    # --- lifecycle ---------------------------------------------------------------------------------
    def configure(self, shape: DecoderShape) -> None:
        """Create the cost model and the parameters for this LLM. A second call with the same shape
        does nothing (parameters, possibly loaded, are kept); another shape is an error."""
        if self._shape is not None:
            if self._shape != shape:
                raise ValueError(f"{type(self).__name__} is already configured for {self._shape}, not {shape}")
            return
        cost = CostModel(shape, self.num_prefix_layers, self.budget_rule)  # validates num_prefix_layers against the LLM
        self._check_shape(shape)
        self._build(shape)
        self.apply(init_like_transformers)
        self._shape, self._cost = shape, cost
        if self.release_checkpoint is not None:  # the trained weights replace the initialisation
            load_release_scheduler(self, self.release_checkpoint)

    def spec(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}``: how to build this scheduler again (a checkpoint records it); a ValueError
        where a constructor argument cannot be read back from the object."""
        return portable_spec(spec_of(self))

    @staticmethod
    def from_spec(spec: dict[str, Any]) -> Scheduler:
        """A new, unconfigured scheduler from :meth:`spec`'s record; a ValueError naming the record otherwise."""
        try:
            scheduler = instantiate(spec)
        except (ImportError, AttributeError, TypeError, ValueError, KeyError) as error:
            raise ValueError(f"the scheduler recorded as {spec} cannot be built here: {error}") from error
        if not isinstance(scheduler, Scheduler):
            raise ValueError(f"{spec} records a {type(scheduler).__name__}, not a Scheduler")
        return scheduler

    def _check_shape(self, shape: DecoderShape) -> None:
        """Raise a ValueError when this scheduler cannot split ``shape`` into its units."""

    def _build(self, shape: DecoderShape) -> None:
        """Create the parameters (none for baselines)."""

    @property
    def is_configured(self) -> bool:
        return self._shape is not None

    @property
    def shape(self) -> DecoderShape:
        if self._shape is None:
            raise RuntimeError(f"{type(self).__name__}.configure(shape) must be called first")
        return self._shape

    @property
    def cost(self) -> CostModel:
        if self._cost is None:
            raise RuntimeError(f"{type(self).__name__}.configure(shape) must be called first")
        return self._cost

    # --- units -------------------------------------------------------------------------------------
    @property
    def num_scheduled_layers(self) -> int:
        return self.shape.num_layers - self.num_prefix_layers

    @property
    def units_per_layer(self) -> int:
        """Equal units one schedulable layer splits into (1 = whole layers)."""
        return 1

    @property
    def num_units(self) -> int:
        return self.num_scheduled_layers * self.units_per_layer

    def check_budgets(
        self,
        budgets: torch.Tensor,  # [B]
        seq_lens: torch.Tensor,  # [B]
        layer_tokens: torch.Tensor | None = None,  # [B, L]
    ) -> None:
        """ValueError naming the admissible range ``[min, 1.0]`` for a budget this scheduler cannot meet."""
        self.cost.check_budgets(budgets, seq_lens, layer_tokens)

    def units_for_budget(
        self,
        budgets: torch.Tensor,  # [B]
        seq_lens: torch.Tensor,  # [B]
        layer_tokens: torch.Tensor | None = None,  # [B, L]
    ) -> torch.Tensor:
        """[B] long: the largest number of units whose plan stays within each budget."""
        return self.cost.units_for_budget(budgets, seq_lens, self.units_per_layer, layer_tokens)

    # --- the interface -----------------------------------------------------------------------------
    @property
    def needs_latency_token(self) -> bool:
        """Whether the module must insert :meth:`latency_token` into the sequence."""
        self.shape  # noqa: B018 - known only once configured: raises before
        return self.latency_encoder is not None

    def latency_token(
        self,
        budgets: torch.Tensor,  # [B]
        seq_lens: torch.Tensor,  # [B]
        layer_tokens: torch.Tensor | None = None,  # [B, L]
    ) -> torch.Tensor | None:
        """[B, hidden] embedding of each budget, or None for a scheduler that reads none."""
        if self.latency_encoder is None:
            return None
        return self.latency_encoder(self.latency_value(budgets, seq_lens, layer_tokens))  # [B, hidden]

    def latency_value(
        self,
        budgets: torch.Tensor,  # [B]
        seq_lens: torch.Tensor,  # [B]
        layer_tokens: torch.Tensor | None = None,  # [B, L]
    ) -> torch.Tensor:
        """[B] in [0, 1): the number the latency token encodes. The budget is quantised to the ``k`` units it
        allows first, so equal plans get equal tokens."""
        k = self.units_for_budget(budgets, seq_lens, layer_tokens)  # [B]
        return k.float() / (self.num_units + 1)

    def forward(
        self,
        latency_hidden: torch.Tensor | None,  # [B, hidden], the latency token at the input of layer num_prefix_layers
        budgets: torch.Tensor,  # [B]
        seq_lens: torch.Tensor,  # [B]
        layer_tokens: torch.Tensor | None = None,  # [B, L]
    ) -> ExecutionPlan:
        raise NotImplementedError
