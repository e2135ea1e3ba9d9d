"""The latency encoder and the value schedulers hand it."""

from __future__ import annotations

import math

import torch

from adaptive_mllm.backbones.base import DecoderShape
from adaptive_mllm.schedulers import HeadScheduler, LatencyEncoder, LayerScheduler

SHAPE = DecoderShape(num_layers=8, hidden_size=64, num_heads=8, num_kv_heads=2, head_dim=8, intermediate_size=128, vocab_size=100)


def test_features_are_sin_cos_of_two_pi_value() -> None:
    encoder = LatencyEncoder(hidden_size=32)
    value = torch.tensor([0.0, 0.25, 0.6])
    features = encoder.features(value)
    assert features.shape == (3, 256)
    for i in (0, 1, 64, 127):
        frequency = 1.0 / 10000 ** (i / 128)
        torch.testing.assert_close(features[:, i], torch.sin(2 * math.pi * value * frequency))
        torch.testing.assert_close(features[:, 128 + i], torch.cos(2 * math.pi * value * frequency))
    assert torch.equal(features[0, :128], torch.zeros(128)) and torch.equal(features[0, 128:], torch.ones(128))


def test_architecture_and_gradients() -> None:
    torch.manual_seed(0)
    encoder = LatencyEncoder(hidden_size=48)
    assert isinstance(encoder.norm, torch.nn.LayerNorm) and encoder.norm.normalized_shape == (256,)
    assert (encoder.up.in_features, encoder.up.out_features) == (256, 48)
    assert (encoder.down.in_features, encoder.down.out_features) == (48, 48)
    token = encoder(torch.tensor([0.2, 0.5]))
    assert token.shape == (2, 48)
    assert not torch.allclose(token[0], token[1])
    token.square().sum().backward()
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_bf16_module_keeps_float32_frequencies() -> None:
    encoder = LatencyEncoder(hidden_size=16).to(torch.bfloat16)
    assert encoder.features(torch.tensor([0.3])).dtype == torch.float32
    assert encoder(torch.tensor([0.3])).dtype == torch.bfloat16


def test_schedulers_encode_units_over_units_plus_one() -> None:
    torch.manual_seed(0)
    for scheduler in (LayerScheduler(4), HeadScheduler(4, rank=4)):
        scheduler.configure(SHAPE)
        lengths = torch.tensor([10, 10, 10])
        budgets = torch.tensor([1.0, 0.8, scheduler.cost.min_budget(10)])
        k = scheduler.units_for_budget(budgets, lengths)
        assert k[0] == scheduler.num_units and k[2] == 0
        token = scheduler.latency_token(budgets, lengths)
        expected = scheduler.latency_encoder(k.float() / (scheduler.num_units + 1))
        torch.testing.assert_close(token, expected)
        assert token.shape == (3, SHAPE.hidden_size)


def test_initialisation_is_the_releases() -> None:
    """The release's scheduler and latency encoder live inside its transformers model and get its
    ``_init_weights``: Linear weights N(0, 0.02) (Llama's initializer_range), zero biases; LayerNorm 1 / 0.
    PyTorch's default (Kaiming-uniform, std 1 / sqrt(3 fan_in), non-zero biases) is not that."""
    from adaptive_mllm.schedulers import StaticScheduler

    torch.manual_seed(0)
    for scheduler in (LayerScheduler(4), HeadScheduler(4, rank=4), StaticScheduler(4, insert_latency_token=True)):
        scheduler.configure(SHAPE)
        linears = [m for m in scheduler.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == (2 if isinstance(scheduler, StaticScheduler) else 3)  # latency encoder (+ the head)
        for linear in linears:
            assert bool((linear.bias == 0).all())
            weight = linear.weight.detach()
            # std of n >= 320 normal draws: within 12% of 0.02 (4 standard errors at n = 320)
            assert abs(float(weight.std()) - 0.02) < 0.0024, (type(scheduler).__name__, weight.shape)
            assert abs(float(weight.mean())) < 0.005
        norm = scheduler.latency_encoder.norm
        assert bool((norm.weight == 1).all()) and bool((norm.bias == 0).all())
