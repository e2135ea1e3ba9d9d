"""predict's answers are written, per budget, into a directory of their own, never over earlier answers."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from adaptive_mllm.prediction_writer import COLUMNS, PredictionWriter


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


def test_answers_land_per_budget_in_a_new_directory(tmp_path):
    first = _predict(tmp_path, PredictionWriter())
    second = _predict(tmp_path, PredictionWriter())
    assert first != second and first.parent == second.parent == tmp_path / "predictions"
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
