"""`adaptive-mllm benchmark` runs and reports what it measured beside the plan's FLOPs."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptive_mllm.benchmark import main

RECIPES = Path(__file__).parents[1] / "recipes"


def test_benchmark_reports_ratios_and_flops(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows = main(
        [
            "--config", str(RECIPES / "tiny.yaml"),
            "--data.init_args.num_train=16", "--data.init_args.num_val=8", "--data.init_args.num_test=8",
            "--budgets", "1.0", "0.8", "0.6",
            "--prompt_length", "24", "--repeats", "1", "--decode_tokens", "2",
        ]
    )  # fmt: skip
    by_budget = {row["budget"]: row for row in rows}
    assert by_budget[1.0]["flops_fraction"] == pytest.approx(1.0)
    assert by_budget[1.0]["prefill_ratio"] == pytest.approx(1.0)
    # fewer units, fewer FLOPs, never above the budget
    assert by_budget[0.6]["units"] < by_budget[0.8]["units"] < by_budget[1.0]["units"]
    for budget in (0.8, 0.6):
        assert by_budget[budget]["flops_fraction"] <= budget
    assert by_budget["transformers"]["ratio"] > 0
    out = capsys.readouterr().out
    assert "ratio ours / transformers" in out
    # decoding timed eager and in the default mode (static on the CPU); the weights a step reads follow the plan
    assert by_budget[1.0]["decode_mode"] == "static" and "static ms/token" in out and "decode: eager (growing cache) vs static" in out
    assert by_budget[1.0]["weights_fraction"] == pytest.approx(1.0)
    assert by_budget[0.6]["weights_fraction"] < by_budget[0.8]["weights_fraction"] < 1.0
    assert all(by_budget[b]["mode_decode_s"] > 0 and by_budget[b]["limit_s"] is None for b in (1.0, 0.8, 0.6))


def test_benchmark_rejects_a_budget_below_the_prefix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="admissible range"):
        main(
            [
                "--config", str(RECIPES / "tiny.yaml"),
                "--data.init_args.num_train=16", "--data.init_args.num_val=8", "--data.init_args.num_test=8",
                "--budgets", "0.1", "--prompt_length", "24", "--repeats", "1",  # 1 of 8 layers always runs: >= 0.125
            ]
        )  # fmt: skip


def test_benchmark_runs_a_phi_backbone(tokenizer_dir):
    from adaptive_mllm.backbones import MiphaBackbone
    from adaptive_mllm.benchmark import run_benchmark
    from adaptive_mllm.module import AdaptiveMLLM
    from adaptive_mllm.schedulers import LayerScheduler

    config = {
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16),
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4),
    }
    model = AdaptiveMLLM(MiphaBackbone(config=config, tokenizer=str(tokenizer_dir), template="plain_chat"), LayerScheduler(2))
    model.configure_model()
    rows = run_benchmark(model, [1.0, 0.7], prompt_length=12, repeats=1, decode_tokens=2)
    by_budget = {row["budget"]: row for row in rows}
    assert by_budget[0.7]["units"] < by_budget[1.0]["units"]
    assert by_budget[0.7]["flops_fraction"] <= 0.7
    assert by_budget["transformers"]["ratio"] > 0


@pytest.mark.parametrize("flag", ["--batch_size", "--decode_tokens", "--repeats", "--prompt_length"])
def test_counts_below_one_are_refused_naming_the_flag(flag, capsys):
    """They crashed deep inside (a reshape of 0 elements, a division by zero, a median of nothing)."""
    from adaptive_mllm.benchmark import main as benchmark_main

    with pytest.raises(SystemExit):
        benchmark_main(["--config", "unread.yaml", flag, "0"])
    assert f"{flag} must be >= 1" in capsys.readouterr().err
