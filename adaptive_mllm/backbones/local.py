"""What every backbone loaded from a local directory (or built from sizes) shares: argument checks,
the lazily loaded tokenizer, the chat template and the padded image preprocessing."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from adaptive_mllm.backbones.base import Backbone
from adaptive_mllm.backbones.pil_image_processors import pil_pixels
from adaptive_mllm.backbones.sentencepiece_tokenizer import order_merges_by_score
from adaptive_mllm.backbones.templates import ChatTemplate

IMAGE_TOKEN = "<image>"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # fast, sentencepiece, byte-level BPE


class CheckpointError(ValueError):
    """A checkpoint directory that is missing or not in the layout this backbone reads."""


# A config value as a flag gives it: tried in this order, so "96" is an int and "silu" a string.
ConfigValue = int | float | bool | str | list | dict | None


@dataclass
class ModelSizes:
    """Sizes of a freshly initialised model (the ``config`` path of a backbone).

    A dataclass rather than a plain dict so that one flag changes one size and keeps the rest:
    ``--model.backbone.init_args.config.text.hidden_size=96`` reaches ``text`` as the int 96 beside the
    recipe's other ``text`` keys (jsonargparse replaces a nested dict wholesale, with string values).

    Args:
        vision: the vision tower's transformers config kwargs (CLIPVisionConfig / SiglipVisionConfig).
        text: the LLM's transformers config kwargs (LlamaConfig / PhiConfig).
        vision_feature_layer: the tower layer fed to the projector, or a list of layers (concatenated).
        vision_feature_select_strategy: ``default`` (drop CLS, LLaVA-1.5) or ``full`` (LLaVA only).
        projector_hidden_act: the projector MLP's activation (LLaVA only).
    """

    vision: dict[str, ConfigValue] = field(default_factory=dict)
    text: dict[str, ConfigValue] = field(default_factory=dict)
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"

    @classmethod
    def of(cls, config: ModelSizes | dict[str, Any]) -> ModelSizes:
        """``config`` as ModelSizes; a dict (Python callers) is checked for unknown keys."""
        if isinstance(config, ModelSizes):
            return config
        known = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"backbone config: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**config)


def _not_the_unknown_model_type_notice(record: logging.LogRecord) -> bool:
    """transformers 5 reads config.json to pick a tokenizer class and warns that a release's model type
    (llava_llama, ada_llava_llama, mipha_phi) is not one of its own: true, and nothing to do with the tokenizer."""
    return "to instantiate a model of type ``" not in record.getMessage()


class LocalBackbone(Backbone):
    """Base of :class:`LlavaBackbone` and :class:`MiphaBackbone`; subclasses set ``_max_length`` once
    their config is read, and ``model`` in ``build``."""

    templates: dict[str, Callable[[], ChatTemplate]] = {}

    def __init__(
        self,
        checkpoint: str | None,
        config: ModelSizes | dict | None,
        tokenizer: str | None,
        template: str,
        pad_to_square: bool,
        seed: int,
        dtype: str,
        attn_implementation: str,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if checkpoint is not None and config is not None:  # a recipe's sizes stay when a flag adds the checkpoint
            raise ValueError(
                f"{name} got both `checkpoint` ({checkpoint}) and `config` (sizes); it takes one: to load the checkpoint "
                "with its own sizes, also pass --model.backbone.init_args.config=null (the recipe sets `config`)"
            )
        if checkpoint is None and config is None:
            raise ValueError(f"{name} needs exactly one of `checkpoint` (a local directory) or `config` (sizes)")
        if template not in self.templates:
            raise ValueError(f"unknown chat template {template!r}; known: {sorted(self.templates)}")
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.tokenizer_dir = Path(tokenizer) if tokenizer is not None else self.checkpoint
        if self.tokenizer_dir is None:
            raise ValueError(f"{name}(config=...) needs `tokenizer`: a local tokenizer directory")
        self.template_name = template
        self.pad_to_square = pad_to_square
        self.seed = seed
        self.torch_dtype = getattr(torch, dtype)
        self.attn_implementation = attn_implementation
        self._max_length = 0
        self.model: torch.nn.Module | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._image_processor = None

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        directory = self.tokenizer_dir
        if not directory.is_dir():
            raise CheckpointError(f"tokenizer directory {directory} does not exist")
        found = sorted(path.name for path in directory.iterdir())
        listed = f"{', '.join(found[:12])}{', ...' if len(found) > 12 else ''}" or "nothing"
        if not any((directory / name).is_file() for name in TOKENIZER_FILES):
            raise CheckpointError(f"{directory} holds no tokenizer: none of {', '.join(TOKENIZER_FILES)} (it holds {listed})")
        config_logger = logging.getLogger("transformers.configuration_utils")
        config_logger.addFilter(_not_the_unknown_model_type_notice)
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except (ValueError, OSError, KeyError) as error:  # transformers' messages name no directory
            raise CheckpointError(_unreadable_tokenizer(directory, listed, error)) from error
        finally:
            config_logger.removeFilter(_not_the_unknown_model_type_notice)
        if (directory / "tokenizer.model").is_file():  # SentencePiece's merge order (transformers 5 loses it)
            tokenizer = order_merges_by_score(tokenizer, directory / "tokenizer.model")
        return tokenizer

    @property
    def is_built(self) -> bool:
        return self.model is not None

    @property
    def chat_template(self) -> ChatTemplate:
        return self.templates[self.template_name]()

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @property
    def max_length(self) -> int:
        return self._max_length

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        return preprocess_padded(self.image_processor, image, self.pad_to_square)


def _unreadable_tokenizer(directory: Path, listed: str, error: Exception) -> str:
    """Why transformers built no tokenizer from ``directory``, naming it and its files. Its own message for a
    byte-level BPE vocabulary without the model's tokenizer_config.json (GPT-2 / Phi: vocab.json + merges.txt) names no
    directory and says to install sentencepiece or tiktoken, which would not help: the tokenizer class is unknown."""
    where = f"tokenizer directory {directory}: transformers cannot build a tokenizer from it"
    if (directory / "vocab.json").is_file() and not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return (
            f"{where}: it holds {listed}, a vocabulary without tokenizer_config.json or tokenizer.json, so the tokenizer "
            "class is unknown; copy the model's tokenizer_config.json (or tokenizer.json) into it"
        )
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"{where} ({reason:.200}); it holds {listed}; expected a model's tokenizer files: tokenizer.json (or "
        "tokenizer.model, or vocab.json + merges.txt) and its tokenizer_config.json"
    )


def building_on_meta() -> bool:
    """Whether modules created now land on the meta device (``with torch.device("meta")``): shapes without
    storage, as ``adaptive-mllm memory`` builds a recipe's model; then no weight file is read."""
    return torch.empty(0).device.type == "meta"


