"""The Backbone interface: what the rest of adaptive-mllm may assume about a multimodal LLM.

A backbone is vision encoder -> projector -> decoder-only LLM, plus the tokenizer, the image
preprocessing and the chat template that belong to it. Only the engine walks ``decoder_layers``;
schedulers and token selectors see nothing but ``shape``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from adaptive_mllm.lora import LoRA, add_adapters, is_adapter_parameter  # the LLM's LoRA training mode

if TYPE_CHECKING:
    from PIL import Image
    from transformers import PreTrainedTokenizerBase

    from adaptive_mllm.backbones.templates import ChatTemplate


@dataclass(frozen=True)
class DecoderShape:
    """Sizes of the LLM that schedulers and the cost model need."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    mlp_matrices: int = 3  # weight matrices per MLP neuron: 3 for a gated MLP (gate, up, down), 2 for fc1 / fc2

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class VisualFeatures:
    """What the vision tower hands on: patch features, and what token selectors may need."""

    features: torch.Tensor  # [B, N, C_vision], the features the projector consumes
    cls_attention: torch.Tensor | None = None  # [B, N], CLS -> patch attention (PruMerge)
    keys: torch.Tensor | None = None  # [B, N, C_vision], patch keys (PruMerge similarity)
    token_mask: torch.Tensor | None = None  # [B, N] bool, real tokens once a selector kept different counts; None = all


@dataclass
class InputProcessor:
    """Everything the data pipeline needs from a backbone, and nothing heavy (it is copied into
    DataLoader workers): tokenizer, chat template, image placeholders, length limit, image transform."""

    tokenizer: PreTrainedTokenizerBase
    chat_template: ChatTemplate
    image_token_id: int
    num_image_tokens: int
    max_length: int
    preprocess_image: Callable[[Image.Image], torch.Tensor]  # PIL image -> [3, H, W]

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad


class Backbone(nn.Module, ABC):
    """Vision tower + projector + LLM, built lazily by :meth:`build` so that weights load in
    ``configure_model`` (after ``prepare_data``), never in a constructor."""

    @abstractmethod
    def build(self) -> None:
        """Create (or load) the modules and the tokenizer; idempotent."""

    @property
    @abstractmethod
    def is_built(self) -> bool: ...

    # --- text side -----------------------------------------------------------------------------
    @property
    @abstractmethod
    def tokenizer(self) -> PreTrainedTokenizerBase: ...

    @property
    @abstractmethod
    def chat_template(self) -> ChatTemplate: ...

    @property
    @abstractmethod
    def image_token_id(self) -> int: ...

    @property
    @abstractmethod
    def num_image_tokens(self) -> int:
        """Placeholders per image in the prompt (before any token selection)."""

    @property
    @abstractmethod
    def max_length(self) -> int:
        """Longest sequence (prompt + answer, image placeholders included) the LLM accepts."""

    def input_processor(self) -> InputProcessor:
        return InputProcessor(
            tokenizer=self.tokenizer,
            chat_template=self.chat_template,
            image_token_id=self.image_token_id,
            num_image_tokens=self.num_image_tokens,
            max_length=self.max_length,
            preprocess_image=self.preprocess_image,
        )

    # --- image side ----------------------------------------------------------------------------
    @abstractmethod
    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> pixel tensor [3, H, W] as this vision tower expects it."""

    @abstractmethod
    def encode_images(self, pixel_values: torch.Tensor, with_attention: bool = False) -> VisualFeatures:
        """[B, 3, H, W] -> patch features for the projector; with ``with_attention`` also the CLS
        attention and the keys a token selector such as PruMerge reads."""

    @abstractmethod
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """[B, N, C_vision] -> [B, N, hidden]."""

    # --- LLM side (the engine's business) --------------------------------------------------------
    @property
    @abstractmethod
    def shape(self) -> DecoderShape: ...

    @abstractmethod
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T, hidden]."""

    @property
    @abstractmethod
    def decoder_layers(self) -> nn.ModuleList: ...

    @property
    @abstractmethod
    def final_norm(self) -> nn.Module: ...

    @property
    @abstractmethod
    def lm_head(self) -> nn.Module: ...

    @abstractmethod
    def rotary_embeddings(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [B, T, rotary_dim], for ``position_ids`` [B, T]."""

    # --- persistence -----------------------------------------------------------------------------
    @abstractmethod
    def save_pretrained(self, directory: str | Path) -> None:
        """Write weights (safetensors), configs, tokenizer and image processor in the HF layout."""

    # --- training modes --------------------------------------------------------------------------
    @abstractmethod
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named parts (vision_tower / projector / llm), so a recipe can freeze any of them and give each its
        own learning rate."""

    def add_lora(self, lora: LoRA) -> None:
        """Train the LLM through LoRA adapters on its decoder layers' projections (after ``build``; once)."""
        add_adapters(self.decoder_layers, lora)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The LoRA adapters' parameters: with ``add_lora``, the only ones of the LLM that train."""
        return [parameter for name, parameter in self.decoder_layers.named_parameters() if is_adapter_parameter(name)]

