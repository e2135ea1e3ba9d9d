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

A token selector holds no trained weights; it is not exported and is chosen again at load time. A model trained
with LoRA (``model.lora``) is exported with its adapters merged into the LLM's weights.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from adaptive_mllm.backbones.base import Backbone
from adaptive_mllm.backbones.llava import LlavaBackbone
from adaptive_mllm.backbones.local import CheckpointError
from adaptive_mllm.backbones.mipha import MiphaBackbone
from adaptive_mllm.checkpoints import read_checkpoint
from adaptive_mllm.lora import merged_adapters
from adaptive_mllm.module import AdaptiveMLLM
from adaptive_mllm.recipe import UNUSED_TRAINER, parse_recipe
from adaptive_mllm.schedulers.base import Scheduler, portable_spec
from adaptive_mllm.specs import class_path, instantiate
from adaptive_mllm.token_selection.base import TokenSelector

BACKBONE_JSON = "backbone.json"
SCHEDULER_JSON = "scheduler.json"
SCHEDULER_WEIGHTS = "scheduler.safetensors"
MODULE_JSON = "module.json"
MODULE_SETTINGS = ("budget", "max_new_tokens", "decode")  # AdaptiveMLLM arguments that shape its answers
INCOMPLETE = "INCOMPLETE"  # present while an export writes: a killed export is refused, never read as a model
# what the export's marker says: `test` and `predict` mark a run directory they write with a file of the same name
INCOMPLETE_TEXT = "an export is writing this directory; if this file stays, it stopped before the end: export again with --overwrite\n"


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
    if not module.backbone.is_built:
        module.configure_model()
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = _file_states(out_dir)
    # first in, last out: files of an earlier export half overwritten, or a scheduler not yet written, never load
    (out_dir / INCOMPLETE).write_text(INCOMPLETE_TEXT)
    _write_files(module, out_dir, scheduler_spec)
    (out_dir / INCOMPLETE).unlink()
    kept = sorted(name for name, state in _file_states(out_dir).items() if earlier.get(name) == state)
    if kept:
        warnings.warn(
            f"export {out_dir}: {len(kept)} files were there before and are not this export's: {', '.join(kept)}. "
            "Delete them if an earlier export left them: a loader may read them (e.g. another backbone's chat template)",
            stacklevel=2,
        )
    return out_dir


def _file_states(directory: Path) -> dict[str, tuple[int, int, int]]:
    """Each file under ``directory`` (relative name) with what rewriting it changes: inode, size, mtime in ns."""
    states = {}
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            stat = path.stat()
            states[path.relative_to(directory).as_posix()] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return states


def _write_files(module: AdaptiveMLLM, out_dir: Path, scheduler_spec: dict[str, Any] | None) -> None:
    with merged_adapters(module.backbone.decoder_layers):  # LoRA: plain weights, the backbone's own layout
        module.backbone.save_pretrained(out_dir)
    _write_json(out_dir / MODULE_JSON, {name: getattr(module, name) for name in MODULE_SETTINGS})
    _write_json(out_dir / BACKBONE_JSON, {"class_path": class_path(module.backbone), "init_args": _backbone_args(module.backbone)})
    scheduler = module.scheduler
    if scheduler is None:
        for name in (SCHEDULER_JSON, SCHEDULER_WEIGHTS):
            (out_dir / name).unlink(missing_ok=True)
        _readable_as_other_files(out_dir)
        return
    spec = portable_spec(scheduler_spec) if scheduler_spec is not None else _scheduler_spec(scheduler)
    _write_json(out_dir / SCHEDULER_JSON, spec)
    state = {key: tensor.detach().cpu().contiguous() for key, tensor in scheduler.state_dict().items()}
    save_file(state, out_dir / SCHEDULER_WEIGHTS, metadata={"format": "pt"})
    _readable_as_other_files(out_dir)


def _readable_as_other_files(out_dir: Path) -> None:
    """safetensors writes its files readable by their owner alone (0600), every other file of an export is 0666 less
    the umask (0644 under the usual 022): an export meant to be shared would be unreadable to the others."""
    mode = (out_dir / "config.json").stat().st_mode & 0o777  # written by open(): 0666 less the umask (reading the
    for path in out_dir.glob("*.safetensors"):  # umask itself would set it to 0 a moment for every thread)
        path.chmod(mode)


