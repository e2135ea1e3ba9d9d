"""predict's answers are written, per budget, into a directory of their own, never over earlier answers; marked
complete or not; merged from the processes of a DDP run."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from adaptive_mllm.prediction_writer import COLUMNS, DONE, INCOMPLETE, IncompleteMark, PredictionWriter
from tests.test_reporting import fill_disk

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


def test_a_full_disk_names_the_answer_file_and_predict_still_says_why_it_stopped(tmp_path, monkeypatch):
    """Audit 2026-12 problem 4: on a full disk predict stopped with a bare ``[Errno 28] No space left on device``, and
    its INCOMPLETE note was never updated: closing the answer files flushed, failed again, and ``on_exception`` raised
    before the note was written."""
    fill_disk(monkeypatch, "budget-0.6.jsonl", room=150)  # the first answer at budget 0.6 fits, the second is cut
    with pytest.warns(UserWarning) as warned:
        with pytest.raises(OSError, match=r"could not write .*budget-0\.6\.jsonl: the disk is full \(ENOSPC") as caught:
            _predict(tmp_path, PredictionWriter())
    assert caught.value.errno == errno.ENOSPC
    warnings = "\n".join(str(warning.message) for warning in warned)
    assert "predict: closing the answer files failed, their last line may be cut short" in warnings  # and on it goes:
    assert re.search(r"predict stopped by OSError: .*budget-0\.6\.jsonl: the disk is full.* are incomplete", warnings)
    note = (tmp_path / INCOMPLETE).read_text()
    assert note.startswith(f"predict stopped by OSError: [Errno {errno.ENOSPC}] could not write {tmp_path / 'budget-0.6.jsonl'}: the disk is full")
    assert "hold only part of the answers" in note and not (tmp_path / DONE).exists()
    assert [json.loads(line)["id"] for line in (tmp_path / "budget-1.jsonl").read_text().splitlines()] == ["q0", "q1"]  # kept


def test_a_note_that_cannot_be_written_leaves_the_mark_and_says_so(tmp_path, monkeypatch):
    """``on_exception`` must not raise (Lightning would skip its teardown and hide the error that stopped predict):
    where even the note cannot be written, the file stays and the warning says why."""
    mark = IncompleteMark(tmp_path, "predict", "the budget-*.jsonl files")
    mark.claim()
    fill_disk(monkeypatch, INCOMPLETE)
    with pytest.warns(UserWarning, match=r"predict stopped by SIGTERM: the answers in .* are incomplete \(see INCOMPLETE there\); "
                      r"the note in .*INCOMPLETE could not be updated \(No space left on device\)"):  # fmt: skip
        mark.stopped(SIGTERMException())
    assert (tmp_path / INCOMPLETE).is_file()


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


class _OtherProcess:
    """The strategy of process 1 of 2, as the stop rounds see it: ``reduce`` adds the other process's votes
    (signalled, has a batch left), one pair per round."""

    root_device = torch.device("cpu")

    def __init__(self, *votes: tuple[float, float]) -> None:
        self.votes = list(votes)
        self.barriers = 0

    def reduce(self, tensor, reduce_op):
        assert reduce_op == "sum"
        return tensor + torch.tensor(self.votes.pop(0))

    def barrier(self, name=None):
        self.barriers += 1


def _process_1(tmp_path, strategy):
    writer = PredictionWriter(str(tmp_path))
    writer.directory = tmp_path  # as setup leaves it
    loop = SimpleNamespace(batch_progress=SimpleNamespace(is_last_batch=False))
    trainer = SimpleNamespace(world_size=2, global_rank=1, is_global_zero=False, received_sigterm=False, strategy=strategy,
                              predict_loop=loop)  # fmt: skip
    return writer, trainer


def _answer(writer, trainer, batch_idx, last=False):
    trainer.predict_loop.batch_progress.is_last_batch = last
    rows = Answering().predict_step((torch.tensor([float(batch_idx)]),), batch_idx)
    writer.write_on_batch_end(trainer, None, rows, None, None, batch_idx, 0)


def test_a_process_not_signalled_stops_with_the_one_that_was(tmp_path):
    """Under torchrun or SLURM a SIGTERM may reach one process only. Before, the others went on answering, into
    collectives the signalled one never joined; now every process stops after the same batch."""
    strategy = _OtherProcess((0.0, 1.0), (1.0, 1.0))  # the other process is signalled during the second batch
    writer, trainer = _process_1(tmp_path, strategy)
    _answer(writer, trainer, 0)
    with pytest.raises(SIGTERMException):
        _answer(writer, trainer, 1)  # this process was not signalled
    assert not strategy.votes  # one round per batch
    assert [json.loads(line)["id"] for line in (tmp_path / "budget-1.rank1.jsonl").read_text().splitlines()] == ["q0", "q1"]


def test_under_several_processes_sigterm_is_noted_without_a_collective(tmp_path):
    """Lightning's handler broadcasts from process 0 inside the handler, a collective the processes not signalled
    never join: predict's handler only notes the signal, passing it on as Lightning's does (to the processes this one
    launched, and to the handler from before)."""
    kills, earlier = [], []
    writer, trainer = _process_1(tmp_path, _OtherProcess())
    trainer.strategy.launcher = SimpleNamespace(kill=kills.append)
    writer._earlier_handler = lambda signum, frame: earlier.append(signum)  # what setup found
    before = signal.getsignal(signal.SIGTERM)
    try:
        writer.on_predict_start(trainer, None)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # Python runs the handler between two bytecodes of this thread
    finally:
        signal.signal(signal.SIGTERM, before)  # what Lightning's teardown does
    assert writer._signalled and kills == [signal.SIGTERM] and earlier == [signal.SIGTERM]
    strategy = trainer.strategy
    strategy.votes = [(0.0, 1.0)]
    with pytest.raises(SIGTERMException):  # its vote stops both processes
        _answer(writer, trainer, 0)


def test_a_process_done_with_its_batches_joins_the_rounds_until_the_others_are(tmp_path):
    """Lightning's predict sampler gives the processes one batch more or fewer: one done first keeps taking part in
    the stop rounds, so every process makes the same collective calls, and stops when a later SIGTERM stops the rest."""
    strategy = _OtherProcess((0.0, 1.0), (0.0, 1.0), (1.0, 1.0))
    writer, trainer = _process_1(tmp_path, strategy)
    _answer(writer, trainer, 0, last=True)  # its only batch; the other process has two more
    with pytest.raises(SIGTERMException):  # it waits for them in rounds, and stops when the other is signalled
        writer.on_predict_epoch_end(trainer, None)
    assert not strategy.votes and strategy.barriers == 0  # never in on_predict_end's barrier, which the other skips


def test_rounds_end_when_no_process_has_a_batch_left(tmp_path):
    """A SIGTERM at the last batch of the last process comes when every answer is in: predict finishes."""
    strategy = _OtherProcess((0.0, 1.0), (1.0, 0.0))
    writer, trainer = _process_1(tmp_path, strategy)
    _answer(writer, trainer, 0, last=True)
    writer.on_predict_epoch_end(trainer, None)
    assert not strategy.votes and not writer._others_answering


RANK_SCRIPT = """
import os, signal, sys
import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from adaptive_mllm.prediction_writer import PredictionWriter
from tests.test_prediction_writer import Answering

