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


TINY = ["--config", str(RECIPES / "tiny.yaml"), "--data.init_args.num_train=16", "--data.init_args.num_val=8",
        "--data.init_args.num_test=8"]  # fmt: skip


@pytest.fixture
def built_on(monkeypatch):
    """The devices the benchmark built its model on: refused input must stop at the shapes (meta), before any weights."""
    from adaptive_mllm import benchmark

    devices = []
    real = benchmark.build_model

    def build(args, device="cpu"):
        devices.append(device)
        return real(args, device)

    monkeypatch.setattr(benchmark, "build_model", build)
    return devices


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        # 1 of 8 layers always runs: >= 0.125; it failed after the build, naming no option
        (["--budgets", "0.1", "--prompt_length", "24", "--model.scheduler.init_args.budget_rule=flops"],
         "--budgets: budget 0.1 (example 1) is outside the admissible range"),
        # the tiny recipe's max_length is 128: the default 600-token prompt was timed and reported
        ([], "--prompt_length 600 + --decode_tokens 16 + 1 latency token is 617 tokens, more than the model's maximum length 128"),
        (["--prompt_length", "24", "--decode_tokens", "500"], "--prompt_length 24 + --decode_tokens 500 + 1 latency token is 525"),
        (["--prompt_length", "112", "--decode_tokens", "16"], "is 129 tokens, more than the model's maximum length 128"),
    ],
)
def test_what_the_model_cannot_run_is_refused_before_building_or_timing(tmp_path, monkeypatch, capsys, built_on, flags, problem):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, "--repeats", "1", *flags])
    assert exit_info.value.code == 2 and problem in capsys.readouterr().err
    assert built_on == ["meta"]


def test_the_longest_prompt_that_fits_is_timed(tmp_path, monkeypatch, built_on):
    from adaptive_mllm import benchmark

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(benchmark, "run_benchmark", lambda *args: [])
    monkeypatch.setattr(benchmark, "print_rows", lambda rows: None)
    main([*TINY, "--prompt_length", "111", "--decode_tokens", "16", "--budgets", "1.0", "0.5"])  # 111 + 1 + 16 = 128
    assert built_on == ["meta", "cpu"]


def test_without_a_latency_token_the_prompt_and_answer_may_fill_the_maximum_length(tmp_path, monkeypatch, capsys, built_on):
    from adaptive_mllm import benchmark

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(benchmark, "run_benchmark", lambda *args: [])
    monkeypatch.setattr(benchmark, "print_rows", lambda rows: None)
    flags = [*TINY, "--model.scheduler=null", "--decode_tokens", "16", "--budgets", "1.0"]
    main([*flags, "--prompt_length", "112"])  # 112 + 16 = 128, no latency token
    assert built_on == ["meta", "cpu"]
    with pytest.raises(SystemExit):
        main([*flags, "--prompt_length", "113"])
    assert "--prompt_length 113 + --decode_tokens 16 is 129 tokens, more than the model's maximum length 128" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-5", "0", "nan", "inf"])
def test_a_bandwidth_that_is_not_a_positive_number_is_refused(value, capsys):
    """``--bandwidth_gbs -5`` printed negative "vs limit" ratios."""
    with pytest.raises(SystemExit):
        main(["--config", "unread.yaml", "--bandwidth_gbs", value])
    assert f"--bandwidth_gbs {float(value)} must be a finite number > 0" in capsys.readouterr().err


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
