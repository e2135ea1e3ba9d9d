"""AdaptiveMLLM: training reaches the scheduler, budgets are honoured per example, parity with transformers."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from adaptive_mllm.backbones import LlavaBackbone
from adaptive_mllm.backbones.templates import IGNORE_INDEX
from adaptive_mllm.module import AdaptiveMLLM, learning_rate_factor
from adaptive_mllm.planning import PlanInputs
from adaptive_mllm.schedulers import FullScheduler, HeadScheduler, LayerScheduler, StaticScheduler
from tests.conftest import make_backbone, random_images, tiny_config


def _model(tokenizer_dir, scheduler) -> AdaptiveMLLM:
    model = AdaptiveMLLM(make_backbone(tokenizer_dir, num_layers=6, num_kv_heads=2), scheduler, train_budget_range=(0.6, 1.0))
    model.configure_model()
    return model


def _batch(model: AdaptiveMLLM, questions: list[str], answers: list[str]) -> dict:
    processor = model.backbone.input_processor()
    template, tokenizer = processor.chat_template, processor.tokenizer
    encoded = [
        template.encode([(q, a)], tokenizer, processor.image_token_id, processor.num_image_tokens) for q, a in zip(questions, answers, strict=True)
    ]
    prompts = [template.encode_prompt([q], [], tokenizer, processor.image_token_id, processor.num_image_tokens) for q in questions]
    width, prompt_width = max(len(e.input_ids) for e in encoded), max(len(p) for p in prompts)
    pad = processor.pad_token_id
    return {
        "input_ids": torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in encoded]),
        "labels": torch.tensor([e.labels + [IGNORE_INDEX] * (width - len(e.labels)) for e in encoded]),
        "attention_mask": torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in encoded]),
        "prompt_lengths": torch.tensor([e.prompt_length for e in encoded]),
        "prompt_ids": torch.tensor([[pad] * (prompt_width - len(p)) + p for p in prompts]),
        "prompt_attention_mask": torch.tensor([[0] * (prompt_width - len(p)) + [1] * len(p) for p in prompts]),
        "pixel_values": random_images(len(questions)),
        "answers": answers,
        "question_kinds": ["all"] * len(questions),
        "ids": [str(i) for i in range(len(questions))],
    }


QUESTIONS = ["<image>\nWhat colour is the circle ?", "<image>\nHow many shapes are there ?", "<image>\nIs the red circle left of the blue square ?"]
ANSWERS = ["red", "two", "yes"]


@pytest.mark.parametrize("scheduler_class", [LayerScheduler, HeadScheduler])
def test_gradients_reach_scheduler_and_latency_encoder(tokenizer_dir, scheduler_class):
    kwargs = {"rank": 2} if scheduler_class is HeadScheduler else {}
    model = _model(tokenizer_dir, scheduler_class(num_prefix_layers=2, **kwargs))
    model.train()
    logits, labels = model(_batch(model, QUESTIONS, ANSWERS), torch.tensor([0.7, 0.8, 0.9]))
    assert labels.shape[1] == logits.shape[1]  # the latency token was inserted, its label ignored
    model._loss(logits, labels).backward()
    scheduler = model.scheduler
    assert scheduler.head.weight.grad is not None and scheduler.head.weight.grad.abs().sum() > 0
    encoder_grads = [p.grad for p in scheduler.latency_encoder.parameters()]
    assert all(g is not None for g in encoder_grads) and sum(g.abs().sum() for g in encoder_grads) > 0


@pytest.mark.parametrize("scheduler_class", [LayerScheduler, HeadScheduler])
def test_mixed_budgets_in_a_batch_equal_each_alone(tokenizer_dir, scheduler_class):
    kwargs = {"rank": 2} if scheduler_class is HeadScheduler else {}
    model = _model(tokenizer_dir, scheduler_class(num_prefix_layers=2, **kwargs)).eval()
    batch = _batch(model, QUESTIONS, ANSWERS)
    budgets = torch.tensor([1.0, 0.8, 0.6])
    together = model.generate(batch, budgets)
    for row in range(3):
        alone_batch = _batch(model, QUESTIONS[row : row + 1], ANSWERS[row : row + 1])
        alone_batch["pixel_values"] = batch["pixel_values"][row : row + 1]
        alone = model.generate(alone_batch, budgets[row])
        assert alone["answers"][0] == together["answers"][row]
    assert together["flops_fraction"] < 1.0


def test_full_budget_matches_transformers_before_the_latency_token(tokenizer_dir):
    model = _model(tokenizer_dir, LayerScheduler(num_prefix_layers=2)).eval()
    batch = _batch(model, QUESTIONS[:1], ANSWERS[:1])
    with torch.no_grad():
        logits, _ = model(batch, torch.tensor([1.0]))
        reference = model.backbone.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    at = int(batch["prompt_lengths"][0])
    torch.testing.assert_close(logits[:, :at], reference[:, :at], atol=1e-5, rtol=0)
    # the answer positions see the latency token, so they are shifted by one and differ
    assert not torch.allclose(logits[:, at + 1 :], reference[:, at:], atol=1e-5)


def test_budget_below_the_prefix_is_a_clear_error(tokenizer_dir):
    model = _model(tokenizer_dir, LayerScheduler(num_prefix_layers=3, budget_rule="flops")).eval()
    with pytest.raises(ValueError, match="admissible range"):
        model.generate(_batch(model, QUESTIONS[:1], ANSWERS[:1]), 0.2)


def test_a_baseline_scheduler_evaluates_a_trained_model_with_its_latency_token(tokenizer_dir):
    trained = _model(tokenizer_dir, LayerScheduler(num_prefix_layers=3)).eval()
    checkpoint = {"state_dict": {k: v.clone() for k, v in trained.state_dict().items()}}
    baseline = AdaptiveMLLM(trained.backbone, StaticScheduler(num_prefix_layers=3, insert_latency_token=True))
    baseline.configure_model()
    with pytest.warns(UserWarning, match="scheduler.head.weight"):
        baseline.on_load_checkpoint(checkpoint)
    baseline.load_state_dict(checkpoint["state_dict"])  # strict: only the learned plan head was dropped
    baseline.eval()
    batch = _batch(trained, QUESTIONS, ANSWERS)
    budgets = torch.ones(len(QUESTIONS))
    # At budget 1.0 both plans keep every layer, so the only difference left would be the latency token.
    assert torch.equal(trained(batch, budgets)[0], baseline(batch, budgets)[0])
    no_token = AdaptiveMLLM(trained.backbone, StaticScheduler(num_prefix_layers=3))
    no_token.configure_model()
    assert no_token(batch, budgets)[0].shape[1] == trained(batch, budgets)[0].shape[1] - 1


def test_a_baseline_on_an_adallava_h_checkpoint_inserts_the_token_the_h_scheduler_inserted(tokenizer_dir):
    trained = _model(tokenizer_dir, HeadScheduler(num_prefix_layers=3, rank=2)).eval()
    saved: dict = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(saved)
    assert saved["scheduler_spec"] == {
        "class_path": "adaptive_mllm.schedulers.head.HeadScheduler",
        "init_args": {"num_prefix_layers": 3, "rank": 2, "tau": 5.0, "budget_rule": "release"},
    }
    batch = _batch(trained, QUESTIONS, ANSWERS)
    budgets = torch.ones(len(QUESTIONS))

    def baseline(with_spec: bool) -> AdaptiveMLLM:
        checkpoint = {"state_dict": {k: v.clone() for k, v in saved["state_dict"].items()}}
        if with_spec:
            checkpoint["scheduler_spec"] = saved["scheduler_spec"]
        model = AdaptiveMLLM(trained.backbone, FullScheduler(num_prefix_layers=3, insert_latency_token=True))
        model.configure_model()
        with pytest.warns(UserWarning, match="scheduler.head.weight"):
            model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"])
        return model.eval()

    with torch.no_grad():
        # At budget 1.0 the H plan keeps every unit, as FullScheduler does: only the latency token could differ.
        assert torch.equal(baseline(with_spec=True)(batch, budgets)[0], trained(batch, budgets)[0])
        # A checkpoint that records no scheduler (written before it did): budgets counted in layers, 5 / 6 not 10 / 11.
        assert not torch.equal(baseline(with_spec=False)(batch, budgets)[0], trained(batch, budgets)[0])


def test_a_learned_scheduler_missing_from_the_checkpoint_fails_the_load(tokenizer_dir):
    static = _model(tokenizer_dir, StaticScheduler(num_prefix_layers=3))
    checkpoint = {"state_dict": dict(static.state_dict())}
    learned = _model(tokenizer_dir, LayerScheduler(num_prefix_layers=3))
    learned.on_load_checkpoint(checkpoint)
    with pytest.raises(RuntimeError, match="scheduler.latency_encoder"):
        learned.load_state_dict(checkpoint["state_dict"])


def test_predict_answers_each_record_at_the_predict_budget_and_skips_empty_batches(tokenizer_dir):
    model = _model(tokenizer_dir, LayerScheduler(num_prefix_layers=3)).eval()
    model.budget = 0.8
    batch = _batch(model, QUESTIONS, ANSWERS)
    out = model.predict_step(batch, 0)
    assert [row["id"] for row in out] == batch["ids"]
    assert all(row["budget"] == 0.8 and 0 < row["flops_fraction"] <= 0.8 for row in out)
    assert [row["answer"] for row in out] == model.generate(batch, 0.8)["answers"]
    empty = {key: value[:0] for key, value in batch.items()}
    assert model.predict_step(empty, 1) == []


@pytest.mark.parametrize("scheduler_class", [LayerScheduler, HeadScheduler])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(tokenizer_dir, scheduler_class):
    scheduler = scheduler_class(num_prefix_layers=3) if scheduler_class is LayerScheduler else scheduler_class(num_prefix_layers=3, rank=2)
    model = _model(tokenizer_dir, scheduler)
    batch = _batch(model, QUESTIONS, ANSWERS)
    budgets = torch.tensor([1.0, 0.8, 0.7])

    def loss_and_grads(checkpointing: bool):
        model.engine.activation_checkpointing = checkpointing
        model.zero_grad()
        torch.manual_seed(0)  # the same Gumbel noise in both runs
        logits, labels = model(batch, budgets)
        loss = model._loss(logits, labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    plain_loss, plain = loss_and_grads(False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        ckpt_loss, ckpt = loss_and_grads(True)
    checkpointed_numel = sum(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss_and_grads(False)
    assert checkpointed_numel < sum(saved)  # fewer activations kept for backward
    assert torch.allclose(plain_loss, ckpt_loss, atol=1e-6)
    assert plain.keys() == ckpt.keys() and any(n.startswith("scheduler.") for n in ckpt)
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-5), name


@pytest.mark.parametrize("scheduler_class", [LayerScheduler, HeadScheduler])
def test_training_budgets_are_uniform_over_the_levels_full_model_included(tokenizer_dir, scheduler_class):
    kwargs = {"rank": 2} if scheduler_class is HeadScheduler else {}
    model = _model(tokenizer_dir, scheduler_class(num_prefix_layers=2, **kwargs))  # train_budget_range (0.6, 1.0)
    scheduler, length = model.scheduler, 30
    lengths = torch.full((4000,), length)
    fewest, most = scheduler.units_for_budget(torch.tensor([0.6, 1.0], dtype=torch.float64), lengths[:2]).tolist()
    torch.manual_seed(0)
    units = scheduler.units_for_budget(model.planner.draw_budgets(PlanInputs(None, lengths), model.train_budget_range), lengths)
    counts = torch.bincount(units, minlength=most + 1)
    assert counts[:fewest].sum() == 0  # never below train_budget_range's low end
    levels = most - fewest + 1
    assert levels >= 3 and counts[most] > 0  # the full model is trained too
    expected = len(lengths) / levels
    assert ((counts[fewest:].float() - expected).abs() < 5 * expected**0.5).all()  # uniform within ~5 sigma


def test_the_first_evaluation_batch_is_answered_once_untimed_before_the_sweep(tokenizer_dir, monkeypatch):
    model = _model(tokenizer_dir, LayerScheduler(num_prefix_layers=3)).eval()
    model.eval_budgets = [1.0, 0.7]
    batch = _batch(model, QUESTIONS, ANSWERS)
    calls = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda b, budget, **kw: calls.append(budget) or generate(b, budget, **kw))
    first = model.test_step(batch, 0)
    assert calls == [1.0, 1.0, 0.7] and list(first) == [1.0, 0.7]  # a warm-up call, then the timed sweep
    calls.clear()
    model.test_step(batch, 1)
    assert calls == [1.0, 0.7]  # later batches: no extra call


@pytest.mark.parametrize("full_budget_steps, expect_full", [(1, True), (0, False)])
def test_full_budget_steps_train_every_layer_before_budgets_are_drawn(tokenizer_dir, monkeypatch, full_budget_steps, expect_full):
    model = AdaptiveMLLM(
        make_backbone(tokenizer_dir, num_layers=6, num_kv_heads=2), LayerScheduler(num_prefix_layers=2),
        train_budget_range=(0.6, 0.6), full_budget_steps=full_budget_steps,
    )  # fmt: skip
    model.configure_model()
    plans = []
    schedule = model.scheduler.forward
    monkeypatch.setattr(model.scheduler, "forward", lambda *args, **kwargs: plans.append(schedule(*args, **kwargs)) or plans[-1])
    model.training_step(_batch(model, QUESTIONS, ANSWERS), 0)  # global_step 0 (no trainer)
    mask = plans[0].layer_mask.detach()  # [B, L_sched]
    fewest = int(model.scheduler.units_for_budget(torch.tensor([0.6]), torch.tensor([30]))[0])
    assert fewest < 4
    assert bool((mask.sum(-1) == 4).all()) == expect_full
    assert expect_full or bool((mask.sum(-1) < 4).all())


@pytest.mark.parametrize(
    ("scheduler", "full_budget_steps", "warns"),
    [("layer", 10, True), ("layer", 20, True), ("layer", 9, False), ("full", 20, False), (None, 20, False)],
)
def test_a_fit_shorter_than_its_full_budget_steps_is_named(tokenizer_dir, scheduler, full_budget_steps, warns):
    """`--trainer.max_steps=20` on tiny.yaml (full_budget_steps 2000) trained every step at budget 1.0 and scored the
    smaller budgets with an untrained scheduler, saying nothing."""
    import warnings

    from adaptive_mllm.schedulers import FullScheduler

    chosen = {"layer": LayerScheduler(num_prefix_layers=2), "full": FullScheduler(num_prefix_layers=2), None: None}[scheduler]
    model = AdaptiveMLLM(make_backbone(tokenizer_dir, num_layers=6, num_kv_heads=2), chosen, full_budget_steps=full_budget_steps)
    model.configure_model()

    class Trainer:
        estimated_stepping_batches = 10

    model.trainer = Trainer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.configure_optimizers()
    named = [str(w.message) for w in caught if "full_budget_steps" in str(w.message)]
    assert len(named) == warns
    if warns:
        assert f"model.full_budget_steps={full_budget_steps} >= this fit's 10 optimizer steps" in named[0]
        assert "--model.full_budget_steps (e.g. to 5)" in named[0]


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("learning_rate", -1e-5, "learning_rate=-1e-05 must be a finite number > 0"),
        ("learning_rate", float("nan"), "learning_rate=nan must be a finite number > 0"),
        ("weight_decay", -0.1, "weight_decay=-0.1 must be a finite number >= 0"),
        ("warmup_ratio", 1.5, r"warmup_ratio=1.5 must be in \[0, 1\]"),
        ("warmup_ratio", -0.03, r"warmup_ratio=-0.03 must be in \[0, 1\]"),
    ],
)
def test_optimizer_settings_out_of_range_are_refused_by_name(tokenizer_dir, setting, value, says):
    """torch's AdamW refused a negative rate without naming the option, after the model was built; a warm-up ratio of
    1.5 was taken (the whole run warming up, the peak never reached)."""
    with pytest.raises(ValueError, match=says):
        AdaptiveMLLM(make_backbone(tokenizer_dir, num_layers=6, num_kv_heads=2), LayerScheduler(num_prefix_layers=2), **{setting: value})


def test_negative_full_budget_steps_are_refused(tokenizer_dir):
    with pytest.raises(ValueError, match="full_budget_steps=-1"):
        AdaptiveMLLM(make_backbone(tokenizer_dir, num_layers=6, num_kv_heads=2), LayerScheduler(num_prefix_layers=2), full_budget_steps=-1)
    with pytest.raises(ValueError, match="max_new_tokens=0 must be >= 1"):  # it failed only after a whole fit
        AdaptiveMLLM(make_backbone(tokenizer_dir, num_layers=6, num_kv_heads=2), LayerScheduler(num_prefix_layers=2), max_new_tokens=0)


def test_the_learning_rate_restarts_its_cycle_when_budgets_start_to_be_drawn():
    # one cycle: warm-up from 0 over 30 of 100 steps, then cosine to 0
    assert learning_rate_factor(0, 100, 0.3) == 0.0
    assert learning_rate_factor(15, 100, 0.3) == pytest.approx(0.5)
    assert learning_rate_factor(30, 100, 0.3) == pytest.approx(1.0)
    assert learning_rate_factor(65, 100, 0.3) == pytest.approx(0.5)
    # restart at 60: steps 0-59 are a cycle of 60 (warm-up 18), steps 60-99 one of 40 (warm-up 12)
    assert learning_rate_factor(18, 100, 0.3, restart=60) == pytest.approx(1.0)
    assert learning_rate_factor(59, 100, 0.3, restart=60) == pytest.approx(0.5 * (1 + math.cos(math.pi * 41 / 42)))
    assert learning_rate_factor(60, 100, 0.3, restart=60) == 0.0
    assert learning_rate_factor(66, 100, 0.3, restart=60) == pytest.approx(0.5)
    assert learning_rate_factor(72, 100, 0.3, restart=60) == pytest.approx(1.0)
    assert learning_rate_factor(99, 100, 0.3, restart=60) < 0.01
    # a restart at 0 or past the end is one cycle
    assert learning_rate_factor(65, 100, 0.3, restart=100) == learning_rate_factor(65, 100, 0.3)


@pytest.mark.parametrize(("total", "ratio"), [(5198, 0.03), (100, 0.03), (10, 0.03), (7, 0.5), (1000, 0.0), (33, 0.1)])
def test_the_schedule_is_the_hf_trainers(total, ratio):
    # LLaVA / the release: TrainingArguments.get_warmup_steps = ceil(total * warmup_ratio), then
    # get_cosine_schedule_with_warmup, read here from transformers itself
    from transformers.optimization import get_cosine_schedule_with_warmup

    warmup = math.ceil(total * ratio)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = get_cosine_schedule_with_warmup(optimizer, warmup, total).lr_lambdas[0]
    for step in range(total):
        assert learning_rate_factor(step, total, ratio) == pytest.approx(hf(step), abs=1e-12), step


def test_weight_decay_spares_biases_and_norms_as_the_hf_trainer(tokenizer_dir):
    model = AdaptiveMLLM(
        make_backbone(tokenizer_dir, num_layers=6, num_kv_heads=2), LayerScheduler(num_prefix_layers=2),
        weight_decay=0.1, part_learning_rates={"vision_tower": 1e-4}, freeze=[],
    )  # fmt: skip
    model.configure_model()
    groups = {group["name"] if "name" in group else "rest": group for group in model.parameter_groups()}
    assert set(groups) == {"rest", "rest/no_decay", "vision_tower", "vision_tower/no_decay"}
    names = {id(p): name for name, p in model.named_parameters()}
    exempt = {names[id(p)] for name in ("rest/no_decay", "vision_tower/no_decay") for p in groups[name]["params"]}
    decayed = {names[id(p)] for name in ("rest", "vision_tower") for p in groups[name]["params"]}
    assert all(groups[name]["weight_decay"] == 0.0 for name in ("rest/no_decay", "vision_tower/no_decay"))
    assert groups["vision_tower/no_decay"]["lr"] == 1e-4
    # the HF Trainer's rule on the names: a bias, or a LayerNorm / RMSNorm weight (Llama's input_layernorm,
    # post_attention_layernorm and norm are RMSNorms; CLIP's layer_norm1/2, pre/post_layrnorm LayerNorms)
    norm_words = ("layernorm", "layer_norm", "layrnorm", "norm.weight")
    assert exempt and all("bias" in n or any(w in n for w in norm_words) for n in exempt)
    assert not any("bias" in n or any(w in n for w in norm_words) for n in decayed)
    assert any("input_layernorm" in n for n in exempt) and any("q_proj.weight" in n for n in decayed)
    assert any(n.startswith("scheduler.") for n in exempt) and any(n.startswith("scheduler.") for n in decayed)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert exempt | decayed == trainable and not exempt & decayed
    without = AdaptiveMLLM(make_backbone(tokenizer_dir, num_layers=6, num_kv_heads=2), LayerScheduler(num_prefix_layers=2))
    without.configure_model()
    assert len(without.parameter_groups()) == 1  # no decay: one group, as before


def test_part_learning_rates_give_a_part_its_own_rate_on_the_same_schedule(tokenizer_dir):
    model = AdaptiveMLLM(
        make_backbone(tokenizer_dir, num_layers=6, num_kv_heads=2), LayerScheduler(num_prefix_layers=2),
        learning_rate=5e-4, part_learning_rates={"vision_tower": 1e-4}, freeze=["projector"], warmup_ratio=0.5,
    )  # fmt: skip
    model.configure_model()
    groups = model.parameter_groups()
    vision = {id(p) for p in model.backbone.parameter_groups()["vision_tower"]}
    projector = {id(p) for p in model.backbone.parameter_groups()["projector"]}
    rest, tower = groups
    assert tower["name"] == "vision_tower" and tower["lr"] == 1e-4 and {id(p) for p in tower["params"]} == vision
    scheduler_params = {id(p) for p in model.scheduler.parameters()}
    assert scheduler_params <= {id(p) for p in rest["params"]}  # the scheduler trains at learning_rate
    assert not ({id(p) for p in rest["params"]} & (vision | projector))  # frozen parts in no group, none twice
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable

    class Trainer:
        estimated_stepping_batches = 10

    model.trainer = Trainer()
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    for _ in range(5):  # to the end of the warm-up: both at their peaks
        optimizer.step()
        scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([5e-4, 1e-4])


def test_part_learning_rates_name_known_parts_and_positive_rates(tokenizer_dir):
    backbone = make_backbone(tokenizer_dir, num_layers=6, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"part_learning_rates: unknown parts \['vision'\]; known: vision_tower"):
        AdaptiveMLLM(backbone, part_learning_rates={"vision": 1e-4})
    with pytest.raises(ValueError, match="projector's learning rate 0.0 must be > 0"):
        AdaptiveMLLM(backbone, part_learning_rates={"projector": 0.0})


def test_an_empty_eval_budgets_is_refused_when_the_recipe_is_parsed(tokenizer_dir):
    with pytest.raises(ValueError, match="eval_budgets is empty"):
        AdaptiveMLLM(make_backbone(tokenizer_dir), eval_budgets=[])
    with pytest.raises(ValueError, match=r"budget 0.3 appears twice"):  # the report showed a second 0.3 column at 0%
        AdaptiveMLLM(make_backbone(tokenizer_dir), eval_budgets=[0.3, 1.0, 0.3])
    with pytest.raises(ValueError, match=r"\[0.7, 0.7000001\] are all written 0.7 in reports"):  # one logged key, averaged
        AdaptiveMLLM(make_backbone(tokenizer_dir), eval_budgets=[1.0, 0.7, 0.7000001])
    AdaptiveMLLM(make_backbone(tokenizer_dir), eval_budgets=[1.0, 0.7, 0.70001])  # 6 significant digits tell them apart


def test_a_checkpoint_of_another_vocabulary_names_the_tokenizer(tokenizer_dir):
    model = _model(tokenizer_dir, LayerScheduler(num_prefix_layers=3))
    state = dict(model.state_dict())
    key = next(k for k in state if k.endswith("embed_tokens.weight"))
    vocab, hidden = state[key].shape
    state[key] = torch.zeros(vocab - 1, hidden)  # trained with a tokenizer of one token less
    with pytest.raises(ValueError, match=rf"embed_tokens.weight has shape \[{vocab - 1}, {hidden}\].*{vocab - 1} tokens, .*{vocab}"):
        model.on_load_checkpoint({"state_dict": state})
    state[key] = model.state_dict()[key]
    wider = next(k for k in state if k.endswith("mlp.up_proj.weight"))
    state[wider] = torch.zeros(state[wider].shape[0] + 1, state[wider].shape[1])
    with pytest.raises(ValueError, match=r"up_proj.weight has shape .*another model size"):
        model.on_load_checkpoint({"state_dict": state})
    # another hidden size misfits the scheduler's tensors too: the model size is named, not the scheduler
    sized_by_hidden = next(k for k in state if k.startswith("scheduler.") and hidden in state[k].shape)
    state[sized_by_hidden] = torch.zeros(*(n + 1 for n in state[sized_by_hidden].shape))
    with pytest.raises(ValueError, match=r"up_proj.weight has shape .*another model size"):
        model.on_load_checkpoint({"state_dict": state})


def test_a_checkpoint_of_another_width_or_depth_names_the_model_size(tokenizer_dir):
    """Same vocabulary, another hidden size: not blamed on the tokenizer; more layers: named, not torch's key
    list; the same scheduler class with other arguments: not "holds a LayerScheduler, builds a LayerScheduler"."""
    model = _model(tokenizer_dir, LayerScheduler(num_prefix_layers=3))
    own = dict(model.state_dict())
    key = next(k for k in own if k.endswith("embed_tokens.weight"))
    wider = {**own, key: torch.zeros(own[key].shape[0], own[key].shape[1] + 8)}
    with pytest.raises(ValueError, match=r"embed_tokens.weight has shape .*another model size") as refused:
        model.on_load_checkpoint({"state_dict": wider})
    assert "tokenizer" not in str(refused.value)
    layer = next(k for k in own if ".layers.0." in k and "language_model" in k)
    deeper = {**own, layer.replace(".layers.0.", ".layers.99."): own[layer]}
    with pytest.raises(ValueError, match=r"1 not in the recipe's model \(.*layers\.99.*another model size \(layers\)"):
        model.on_load_checkpoint({"state_dict": deeper})
    head = "scheduler.head.weight"
    other_prefix = {**own, head: torch.zeros(own[head].shape[0] + 1, own[head].shape[1])}
    spec = {"class_path": "adaptive_mllm.schedulers.layer.LayerScheduler", "init_args": {"num_prefix_layers": 2}}
    with pytest.raises(ValueError, match=r"LayerScheduler has scheduler.head.weight of shape .*other arguments"):
        model.on_load_checkpoint({"state_dict": other_prefix, "scheduler_spec": spec})


def test_a_scheduler_record_that_cannot_be_built_is_named(tokenizer_dir):
    trained = _model(tokenizer_dir, LayerScheduler(num_prefix_layers=3))
    checkpoint = {"state_dict": dict(trained.state_dict()), "scheduler_spec": {"class_path": "adaptive_mllm.schedulers.NoSuchScheduler"}}
    baseline = AdaptiveMLLM(trained.backbone, StaticScheduler(num_prefix_layers=3, insert_latency_token=True))
    baseline.configure_model()
    with pytest.raises(ValueError, match=r"scheduler recorded as .*NoSuchScheduler.* cannot be built here"):
        baseline.on_load_checkpoint(checkpoint)


@pytest.mark.parametrize("scheduler", [None, "layer"])
def test_fastv_drops_in_training_the_tokens_it_drops_when_answering(tokenizer_dir, scheduler):
    from adaptive_mllm.token_selection import FastV
    from adaptive_mllm.token_selection.base import TokenLayout

    model = AdaptiveMLLM(
        make_backbone(tokenizer_dir, num_layers=6, num_kv_heads=2),
        LayerScheduler(num_prefix_layers=3) if scheduler else None, FastV(layer_index=2, drop_ratio=0.5),
    )  # fmt: skip
    model.configure_model()
    model.eval()
    batch = _batch(model, QUESTIONS, ["red circle left of it", "two", "yes yes yes yes"])
    budgets = torch.tensor([1.0, 0.8, 0.6])
    with torch.no_grad():
        trained, labels = model(batch, budgets)  # teacher-forced, prompt + answer; columns compacted by the drop
        planner = model.planner
        inputs = planner.embed(batch["prompt_ids"], batch["prompt_attention_mask"], batch["pixel_values"])
        prepared = planner.prepare(inputs, budgets)
        hidden, _ = model.engine(
            prepared.embeds, prepared.attention_mask, prepared.position_ids, prepared.plan, prepared.latency_positions,
            gated=False, token_selector=model.token_selector, layout=TokenLayout(prepared.image_mask),
        )  # fmt: skip
        answering = model.backbone.lm_head(model.backbone.final_norm(hidden[:, -1]))  # [B, V] at the prompt's end
    # the teacher-forced logits at the prompt's last position (the latency token where there is one): the column
    # before the first answer token, which the labels mark (they followed the columns through the drop)
    ends = (labels != IGNORE_INDEX).int().argmax(1) - 1
    at_end = trained[torch.arange(3), ends]
    assert torch.allclose(at_end, answering, atol=1e-5), (at_end - answering).abs().max()


def test_a_text_only_training_batch_runs_the_image_side_on_a_blank_image(tokenizer_dir):
    """As the LLaVA release trains text-only records: the vision tower and projector run on a zero image whose
    features weigh 0, so every process runs the same modules (ZeRO-3 gathers per module) and the projector gets
    a zero gradient; the loss is the text's alone. Without gradients (answering) nothing extra runs."""
    model = _model(tokenizer_dir, LayerScheduler(num_prefix_layers=2))
    model.train()
    batch = _batch(model, ["What colour is the circle ?", "How many shapes are there ?"], ["red", "two"])
    batch["pixel_values"] = None
    tower = model.backbone.model.model.vision_tower
    calls = []
    handle = tower.register_forward_hook(lambda module, args, output: calls.append(args[0].detach()))
    budgets = torch.tensor([1.0, 1.0])
    logits, labels = model(batch, budgets)
    loss = model._loss(logits, labels)
    loss.backward()
    assert len(calls) == 1 and calls[0].shape[0] == 1 and not bool(calls[0].abs().sum())  # one blank image
    projector = model.backbone.parameter_groups()["projector"]
    assert all(p.grad is not None and not bool(p.grad.abs().sum()) for p in projector)
    calls.clear()
    with torch.no_grad():
        again, _ = model(batch, budgets)
    handle.remove()
    assert calls == []
    torch.testing.assert_close(again, logits.detach())


