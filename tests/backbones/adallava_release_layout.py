"""Tiny checkpoints in the AdaLLaVA release's layout (``ada_llava_llama``, as its ``save_pretrained`` writes them),
with weights that are a function of each key: the fixture generator (the release's own code, transformers
4.37.2) and the tests (this project) build the same model without storing it.

The fixture ``adallava_release_outputs.json`` (``make_adallava_release_outputs.py``) holds the release's config.json,
its weight keys and shapes, the vision tower's config, and the release's answers.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

FIXTURE_FILE = Path(__file__).with_name("adallava_release_outputs.json")
TOWER_IN_CHECKPOINT = "model.vision_tower.vision_tower."  # LLaVA saves the tower it holds; read from the tower dir


def keyed_tensor(key: str, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """N(0, 0.2) drawn from a generator seeded by the key's CRC-32: the same tensor in any process and version."""
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randn(tuple(shape), generator=generator) * 0.2


def keyed_state(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {key: keyed_tensor(key, shape) for key, shape in shapes.items()}


def write_tower(directory: Path, fixture: dict) -> Path:
    """The CLIP vision tower directory (config, preprocessor config, keyed weights) that the checkpoint names."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(fixture["tower_config"]))
    (directory / "preprocessor_config.json").write_text(json.dumps(fixture["tower_preprocessor"]))
    save_file(keyed_state(fixture["tower_shapes"]), directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level stand-in for the release's Llama tokenizer, as many tokens as the checkpoint has rows (no
    ``<image>``: the loader adds it): <unk> 0, <s> 1, </s> 2, as Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", *(f"w{index}" for index in range(3, vocab_size))]
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(directory)


def write_checkpoint(directory: Path, fixture: dict, variant: str, tower: Path) -> Path:
    """The release checkpoint of ``variant`` ("L" or "H"): its config.json (naming ``tower``), keyed weights and a
    tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {**fixture["variants"][variant]["config"], "mm_vision_tower": str(tower)}
    (directory / "config.json").write_text(json.dumps(config))
    write_tokenizer(directory, config["vocab_size"])
    shapes = fixture["variants"][variant]["shapes"]
    save_file(keyed_state(shapes), directory / "model.safetensors", metadata={"format": "pt"})
    return directory
