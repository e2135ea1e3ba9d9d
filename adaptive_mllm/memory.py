"""`adaptive-mllm memory`: what each device needs for a training run, from the recipe alone, so devices can be
chosen before they are rented.

The recipe's model is built on the meta device (shapes, no storage; no weight file is read, only the
checkpoint's config and tokenizer), so parameter counts, which parts train and the layer sizes are the
recipe's own. Per device, for the recipe's strategy over ``devices x num_nodes`` processes:

- parameters, gradients (trainable only) and AdamW's two moments, divided by the processes when the
  strategy shards them (LayerShardedStrategy, FSDP, DeepSpeed ZeRO-3), whole otherwise (DDP);
- gathered: the unsharded copies a sharded step holds at once (the root unit, i.e. everything outside the
  decoder layers, plus two decoder layers: the running one and the next, prefetched), with the gradients
  of those units before their reduce-scatter;
- activations at the recipe's batch size and maximum length (one image per record), with and without
  activation checkpointing: what autograd keeps for backward, counted per token from the layer shapes
  (docs/distributed.md lists the terms), plus the logits and the loss's log-softmax.

Not counted: the CUDA context and allocator slack (about 1-3 GB per GPU), communication buffers, and
the data loader; docs/distributed.md compares the result with the AdaLLaVA release's 8-GPU setup.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from adaptive_mllm.backbones.local import CheckpointError
from adaptive_mllm.layers import adapter_for
from adaptive_mllm.lora import adapter_activation_elements
from adaptive_mllm.recipe import UNUSED_TRAINER, parse_recipe

GIB = 1024**3
# how a strategy holds the model: "layers" = sharded, gathered a unit at a time (ZeRO-3 gathers each module as it
# runs: the same 16 bytes per trained parameter over the ranks, bf16 copies + fp32 master + moments); "whole" = one unit
SHARDING = {"LayerShardedStrategy": "layers", "ModelParallelStrategy": "layers", "DeepSpeedStrategy (ZeRO-3)": "layers",
            "FSDPStrategy": "whole"}  # fmt: skip
COMPUTE_BYTES = {"bf16-mixed": 2, "bf16-true": 2, "16-mixed": 2, "16-true": 2, "bf16": 2, "16": 2}  # else 4


@dataclass
class MemoryPlan:
    """Bytes per device of one training run; ``total`` is what a device must hold at the step's peak."""

    devices: int
    strategy: str
    batch_size: int
    seq_len: int
    parameters: float
    gradients: float
    optimizer: float
    gathered: float
    activations_checkpointed: float
    activations_full: float
    checkpointing: bool
    recompute: float = 0.0  # of activations_checkpointed: one layer's activations, recomputed in backward

    def total(self, checkpointing: bool | None = None) -> float:
        checkpointing = self.checkpointing if checkpointing is None else checkpointing
        activations = self.activations_checkpointed if checkpointing else self.activations_full
        return self.parameters + self.gradients + self.optimizer + self.gathered + activations

    def table(self) -> str:
        rows = [
            ("parameters (this device's share)", self.parameters),
            ("gradients", self.gradients),
            ("optimizer state (AdamW, 2 moments)", self.optimizer),
            ("gathered units + their gradients", self.gathered),
            ("activations, checkpointed layers", self.activations_checkpointed),
            ("activations, no checkpointing", self.activations_full),
            ("total, with checkpointing", self.total(True)),
            ("total, without checkpointing", self.total(False)),
        ]
        head = (f"per device: {self.devices} processes, {self.strategy}, batch {self.batch_size} x {self.seq_len} tokens; "
                f"the recipe {'checkpoints' if self.checkpointing else 'does not checkpoint'} activations")  # fmt: skip
        width = max(len(name) for name, _ in rows)
        return "\n".join([head] + [f"  {name:<{width}}  {value / GIB:8.2f} GiB" for name, value in rows])


def layer_activation_elements(module: nn.Module) -> tuple[float, float]:
    """Elements autograd keeps per token for one scheduled (gated) decoder layer, and for the layer's input
    alone (what a checkpointed layer keeps). Per layer: two norms (input and normalised: 4H), attention
    (q and the output: 2H, k and v: 2 x kv width, the output's contiguous copy for o_proj: H), the layer gate's
    two products (2H), and the MLP: gated (Llama: gate and up outputs, the activation, their product: 4I) or
    plain (Phi: fc1's output and the activation: 2I). LoRA adds, per adapted projection, the adapter's rank-r
    middle and, with dropout, its dropped input (the projection's input width)."""
    shape = module.backbone.shape
    layer = module.backbone.decoder_layers[0]
    hidden, kv = shape.hidden_size, shape.num_kv_heads * shape.head_dim
    mlp = 4 if len(adapter_for(layer).mlp_inputs(layer)) > 1 else 2
    return 9 * hidden + 2 * kv + mlp * shape.intermediate_size + adapter_activation_elements(layer), hidden


