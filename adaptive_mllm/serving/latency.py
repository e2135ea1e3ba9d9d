"""LatencyModel: milliseconds predicted from (budget, prompt tokens, new tokens, batch size), fitted to
a measured profile (JSON), and inverted: the largest budget predicted to meet a deadline.

The model is linear in the work the budget leaves, fitted by least squares on the profile's grid:

    prefill_ms  = p0 + p1 * B * T + p2 * b * B * T + p3 * b   (B batch size, T prompt tokens, b budget)
    decode_ms   = d0 + d1 * B     + d2 * b * B     + d3 * b   (per generated token)
    total_ms    = prefill_ms + (new_tokens - 1) * decode_ms  (the first token comes out of the prefill)

``p3`` / ``d3`` are what a kept layer costs whatever the batch: reading its weights (what a decoding step on a GPU
at small batch is made of) and launching its kernels. Without them a tiny model's CPU profile, whose decoding step
at budget 1.0 takes 13 / 14 / 16 ms at batch 1 / 4 / 8 and 2.5 ms at the smallest budget, was fitted from 29% too
fast to 94% too slow (a 2-token answer, as ``profile`` reports it) with negative per-batch coefficients; with them
from -12% to +11% (a review's profile of 2026-12-08, kept in tests/serving/data/).

The budget ``b`` stands for the FLOPs fraction of the plan: a plan never spends more than its budget,
so predicting with ``b`` errs on the slow side. Being linear in ``b``, the model inverts in closed form.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adaptive_mllm.reporting import write_text_atomically

PROFILE_FORMAT = 1
MIN_MEASUREMENTS = 4  # the fit has 4 coefficients per stage


def check_margin(margin: float) -> None:
    """ValueError unless ``margin`` is a finite number >= 0 (NaN made every deadline pick the smallest budget)."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin {margin} must be a finite number >= 0")


@dataclass(frozen=True)
class Measurement:
    """One grid point of a profile: medians over interleaved rounds, warm-up excluded."""

    budget: float
    flops_fraction: float
    prompt_tokens: int
    batch_size: int
    prefill_ms: float  # vision tower + projector + LLM prefill of the whole batch
    decode_ms_per_token: float  # one decoding step of the whole batch


@dataclass(frozen=True)
class BudgetChoice:
    """What :meth:`LatencyModel.budget_for_deadline` decided; ``met`` False = even the smallest budget
    is predicted to miss the deadline (the request is still answered, at that budget, and flagged)."""

    budget: float
    predicted_ms: float
    met: bool


@dataclass
class LatencyModel:
    """Predicted milliseconds of a batch, and the largest budget that meets a deadline.

    Args:
        prefill: (p0, p1, p2, p3), see the module docstring.
        decode: (d0, d1, d2, d3), see the module docstring.
        margin: safety margin: a budget is chosen only if ``predicted * (1 + margin) <= deadline``.
        meta: where the profile was measured (device, dtype, torch version, grid).
    """

    prefill: tuple[float, float, float, float]
    decode: tuple[float, float, float, float]
    margin: float = 0.2
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_margin(self.margin)

    # --- fitting and files -------------------------------------------------------------------------
    @classmethod
    def fit(cls, measurements: list[Measurement], margin: float = 0.2, meta: dict[str, Any] | None = None) -> LatencyModel:
        """Least-squares fit of both stages to a profile's measurements."""
        if len(measurements) < MIN_MEASUREMENTS:
            raise ValueError(
                f"a latency profile needs at least {MIN_MEASUREMENTS} measurements to fit {MIN_MEASUREMENTS} coefficients, "
                f"got {len(measurements)}"
            )
        check_margin(margin)
        rows = [(m.budget, m.batch_size, m.prompt_tokens) for m in measurements]
        prefill_x = np.array([[1.0, b_size * t, b * b_size * t, b] for b, b_size, t in rows])
        decode_x = np.array([[1.0, b_size, b * b_size, b] for b, b_size, _ in rows])
        prefill_y = np.array([m.prefill_ms for m in measurements])
        decode_y = np.array([m.decode_ms_per_token for m in measurements])
        prefill = np.linalg.lstsq(prefill_x, prefill_y, rcond=None)[0]
        decode = np.linalg.lstsq(decode_x, decode_y, rcond=None)[0]
        return cls(tuple(float(v) for v in prefill), tuple(float(v) for v in decode), margin, dict(meta or {}))

    @classmethod
    def from_profile(cls, profile: dict[str, Any], margin: float = 0.2) -> LatencyModel:
        """Fit to a profile dict as :func:`save_profile` writes it."""
        if not isinstance(profile, dict):
            raise ValueError(f"latency profile: must be a JSON object, got {type(profile).__name__}")
        if profile.get("format") != PROFILE_FORMAT:
            raise ValueError(f"latency profile: format {profile.get('format')!r}, expected {PROFILE_FORMAT}")
        try:
            measurements = [Measurement(**row) for row in profile["measurements"]]
        except (KeyError, TypeError) as error:
            raise ValueError(f"latency profile: bad `measurements` ({type(error).__name__}: {error})") from error
        for index, row in enumerate(measurements):
            check_measurement(row, f"measurements[{index}]")
        meta = {key: value for key, value in profile.items() if key != "measurements"}
        return cls.fit(measurements, margin, meta)

    @classmethod
    def load(cls, path: str | Path, margin: float = 0.2) -> LatencyModel:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"latency profile {path} does not exist (write one with `adaptive-mllm profile`)")
        try:
            profile = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"latency profile {path}: not JSON ({error})") from error
        try:
            return cls.from_profile(profile, margin)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error

    # --- prediction --------------------------------------------------------------------------------
    def _terms(self, prompt_tokens: int, new_tokens: int, batch_size: int) -> tuple[float, float]:
        """(a, c) with total_ms = a + c * budget."""
        p0, p1, p2, p3 = self.prefill
        d0, d1, d2, d3 = self.decode
        work = batch_size * prompt_tokens
        steps = max(new_tokens - 1, 0)
        a = p0 + p1 * work + steps * (d0 + d1 * batch_size)
        c = p2 * work + p3 + steps * (d2 * batch_size + d3)
        return a, c

    def predict_ms(self, budget: float, prompt_tokens: int, new_tokens: int, batch_size: int = 1, scale: float = 1.0) -> float:
        """Milliseconds for a batch run at ``budget``; ``scale`` is the online correction (measured / predicted)."""
        a, c = self._terms(prompt_tokens, new_tokens, batch_size)
        return scale * max(a + c * budget, 0.0)

    def budget_for_deadline(
        self,
        deadline_ms: float,
        prompt_tokens: int,
        new_tokens: int,
        batch_size: int = 1,
        min_budget: float = 0.0,
        scale: float = 1.0,
    ) -> BudgetChoice:
        """The largest budget in ``[min_budget, 1]`` with ``predict_ms * (1 + margin) <= deadline_ms``;
        when none meets it, ``min_budget`` flagged ``met=False``."""
        if not deadline_ms > 0:
            raise ValueError(f"deadline_ms {deadline_ms} must be > 0")
        if not 0.0 <= min_budget <= 1.0:
            raise ValueError(f"min_budget {min_budget} must be in [0, 1]")
        allowed = deadline_ms / (1.0 + self.margin) / scale
        a, c = self._terms(prompt_tokens, new_tokens, batch_size)
        if a + c * 1.0 <= allowed:
            budget = 1.0
        elif c > 0 and a + c * min_budget <= allowed:
            budget = min(max((allowed - a) / c, min_budget), 1.0)
        else:
            budget = min_budget
        budget = max(_round_down(budget), min_budget)
        predicted = self.predict_ms(budget, prompt_tokens, new_tokens, batch_size, scale)
        met = predicted * (1.0 + self.margin) <= deadline_ms * (1 + 1e-9)
        return BudgetChoice(budget, predicted, met)


