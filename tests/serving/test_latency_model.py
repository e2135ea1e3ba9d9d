"""LatencyModel: fitting, prediction, inversion, profile files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adaptive_mllm.serving.correction import RunningRatio
from adaptive_mllm.serving.latency import LatencyModel, Measurement, save_profile

# hand-chosen coefficients: prefill 2 + 0.01*B*T + 0.05*b*B*T + 0.5*b ms, decode 1 + 0.1*B + 0.4*b*B + 0.3*b ms / token
PREFILL = (2.0, 0.01, 0.05, 0.5)
DECODE = (1.0, 0.1, 0.4, 0.3)


def _exact(budget: float, tokens: int, batch: int) -> Measurement:
    prefill = PREFILL[0] + PREFILL[1] * batch * tokens + PREFILL[2] * budget * batch * tokens + PREFILL[3] * budget
    decode = DECODE[0] + DECODE[1] * batch + DECODE[2] * budget * batch + DECODE[3] * budget
    return Measurement(budget, budget, tokens, batch, prefill, decode)


def _grid() -> list[Measurement]:
    return [_exact(b, t, n) for b in (1.0, 0.8, 0.6) for t in (24, 64) for n in (1, 4)]


def test_fit_recovers_the_coefficients_of_exact_measurements():
    model = LatencyModel.fit(_grid())
    assert model.prefill == pytest.approx(PREFILL, abs=1e-9)
    assert model.decode == pytest.approx(DECODE, abs=1e-9)


def test_a_measured_cpu_profile_is_fitted_within_15_percent():
    """A tiny model's profile measured on a 2-core CPU (a review's, 2026-12-08): a decoding step costs 13 / 14 / 16 ms
    at batch 1 / 4 / 8 at budget 1.0 and 2.5 ms at the smallest budget, a cost per kept layer the batch does not
    share. Without the per-budget terms the fit erred -29% / +94% with negative per-batch coefficients."""
    from adaptive_mllm.serving.profile import fit_errors, fit_warnings

    path = Path(__file__).parent / "data" / "tiny-cpu-profile.json"
    model = LatencyModel.load(path)
    rows = [Measurement(**row) for row in json.loads(path.read_text())["measurements"]]
    assert len(rows) == 30
    assert max(abs(error) for error in fit_errors(model, rows)) < 0.15
    assert fit_warnings(model, rows) == []
    # the three-term form (no per-budget term), fitted here apart, could not follow it
    x = np.array([[1.0, r.batch_size, r.budget * r.batch_size] for r in rows])
    y = np.array([r.decode_ms_per_token for r in rows])
    three = x @ np.linalg.lstsq(x, y, rcond=None)[0]
    assert max(abs(three / y - 1)) > 0.5


def test_prediction_by_hand():
    model = LatencyModel(PREFILL, DECODE)
    # budget 0.5, T=40, B=2, 3 new tokens = prefill + 2 decoding steps:
    # prefill 2 + 0.8 + 2.0 + 0.25 = 5.05; decode 1 + 0.2 + 0.4 + 0.15 = 1.75 per step
    assert model.predict_ms(0.5, 40, 3, 2) == pytest.approx(5.05 + 2 * 1.75)
    assert model.predict_ms(0.5, 40, 3, 2, scale=2.0) == pytest.approx(2 * (5.05 + 2 * 1.75))
    assert model.predict_ms(0.5, 40, 1, 2) == pytest.approx(5.05)


@pytest.mark.parametrize("budget", [0.55, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("batch", [1, 3])
def test_inverts_its_own_predictions(budget: float, batch: int):
    model = LatencyModel(PREFILL, DECODE, margin=0.25)
    deadline = model.predict_ms(budget, 50, 4, batch) * 1.25
    choice = model.budget_for_deadline(deadline, 50, 4, batch, min_budget=0.5)
    assert choice.met
    assert choice.budget == pytest.approx(budget, abs=2e-6)
    assert choice.budget <= budget + 1e-12  # never above: rounded down
    assert choice.predicted_ms * 1.25 <= deadline * (1 + 1e-9)


def test_generous_deadline_gives_the_full_model_and_unmeetable_the_smallest_budget_flagged():
    model = LatencyModel(PREFILL, DECODE, margin=0.1)
    generous = model.budget_for_deadline(1e6, 50, 4, 1, min_budget=0.4)
    assert (generous.budget, generous.met) == (1.0, True)
    # the smallest budget 0.4 needs 2 + 0.5 + 1.0 + 0.2 + 3 * (1 + 0.1 + 0.16 + 0.12) = 7.84 ms; 5 ms cannot be met
    choice = model.budget_for_deadline(5.0, 50, 4, 1, min_budget=0.4)
    assert (choice.budget, choice.met) == (0.4, False)
    assert choice.predicted_ms == pytest.approx(7.84)
    with pytest.raises(ValueError, match="deadline_ms 0 must be > 0"):
        model.budget_for_deadline(0, 50, 4, 1)


def test_online_correction_lowers_the_budget_when_times_double_and_raises_it_back():
    """RunningRatio's 90th percentile over 10 batches, worked by hand."""
    model = LatencyModel(PREFILL, DECODE, margin=0.1)
    deadline = model.predict_ms(0.9, 400, 4, 4) * 1.1
    ratio = RunningRatio(window=20, quantile=0.9)
    before = model.budget_for_deadline(deadline, 400, 4, 4, min_budget=0.2, scale=ratio.value).budget
    predicted = model.predict_ms(0.9, 400, 4, 4)
    for _ in range(18):  # quiet: the profile is right
        ratio.update(predicted, predicted)
    assert ratio.update(predicted, 2 * predicted) == 2.0  # the latest batch is slow: taken at once
    assert ratio.update(predicted, 2 * predicted) == 2.0  # two in 20: the second slowest is the 90th percentile
    for _ in range(4):  # the machine slows down: every batch takes twice the prediction
        ratio.update(predicted, 2 * predicted)
    assert ratio.value == 2.0
    slowed = model.budget_for_deadline(deadline, 400, 4, 4, min_budget=0.2, scale=ratio.value)
    assert slowed.budget < before - 0.2
    assert slowed.predicted_ms * 1.1 <= deadline * (1 + 1e-9)
    assert ratio.update(predicted, 3 * predicted) == pytest.approx(3.0)  # a spike counts at once ...
    assert ratio.update(predicted, 2 * predicted) == 2.0  # ... and is forgotten by the quantile
    for _ in range(18):  # the load goes: while two of the 8 slow batches are in the window, it holds
        assert ratio.update(predicted, predicted) == 2.0
    assert ratio.update(predicted, predicted) == 1.0  # one left: below the 90th percentile
    recovered = model.budget_for_deadline(deadline, 400, 4, 4, min_budget=0.2, scale=ratio.value).budget
    assert recovered > slowed.budget + 0.2


