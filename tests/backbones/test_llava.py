"""LlavaBackbone: built from a config, saved in the transformers layout, loaded back through the same code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from adaptive_mllm.backbones import CheckpointError, LlavaBackbone
from adaptive_mllm.backbones.local import pad_to_square
from tests.conftest import random_images, tiny_config


def _inputs(backbone):
    prompt = backbone.chat_template.encode_prompt(
        ["<image>\nHow many shapes are there ?"], [], backbone.tokenizer, backbone.image_token_id, backbone.num_image_tokens
    )
    return torch.tensor([prompt]), random_images(1)


def test_save_load_round_trip_gives_identical_logits(backbone, tmp_path):
    backbone.save_pretrained(tmp_path / "ckpt")
    for name in ["config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"]:
        assert (tmp_path / "ckpt" / name).is_file(), name
    loaded = LlavaBackbone(checkpoint=str(tmp_path / "ckpt"), template="plain_chat")
    assert loaded.shape == backbone.shape  # known before the weights are loaded
    loaded.build()
    loaded.eval()
    ids, images = _inputs(backbone)
    with torch.no_grad():
        before = backbone.model(input_ids=ids, pixel_values=images).logits
        after = loaded.model(input_ids=ids, pixel_values=images).logits
    assert torch.equal(before, after)
    # and transformers itself reads the directory
    reference = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        assert torch.equal(reference(input_ids=ids, pixel_values=images).logits, before)


def test_seed_makes_initialisation_reproducible(tokenizer_dir):
    from tests.conftest import make_backbone

    a, b, c = make_backbone(tokenizer_dir, seed=1), make_backbone(tokenizer_dir, seed=1), make_backbone(tokenizer_dir, seed=2)
    weight = lambda m: m.decoder_layers[0].self_attn.q_proj.weight  # noqa: E731
    assert torch.equal(weight(a), weight(b))
    assert not torch.equal(weight(a), weight(c))


def test_shape_and_placeholders(backbone):
    shape = backbone.shape
    assert (shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_dim) == (4, 4, 4, 16)
    assert shape.vocab_size == len(backbone.tokenizer)
    assert backbone.num_image_tokens == (32 // 16) ** 2
    features = backbone.encode_images(random_images(2)).features
    assert features.shape == (2, backbone.num_image_tokens, 32)
    assert backbone.project(features).shape == (2, backbone.num_image_tokens, 64)


def test_missing_checkpoint_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        LlavaBackbone(checkpoint=str(tmp_path / "nowhere"))


def test_checkpoint_without_config(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json is missing.*transformers LLaVA"):
        LlavaBackbone(checkpoint=str(tmp_path / "ckpt"))


def test_checkpoint_of_another_architecture(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match=r"model_type 'gpt2', expected 'llava'"):
        LlavaBackbone(checkpoint=str(tmp_path / "ckpt"))
    # a Llama LLM is LLaVA's stage-1 start, which needs a tower (tests/backbones/test_llava_release.py)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"is a Llama language model, not LLaVA: .* pass vision_tower"):
        LlavaBackbone(checkpoint=str(tmp_path / "ckpt"))


def test_checkpoint_without_weights(backbone, tmp_path):
    backbone.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    loaded = LlavaBackbone(checkpoint=str(tmp_path / "ckpt"), template="plain_chat")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        loaded.build()


def test_a_truncated_weight_file_is_named(backbone, tmp_path):
    backbone.save_pretrained(tmp_path / "ckpt")
    (weights,) = (tmp_path / "ckpt").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])  # a download cut short
    with pytest.raises(CheckpointError, match=r"ckpt: transformers could not load its weights .*truncated"):
        LlavaBackbone(checkpoint=str(tmp_path / "ckpt")).build()


@pytest.mark.parametrize("change", ["a tensor missing", "layers the config does not have"])
def test_weights_that_do_not_match_the_config_are_refused(backbone, tmp_path, change):
    """transformers loads such a directory with random weights where a tensor is missing (and a warning): a fit
    would train on them. Refused, naming the keys."""
    import json

    from safetensors.torch import load_file, save_file

    backbone.save_pretrained(tmp_path / "ckpt")
    (weights,) = (tmp_path / "ckpt").glob("*.safetensors")
    state = load_file(weights)
    if change == "a tensor missing":
        key = next(key for key in state if "layers.1.mlp.down_proj" in key)
        del state[key]
        expected = r"missing keys \[.*layers\.1\.mlp\.down_proj"
    else:
        config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
        config["text_config"]["num_hidden_layers"] -= 1
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
        expected = r"unexpected keys \[.*layers\.\d"
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=expected):
        LlavaBackbone(checkpoint=str(tmp_path / "ckpt")).build()


def test_needs_exactly_one_source(tokenizer_dir):
    with pytest.raises(ValueError, match="exactly one"):
        LlavaBackbone()
    with pytest.raises(ValueError, match="needs `tokenizer`"):
        LlavaBackbone(config=tiny_config())


def test_a_checkpoint_flag_on_a_recipe_that_sets_sizes_says_to_unset_them(backbone, tmp_path):
    """``--model.backbone.init_args.checkpoint=DIR`` on a recipe with ``config:`` (the tiny ones) was refused as
    needing "exactly one of" them, without saying that the recipe's sizes stay unless unset, or how."""
    from adaptive_mllm.cli import build_cli

    backbone.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"LlavaBackbone got both `checkpoint` \(.*ckpt\) and `config` \(sizes\); it takes one: "
                       r"to load the checkpoint with its own sizes, also pass --model\.backbone\.init_args\.config=null"):
        LlavaBackbone(checkpoint=str(tmp_path / "ckpt"), config=tiny_config())
    recipe = ["--config", str(Path(__file__).parents[2] / "recipes" / "tiny.yaml"), f"--model.backbone.init_args.checkpoint={tmp_path / 'ckpt'}"]
    with pytest.raises(ValueError, match=r"also pass --model\.backbone\.init_args\.config=null"):
        build_cli(recipe, run=False)
    loaded = build_cli([*recipe, "--model.backbone.init_args.config=null"], run=False).model.backbone  # the advice works
    assert loaded.checkpoint == tmp_path / "ckpt" and loaded.shape == backbone.shape


