"""bench/gpu_decode.py: the issue's two checks on the benchmark's rows, and a dry run on the CPU."""

from __future__ import annotations

from pathlib import Path

from bench.gpu_decode import checks, main

RECIPES = Path(__file__).parents[2] / "recipes"


def _row(budget: float, ms: float, ratio: float, fraction: float) -> dict:
    return {"budget": budget, "selector": "none", "mode_decode_s": ms / 1000, "decode_s": 4 * ms / 1000,
            "decode_mode": "captured", "mode_decode_ratio": ratio, "weights_fraction": fraction}  # fmt: skip


def test_checks_pass_and_fail_on_the_issue_thresholds():
    met = checks([_row(1.0, 5.5, 1.0, 1.0), _row(0.6, 3.0, 0.60, 0.56), {"budget": "transformers"}], 1.0, 0.6, 6.0, 0.05)
    assert [ok for _, ok in met] == [True, True]
    assert "5.50 ms per token (captured; eager 22.00 ms) <= 6 ms" in met[0][0]
    missed = checks([_row(1.0, 6.5, 1.0, 1.0), _row(0.6, 3.0, 0.70, 0.56)], 1.0, 0.6, 6.0, 0.05)
    assert [ok for _, ok in missed] == [False, False]
    assert "difference +0.140" in missed[1][0]


def test_a_dry_run_on_the_cpu_prints_both_checks(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status = main(
        ["--config", str(RECIPES / "tiny.yaml"), "--device", "cpu", "--prompt_length", "24", "--decode_tokens", "2",
         "--repeats", "1", "--decode", "static", "--target_ms", "1e6", "--tolerance", "1e6"]  # one noisy round: only the plumbing
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.count("PASS ") == 4 and "static decodes the eager tokens at budget 0.6" in out and "static ms/token" in out
