"""`adaptive-mllm profile`: a small grid measured on the tiny model, written as a profile the server reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaptive_mllm.serving import profile
from adaptive_mllm.serving.latency import LatencyModel, Measurement
from adaptive_mllm.serving.profile import fit_warnings
from tests.serving.conftest import write_tiny_recipe


def test_profile_writes_a_grid_the_latency_model_reads(tmp_path: Path, tokenizer_dir: Path):
    write_tiny_recipe(tmp_path / "recipe.yaml", tokenizer_dir, max_new_tokens=None)
    out = tmp_path / "profile.json"
    argv = ["--config", str(tmp_path / "recipe.yaml"), "--out", str(out), "--budgets", "1.0", "0.0",
            "--prompt_lengths", "8", "12", "--batch_sizes", "1", "2", "--decode_tokens", "2", "--repeats", "1"]  # fmt: skip
    profile(argv)
    written = json.loads(out.read_text())
    assert written["format"] == 1 and written["dtype"] == "float32" and written["device"].startswith("cpu")
    assert written["grid"]["batch_sizes"] == [1, 2]
    rows = written["measurements"]
    assert len(rows) == 2 * 2 * 2  # budgets x lengths x batch sizes
    for row in rows:
        assert row["prompt_tokens"] in (9, 13)  # + the latency token
        assert row["prefill_ms"] > 0 and row["decode_ms_per_token"] > 0
        # budget 0 is measured at the smallest admissible budget: 1 prefix layer of 4 plus the LM head
        assert row["budget"] == 1.0 or 0.25 < row["budget"] < 0.5
        assert row["flops_fraction"] <= row["budget"] + 1e-9
    model = LatencyModel.load(out)
    assert model.meta["grid"]["prompt_lengths"] == [8, 12]


@pytest.mark.parametrize(("flag", "value"), [("--batch_sizes", "0"), ("--decode_tokens", "0"), ("--repeats", "0"), ("--prompt_lengths", "0")])
def test_counts_below_one_are_refused_naming_the_flag(flag, value, capsys):
    from adaptive_mllm.serving.profile import main as profile_main

    with pytest.raises(SystemExit):
        profile_main(["--config", "unread.yaml", "--out", "unused.json", flag, value])
    assert f"{flag} must be >= 1" in capsys.readouterr().err


def test_a_failed_profile_writes_no_file(tmp_path: Path, tokenizer_dir: Path):
    """One grid point cannot fit the 3 coefficients: the run fails, and leaves no profile for serve to trip on."""
    write_tiny_recipe(tmp_path / "recipe.yaml", tokenizer_dir, max_new_tokens=None)
    out = tmp_path / "profile.json"
    argv = ["--config", str(tmp_path / "recipe.yaml"), "--out", str(out), "--budgets", "1.0", "--prompt_lengths", "8",
            "--batch_sizes", "1", "--decode_tokens", "2", "--repeats", "1"]  # fmt: skip
    with pytest.raises(ValueError, match="at least 3 measurements"):
        profile(argv)
    assert list(tmp_path.iterdir()) == [tmp_path / "recipe.yaml"]  # nor a temporary file


@pytest.mark.parametrize("flag", [["--model.budgt=0.5"], ["--bogus_flag", "3"], ["--batch-sizes", "1"]])
def test_an_unknown_flag_is_a_usage_error(tmp_path: Path, tokenizer_dir: Path, flag: list[str], capsys):
    write_tiny_recipe(tmp_path / "recipe.yaml", tokenizer_dir, max_new_tokens=None)
    with pytest.raises(SystemExit) as exit_info:
        profile(["--config", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "p.json"), *flag])
    assert exit_info.value.code == 2 and flag[0].split("=")[0] in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def _rows(decode_per_batch: float, noise: float = 0.0) -> list[Measurement]:
    """A grid whose decode step changes by ``decode_per_batch`` ms per batch row; ``noise``: every other point
    measured that fraction slower."""
    return [
        Measurement(b, b, t, n, (5 + 0.01 * n * t + 0.5 * b * n * t) * (1 + noise * (i % 2)), 2 + decode_per_batch * n + 1.0 * b * n)
        for i, (b, t, n) in enumerate((b, t, n) for b in (1.0, 0.5) for t in (20, 60) for n in (1, 4, 8))
    ]  # fmt: skip


def test_a_fit_that_predicts_more_work_faster_or_fits_badly_is_warned_about(
    tmp_path: Path, tokenizer_dir: Path, capsys, monkeypatch: pytest.MonkeyPatch
):
    """A busy machine's profile fitted d1 = -0.24 (a batch of 4 predicted faster than one request) and errors up
    to +178%, and was written without a word."""
    from adaptive_mllm.serving import profile as profile_module

    assert fit_warnings(LatencyModel.fit(_rows(0.1)), _rows(0.1)) == []
    negative = fit_warnings(LatencyModel.fit(_rows(-0.3)), _rows(-0.3))
    assert len(negative) == 1 and "d1 (decode per B) is -0.3 < 0" in negative[0] and "--repeats" in negative[0]
    noisy = fit_warnings(LatencyModel.fit(_rows(0.1, noise=3.0)), _rows(0.1, noise=3.0))
    assert any("worst fit error" in warning and "--repeats" in warning for warning in noisy)
    # the command says it, and still writes the profile
    write_tiny_recipe(tmp_path / "recipe.yaml", tokenizer_dir, max_new_tokens=None)
    monkeypatch.setattr(profile_module, "measure", lambda *_: _rows(-0.3))
    profile(["--config", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "p.json")])
    assert "warning: the fitted d1 (decode per B) is -0.3 < 0" in capsys.readouterr().err
    assert (tmp_path / "p.json").is_file()
