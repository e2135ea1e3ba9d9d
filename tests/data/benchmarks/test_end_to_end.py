"""Every benchmark through `Trainer.test` with the tiny model: its own metric, the budget sweep's CSV."""

from __future__ import annotations

import csv

import lightning as L
import pytest

from adaptive_mllm.data.benchmarks import (
    GQADataModule,
    MMBenchDataModule,
    MMEDataModule,
    POPEDataModule,
    ScienceQADataModule,
    TextVQADataModule,
    VQAv2DataModule,
)
from adaptive_mllm.metrics import (
    GQAAccuracy,
    MMEScore,
    MultipleChoiceAccuracy,
    POPEMetrics,
    VQAAccuracy,
)
from adaptive_mllm.module import AdaptiveMLLM
from adaptive_mllm.schedulers import LayerScheduler
from tests.conftest import make_backbone
from tests.data.benchmarks.conftest import (
    write_gqa,
    write_mmbench,
    write_mme,
    write_pope,
    write_scienceqa,
    write_textvqa,
    write_vqav2,
)

BENCHMARKS = {
    "vqav2": (lambda f: VQAv2DataModule(str(f["questions"]), str(f["annotations"]), batch_size=4), write_vqav2, VQAAccuracy),
    "gqa": (lambda f: GQADataModule(str(f["questions"]), batch_size=4), write_gqa, GQAAccuracy),
    "textvqa": (lambda f: TextVQADataModule(str(f["questions"]), ocr_json=str(f["ocr"]), batch_size=4), write_textvqa, VQAAccuracy),
    "scienceqa": (lambda f: ScienceQADataModule(str(f["problems"]), batch_size=4), write_scienceqa, MultipleChoiceAccuracy),
    "pope": (lambda f: POPEDataModule(str(f["questions"]), str(f["images"]), batch_size=4), write_pope, POPEMetrics),
    "mme": (lambda f: MMEDataModule(str(f["root"]), batch_size=4), write_mme, MMEScore),
    "mmbench": (lambda f: MMBenchDataModule(str(f["tsv"]), batch_size=4), write_mmbench, MultipleChoiceAccuracy),
}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_tiny_model_runs_the_benchmark_at_every_budget(name, tokenizer_dir, tmp_path):
    make_datamodule, write, metric_class = BENCHMARKS[name]
    datamodule = make_datamodule(write(tmp_path / name))
    model = AdaptiveMLLM(make_backbone(tokenizer_dir, num_layers=4), LayerScheduler(num_prefix_layers=2), eval_budgets=[1.0, 0.7], max_new_tokens=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path / "run", enable_progress_bar=False, enable_model_summary=False)
    trainer.test(model, datamodule=datamodule)
    assert isinstance(model._metric("test", 1.0), metric_class)
    with open(tmp_path / "run" / "test_results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["budget"]) for row in rows] == [1.0, 0.7]
    assert all(row["overall"] != "" for row in rows)
    assert float(rows[1]["flops_fraction"]) <= 0.7 < float(rows[0]["flops_fraction"]) + 1e-9
    assert (tmp_path / "run" / "layer_usage.png").is_file()