def pad_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """LLaVA-1.5's ``expand2square``: centre the image on a square canvas of the mean colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def read_config_json(directory: Path, expected: str) -> tuple[Path, dict]:
    """``directory/config.json`` and its content, or a CheckpointError naming what is missing and the
    layout ``expected``."""
    config_file = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing: expected {expected}")
    try:
        return config_file, json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file} is not valid JSON: {error}") from error


def has_image_processor(directory: Path) -> bool:
    """An image processor config in ``directory``: ``preprocessor_config.json`` (transformers 4, hub vision
    towers) or ``processor_config.json`` with the image processor nested in it (transformers 5)."""
    if (directory / "preprocessor_config.json").is_file():
        return True
    processor_file = directory / "processor_config.json"
    if not processor_file.is_file():
        return False
    try:
        return "image_processor" in json.loads(processor_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{processor_file} is not valid JSON: {error}") from error


def preprocess_padded(processor: Any, image: Image.Image, pad: bool) -> torch.Tensor:
    """[3, H, W]: the image in RGB, padded to a square with the processor's mean colour when ``pad`` (as
    LLaVA-1.5 and Mipha do), then the processor's resize and normalisation."""
    image = image.convert("RGB")
    if pad:
        image = pad_to_square(image, tuple(int(255 * m) for m in processor.image_mean))
    pixels = pil_pixels(processor, image)
    return pixels if pixels is not None else processor(images=image, return_tensors="pt")["pixel_values"][0]
