"""DeadlineAPI in-process (no HTTP): the online correction moves budgets, and short answers do not
make the machine look fast."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adaptive_mllm.serving.api import BUDGET_RISE, PIXELS, DeadlineAPI, collate
from adaptive_mllm.serving.correction import RunningRatio
from adaptive_mllm.serving.latency import Measurement, save_profile
from adaptive_mllm.serving.overhead import ServerTimes
from adaptive_mllm.serving.requests import RequestError
from adaptive_mllm.serving.server import build_model
from tests.serving.conftest import write_tiny_recipe

# hand-made profile: prefill 1 + 2 b*B*T ms, decode 0.1 + 0.1 b*B ms per step: the budget dominates
PREFILL = (1.0, 0.0, 2.0)
DECODE = (0.1, 0.0, 0.1)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> DeadlineAPI:
    root = tmp_path_factory.mktemp("api")
    write_tiny_recipe(root / "recipe.yaml", tokenizer_dir, max_new_tokens=4)
    module = build_model(str(root / "recipe.yaml"), None, None, [])
    rows = [
        Measurement(b, b, t, n, PREFILL[0] + PREFILL[2] * b * n * t, DECODE[0] + DECODE[2] * b * n)
        for b in (1.0, 0.5) for t in (10, 30) for n in (1, 2)
    ]  # fmt: skip
    profile = save_profile(root / "profile.json", rows, {"device": "test", "dtype": "float32", "torch": "", "grid": {}})
    api = DeadlineAPI(lambda: module, str(profile), margin=0.1)
    api.setup("cpu")
    return api


def _body(deadline_ms: float) -> dict:
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8")).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "What colour is the circle ?"}]}],
            "deadline_ms": deadline_ms}  # fmt: skip
    return body


def _request(api: DeadlineAPI, deadline_ms: float):
    return api.decode_request(_body(deadline_ms))


def _fresh_deadline_request(api: DeadlineAPI):
    """A request whose deadline budget 0.9 just meets alone (margin 0.1), on a correction reset to 1;
    returns it with its prompt tokens (+ the latency token) and the new tokens the prediction assumes."""
    api.ratio = RunningRatio()
    request = _request(api, 1.0)  # the deadline is set below, once the prompt length is known
    tokens = len(request.prompt_ids) + 1
    new = api.model.max_new_tokens
    request.deadline_ms = 1.1 * api.latency.predict_ms(0.9, tokens, new, 1)
    return request, tokens, new


def test_budgets_fall_when_measured_times_double_and_rise_when_they_recover(api: DeadlineAPI):
    request, tokens, new = _fresh_deadline_request(api)
    before, _, feasible, _ = api._choose(request, 0.0, tokens, new, 1)
    assert feasible and before == pytest.approx(0.9, abs=1e-5)
    budgets = torch.tensor([before])
    for _ in range(8):  # every batch takes twice its prediction
        api._correct(budgets, tokens, new, 1, 2 * api.latency.predict_ms(before, tokens, new, 1), new - 1, 0.0)
    assert api.ratio.value == pytest.approx(2.0)  # every recent batch took twice its prediction
    slowed, _, feasible, _ = api._choose(request, 0.0, tokens, new, 1)
    assert feasible and slowed < 0.5  # by hand: (0.9 * c + a) / 2 = a + b c  ->  b ~ 0.43 with a ~ 1.3, c ~ 2T
    for _ in range(20):  # the load goes: the slow batches leave the window of 20
        api._correct(budgets, tokens, new, 1, api.latency.predict_ms(before, tokens, new, 1), new - 1, 0.0)
    recovered, _, _, _ = api._choose(request, 0.0, tokens, new, 1)
    assert recovered > 0.85


def test_time_spent_queued_counts_against_the_deadline(api: DeadlineAPI):
    request, tokens, new = _fresh_deadline_request(api)
    fresh, _, _, _ = api._choose(request, 0.0, tokens, new, 1)
    late, _, feasible, _ = api._choose(request, request.deadline_ms / 2, tokens, new, 1)
    assert feasible and late < fresh - 0.3  # half the time left: about half the budget-dependent work
    expired, requested, feasible, _ = api._choose(request, request.deadline_ms + 1, tokens, new, 1)
    minimum = api.model.scheduler.cost.min_budget(tokens)
    assert (expired, requested, feasible) == (minimum, "deadline", False)


def test_an_answer_that_stops_early_is_compared_at_full_length(api: DeadlineAPI):
    api.ratio = RunningRatio()
    tokens, new, budget = 20, api.model.max_new_tokens, 0.8
    step_ms = DECODE[0] + DECODE[2] * budget  # 0.18 ms per decoding step
    prefill_ms = PREFILL[0] + PREFILL[2] * budget * tokens  # 33 ms
    # one decoding step of the 3 the prediction assumes: measured = prefill + 1 step, exactly as predicted
    api._correct(torch.tensor([budget]), tokens, new, 1, prefill_ms + step_ms, 1, step_ms / 1000)
    assert api.ratio.value == pytest.approx(1.0)
    # an answer done at the first token: compared with the prefill alone
    api._correct(torch.tensor([budget]), tokens, new, 1, prefill_ms, 0, 0.0)
    assert api.ratio.value == pytest.approx(1.0)
    # the same answer twice as slow: 1 of 3 ratios is 2, and the 90th percentile of 3 is the slowest
    api._correct(torch.tensor([budget]), tokens, new, 1, 2 * prefill_ms, 0, 0.0)
    assert api.ratio.value == pytest.approx(2.0)


def test_time_outside_the_worker_counts_against_the_deadline(api: DeadlineAPI):
    request, tokens, new = _fresh_deadline_request(api)
    fresh, _, _, _ = api._choose(request, 0.0, tokens, new, 1)
    queued, _, _, _ = api._choose(request, request.deadline_ms / 2, tokens, new, 1)
    api.times = ServerTimes()
    try:
        api.times.update(request.deadline_ms / 2)  # half the deadline goes to reading and writing HTTP
        outside, _, _, _ = api._choose(request, 0.0, tokens, new, 1)
        assert outside < fresh - 0.3
        assert outside == pytest.approx(queued)  # the same as half the deadline spent queued
    finally:
        api.times = None


def test_a_batch_shares_its_tightest_deadline(api: DeadlineAPI):
    api.ratio = RunningRatio()
    fresh, old, fixed = _request(api, 1.0), _request(api, 1.0), _request(api, 1.0)
    tokens = len(fresh.prompt_ids) + 1
    new = api.model.max_new_tokens
    deadline = 1.1 * api.latency.predict_ms(0.9, tokens, new, 3)
    fresh.deadline_ms = old.deadline_ms = deadline
    fixed.budget = 0.95  # asked for: kept
    queued = [0.0, deadline / 3, 0.0]  # the old one waited a third of its deadline
    requests = [fresh, old, fixed]
    alone = [api._choose(r, q, tokens, new, 3) for r, q in zip(requests, queued, strict=True)]
    shared = api._share_the_batch(alone, requests, queued, tokens, new)
    (b_fresh, _, ok_fresh, _), (b_old, _, ok_old, _), (b_fixed, _, _, _) = shared
    assert alone[0][0] > alone[1][0] + 0.2  # alone, the fresh one takes more than the old one could
    assert b_fixed == 0.95 and b_old <= alone[1][0]  # nobody is raised, asked budgets kept
    assert b_fresh < alone[0][0] - 0.2  # lowered to share the old one's deadline
    assert b_fresh == pytest.approx(b_old)  # both cut to one level (the fixed 0.95 leaves them less)
    # the batch's time (at its mean budget) fits the tightest deadline, by an independent computation
    batch_ms = api.latency.predict_ms((b_fresh + b_old + b_fixed) / 3, tokens, new, 3)
    assert batch_ms * 1.1 <= (deadline - deadline / 3) * (1 + 1e-6)
    assert ok_fresh and ok_old
    # as tight as possible: a little more budget for the fresh one would break the old one's deadline
    assert api.latency.predict_ms((b_fresh + 0.01 + b_old + b_fixed) / 3, tokens, new, 3) * 1.1 > deadline - deadline / 3
    # one request alone, or no deadline in the batch: unchanged
    assert api._share_the_batch(alone[:1], requests[:1], queued[:1], tokens, new) == alone[:1]


@pytest.mark.parametrize("tight_ms", [1e-3, "expired"])
def test_a_deadline_no_budget_can_meet_does_not_lower_the_batch(api: DeadlineAPI, tight_ms):
    """One request that misses at any budget (a microsecond, or a deadline that passed while it queued) runs at
    its minimum, flagged; the others keep the budgets they get without it (they were all levelled to the minimum)."""
    api.ratio = RunningRatio()
    loose = [_request(api, 1e7) for _ in range(3)]  # anything meets 3 hours
    tight = _request(api, 1.0 if tight_ms == "expired" else tight_ms)
    requests = [*loose, tight]
    tokens = len(tight.prompt_ids) + 1
    new = api.model.max_new_tokens
    queued = [0.0, 0.0, 0.0, 5.0 if tight_ms == "expired" else 0.0]  # expired: queued 5 ms of its 1 ms
    alone = [api._choose(r, q, tokens, new, 4) for r, q in zip(requests, queued, strict=True)]
    shared = api._share_the_batch(alone, requests, queued, tokens, new)
    assert [choice.budget for choice in shared[:3]] == [1.0, 1.0, 1.0]
    assert all(choice.feasible for choice in shared[:3])
    assert shared[3].budget == pytest.approx(api._minimum(tight)) and not shared[3].feasible
    # a tight deadline that the batch can meet is still shared (the loose ones are lowered to fit it)
    tight.deadline_ms = 1.1 * api.latency.predict_ms(0.6, tokens, new, 4)
    alone = [api._choose(r, 0.0, tokens, new, 4) for r in requests]
    shared = api._share_the_batch(alone, requests, [0.0] * 4, tokens, new)
    assert all(choice.feasible for choice in shared)
    assert max(choice.budget for choice in shared) < 1.0


def test_deadline_budgets_rise_in_steps_after_a_slowdown(api: DeadlineAPI, monkeypatch: pytest.MonkeyPatch):
    api.ratio = RunningRatio()
    request = _request(api, 1.0)
    tokens = len(request.prompt_ids) + 1
    new = api.model.max_new_tokens
    # alone on a machine as fast as profiled, budget 1.0; not at the slowdown's correction of 2
    request.deadline_ms = 1.1 * api.latency.predict_ms(1.0, tokens, new, 1) * 1.5
    api.deadline_ceiling = 0.3  # the last batch ran at 0.2 under a slowdown
    api.ceiling_correction = 2.0  # that batch's correction
    monkeypatch.setattr(api, "_correct", lambda *args: None)  # the correction stays at 1: the ceiling alone holds
    try:
        budget, _, feasible, _ = api._choose(request, 0.0, tokens, new, 1)
        assert budget == pytest.approx(0.3) and feasible
        climbed = []
        for _ in range(10):  # batches answered at their budget: the ceiling follows, 0.1 a batch
            budget = api._answer([request])[0].budget
            climbed.append(round(budget, 6))
        assert climbed[:4] == pytest.approx([0.3, 0.4, 0.5, 0.6]) and climbed[-1] == 1.0
        fixed = _request(api, 1.0)
        fixed.deadline_ms, fixed.budget = None, 0.9  # an asked budget is not capped
        assert api._choose(fixed, 0.0, tokens, new, 1)[0] == 0.9
        assert api.ceiling_correction == 0.0  # the ceiling is back at 1.0: the episode is over
    finally:
        api.deadline_ceiling, api.ceiling_correction = 1.0, 0.0


def test_only_a_machine_held_budget_caps_the_next_deadlines(api: DeadlineAPI):
    api.ratio = RunningRatio()
    tight, loose = _request(api, 1e-3), _request(api, 1e7)  # nothing meets 1 microsecond; anything meets 3 hours
    try:
        for _ in range(3):  # one client's impossible deadline does not lower another's budget
            answered_tight = api._answer([tight])[0]
            assert answered_tight.budget == pytest.approx(api._minimum(tight)) and not answered_tight.deadline_feasible
            assert api._answer([loose])[0].budget == 1.0
        assert api.deadline_ceiling == 1.0
        # a slowdown holds a deadline's budget below what the deadline alone allows: that moves the ceiling
        request, tokens, new = _fresh_deadline_request(api)
        assert not api._choose(request, 0.0, tokens, new, 1).held_down  # quiet machine: the deadline decides
        budgets = torch.tensor([0.9])
        for _ in range(8):
            api._correct(budgets, tokens, new, 1, 2 * api.latency.predict_ms(0.9, tokens, new, 1), new - 1, 0.0)
        slowed = api._choose(request, 0.0, tokens, new, 1)
        assert slowed.held_down and slowed.budget < 0.5
        assert api._answer([request])[0].budget == pytest.approx(slowed.budget)
        assert api.deadline_ceiling == pytest.approx(slowed.budget + 0.1)
    finally:
        api.deadline_ceiling, api.ceiling_correction = 1.0, 0.0
        api.ratio = RunningRatio()


def _slow_machine(api: DeadlineAPI, tokens: int, new: int, factor: float) -> None:
    """A correction of ``factor``: every recent batch took ``factor`` x its prediction."""
    api.ratio = RunningRatio()
    for _ in range(8):
        api.ratio.update(api.latency.predict_ms(0.9, tokens, new, 1), factor * api.latency.predict_ms(0.9, tokens, new, 1))
    assert api.ratio.value == pytest.approx(factor)


def test_a_deadline_no_budget_meets_even_on_a_quiet_machine_caps_nobody(
    api: DeadlineAPI, monkeypatch: pytest.MonkeyPatch
):
    """The audit's case, where the deadline decides: on a machine slower than profiled, client A asks a deadline that
    even its minimum misses on a machine as fast as profiled. It runs at its minimum whatever the machine does, says
    nothing about the machine and moves no ceiling: client B, whose deadline the slowdown lowers, keeps the budget
    the correction allows (not A's minimum + 0.1), and a 1e6 ms client runs at 1.0."""
    tight, moderate, loose = _request(api, 1.0), _request(api, 1.0), _request(api, 1e6)
    tokens = len(tight.prompt_ids) + 1
    new = api.model.max_new_tokens
    minimum = api._minimum(tight)
    tight.deadline_ms = 0.5 * api.latency.predict_ms(minimum, tokens, new, 1)  # missed at any budget, quiet or not
    moderate.deadline_ms = 1.1 * api.latency.predict_ms(0.6, tokens, new, 1, 3.0)  # 0.6 at correction 3, 1.0 quiet
    monkeypatch.setattr(api, "_correct", lambda *args: None)  # the correction stays where it is set
    try:
        _slow_machine(api, tokens, new, 3.0)
        assert not api.latency.budget_for_deadline(tight.deadline_ms, tokens, new, 1, minimum).met  # quiet machine
        choice = api._choose(tight, 0.0, tokens, new, 1)
        assert not choice.feasible and choice.budget == pytest.approx(minimum) and not choice.held_down
        allowed = api.latency.budget_for_deadline(moderate.deadline_ms, tokens, new, 1, minimum, 3.0)
        assert allowed.met and allowed.budget > minimum + BUDGET_RISE + 0.01
        for _ in range(3):  # A, B and the loose client in turn
            ceiling = api.deadline_ceiling  # 1.0, then B's own held-down budget + 0.1
            answered = api._answer([tight])[0]
            assert not answered.deadline_feasible and api.deadline_ceiling == ceiling  # A moves nothing
            assert api._answer([moderate])[0].budget == pytest.approx(allowed.budget)
            assert api._answer([loose])[0].budget == 1.0
    finally:
        api.deadline_ceiling, api.ceiling_correction = 1.0, 0.0
        api.ratio = RunningRatio()


def test_a_deadline_the_slow_machine_cannot_meet_does_not_cap_the_others(api: DeadlineAPI, monkeypatch: pytest.MonkeyPatch):
    """The audit's case: on a machine slower than profiled (correction 2.5-2.9), client A's deadline was met above
    its minimum on a quiet machine but at no budget now. Its minimum counted as held down by the machine and set
    the ceiling to it + 0.1: client B's deadline of 1e6 ms ran at 0.225 for as long as A kept sending (and a client
    whose deadline the slowdown lowers to 0.6 ran at A's minimum + 0.1: a review of 2026-12-07)."""
    tight, loose, moderate = _request(api, 1.0), _request(api, 1e6), _request(api, 1.0)
    tokens = len(tight.prompt_ids) + 1
    new = api.model.max_new_tokens
    quiet_budget = api._minimum(tight) + 0.01
    tight.deadline_ms = 1.1 * api.latency.predict_ms(quiet_budget, tokens, new, 1)  # met on a quiet machine
    moderate.deadline_ms = 1.1 * api.latency.predict_ms(0.6, tokens, new, 1, 3.0)  # 0.6 at correction 3, 1.0 quiet
    monkeypatch.setattr(api, "_correct", lambda *args: None)  # the correction stays where it is set
    try:
        _slow_machine(api, tokens, new, 3.0)
        choice = api._choose(tight, 0.0, tokens, new, 1)
        assert api.latency.budget_for_deadline(tight.deadline_ms, tokens, new, 1, api._minimum(tight)).budget > choice.budget
        assert not choice.feasible and choice.budget == pytest.approx(api._minimum(tight))
        assert not choice.held_down  # it runs at its minimum: counted, it would cap every client the slowdown lowers
        allowed = api.latency.budget_for_deadline(moderate.deadline_ms, tokens, new, 1, api._minimum(tight), api.ratio.value)
        assert allowed.met and allowed.budget > api._minimum(tight) + BUDGET_RISE + 0.01
        for _ in range(3):  # A, B and C in turn
            answered = api._answer([tight])[0]
            assert not answered.deadline_feasible and api.deadline_ceiling >= allowed.budget
            assert api._answer([loose])[0].budget == 1.0
            assert api._answer([moderate])[0].budget == pytest.approx(allowed.budget)
    finally:
        api.deadline_ceiling, api.ceiling_correction = 1.0, 0.0
        api.ratio = RunningRatio()


def test_batches_that_run_as_profiled_lift_the_ceiling_as_far_as_their_budget(
    api: DeadlineAPI, monkeypatch: pytest.MonkeyPatch
):
    """The ceiling lapses by evidence: after a slowdown a batch that ran within the margin of the profile at mean
    budget b lifts the ceiling to b + BUDGET_RISE. It never expired: after one slowdown and 1000 quiet batches of a
    loose client, a tight client's first answers were still capped at 0.53 (0.9 allowed). A quiet batch at a small
    budget (small budgets can look fast beside a co-located job) or a slow batch at 1.0 does not lift it."""
    tight, tokens, new = _fresh_deadline_request(api)  # 0.9 on a quiet machine
    loose, small = _request(api, 1e6), _request(api, 1.0)
    small.deadline_ms, small.budget = None, 0.2
    # _correct returns the batch's own measured / predicted, against the uncorrected profile
    predicted = api.latency.predict_ms(0.9, tokens, new, 1)
    assert api._correct(torch.tensor([0.9]), tokens, new, 1, 2 * predicted, new - 1, 0.0) == pytest.approx(2.0)
    machine = {"ratio": 2.0}
    monkeypatch.setattr(api, "_correct", lambda *args: machine["ratio"])
    try:
        _slow_machine(api, tokens, new, 2.0)
        held = api._answer([tight])[0].budget
        assert held < 0.5 and api.deadline_ceiling == pytest.approx(held + BUDGET_RISE)
        api._answer([loose])  # the loose client's batch at 1.0 ran slow: no evidence
        assert api.deadline_ceiling == pytest.approx(held + BUDGET_RISE)
        machine["ratio"] = 1.0 + api.latency.margin  # the load goes: batches run as profiled (within the margin)
        _slow_machine(api, tokens, new, 1.0)
        api._answer([small])  # as profiled, but at 0.2: says nothing about budgets above 0.3
        assert api.deadline_ceiling == pytest.approx(held + BUDGET_RISE)
        api._answer([loose])  # as profiled at 1.0: the ceiling is gone
        assert api.deadline_ceiling == 1.0 and api.ceiling_correction == 0.0
        assert api._answer([tight])[0].budget == pytest.approx(0.9, abs=1e-5)
    finally:
        api.deadline_ceiling, api.ceiling_correction = 1.0, 0.0
        api.ratio = RunningRatio()


def test_the_ceiling_caps_only_deadlines_the_slowdown_would_lower(api: DeadlineAPI, monkeypatch: pytest.MonkeyPatch):
    """A feasible deadline held down by a slowdown still sets the ceiling, and the budgets it would lower rise from
    there in steps (the ceiling's purpose, §4). A deadline that allows budget 1.0 even at the slowdown's correction
    is not capped: a 1e6 ms deadline ran at the ceiling of another client's budget + 0.1."""
    held, moderate, loose = _request(api, 1.0), _request(api, 1.0), _request(api, 1e6)
    tokens = len(held.prompt_ids) + 1
    new = api.model.max_new_tokens
    held.deadline_ms = 1.1 * api.latency.predict_ms(0.9, tokens, new, 1)  # 0.9 quiet, below 0.5 at correction 2
    # budget 1.0 on a quiet machine and at correction 1.5, not at 2
    moderate.deadline_ms = 1.1 * api.latency.predict_ms(1.0, tokens, new, 1) * 1.6
    monkeypatch.setattr(api, "_correct", lambda *args: None)
    try:
        _slow_machine(api, tokens, new, 2.0)
        slowed = api._answer([held])[0]
        assert slowed.deadline_feasible and slowed.budget < 0.5
        assert api.deadline_ceiling == pytest.approx(slowed.budget + 0.1) and api.ceiling_correction == pytest.approx(2.0)
        assert api._choose(loose, 0.0, tokens, new, 1).budget == 1.0  # 1e6 ms allows 1.0 at any correction
        assert api._choose(moderate, 0.0, tokens, new, 1).budget == pytest.approx(api.deadline_ceiling)  # capped
        _slow_machine(api, tokens, new, 1.5)  # the correction falls back (small budgets look fast)
        # the slowdown seen is still the one that counts: the moderate deadline keeps rising in steps
        assert api._choose(moderate, 0.0, tokens, new, 1).budget == pytest.approx(api.deadline_ceiling)
        assert api._answer([loose])[0].budget == 1.0 and api.deadline_ceiling < 1.0  # B moves nothing
        climbed = [round(api._answer([moderate])[0].budget, 6) for _ in range(3)]
        start = slowed.budget + 0.1
        assert climbed == pytest.approx([start, start + 0.1, start + 0.2])
    finally:
        api.deadline_ceiling, api.ceiling_correction = 1.0, 0.0
        api.ratio = RunningRatio()


@pytest.mark.parametrize("forced", ["stop", "other"])
def test_the_reply_counts_tokens_and_says_why_the_answer_ended(api: DeadlineAPI, forced: str):
    request = _request(api, 1e7)
    model = api.model
    stop_ids = model.backbone.chat_template.stop_token_ids(model.backbone.tokenizer)
    token = stop_ids[0] if forced == "stop" else next(i for i in range(model.backbone.lm_head.out_features) if i not in stop_ids)

    def always(module, args, logits):  # the LM head picks `token` at every step
        forced_logits = torch.full_like(logits, -1e4)
        forced_logits[..., token] = 1e4
        return forced_logits

    handle = model.backbone.lm_head.register_forward_hook(always)
    try:
        reply = api.encode_response(api._answer([request])[0])
    finally:
        handle.remove()
    new = model.max_new_tokens
    expected_completion = 0 if forced == "stop" else new
    assert reply["usage"] == {
        "prompt_tokens": len(request.prompt_ids),
        "completion_tokens": expected_completion,
        "total_tokens": len(request.prompt_ids) + expected_completion,
    }
    assert reply["choices"][0]["finish_reason"] == ("stop" if forced == "stop" else "length")


def test_the_reply_shows_the_correction_its_budget_and_prediction_were_made_with(
    api: DeadlineAPI, monkeypatch: pytest.MonkeyPatch
):
    """``predicted_ms`` is the corrected prediction, shown beside the correction: the one in force when the budget
    was chosen, not the one after this batch corrected it (a fresh server's first reply said 15.51 beside an
    uncorrected 15.61 ms)."""
    api.ratio = RunningRatio()
    monkeypatch.setattr(api, "_correct", lambda *_: api.ratio.update(1.0, 3.0))  # every batch: 3x its prediction
    try:
        for before in (1.0, 3.0):
            request = _request(api, 1e7)
            tokens, new = len(request.prompt_ids) + 1, api.model.max_new_tokens
            adaptive = api.encode_response(api._answer([request])[0])["adaptive"]
            assert api.ratio.value == 3.0
            assert adaptive["correction"] == before
            assert adaptive["predicted_ms"] == pytest.approx(api.latency.predict_ms(adaptive["budget"], tokens, new, 1, before))
    finally:
        api.ratio = RunningRatio()


def test_the_worker_logs_its_counts_at_most_every_few_seconds(api: DeadlineAPI, caplog: pytest.LogCaptureFixture):
    from adaptive_mllm.serving import api as api_module

    caplog.set_level("INFO", logger=api_module.__name__)
    api.logged_at = -api_module.METRICS_LOG_SECONDS
    api._write_metrics()
    api._write_metrics()  # right after: not logged again
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("metrics ")]
    assert len(lines) == 1 and json.loads(lines[0].removeprefix("metrics "))["requests"] >= 0