def load_exported(
    directory: str | Path, token_selector: TokenSelector | None = None, **module_kwargs: Any
) -> AdaptiveMLLM:
    """An exported directory back as an AdaptiveMLLM in eval mode (weights loaded, strictly), answering with
    the exported settings (``module.json``) unless ``module_kwargs`` say otherwise. A missing or broken file
    is a CheckpointError (or FileNotFoundError) naming it and what is wrong."""
    directory = _export_dir(directory)
    backbone_spec, scheduler_spec, settings = _read_export(directory)
    weights = _read_weights(directory / SCHEDULER_WEIGHTS) if scheduler_spec is not None else {}  # before the backbone's
    scheduler: Scheduler | None = None if scheduler_spec is None else _build(scheduler_spec, directory / SCHEDULER_JSON)
    backbone: Backbone = _build(backbone_spec, directory / BACKBONE_JSON)
    try:
        module = AdaptiveMLLM(backbone, scheduler, token_selector, **{**settings, **module_kwargs})
    except ValueError as error:  # a scheduler or budget that does not fit this backbone
        given = " with the arguments given" if module_kwargs or token_selector is not None else ""
        raise CheckpointError(
            f"cannot build the model that {directory / SCHEDULER_JSON} and {directory / MODULE_JSON} describe{given}: {error}"
        ) from error
    module.configure_model()
    if scheduler is not None:
        _check_weights_fit(scheduler, {key: list(tensor.shape) for key, tensor in weights.items()}, directory)
        scheduler.load_state_dict(weights, strict=True)
    return module.eval()


def check_export_dir(directory: str | Path) -> Path:
    """``directory`` if it is an export whose files read and fit together, else an error naming the file and
    what is wrong. Cheap: JSON files parsed, the backbone constructed from its config.json (no weights read),
    the scheduler sized for it and compared with the shapes in scheduler.safetensors' header."""
    directory = _export_dir(directory)
    backbone_spec, scheduler_spec, _ = _read_export(directory)
    if scheduler_spec is None:
        return directory
    shapes = _weight_shapes(directory / SCHEDULER_WEIGHTS)
    backbone = _build(backbone_spec, directory / BACKBONE_JSON)
    scheduler = _build(scheduler_spec, directory / SCHEDULER_JSON)
    try:
        with torch.random.fork_rng(devices=[]):  # sizing initialises its parameters: the caller's random state is kept
            scheduler.configure(backbone.shape)
    except ValueError as error:  # num_prefix_layers beyond the backbone's layers, say
        raise CheckpointError(f"{directory / SCHEDULER_JSON}: does not fit the backbone in {directory} ({error})") from error
    _check_weights_fit(scheduler, shapes, directory)
    return directory


def _export_dir(directory: str | Path) -> Path:
    """``directory`` if it exists and holds backbone.json, else a FileNotFoundError (NotADirectoryError) naming it."""
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"export directory {directory} does not exist (write one with `adaptive-mllm export`)")
    if not directory.is_dir():
        raise NotADirectoryError(f"export directory {directory} is a file, not a directory")
    if _marker_text(directory / INCOMPLETE).startswith(INCOMPLETE_TEXT.split(";")[0]):
        raise CheckpointError(
            f"{directory} is an export that did not finish ({INCOMPLETE} is there): its files may mix two models or lack "
            "the scheduler; export again into it with --overwrite"
        )
    backbone_file = directory / BACKBONE_JSON
    if not backbone_file.is_file():
        if (directory / "config.yaml").is_file() or (directory / "checkpoints").is_dir():
            raise FileNotFoundError(
                f"{directory} is a run directory (config.yaml, checkpoints/), not an export: pass its recipe and checkpoint "
                f"(--config <recipe> --ckpt_path {directory / 'checkpoints' / 'last.ckpt'}), or `adaptive-mllm export` it first"
            )
        raise FileNotFoundError(f"{backbone_file} is missing: {directory} is not a directory written by export_checkpoint")
    return directory