def test_a_tokenizer_folder_transformers_cannot_read_is_named_with_its_files(tmp_path):
    """transformers' own error for GPT-2 / Phi's vocab.json + merges.txt alone named no folder and said to install
    sentencepiece or tiktoken (installed, and no help); other unreadable files named no folder either."""
    vocabulary = tmp_path / "bpe"
    vocabulary.mkdir()
    (vocabulary / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (vocabulary / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(CheckpointError, match=rf"^tokenizer directory {vocabulary}: transformers cannot build a tokenizer from it: "
                       r"it holds merges\.txt, vocab\.json, a vocabulary without tokenizer_config\.json or tokenizer\.json, so the "
                       r"tokenizer class is unknown; copy the model's tokenizer_config\.json"):
        LlavaBackbone(config=tiny_config(), tokenizer=str(vocabulary))._load_tokenizer()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"^tokenizer directory {broken}: transformers cannot build a tokenizer from it \(Expecting "
                       r".*\); it holds tokenizer\.json; expected a model's tokenizer files"):
        LlavaBackbone(config=tiny_config(), tokenizer=str(broken))._load_tokenizer()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty holds no tokenizer: none of tokenizer\.json, tokenizer\.model, vocab\.json \(it holds nothing\)"):
        LlavaBackbone(config=tiny_config(), tokenizer=str(tmp_path / "empty"))._load_tokenizer()


def test_pad_to_square_centres_on_the_fill_colour():
    image = Image.new("RGB", (4, 2), (255, 0, 0))
    square = pad_to_square(image, (10, 20, 30))
    assert square.size == (4, 4)
    pixels = torch.tensor(list(square.getdata())).view(4, 4, 3)
    assert pixels[0].eq(torch.tensor([10, 20, 30])).all() and pixels[3].eq(torch.tensor([10, 20, 30])).all()
    assert pixels[1:3].eq(torch.tensor([255, 0, 0])).all()


def test_preprocess_image_gives_the_tower_size(backbone):
    pixels = backbone.preprocess_image(Image.new("RGB", (50, 20), (0, 128, 255)))
    assert pixels.shape == (3, 32, 32)


@pytest.mark.parametrize(("layer", "strategy"), [([-2, -1], "default"), (-2, "full"), ([-3, -1], "full")])
def test_feature_selection_variants_match_transformers(tokenizer_dir, layer, strategy):
    """A list of layers (hidden states concatenated) and the "full" strategy (CLS kept): the engine's
    full-model logits are transformers' LlavaForConditionalGeneration's on the same ids."""
    from adaptive_mllm.engine import Engine
    from adaptive_mllm.inputs import embed_multimodal, position_ids_from_mask

    config = {**tiny_config(), "vision_feature_layer": layer, "vision_feature_select_strategy": strategy}
    backbone = LlavaBackbone(config=config, tokenizer=str(tokenizer_dir), template="plain_chat")
    backbone.build()
    backbone.eval()
    assert backbone.num_image_tokens == (32 // 16) ** 2 + (strategy == "full")  # by hand: 4 patches (+ CLS)
    ids, images = _inputs(backbone)
    ids = ids.repeat(2, 1)
    images = random_images(2)
    mask = torch.ones_like(ids)
    features = backbone.encode_images(images).features
    assert features.shape == (2, backbone.num_image_tokens, 32 * (len(layer) if isinstance(layer, list) else 1))
    with torch.no_grad():
        reference = backbone.model(input_ids=ids, pixel_values=images, attention_mask=mask).logits
        hidden, _ = Engine(backbone)(embed_multimodal(backbone, ids, images), mask, position_ids_from_mask(mask), gated=False)
    torch.testing.assert_close(backbone.lm_head(backbone.final_norm(hidden)), reference, atol=1e-5, rtol=0)


def test_full_strategy_with_a_cls_attention_selector_is_a_clear_error(tokenizer_dir):
    config = {**tiny_config(), "vision_feature_select_strategy": "full"}
    backbone = LlavaBackbone(config=config, tokenizer=str(tokenizer_dir), template="plain_chat")
    backbone.build()
    with pytest.raises(ValueError, match="'full' keeps the CLS token.*PruMerge"):
        backbone.encode_images(random_images(1), with_attention=True)



def test_a_transformers_5_processor_directory_gives_its_image_processor(backbone, tmp_path):
    """transformers 5 nests the image processor in processor_config.json (no preprocessor_config.json):
    its mean / std must be read, not CLIP's defaults."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    backbone.save_pretrained(tmp_path / "ckpt")
    for name in ("preprocessor_config.json", "processor_config.json"):
        (tmp_path / "ckpt" / name).unlink(missing_ok=True)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5, 0.25, 0.125], image_std=[0.2, 0.3, 0.4]
    )
    LlavaProcessor(image_processor=image_processor, tokenizer=backbone.tokenizer, patch_size=16).save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "preprocessor_config.json").exists()
    loaded = LlavaBackbone(checkpoint=str(tmp_path / "ckpt"), template="plain_chat", pad_to_square=False)
    assert list(loaded.image_processor.image_mean) == [0.5, 0.25, 0.125]
    assert list(loaded.image_processor.image_std) == [0.2, 0.3, 0.4]
    # by hand: a uniform grey 128 image normalised with that mean / std
    pixels = loaded.preprocess_image(Image.new("RGB", (32, 32), (128, 128, 128)))
    expected = torch.tensor([(128 / 255 - m) / s for m, s in [(0.5, 0.2), (0.25, 0.3), (0.125, 0.4)]])
    torch.testing.assert_close(pixels[:, 5, 5], expected, atol=1e-5, rtol=0)
