"""AdaptiveMLLM: backbone + scheduler + token selector, trained and evaluated under budgets."""

from __future__ import annotations

import dataclasses
import math
import warnings
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from transformers import PreTrainedTokenizerBase

from adaptive_mllm.backbones.base import Backbone, LoRA, is_adapter_parameter
from adaptive_mllm.backbones.templates import IGNORE_INDEX
from adaptive_mllm.engine import Engine
from adaptive_mllm.generation import DECODE_MODES, greedy_generate
from adaptive_mllm.planning import Planner
from adaptive_mllm.schedulers.base import Scheduler
from adaptive_mllm.schedulers.baselines import BaselineScheduler, FullScheduler
from adaptive_mllm.token_selection.base import TokenSelector, gather_positions

BACKBONE_PARTS = ("vision_tower", "projector", "llm")  # Backbone.parameter_groups' names
SCHEDULER_SPEC_KEY = "scheduler_spec"  # in a checkpoint: the {class_path, init_args} the scheduler was built with
LORA_KEY = "lora"  # in a checkpoint: the LoRA settings its adapters were trained with (None: no adapters)
CHAT_TEMPLATE_KEY = "chat_template"  # in a checkpoint: the name of the chat template it was trained with


class AdaptiveMLLM(L.LightningModule):
    """A multimodal LLM that answers under a compute budget chosen per request.

    Args:
        backbone: the multimodal LLM (vision tower, projector, LLM, tokenizer, chat template).
        scheduler: decides, per example and budget, which layers / heads run; None = always the full model.
        token_selector: which visual tokens reach the LLM; None = all of them.
        train_budget_range: budgets drawn uniformly per training example, clipped to the admissible minimum.
        full_budget_steps: the first optimiser steps train at budget 1.0 (every layer), before budgets are
            drawn: a stand-in for the pretrained LLM AdaLLaVA starts from, whose layers were not trained
            to work in any subset (a model trained under random plans from step 0 is). The learning rate
            starts a new warm-up and cosine cycle when budgets start to be drawn.
        eval_budgets: validation / test evaluate every one of these budgets.
        budget: the budget of ``predict``.
        max_new_tokens: longest generated answer.
        learning_rate: AdamW peak learning rate (linear warm-up, then cosine decay to 0).
        part_learning_rates: peak learning rates of backbone parts (``vision_tower``, ``projector``, ``llm``) that
            differ from ``learning_rate``, as the LLaVA release's ``mm_projector_lr`` (and LLaVA-NeXT's
            ``mm_vision_tower_lr``); the same warm-up and decay apply to each. The scheduler's own parameters and
            any part not named train at ``learning_rate``.
        weight_decay: AdamW weight decay; biases and norm weights get none, as LLaVA's (HF) Trainer exempts them.
        warmup_ratio: fraction of the optimiser steps spent warming up (rounded up, as the HF Trainer).
        freeze: backbone parts kept frozen (``vision_tower``, ``projector``, ``llm``).
        lora: train the LLM through LoRA adapters on its decoder layers' projections, its own weights frozen
            (LLaVA's ``--lora_enable``; see :class:`~adaptive_mllm.lora.LoRA`). ``llm``'s learning rate is the
            adapters'; ``freeze`` may not name ``llm`` then.
        activation_checkpointing: recompute each LLM layer in backward instead of storing its
            activations: less memory for long sequences and big models, about one more forward of time.
        decode: how generation decodes after the prefill: ``eager`` (a cache grown by concatenation), ``static``
            (a pre-allocated cache written in place, its room doubled when full), ``captured`` (static, allocated
            whole, and each kept layer's step captured: CUDA graphs on a GPU, torch.compile on the CPU) or ``auto``
            (``static``: ``captured`` is opt-in until measured on a GPU); the answers are the same.
    """

    def __init__(
        self,
        backbone: Backbone,
        scheduler: Scheduler | None = None,
        token_selector: TokenSelector | None = None,
        train_budget_range: tuple[float, float] = (0.5, 1.0),
        full_budget_steps: int = 0,
        eval_budgets: list[float] | None = None,
        budget: float = 1.0,
        max_new_tokens: int = 16,
        learning_rate: float = 2e-5,
        part_learning_rates: dict[str, float] | None = None,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        freeze: list[str] | None = None,
        lora: LoRA | None = None,
        activation_checkpointing: bool = False,
        decode: str = "auto",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.scheduler = scheduler
        self.token_selector = token_selector
        self.engine = Engine(backbone, activation_checkpointing)
        self.eval_budgets = list(eval_budgets) if eval_budgets is not None else [1.0]
        self.train_budget_range = tuple(train_budget_range)
        self.full_budget_steps = full_budget_steps
        self.budget = budget
        self.max_new_tokens = max_new_tokens
        self.learning_rate = learning_rate
        self.part_learning_rates = dict(part_learning_rates or {})
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.freeze = list(freeze) if freeze is not None else ["vision_tower"]
        self.lora = lora
        self.decode = decode
        self._check_arguments()
        self._skipped = 0

    def _check_arguments(self) -> None:
        """Fail when the recipe is parsed, not mid-run."""
        low, high = self.train_budget_range
        for name, value in [("train_budget_range", low), ("train_budget_range", high), ("budget", self.budget)] + [
            ("eval_budgets", b) for b in self.eval_budgets
        ]:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: budget {value} is outside the admissible range [0, 1]")
        if low > high:
            raise ValueError(f"train_budget_range: low {low} > high {high}")
        if not self.eval_budgets:
            raise ValueError("eval_budgets is empty: give at least one budget to evaluate at, e.g. [1.0]")
        repeated = sorted({b for b in self.eval_budgets if self.eval_budgets.count(b) > 1})
        if repeated:  # reports and metrics are keyed by budget: a second run of one would overwrite the first
            raise ValueError(f"eval_budgets: budget {repeated[0]} appears twice in {self.eval_budgets}")
        keys = [f"{b:g}" for b in self.eval_budgets]  # how reports and logged keys write a budget (budget_0.7)
        alike = sorted({b for b, key in zip(self.eval_budgets, keys, strict=True) if keys.count(key) > 1})
        if alike:
            raise ValueError(
                f"eval_budgets: {alike} are all written {f'{alike[0]:g}'} in reports and logged keys, where one would "
                "overwrite the other: give budgets that differ within 6 significant digits"
            )
        if self.full_budget_steps < 0:
            raise ValueError(f"full_budget_steps={self.full_budget_steps} must be >= 0")
        # refused here, before a model is built: torch's own refusal names no option, and a warm-up ratio above 1 was taken
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate={self.learning_rate} must be a finite number > 0 (freeze parts to train none)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay={self.weight_decay} must be a finite number >= 0")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1]: the fraction of the optimizer steps spent warming up")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1: every answer has at least one token")
        if self.scheduler is not None:
            layers = self.backbone.shape.num_layers
            prefix = self.scheduler.num_prefix_layers
            if not 0 <= prefix < layers:
                raise ValueError(
                    f"scheduler.num_prefix_layers={prefix} must be in [0, {layers - 1}]: the backbone's LLM has {layers} layers"
                )
            self._check_budgets_reach_the_prefix(prefix, layers)
        selector = self.token_selector
        if selector is not None and selector.layer_index is not None:
            layers = self.backbone.shape.num_layers
            if not 1 <= selector.layer_index < layers:
                raise ValueError(f"token_selector.layer_index={selector.layer_index} must be in [1, {layers - 1}]")
            scheduler = self.scheduler
            if scheduler is not None and not isinstance(scheduler, FullScheduler) and selector.layer_index > scheduler.num_prefix_layers:
                raise ValueError(
                    f"token_selector.layer_index={selector.layer_index} exceeds scheduler.num_prefix_layers="
                    f"{scheduler.num_prefix_layers}: the layer that ranks the tokens must always run"
                )
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode: unknown mode {self.decode!r}; known: {', '.join(DECODE_MODES)}")
        for name, parts in [("freeze", self.freeze), ("part_learning_rates", self.part_learning_rates)]:
            unknown = set(parts) - set(BACKBONE_PARTS)
            if unknown:
                raise ValueError(f"{name}: unknown parts {sorted(unknown)}; known: {', '.join(BACKBONE_PARTS)}")
        for part, rate in self.part_learning_rates.items():
            if not rate > 0:
                raise ValueError(f"part_learning_rates: {part}'s learning rate {rate} must be > 0 (freeze it instead)")
        if self.lora is not None:
            self.lora.check()
        if self.lora is not None and "llm" in self.freeze:
            raise ValueError("freeze names llm and lora is set: LoRA trains the llm's adapters (its own weights stay frozen); drop llm from freeze")

    def _check_budgets_reach_the_prefix(self, prefix: int, layers: int) -> None:
        """The always-run prefix layers cost at least ``prefix / layers`` of any request (the LM head only adds
        to that share), so a lower budget can never be met: say so now, naming the argument (the release's rule
        runs such a budget with 0 scheduled units, the cost of ``prefix / layers``: a warning, as its score is that
        budget's)."""
        if isinstance(self.scheduler, FullScheduler):
            return  # the full model ignores budgets
        floor = prefix / layers
        for name, values in [("eval_budgets", self.eval_budgets), ("budget", [self.budget])]:
            low = [value for value in values if value < floor]
            if low and getattr(self.scheduler, "budget_rule", "release") == "release":
                warnings.warn(
                    f"{name}: budget {low[0]} is below {floor:.3f}, the share of the {prefix} always-run prefix layers of "
                    f"{layers}: the release's rule runs it with 0 scheduled layers, as budget {floor:.3f}, and scores it so",
                    stacklevel=2,
                )
            elif low:
                raise ValueError(
                    f"{name}: budget {low[0]} is below {floor:.3f}, the share of the {prefix} always-run prefix layers of "
                    f"{layers} (scheduler.num_prefix_layers): no plan can meet it; raise it or lower num_prefix_layers"
                )

    # --- construction --------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the backbone (weights created or loaded here, after prepare_data) and size the scheduler."""
        self.backbone.build()
        # a template whose answers cannot end in this tokenizer (plain's newline in a whitespace-split vocabulary) fails
        # here, before a fit trains without the label that ends each answer, not at the first answer asked for
        self.backbone.chat_template.stop_token_ids(self.backbone.tokenizer)
        if self.lora is not None:
            self.backbone.add_lora(self.lora)
        if self.scheduler is not None:
            self.scheduler.configure(self.backbone.shape)
        adapters = {id(p) for p in self.backbone.adapter_parameters()}
        for name, parameters in self.backbone.parameter_groups().items():
            for parameter in parameters:  # with LoRA the LLM trains its adapters only
                trains = name not in self.freeze and (self.lora is None or name != "llm" or id(parameter) in adapters)
                parameter.requires_grad_(trains)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record how the scheduler was built (``class_path`` / ``init_args``), so a test of this checkpoint with
        another scheduler can name it, and a baseline can encode budgets as it did; and the LoRA settings, whose
        ``alpha`` scales every adapter but is no tensor's shape; and the chat template, which no tensor records
        either."""
        checkpoint[LORA_KEY] = None if self.lora is None else dataclasses.asdict(self.lora)
        template = getattr(self.backbone, "template_name", None)  # a backbone of one's own may name none
        if template is not None:
            checkpoint[CHAT_TEMPLATE_KEY] = template
        if self.scheduler is None:
            return
        try:
            checkpoint[SCHEDULER_SPEC_KEY] = self.scheduler.spec()
        except ValueError:  # a custom scheduler whose arguments cannot be read back: nothing to record
            pass

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Let a baseline scheduler (Full, Static, Random) evaluate a model trained with a learned one, so
        budget curves compare on the same weights: the scheduler tensors it has no use for (the learned
        plan head) are dropped, with a warning, and a latency token it inserts encodes each budget as the
        trained scheduler did. Missing tensors still fail the (strict) load.

        A sharded checkpoint (a directory) reaches this hook without ``state_dict``: the strategy has
        already loaded the weights, strictly, each rank its shards."""
        self._check_lora_of(checkpoint.get(LORA_KEY))
        self._check_chat_template_of(checkpoint.get(CHAT_TEMPLATE_KEY))
        self._check_optimizer_groups_of(checkpoint)
        self._check_budget_rule_of(checkpoint.get(SCHEDULER_SPEC_KEY))
        if isinstance(self.scheduler, BaselineScheduler) and self.scheduler.latency_encoder is not None:
            trained = _trained_scheduler(checkpoint)
            if trained is not None:
                self.scheduler.encode_budget_like(trained)
        if "state_dict" not in checkpoint:
            return
        state, own = checkpoint["state_dict"], self.state_dict()
        misfits = [key for key, value in state.items() if key in own and own[key].shape != value.shape]
        tokenizer = getattr(self.backbone.tokenizer, "name_or_path", "") or "the recipe's tokenizer"
        # another model size first: the scheduler's tensors are sized by the backbone, so they misfit too
        _check_backbone_of(state, own, [key for key in misfits if not key.startswith("scheduler.")], tokenizer)
        _check_backbone_keys_of(state, own)
        self._check_scheduler_of(checkpoint, own, [key for key in misfits if key.startswith("scheduler.")])
        unused = [key for key in state if key.startswith("scheduler.") and key not in own]
        if unused and isinstance(self.scheduler, BaselineScheduler):
            for key in unused:
                del state[key]
            rank_zero_warn(f"{type(self.scheduler).__name__} does not use the checkpoint's {unused}")

    def _check_budget_rule_of(self, spec: dict[str, Any] | None) -> None:
        """A checkpoint whose scheduler counted budgets by another rule (``flops`` was the default until 2026-12-07)
        loads and answers, but a budget may run another number of units than it did there: said, with the flag.
        Checkpoints written before 2026-12-06 record no scheduler."""
        own = getattr(self.scheduler, "budget_rule", None)
        if not spec or own is None:
            return
        trained = spec.get("init_args", {}).get("budget_rule", "flops")
        if trained != own:
            rank_zero_warn(
                f"the checkpoint's scheduler turned budgets into units by budget_rule={trained!r}, this model by {own!r} "
                f"(the default since 2026-12-07): a budget may run another number of units than it did there; "
                f"--model.scheduler.init_args.budget_rule={trained} answers as it did"
            )

    def _check_lora_of(self, trained: dict[str, Any] | None) -> None:
        """Adapters trained with another ``alpha`` would load (the tensors fit) and answer otherwise; another
        ``dropout`` only changes further training. Checkpoints written before 2026-12-07 record neither."""
        if trained is None or self.lora is None:
            return  # adapters present on one side only: the state dict's keys say so (_check_backbone_keys_of)
        own = dataclasses.asdict(self.lora)
        if trained.get("alpha") != own["alpha"]:
            raise ValueError(
                f"the checkpoint's LoRA adapters were trained with lora.alpha={trained.get('alpha')}, the recipe gives "
                f"{own['alpha']}: every adapter would be scaled otherwise; give the training run's model.lora"
            )
        if trained.get("dropout") != own["dropout"]:
            rank_zero_warn(f"the checkpoint's LoRA adapters were trained with lora.dropout={trained.get('dropout')}, "
                           f"the recipe gives {own['dropout']} (it matters only to further training)")

    def _check_chat_template_of(self, trained: str | None) -> None:
        """A model answers in the template it was trained on: evaluated with another (a recipe of another stage,
        ``plain`` against ``vicuna_v1``), it loads and scores lower with nothing said. A warning, not an error:
        comparing templates is an experiment. Checkpoints written before 2026-12-07 record none."""
        own = getattr(self.backbone, "template_name", None)
        if trained is None or own is None or trained == own:
            return
        rank_zero_warn(
            f"the checkpoint was trained with chat template {trained!r}, the recipe gives {own!r}: prompts are "
            f"built otherwise than in training; pass --model.backbone.init_args.template={trained} to use the "
            "checkpoint's"
        )

    def _check_scheduler_of(self, checkpoint: dict[str, Any], own: dict[str, torch.Tensor], wrong: list[str]) -> None:
        """A checkpoint trained with another learned scheduler (AdaLLaVA-H into an L recipe) is named as such,
        instead of failing the load on a tensor size deep inside torch."""
        state = checkpoint["state_dict"]
        missing = [key for key in own if key.startswith("scheduler.") and key not in state]
        saved_class = (checkpoint.get(SCHEDULER_SPEC_KEY) or {}).get("class_path", "")
        mine = type(self.scheduler).__name__
        if wrong and saved_class.rsplit(".", 1)[-1] == mine:
            key = wrong[0]
            raise ValueError(
                f"the checkpoint's {mine} has {key} of shape {list(state[key].shape)}, the recipe's {list(own[key].shape)}: "
                "it was built with other arguments (num_prefix_layers, rank); use the training run's"
            )
        if wrong or (missing and saved_class and not saved_class.endswith(mine)):
            holds = saved_class.rsplit(".", 1)[-1] or "another scheduler"
            raise ValueError(
                f"the checkpoint holds a {holds} (its {(wrong or missing)[0]} does not fit), the recipe builds a {mine}: "
                f"evaluate it with the recipe it was trained with, or with a baseline scheduler (StaticScheduler, "
                "RandomScheduler, FullScheduler) for the same weights"
            )

    # --- the LLM under budgets -----------------------------------------------------------------------
    @property
    def planner(self) -> Planner:
        """The one way from a batch and budgets to the engine's inputs and back to FLOPs (serving uses it too)."""
        return Planner(self.backbone, self.scheduler, self.token_selector)

    def forward(self, batch: dict[str, Any], budgets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced forward (gated): returns logits [B, T', V] and labels [B, T'] (T' = T + latency token).
        ``budgets`` [B]; None: drawn from ``train_budget_range``."""
        planner = self.planner
        inputs = planner.embed(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), batch["labels"])
        prepared = planner.prepare(inputs, budgets, batch.get("prompt_lengths"), draw_range=self.train_budget_range)
        layout = prepared.layout()
        hidden, _ = self.engine(
            prepared.embeds, prepared.attention_mask, prepared.position_ids, prepared.plan, prepared.latency_positions,
            gated=True, token_selector=self.token_selector, layout=layout,
        )  # fmt: skip
        labels = prepared.labels
        if layout is not None and layout.source_index is not None:  # tokens dropped inside the LLM: labels follow
            labels = gather_positions(labels, layout.source_index, IGNORE_INDEX)
        logits = self.backbone.lm_head(self.backbone.final_norm(hidden))
        return logits, labels

    @staticmethod
    def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )

    # --- training --------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self._skipped += int(batch.get("num_skipped", 0))
        if batch["input_ids"].shape[0] == 0:
            return None
        budgets = None  # drawn from train_budget_range
        if self.global_step < self.full_budget_steps:
            budgets = torch.ones(batch["input_ids"].shape[0], device=batch["input_ids"].device)
        logits, labels = self(batch, budgets)
        loss = self._loss(logits, labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=labels.shape[0])
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/skipped_records", float(self._skipped), reduce_fx="sum", sync_dist=True)
        self._skipped = 0

    # --- generation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        batch: dict[str, Any],
        budget: float | torch.Tensor,
        max_new_tokens: list[int] | None = None,
        at_least_minimum: bool = False,
        longest: int | None = None,
    ) -> dict[str, Any]:
        """Answers for the batch's prompts under a budget (one for all, or one per example [B]), with what it cost.
        ``max_new_tokens``: each example's own cap on its answer (at most the module's ``max_new_tokens``), e.g.
        a client's ``max_tokens``; a row at its cap is done, and the batch stops once every row is (on every
        rank: sharded layers decode in step, so the loop's length, ``longest`` or the module's, is the same on all
        of them); ``greedy_generate`` refuses a cap outside [1, that length]. ``at_least_minimum``: a budget below
        its example's smallest admissible one (counted after token selection) runs at that minimum instead of
        failing; ``budgets`` in the output are the ones that ran. ``longest``: the answer's most tokens for this
        batch in place of the module's ``max_new_tokens`` (a benchmark's own length; the same on every rank)."""
        prompt_ids = batch["prompt_ids"]
        batch_size = prompt_ids.shape[0]
        planner = self.planner
        inputs = planner.embed(prompt_ids, batch["prompt_attention_mask"], batch.get("pixel_values"))
        budgets = torch.as_tensor(budget, dtype=torch.float32, device=prompt_ids.device).expand(batch_size)
        prepared = planner.prepare(inputs, budgets, at_least_minimum=at_least_minimum)
        tokenizer = self.backbone.tokenizer
        stop = self.backbone.chat_template.stop_token_ids(tokenizer)
        result = greedy_generate(
            self.engine, prepared.embeds, prepared.attention_mask, longest or self.max_new_tokens, stop, prepared.plan,
            prepared.latency_positions, self.token_selector, prepared.image_mask, self.decode, max_new_tokens,
        )  # fmt: skip
        answers = [decode_answer(tokenizer, tokens) for tokens in result.tokens]
        units = [float("nan")] * batch_size  # per example
        if result.plan is not None and result.plan.units is not None:
            units = result.plan.units.float().tolist()
        spent = planner.flops(result.plan, prepared.inputs)  # [B]
        fractions = (spent / planner.full_flops(prepared.inputs)).tolist()  # 1.0 without a plan
        # against the plain full model on the same request, every image token in (the paper's TFLOPs column):
        # the prompt's tokens, plus the latency token where there is one
        added = prepared.inputs.seq_lens - inputs.attention_mask.sum(-1)  # [B]
        plain = [planner.cost.full_flops(int(n)) for n in batch["prompt_attention_mask"].sum(-1) + added]
        plain_fractions = [used / whole for used, whole in zip(spent.tolist(), plain, strict=True)]
        return {
            "answers": answers,
            "answer_tokens": [len(tokens) for tokens in result.tokens],  # == its cap: cut off, no stop token
            "flops_fraction": sum(fractions) / batch_size,  # the batch's mean
            "units": sum(units) / batch_size,
            "flops_fractions": fractions,
            "flops_vs_plain": sum(plain_fractions) / batch_size,  # the batch's mean
            "flops_vs_plain_fractions": plain_fractions,
            "units_per_example": units,
            "budgets": prepared.inputs.budgets.float().tolist() if self.scheduler is not None else [1.0] * batch_size,
            "prefill_seconds": result.prefill_seconds,
            "decode_seconds_per_token": result.decode_seconds / max(result.decode_steps, 1),
            "plan": result.plan,
        }

    # --- validation / test -----------------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Any], batch_idx: int) -> dict[float, dict[str, Any]] | None:
        """The batch answered at every budget: budget -> :meth:`generate`'s output. Scoring them and the
        sweep's statistics are :class:`~adaptive_mllm.callbacks.SweepReport`'s, listed in the recipes.

        The first batch is answered once untimed before: the first call pays one-time costs (allocator,
        kernel selection, caches) that would otherwise land on the first budget's prefill and decode times."""
        if batch["input_ids"].shape[0] == 0:
            return None
        longest = self._answer_length_of(batch, batch_idx)
        if batch_idx == 0:
            self.generate(batch, self.eval_budgets[0], longest=longest)  # warm-up, not reported
        return {budget: self.generate(batch, budget, longest=longest) for budget in self.eval_budgets}

    def _answer_length_of(self, batch: dict[str, Any], batch_idx: int) -> int | None:
        """The answer length the batch's data asks for (a benchmark's, as its reference script generates), said once
        where it is not the module's ``max_new_tokens``; None: the module's."""
        longest = batch.get("max_new_tokens")
        if longest is not None and longest != self.max_new_tokens and batch_idx == 0:
            rank_zero_info(
                f"answers of up to {longest} tokens, the benchmark's length (its reference script's), not the model's "
                f"max_new_tokens {self.max_new_tokens}: --data.init_args.max_new_tokens sets it"
            )
        return longest

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[float, dict[str, Any]] | None:
        batch_size = batch["input_ids"].shape[0]
        if batch_size == 0:
            return None
        budgets = None
        if self.scheduler is not None:
            seq_lens = self.planner.seq_lens(batch["attention_mask"])
            budgets = torch.full((batch_size,), max(self.eval_budgets), device=self.device)
            budgets = torch.maximum(budgets, torch.tensor([self.scheduler.cost.min_budget(int(n)) for n in seq_lens], device=self.device))
        logits, labels = self(batch, budgets)
        self.log("val/loss", self._loss(logits, labels), prog_bar=True, batch_size=batch_size, sync_dist=True)
        return self._eval_step(batch, batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[float, dict[str, Any]] | None:
        return self._eval_step(batch, batch_idx)

    # --- predict ---------------------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        if batch["prompt_ids"].shape[0] == 0:  # every record of the batch was skipped as bad
            return []
        out = self.generate(batch, self.budget, longest=self._answer_length_of(batch, batch_idx))
        questions = batch.get("questions", [None] * len(out["answers"]))
        columns = zip(batch["ids"], questions, out["answers"], out["units_per_example"], out["flops_fractions"], strict=True)
        return [
            {"id": id_, "question": question, "answer": answer, "budget": self.budget, "units": units, "flops_fraction": flops}
            for id_, question, answer, units, flops in columns
        ]

    # --- optimisation ----------------------------------------------------------------------------------
    def _check_optimizer_groups_of(self, checkpoint: dict[str, Any]) -> None:
        """A fit resumed with other optimiser groups than it saved is named with the likely cause, where torch
        says only that the numbers of groups differ."""
        saved = checkpoint.get("optimizer_states") or []
        trainer = self._trainer
        if not saved or "param_groups" not in saved[0] or trainer is None or trainer.state.fn != "fit":
            return
        names = [group.get("name", "rest") for group in saved[0]["param_groups"]]
        ours = [group.get("name", "rest") for group in self.parameter_groups()]
        if len(names) != len(ours):
            raise ValueError(
                f"the checkpoint's optimizer has {len(names)} parameter groups ({', '.join(names)}), this run's has "
                f"{len(ours)} ({', '.join(ours)}): resume with the weight_decay, part_learning_rates and freeze it was "
                "trained with (with weight_decay above 0, biases and norms have groups of their own since 2026-12-07: "
                "a run saved before cannot resume its optimizer state; `adaptive-mllm export` its weights and "
                "fine-tune from the export)"
            )

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.learning_rate, weight_decay=self.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        if total == 1 and self.warmup_ratio > 0:
            rank_zero_warn(
                "a fit of one optimizer step trains at learning rate 0: the warm-up starts from 0, as the HF Trainer's "
                "(fast_dev_run=true checks that the pipeline runs, not that weights move; --model.warmup_ratio=0 for that)"
            )
        if 0 < total <= self.full_budget_steps and self.scheduler is not None and not isinstance(self.scheduler, FullScheduler):
            rank_zero_warn(
                f"model.full_budget_steps={self.full_budget_steps} >= this fit's {total} optimizer steps: every step trains "
                "at budget 1.0, so the scheduler never learns budgets and the smaller budgets are scored untrained; lower "
                f"--model.full_budget_steps (e.g. to {total // 2}) or train longer"
            )
        schedule = partial(learning_rate_factor, total=total, warmup_ratio=self.warmup_ratio, restart=self.full_budget_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimiser's groups: one per part of ``part_learning_rates`` (with its rate), one for the rest;
        frozen parameters in none. With weight decay, each splits off its biases and norm weights without it
        (``"<name>/no_decay"``), the HF Trainer's rule that LLaVA and the release train with."""
        parts = self.backbone.parameter_groups()
        named = {part: parts[part] for part in self.part_learning_rates}
        claimed = {id(p) for parameters in named.values() for p in parameters}
        groups = [{"params": [p for p in self.parameters() if p.requires_grad and id(p) not in claimed]}]
        for part, parameters in named.items():
            groups.append({"params": [p for p in parameters if p.requires_grad], "lr": self.part_learning_rates[part], "name": part})
        if self.weight_decay:
            exempt = no_decay_parameters(self)
            split = []
            for group in groups:
                name = group.get("name", "rest")
                split.append({**group, "params": [p for p in group["params"] if id(p) not in exempt]})
                split.append({**group, "params": [p for p in group["params"] if id(p) in exempt], "weight_decay": 0.0,
                              "name": f"{name}/no_decay"})  # fmt: skip
            groups = split
        return [group for group in groups if group["params"]]


def no_decay_parameters(module: torch.nn.Module) -> set[int]:
    """ids of the parameters the HF Trainer (transformers 4.37, LLaVA's and the release's) gives no weight decay:
    every bias and the weights of LayerNorm / RMSNorm layers."""
    exempt = set()
    for child in module.modules():
        norm = isinstance(child, torch.nn.LayerNorm) or type(child).__name__.endswith(("RMSNorm", "LayerNorm"))
        for name, parameter in child.named_parameters(recurse=False):
            if norm or "bias" in name:
                exempt.add(id(parameter))
    return exempt


def learning_rate_factor(step: int, total: int, warmup_ratio: float, restart: int = 0) -> float:
    """The peak learning rate's factor at ``step``: the HF Trainer's cosine schedule (LLaVA's and the release's):
    a linear warm-up from 0 over ``ceil(total * warmup_ratio)`` steps, then cosine decay to 0, over ``total``
    steps; with ``restart`` (``full_budget_steps``) the steps from there on are a cycle of their own, as a
    fine-tune of a trained model would be (otherwise the budgets would be learned at the tail of the decay)."""
    if 0 < restart < total:
        if step >= restart:
            return learning_rate_factor(step - restart, total - restart, warmup_ratio)
        total = restart
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _check_backbone_of(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], wrong: list[str], tokenizer: str) -> None:
    """A checkpoint of another model size or vocabulary is named as such, with the likely cause, instead of
    torch's list of every tensor that does not fit."""
    if not wrong:
        return
    key = next((k for k in wrong if k.endswith("embed_tokens.weight")), wrong[0])
    message = f"the checkpoint's {key} has shape {list(state[key].shape)}, the recipe's model {list(own[key].shape)}"
    if all(is_adapter_parameter(k) for k in wrong):
        rank = min(state[key].shape)  # lora_A [r, in], lora_B [out, r]
        raise ValueError(f"{message}: its LoRA adapters have rank {rank}, the recipe's model.lora.rank is {min(own[key].shape)}")
    if key.endswith("embed_tokens.weight") and state[key].shape[0] != own[key].shape[0]:
        message += (
            f": a vocabulary of {state[key].shape[0]} tokens, {tokenizer} has {own[key].shape[0]}. It is not the "
            "tokenizer the model was trained with (a generated dataset's tokenizer changes with its sizes and seed: "
            "pass the data arguments of the training run)"
        )
    else:
        message += f" ({len(wrong)} tensors differ): the recipe builds another model size than the one trained"
    raise ValueError(message)


def _check_backbone_keys_of(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """A checkpoint with more or fewer layers (or other parts) than the recipe's model is named as such, instead
    of torch's list of every unexpected key."""
    missing = sorted(key for key in own if key not in state and not key.startswith("scheduler."))
    unexpected = sorted(key for key in state if key not in own and not key.startswith("scheduler."))
    if any(is_adapter_parameter(key) for key in unexpected):
        raise ValueError(
            f"the checkpoint was trained with LoRA adapters ({next(k for k in unexpected if is_adapter_parameter(k))}), the "
            "recipe's model has none: give model.lora as the training run did (the run's config.yaml records it)"
        )
    if any(is_adapter_parameter(key) for key in missing):
        raise ValueError(
            "the recipe adds LoRA adapters (model.lora) and the checkpoint has none: it was trained without them. "
            "Drop model.lora to evaluate or resume it; to train adapters on it, export it and give the export as "
            "the backbone's checkpoint"
        )
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint's model has other parts than the recipe's: {len(missing)} of the recipe's tensors missing "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}), {len(unexpected)} not in the recipe's model "
            f"({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''}): the recipe builds another model size "
            "(layers) than the one trained"
        )


def _trained_scheduler(checkpoint: dict[str, Any]) -> Scheduler | None:
    """A fresh copy of the learned scheduler a checkpoint was trained with, from the spec
    :meth:`AdaptiveMLLM.on_save_checkpoint` recorded; None for a baseline, or a checkpoint that records none
    (written before 2026-12-06)."""
    spec = checkpoint.get(SCHEDULER_SPEC_KEY)
    if not spec:
        return None
    trained = Scheduler.from_spec(spec)
    return None if isinstance(trained, BaselineScheduler) else trained


def decode_answer(tokenizer: PreTrainedTokenizerBase, tokens: list[int]) -> str:
    """The answer's text as the references' transformers 4 decoded it: a tokenizer whose config asks for
    ``clean_up_tokenization_spaces`` (Phi-2's, so Mipha's) loses the space before punctuation and contractions
    ("It 's a dog ." -> "It's a dog."); transformers 5 ignores that setting for BPE tokenizers."""
    text = tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        text = tokenizer.clean_up_tokenization(text)
    return text.strip()
