"""The engine on Phi-2's decoder layer (Mipha): parallel residual, partial rotary, q/k/v/dense biases,
fc1/fc2 MLP. Against transformers' PhiForCausalLM, and its two ways of honouring a plan against each
other, with the helpers of tests/test_engine.py."""

from __future__ import annotations

import pytest
import torch

from adaptive_mllm.engine import Engine, PlanCache
from adaptive_mllm.generation import greedy_generate
from adaptive_mllm.inputs import embed_multimodal, position_ids_from_mask
from adaptive_mllm.schedulers.plan import ExecutionPlan
from tests.conftest import random_images
from tests.test_engine import (
    PREFIX,
    _head_plan,
    _layer_plan,
    _left_padded,
    _logits,
    assert_cached_generation_equals_uncached,
)


def make_phi_backbone(tokenizer_dir, qk_layernorm: bool = False, seed: int = 0):
    from adaptive_mllm.backbones import MiphaBackbone

    config = {
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                       patch_size=16),
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     partial_rotary_factor=0.5, max_position_embeddings=256, qk_layernorm=qk_layernorm),
    }
    backbone = MiphaBackbone(config=config, tokenizer=str(tokenizer_dir), template="plain_chat", seed=seed)
    backbone.build()
    with torch.no_grad():  # biases and norms away from their 0 / 1 init, so that a dropped or doubled one shows
        for name, parameter in backbone.model.llm.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                parameter.add_(0.2 * torch.randn_like(parameter))
    return backbone.eval()


@pytest.fixture
def phi_backbone(tokenizer_dir):
    """Phi: 4 layers, 4 heads (MHA) of 16 dims, 8 of them rotary."""
    return make_phi_backbone(tokenizer_dir)


@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_full_model_matches_transformers_phi(tokenizer_dir, qk_layernorm):
    backbone = make_phi_backbone(tokenizer_dir, qk_layernorm=qk_layernorm)
    assert backbone.decoder_layers[0].self_attn.rotary_ndims == 8
    prompt = backbone.chat_template.encode_prompt(
        ["<image>\nWhat colour is the red circle ?"], [], backbone.tokenizer, backbone.image_token_id, backbone.num_image_tokens
    )
    ids = torch.tensor([prompt, prompt])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        embeds = embed_multimodal(backbone, ids, random_images(2))
        reference = backbone.model.llm(inputs_embeds=embeds, attention_mask=mask).logits
        engine = Engine(backbone)
        skipping, _ = engine(embeds, mask, position_ids_from_mask(mask), gated=False)
        full_plan = ExecutionPlan.full(2, backbone.shape.num_layers, PREFIX)
        gated, _ = engine(embeds, mask, position_ids_from_mask(mask), full_plan, gated=True)
    torch.testing.assert_close(_logits(backbone, skipping), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(backbone, gated), reference, atol=1e-5, rtol=0)