def _lora_model(tokenizer_dir, rank: int = 2, **kwargs) -> AdaptiveMLLM:
    from adaptive_mllm.lora import LoRA

    model = AdaptiveMLLM(
        make_backbone(tokenizer_dir, num_layers=6, num_kv_heads=2), LayerScheduler(num_prefix_layers=2),
        lora=LoRA(rank=rank, alpha=4.0, dropout=0.0), train_budget_range=(0.6, 1.0), **kwargs,
    )  # fmt: skip
    model.configure_model()
    return model


def test_lora_trains_the_adapters_projector_and_scheduler_and_nothing_else_of_the_llm(tokenizer_dir):
    model = _lora_model(tokenizer_dir, learning_rate=1e-2, part_learning_rates={"llm": 5e-2}, freeze=["vision_tower"])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    adapters = {name for name in trainable if ".lora_" in name}
    assert adapters and all(".layers." in name for name in adapters)  # every decoder projection, not lm_head
    assert len(adapters) == 2 * 7 * 6  # A and B of q, k, v, o, gate, up, down in 6 layers
    assert trainable - adapters == {n for n, _ in model.named_parameters() if n.startswith(("scheduler.", "backbone.model.model.multi_modal_projector."))}

    class Trainer:
        estimated_stepping_batches = 10

    model.trainer = Trainer()
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    (llm,) = [group for group in optimizer.param_groups if group.get("name") == "llm"]
    assert {id(p) for p in llm["params"]} == {id(p) for n, p in model.named_parameters() if n in adapters}
    model.train()
    batch = _batch(model, QUESTIONS, ANSWERS)
    for _ in range(3):  # the first at the warm-up's learning rate 0
        optimizer.zero_grad()
        model._loss(*model(batch, torch.tensor([0.7, 0.8, 1.0]))).backward()
        optimizer.step()
        scheduler.step()
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed <= trainable  # the LLM's own weights, embeddings, lm_head and the tower did not move
    assert {n for n in changed if ".lora_B." in n} and {n for n in changed if "multi_modal_projector" in n}