def test_a_request_prepared_ahead_decodes_as_one_decoded_in_the_loop(api: DeadlineAPI):
    prepared = api.prepare_request(_body(100.0))
    assert isinstance(prepared[PIXELS], torch.Tensor)
    ahead, here = api.decode_request(dict(prepared)), api.decode_request(_body(100.0))
    assert ahead.prompt_ids == here.prompt_ids and torch.equal(ahead.pixel_values, here.pixel_values)
    # the prepared pixels are the ones used, not decoded again
    marker = torch.zeros_like(here.pixel_values)
    assert api.decode_request({**prepared, PIXELS: marker}).pixel_values is marker
    # a client's field of that name is JSON, never pixels: ignored, the image is read from the message
    forged = api.decode_request({**_body(100.0), PIXELS: [[0.0]]})
    assert torch.equal(forged.pixel_values, here.pixel_values)


def test_max_tokens_caps_each_answer_and_the_batch_is_timed_for_its_longest(api: DeadlineAPI):
    model = api.model
    stop_ids = model.backbone.chat_template.stop_token_ids(model.backbone.tokenizer)
    token = next(i for i in range(model.backbone.lm_head.out_features) if i not in stop_ids)

    def never_stop(module, args, logits):
        forced_logits = torch.full_like(logits, -1e4)
        forced_logits[..., token] = 1e4
        return forced_logits

    capped, uncapped = api.decode_request({**_body(1e7), "max_tokens": 1}), api.decode_request(_body(1e7))
    assert (capped.max_tokens, uncapped.max_tokens) == (1, None)
    handle = model.backbone.lm_head.register_forward_hook(never_stop)
    try:
        both = [api.encode_response(answer) for answer in api._answer([capped, uncapped])]
        ratio = api.ratio.value
        alone = api._answer([capped])[0]
    finally:
        handle.remove()
    assert [reply["usage"]["completion_tokens"] for reply in both] == [1, model.max_new_tokens]
    assert [reply["choices"][0]["finish_reason"] for reply in both] == ["length", "length"]
    # a lone request capped at 1 token is predicted (and its deadline budgeted) for 1 token, not max_new_tokens
    prompt_tokens = len(capped.prompt_ids) + 1
    assert alone.predicted_ms == pytest.approx(api.latency.predict_ms(alone.budget, prompt_tokens, 1, 1, ratio))


