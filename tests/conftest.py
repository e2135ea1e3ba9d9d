"""Shared fixtures: tiny LLaVA backbones built from configs (no download, ever)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

# pytest-xdist's workers (pyproject's addopts) share the cores: each worker's torch takes its share, not all of them
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))

@pytest.fixture(autouse=True)
def _no_wandb_run_outlives_its_test():
    """A fit run in-process leaves W&B's run open, and Lightning's offline WandbLogger sets WANDB_MODE=dryrun for
    the whole process: the next test's logger would log into that run, in the earlier test's directory."""
    mode = os.environ.get("WANDB_MODE")
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
    if mode is None:
        os.environ.pop("WANDB_MODE", None)
    else:
        os.environ["WANDB_MODE"] = mode


TINY_TEXT = [
    "USER : What colour is the red circle ? ASSISTANT : blue",
    "Is the green square left of the yellow triangle ? yes no",
    "How many shapes are there ? one two three four purple orange shape",
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from adaptive_mllm.data.tokenizer import train_word_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    train_word_tokenizer(TINY_TEXT, directory)
    return directory


def tiny_config(num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 4, hidden: int = 64) -> dict:
    return {
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16),
        "text": dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=256,
        ),
        "vision_feature_layer": -2,
    }


def make_backbone(tokenizer_dir: Path, seed: int = 0, **sizes):
    from adaptive_mllm.backbones import LlavaBackbone

    backbone = LlavaBackbone(config=tiny_config(**sizes), tokenizer=str(tokenizer_dir), template="plain_chat", seed=seed)
    backbone.build()
    backbone.eval()
    return backbone


@pytest.fixture
def backbone(tokenizer_dir: Path):
    """MHA: 4 layers, 4 heads."""
    return make_backbone(tokenizer_dir)


@pytest.fixture
def gqa_backbone(tokenizer_dir: Path):
    """Grouped-query attention: 4 layers, 4 query heads sharing 2 key/value heads."""
    return make_backbone(tokenizer_dir, num_kv_heads=2)


def random_images(count: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, size, size, generator=generator)