def test_profile_file_round_trip_and_clear_errors(tmp_path):
    path = save_profile(tmp_path / "p.json", _grid(), {"device": "cpu", "dtype": "float32", "torch": "x", "grid": {}})
    model = LatencyModel.load(path, margin=0.3)
    assert model.prefill == pytest.approx(PREFILL, abs=1e-9)
    assert model.margin == 0.3 and model.meta["device"] == "cpu"
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        LatencyModel.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": 1, "measurements": [{"budget": 1.0}]}))
    with pytest.raises(ValueError, match="bad.json: latency profile: bad `measurements`"):
        LatencyModel.load(bad)


@pytest.mark.parametrize("margin", [float("nan"), float("inf"), -0.1])
def test_a_margin_that_is_not_a_finite_number_at_least_0_is_refused(tmp_path, margin):
    """NaN passed ``margin < 0``: every deadline then got the smallest budget, flagged unmeetable."""
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        LatencyModel(PREFILL, DECODE, margin=margin)
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        LatencyModel.fit(_grid(), margin=margin)
    path = save_profile(tmp_path / "p.json", _grid(), {"device": "cpu", "dtype": "float32", "torch": "x", "grid": {}})
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        LatencyModel.load(path, margin=margin)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("prefill_ms", -100, "prefill_ms -100 must be > 0"),
        ("prefill_ms", 0, "prefill_ms 0 must be > 0"),
        ("decode_ms_per_token", -0.5, "decode_ms_per_token -0.5 must be > 0"),
        ("budget", 5, r"budget 5 must be in \[0, 1\]"),
        ("budget", -0.1, r"budget -0.1 must be in \[0, 1\]"),
        ("flops_fraction", 0, r"flops_fraction 0 must be in \(0, 1\]"),
        ("flops_fraction", 1.5, r"flops_fraction 1.5 must be in \(0, 1\]"),
        ("prompt_tokens", 0, "prompt_tokens 0 must be a whole number >= 1"),
        ("prompt_tokens", 24.5, "prompt_tokens 24.5 must be a whole number >= 1"),
        ("batch_size", -1, "batch_size -1 must be a whole number >= 1"),
        ("batch_size", True, "batch_size True is not a finite number"),
    ],
)
def test_impossible_measurements_are_refused_naming_the_file_index_and_field(tmp_path, field, value, problem):
    """Checked only for being finite numbers, negative times or a budget of 5 were fitted and drove deadlines."""
    rows = [dict(vars(row)) for row in _grid()]
    rows[2][field] = value
    path = tmp_path / "impossible.json"
    path.write_text(json.dumps({"format": 1, "measurements": rows}))
    with pytest.raises(ValueError, match=rf"impossible\.json: latency profile: measurements\[2\]\.{problem}$"):
        LatencyModel.load(path)
    with pytest.raises(ValueError, match=rf"measurements\[2\]\.{problem}"):  # and nothing of the kind is written
        save_profile(tmp_path / "written.json", [Measurement(**row) for row in rows], {})
    assert not (tmp_path / "written.json").exists()


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A profile whose --out was a directory failed at the rename and left ``.name.tmp`` beside it."""
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match="folder is a directory"):
        save_profile(tmp_path / "folder", _grid(), {})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["folder"]

    def refuse(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        save_profile(tmp_path / "p.json", _grid(), {})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["folder"]


def test_two_profiles_written_at_once_never_share_a_temporary_file(tmp_path, monkeypatch):
    """Every write had `.p.json.tmp`: two `profile --out p.json --overwrite` at once wrote into one file."""
    import os

    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda source, target: renamed.append(str(source)) or real_replace(source, target))
    for _ in range(2):
        save_profile(tmp_path / "p.json", _grid(), {"device": "cpu", "dtype": "float32", "torch": "x", "grid": {}})
    assert len(renamed) == 2 and renamed[0] != renamed[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]