def test_a_budget_below_the_minimum_after_token_selection_runs_at_that_minimum(tmp_path: Path, tokenizer_dir: Path):
    """FastV drops image tokens inside the LLM, so fewer tokens reach the scheduled layers and the smallest admissible
    budget is higher than the prompt's before selection, the one the server can know ahead. A budget-0 request is
    raised to the minimum after selection (it failed in the planner) and the reply says which budget ran."""
    import yaml

    recipe = write_tiny_recipe(tmp_path / "recipe.yaml", tokenizer_dir, max_new_tokens=2)
    config = yaml.safe_load(recipe.read_text())
    config["model"]["token_selector"] = {"class_path": "adaptive_mllm.token_selection.FastV", "init_args": {"layer_index": 1, "drop_ratio": 0.75}}
    config["model"]["scheduler"]["init_args"]["budget_rule"] = "flops"  # the release's rule admits every budget in [0, 1]
    recipe.write_text(yaml.safe_dump(config))
    module = build_model(str(recipe), None, None, [])
    api = DeadlineAPI(lambda: module, None)
    api.setup("cpu")
    request = api.decode_request({**_body(1.0), "deadline_ms": None, "budget": 0.0})
    before = api._minimum(request)
    answer = api._answer([request])[0]
    seq_len = len(request.prompt_ids) + 1
    image_tokens = module.backbone.num_image_tokens
    tokens = module.token_selector.layer_tokens(torch.tensor([seq_len]), torch.tensor([image_tokens]), 4)[0].tolist()
    after = module.scheduler.cost.min_budget(seq_len, tokens)  # by the cost model, on the tokens FastV lets through
    assert after > before + 0.01
    assert answer.budget == pytest.approx(after, abs=1e-6) and isinstance(answer.text, str)
    with pytest.raises(ValueError, match="outside the admissible range"):  # what the planner does unasked
        module.generate(collate([request], api.processor.pad_token_id, torch.device("cpu"), torch.float32), before)