def test_left_padded_batch_matches_transformers_phi(phi_backbone):
    backbone = phi_backbone
    ids, mask = _left_padded(backbone, [9, 6, 4], seed=11)
    with torch.no_grad():
        embeds = backbone.embed(ids)
        positions = position_ids_from_mask(mask)
        reference = backbone.model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
        hidden, _ = Engine(backbone)(embeds, mask, positions, gated=False)
    real = mask.bool()
    torch.testing.assert_close(_logits(backbone, hidden)[real], reference[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("level", ["layer", "head"])
def test_gated_equals_skipping_phi(phi_backbone, level):
    backbone = phi_backbone
    ids, mask = _left_padded(backbone, [9, 6, 9, 4, 7], seed=1)
    plan = _layer_plan(5, backbone.shape.num_layers, seed=2) if level == "layer" else _head_plan(backbone, 5, seed=2)
    if level == "head":
        plan.mlp_mask[1, 1] = 0.0  # a layer with attention heads only: fc2's bias must go with its groups
        plan.head_mask[1, 1, 0] = 1.0
    engine = Engine(backbone)
    with torch.no_grad():
        embeds = backbone.embed(ids)
        positions = position_ids_from_mask(mask)
        gated, _ = engine(embeds, mask, positions, plan, gated=True)
        skipping, _ = engine(embeds, mask, positions, plan, gated=False)
        full, _ = engine(embeds, mask, positions, gated=False)
    real = mask.bool()
    torch.testing.assert_close(skipping[real], gated[real], atol=1e-5, rtol=1e-5)
    assert (full[real] - gated[real]).abs().max() > 1e-3  # the plan really changes the result


def test_sliced_layer_equals_a_smaller_phi_layer(phi_backbone):
    """Keeping heads {1, 3} and MLP groups {0, 2} is exactly a Phi layer holding only those rows / columns."""
    from transformers.models.phi.modeling_phi import PhiDecoderLayer

    backbone = phi_backbone
    layer = backbone.decoder_layers[1]
    heads, groups = torch.tensor([1, 3]), torch.tensor([0, 2])
    q_rows = (heads[:, None] * 16 + torch.arange(16)).flatten()
    neurons = (groups[:, None] * 32 + torch.arange(32)).flatten()
    config = backbone.model.llm.config.__class__(**{**backbone.model.llm.config.to_dict(), "num_attention_heads": 2,
                                                    "num_key_value_heads": 2, "intermediate_size": 64})
    config.head_dim = 16
    config._attn_implementation = "sdpa"  # no mask given: SDPA's causal kernel, as the backbone's own layers
    small = PhiDecoderLayer(config, layer_idx=1).eval()
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(small.self_attn, name).weight.copy_(getattr(layer.self_attn, name).weight[q_rows])
            getattr(small.self_attn, name).bias.copy_(getattr(layer.self_attn, name).bias[q_rows])
        small.self_attn.dense.weight.copy_(layer.self_attn.dense.weight[:, q_rows])
        small.self_attn.dense.bias.copy_(layer.self_attn.dense.bias)
        small.mlp.fc1.weight.copy_(layer.mlp.fc1.weight[neurons])
        small.mlp.fc1.bias.copy_(layer.mlp.fc1.bias[neurons])
        small.mlp.fc2.weight.copy_(layer.mlp.fc2.weight[:, neurons])
        small.mlp.fc2.bias.copy_(layer.mlp.fc2.bias)
        small.input_layernorm.load_state_dict(layer.input_layernorm.state_dict())
    scheduled = backbone.shape.num_layers - PREFIX
    attention = torch.ones(1, scheduled, 4)
    mlp = torch.ones(1, scheduled, 4)
    attention[0, 0] = torch.tensor([0.0, 1.0, 0.0, 1.0])
    mlp[0, 0] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    plan = ExecutionPlan(PREFIX, torch.ones(1, scheduled), attention, mlp)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    mask = torch.ones_like(ids)
    positions = position_ids_from_mask(mask)
    engine = Engine(backbone)
    with torch.no_grad():
        x = backbone.embed(ids)
        after_prefix = backbone.decoder_layers[0](x, position_embeddings=backbone.rotary_embeddings(x, positions))
        expected = small(after_prefix, position_embeddings=backbone.rotary_embeddings(x, positions))
        for layer_index in (2, 3):
            expected = backbone.decoder_layers[layer_index](expected, position_embeddings=backbone.rotary_embeddings(x, positions))
        got, _ = engine(x, mask, positions, plan, gated=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("level", ["layer", "head"])
def test_mixed_batch_equals_each_alone_phi(phi_backbone, level):
    backbone = phi_backbone
    lengths = [8, 5, 8, 3]
    ids, mask = _left_padded(backbone, lengths, seed=3)
    plan = _layer_plan(4, backbone.shape.num_layers, seed=4) if level == "layer" else _head_plan(backbone, 4, seed=4)
    engine = Engine(backbone)
    with torch.no_grad():
        together = greedy_generate(engine, backbone.embed(ids), mask, 6, [], plan)
        batched, _ = engine(backbone.embed(ids), mask, position_ids_from_mask(mask), plan, gated=False)
        for row, length in enumerate(lengths):
            alone_ids = ids[row : row + 1, -length:]
            alone_mask = torch.ones_like(alone_ids)
            one = plan.select(torch.tensor([row]))
            alone = greedy_generate(engine, backbone.embed(alone_ids), alone_mask, 6, [], one)
            assert alone.tokens[0] == together.tokens[row]
            single, _ = engine(backbone.embed(alone_ids), alone_mask, position_ids_from_mask(alone_mask), one, gated=False)
            torch.testing.assert_close(batched[row, -length:], single[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("level", ["none", "layer", "head"])
def test_cached_generation_equals_uncached_phi(phi_backbone, level):
    assert_cached_generation_equals_uncached(phi_backbone, level)


def test_kv_cache_keeps_only_kept_phi_heads(phi_backbone):
    backbone = phi_backbone
    ids, mask = _left_padded(backbone, [5, 5], seed=7)
    scheduled = backbone.shape.num_layers - PREFIX
    layer_mask = torch.ones(2, scheduled)
    layer_mask[:, 0] = 0.0
    attention = torch.ones(2, scheduled, 4)
    attention[:, 0] = 0.0
    attention[:, 1, :3] = 0.0  # one of four heads
    mlp = torch.ones(2, scheduled, 4)
    mlp[:, 0] = 0.0
    cache = PlanCache()
    with torch.no_grad():
        Engine(backbone)(backbone.embed(ids), mask, position_ids_from_mask(mask), ExecutionPlan(PREFIX, layer_mask, attention, mlp),
                         gated=False, cache=cache)
    assert cache.groups[1] == []
    assert cache.groups[2][0].keys.shape[1] == 1
    assert cache.groups[3][0].keys.shape[1] == 4


def test_gated_training_reaches_the_plan_phi(phi_backbone):
    """Straight-through: the loss has a gradient with respect to every head / MLP gate of a Phi layer."""
    backbone = phi_backbone
    ids, mask = _left_padded(backbone, [6, 6], seed=8)
    scheduled = backbone.shape.num_layers - PREFIX
    attention = torch.ones(2, scheduled, 4, requires_grad=True)
    mlp = torch.ones(2, scheduled, 4, requires_grad=True)
    plan = ExecutionPlan(PREFIX, torch.ones(2, scheduled), attention, mlp)
    hidden, _ = Engine(backbone)(backbone.embed(ids), mask, position_ids_from_mask(mask), plan, gated=True)
    _logits(backbone, hidden).logsumexp(-1).sum().backward()
    assert attention.grad.abs().sum(-1).gt(0).all() and mlp.grad.abs().sum(-1).gt(0).all()