signalled_rank, signalled_batch = (int(value) for value in sys.argv[2:4])

class Signalled(Answering):
    def predict_step(self, batch, batch_idx):
        if self.global_rank == signalled_rank and batch_idx == signalled_batch:
            os.kill(os.getpid(), signal.SIGTERM)  # this process only, as a scheduler may deliver it
        return super().predict_step(batch, batch_idx)

data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(9.0)), batch_size=1)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", callbacks=[PredictionWriter(sys.argv[1])], logger=False,
                    enable_progress_bar=False, enable_model_summary=False)
try:
    trainer.predict(Signalled(), data, return_predictions=False)
except SIGTERMException:
    sys.exit(143)
"""


@pytest.mark.parametrize("signalled, codes, answered", [
    ((1, 1), [143, 143], ["q0", "q1", "q2", "q3"]),  # process 1 signalled: both stop after their second batch
    ((0, 4), [0, 0], [f"q{i}" for i in range(9)]),  # at process 0's last batch (process 1 has none left): all answered
], ids=["one-signalled", "at-the-last-batch"])
def test_two_processes_launched_apart_stop_together_on_a_sigterm_to_one(signalled, codes, answered, tmp_path):
    """Two gloo processes started as torchrun or srun start them (each on its own, RANK / LOCAL_RANK set), 9
    questions: 5 batches on process 0, 4 on process 1 (which waits in the stop rounds for process 0's last; without a
    signal, test_two_process_predict_merges_the_answers). Before, both blocked: the signalled one in Lightning's
    SIGTERM handler (a broadcast from process 0, which the others never join), the others in predict's collectives."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "ranks.py").write_text(RANK_SCRIPT)
    out = tmp_path / "answers"
    processes = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "WORLD_SIZE": "2", "NODE_RANK": "0", "RANK": str(rank), "LOCAL_RANK": str(rank)}  # fmt: skip
        command = [sys.executable, str(tmp_path / "ranks.py"), str(out), *map(str, signalled)]
        processes.append(subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=90)[0])  # a process blocked in a collective never ends
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert [process.returncode for process in processes] == codes, "\n".join(output[-3000:] for output in outputs)
    rows = sorted(out.glob("budget-1*.jsonl"))
    ids = sorted(json.loads(line)["id"] for path in rows for line in path.read_text().splitlines())
    assert ids == answered  # each process's batches up to the same one
    if codes[0] == 143:
        assert (out / INCOMPLETE).read_text().startswith("predict stopped by SIGTERM\n") and not (out / DONE).exists()
    else:
        assert json.loads((out / DONE).read_text())["total"] == 18 and not (out / INCOMPLETE).exists()