def test_an_unexpected_error_reading_a_request_fails_only_that_request(api: DeadlineAPI, monkeypatch: pytest.MonkeyPatch):
    """decode_request never raises (LitServe fails a whole batch on a raise): a bug in parsing becomes this
    request's 500, and the next request is read as usual."""
    import adaptive_mllm.serving.api as api_module

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    with monkeypatch.context() as patched:
        patched.setattr(api_module, "parse_chat_request", broken)
        failed = api.decode_request(_body(100.0))
    assert isinstance(failed, RequestError) and failed.status == 500 and "KeyError" in failed.message
    assert api.encode_response(failed).status_code == 500
    assert not isinstance(api.decode_request(_body(100.0)), RequestError)


def test_a_model_that_cannot_be_built_is_one_line_in_the_servers_log():
    """LitServe logs a worker's failed setup with its traceback; the model's own error (naming its file) is
    the whole message instead."""
    import logging
    import sys

    from adaptive_mllm.backbones.local import CheckpointError
    from adaptive_mllm.serving.api import ModelSetupError, _one_line_setup_error

    def missing_tokenizer():
        raise CheckpointError("tokenizer directory data/x/tokenizer does not exist")

    with pytest.raises(ModelSetupError) as failed:
        DeadlineAPI(missing_tokenizer).setup("cpu")
    assert str(failed.value) == "CheckpointError: tokenizer directory data/x/tokenizer does not exist"
    try:
        raise failed.value
    except ModelSetupError:
        record = logging.LogRecord("litserve.loops.loops", logging.ERROR, "loops.py", 83, "Error setting up worker 0.", (), sys.exc_info())
    assert _one_line_setup_error(record)
    assert logging.Formatter().format(record) == "the model could not be built: " + str(failed.value)


