"""SweepReport's files: a new test in a directory that holds a report keeps the earlier one."""

from __future__ import annotations

from adaptive_mllm.callbacks import keep_earlier_report


def test_an_earlier_report_is_moved_not_overwritten(tmp_path):
    assert keep_earlier_report(tmp_path) is None  # nothing to keep: nothing made
    report = {"test_results.csv": "budget,overall\n1.0,0.9\n", "test_answers.jsonl": '{"id": 1}\n', "test_answers.rank1.jsonl": "{}\n"}
    for name, text in report.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "metrics.csv").write_text("step\n")  # not the report's: stays
    kept = keep_earlier_report(tmp_path)
    assert kept is not None and kept.parent == tmp_path / "earlier-tests"
    assert {path.name: path.read_text() for path in kept.iterdir()} == report
    assert not any((tmp_path / name).exists() for name in report) and (tmp_path / "metrics.csv").is_file()
    (tmp_path / "test_results.csv").write_text("again\n")
    assert keep_earlier_report(tmp_path) != kept  # a second earlier report gets its own directory
