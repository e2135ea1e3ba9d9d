"""`adaptive-mllm memory`: the estimate against what a training step on the CPU really holds (tiny recipe), and
the real 7B recipe planned on 8 GPUs from its config alone (on the meta device)."""

from __future__ import annotations

import gc
import json

import pytest
import torch

from adaptive_mllm import memory
from adaptive_mllm.backbones.local import CheckpointError
from adaptive_mllm.cli import main
from adaptive_mllm.recipe import build_model
from tests.test_recipes_real import RECIPE_DIR, lay_out_standins

GIB = 1024**3
# llava-hf/llava-1.5-7b-hf's config.json (Vicuna-7B + CLIP ViT-L/14-336): the sizes only
LLAVA_7B = {
    "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "image_token_index": 32000,
    "pad_token_id": 32001, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default", "tie_word_embeddings": False,
    "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
                    "rms_norm_eps": 1e-5, "vocab_size": 32064},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
}  # fmt: skip
LLAVA_7B_PARAMETERS = 7_063_427_072  # the published model's count (vision tower, projector, Vicuna-7B with 32064 rows)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _measure_step(model, batch_size: int, seq_len: int) -> dict[str, float]:
    """One training step on the CPU: the bytes autograd holds once the forward (and loss) is done, from the
    profiler's allocation records (allocations minus frees of every op), then parameters, gradients and
    AdamW's state summed over their tensors after the optimiser step."""
    backbone = model.backbone
    ids = torch.randint(5, 20, (batch_size, seq_len - 1))  # the latency token makes it seq_len
    ids[:, 1 : 1 + backbone.num_image_tokens] = backbone.image_token_id
    size = memory._vision_tower(model).config.image_size
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
             "prompt_lengths": torch.full((batch_size,), 2 + backbone.num_image_tokens),
             "pixel_values": torch.randn(batch_size, 3, size, size)}  # fmt: skip
    model.train()
    # no garbage collection inside the profile: freeing an earlier test's objects (a trainer and its model hold
    # each other) would count as negative bytes held
    gc.collect()
    gc.disable()
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
            logits, labels = model(batch, torch.full((batch_size,), 0.8))
            loss = model._loss(logits, labels)
    finally:
        gc.enable()
    held = sum(event.self_cpu_memory_usage for event in profile.events())
    loss.backward()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    optimizer.step()
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return {"activations": held, "parameters": _nbytes(model.parameters()), "gradients": _nbytes(grads), "optimizer": _nbytes(state)}