def test_a_lora_model_is_served_with_its_adapters_merged(tmp_path: Path, tokenizer_dir: Path):
    """model.lora: the server merges the adapters into the weights, a plain nn.Linear per projection (the base
    model's cost); merge_adapters itself is held to the adapted model's outputs in tests/test_lora.py."""
    from torch import nn

    from adaptive_mllm.lora import has_adapters

    recipe = write_tiny_recipe(tmp_path / "recipe.yaml", tokenizer_dir, max_new_tokens=4)
    served = build_model(str(recipe), None, None, ["--model.lora={rank: 2, alpha: 4.0}"])
    assert served.lora is not None and not has_adapters(served.backbone.decoder_layers)
    projections = [m for m in served.backbone.decoder_layers.modules() if isinstance(m, nn.Linear)]
    assert len(projections) == 7 * served.backbone.shape.num_layers and all(type(m) is nn.Linear for m in projections)
    api = DeadlineAPI(lambda: served, None)
    api.setup("cpu")
    answer = api._answer([api.decode_request({**_body(1.0), "deadline_ms": None, "budget": 0.6})])[0]
    assert isinstance(answer.text, str) and answer.budget == pytest.approx(0.6)


def test_a_request_is_measured_against_the_room_its_model_leaves(api: DeadlineAPI, monkeypatch: pytest.MonkeyPatch):
    """The server tells the request parser whether its model inserts a latency token (one position fewer for the
    prompt and the answer), as ask / benchmark / profile do: a model without one serves one token more."""
    import adaptive_mllm.serving.api as api_module

    told = []
    parse = api_module.parse_chat_request
    monkeypatch.setattr(api_module, "parse_chat_request", lambda *args: told.append(args[5:]) or parse(*args))
    for inserts in (True, False):
        monkeypatch.setattr(type(api.model.planner), "uses_latency_token", property(lambda self, inserts=inserts: inserts))
        assert not isinstance(api.decode_request(_body(100.0)), RequestError)
    assert told == [(True,), (False,)]