def _vision_tower(module: nn.Module) -> nn.Module | None:
    """The vision encoder (a transformers CLIP / SigLIP vision model): the module whose config has patches."""
    for candidate in module.backbone.modules():
        config = getattr(candidate, "config", None)
        if config is not None and hasattr(config, "patch_size") and hasattr(config, "num_hidden_layers"):
            return candidate
    return None


def vision_activation_elements(module: nn.Module) -> float:
    """Elements kept per image: the tower's layers when it trains (two norms 4h, attention 5h, MLP 3i per
    patch and layer), and the projector's input and hidden activations."""
    tower = _vision_tower(module)
    if tower is None:
        return 0.0
    config = tower.config
    patches = (config.image_size // config.patch_size) ** 2 + 1
    hidden, inner = config.hidden_size, config.intermediate_size
    elements = patches * (hidden + 2 * module.backbone.shape.hidden_size)  # the projector
    if any(p.requires_grad for p in tower.parameters()):
        elements += patches * config.num_hidden_layers * (9 * hidden + 3 * inner)
    return elements


def activation_bytes(module: nn.Module, batch_size: int, seq_len: int, compute_bytes: int, checkpointing: bool) -> float:
    """What autograd keeps through one forward of the training step, at the peak of its backward."""
    layers = module.backbone.shape.num_layers
    per_layer, layer_input = layer_activation_elements(module)
    prefix = getattr(module.scheduler, "num_prefix_layers", layers) if module.scheduler is not None else layers
    ungated = 2 * module.backbone.shape.hidden_size  # prefix layers run without the gate's two products
    kept = layers * per_layer - prefix * ungated
    if checkpointing:  # each layer keeps its input; one layer's activations exist again while it is recomputed
        kept = layers * layer_input + per_layer
    vocab = module.backbone.lm_head.out_features
    head = 2 * module.backbone.shape.hidden_size * compute_bytes + vocab * compute_bytes + vocab * 4  # norm, logits, fp32 log-softmax
    return batch_size * (seq_len * (kept * compute_bytes + head) + vision_activation_elements(module) * compute_bytes)


def plan_memory(
    module: nn.Module,
    devices: int = 1,
    strategy: str = "auto",
    precision: str = "32-true",
    batch_size: int = 1,
    seq_len: int | None = None,
    gather_dtype_bytes: int | None = None,
) -> MemoryPlan:
    """The per-device memory of training ``module`` (built, on any device including meta) as the recipe says.
    ``seq_len`` None: the backbone's maximum length plus the latency token."""
    seq_len = seq_len or module.backbone.max_length + 1
    compute = COMPUTE_BYTES.get(str(precision), 4)
    params = list(module.parameters())
    trainable = [p for p in params if p.requires_grad]
    decoder = list(module.backbone.decoder_layers)
    sharding = SHARDING.get(strategy, "none")
    shards = devices if sharding != "none" else 1

    def size(tensors: list[torch.Tensor], element: int | None = None) -> float:
        return float(sum(t.numel() * (element or t.element_size()) for t in tensors))

    gathered = 0.0
    gather = gather_dtype_bytes or params[0].element_size()
    if sharding == "layers" and (shards > 1 or gather_dtype_bytes):  # a unit's gathered (or cast) copy
        layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in decoder)
        in_layers = {id(p) for layer in decoder for p in layer.parameters()}
        root = [p for p in params if id(p) not in in_layers]
        root_trainable = [p for p in root if p.requires_grad]
        gathered = size(root, gather) + 2 * layer_params * gather + size(root_trainable, 4) + layer_params * 4
    elif sharding == "whole" and shards > 1:
        gathered = size(params, gather) + size(trainable, 4)
    elif compute < params[0].element_size():  # unsharded mixed precision: autocast's cached low-precision copies
        gathered = size(params, compute)
    return MemoryPlan(
        devices=devices, strategy=strategy, batch_size=batch_size, seq_len=seq_len,
        parameters=size(params) / shards, gradients=size(trainable) / shards, optimizer=2 * size(trainable) / shards,
        gathered=gathered,
        activations_checkpointed=activation_bytes(module, batch_size, seq_len, compute, True),
        activations_full=activation_bytes(module, batch_size, seq_len, compute, False),
        checkpointing=bool(getattr(getattr(module, "engine", None), "activation_checkpointing", False)),
        recompute=batch_size * seq_len * layer_activation_elements(module)[0] * compute,
    )  # fmt: skip


