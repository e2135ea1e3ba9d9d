"""The original LLaVA release layout (liuhaotian/llava-v1.5-7b) loads into the same modules, with the same
logits as transformers' own LLaVA built from the same weights; bad directories fail naming file or key."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaptive_mllm.backbones import CheckpointError, LlavaBackbone
from tests.backbones.release_layout import VISION, release_config, write_release
from tests.backbones.spm_tokenizer import write_spm_tokenizer
from tests.conftest import random_images


def _load(release, tower, **kwargs) -> LlavaBackbone:
    backbone = LlavaBackbone(checkpoint=str(release), vision_tower=str(tower), **kwargs)
    backbone.build()
    return backbone.eval()


def _prompt(backbone: LlavaBackbone) -> torch.Tensor:
    ids = backbone.chat_template.encode_prompt(
        ["<image>\nHow many shapes ?"], [], backbone.tokenizer, backbone.image_token_id, backbone.num_image_tokens
    )
    return torch.tensor([ids])


@pytest.mark.parametrize(("fmt", "clip_model"), [("safetensors", True), ("bin", False)])
def test_release_layout_gives_the_reference_logits(tmp_path, fmt, clip_model):
    release, tower, reference, vocab = write_release(tmp_path, fmt=fmt, clip_model=clip_model)
    backbone = _load(release, tower)
    assert backbone.release_layout
    assert backbone.image_token_id == vocab and len(backbone.tokenizer) == vocab + 1  # <image> added last
    assert backbone.shape.num_layers == 2 and backbone.shape.vocab_size == vocab + 1
    assert backbone.llava_config.vision_feature_layer == -2
    ids = _prompt(backbone)
    assert int((ids == vocab).sum()) == backbone.num_image_tokens == 4
    images = random_images(1)
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=images).logits
        got = backbone.model(input_ids=ids, pixel_values=images).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # every weight was filled from the files, none left uninitialised
    for name, tensor in reference.state_dict().items():
        assert torch.equal(backbone.model.state_dict()[name], tensor), name


def test_release_layout_loads_in_bfloat16(tmp_path):
    release, tower, reference, _ = write_release(tmp_path)
    backbone = _load(release, tower, dtype="bfloat16")
    weight = backbone.decoder_layers[0].mlp.up_proj.weight
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, reference.model.language_model.layers[0].mlp.up_proj.weight.bfloat16())


def test_release_saved_in_the_transformers_layout_reloads(tmp_path):
    release, tower, _, _ = write_release(tmp_path)
    backbone = _load(release, tower)
    backbone.save_pretrained(tmp_path / "hf")
    again = LlavaBackbone(checkpoint=str(tmp_path / "hf"))
    again.build()
    again.eval()
    assert not again.release_layout
    ids, images = _prompt(backbone), random_images(1)
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=ids, pixel_values=images).logits,
                           backbone.model(input_ids=ids, pixel_values=images).logits)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    release, tower, _, _ = write_release(tmp_path)
    shard = release / "model-00001-of-00002.safetensors"
    state = load_file(shard)
    removed = next(key for key in state if key.startswith("model.layers."))
    del state[removed]
    state["model.mm_projector.4.weight"] = torch.zeros(2, 2)
    save_file(state, shard)
    backbone = LlavaBackbone(checkpoint=str(release), vision_tower=str(tower))
    with pytest.raises(CheckpointError) as error:
        backbone.build()
    message = str(error.value)
    assert "missing keys ['model.language_model." + removed[len("model."):] + "']" in message
    assert "unexpected keys ['model-00001-of-00002.safetensors: model.mm_projector.4.weight']" in message


def test_missing_tower_weight_is_listed(tmp_path):
    release, tower, _, _ = write_release(tmp_path)
    state = load_file(tower / "model.safetensors")
    del state["vision_model.post_layernorm.bias"]
    save_file(state, tower / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \['model\.vision_tower\.post_layernorm\.bias'\]"):
        _load(release, tower)


def test_release_needs_a_local_vision_tower(tmp_path):
    release, _, _, _ = write_release(tmp_path)
    with pytest.raises(CheckpointError, match=r"'openai/clip-vit-large-patch14-336' \(a hub id.*pass `vision_tower`"):
        LlavaBackbone(checkpoint=str(release))
    with pytest.raises(CheckpointError, match=r"nowhere/config\.json is missing.*CLIPVisionModel"):
        LlavaBackbone(checkpoint=str(release), vision_tower=str(tmp_path / "nowhere"))


def _edit_config(release, **changes) -> None:
    config = json.loads((release / "config.json").read_text())
    config.update(changes)
    (release / "config.json").write_text(json.dumps(config))


def test_release_of_another_language_model_fails(tmp_path):
    release, tower, _, _ = write_release(tmp_path)
    _edit_config(release, architectures=["LlavaMistralForCausalLM"], model_type="llava_mistral")
    with pytest.raises(CheckpointError, match=r"config\.json: architectures \['LlavaMistralForCausalLM'\].*LlavaLlamaForCausalLM"):
        LlavaBackbone(checkpoint=str(release), vision_tower=str(tower))


@pytest.mark.parametrize(("key", "value", "match"), [
    ("mm_use_im_start_end", True, r"mm_use_im_start_end is true .*LLaVA-1.5 does not use"),
    ("mm_projector_type", "linear", r"mm_projector_type 'linear' is not supported"),
    ("mm_vision_select_feature", "cls", r"mm_vision_select_feature 'cls' is not supported"),
    ("mm_hidden_size", 1024, r"mm_hidden_size 1024 differs from the vision tower's hidden_size 32"),
])
def test_unsupported_release_config_keys(tmp_path, key, value, match):
    release, tower, _, _ = write_release(tmp_path)
    _edit_config(release, **{key: value})
    with pytest.raises(CheckpointError, match=match):
        LlavaBackbone(checkpoint=str(release), vision_tower=str(tower))


def test_config_without_sizes_names_the_key(tmp_path):
    release, tower, _, _ = write_release(tmp_path)
    config = json.loads((release / "config.json").read_text())
    del config["hidden_size"]
    (release / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"key 'hidden_size' is missing; expected the original LLaVA release"):
        LlavaBackbone(checkpoint=str(release), vision_tower=str(tower))


def test_vision_tower_of_another_kind_fails(tmp_path):
    release, tower, _, _ = write_release(tmp_path)
    (tower / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model"}))
    with pytest.raises(CheckpointError, match=r"model_type 'siglip_vision_model', expected 'clip_vision_model'"):
        LlavaBackbone(checkpoint=str(release), vision_tower=str(tower))


def test_missing_shard_and_missing_weights_name_the_file(tmp_path):
    release, tower, _, _ = write_release(tmp_path, fmt="bin")
    (release / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin\.index\.json lists shards that are missing: .*00002-of-00002\.bin"):
        _load(release, tower)
    (release / "pytorch_model.bin.index.json").unlink()
    (release / "pytorch_model-00001-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match=r"holds no model\.safetensors, pytorch_model\.bin or \*\.index\.json; expected the original"):
        _load(release, tower)


def test_wrong_shape_names_the_key(tmp_path):
    release, tower, _, _ = write_release(tmp_path)
    _edit_config(release, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"model\.layers\.\d\.mlp\.\w+_proj\.weight has shape"):
        _load(release, tower)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_a_plain_language_model_directory_fails(tmp_path, model_type):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": ["X"]}))
    with pytest.raises(CheckpointError, match=rf"model_type '{model_type}', expected 'llava'.*original LLaVA release"):
        LlavaBackbone(checkpoint=str(tmp_path / "ckpt"))


def _make_unconsolidated(release, tower, seed: int) -> dict:
    """Add the tower's weights, with other values, inside the LLM checkpoint under LLaVA's own module names
    (``model.vision_tower.vision_tower.vision_model.*``: LlavaMetaModel.vision_tower is a CLIPVisionTower
    whose ``vision_tower`` is the CLIPVisionModel), as a checkpoint saved with the tower attached holds them."""
    generator = torch.Generator().manual_seed(seed)
    inner = {
        "model.vision_tower.vision_tower." + key: torch.randn(tensor.shape, generator=generator)
        for key, tensor in load_file(tower / "model.safetensors").items()
        if key.startswith("vision_model.") and not key.endswith("position_ids")
    }
    shard = release / "model-00001-of-00002.safetensors"
    save_file({**load_file(shard), **inner}, shard)
    index_file = release / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"].update({key: shard.name for key in inner})
    index_file.write_text(json.dumps(index))
    return inner


@pytest.mark.parametrize("unfreeze", [False, True])
def test_unconsolidated_checkpoint_loads_as_llavas_loader_does(tmp_path, unfreeze):
    """LLaVA builds the tower lazily (delay_load) from mm_vision_tower: the checkpoint's own tower weights are
    dropped, unless unfreeze_mm_vision_tower made it build the tower first, and then they overwrite it."""
    release, tower, reference, _ = write_release(tmp_path)
    inner = _make_unconsolidated(release, tower, seed=7)
    if unfreeze:
        _edit_config(release, unfreeze_mm_vision_tower=True)
    with pytest.warns(UserWarning, match="unconsolidated LLaVA checkpoint: .* are " + ("used instead" if unfreeze else "ignored")):
        backbone = _load(release, tower)
    state = backbone.model.state_dict()
    for key, tensor in inner.items():
        target = "model.vision_tower." + key[len("model.vision_tower.vision_tower.vision_model."):]
        expected = tensor if unfreeze else reference.state_dict()[target]
        assert torch.equal(state[target], expected), target
    assert torch.equal(state["lm_head.weight"], reference.state_dict()["lm_head.weight"])


def test_a_release_directory_with_only_tokenizer_model_reads_its_tokenizer(tmp_path):
    """liuhaotian/llava-v1.5-7b ships tokenizer.model + tokenizer_config.json, no tokenizer.json: reading it
    needs sentencepiece (a dependency). The tokenizer is a real Llama-style SentencePiece model."""
    release = write_spm_tokenizer(tmp_path / "release")
    (release / "config.json").write_text(json.dumps(release_config(32000)))
    tower = tmp_path / "tower"
    tower.mkdir()
    (tower / "config.json").write_text(json.dumps({"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", **VISION}))
    backbone = LlavaBackbone(checkpoint=str(release), vision_tower=str(tower))
    tokenizer = backbone.tokenizer
    assert backbone.image_token_id == 32000 and len(tokenizer) == 32001  # <image> added after the 32,000 pieces
    ids = tokenizer("USER: Hi", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁US", "ER", ":", "▁Hi"]


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_a_truncated_weight_file_or_a_broken_index_is_named(tmp_path, fmt):
    release, tower, _, _ = write_release(tmp_path, fmt=fmt)
    suffix = "safetensors" if fmt == "safetensors" else "bin"
    shard = sorted(release.glob(f"*-00001-of-00002.{suffix}"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a download cut short
    with pytest.raises(CheckpointError, match=rf"{shard.name} \(\d+ bytes\): cannot read its weights .*truncated"):
        _load(release, tower)
    (index,) = release.glob("*.index.json")
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{index.name} is not valid JSON"):
        _load(release, tower)
    index.write_text("[]")
    with pytest.raises(CheckpointError, match=rf"{index.name} holds a JSON list, expected an object"):
        _load(release, tower)


def test_padding_other_than_the_config_says_is_warned(tmp_path):
    release, tower, _, _ = write_release(tmp_path)
    _edit_config(release, image_aspect_ratio="square")  # LLaVA's process_images would not pad
    with pytest.warns(UserWarning, match=r"image_aspect_ratio 'square' means LLaVA does not pad .*pass pad_to_square=False"):
        LlavaBackbone(checkpoint=str(release), vision_tower=str(tower))


def test_a_directory_without_tokenizer_files_is_named(tmp_path):
    release, tower, _, _ = write_release(tmp_path)
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json"):
        (release / name).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=r"holds no tokenizer: none of tokenizer.json, tokenizer.model, vocab.json"):
        _load(release, tower)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_a_lora_output_with_its_model_base_equals_peft_merged(tmp_path, fmt):
    """liuhaotian/llava-v1.5-7b-lora's layout: Vicuna's weights, the projector of non_lora_trainables.bin and the
    adapters merged at load give the logits of the same model merged by peft's merge_and_unload."""
    from tests.backbones.release_layout import write_lora_release

    lora, base, tower, merged = write_lora_release(tmp_path, fmt=fmt)
    backbone = LlavaBackbone(checkpoint=str(lora), model_base=str(base), vision_tower=str(tower))
    backbone.build()
    backbone.eval()
    assert backbone.tokenizer_dir == base  # LLaVA's LoRA output holds no tokenizer
    expected = _load(merged, tower)
    ids, images = _prompt(backbone), random_images(1)
    with torch.no_grad():
        got = backbone.model(input_ids=ids, pixel_values=images).logits
        want = expected.model(input_ids=ids, pixel_values=images).logits
        unmerged = _load(tmp_path / "full-unmerged" / "llava-v1.5-tiny", tower).model(input_ids=ids, pixel_values=images).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert (got - unmerged).abs().max() > 1e-3  # the adapters changed the answer: the merge was not skipped