def test_setup_warms_the_model_up_without_counting_it(
    api: DeadlineAPI, tmp_path: Path, tokenizer_dir: Path, caplog: pytest.LogCaptureFixture
):
    """The first generate calls after a load are several times slower than the profile: setup makes them, on a dummy
    request read as a client's is, at budget 1.0 and at the minimum, alone and at max_batch_size. The correction's
    window and the counts do not see them (the first request of a fresh server missed its deadline flagged feasible
    and its ratio held every deadline at its minimum for about 10 batches)."""
    from adaptive_mllm.serving import api as api_module
    from adaptive_mllm.serving.api import read_metrics

    recipe = write_tiny_recipe(tmp_path / "recipe.yaml", tokenizer_dir, max_new_tokens=4)
    module = build_model(str(recipe), None, None, [])
    calls = []
    generate = module.generate

    def counting(batch, budgets, *args, **kwargs):
        calls.append((batch["prompt_ids"].shape[0], [round(float(b), 6) for b in budgets]))
        return generate(batch, budgets, *args, **kwargs)

    module.generate = counting
    caplog.set_level("INFO", logger=api_module.__name__)
    metrics = str(tmp_path / "metrics.json")
    warmed = DeadlineAPI(lambda: module, api.profile, margin=0.1, metrics_path=metrics, max_batch_size=3)
    warmed.setup("cpu")
    minimum = round(warmed._minimum(warmed.decode_request(api_module.warm_up_body(2))), 6)
    assert calls == [(1, [1.0]), (1, [minimum]), (3, [1.0] * 3), (3, [minimum] * 3)]
    assert any(record.getMessage().startswith("warm-up: 4 generate calls in ") for record in caplog.records)
    assert warmed.ratio.updates == 0 and not warmed.ratio.ratios and warmed.ratio.value == 1.0
    counts = read_metrics(metrics)
    assert counts["requests"] == counts["answered"] == counts["batches"] == 0 and counts["correction"] == 1.0
    answered = warmed.predict([warmed.decode_request(_body(1e7))])[0]  # the first request is the first one counted
    assert len(calls) == 5 and answered.batch_size == 1 and warmed.ratio.updates == 1
    assert read_metrics(metrics)["answered"] == 1