def test_lora_with_llm_frozen_is_refused(tokenizer_dir):
    from adaptive_mllm.lora import LoRA

    with pytest.raises(ValueError, match="freeze names llm and lora is set"):
        AdaptiveMLLM(make_backbone(tokenizer_dir), lora=LoRA(rank=2), freeze=["llm"])


def test_a_checkpoint_with_or_without_adapters_or_of_another_rank_is_named(tokenizer_dir):
    adapted = _lora_model(tokenizer_dir, rank=2)
    plain = _model(tokenizer_dir, LayerScheduler(num_prefix_layers=2))
    with pytest.raises(ValueError, match=r"trained with LoRA adapters .*lora_A.*give model.lora as the training run did"):
        plain.on_load_checkpoint({"state_dict": dict(adapted.state_dict())})
    with pytest.raises(ValueError, match=r"the recipe adds LoRA adapters \(model.lora\) and the checkpoint has none"):
        adapted.on_load_checkpoint({"state_dict": dict(plain.state_dict())})
    with pytest.raises(ValueError, match=r"its LoRA adapters have rank 3, the recipe's model.lora.rank is 2"):
        adapted.on_load_checkpoint({"state_dict": dict(_lora_model(tokenizer_dir, rank=3).state_dict())})
    adapted.on_load_checkpoint({"state_dict": dict(_lora_model(tokenizer_dir, rank=2).state_dict())})  # same: loads