def test_a_lora_output_needs_its_model_base_and_says_so(tmp_path):
    from tests.backbones.release_layout import write_lora_release

    lora, base, tower, merged = write_lora_release(tmp_path)
    with pytest.raises(CheckpointError, match=r"holds LoRA adapters \(adapter_config.json\): pass model_base"):
        LlavaBackbone(checkpoint=str(lora), vision_tower=str(tower))
    with pytest.raises(CheckpointError, match="model_base=.* is read only for LLaVA's LoRA output .* drop model_base"):
        LlavaBackbone(checkpoint=str(merged), model_base=str(base), vision_tower=str(tower))
    with pytest.raises(CheckpointError, match="model_base .*nowhere does not exist"):
        LlavaBackbone(checkpoint=str(lora), model_base=str(tmp_path / "nowhere"), vision_tower=str(tower))


def test_a_lora_output_of_another_kind_or_with_a_broken_adapter_is_named(tmp_path):
    from tests.backbones.release_layout import write_lora_release

    lora, base, tower, _ = write_lora_release(tmp_path)
    settings = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**settings, "use_dora": True}))
    backbone = LlavaBackbone(checkpoint=str(lora), model_base=str(base), vision_tower=str(tower))
    with pytest.raises(CheckpointError, match=r"adapter_config.json: .*'use_dora': True.*only plain LoRA adapters"):
        backbone.build()
    (lora / "adapter_config.json").write_text(json.dumps(settings))
    weights = load_file(lora / "adapter_model.safetensors")
    half = next(key for key in weights if "layers.1.mlp.down_proj.lora_B" in key)
    save_file({key: value for key, value in weights.items() if key != half}, lora / "adapter_model.safetensors")
    backbone = LlavaBackbone(checkpoint=str(lora), model_base=str(base), vision_tower=str(tower))
    with pytest.raises(CheckpointError, match=r"the adapter of model.language_model.layers.1.mlp.down_proj.weight has \['A'\]"):
        backbone.build()
    (lora / "non_lora_trainables.bin").unlink()
    backbone = LlavaBackbone(checkpoint=str(lora), model_base=str(base), vision_tower=str(tower))
    with pytest.raises(CheckpointError, match="holds none of non_lora_trainables.bin"):
        backbone.build()


