"""AdaLLaVA release checkpoints (``ada_llava_llama``) answer here as the release's own code answers.

``adallava_release_outputs.json`` holds what the release's ``AdaLlavaLlamaForCausalLM.generate(images=...,
latency=b)`` (transformers 4.37.2) answered for tiny AdaLLaVA-L and -H checkpoints it saved itself
(``make_adallava_release_outputs.py``); the tests rebuild those checkpoints from their keys and read them the way
a user would: ``LlavaBackbone(checkpoint=...)`` and ``LayerScheduler`` / ``HeadScheduler(release_checkpoint=...,
budget_rule="release")``. Compared: the plan each budget runs, the first answer token's logits and the greedy
answer."""

from __future__ import annotations

import json

import pytest
import torch

from adaptive_mllm.backbones import LlavaBackbone
from adaptive_mllm.backbones.llava_release import ReleaseLayoutError
from adaptive_mllm.export import export_module, load_exported
from adaptive_mllm.generation import greedy_generate
from adaptive_mllm.inputs import position_ids_from_mask
from adaptive_mllm.module import AdaptiveMLLM
from adaptive_mllm.schedulers import HeadScheduler, LayerScheduler
from tests.backbones.adallava_release_layout import FIXTURE_FILE, write_checkpoint, write_tower

FIXTURE = json.loads(FIXTURE_FILE.read_text())
HEADS = FIXTURE["variants"]["L"]["config"]["num_attention_heads"]
LAYERS = FIXTURE["variants"]["L"]["config"]["num_hidden_layers"]


def _scheduler(variant: str, checkpoint: str | None) -> LayerScheduler | HeadScheduler:
    config = FIXTURE["variants"][variant]["config"]
    if variant == "L":
        return LayerScheduler(config["num_prefix_layers"], budget_rule="release", release_checkpoint=checkpoint)
    return HeadScheduler(config["num_prefix_layers"], rank=config["scheduler_rank"], budget_rule="release",
                         release_checkpoint=checkpoint)


@pytest.fixture(scope="module")
def release_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adallava")
    tower = write_tower(root / "tower", FIXTURE)
    checkpoints = {variant: write_checkpoint(root / variant, FIXTURE, variant, tower) for variant in FIXTURE["variants"]}
    return tower, checkpoints


def _module(release_dirs, variant: str) -> AdaptiveMLLM:
    tower, checkpoints = release_dirs
    backbone = LlavaBackbone(checkpoint=str(checkpoints[variant]), vision_tower=str(tower))
    module = AdaptiveMLLM(backbone, _scheduler(variant, str(checkpoints[variant])), max_new_tokens=FIXTURE["new_tokens"])
    module.configure_model()
    return module.eval()


