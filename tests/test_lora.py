"""LoRA adapters (adaptive_mllm.lora) against the same model with the adapters merged into its weights by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adaptive_mllm.engine import Engine
from adaptive_mllm.generation import greedy_generate
from adaptive_mllm.inputs import position_ids_from_mask
from adaptive_mllm.lora import LoRA, add_adapters, has_adapters, merge_adapters, merged_adapters
from tests.conftest import make_backbone
from tests.test_engine import _head_plan, _layer_plan, _left_padded
from tests.test_engine_phi import make_phi_backbone

RANK, ALPHA = 4, 8.0


def _adapted(backbone, seed: int = 0):
    """``backbone`` with adapters whose B is random (peft starts B at 0), and an independent copy of it whose
    decoder weights hold ``W + alpha / rank * B @ A``, merged here from the adapters' own tensors."""
    plain = copy.deepcopy(backbone)
    add_adapters(backbone.decoder_layers, LoRA(rank=RANK, alpha=ALPHA, dropout=0.0))
    generator = torch.Generator().manual_seed(seed)
    adapters = dict(backbone.decoder_layers.named_parameters())
    with torch.no_grad():
        for name, parameter in adapters.items():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
        for name, module in plain.decoder_layers.named_modules():
            if isinstance(module, nn.Linear):
                down = adapters[f"{name}.lora_A.default.weight"]  # [r, in]
                up = adapters[f"{name}.lora_B.default.weight"]  # [out, r]
                module.weight += (ALPHA / RANK) * up @ down
    backbone.eval()
    return backbone, plain


@pytest.fixture(params=["llama", "gqa", "phi"])
def any_backbone(request, tokenizer_dir):
    if request.param == "phi":
        return make_phi_backbone(tokenizer_dir)
    return make_backbone(tokenizer_dir, num_kv_heads=2 if request.param == "gqa" else 4)


def test_fresh_adapters_leave_the_model_unchanged(backbone):
    ids, mask = _left_padded(backbone, [7, 5, 7], seed=1)
    plan = _head_plan(backbone, 3, seed=2)
    with torch.no_grad():
        before, _ = Engine(backbone)(backbone.embed(ids), mask, position_ids_from_mask(mask), plan, gated=False)
        add_adapters(backbone.decoder_layers, LoRA(rank=RANK, alpha=ALPHA))
        backbone.eval()
        after, _ = Engine(backbone)(backbone.embed(ids), mask, position_ids_from_mask(mask), plan, gated=False)
    assert has_adapters(backbone.decoder_layers)
    assert torch.equal(before, after)  # peft's B starts at zero: the adapter adds exactly 0


@pytest.mark.parametrize(("level", "gated"), [("full", False), ("layer", False), ("head", False), ("layer", True), ("head", True)])
def test_adapted_engine_equals_merged_weights(any_backbone, level, gated):
    """Every path of the engine sees the adapters: skipping, sliced weights (head level at inference) and the
    gated training path (whose blocks that are off drop the bias of Phi's dense / fc2, the adapter kept)."""
    adapted, merged = _adapted(any_backbone)
    ids, mask = _left_padded(adapted, [9, 6, 9, 4], seed=3)
    layers = adapted.shape.num_layers
    plan = {"full": None, "layer": _layer_plan(4, layers, seed=4), "head": _head_plan(adapted, 4, seed=4)}[level]
    positions = position_ids_from_mask(mask)
    real = mask.bool()
    with torch.no_grad():
        expected, _ = Engine(merged)(merged.embed(ids), mask, positions, plan, gated=False)
        got, _ = Engine(adapted)(adapted.embed(ids), mask, positions, plan, gated=gated)
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_adapters_change_the_answer(backbone):
    """The comparison above is not vacuous: with random B the adapted model differs from the base model."""
    base = copy.deepcopy(backbone)
    adapted, _ = _adapted(backbone)
    ids, mask = _left_padded(adapted, [6, 6], seed=5)
    with torch.no_grad():
        a, _ = Engine(adapted)(adapted.embed(ids), mask, position_ids_from_mask(mask), gated=False)
        b, _ = Engine(base)(base.embed(ids), mask, position_ids_from_mask(mask), gated=False)
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_generation_with_sliced_adapted_layers_equals_merged(gqa_backbone, decode):
    adapted, merged = _adapted(gqa_backbone, seed=6)
    ids, mask = _left_padded(adapted, [8, 5, 8], seed=7)
    plan = _head_plan(adapted, 3, seed=8)
    with torch.no_grad():
        got = greedy_generate(Engine(adapted), adapted.embed(ids), mask, 6, [], plan, decode=decode)
        expected = greedy_generate(Engine(merged), merged.embed(ids), mask, 6, [], plan, decode=decode)
    assert got.tokens == expected.tokens


def test_merged_adapters_are_plain_weights_inside_and_adapters_after(backbone):
    adapted, merged = _adapted(backbone)
    before = {name: tensor.clone() for name, tensor in adapted.decoder_layers.state_dict().items()}
    with merged_adapters(adapted.decoder_layers):
        inside = adapted.decoder_layers.state_dict()
        assert not has_adapters(adapted.decoder_layers)
        assert inside.keys() == merged.decoder_layers.state_dict().keys()
        for name, tensor in merged.decoder_layers.state_dict().items():
            torch.testing.assert_close(inside[name], tensor, atol=1e-6, rtol=1e-6)
    after = adapted.decoder_layers.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"rank": 0}, "lora.rank=0"), ({"alpha": 0.0}, "lora.alpha=0.0"), ({"dropout": 1.0}, "lora.dropout=1.0")],
)
def test_bad_settings_are_refused_naming_the_field(arguments, message, tokenizer_dir):
    from adaptive_mllm.module import AdaptiveMLLM

    with pytest.raises(ValueError, match=message):
        AdaptiveMLLM(make_backbone(tokenizer_dir), lora=LoRA(**arguments))
    with pytest.raises(ValueError, match=message):
        add_adapters(make_backbone(tokenizer_dir).decoder_layers, LoRA(**arguments))


def test_adding_adapters_twice_adds_nothing(backbone):
    add_adapters(backbone.decoder_layers, LoRA(rank=RANK))
    count = sum(1 for _ in backbone.decoder_layers.parameters())
    add_adapters(backbone.decoder_layers, LoRA(rank=RANK))
    assert sum(1 for _ in backbone.decoder_layers.parameters()) == count


def test_merging_for_good_answers_as_the_adapted_model(gqa_backbone):
    """What a server does (merge_adapters): plain projections afterwards, the same tokens at a head-level plan."""
    adapted, _ = _adapted(gqa_backbone, seed=11)
    ids, mask = _left_padded(adapted, [8, 5, 8], seed=12)
    plan = _head_plan(adapted, 3, seed=13)
    with torch.no_grad():
        before = greedy_generate(Engine(adapted), adapted.embed(ids), mask, 6, [], plan)
        merge_adapters(adapted.decoder_layers)
        after = greedy_generate(Engine(adapted), adapted.embed(ids), mask, 6, [], plan)
    assert not has_adapters(adapted.decoder_layers)
    assert after.tokens == before.tokens
