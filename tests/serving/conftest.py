"""What the serving tests share: a recipe file for the tiny model (AdaLLaVA-L, random weights)."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.conftest import tiny_config


def write_tiny_recipe(path: Path, tokenizer_dir: Path, max_new_tokens: int | None = 4) -> Path:
    """``path`` holding a recipe of the tiny LLaVA with one always-run layer, seeded weights."""
    init_args = {"config": tiny_config(), "tokenizer": str(tokenizer_dir), "template": "plain_chat", "seed": 0}
    model = {
        "backbone": {"class_path": "adaptive_mllm.backbones.LlavaBackbone", "init_args": init_args},
        "scheduler": {"class_path": "adaptive_mllm.schedulers.LayerScheduler", "init_args": {"num_prefix_layers": 1}},
    }
    if max_new_tokens is not None:
        model["max_new_tokens"] = max_new_tokens
    path.write_text(yaml.safe_dump({"model": model}))
    return path
