"""Project checkpoints: a trained AdaLLaVA model as a plain directory, shareable and usable without Lightning.

Layout written by :func:`export_checkpoint` (the backbone's own layout at the top: for LLaVA the
transformers layout, which transformers and ``LlavaBackbone(checkpoint=dir)`` read as any LLaVA
checkpoint; for Mipha its release layout, read by ``MiphaBackbone(checkpoint=dir)``)::

    out_dir/
      config.json, model*.safetensors, tokenizer files, preprocessor_config.json   backbone (transformers LLaVA)
      processor_config.json, chat_template.jinja    what LlavaProcessor.from_pretrained reads (LLaVA)
      backbone.json           {"class_path", "init_args"}: how to construct the backbone on this directory
      scheduler.json          {"class_path", "init_args"}: the scheduler's constructor arguments
      scheduler.safetensors   its weights: plan head and latency encoder
      module.json             how the model answers: default budget, max_new_tokens, decode mode

:func:`load_exported` reads it back into an :class:`AdaptiveMLLM`. From the command line::

    adaptive-mllm export --config recipes/llava7b.yaml --ckpt_path runs/llava7b/checkpoints/last.ckpt \\
        --out_dir exports/adallava-l-7b

A token selector holds no trained weights; it is not exported and is chosen again at load time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from adaptive_mllm.backbones.base import Backbone
from adaptive_mllm.backbones.llava import LlavaBackbone
from adaptive_mllm.backbones.mipha import MiphaBackbone
from adaptive_mllm.checkpoints import read_checkpoint
from adaptive_mllm.module import AdaptiveMLLM
from adaptive_mllm.recipe import UNUSED_TRAINER, parse_recipe
from adaptive_mllm.schedulers.base import Scheduler
from adaptive_mllm.specs import class_path, instantiate, spec_of
from adaptive_mllm.token_selection.base import TokenSelector

BACKBONE_JSON = "backbone.json"
SCHEDULER_JSON = "scheduler.json"
SCHEDULER_WEIGHTS = "scheduler.safetensors"
MODULE_JSON = "module.json"
MODULE_SETTINGS = ("budget", "max_new_tokens", "decode")  # AdaptiveMLLM arguments that shape its answers


def export_checkpoint(
    source: AdaptiveMLLM | str | Path,
    out_dir: str | Path,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a trained model as a plain directory (layout in the module docstring).

    Args:
        source: the module itself, or a Lightning ``.ckpt`` path (then ``config`` is needed).
        out_dir: the directory to write (created; one that holds files is refused unless ``overwrite``).
        config: the recipe the checkpoint was trained with; it says which backbone and scheduler to build.
        overrides: extra CLI flags applied to the recipe, e.g. ``["--model.backbone.init_args.checkpoint=..."]``.
        overwrite: write over the files of an existing directory (an earlier export).
    """
    if isinstance(source, AdaptiveMLLM):
        return export_module(source, out_dir, overwrite=overwrite)
    if config is None:
        raise ValueError("exporting a Lightning checkpoint needs `config`: the recipe it was trained with")
    _refuse_a_used_directory(Path(out_dir), overwrite)  # before the checkpoint is read
    module, scheduler_spec = module_from_checkpoint(source, config, overrides or [])
    return export_module(module, out_dir, scheduler_spec, overwrite)


