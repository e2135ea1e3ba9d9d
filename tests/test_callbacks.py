"""SweepReport's files: a new test in a directory that holds a report keeps the earlier one; a test's answers are
marked INCOMPLETE until its report is written, and a stopped test says why."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.utilities.exceptions import SIGTERMException

from adaptive_mllm.callbacks import SweepReport, keep_earlier_report
from adaptive_mllm.data import ShapesVQADataModule
from adaptive_mllm.data.shapes import generate_shapes_vqa
from adaptive_mllm.module import AdaptiveMLLM
from adaptive_mllm.prediction_writer import INCOMPLETE
from tests.conftest import make_backbone
from tests.test_reporting import fill_disk


def test_an_earlier_report_is_moved_not_overwritten(tmp_path):
    assert keep_earlier_report(tmp_path) is None  # nothing to keep: nothing made
    report = {"test_results.csv": "budget,overall\n1.0,0.9\n", "test_answers.jsonl": '{"id": 1}\n', "test_answers.rank1.jsonl": "{}\n",
              INCOMPLETE: "test stopped by SIGTERM\n"}  # a stopped test's note goes with its answers
    for name, text in report.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "metrics.csv").write_text("step\n")  # not the report's: stays
    kept = keep_earlier_report(tmp_path)
    assert kept is not None and kept.parent == tmp_path / "earlier-tests"
    assert {path.name: path.read_text() for path in kept.iterdir()} == report
    assert not any((tmp_path / name).exists() for name in report) and (tmp_path / "metrics.csv").is_file()
    (tmp_path / "test_results.csv").write_text("again\n")
    assert keep_earlier_report(tmp_path) != kept  # a second earlier report gets its own directory


class Stopping(AdaptiveMLLM):
    """Answers the test's batches; at batch ``stop_at`` ``stop`` runs first (a signal, an error), and every batch checks
    that INCOMPLETE lies beside the answers while they are written."""

    stop_at = -1
    stop = staticmethod(lambda: None)
    marked: list[bool] = []

    def test_step(self, batch, batch_idx):
        self.marked.append((Path(self.trainer.default_root_dir) / INCOMPLETE).is_file())
        if batch_idx == self.stop_at:
            type(self).stop()
        return super().test_step(batch, batch_idx)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """6 test questions, 3 batches of 2, and a tiny model that reads the set's tokenizer."""
    data_dir = tmp_path_factory.mktemp("shapes") / "shapes-vqa"
    generate_shapes_vqa(data_dir, num_train=4, num_val=0, num_test=6)
    return data_dir


def _test(shapes, root, stop_at=-1, stop=lambda: None):
    Stopping.stop_at, Stopping.stop, Stopping.marked = stop_at, staticmethod(stop), []
    model = Stopping(make_backbone(shapes / "tokenizer"), max_new_tokens=2, eval_budgets=[1.0])
    datamodule = ShapesVQADataModule(data_dir=str(shapes), num_train=4, num_val=0, num_test=6, batch_size=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, callbacks=[SweepReport()])  # fmt: skip
    try:
        trainer.test(model, datamodule=datamodule)
    finally:
        datamodule.teardown("test")
    return model


def _answered(root):
    return [json.loads(line)["id"] for line in (root / "test_answers.jsonl").read_text().splitlines()]


def test_a_test_marks_its_answers_incomplete_until_the_report_is_written(shapes, tmp_path):
    """Audit defect 6: a stopped test left a partial test_answers.jsonl with nothing saying so."""
    _test(shapes, tmp_path / "done")
    assert Stopping.marked == [True, True, True]  # there while the answers are written ...
    assert not (tmp_path / "done" / INCOMPLETE).exists() and (tmp_path / "done" / "test_results.csv").is_file()  # ... gone after
    assert len(_answered(tmp_path / "done")) == 6


def test_a_test_stopped_by_sigterm_or_an_error_says_so_beside_the_answers_it_kept(shapes, tmp_path):
    with pytest.warns(UserWarning, match=r"test stopped by SIGTERM: the answers in .*sigterm are incomplete \(see INCOMPLETE"):
        with pytest.raises(SIGTERMException):  # Lightning's test loop stops after the batch it is in
            _test(shapes, tmp_path / "sigterm", stop_at=0, stop=lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert len(_answered(tmp_path / "sigterm")) == 2 and not (tmp_path / "sigterm" / "test_results.csv").exists()
    assert (tmp_path / "sigterm" / INCOMPLETE).read_text() == (
        "test stopped by SIGTERM\nthe test_answers*.jsonl files here hold only part of the answers: those written before it "
        "stopped, kept\n"
    )

    def out_of_memory():
        raise RuntimeError("out of memory, say")

    with pytest.warns(UserWarning, match="test stopped by RuntimeError: out of memory, say"):
        with pytest.raises(RuntimeError, match="out of memory"):
            _test(shapes, tmp_path / "error", stop_at=2, stop=out_of_memory)
    assert len(_answered(tmp_path / "error")) == 4
    assert (tmp_path / "error" / INCOMPLETE).read_text().startswith("test stopped by RuntimeError: out of memory, say\n")

    # the next test there sets the stopped one aside whole, its note with its answers, and starts unmarked
    _test(shapes, tmp_path / "error")
    (earlier,) = (tmp_path / "error" / "earlier-tests").iterdir()
    assert sorted(path.name for path in earlier.iterdir()) == [INCOMPLETE, "test_answers.jsonl"]
    assert not (tmp_path / "error" / INCOMPLETE).exists() and len(_answered(tmp_path / "error")) == 6


def test_a_report_not_written_leaves_no_half_file_and_the_test_marked_incomplete(shapes, tmp_path, monkeypatch):
    """Audit 2026-12 problem 5: test_results.md and .csv were written in place, so a full disk (or a kill) left a cut
    CSV, which `table --from_runs` and `plot` read as a run with fewer budgets."""
    fill_disk(monkeypatch, "test_results.csv", room=10)
    with pytest.warns(UserWarning, match=r"test stopped by OSError: .*test_results\.csv: the disk is full.* are incomplete"):
        with pytest.raises(OSError, match=r"could not write .*test_results\.csv: the disk is full \(ENOSPC") as caught:
            _test(shapes, tmp_path)
    assert caught.value.errno == errno.ENOSPC
    assert not (tmp_path / "test_results.csv").exists() and not list(tmp_path.glob(".test_results.csv*"))  # no half file
    assert (tmp_path / "test_results.md").read_text().startswith("| score ")  # written whole before it
    assert (tmp_path / INCOMPLETE).read_text().startswith(f"test stopped by OSError: [Errno {errno.ENOSPC}] could not write")
    assert len(_answered(tmp_path)) == 6


def test_a_test_stopped_by_a_full_disk_says_so_though_closing_its_answers_fails_again(shapes, tmp_path, monkeypatch):
    """As predict's (audit 2026-12 problem 4): the answers file's last flush fails again when it is closed, and the
    note saying why the test stopped was never written."""
    fill_disk(monkeypatch, "test_answers.jsonl", room=300)
    with pytest.warns(UserWarning) as warned:
        with pytest.raises(OSError, match="No space left on device"):
            _test(shapes, tmp_path)
    warnings = "\n".join(str(warning.message) for warning in warned)
    assert "test: closing the answer files failed" in warnings and "test stopped by OSError" in warnings
    assert (tmp_path / INCOMPLETE).read_text().startswith(f"test stopped by OSError: [Errno {errno.ENOSPC}] No space left on device\n")
