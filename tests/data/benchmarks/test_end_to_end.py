"""Every benchmark through `Trainer.test` with the tiny model: its own metric, the budget sweep's CSV."""

from __future__ import annotations

import csv

import lightning as L
import pytest

from adaptive_mllm.callbacks import SweepReport
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
    "vqav2": (lambda f: VQAv2DataModule(str(f["questions"]), str(f["annotations"]), batch_size=4, max_new_tokens=2), write_vqav2, VQAAccuracy),
    "gqa": (lambda f: GQADataModule(str(f["questions"]), batch_size=4, max_new_tokens=2), write_gqa, GQAAccuracy),
    "textvqa": (lambda f: TextVQADataModule(str(f["questions"]), ocr_json=str(f["ocr"]), batch_size=4, max_new_tokens=2), write_textvqa, VQAAccuracy),
    "scienceqa": (lambda f: ScienceQADataModule(str(f["problems"]), batch_size=4, max_new_tokens=2), write_scienceqa, MultipleChoiceAccuracy),
    "pope": (lambda f: POPEDataModule(str(f["questions"]), str(f["images"]), batch_size=4, max_new_tokens=2), write_pope, POPEMetrics),
    "mme": (lambda f: MMEDataModule(str(f["root"]), batch_size=4, max_new_tokens=2), write_mme, MMEScore),
    "mmbench": (lambda f: MMBenchDataModule(str(f["tsv"]), batch_size=4, max_new_tokens=2), write_mmbench, MultipleChoiceAccuracy),
}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_tiny_model_runs_the_benchmark_at_every_budget(name, tokenizer_dir, tmp_path):
    make_datamodule, write, metric_class = BENCHMARKS[name]
    datamodule = make_datamodule(write(tmp_path / name))
    model = AdaptiveMLLM(make_backbone(tokenizer_dir, num_layers=4), LayerScheduler(num_prefix_layers=2), eval_budgets=[1.0, 0.7], max_new_tokens=2)
    report = SweepReport()
    trainer = L.Trainer(
        accelerator="cpu", logger=False, default_root_dir=tmp_path / "run", enable_progress_bar=False, enable_model_summary=False,
        callbacks=[report],
    )
    trainer.test(model, datamodule=datamodule)
    assert isinstance(report.metric(trainer, model, "test", 1.0), metric_class)
    with open(tmp_path / "run" / "test_results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["budget"]) for row in rows] == [1.0, 0.7]
    assert all(row["overall"] != "" for row in rows)
    assert float(rows[1]["flops_fraction"]) <= 0.7 < float(rows[0]["flops_fraction"]) + 1e-9
    assert (tmp_path / "run" / "layer_usage.png").is_file()


@pytest.mark.parametrize("name", ["vqav2", "mmbench"])
def test_predict_writes_the_servers_submission_file(name, tokenizer_dir, tmp_path):
    """VQAv2 test-dev and MMBench test are scored by their servers: predict writes the file each takes."""
    import json

    from openpyxl import load_workbook

    from adaptive_mllm.prediction_writer import PredictionWriter

    files = BENCHMARKS[name][1](tmp_path / name)
    datamodule = VQAv2DataModule(str(files["questions"]), None, batch_size=4, max_new_tokens=2) if name == "vqav2" else MMBenchDataModule(str(files["tsv"]), circular=False, batch_size=4, max_new_tokens=2)
    model = AdaptiveMLLM(make_backbone(tokenizer_dir, num_layers=4), LayerScheduler(num_prefix_layers=2), budget=0.7, max_new_tokens=2)
    writer = PredictionWriter()
    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path / "run", enable_progress_bar=False, callbacks=[writer])
    trainer.predict(model, datamodule=datamodule, return_predictions=False)
    answers = {json.loads(line)["id"]: json.loads(line)["answer"] for line in (writer.directory / "budget-0.7.jsonl").read_text().splitlines()}
    if name == "vqav2":
        submitted = json.loads((writer.directory / "submission-budget-0.7.json").read_text())
        questions = json.loads(files["questions"].read_text())["questions"]
        assert [row["question_id"] for row in submitted] == [q["question_id"] for q in questions]
        assert {str(row["question_id"]) for row in submitted} == set(answers)
    else:
        sheet = load_workbook(writer.directory / "submission-budget-0.7.xlsx").active
        header, *rows = [list(row) for row in sheet.iter_rows(values_only=True)]
        predictions = {str(row[header.index("index")]): row[header.index("prediction")] or "" for row in rows}
        assert predictions == answers


@pytest.mark.parametrize(("make", "write", "reference_length"), [
    (lambda f, **kw: ScienceQADataModule(str(f["problems"]), batch_size=4, **kw), write_scienceqa, 1024),  # model_vqa_science.py
    (lambda f, **kw: MMBenchDataModule(str(f["tsv"]), circular=False, batch_size=4, **kw), write_mmbench, 1024),  # model_vqa_mmbench.py
    (lambda f, **kw: GQADataModule(str(f["questions"]), batch_size=4, **kw), write_gqa, 128),  # model_vqa_loader.py's default
    (lambda f, **kw: POPEDataModule(str(f["questions"]), str(f["images"]), batch_size=4, **kw), write_pope, 128),
])  # fmt: skip
def test_a_benchmark_answers_as_long_as_its_reference_script_lets_it(make, write, reference_length, tokenizer_dir, tmp_path, monkeypatch):
    """LLaVA-1.5's scripts let a ScienceQA or MMBench answer run to 1024 tokens and a VQA-style one to 128, whatever
    the model's max_new_tokens: the benchmark's length decides, on test and predict alike."""
    from adaptive_mllm import module as module_file

    files = write(tmp_path / "bench")
    assert make(files).max_new_tokens == reference_length
    model = AdaptiveMLLM(make_backbone(tokenizer_dir, num_layers=4), LayerScheduler(num_prefix_layers=2), eval_budgets=[1.0], max_new_tokens=2)
    model.configure_model()
    model.eval()
    # nothing stops early: every answer runs to the length it is allowed
    monkeypatch.setattr(type(model.backbone.chat_template), "stop_token_ids", lambda self, tokenizer: [])
    lengths = []
    real_generate = module_file.greedy_generate
    monkeypatch.setattr(module_file, "greedy_generate", lambda *args, **kw: lengths.append(args[3]) or real_generate(*args, **kw))

    datamodule = make(files, max_new_tokens=5)
    datamodule.set_input_processor(model.backbone.input_processor())
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader()))
    answered = model._eval_step(batch, 1)
    assert answered[1.0]["answer_tokens"] == [5] * len(batch["ids"])  # not the model's 2
    datamodule.setup("predict")
    model.predict_step(next(iter(datamodule.predict_dataloader())), 0)
    assert lengths == [5, 5]

    own = make(files, max_new_tokens=None)  # None: the model's
    own.set_input_processor(model.backbone.input_processor())
    own.setup("test")
    assert model._eval_step(next(iter(own.test_dataloader())), 1)[1.0]["answer_tokens"] == [2] * len(batch["ids"])


@pytest.mark.parametrize("length", [0, -3, True, 2.5])
def test_a_benchmark_length_that_is_not_a_count_is_refused(length, tmp_path):
    files = write_gqa(tmp_path / "gqa")
    with pytest.raises(ValueError, match=r"GQADataModule: max_new_tokens=.* must be a whole number >= 1"):
        GQADataModule(str(files["questions"]), max_new_tokens=length)