# what each field of a Measurement may hold: (whole number, lowest, lowest included, highest)
_FIELD_RANGES = {
    "budget": (False, 0.0, True, 1.0),
    "flops_fraction": (False, 0.0, False, 1.0),
    "prompt_tokens": (True, 1, True, None),
    "batch_size": (True, 1, True, None),
    "prefill_ms": (False, 0.0, False, None),
    "decode_ms_per_token": (False, 0.0, False, None),
}
_FRACTION_SLACK = 1e-9  # a FLOPs fraction of the full plan computed as flops / full may round to 1 + 1 ulp


def check_measurement(row: Measurement, where: str) -> None:
    """ValueError naming ``where.field`` for a value a measurement cannot hold: times > 0, ``budget`` in [0, 1],
    ``flops_fraction`` in (0, 1], ``prompt_tokens`` and ``batch_size`` whole numbers >= 1."""
    for name, (whole, low, low_included, high) in _FIELD_RANGES.items():
        value = getattr(row, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"latency profile: {where}.{name} {value!r} is not a finite number")
        if whole:
            if not isinstance(value, int) or value < low:
                raise ValueError(f"latency profile: {where}.{name} {value!r} must be a whole number >= {low}")
            continue
        slack = _FRACTION_SLACK if name == "flops_fraction" else 0.0
        if (value < low if low_included else value <= low) or (high is not None and value > high + slack):
            if high is None:
                expected = f"must be {'>=' if low_included else '>'} {low:g}"
            else:
                expected = f"must be in {'[' if low_included else '('}{low:g}, {high:g}]"
            raise ValueError(f"latency profile: {where}.{name} {value:g} {expected}")


def _round_down(value: float, digits: int = 6) -> float:
    """Round toward 0 so that the chosen budget never exceeds the exact solution."""
    scale = 10**digits
    return math.floor(value * scale) / scale


def save_profile(path: str | Path, measurements: list[Measurement], meta: dict[str, Any]) -> Path:
    """Write a profile: ``format``, ``meta`` keys (device, dtype, torch, grid) and ``measurements``; refused
    (ValueError, nothing written) when the latency model cannot be fitted to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"format": PROFILE_FORMAT, **meta, "measurements": [asdict(m) for m in measurements]}
    LatencyModel.from_profile(profile)  # a profile the server cannot read is never written
    if path.is_dir():
        raise IsADirectoryError(f"latency profile {path} is a directory; name a file")
    return write_text_atomically(path, json.dumps(profile, indent=2) + "\n")  # two profiles at once never mix