def build_on_meta(args: list[str]) -> Any:
    """The recipe's CLI objects with the module built on the meta device (a generated tokenizer is prepared first)."""
    try:
        cli = parse_recipe([*args, *UNUSED_TRAINER])
    except CheckpointError as error:  # a plan is often made before the weights are downloaded
        raise CheckpointError(f"{error}; the memory plan reads only its config.json and tokenizer files, no weights") from error
    tokenizer_dir = getattr(cli.model.backbone, "tokenizer_dir", None)
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir() and hasattr(cli.datamodule, "prepare_data"):
        cli.datamodule.prepare_data()  # e.g. the tiny recipe's tokenizer, trained on its generated data
    with torch.device("meta"):
        cli.model.configure_model()
    return cli


def _trainer_settings(config: str) -> dict[str, Any]:
    trainer = (yaml.safe_load(Path(config).read_text()) or {}).get("trainer") or {}
    strategy = trainer.get("strategy", "auto")
    init_args = strategy.get("init_args", {}) if isinstance(strategy, dict) else {}
    name = strategy.get("class_path", "auto").rsplit(".", 1)[-1] if isinstance(strategy, dict) else str(strategy)
    stage = init_args.get("stage") or (init_args.get("config") or {}).get("zero_optimization", {}).get("stage", 2)
    if name == "DeepSpeedStrategy" and int(stage) == 3 or str(strategy).startswith("deepspeed_stage_3"):
        name = "DeepSpeedStrategy (ZeRO-3)"
    devices = trainer.get("devices", 1)
    return {"strategy": name, "devices": devices if isinstance(devices, int) else 1, "num_nodes": trainer.get("num_nodes", 1),
            "precision": str(trainer.get("precision", "32-true")), "param_dtype": init_args.get("param_dtype")}  # fmt: skip


def main(argv: list[str]) -> MemoryPlan:
    """``adaptive-mllm memory --config RECIPE [--trainer.devices N] [--trainer.num_nodes M] [--batch_size B]
    [--seq_len T] [recipe overrides]``: prints the per-device memory of training the recipe."""
    parser = argparse.ArgumentParser(prog="adaptive-mllm memory", description=main.__doc__)
    parser.add_argument("--config", required=True, help="the recipe")
    parser.add_argument("--trainer.devices", dest="devices", type=int, help="processes per node (default: the recipe's)")
    parser.add_argument("--trainer.num_nodes", dest="num_nodes", type=int, help="nodes (default: the recipe's)")
    parser.add_argument("--batch_size", type=int, help="records per device (default: the recipe's data batch_size)")
    parser.add_argument("--seq_len", type=int, help="tokens per record (default: the backbone's max_length + 1)")
    own, rest = parser.parse_known_args(argv)
    for flag, value in [("--trainer.devices", own.devices), ("--trainer.num_nodes", own.num_nodes),
                        ("--batch_size", own.batch_size), ("--seq_len", own.seq_len)]:
        if value is not None and value < 1:  # 0 read as "not given" planned for the recipe's value instead
            parser.error(f"{flag} must be >= 1, got {value}")
    settings = _trainer_settings(own.config)
    cli = build_on_meta(["--config", own.config, *rest])
    longest = cli.model.backbone.max_length + 1  # + the latency token: the default
    if own.seq_len is not None and own.seq_len > longest:  # a plan for a longer context than the recipe's is legitimate
        print(f"warning: --seq_len {own.seq_len} is longer than the recipe's records can be ({longest} tokens: the model's "
              f"maximum length {longest - 1} + the latency token); to train on it, raise model.backbone.init_args.max_length",
              file=sys.stderr)  # fmt: skip
    batch_size = own.batch_size or getattr(cli.datamodule, "batch_size", None) or 1
    devices = (own.devices or settings["devices"]) * (own.num_nodes or settings["num_nodes"])
    low_precision = settings["param_dtype"] in ("bfloat16", "float16")
    if settings["strategy"].startswith("DeepSpeed") and COMPUTE_BYTES.get(settings["precision"], 4) == 2:
        low_precision = True  # ZeRO-3's bf16 mode holds and gathers bf16 copies of the parameters
    gather = 2 if low_precision else None
    plan = plan_memory(cli.model, devices, settings["strategy"], settings["precision"], batch_size, own.seq_len, gather)
    print(plan.table())
    return plan