def _marker_text(path: Path) -> str:
    """The beginning of ``path`` ("" if it is no file or cannot be read as text)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read(200)
    except OSError:
        return ""


# --- helpers ---------------------------------------------------------------------------------------------
SPEC_FORM = '{"class_path": "package.module.Class", "init_args": {...}}'
SETTING_TYPES: dict[str, tuple[type, ...]] = {"budget": (int, float), "max_new_tokens": (int,), "decode": (str,)}


def _read_export(directory: Path) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
    """(backbone spec, its checkpoint this directory; scheduler spec or None; module settings), each file checked:
    JSON, form, classes, arguments."""
    backbone_spec = _read_spec(directory / BACKBONE_JSON, Backbone, {"checkpoint": str(directory)})
    scheduler_spec = None
    weights = directory / SCHEDULER_WEIGHTS
    if (directory / SCHEDULER_JSON).is_file():
        scheduler_spec = _read_spec(directory / SCHEDULER_JSON, Scheduler)
        if not weights.is_file():
            raise CheckpointError(f"{weights} is missing: {SCHEDULER_JSON} names a scheduler, but its weights are not there")
    elif weights.exists():  # export writes both or neither: read alone, the model would answer without its scheduler
        raise CheckpointError(
            f"{weights} is there but {directory / SCHEDULER_JSON} is missing: an incomplete copy of an export (the "
            f"scheduler's weights without its class and arguments); copy {SCHEDULER_JSON} too, or export again"
        )
    settings = _read_settings(directory / MODULE_JSON) if (directory / MODULE_JSON).is_file() else {}
    return backbone_spec, scheduler_spec, settings


def _read_json(path: Path) -> dict[str, Any]:
    text = path.read_bytes()
    if not text.strip():
        raise CheckpointError(f"{path}: the file is empty, not valid JSON; export wrote a JSON object there")
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: holds a {type(value).__name__}, not a JSON object")
    return value


def _read_spec(path: Path, base: type, extra_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """A spec file whose class is a ``base`` that takes its ``init_args`` plus ``extra_args`` (checked, not
    built), with ``extra_args`` added."""
    spec = _read_json(path)
    for key, kind in [("class_path", str), ("init_args", dict)]:
        if key not in spec:
            raise CheckpointError(f"{path}: key {key!r} is missing; expected {SPEC_FORM}")
        if not isinstance(spec[key], kind):
            raise CheckpointError(f"{path}: {key!r} is a {type(spec[key]).__name__}, not a {kind.__name__}; expected {SPEC_FORM}")
    name = spec["class_path"]
    module_name, _, class_name = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name) if module_name else None
    except ImportError as error:
        raise CheckpointError(f"{path}: class_path {name!r} cannot be imported ({error})") from None
    except AttributeError:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise CheckpointError(f"{path}: class_path {name!r} is not a {base.__name__} class this installation knows")
    spec = {**spec, "init_args": {**spec["init_args"], **(extra_args or {})}}
    try:
        inspect.signature(cls).bind(**spec["init_args"])
    except TypeError as error:
        raise CheckpointError(f"{path}: init_args do not fit {cls.__name__} ({error})") from None
    return spec


def _read_settings(path: Path) -> dict[str, Any]:
    settings = _read_json(path)
    unknown = sorted(set(settings) - set(MODULE_SETTINGS))
    if unknown:
        raise CheckpointError(f"{path}: unknown settings {unknown}; known: {', '.join(MODULE_SETTINGS)}")
    for name, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, SETTING_TYPES[name]):
            raise CheckpointError(f"{path}: {name} {value!r} is a {type(value).__name__}, not a {SETTING_TYPES[name][0].__name__}")
    return settings


def _build(spec: dict[str, Any], path: Path) -> Any:
    """The object a checked spec names; its constructor's refusal named with the file (a backbone's own
    CheckpointError about its weights directory already names its file)."""
    try:
        return instantiate(spec)
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: {spec['class_path']} refuses its init_args ({error})") from error


def _read_weights(path: Path) -> dict[str, Any]:
    """The scheduler's tensors."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise _incomplete(path, error) from None


def _weight_shapes(path: Path) -> dict[str, list[int]]:
    """The shapes of the scheduler's tensors, read from the file's header alone."""
    try:
        with safe_open(path, framework="pt") as weights:
            return {key: list(weights.get_slice(key).get_shape()) for key in weights.keys()}
    except (SafetensorError, OSError) as error:
        raise _incomplete(path, error) from None


def _incomplete(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path} ({path.stat().st_size} bytes): not a complete safetensors file ({error}); it is truncated "
        "(a copy stopped early) or not what export wrote"
    )


def _check_weights_fit(scheduler: Scheduler, shapes: dict[str, list[int]], directory: Path) -> None:
    """The weights' names and shapes against the sized scheduler's: torch's strict load would list every
    mismatch over many lines, naming no file."""
    expected = {key: list(tensor.shape) for key, tensor in scheduler.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [f"{key} {shapes[key]} where it needs {expected[key]}"
             for key in sorted(set(expected) & set(shapes)) if shapes[key] != expected[key]]
    problems = [
        f"{what} {', '.join(items[:3])}{f' (and {len(items) - 3} more)' if len(items) > 3 else ''}"
        for what, items in [("lacks", missing), ("has unexpected", unexpected), ("has", wrong)] if items
    ]
    if problems:
        raise CheckpointError(
            f"{directory / SCHEDULER_WEIGHTS}: its weights do not fit the {type(scheduler).__name__} that "
            f"{directory / SCHEDULER_JSON} names: it {'; '.join(problems)} (were they written for another scheduler?)"
        )


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
        return scheduler.spec()
    except ValueError as error:
        raise ValueError(
            f"{error}; pass scheduler_spec={{'class_path': ..., 'init_args': ...}} (the CLI export does this from the recipe)"
        ) from None


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