def test_a_warm_up_that_fails_does_not_stop_the_server(api: DeadlineAPI, tmp_path: Path, tokenizer_dir: Path, caplog):
    """Out of memory at --max_batch_size during the warm-up stopped the worker, so LitServe never started (a review
    of 2026-12-07); without the warm-up only that batch would have failed. It is logged and the server serves."""
    from adaptive_mllm.serving import api as api_module

    recipe = write_tiny_recipe(tmp_path / "recipe.yaml", tokenizer_dir, max_new_tokens=4)
    module = build_model(str(recipe), None, None, [])
    generate = module.generate

    def out_of_memory_when_batched(batch, budgets, *args, **kwargs):
        if batch["prompt_ids"].shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return generate(batch, budgets, *args, **kwargs)

    module.generate = out_of_memory_when_batched
    caplog.set_level("INFO", logger=api_module.__name__)
    warmed = DeadlineAPI(lambda: module, api.profile, margin=0.1, metrics_path=str(tmp_path / "m.json"), max_batch_size=3)
    warmed.setup("cpu")
    assert any("warm-up stopped after 2 generate calls (OutOfMemoryError: CUDA out of memory" in r.getMessage() for r in caplog.records)
    assert warmed.predict([warmed.decode_request(_body(1e7))])[0].batch_size == 1


