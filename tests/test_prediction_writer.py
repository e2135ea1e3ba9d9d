"""predict's answers are written, per budget, into a directory of their own, never over earlier answers; marked
complete or not; merged from the processes of a DDP run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

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


class TerminatedAtBatch1(Answering):
    """A scheduler's SIGTERM while the second batch is answered (to this very process: Lightning's handler sees it)."""

    def predict_step(self, batch, batch_idx):
        if batch_idx == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().predict_step(batch, batch_idx)

    sigterm_at = 1


def test_sigterm_stops_predict_after_the_batch_it_is_in_and_says_so(tmp_path):
    """Audit defect 5: Lightning's prediction loop never checks trainer.received_sigterm, so `kill <pid>` let predict
    answer every question and exit 0. Now it stops after the current batch, as fit and test do."""
    writer = PredictionWriter(str(tmp_path / "stopped"))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(5.0)), batch_size=2)  # 3 batches
    trainer = L.Trainer(callbacks=[writer], logger=False, enable_progress_bar=False, accelerator="cpu")
    with pytest.warns(UserWarning, match=r"predict stopped by SIGTERM: the answers in .*stopped are incomplete"):
        with pytest.raises(SIGTERMException):  # what the command line turns into exit code 143
            trainer.predict(TerminatedAtBatch1(), data, return_predictions=False)
    stopped = tmp_path / "stopped"
    for budget in ("1", "0.6"):  # the batch it was in is written whole, the third is not asked
        assert [json.loads(line)["id"] for line in (stopped / f"budget-{budget}.jsonl").read_text().splitlines()] == ["q0", "q1", "q2", "q3"]
    assert (stopped / INCOMPLETE).read_text() == (
        "predict stopped by SIGTERM\nthe budget-*.jsonl files here hold only part of the answers: those written before it stopped, kept\n"
    )
    assert not (stopped / DONE).exists()
    # a SIGTERM in the last batch comes when every answer is in: predict finishes (as Lightning's test does)
    last = TerminatedAtBatch1()
    last.sigterm_at = 2
    writer = PredictionWriter(str(tmp_path / "finished"))
    L.Trainer(callbacks=[writer], logger=False, enable_progress_bar=False, accelerator="cpu").predict(last, data, return_predictions=False)
    assert json.loads((tmp_path / "finished" / DONE).read_text())["total"] == 10 and not (tmp_path / "finished" / INCOMPLETE).exists()


def test_kill_stops_the_predict_command_with_exit_code_143(tmp_path):
    """`kill <pid>` on the command line: exit 143 (128 + SIGTERM) as fit and test, part of the answers kept, the
    reason in INCOMPLETE."""
    command = [
        sys.executable, "-m", "adaptive_mllm.cli", "predict", "--config", str(REPO / "recipes" / "tiny.yaml"),
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.logger=false", "--trainer.default_root_dir=run",
        "--model.budget=0.5", "--data.init_args.num_train=8", "--data.init_args.num_val=2", "--data.init_args.num_test=400",
        "--data.init_args.eval_batch_size=1", "--data.init_args.num_workers=0",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    answers = tmp_path / "run" / "budget-0.5.jsonl"
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 150
        while not (answers.is_file() and answers.read_text().count("\n") >= 2):  # it is answering
            assert process.poll() is None and time.monotonic() < deadline, "predict ended or never answered"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, output[-3000:]
    written = answers.read_text().splitlines()
    assert 2 <= len(written) < 400 and all(json.loads(line)["budget"] == 0.5 for line in written)  # whole lines, kept
    assert (tmp_path / "run" / INCOMPLETE).read_text().startswith("predict stopped by SIGTERM\n")
    assert not (tmp_path / "run" / DONE).exists() and "stopped by SIGTERM" in output