def test_a_stage_one_output_with_its_model_base_is_the_full_model(tmp_path):
    """liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5's layout (config.json + mm_projector.bin), read as
    LLaVA's loader reads it with --model-base: Vicuna's weights and tokenizer, the projector beside them. Every weight
    equals the same model written as one release directory."""
    from tests.backbones.release_layout import write_projector_release

    pretrain, base, tower, full = write_projector_release(tmp_path)
    backbone = LlavaBackbone(checkpoint=str(pretrain), model_base=str(base), vision_tower=str(tower))
    backbone.build()
    backbone.eval()
    assert backbone.tokenizer_dir == base
    expected = _load(full, tower)
    got_state, want_state = backbone.model.state_dict(), expected.model.state_dict()
    assert sorted(got_state) == sorted(want_state)
    for name, tensor in want_state.items():
        assert torch.equal(got_state[name], tensor), name
    ids, images = _prompt(backbone), random_images(1)
    with torch.no_grad():
        torch.testing.assert_close(backbone.model(input_ids=ids, pixel_values=images).logits,
                                   expected.model(input_ids=ids, pixel_values=images).logits, rtol=0, atol=0)


def test_a_stage_one_output_needs_its_model_base_and_only_its_projector(tmp_path):
    from tests.backbones.release_layout import write_projector_release

    pretrain, base, tower, _ = write_projector_release(tmp_path)
    with pytest.raises(CheckpointError, match=r"holds a projector alone \(mm_projector.bin\): pass model_base"):
        LlavaBackbone(checkpoint=str(pretrain), vision_tower=str(tower))
    weights = torch.load(pretrain / "mm_projector.bin")
    torch.save({**weights, "model.embed_tokens.weight": torch.zeros(3, 64)}, pretrain / "mm_projector.bin")
    backbone = LlavaBackbone(checkpoint=str(pretrain), model_base=str(base), vision_tower=str(tower))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['mm_projector.bin: model.embed_tokens.weight'\]"):
        backbone.build()
    torch.save({key: value for key, value in weights.items() if ".2." not in key}, pretrain / "mm_projector.bin")
    backbone = LlavaBackbone(checkpoint=str(pretrain), model_base=str(base), vision_tower=str(tower))
    with pytest.raises(CheckpointError, match=r"missing keys \['model.multi_modal_projector.linear_2.bias'"):
        backbone.build()