def module_from_checkpoint(
    ckpt_path: str | Path, config: str | Path, overrides: list[str]
) -> tuple[AdaptiveMLLM, dict[str, Any] | None]:
    """The recipe's module with the checkpoint's weights, and the recipe's scheduler spec (class_path, init_args)."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.exists():
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist")
    cli = parse_recipe(["--config", str(config), *overrides, *UNUSED_TRAINER])
    module = cli.model
    module.configure_model()
    checkpoint = read_checkpoint(ckpt_path)  # a .ckpt file or a sharded checkpoint directory
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    spec = cli.config.as_dict()["model"].get("scheduler")
    return module, spec


def export_module(
    module: AdaptiveMLLM, out_dir: str | Path, scheduler_spec: dict[str, Any] | None = None, overwrite: bool = False
) -> Path:
    """Write ``module`` to ``out_dir``; ``scheduler_spec`` defaults to the scheduler's own constructor arguments.
    A directory that holds files is refused unless ``overwrite``."""
    out_dir = Path(out_dir)
    _refuse_a_used_directory(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not module.backbone.is_built:
        module.configure_model()
    module.backbone.save_pretrained(out_dir)
    _write_json(out_dir / MODULE_JSON, {name: getattr(module, name) for name in MODULE_SETTINGS})
    _write_json(out_dir / BACKBONE_JSON, {"class_path": class_path(module.backbone), "init_args": _backbone_args(module.backbone)})
    scheduler = module.scheduler
    if scheduler is None:
        for name in (SCHEDULER_JSON, SCHEDULER_WEIGHTS):
            (out_dir / name).unlink(missing_ok=True)
        return out_dir
    spec = _without_release_checkpoint(scheduler_spec) if scheduler_spec is not None else _scheduler_spec(scheduler)
    _write_json(out_dir / SCHEDULER_JSON, spec)
    state = {key: tensor.detach().cpu().contiguous() for key, tensor in scheduler.state_dict().items()}
    save_file(state, out_dir / SCHEDULER_WEIGHTS, metadata={"format": "pt"})
    return out_dir


def load_exported(
    directory: str | Path, token_selector: TokenSelector | None = None, **module_kwargs: Any
) -> AdaptiveMLLM:
    """An exported directory back as an AdaptiveMLLM in eval mode (weights loaded, strictly), answering with
    the exported settings (``module.json``) unless ``module_kwargs`` say otherwise."""
    directory = Path(directory)
    backbone_file = directory / BACKBONE_JSON
    if not backbone_file.is_file():
        raise FileNotFoundError(f"{backbone_file} is missing: {directory} is not a directory written by export_checkpoint")
    backbone_spec = json.loads(backbone_file.read_text())
    backbone: Backbone = instantiate({**backbone_spec, "init_args": {**backbone_spec["init_args"], "checkpoint": str(directory)}})
    scheduler: Scheduler | None = None
    if (directory / SCHEDULER_JSON).is_file():
        spec = json.loads((directory / SCHEDULER_JSON).read_text())
        scheduler = instantiate(spec)
    settings = json.loads((directory / MODULE_JSON).read_text()) if (directory / MODULE_JSON).is_file() else {}
    module = AdaptiveMLLM(backbone, scheduler, token_selector, **{**settings, **module_kwargs})
    module.configure_model()
    if scheduler is not None:
        scheduler.load_state_dict(load_file(directory / SCHEDULER_WEIGHTS), strict=True)
    return module.eval()


# --- helpers ---------------------------------------------------------------------------------------------
def _refuse_a_used_directory(out_dir: Path, overwrite: bool) -> None:
    """An earlier export (or anything else) in ``out_dir`` is not written over unasked."""
    if overwrite or not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise NotADirectoryError(f"--out_dir {out_dir} is a file, not a directory")
    held = sorted(entry.name for entry in out_dir.iterdir())
    if held:
        raise FileExistsError(
            f"--out_dir {out_dir} already holds {len(held)} entries ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}); "
            "choose a new directory, or pass --overwrite to write over them"
        )


def _backbone_args(backbone: Backbone) -> dict[str, Any]:
    """What a backbone needs besides its weights to behave as it did (template, lengths, preprocessing)."""
    if not isinstance(backbone, (LlavaBackbone, MiphaBackbone)):
        raise NotImplementedError(f"export does not know {type(backbone).__name__}'s construction arguments yet")
    return {
        "template": backbone.template_name,
        "max_length": backbone.max_length,
        "pad_to_square": backbone.pad_to_square,
        "dtype": str(backbone.torch_dtype).removeprefix("torch."),
        "attn_implementation": backbone.attn_implementation,
    }


def _scheduler_spec(scheduler: Scheduler) -> dict[str, Any]:
    try:
        spec = spec_of(scheduler)
    except ValueError as error:
        raise ValueError(
            f"{error}; pass scheduler_spec={{'class_path': ..., 'init_args': ...}} (the CLI export does this from the recipe)"
        ) from None
    return _without_release_checkpoint(spec)


def _without_release_checkpoint(spec: dict[str, Any]) -> dict[str, Any]:
    """The weights an AdaLLaVA release checkpoint gave the scheduler are in scheduler.safetensors: an export must
    not need that directory again."""
    init_args = {key: value for key, value in spec.get("init_args", {}).items() if key != "release_checkpoint"}
    return {**spec, "init_args": init_args}


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def main(argv: list[str]) -> Path:
    """``adaptive-mllm export --config RECIPE --ckpt_path CKPT --out_dir DIR [recipe overrides]``."""
    parser = argparse.ArgumentParser(prog="adaptive-mllm export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the recipe the checkpoint was trained with")
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint to export: a .ckpt file or a sharded checkpoint directory")
    parser.add_argument("--out_dir", required=True, help="directory to write (a new or empty one)")
    parser.add_argument("--overwrite", action="store_true", help="write over the files of an existing --out_dir")
    own, rest = parser.parse_known_args(argv)
    out_dir = export_checkpoint(own.ckpt_path, own.out_dir, config=own.config, overrides=rest, overwrite=own.overwrite)
    print(f"exported {own.ckpt_path} to {out_dir}")
    return out_dir