def test_a_failing_metrics_write_never_fails_the_answers(
    api: DeadlineAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """The counts are written best-effort: their folder removed (a tmp cleaner) is made again, and a write that fails
    (a full or read-only disk) is logged once, not every batch; the computed answers are answered either way (every
    batch was a 500 while /health said ok)."""
    import errno
    import shutil

    from adaptive_mllm.serving import api as api_module
    from adaptive_mllm.serving.api import Answer, read_metrics

    folder = tmp_path / "counts"
    path = folder / "metrics.json"
    caplog.set_level("WARNING", logger=api_module.__name__)
    monkeypatch.setattr(api, "metrics_path", str(path))
    monkeypatch.setattr(api, "metrics_errors", set())
    request = _request(api, 1e7)
    assert isinstance(api.predict([request])[0], Answer) and path.exists()
    shutil.rmtree(folder)
    assert isinstance(api.predict([request])[0], Answer)
    before = read_metrics(str(path))["requests"]  # written again, into the folder made again

    import adaptive_mllm.reporting as reporting

    write_atomically = reporting.write_atomically

    def full_disk(target, write, binary=True):  # the disk fills part-way through the counts' file
        def failing(handle):
            write(handle)
            raise OSError(errno.ENOSPC, "No space left on device", str(target))

        return write_atomically(target, failing, binary)

    with monkeypatch.context() as patched:
        patched.setattr(reporting, "write_atomically", full_disk)
        answers = [api.predict([request])[0] for _ in range(3)]
    assert all(isinstance(answer, Answer) for answer in answers)
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and str(path) in warnings[0]
    assert read_metrics(str(path))["requests"] == before  # the last counts written, until a write succeeds
    api.predict([request])
    assert read_metrics(str(path))["requests"] == before + 4 and list(folder.iterdir()) == [path]
    # a path that cannot be a file (its folder is a file): answered, and /metrics reads no counts rather than failing
    monkeypatch.setattr(api, "metrics_path", str(path / "metrics.json"))
    assert isinstance(api.predict([request])[0], Answer) and read_metrics(api.metrics_path) == {}