def test_a_language_model_and_a_tower_make_llava_with_a_new_projector(tmp_path):
    """LLaVA's stage 1 starts from Vicuna and CLIP (train.py --model_name_or_path, --vision_tower): the LLM and the
    tower are the files', the projector nn.Linear's own initialisation from the seed, and the model answers as
    transformers' LLaVA with those weights."""
    from torch import nn

    from tests.backbones.release_layout import write_base

    _, tower, reference, vocab = write_release(tmp_path / "full")
    base, _, _ = write_base(tmp_path, reference, vocab)
    with pytest.warns(UserWarning, match="is a language model: LLaVA-1.5 is built on it .* with a new projector"):
        backbone = LlavaBackbone(checkpoint=str(base), vision_tower=str(tower), template="plain", seed=3)
    backbone.build()
    backbone.eval()
    config = backbone.llava_config
    assert (config.vision_feature_layer, config.vision_feature_select_strategy, config.projector_hidden_act) == (-2, "default", "gelu")
    assert backbone.image_token_id == vocab and backbone.shape.vocab_size == vocab + 1

    torch.manual_seed(3)  # LLaVA's build_vision_projector: Linear, GELU, Linear, each initialised by PyTorch
    first, second = nn.Linear(VISION["hidden_size"], 64), nn.Linear(64, 64)
    with torch.no_grad():
        reference.model.multi_modal_projector.linear_1.load_state_dict(first.state_dict())
        reference.model.multi_modal_projector.linear_2.load_state_dict(second.state_dict())
    for name, tensor in reference.state_dict().items():
        assert torch.equal(backbone.model.state_dict()[name], tensor), name
    ids, images = _prompt(backbone), random_images(1)
    with torch.no_grad():
        torch.testing.assert_close(backbone.model(input_ids=ids, pixel_values=images).logits,
                                   reference(input_ids=ids, pixel_values=images).logits, rtol=0, atol=0)
    again = LlavaBackbone(checkpoint=str(base), vision_tower=str(tower), seed=4)
    again.build()
    assert not torch.equal(again.model.model.multi_modal_projector.linear_1.weight, first.weight)  # the seed counts


def test_a_language_model_without_a_tower_says_what_to_add(tmp_path):
    from tests.backbones.release_layout import write_base

    _, _, reference, vocab = write_release(tmp_path / "full")
    base, _, _ = write_base(tmp_path, reference, vocab)
    with pytest.raises(CheckpointError, match=r"is a Llama language model, not LLaVA: to build LLaVA-1.5 on it .* pass vision_tower"):
        LlavaBackbone(checkpoint=str(base))