def _inputs(module: AdaptiveMLLM, case: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's prompt with its image sentinel expanded to the backbone's image tokens, and its pixels."""
    backbone = module.backbone
    ids: list[int] = []
    for token in FIXTURE["prompts"][case]:
        ids += [backbone.image_token_id] * backbone.num_image_tokens if token == FIXTURE["image_sentinel"] else [token]
    pixels = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(case))  # the generator's pixels(case)
    return torch.tensor([ids]), pixels[None]


def _answer(module: AdaptiveMLLM, case: int, budget: float) -> tuple[torch.Tensor, list[int], list]:
    """(first answer token's logits, greedy answer, plan per layer as the release records it)."""
    ids, pixels = _inputs(module, case)
    planner = module.planner
    inputs = planner.embed(ids, torch.ones_like(ids), pixels)
    prepared = planner.prepare(inputs, torch.tensor([budget]))
    with torch.no_grad():
        hidden, plan = module.engine(prepared.embeds, prepared.attention_mask, position_ids_from_mask(prepared.attention_mask),
                                     prepared.plan, prepared.latency_positions, gated=False)
        logits = module.backbone.lm_head(module.backbone.final_norm(hidden[:, -1]))[0]
        result = greedy_generate(module.engine, prepared.embeds, prepared.attention_mask, FIXTURE["new_tokens"], [],
                                 prepared.plan, prepared.latency_positions)
    return logits, result.tokens[0], _release_plan(plan)


def _release_plan(plan) -> list:
    """Per layer, [attention heads kept, MLP groups kept], each a list of 0/1 (the release's cache records it so)."""
    rows = [[[1] * HEADS, [1] * HEADS] for _ in range(plan.num_prefix_layers)]
    for layer in range(LAYERS - plan.num_prefix_layers):
        if plan.head_mask is None:
            kept = int(plan.layer_mask[0, layer] > 0.5)
            rows.append([[kept] * HEADS, [kept] * HEADS])
        else:
            rows.append([(plan.head_mask[0, layer] > 0.5).int().tolist(), (plan.mlp_mask[0, layer] > 0.5).int().tolist()])
    return rows


@pytest.mark.parametrize("variant", list(FIXTURE["variants"]))
def test_release_checkpoints_answer_as_the_release(release_dirs, variant):
    module = _module(release_dirs, variant)
    vocab = FIXTURE["variants"][variant]["config"]["vocab_size"]
    for expected in FIXTURE["variants"][variant]["answers"]:
        logits, tokens, plan = _answer(module, expected["case"], expected["budget"])
        where = f"{variant} case {expected['case']} budget {expected['budget']}"
        assert plan == expected["plan"], where
        # the <image> row the loader adds (the mean of the others) is no token of the release
        torch.testing.assert_close(logits[:vocab], torch.tensor(expected["first_logits"]), rtol=0, atol=2e-5, msg=where)
        assert tokens == expected["tokens"], where


def test_the_answers_cover_every_kind_of_plan():
    """Budgets from every layer to none scheduled, and head plans that split layers: a real test of the reading."""
    plans = [answer["plan"] for layout in FIXTURE["variants"].values() for answer in layout["answers"]]
    flat = [layer for plan in plans for layer in plan]
    assert any(all(value == 0 for part in layer for value in part) for layer in flat)  # a skipped layer
    assert any(0 < sum(layer[0]) < HEADS for layer in flat)  # some heads of a layer
    answers = {tuple(answer["tokens"]) for layout in FIXTURE["variants"].values() for answer in layout["answers"]}
    assert len(answers) > 5  # budgets change the answers


def test_without_the_release_weights_the_plans_differ(release_dirs):
    """The scheduler weights are what decide the plans: a fresh scheduler picks others."""
    tower, checkpoints = release_dirs
    backbone = LlavaBackbone(checkpoint=str(checkpoints["H"]), vision_tower=str(tower))
    module = AdaptiveMLLM(backbone, _scheduler("H", None), max_new_tokens=FIXTURE["new_tokens"])
    module.configure_model()
    module.eval()
    expected = [answer["plan"] for answer in FIXTURE["variants"]["H"]["answers"]]
    assert [_answer(module, answer["case"], answer["budget"])[2] for answer in FIXTURE["variants"]["H"]["answers"]] != expected


def test_a_scheduler_other_than_the_checkpoints_is_refused(release_dirs):
    tower, checkpoints = release_dirs
    for scheduler, match in [
        (HeadScheduler(3, rank=2, release_checkpoint=str(checkpoints["L"])), "scheduler_type is 'L'"),
        (LayerScheduler(2, release_checkpoint=str(checkpoints["L"])), "num_prefix_layers is 3"),
        (HeadScheduler(3, rank=4, release_checkpoint=str(checkpoints["H"])), "scheduler_rank is 2"),
        (LayerScheduler(3, release_checkpoint=str(tower)), "not the AdaLLaVA release's"),
    ]:
        backbone = LlavaBackbone(checkpoint=str(checkpoints["L"]), vision_tower=str(tower))
        with pytest.raises(ReleaseLayoutError, match=match):
            AdaptiveMLLM(backbone, scheduler).configure_model()


def test_an_export_keeps_the_release_scheduler_without_its_directory(release_dirs, tmp_path):
    module = _module(release_dirs, "L")
    assert "release_checkpoint" not in module.scheduler.spec()["init_args"]  # what checkpoints record, too
    export_module(module, tmp_path / "export")
    spec = json.loads((tmp_path / "export" / "scheduler.json").read_text())
    assert "release_checkpoint" not in spec["init_args"]
    again = load_exported(tmp_path / "export")
    for name, tensor in module.scheduler.state_dict().items():
        assert torch.equal(again.scheduler.state_dict()[name], tensor)


def test_the_release_recipe_reads_a_release_checkpoint(release_dirs):
    """recipes/adallava-l7b-release.yaml with its paths pointed at the tiny checkpoint: the trained scheduler is
    the checkpoint's, and budgets follow the release's rule."""
    from pathlib import Path

    from adaptive_mllm.recipe import UNUSED_TRAINER, build_model

    tower, checkpoints = release_dirs
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "adallava-l7b-release.yaml"
    module = build_model([
        "--config", str(recipe), f"--model.backbone.init_args.checkpoint={checkpoints['L']}",
        f"--model.backbone.init_args.vision_tower={tower}", "--model.backbone.init_args.dtype=float32",
        f"--model.scheduler.init_args.release_checkpoint={checkpoints['L']}", "--model.scheduler.init_args.num_prefix_layers=3",
        *UNUSED_TRAINER,
    ], "cpu").eval()
    from safetensors.torch import load_file

    saved = load_file(checkpoints["L"] / "model.safetensors")
    assert torch.equal(module.scheduler.head.weight, saved["scheduler.mlp_head.weight"])
    assert torch.equal(module.scheduler.latency_encoder.up.weight, saved["scheduler.scheduler_up_proj.net.1.weight"])
    assert module.scheduler.budget_rule == "release"


def test_reading_the_release_tokenizer_says_nothing_about_its_model_type(release_dirs):
    """transformers warns that ada_llava_llama is not its model type when it only reads the tokenizer: noise.
    In a process of its own: transformers' log handler is set up once per process."""
    import subprocess
    import sys

    tower, checkpoints = release_dirs
    code = ("import sys; from adaptive_mllm.backbones import LlavaBackbone; "
            "print(len(LlavaBackbone(checkpoint=sys.argv[1], vision_tower=sys.argv[2]).tokenizer))")
    done = subprocess.run([sys.executable, "-c", code, str(checkpoints["L"]), str(tower)], capture_output=True, text=True, check=True)
    assert int(done.stdout) > 0
    assert "model of type" not in done.stderr