@pytest.mark.parametrize("lora", [None, "{rank: 8, dropout: 0.05}"], ids=["full", "lora"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_tiny_estimate_matches_a_measured_step(tokenizer_dir, checkpointing, lora):
    args = ["--config", str(RECIPE_DIR / "tiny.yaml"), f"--model.backbone.init_args.tokenizer={tokenizer_dir}",
            f"--model.activation_checkpointing={checkpointing}"]  # fmt: skip
    if lora is not None:
        args.append(f"--model.lora={lora}")
    plan = memory.plan_memory(memory.build_on_meta(args).model, batch_size=4, seq_len=64)
    assert plan.checkpointing is checkpointing
    measured = _measure_step(build_model([*args, *memory.UNUSED_TRAINER]), batch_size=4, seq_len=64)
    assert plan.parameters == measured["parameters"]
    # a handful of parameters get no gradient in this step (the tower's unused last norm): within 0.1%
    assert measured["gradients"] <= plan.gradients < 1.001 * measured["gradients"]
    assert measured["optimizer"] <= plan.optimizer < 1.001 * measured["optimizer"]
    # after the forward a checkpointed step holds only the layers' inputs; one layer is recomputed later
    expected = plan.activations_checkpointed - plan.recompute if checkpointing else plan.activations_full
    assert 0.8 < expected / measured["activations"] < 1.2, (expected, measured["activations"])


def test_llava7b_on_8_gpus_from_its_config_alone(tokenizer_dir, tmp_path, monkeypatch, capsys):
    """The real sizes, built on the meta device: no weight is read (the stand-in's weights have other shapes)."""
    monkeypatch.chdir(tmp_path)
    lay_out_standins(tmp_path, "llava7b.yaml", tokenizer_dir)
    (tmp_path / "checkpoints" / "llava-v1.5-7b-hf" / "config.json").write_text(json.dumps(LLAVA_7B))
    main(["memory", "--config", str(RECIPE_DIR / "llava7b.yaml"), "--trainer.devices=8"])
    printed = capsys.readouterr().out
    assert "8 processes, LayerShardedStrategy" in printed and "total, with checkpointing" in printed
    eight = memory.main(["--config", str(RECIPE_DIR / "llava7b.yaml"), "--trainer.devices=8"])
    one = memory.main(["--config", str(RECIPE_DIR / "llava7b.yaml"), "--trainer.devices=1"])
    model = memory.build_on_meta(["--config", str(RECIPE_DIR / "llava7b.yaml")]).model
    assert all(p.device.type == "meta" for p in model.parameters())
    scheduler = sum(p.numel() for p in model.scheduler.parameters())
    assert one.parameters / 4 == LLAVA_7B_PARAMETERS + scheduler  # fp32 master weights
    assert eight.parameters == pytest.approx(one.parameters / 8)
    assert eight.optimizer == pytest.approx(2 * eight.gradients)  # the LLM and projector train, the tower is frozen
    assert (eight.batch_size, eight.seq_len, eight.checkpointing) == (4, 2049, True)
    assert eight.total() < 80 * GIB < one.total()  # fits the release's 80 GB GPUs only when sharded
    assert eight.total(checkpointing=False) > eight.total()


def test_the_zero3_variant_plans_as_much_model_state_per_gpu(tokenizer_dir, tmp_path, monkeypatch):
    """ZeRO-3 (the release's setup) and per-layer FSDP2 both spread 16 bytes per trained parameter over the GPUs."""
    monkeypatch.chdir(tmp_path)
    lay_out_standins(tmp_path, "llava7b.yaml", tokenizer_dir)
    (tmp_path / "checkpoints" / "llava-v1.5-7b-hf" / "config.json").write_text(json.dumps(LLAVA_7B))
    fsdp = memory.main(["--config", str(RECIPE_DIR / "llava7b.yaml")])
    zero3 = memory.main(["--config", str(RECIPE_DIR / "llava7b-zero3.yaml")])
    assert zero3.strategy == "DeepSpeedStrategy (ZeRO-3)" and zero3.devices == 8
    assert zero3.parameters + zero3.gradients + zero3.optimizer == fsdp.parameters + fsdp.gradients + fsdp.optimizer


def test_a_missing_checkpoint_directory_says_what_the_plan_needs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no checkpoints/ here
    with pytest.raises(CheckpointError, match="llava-v1.5-7b-hf does not exist; the memory plan reads only its config.json"):
        memory.main(["--config", str(RECIPE_DIR / "llava7b.yaml"), "--trainer.devices=8"])


@pytest.mark.parametrize("flag", ["--batch_size", "--seq_len", "--trainer.devices", "--trainer.num_nodes"])
def test_zero_is_refused_not_read_as_the_recipes_value(flag, capsys):
    from adaptive_mllm.memory import main as memory_main

    with pytest.raises(SystemExit):
        memory_main(["--config", "unread.yaml", flag, "0"])
    assert f"{flag} must be >= 1" in capsys.readouterr().err


def test_the_lora_variant_plans_gradients_and_moments_for_the_adapters_only(tokenizer_dir, tmp_path, monkeypatch, capsys):
    """recipes/llava7b-lora.yaml on LLaVA-1.5-7B's config: the trained parameters are the adapters (rank 128 on the
    seven projections of 32 layers), the projector and the scheduler; counted here from the sizes by hand."""
    monkeypatch.chdir(tmp_path)
    lay_out_standins(tmp_path, "llava7b-lora.yaml", tokenizer_dir)
    (tmp_path / "checkpoints" / "llava-v1.5-7b-hf" / "config.json").write_text(json.dumps(LLAVA_7B))
    recipe = str(RECIPE_DIR / "llava7b-lora.yaml")
    plan = memory.main(["--config", recipe, "--trainer.devices=8"])
    model = memory.build_on_meta(["--config", recipe]).model
    hidden, inner, rank = 4096, 11008, 128
    per_layer = rank * (4 * (hidden + hidden) + 2 * (hidden + inner) + (inner + hidden))  # q k v o, gate up, down
    projector = 1024 * hidden + hidden + hidden * hidden + hidden
    scheduler = sum(p.numel() for p in model.scheduler.parameters())
    trained = 32 * per_layer + projector + scheduler
    assert plan.gradients == pytest.approx(trained * 4 / 8) and plan.optimizer == pytest.approx(2 * plan.gradients)
    assert plan.parameters == pytest.approx((LLAVA_7B_PARAMETERS + 32 * per_layer + scheduler) * 4 / 8)
    assert (plan.batch_size, plan.seq_len) == (16, 2049)
    full = memory.main(["--config", str(RECIPE_DIR / "llava7b.yaml"), "--trainer.devices=8"])
    assert plan.gradients < full.gradients / 15


def test_a_seq_len_over_the_models_maximum_is_planned_with_a_warning(tokenizer_dir, capsys):
    """A plan for a longer context than the recipe's is a fair question (before raising max_length), so it is
    answered, but said: the recipe itself never trains records that long."""
    args = ["--config", str(RECIPE_DIR / "tiny.yaml"), f"--model.backbone.init_args.tokenizer={tokenizer_dir}"]
    longer = memory.main([*args, "--seq_len", "100000"])
    assert longer.seq_len == 100000
    warning = capsys.readouterr().err
    assert "warning: --seq_len 100000 is longer than the recipe's records can be (129 tokens" in warning
    assert "model.backbone.init_args.max_length" in warning
    longest = memory.main([*args, "--seq_len", "129"])  # max_length 128 + the latency token: the default
    assert longest.total() == memory.main(args).total() and capsys.readouterr().err == ""
