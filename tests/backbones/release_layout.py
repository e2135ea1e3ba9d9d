"""Writes tiny checkpoints in the original LLaVA release layout (liuhaotian/llava-v1.5-7b), from a
transformers reference model, with the key names written out here by hand (not by the loader's table).

The release tokenizer has no ``<image>`` token: the reference model has one more vocabulary row than the
release checkpoint, set to the mean of the others, as the loader is documented to do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

WORDS = "USER ASSISTANT : A chat between a curious user and an artificial intelligence assistant . How many shapes ?"
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=256)


def write_release_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """A word-level stand-in for Vicuna's tokenizer: <unk>, <s>, </s> and words; no <image>."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in WORDS.split():
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")
    fast.save_pretrained(directory)
    return fast


def reference_model(vocab: int, seed: int = 0) -> LlavaForConditionalGeneration:
    """transformers' LLaVA with ``vocab + 1`` rows (the last is <image>, the mean of the others)."""
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION),
        text_config=LlamaConfig(**TEXT, vocab_size=vocab + 1, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_token_id=vocab,
        image_seq_length=4,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for weight in (model.model.language_model.embed_tokens.weight, model.lm_head.weight):
            weight[vocab] = weight[:vocab].mean(0)
    return model


def release_state_dicts(model: LlavaForConditionalGeneration, vocab: int) -> tuple[dict, dict]:
    """(LLM checkpoint in the release's names, vision tower in the CLIPModel ``vision_model.*`` names)."""
    llm: dict[str, torch.Tensor] = {}
    tower: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.clone()
        if key.startswith("model.vision_tower."):
            tower["vision_model." + key[len("model.vision_tower."):]] = tensor
        elif key.startswith("model.multi_modal_projector.linear_1."):
            llm["model.mm_projector.0." + key.split(".")[-1]] = tensor
        elif key.startswith("model.multi_modal_projector.linear_2."):
            llm["model.mm_projector.2." + key.split(".")[-1]] = tensor
        elif key.startswith("model.language_model."):
            llm["model." + key[len("model.language_model."):]] = tensor
        elif key == "lm_head.weight":
            llm[key] = tensor
        else:
            raise AssertionError(f"unmapped reference key {key}")
    llm["model.embed_tokens.weight"] = llm["model.embed_tokens.weight"][:vocab].contiguous()
    llm["lm_head.weight"] = llm["lm_head.weight"][:vocab].contiguous()
    # transformers 4.31 saved these buffers: a real release carries them, the loader recomputes them
    llm["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    tower["vision_model.embeddings.position_ids"] = torch.arange(5)[None]
    return llm, tower


def release_config(vocab: int) -> dict:
    """config.json as the LLaVA code base writes it (flat Llama keys + mm_* keys)."""
    return {
        "_name_or_path": "./checkpoints/vicuna-7b-v1-5",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        **TEXT,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "image_aspect_ratio": "pad",
        "mm_hidden_size": VISION["hidden_size"],
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }


def write_shards(directory: Path, state: dict[str, torch.Tensor], fmt: str, num_shards: int = 2) -> None:
    """Sharded weights with an index json, named as transformers 4 / the release name them."""
    keys = sorted(state)
    chunks = [keys[i::num_shards] for i in range(num_shards)]
    weight_map = {}
    for number, chunk in enumerate(chunks, start=1):
        if fmt == "safetensors":
            name = f"model-{number:05d}-of-{num_shards:05d}.safetensors"
            save_file({key: state[key] for key in chunk}, directory / name, metadata={"format": "pt"})
        else:
            name = f"pytorch_model-{number:05d}-of-{num_shards:05d}.bin"
            torch.save({key: state[key] for key in chunk}, directory / name)
        weight_map.update({key: name for key in chunk})
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (directory / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def write_tower(directory: Path, tower: dict[str, torch.Tensor], clip_model: bool) -> None:
    """The CLIP tower directory: a CLIPModel (text half included, as openai/clip-vit-large-patch14-336) or a
    CLIPVisionModel config, with ``vision_model.*`` weights."""
    directory.mkdir(parents=True, exist_ok=True)
    vision = {**VISION, "model_type": "clip_vision_model"}
    if clip_model:
        config = {"architectures": ["CLIPModel"], "model_type": "clip", "vision_config": VISION,
                  "text_config": {"hidden_size": 8}, "projection_dim": 8}
        tower = {**tower, "text_model.embeddings.token_embedding.weight": torch.zeros(3, 8),
                 "text_projection.weight": torch.zeros(8, 8), "visual_projection.weight": torch.zeros(8, 32),
                 "logit_scale": torch.tensor(2.0)}
    else:
        config = {"architectures": ["CLIPVisionModel"], **vision}
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tower, directory / "model.safetensors", metadata={"format": "pt"})


def write_release(root: Path, fmt: str = "safetensors", clip_model: bool = True, seed: int = 0):
    """(release dir, tower dir, reference model, vocabulary size without <image>)."""
    release, tower_dir = root / "llava-v1.5-tiny", root / "clip-vit-tiny"
    release.mkdir(parents=True)
    tokenizer = write_release_tokenizer(release)
    vocab = len(tokenizer)
    model = reference_model(vocab, seed)
    llm, tower = release_state_dicts(model, vocab)
    (release / "config.json").write_text(json.dumps(release_config(vocab)))
    write_shards(release, llm, fmt)
    write_tower(tower_dir, tower, clip_model)
    return release, tower_dir, model, vocab


def write_base(root: Path, model: LlavaForConditionalGeneration, vocab: int):
    """The reference model's LLM as a Vicuna stand-in (``LlamaForCausalLM`` saved by transformers, with the release
    tokenizer): (its directory, the ``LlamaForCausalLM``, the projector in the release's names)."""
    from transformers import LlamaForCausalLM

    llm, _ = release_state_dicts(model, vocab)
    projector = {key: llm.pop(key) for key in list(llm) if key.startswith("model.mm_projector.")}
    llm.pop("model.layers.0.self_attn.rotary_emb.inv_freq")
    base = root / "vicuna-tiny"
    base.mkdir()
    write_release_tokenizer(base)
    llama_config = LlamaConfig(**TEXT, vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llama = LlamaForCausalLM(llama_config)
    llama.load_state_dict(llm)
    llama.config.architectures = ["LlamaForCausalLM"]
    llama.save_pretrained(base, safe_serialization=True)
    return base, llama, projector


def write_projector_release(root: Path, seed: int = 0):
    """LLaVA's stage-1 output over a Vicuna stand-in, as its trainer saves it with ``--tune_mm_mlp_adapter``:
    config.json and ``mm_projector.bin`` (the projector under its module names), no LLM weights, no tokenizer.
    (stage-1 dir, base dir, tower dir, the same model as a full release dir)."""
    release, tower_dir, model, vocab = write_release(root / "full", seed=seed)
    base, _, projector = write_base(root, model, vocab)
    pretrain = root / "llava-v1.5-tiny-pretrain"
    pretrain.mkdir()
    config = {**release_config(vocab), "tune_mm_mlp_adapter": True, "image_aspect_ratio": "square"}
    (pretrain / "config.json").write_text(json.dumps(config))
    torch.save(projector, pretrain / "mm_projector.bin")
    return pretrain, base, tower_dir, release


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # LLaVA's find_all_linear_names


def write_lora_release(root: Path, fmt: str = "safetensors", rank: int = 4, alpha: float = 8.0, seed: int = 0):
    """LLaVA's LoRA output over a Vicuna stand-in, made with peft itself, and the same model merged by peft's
    ``merge_and_unload`` written as a full release: (lora dir, base dir, tower dir, merged release dir).

    The base is the reference model's LLM in the Llama layout; the adapters are peft's on a ``LlamaForCausalLM``
    of it (the names LLaVA's ``LlavaLlamaForCausalLM`` gives them), B drawn at random; the projector goes to
    ``non_lora_trainables.bin`` under the names LLaVA's trainer saves."""
    from peft import LoraConfig, get_peft_model

    release, tower_dir, model, vocab = write_release(root / "full-unmerged", seed=seed)
    base, llama, projector = write_base(root, model, vocab)
    adapted = get_peft_model(llama, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.05, target_modules=LORA_TARGETS))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    lora = root / "llava-v1.5-tiny-lora"
    adapted.save_pretrained(lora, safe_serialization=fmt == "safetensors")
    (lora / "config.json").write_text(json.dumps(release_config(vocab)))
    torch.save({f"base_model.model.{key}": tensor for key, tensor in projector.items()}, lora / "non_lora_trainables.bin")
    merged_llm = {key: tensor.clone() for key, tensor in adapted.merge_and_unload().state_dict().items()}
    merged = root / "llava-v1.5-tiny-merged"
    merged.mkdir()
    write_release_tokenizer(merged)
    (merged / "config.json").write_text(json.dumps(release_config(vocab)))
    write_shards(merged, {**merged_llm, **projector}, "safetensors")
    return lora, base, tower_dir, merged