def test_a_checkpoint_records_its_lora_settings_and_another_alpha_is_refused(tokenizer_dir):
    """alpha scales every adapter and is no tensor's shape: without the record another alpha loaded silently."""
    from adaptive_mllm.lora import LoRA

    trained = _lora_model(tokenizer_dir, rank=2)
    checkpoint = {"state_dict": dict(trained.state_dict())}
    trained.on_save_checkpoint(checkpoint)
    assert checkpoint["lora"] == {"rank": 2, "alpha": 4.0, "dropout": 0.0}
    other_alpha = _lora_model(tokenizer_dir, rank=2)
    other_alpha.lora = LoRA(rank=2, alpha=8.0, dropout=0.0)
    with pytest.raises(ValueError, match=r"trained with lora.alpha=4.0, the recipe gives 8.0"):
        other_alpha.on_load_checkpoint(dict(checkpoint))
    other_dropout = _lora_model(tokenizer_dir, rank=2)
    other_dropout.lora = LoRA(rank=2, alpha=4.0, dropout=0.1)
    with pytest.warns(UserWarning, match=r"trained with lora.dropout=0.0, the recipe gives 0.1"):
        other_dropout.on_load_checkpoint(dict(checkpoint))
    plain = _model(tokenizer_dir, LayerScheduler(num_prefix_layers=2))
    record = {"state_dict": dict(plain.state_dict())}
    plain.on_save_checkpoint(record)
    assert record["lora"] is None
    del checkpoint["lora"]  # written before the record existed: the tensors alone decide
    _lora_model(tokenizer_dir, rank=2).on_load_checkpoint(checkpoint)


