"""Writes tiny checkpoints in Mipha's release layout (zhumj34/Mipha-3B), from transformers reference modules
built here (PhiForCausalLM, SiglipVisionModel, an nn.Sequential projector), with the key names written out
by hand as Mipha's ``MiphaPhiForCausalLM`` names them (``model.*`` / ``lm_head.*`` of PhiForCausalLM,
``model.vision_tower.vision_model.*`` of its SiglipVisionTower, ``model.mm_projector.{0,2}.*``).

Like Phi-2 (51,200 rows for a 50,295-token tokenizer), the checkpoint's vocabulary has spare rows, so the
``<image>`` token the loader adds needs no new row.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (
    PhiConfig,
    PhiForCausalLM,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from tests.backbones.release_layout import write_shards

EOS = "<|endoftext|>"
WORDS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions. USER: ASSISTANT: How many shapes are there ? What colour is the red "
    "circle ? Is the green square left of the yellow triangle ? blue two yes three purple no orange shape one"
)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=16)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=2048)
SPARE_ROWS = 6


def write_phi_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """A word-level stand-in for Phi-2's tokenizer: <|endoftext|> is BOS, EOS and UNK; no <image>, no pad."""
    vocab = {EOS: 0}
    for word in re.findall(r"\w+|[^\w\s]+", WORDS):
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    fast.save_pretrained(directory)
    return fast


@dataclass
class Reference:
    """The modules a Mipha checkpoint holds, built independently of the backbone."""

    llm: PhiForCausalLM
    tower: SiglipVisionModel
    projector: nn.Sequential
    vision_feature_layer: int = -2

    def inputs_embeds(self, ids: torch.Tensor, pixel_values: torch.Tensor, image_token_id: int) -> torch.Tensor:
        """Text embeddings with the image placeholders replaced by projected SigLIP patch features."""
        embeds = self.llm.model.embed_tokens(ids)  # [B, T, H]
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states[self.vision_feature_layer]  # [B, N, C]
        features = self.projector(hidden)  # [B, N, H]: every patch, SigLIP has no CLS
        mask = ids == image_token_id
        return embeds.masked_scatter(mask[..., None].expand_as(embeds), features)

    def logits(self, ids: torch.Tensor, pixel_values: torch.Tensor, image_token_id: int) -> torch.Tensor:
        return self.llm(inputs_embeds=self.inputs_embeds(ids, pixel_values, image_token_id)).logits


def reference_modules(vocab_rows: int, seed: int = 0, num_layers: int = 2, num_heads: int = 4) -> Reference:
    torch.manual_seed(seed)
    text = PhiConfig(**{**TEXT, "num_hidden_layers": num_layers, "num_attention_heads": num_heads},
                     vocab_size=vocab_rows, partial_rotary_factor=0.5, bos_token_id=0, eos_token_id=0)
    llm = PhiForCausalLM(text).eval()
    tower = SiglipVisionModel(SiglipVisionConfig(**VISION)).eval()
    projector = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64)).eval()
    return Reference(llm, tower, projector)


def release_state_dict(reference: Reference) -> dict[str, torch.Tensor]:
    """The weights under MiphaPhiForCausalLM's names."""
    state: dict[str, torch.Tensor] = {}
    for key, tensor in reference.llm.state_dict().items():
        assert key.startswith(("model.embed_tokens.", "model.layers.", "model.final_layernorm.", "lm_head.")), key
        state[key] = tensor.clone()
    for key, tensor in reference.tower.state_dict().items():
        # MiphaPhiModel.vision_tower is a SiglipVisionTower holding a SiglipVisionTransformer as .vision_model
        state["model.vision_tower.vision_model." + key.removeprefix("vision_model.")] = tensor.clone()
    for index in (0, 2):
        linear = reference.projector[index]
        state[f"model.mm_projector.{index}.weight"] = linear.weight.detach().clone()
        state[f"model.mm_projector.{index}.bias"] = linear.bias.detach().clone()
    # the names Mipha's code gives them, spelled out
    for name in ("model.layers.0.self_attn.dense.bias", "model.layers.0.mlp.fc1.weight", "model.layers.1.mlp.fc2.bias",
                 "model.layers.0.input_layernorm.weight", "model.final_layernorm.bias", "lm_head.bias",
                 "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
                 "model.vision_tower.vision_model.post_layernorm.weight", "model.mm_projector.2.weight"):
        assert name in state, name
    return state


def release_config(vocab_rows: int, num_layers: int = 2, num_heads: int = 4) -> dict:
    """config.json as Mipha's MiphaPhiConfig.save_pretrained writes it."""
    return {
        "_name_or_path": "./ckpts/checkpoints-siglip/phi_2/MiphaPhi2-v0-3b-pretrain",
        "architectures": ["MiphaPhiForCausalLM"],
        "model_type": "mipha_phi",
        **TEXT,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": None,
        "vocab_size": vocab_rows,
        "hidden_act": "gelu_new",
        "layer_norm_eps": 1e-5,
        "partial_rotary_factor": 0.5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "qk_layernorm": False,
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.0,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "image_aspect_ratio": "pad",
        "tune_mm_mlp_adapter": True,
        "vision_config": {
            "vision_tower": {**VISION, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "num_channels": 3,
                             "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
                             "vision_model_name_or_path": "google/siglip-so400m-patch14-384",
                             "model_type": "mipha_vision_model"},
            "mm_projector": {"mm_projector_type": "mlp2x_gelu", "mm_hidden_size": VISION["hidden_size"],
                             "hidden_size": TEXT["hidden_size"], "model_type": "mipha_projector"},
        },
    }


def write_mipha(root: Path, fmt: str = "safetensors", seed: int = 0, num_layers: int = 2, num_heads: int = 4):
    """(checkpoint dir, reference modules, tokenizer length without <image>)."""
    directory = root / "Mipha-tiny"
    directory.mkdir(parents=True)
    tokenizer = write_phi_tokenizer(directory)
    rows = len(tokenizer) + SPARE_ROWS
    reference = reference_modules(rows, seed, num_layers, num_heads)
    (directory / "config.json").write_text(json.dumps(release_config(rows, num_layers, num_heads)))
    state = release_state_dict(reference)
    if fmt == "single":
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    else:
        write_shards(directory, state, fmt)
    return directory, reference, len(tokenizer)
