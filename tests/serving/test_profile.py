"""`adaptive-mllm profile`: a small grid measured on the tiny model, written as a profile the server reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaptive_mllm.serving import profile
from adaptive_mllm.serving.latency import LatencyModel, Measurement
from adaptive_mllm.serving.profile import fit_warnings
from tests.serving.conftest import write_tiny_recipe


@pytest.mark.parametrize("rule", ["release", "flops"])
def test_profile_writes_a_grid_the_latency_model_reads(tmp_path: Path, tokenizer_dir: Path, rule: str):
    import yaml

    recipe = write_tiny_recipe(tmp_path / "recipe.yaml", tokenizer_dir, max_new_tokens=None)
    config = yaml.safe_load(recipe.read_text())
    config["model"]["scheduler"]["init_args"]["budget_rule"] = rule
    recipe.write_text(yaml.safe_dump(config))
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
        if rule == "flops":  # budget 0 is measured at the smallest admissible: 1 prefix layer of 4 plus the LM head
            assert row["budget"] == 1.0 or 0.25 < row["budget"] < 0.5
            assert row["flops_fraction"] <= row["budget"] + 1e-9
        else:  # the release's rule runs 0 with no scheduled layer, measured at what that costs: 1 layer of 4
            assert row["budget"] in (1.0, 0.25)
            assert row["flops_fraction"] == 1.0 if row["budget"] == 1.0 else 0.25 < row["flops_fraction"] < 0.5
    model = LatencyModel.load(out)
    assert model.meta["grid"]["prompt_lengths"] == [8, 12]


@pytest.mark.parametrize(("flag", "value"), [("--batch_sizes", "0"), ("--decode_tokens", "0"), ("--repeats", "0"), ("--prompt_lengths", "0")])
def test_counts_below_one_are_refused_naming_the_flag(flag, value, capsys):
    from adaptive_mllm.serving.profile import main as profile_main

    with pytest.raises(SystemExit):
        profile_main(["--config", "unread.yaml", "--out", "unused.json", flag, value])
    assert f"{flag} must be >= 1" in capsys.readouterr().err


def test_a_failed_profile_writes_no_file(tmp_path: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """Measurements the latency model cannot fit: the run fails, and leaves no profile for serve to trip on."""
    from adaptive_mllm.serving import profile as profile_module

    write_tiny_recipe(tmp_path / "recipe.yaml", tokenizer_dir, max_new_tokens=None)
    out = tmp_path / "profile.json"
    monkeypatch.setattr(profile_module, "measure", lambda *_: _rows(0.1)[:2])
    argv = ["--config", str(tmp_path / "recipe.yaml"), "--out", str(out), "--budgets", "1.0", "0.6", "--prompt_lengths", "8",
            "--batch_sizes", "1", "2", "--decode_tokens", "2", "--repeats", "1"]  # fmt: skip
    with pytest.raises(ValueError, match="at least 4 measurements"):
        profile(argv)
    assert list(tmp_path.iterdir()) == [tmp_path / "recipe.yaml"]  # nor a temporary file


class _Loaded(Exception):
    """The arguments got past every check made before the model loads."""


def _refuse_to_load(*_: object) -> None:
    raise _Loaded


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--budgets", "1.0", "2.0", "0.5"], "--budgets: 2.0 is outside [0, 1]"),
        (["--budgets", "1.0", "-1", "0.5"], "--budgets: -1.0 is outside [0, 1]"),
        (["--budgets", "1.0", "nan", "0.5"], "--budgets: nan is outside [0, 1]"),
        (["--budgets", "1.0", "inf", "0.5"], "--budgets: inf is outside [0, 1]"),
        (["--budgets", "1.0", "0.5"], "the grid has 2 points (2 --budgets x 1 --prompt_lengths x 1 --batch_sizes)"),
        (["--budgets", "1.0", "0.5", "1.0"], "the latency model needs at least 4 to fit"),
    ],
)
def test_bad_arguments_are_refused_before_the_model_loads(
    tmp_path: Path, flags: list[str], problem: str, capsys, monkeypatch: pytest.MonkeyPatch
):
    """They were found only after the model had loaded and the grid been measured (minutes on a 7B model)."""
    from adaptive_mllm.serving import server

    monkeypatch.setattr(server, "build_model", _refuse_to_load)
    argv = ["--config", "unread.yaml", "--out", str(tmp_path / "p.json"), "--prompt_lengths", "20", "--batch_sizes", "1"]
    with pytest.raises(SystemExit) as exit_info:
        profile([*argv, *flags])
    assert exit_info.value.code == 2 and problem in capsys.readouterr().err
    with pytest.raises(_Loaded):  # the same command with good budgets goes on to load the model
        profile([*argv, "--budgets", "1.0", "0.75", "0.5", "0.0"])


def test_an_out_that_is_a_directory_exists_or_cannot_be_made_is_refused_before_the_model_loads(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
):
    from adaptive_mllm.serving import server

    monkeypatch.setattr(server, "build_model", _refuse_to_load)
    (tmp_path / "existing.json").write_text("keep\n")
    (tmp_path / "a-file").write_text("")
    argv = ["--config", "unread.yaml", "--prompt_lengths", "20", "--batch_sizes", "1", "--budgets", "1.0", "0.75", "0.5", "0.0"]
    for out, problem in [
        (tmp_path, f"--out {tmp_path} is a directory; name a file"),
        (tmp_path / "existing.json", f"--out {tmp_path / 'existing.json'} exists; choose another path, or pass --overwrite"),
        (tmp_path / "a-file" / "p.json", f"{tmp_path / 'a-file'} is not a directory"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            profile([*argv, "--out", str(out)])
        assert exit_info.value.code == 2 and problem in capsys.readouterr().err
    assert (tmp_path / "existing.json").read_text() == "keep\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file", "existing.json"]  # no stray temporary file
    with pytest.raises(_Loaded):  # replaced only when asked
        profile([*argv, "--out", str(tmp_path / "existing.json"), "--overwrite"])
    with pytest.raises(_Loaded):  # a folder that does not exist yet is made
        profile([*argv, "--out", str(tmp_path / "new" / "p.json")])


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--prompt_lengths", "500"], "--prompt_lengths 500: with --decode_tokens 2 and the latency token it is 503 tokens, "
                                      "more than the model's maximum length 256"),  # fmt: skip
        (["--prompt_lengths", "8", "254"], "--prompt_lengths 254: with --decode_tokens 2 and the latency token it is 257"),
        (["--prompt_lengths", "4", "12"], "--prompt_lengths 4 must exceed the model's 4 image placeholders"),
        (["--prompt_lengths", "12", "--budgets", "0.0", "0.01", "0.02", "0.03", "--model.scheduler.init_args.budget_rule=flops"],
         "the grid has 1 distinct points"),  # the FLOPs rule raises all four to the smallest admissible
    ],
)
def test_prompts_the_model_cannot_take_are_refused_before_anything_is_measured(
    tmp_path: Path, tokenizer_dir: Path, flags: list[str], problem: str, capsys, monkeypatch: pytest.MonkeyPatch
):
    from adaptive_mllm.serving import profile as profile_module

    def never(*_: object) -> None:
        raise AssertionError("measured")

    monkeypatch.setattr(profile_module, "measure", never)
    write_tiny_recipe(tmp_path / "recipe.yaml", tokenizer_dir, max_new_tokens=None)
    with pytest.raises(SystemExit) as exit_info:
        profile(["--config", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "p.json"), "--decode_tokens", "2",
                 "--batch_sizes", "1", *flags])  # fmt: skip
    assert exit_info.value.code == 2 and problem in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize(("overrides", "latency_token"), [([], 1), (["--model.scheduler=null"], 0)])
def test_the_default_longest_prompt_is_the_longest_the_model_admits(tmp_path: Path, tokenizer_dir: Path, overrides, latency_token):
    """The default counted a latency token for every model: one without a scheduler was profiled a token short of
    the longest prompt it takes."""
    import argparse

    from adaptive_mllm.serving import profile as profile_module
    from adaptive_mllm.serving.server import build_model

    model = build_model(str(write_tiny_recipe(tmp_path / "recipe.yaml", tokenizer_dir)), None, None, overrides)
    longest = profile_module.default_prompt_lengths(model, 4)[1]
    assert longest == model.backbone.max_length - 4 - latency_token  # the tiny model: under the image + 512 tokens
    parser = argparse.ArgumentParser()
    profile_module.check_against_model(parser, model, [1.0], [longest], [1, 2, 4, 8], 4)
    with pytest.raises(SystemExit):
        profile_module.check_against_model(parser, model, [1.0], [longest + 1], [1, 2, 4, 8], 4)


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
