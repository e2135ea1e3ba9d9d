"""Sharded training that scales: every LLM decoder layer its own FSDP2 unit.

Why FSDP2 (``torch.distributed.fsdp.fully_shard``) through a :class:`ModelParallelStrategy` and not
FSDP1's ``FSDPStrategy`` with an auto-wrap policy: FSDP1 gathers a unit only when that unit's ``forward``
runs, and the engine never calls a layer's ``forward`` (it calls the projections, norms and MLP itself,
to gate, slice and skip them). FSDP2 keeps each parameter a DTensor and lets any method of a unit be a
forward (``register_fsdp_forward_method``), so :func:`shard_module` gives each decoder layer a method
``run_in_unit(step, hidden)`` and the engine runs its per-layer step through it (:func:`through_unit`):
the unit is all-gathered before the step, freed after it, gathered again for its backward, and its
gradients reduce-scattered, exactly as if ``forward`` had run. Unsharded, :func:`through_unit` is a plain
call, so the engine has one code path.

The rest of the model (vision tower, projector, embeddings, final norm, LM head, scheduler) is the root
unit, gathered by the module's ``forward`` and by ``generate`` (registered as a forward method), which
are the only ways training, validation, test and predict enter the model.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from types import MethodType
from typing import Any, TypeVar

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

UNIT_METHOD = "run_in_unit"
ROOT_METHODS = ("generate",)  # entered outside ``forward`` (validation / test / predict)
T = TypeVar("T")


def through_unit(layer: nn.Module, step: Callable[..., T], *tensors: torch.Tensor) -> T:
    """``step(*tensors)`` with ``layer``'s sharded parameters gathered around it, when the layer is an FSDP
    unit; a plain call otherwise. ``tensors`` are the step's differentiable inputs (the hidden states):
    FSDP hooks its post-backward (gradient reduce-scatter) on them and its pre-backward (re-gather) on the
    result, so pass everything else through the closure."""
    unit = getattr(layer, UNIT_METHOD, None)
    if unit is not None:
        return unit(step, *tensors)
    return step(*tensors)


def on_every_rank(flag: bool, layers: nn.ModuleList, device: torch.device) -> bool:
    """``flag`` and-ed over the ranks when ``layers`` are FSDP units, so that
    every rank runs as many forwards, hence as many gathers (a rank that stopped decoding early would leave
    the others waiting in a collective); ``flag`` itself otherwise."""
    first = layers[0] if len(layers) else None
    if first is None or not is_sharded(first):
        return flag
    import torch.distributed as dist

    if not dist.is_initialized():
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _run_step(self: nn.Module, step: Callable[..., T], *tensors: torch.Tensor) -> T:
    return step(*tensors)


def is_sharded(module: nn.Module) -> bool:
    """Whether :func:`shard_module` (or any ``fully_shard``) has made ``module`` an FSDP unit."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_module(module: nn.Module, mesh: Any, reshard_after_forward: bool = True, param_dtype: str | None = None) -> None:
    """Each of ``module.backbone.decoder_layers`` its own FSDP2 unit over ``mesh`` (1-D: the data-parallel
    ranks), then ``module`` itself the root unit holding every other parameter. Idempotent.

    ``reshard_after_forward`` frees a layer's gathered parameters after its forward (gathered again in
    backward): memory of one layer at a time, one more all-gather per layer. ``param_dtype`` (e.g.
    ``"bfloat16"``): units are gathered in that dtype (half the traffic and memory of fp32 master weights;
    gradients reduced in fp32), as ZeRO-3's bf16 mode does; None: in the parameters' own dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if is_sharded(module):
        return
    policy = MixedPrecisionPolicy()
    if param_dtype is not None:
        policy = MixedPrecisionPolicy(param_dtype=getattr(torch, param_dtype), reduce_dtype=torch.float32)
    options = {"mesh": mesh, "reshard_after_forward": reshard_after_forward, "mp_policy": policy}
    for layer in module.backbone.decoder_layers:
        fully_shard(layer, **options)
        setattr(layer, UNIT_METHOD, MethodType(_run_step, layer))
        register_fsdp_forward_method(layer, UNIT_METHOD)
    fully_shard(module, **options)
    for name in ROOT_METHODS:
        if hasattr(module, name):
            register_fsdp_forward_method(module, name)


def local_numel(parameters: Any) -> int:
    """Elements of ``parameters`` this rank holds: a DTensor's local shard, a plain tensor in full."""
    total = 0
    for parameter in parameters:
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        total += local.numel()
    return total


class LayerShardedStrategy(ModelParallelStrategy):
    """Fully sharded data parallel, one FSDP2 unit per decoder layer (:func:`shard_module`), applied after the
    module's ``configure_model`` built the weights. Every process is a data-parallel rank (no tensor
    parallelism): a 1-D mesh over all devices of all nodes.

    Args:
        save_distributed_checkpoint: True: each rank writes its shards (a checkpoint directory, fast, and
            loadable on another number of processes); False: one consolidated ``.ckpt`` file from rank 0.
        reshard_after_forward: free each layer's gathered parameters after its forward (ZeRO-3 memory).
        param_dtype: gather units in this dtype (``bfloat16`` with ``precision: bf16-mixed``: bf16 compute
            and all-gathers over fp32 master weights, gradients reduced in fp32); None: the parameters' dtype.
        process_group_backend: None = NCCL on GPUs, gloo on CPUs.
        timeout: collective timeout.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        reshard_after_forward: bool = True,
        param_dtype: str | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.reshard_after_forward = reshard_after_forward
        self.param_dtype = param_dtype

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        shard_module(self.lightning_module, self.device_mesh["data_parallel"], self.reshard_after_forward, self.param_dtype)
        super().setup(trainer)