def test_a_template_whose_answers_cannot_end_is_refused_when_the_model_is_built(tokenizer_dir):
    """LLaVA's plain template ends a caption at a newline, which the tiny word-level tokenizer drops: a fit would train
    without the label that ends each answer, so the model is refused when it is built, not at its first answer."""
    from adaptive_mllm.backbones import LlavaBackbone
    from tests.conftest import tiny_config

    module = AdaptiveMLLM(LlavaBackbone(config=tiny_config(), tokenizer=str(tokenizer_dir), template="plain"))
    with pytest.raises(ValueError, match="template 'plain' ends answers at a newline, which this tokenizer drops"):
        module.configure_model()


def test_a_checkpoint_of_the_other_budget_rule_is_said(tokenizer_dir):
    """Checkpoints trained when `flops` was the default load under the release's rule (the default since 2026-12-07),
    a budget possibly running another number of units: a warning names the flag that answers as they did."""
    trained = _model(tokenizer_dir, LayerScheduler(num_prefix_layers=3, budget_rule="flops"))
    saved: dict = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(saved)
    assert saved["scheduler_spec"]["init_args"]["budget_rule"] == "flops"
    now = _model(tokenizer_dir, LayerScheduler(num_prefix_layers=3))
    with pytest.warns(UserWarning, match=r"budget_rule='flops', this model by 'release' .*budget_rule=flops answers as it did"):
        now.on_load_checkpoint({"state_dict": dict(saved["state_dict"]), "scheduler_spec": saved["scheduler_spec"]})
    same = _model(tokenizer_dir, LayerScheduler(num_prefix_layers=3, budget_rule="flops"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.on_load_checkpoint({"state_dict": dict(saved["state_dict"]), "scheduler_spec": saved["scheduler_spec"]})


def test_a_checkpoint_evaluated_with_another_chat_template_is_warned_about(tokenizer_dir):
    trained = AdaptiveMLLM(make_backbone(tokenizer_dir), LayerScheduler(num_prefix_layers=2))
    trained.configure_model()
    saved: dict = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(saved)
    assert saved["chat_template"] == "plain_chat"
    same = AdaptiveMLLM(make_backbone(tokenizer_dir), LayerScheduler(num_prefix_layers=2))
    same.configure_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.on_load_checkpoint(dict(saved))
    other_backbone = LlavaBackbone(config=tiny_config(), tokenizer=str(tokenizer_dir), template="vicuna_v1")
    other_backbone.build()
    other = AdaptiveMLLM(other_backbone, LayerScheduler(num_prefix_layers=2))
    other.configure_model()
    with pytest.warns(UserWarning, match=r"trained with chat template 'plain_chat', the recipe gives 'vicuna_v1'.*template=plain_chat"):
        other.on_load_checkpoint(dict(saved))
    del saved["chat_template"]  # a checkpoint written before it was recorded: nothing to compare
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.on_load_checkpoint(dict(saved))
