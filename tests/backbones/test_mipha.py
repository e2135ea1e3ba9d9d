"""Mipha-3B's release layout loads into transformers' Phi / SigLIP modules with the logits of those modules
built independently; bad directories fail naming the file, key or setting; Mipha's chat template."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from adaptive_mllm.backbones import CheckpointError, MiphaBackbone
from adaptive_mllm.backbones.templates import phi_v0
from adaptive_mllm.engine import Engine
from adaptive_mllm.inputs import embed_multimodal, position_ids_from_mask
from tests.backbones.mipha_layout import SPARE_ROWS, write_mipha
from tests.conftest import random_images


def _load(directory, **kwargs) -> MiphaBackbone:
    backbone = MiphaBackbone(checkpoint=str(directory), **kwargs)
    backbone.build()
    return backbone.eval()


def _prompt(backbone: MiphaBackbone) -> torch.Tensor:
    ids = backbone.chat_template.encode_prompt(
        ["<image>\nHow many shapes are there ?"], [], backbone.tokenizer, backbone.image_token_id, backbone.num_image_tokens
    )
    return torch.tensor([ids, ids])


def _engine_logits(backbone: MiphaBackbone, ids: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)
    hidden, _ = Engine(backbone)(embed_multimodal(backbone, ids, images), mask, position_ids_from_mask(mask), gated=False)
    return backbone.lm_head(backbone.final_norm(hidden))


@pytest.mark.parametrize("fmt", ["single", "safetensors", "bin"])
def test_release_layout_gives_the_reference_logits(tmp_path, fmt):
    directory, reference, vocab = write_mipha(tmp_path, fmt=fmt)
    backbone = _load(directory)
    assert backbone.image_token_id == vocab and len(backbone.tokenizer) == vocab + 1  # <image> added last
    assert backbone.shape.vocab_size == vocab + SPARE_ROWS  # the checkpoint's spare rows hold it
    assert backbone.shape.mlp_matrices == 2 and backbone.shape.num_heads == backbone.shape.num_kv_heads == 4
    assert backbone.num_image_tokens == 4 and backbone.max_length == 2048  # (32 / 16)^2 patches, no CLS
    ids, images = _prompt(backbone), random_images(2)
    assert int((ids[0] == vocab).sum()) == 4
    with torch.no_grad():
        expected = reference.logits(ids, images, vocab)
        got = _engine_logits(backbone, ids, images)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # every weight was filled from the files, none left uninitialised
    for part, module in (("llm", reference.llm), ("vision_tower", reference.tower), ("mm_projector", reference.projector)):
        loaded = getattr(backbone.model, part).state_dict()
        for name, tensor in module.state_dict().items():
            assert torch.equal(loaded[name], tensor), (part, name)


def test_saved_backbone_reloads_in_the_same_layout(tmp_path):
    directory, _, _ = write_mipha(tmp_path)
    backbone = _load(directory)
    backbone.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == "mipha_phi"
    again = _load(tmp_path / "saved")
    assert again.image_token_id == backbone.image_token_id
    ids, images = _prompt(backbone), random_images(2)
    with torch.no_grad():
        assert torch.equal(_engine_logits(again, ids, images), _engine_logits(backbone, ids, images))


def test_tiny_config_path_saves_and_reloads(tmp_path, tokenizer_dir):
    config = {"vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=16),
              "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)}
    backbone = MiphaBackbone(config=config, tokenizer=str(tokenizer_dir), template="plain_chat")
    backbone.build()
    backbone.eval()
    backbone.save_pretrained(tmp_path / "tiny")
    again = _load(tmp_path / "tiny", template="plain_chat")
    ids = torch.tensor([[2, 4, 4, 4, 4, 7, 8]])
    images = random_images(1)
    with torch.no_grad():
        assert torch.equal(_engine_logits(again, ids, images), _engine_logits(backbone, ids, images))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    directory, _, _ = write_mipha(tmp_path, fmt="single")
    state = load_file(directory / "model.safetensors")
    del state["model.layers.1.mlp.fc2.bias"]
    del state["model.vision_tower.vision_model.post_layernorm.bias"]
    state["model.mm_projector.4.weight"] = torch.zeros(2, 2)
    save_file(state, directory / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        _load(directory)
    message = str(error.value)
    assert "missing keys ['model.layers.1.mlp.fc2.bias', 'model.vision_tower.vision_model.post_layernorm.bias']" in message
    assert "unexpected keys ['model.safetensors: model.mm_projector.4.weight']" in message


def test_tokenizer_longer_than_the_checkpoint_grows_mean_rows(tmp_path):
    directory, reference, vocab = write_mipha(tmp_path, fmt="single")
    state = load_file(directory / "model.safetensors")
    for key in ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"):
        state[key] = state[key][:vocab].contiguous()  # no spare row: <image> needs a new one
    save_file(state, directory / "model.safetensors")
    _edit_config(directory, vocab_size=vocab)
    backbone = _load(directory)
    assert backbone.shape.vocab_size == vocab + 1
    torch.testing.assert_close(backbone.lm_head.bias[vocab], reference.llm.lm_head.bias[:vocab].mean())
    torch.testing.assert_close(backbone.embed(torch.tensor([vocab]))[0], reference.llm.model.embed_tokens.weight[:vocab].mean(0))


def _edit_config(directory, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def _edit_vision(directory, part: str, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["vision_config"][part].update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_other_architectures_and_layouts_fail(tmp_path):
    directory, _, _ = write_mipha(tmp_path)
    _edit_config(directory, model_type="mipha_gemma", architectures=["MiphaGemmaForCausalLM"])
    with pytest.raises(CheckpointError, match=r"model_type 'mipha_gemma' / architectures \['MiphaGemmaForCausalLM'\] is not Mipha over Phi"):
        MiphaBackbone(checkpoint=str(directory))
    _edit_config(directory, model_type="llava", architectures=["LlavaLlamaForCausalLM"])
    with pytest.raises(CheckpointError, match=r"model_type 'llava'.*expected the Mipha release layout"):
        MiphaBackbone(checkpoint=str(directory))
    with pytest.raises(CheckpointError, match=r"nowhere does not exist"):
        MiphaBackbone(checkpoint=str(tmp_path / "nowhere"))


@pytest.mark.parametrize(("part", "key", "value", "match"), [
    ("mm_projector", "mm_projector_type", "linear", r"mm_projector_type 'linear' is not supported"),
    ("mm_projector", "mm_hidden_size", 1152, r"mm_hidden_size 1152 differs from the vision tower's hidden_size 32"),
    ("vision_tower", "vision_model_name_or_path", "openai/clip-vit-large-patch14-336", r"is not a SigLIP tower"),
    ("vision_tower", "mm_vision_select_feature", "cls_patch", r"mm_vision_select_feature 'cls_patch' is not supported"),
])
def test_unsupported_vision_config(tmp_path, part, key, value, match):
    directory, _, _ = write_mipha(tmp_path)
    _edit_vision(directory, part, **{key: value})
    with pytest.raises(CheckpointError, match=match):
        MiphaBackbone(checkpoint=str(directory))


def test_missing_config_pieces_and_weights_name_them(tmp_path):
    directory, _, _ = write_mipha(tmp_path, fmt="bin")
    config = json.loads((directory / "config.json").read_text())
    del config["vision_config"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"vision_config with 'vision_tower' and 'mm_projector' dicts is missing"):
        MiphaBackbone(checkpoint=str(directory))
    del config["hidden_size"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"key 'hidden_size' is missing; expected the Mipha release layout"):
        MiphaBackbone(checkpoint=str(directory))
    directory, _, _ = write_mipha(tmp_path / "second", fmt="bin")
    (directory / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match=r"lists shards that are missing: .*00002-of-00002\.bin"):
        _load(directory)


def test_wrong_shape_names_the_key(tmp_path):
    directory, _, _ = write_mipha(tmp_path)
    _edit_config(directory, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"model\.layers\.\d\.mlp\.fc\d\.(weight|bias) has shape"):
        _load(directory)


def test_phi_v0_template_renders_mipha_conversation():
    template = phi_v0()
    system = ("A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.")
    # Mipha's conv_phi_v0 (SeparatorStyle.TWO, sep " ", sep2 "<|endoftext|>"), written out by hand
    expected = f"{system} USER: <image>\nHow many ? ASSISTANT: two<|endoftext|>USER: Colour ? ASSISTANT:"
    assert template.render([("<image>\nHow many ?", "two"), ("Colour ?", None)]) == expected
    assert not template.add_bos


def test_template_ids_end_turns_with_endoftext(tmp_path):
    directory, _, _ = write_mipha(tmp_path)
    backbone = MiphaBackbone(checkpoint=str(directory))
    tokenizer = backbone.tokenizer
    encoded = backbone.chat_template.encode([("<image>\nHow many shapes are there ?", "two")], tokenizer,
                                           backbone.image_token_id, backbone.num_image_tokens)
    assert encoded.input_ids[0] != tokenizer.bos_token_id  # no BOS
    assert encoded.input_ids[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert [t for t in encoded.labels if t != -100] == tokenizer("two", add_special_tokens=False)["input_ids"] + [0]


def test_siglip_needs_no_cls_and_refuses_cls_attention(tmp_path):
    directory, _, _ = write_mipha(tmp_path)
    backbone = _load(directory)
    with torch.no_grad():
        assert backbone.encode_images(random_images(2)).features.shape == (2, 4, 32)
        with pytest.raises(ValueError, match="no CLS token"):
            backbone.encode_images(random_images(1), with_attention=True)


def test_preprocessing_pads_with_mean_grey_and_normalises_to_half(tmp_path):
    directory, _, _ = write_mipha(tmp_path)
    backbone = MiphaBackbone(checkpoint=str(directory))
    pixels = backbone.preprocess_image(Image.new("RGB", (64, 16), (255, 255, 255)))
    assert pixels.shape == (3, 32, 32)
    torch.testing.assert_close(pixels[:, 16, 16], torch.ones(3))  # white: (1 - 0.5) / 0.5
    torch.testing.assert_close(pixels[:, 0, 16], torch.full((3,), 127 / 255 * 2 - 1), atol=1e-2, rtol=0)  # padding


def test_a_transformers_5_processor_directory_gives_its_image_processor(tmp_path):
    """transformers 5 nests the image processor in processor_config.json: its mean / std are read, not the
    SigLIP defaults."""
    from transformers import SiglipImageProcessor

    directory, _, _ = write_mipha(tmp_path)
    (directory / "preprocessor_config.json").unlink(missing_ok=True)
    nested = SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6])
    (directory / "processor_config.json").write_text(json.dumps({"image_processor": nested.to_dict(), "processor_class": "X"}))
    backbone = MiphaBackbone(checkpoint=str(directory))
    assert list(backbone.image_processor.image_mean) == [0.1, 0.2, 0.3]
    assert list(backbone.image_processor.image_std) == [0.4, 0.5, 0.6]
