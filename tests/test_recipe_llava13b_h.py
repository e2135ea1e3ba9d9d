"""recipes/llava13b-h.yaml on a stand-in with Vicuna-13B's proportions: 40 layers, 40 heads, and an MLP
width that 40 groups do not divide (216 = 40 x 5 + 16, as 13824 = 40 x 345 + 24). The release splits the
remainder over the first groups (``AdaLlamaMLP``: ``I mod G`` groups of ``I // G + 1`` neurons); so must
training (gated), inference (sliced weights) and the cost model."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from adaptive_mllm.cli import build_cli
from adaptive_mllm.engine import Engine
from adaptive_mllm.inputs import position_ids_from_mask
from tests.conftest import tiny_config
from tests.test_recipes_real import ON_CPU, RECIPE_DIR, write_llava_data

RECIPE = RECIPE_DIR / "llava13b-h.yaml"
LAYERS, HEADS, HIDDEN, WIDTH = 40, 40, 80, 216


def write_standin(directory: Path, tokenizer_dir: Path) -> None:
    from adaptive_mllm.backbones import LlavaBackbone

    config = tiny_config(num_layers=LAYERS, num_heads=HEADS, num_kv_heads=HEADS, hidden=HIDDEN)
    config["text"]["intermediate_size"] = WIDTH
    backbone = LlavaBackbone(config=config, tokenizer=str(tokenizer_dir), template="vicuna_v1")
    backbone.build()
    backbone.save_pretrained(directory)


def test_llava13b_h_trains_and_plans_uneven_mlp_groups(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load(RECIPE.read_text())
    write_standin(tmp_path / config["model"]["backbone"]["init_args"]["checkpoint"], tokenizer_dir)
    write_llava_data(tmp_path)
    cli = build_cli(["fit", "--config", str(RECIPE), *ON_CPU, "--trainer.fast_dev_run=true", "--data.init_args.batch_size=3"])
    assert cli.trainer.global_step == 1
    model = cli.model.eval()
    scheduler, backbone = model.scheduler, model.backbone
    assert type(scheduler).__name__ == "HeadScheduler" and (scheduler.num_prefix_layers, scheduler.rank) == (20, 8)
    assert backbone.shape.intermediate_size == WIDTH and scheduler.units_per_layer == 5

    # inference plans: the release's floor(200 b) - 100 units (40 layers x 5), whole units of 8 MLP groups
    torch.manual_seed(0)
    batch, length = 4, 12
    hidden = 3 * torch.randn(batch, HIDDEN)
    budgets = torch.tensor([0.6, 0.7, 0.85, 0.95], dtype=torch.float64)
    lengths = torch.full((batch,), length)
    with torch.no_grad():
        plan = scheduler(hidden, budgets, lengths)
    assert plan.units.tolist() == [20, 40, 70, 90]
    assert ((plan.head_mask.sum((-1, -2)) + plan.mlp_mask.sum((-1, -2))) / 16 == plan.units).all()  # 8 heads + 8 groups a unit
    assert plan.mlp_mask.shape == (batch, 20, HEADS)
    assert bool((plan.mlp_mask.sum(-1) % 8 == 0).all()) and not bool((plan.mlp_mask == 1).all())

    # training's gates and inference's sliced weights agree on the uneven groups
    engine = Engine(backbone)
    mask = torch.ones(batch, length, dtype=torch.long)
    ids = torch.randint(5, len(backbone.tokenizer), (batch, length), generator=torch.Generator().manual_seed(1))
    ids[ids == backbone.image_token_id] = 5
    with torch.no_grad():
        embeds = backbone.embed(ids)
        positions = position_ids_from_mask(mask)
        gated, _ = engine(embeds, mask, positions, plan, gated=True)
        sliced, _ = engine(embeds, mask, positions, plan, gated=False)
        full, _ = engine(embeds, mask, positions, gated=False)
    torch.testing.assert_close(sliced, gated, atol=1e-5, rtol=1e-5)
    assert (full - gated).abs().max() > 1e-4  # the plan really changed something
