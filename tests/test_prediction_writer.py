"""predict's answers are written, per budget, into a directory of their own, never over earlier answers; marked
complete or not; merged from the processes of a DDP run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from adaptive_mllm.prediction_writer import COLUMNS, DONE, INCOMPLETE, PredictionWriter

REPO = Path(__file__).parents[1]


class Answering(L.LightningModule):
    """Two budgets per batch, as a model that answers every question at each of them."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def predict_step(self, batch, batch_idx):
        (values,) = batch
        return [
            {"id": f"q{int(v)}", "question": f"what is {int(v)}?", "answer": str(int(v) * 2), "budget": b, "units": 3.0,
             "flops_fraction": b - 0.05}
            for b in (1.0, 0.6)
            for v in values
        ]


def _predict(root, writer):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(5.0)), batch_size=2)
    trainer = L.Trainer(default_root_dir=root, callbacks=[writer], logger=False, enable_progress_bar=False, accelerator="cpu")
    trainer.predict(Answering(), data, return_predictions=False)
    return writer.directory


def test_answers_land_per_budget_and_never_over_earlier_ones(tmp_path):
    first = _predict(tmp_path, PredictionWriter())  # the run's own directory (the CLI gives each predict one)
    second = _predict(tmp_path, PredictionWriter())  # ... which holds answers now: a new one below it
    assert first == tmp_path and second.parent == tmp_path / "predictions"
    for budget in ("1", "0.6"):
        rows = [json.loads(line) for line in (first / f"budget-{budget}.jsonl").read_text().splitlines()]
        assert [row["id"] for row in rows] == [f"q{i}" for i in range(5)]
        assert all(list(row) == list(COLUMNS) for row in rows)
        assert rows[3]["answer"] == "6" and rows[3]["question"] == "what is 3?" and rows[3]["budget"] == float(budget)


def test_an_output_dir_holding_answers_is_refused(tmp_path):
    target = tmp_path / "answers"
    _predict(tmp_path, PredictionWriter(str(target)))
    before = (target / "budget-1.jsonl").read_text()
    with pytest.raises(FileExistsError, match="already holds answers"):
        _predict(tmp_path, PredictionWriter(str(target)))
    assert (target / "budget-1.jsonl").read_text() == before


def test_two_runs_started_together_into_one_output_dir_do_not_share_it(tmp_path):
    """The second finds no answers yet, but the first's exclusive INCOMPLETE: it stops instead of appending to the
    same files (answers twice, a wrong count)."""
    target = tmp_path / "answers"
    first, second = PredictionWriter(str(target)), PredictionWriter(str(target))
    trainer = L.Trainer(logger=False, accelerator="cpu")
    first.setup(trainer, None, "predict")  # the first run is set up, no answer written yet
    with pytest.raises(FileExistsError, match=r"INCOMPLETE exists: another predict is writing into .*answers"):
        second.setup(trainer, None, "predict")
    (target / INCOMPLETE).unlink()  # what the message says to do to reuse it
    _predict(tmp_path, PredictionWriter(str(target)))
    assert json.loads((target / DONE).read_text())["total"] == 10


class Failing(Answering):
    """Answers the first batch, then fails."""

    def predict_step(self, batch, batch_idx):
        if batch_idx == 1:
            raise RuntimeError("out of memory, say")
        return super().predict_step(batch, batch_idx)


def test_completeness_is_marked(tmp_path):
    done = _predict(tmp_path / "done", PredictionWriter())
    assert not (done / INCOMPLETE).exists()
    assert json.loads((done / DONE).read_text())["answers"] == {"1": 5, "0.6": 5}
    with pytest.raises(RuntimeError, match="out of memory"):
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(5.0)), batch_size=2)
        writer = PredictionWriter(str(tmp_path / "failed"))
        trainer = L.Trainer(callbacks=[writer], logger=False, enable_progress_bar=False, accelerator="cpu")
        with pytest.warns(UserWarning, match="incomplete"):
            trainer.predict(Failing(), data, return_predictions=False)
    failed = tmp_path / "failed"
    assert len((failed / "budget-1.jsonl").read_text().splitlines()) == 2  # the first batch, kept ...
    assert "RuntimeError: out of memory, say" in (failed / INCOMPLETE).read_text()  # ... and marked partial
    assert not (failed / DONE).exists()


def test_rank_files_are_merged_each_id_once_in_the_samplers_order(tmp_path):
    def rows(budget, ids):
        return "".join(json.dumps({"id": i, "question": "?", "answer": i, "budget": budget, "units": 1.0, "flops_fraction": 1.0}) + "\n" for i in ids)

    # process r answered questions r, r + 2, ...; q4 also on process 1, as a repeating sampler would give it
    (tmp_path / "budget-1.rank0.jsonl").write_text(rows(1.0, ["q0", "q2", "q4"]))
    (tmp_path / "budget-1.rank1.jsonl").write_text(rows(1.0, ["q1", "q3", "q4"]))
    (tmp_path / "budget-0.5.rank0.jsonl").write_text(rows(0.5, ["q0"]))
    writer = PredictionWriter(str(tmp_path))
    writer.directory = tmp_path
    with pytest.warns(UserWarning, match="1 repeated answers"):
        merged = writer._merge()
    assert [row["id"] for row in merged if row["budget"] == 1.0] == ["q0", "q1", "q2", "q3", "q4"]
    assert [json.loads(line)["id"] for line in (tmp_path / "budget-1.jsonl").read_text().splitlines()] == ["q0", "q1", "q2", "q3", "q4"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["budget-0.5.jsonl", "budget-1.jsonl"]  # rank files gone


def test_two_process_predict_merges_the_answers(tmp_path):
    # 9 questions on 2 processes (5 + 4: Lightning's predict sampler repeats none), launched as a user does
    command = [
        sys.executable, "-m", "adaptive_mllm.cli", "predict", "--config", str(REPO / "recipes" / "tiny.yaml"),
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.logger=false",
        "--trainer.default_root_dir=run", "--model.budget=0.5",
        "--data.init_args.num_train=8", "--data.init_args.num_val=2", "--data.init_args.num_test=9",
        "--data.init_args.eval_batch_size=2", "--data.init_args.num_workers=0",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-4000:]
    run = tmp_path / "run"
    assert sorted(path.name for path in run.glob("budget-*")) == ["budget-0.5.jsonl"]  # merged; no rank files left
    ids = [json.loads(line)["id"] for line in (run / "budget-0.5.jsonl").read_text().splitlines()]
    asked = [record["id"] for record in json.loads((tmp_path / "data" / "shapes-vqa" / "test.json").read_text())]
    assert ids == asked and len(asked) == 9  # every question once, in the dataset's order
    assert json.loads((run / DONE).read_text())["answers"] == {"0.5": 9} and not (run / INCOMPLETE).exists()
    assert "predict: 9 answers (9 at budget 0.5)" in done.stdout + done.stderr  # the total, not process 0's share
