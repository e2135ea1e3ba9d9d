"""The AdaLLaVA release's trained schedulers, read into LayerScheduler / HeadScheduler.

The release (ChulanZhang/SmartVLM; its checkpoints zhuoyanxu/ada-llava-L-v1.5-7b and the H one) saves one
directory: LLaVA's layout (read by ``LlavaBackbone``) plus its scheduler, ``SimpleScheduler_L`` or ``_H``, under
``scheduler.*``: ``mlp_head`` (the plan logits: one per layer after the prefix for L; per layer the attention
heads' then the MLP groups' for H, this project's order) and ``scheduler_up_proj.net`` (LayerNorm, Linear,
GELU, Linear: this project's LatencyEncoder). config.json says which (``scheduler_type``), with
``num_prefix_layers`` and ``scheduler_rank``, which the scheduler built from the recipe must equal.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from adaptive_mllm.backbones.llava_release import (
    ADALLAVA_ARCHITECTURE,
    ADALLAVA_MODEL_TYPE,
    ADALLAVA_SCHEDULER_PREFIX,
    ReleaseLayoutError,
    is_adallava_release,
    read_json_object,
    read_weights,
    weight_files,
)

LAYOUT = (
    f"an AdaLLaVA release checkpoint directory (as zhuoyanxu/ada-llava-L-v1.5-7b): config.json with architectures "
    f"['{ADALLAVA_ARCHITECTURE}'], model_type '{ADALLAVA_MODEL_TYPE}', scheduler_type, num_prefix_layers; weights "
    "scheduler.mlp_head.* and scheduler.scheduler_up_proj.net.{0,1,3}.* beside LLaVA's"
)
# release key (after "scheduler.") -> this project's scheduler parameter
_KEYS = {
    "mlp_head.weight": "head.weight",
    "mlp_head.bias": "head.bias",
    "scheduler_up_proj.net.0.weight": "latency_encoder.norm.weight",
    "scheduler_up_proj.net.0.bias": "latency_encoder.norm.bias",
    "scheduler_up_proj.net.1.weight": "latency_encoder.up.weight",
    "scheduler_up_proj.net.1.bias": "latency_encoder.up.bias",
    "scheduler_up_proj.net.3.weight": "latency_encoder.down.weight",
    "scheduler_up_proj.net.3.bias": "latency_encoder.down.bias",
}


def load_release_scheduler(scheduler: torch.nn.Module, checkpoint: str | Path) -> None:
    """Copy the release's trained scheduler weights into ``scheduler`` (a configured Scheduler: this module is
    imported by schedulers.base, so not typed as one; its ``release_type`` "L" or "H"); a ReleaseLayoutError naming the file and key when the directory does not hold them or holds another
    scheduler than the recipe builds."""
    kind = scheduler.release_type
    if kind is None:
        raise ValueError(f"release_checkpoint: {type(scheduler).__name__} has no counterpart in the AdaLLaVA release")
    directory = Path(checkpoint)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ReleaseLayoutError(f"release_checkpoint {directory}: {config_file} is missing; expected {LAYOUT}")
    raw = read_json_object(config_file)
    if not is_adallava_release(raw):
        raise ReleaseLayoutError(
            f"{config_file}: architectures {raw.get('architectures')} / model_type {raw.get('model_type')!r} is not "
            f"the AdaLLaVA release's; expected {LAYOUT}"
        )
    expected = {"scheduler_type": kind, "num_prefix_layers": scheduler.num_prefix_layers}
    if kind == "H":
        expected["scheduler_rank"] = scheduler.rank  # type: ignore[attr-defined]
    for key, value in expected.items():
        if raw.get(key) != value:
            raise ReleaseLayoutError(
                f"{config_file}: {key} is {raw.get(key)!r}, the recipe's {type(scheduler).__name__} has {value!r}: "
                "build the scheduler the checkpoint was trained as"
            )
    if raw.get("token_selecting", "none") != "none":
        warnings.warn(
            f"{config_file}: the release ran with token_selecting {raw['token_selecting']!r}; set the recipe's "
            "model.token_selector to the same (PruMerge / PruMergePlus) to evaluate it as trained",
            UserWarning,
            stacklevel=2,
        )
    parameters = dict(scheduler.named_parameters())
    if any(parameter.is_meta for parameter in parameters.values()):
        return  # a memory plan on the meta device: the shapes are all that is needed
    found: dict[str, torch.Tensor] = {}
    for path in weight_files(directory, LAYOUT):
        for key, tensor in _scheduler_tensors(path).items():
            target = _KEYS.get(key[len(ADALLAVA_SCHEDULER_PREFIX):])
            if target is None:
                raise ReleaseLayoutError(f"{path}: {key} is not a weight of the release's scheduler; expected {LAYOUT}")
            if tuple(tensor.shape) != tuple(parameters[target].shape):
                raise ReleaseLayoutError(
                    f"{path}: {key} has shape {tuple(tensor.shape)}, the recipe's {type(scheduler).__name__} "
                    f"{target} has {tuple(parameters[target].shape)}"
                )
            found[target] = tensor
    missing = [key for key, target in _KEYS.items() if target not in found]
    if missing:
        raise ReleaseLayoutError(f"{directory}: scheduler weights {missing} are missing; expected {LAYOUT}")
    with torch.no_grad():
        for target, tensor in found.items():
            parameters[target].copy_(tensor.to(parameters[target].dtype))


def _scheduler_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The ``scheduler.*`` tensors of one weight file; from safetensors only those are read."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(ADALLAVA_SCHEDULER_PREFIX)}
        except Exception as error:  # safetensors' header errors name no file
            raise ReleaseLayoutError(f"{path}: cannot read its weights ({type(error).__name__}: {error})") from error
    return {key: tensor for key, tensor in read_weights(path).items() if key.startswith(ADALLAVA_SCHEDULER_PREFIX)}
