"""Shared fixtures of the data tests: one small generated shapes-VQA set, its tokenizer, an
InputProcessor built from them, and a writer of hand-made LLaVA JSON files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from adaptive_mllm.backbones.base import InputProcessor
from adaptive_mllm.backbones.templates import plain_chat
from adaptive_mllm.data.shapes import generate_shapes_vqa

SIZES = {"num_train": 40, "num_val": 12, "num_test": 12}
NUM_IMAGE_TOKENS = 16


def preprocess(image: Image.Image) -> torch.Tensor:
    """Resize to 64, to a [3, 64, 64] float tensor in [-1, 1]."""
    array = np.asarray(image.convert("RGB").resize((64, 64)), dtype=np.float32) / 255.0  # [H, W, 3]
    return (torch.from_numpy(array).permute(2, 0, 1) - 0.5) / 0.5


@pytest.fixture(scope="session")
def shapes_sizes() -> dict[str, int]:
    """Sizes of the ``shapes_dir`` set, as keyword arguments of generate_shapes_vqa."""
    return dict(SIZES)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40 / 12 / 12 shapes-VQA set, seed 0; read-only for the tests (copy before changing it)."""
    return generate_shapes_vqa(tmp_path_factory.mktemp("shapes") / "shapes-vqa", seed=0, **SIZES)


@pytest.fixture(scope="session")
def shapes_tokenizer(shapes_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(shapes_dir / "tokenizer")


@pytest.fixture(scope="session")
def make_processor(shapes_tokenizer: PreTrainedTokenizerBase) -> Callable[..., InputProcessor]:
    """InputProcessor factory over the shapes tokenizer and plain_chat(); max_length and template adjustable."""

    def make(max_length: int = 64, chat_template=None) -> InputProcessor:
        return InputProcessor(
            tokenizer=shapes_tokenizer,
            chat_template=chat_template if chat_template is not None else plain_chat(),
            image_token_id=shapes_tokenizer.convert_tokens_to_ids("<image>"),
            num_image_tokens=NUM_IMAGE_TOKENS,
            max_length=max_length,
            preprocess_image=preprocess,
        )

    return make


@pytest.fixture
def processor(make_processor: Callable[..., InputProcessor]) -> InputProcessor:
    return make_processor()


@pytest.fixture
def write_llava(tmp_path: Path) -> Callable[..., Path]:
    """Write records as ``{tmp}/{name}`` with an image folder ``{tmp}/images`` holding ``good.png``
    (a valid 64x64 image); returns the JSON path."""
    image_folder = tmp_path / "images"
    image_folder.mkdir(exist_ok=True)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image_folder / "good.png")

    def write(records: list, name: str = "data.json") -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(records))
        return path

    return write


def record(
    record_id: str,
    question: str = "<image>\nWhat colour is the circle?",
    answer: str = "red",
    image: str | None = "good.png",
    **extra,
) -> dict:
    """A one-turn LLaVA record (``image=None`` leaves the field out)."""
    out = {
        "id": record_id,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
        **extra,
    }
    if image is not None:
        out["image"] = image
    return out


@pytest.fixture
def make_record() -> Callable[..., dict]:
    return record
