"""Budget-curve and heatmap figures, and `adaptive-mllm plot` combining runs."""

from __future__ import annotations

import csv

import pytest
import torch

from adaptive_mllm.cli import main
from adaptive_mllm.plots import plot_budget_curves, plot_group_usage, plot_layer_usage, read_results_csv


def _write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=sorted(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


ROWS = [
    {"budget": 1.0, "overall": 0.85, "colour": 0.9, "flops_fraction": 1.0},
    {"budget": 0.6, "overall": 0.80, "colour": 0.7, "flops_fraction": 0.55},
]


def test_curves_plot_each_run_against_budget_and_flops(tmp_path):
    runs = {"L": ROWS, "static": [dict(row, overall=row["overall"] - 0.1) for row in ROWS]}
    figure = plot_budget_curves(runs, "overall")
    by_budget, by_flops = figure.axes[:2]
    lines = {line.get_label(): line for line in by_budget.get_lines()}
    assert list(lines["L"].get_xdata()) == [0.6, 1.0]  # sorted by budget
    assert list(lines["L"].get_ydata()) == pytest.approx([80.0, 85.0])
    assert list(lines["static"].get_ydata()) == pytest.approx([70.0, 75.0])
    assert list(by_flops.get_lines()[0].get_xdata()) == [0.55, 1.0]


def test_heatmaps_hold_the_usage_fractions():
    usage = {1.0: {"a": torch.ones(4)}, 0.6: {"a": torch.tensor([1.0, 1.0, 0.25, 0.0]), "b": torch.tensor([1.0, 1.0, 0.0, 0.5])}}
    figure = plot_layer_usage(usage, num_prefix_layers=2)
    data = figure.axes[0].images[0].get_array()
    assert data.shape == (3, 4)
    assert data[1].tolist() == [1.0, 1.0, 0.25, 0.0]  # budgets in decreasing order, kinds in order
    groups = plot_group_usage({1.0: torch.ones(4, 2), 0.6: torch.full((4, 2), 0.5)})
    assert [axis.get_title() for axis in groups.axes[:2]] == ["budget 1", "budget 0.6"]


def test_plot_command_combines_result_files(tmp_path):
    first = _write_csv(tmp_path / "a.csv", ROWS)
    second = _write_csv(tmp_path / "b.csv", ROWS)
    out = tmp_path / "curves.png"
    main(["plot", str(first), str(second), "--labels", "L", "Static", "--metric", "colour", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_results_csv(first)[1]["overall"] == pytest.approx(0.80)


def test_plot_command_errors_name_the_problem(tmp_path, capsys):
    path = _write_csv(tmp_path / "a.csv", ROWS)
    with pytest.raises(SystemExit):
        main(["plot", str(path), "--metric", "shape"])
    assert "no column 'shape'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plot", str(path), "--labels", "x", "y"])
    assert "2 labels for 1 result files" in capsys.readouterr().err
    (tmp_path / "seed0" / "Static").mkdir(parents=True)
    (tmp_path / "seed1" / "Static").mkdir(parents=True)
    first = _write_csv(tmp_path / "seed0" / "Static" / "a.csv", ROWS)  # two runs whose directories share a name:
    second = _write_csv(tmp_path / "seed1" / "Static" / "a.csv", ROWS)  # one curve replaced the other
    with pytest.raises(SystemExit):
        main(["plot", str(first), str(second), "--out", str(tmp_path / "two.png")])
    assert "labelled" in capsys.readouterr().err and not (tmp_path / "two.png").exists()
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        read_results_csv(tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_text("name,score\nx,1\n")
    with pytest.raises(ValueError, match="'budget' column"):
        read_results_csv(tmp_path / "bad.csv")


def test_score_axis_spans_baseline_to_100_so_a_small_wiggle_stays_small():
    wiggle = [dict(ROWS[0], overall=0.983), dict(ROWS[1], overall=0.982)]
    figure = plot_budget_curves({"L": wiggle}, "overall", baseline=0.302)
    for axes in figure.axes[:2]:
        bottom, top = axes.get_ylim()
        assert bottom == pytest.approx(30.2 - 2) and top == pytest.approx(102)  # the 0.1-point gap is 0.1% of the axis
        dashed = [line for line in axes.get_lines() if line.get_label() == "majority baseline"]
        assert dashed and list(dashed[0].get_ydata()) == pytest.approx([30.2, 30.2])
    bottom, top = plot_budget_curves({"L": wiggle}, "overall").axes[0].get_ylim()
    assert (bottom, top) == pytest.approx((-2, 102))  # no baseline: from 0


def test_plot_never_replaces_a_file_unasked(tmp_path, monkeypatch, capsys):
    # the default name was budget_curves.png, the figure every test run writes: plotting in a run replaced it
    run = tmp_path / "run"
    run.mkdir()
    results = _write_csv(run / "test_results.csv", ROWS)
    (run / "budget_curves.png").write_bytes(b"the run's own figure")
    monkeypatch.chdir(run)
    main(["plot", str(results)])
    assert (run / "comparison_curves.png").is_file() and (run / "budget_curves.png").read_bytes() == b"the run's own figure"
    with pytest.raises(SystemExit):
        main(["plot", str(results)])  # again: the earlier comparison is not replaced unasked
    assert "comparison_curves.png exists; choose another path, or pass --overwrite" in capsys.readouterr().err
    main(["plot", str(results), "--overwrite"])


def test_a_results_file_that_is_not_utf8_text_is_named(tmp_path, capsys):
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"budget,overall\n1.0,0.5\n\xde\xad\xbe\xef,\xff\n")
    with pytest.raises(ValueError, match=r"bin.csv: not utf-8 text \(invalid start byte at byte 25, line 3\)"):
        read_results_csv(binary)
    with pytest.raises(ValueError, match=r"bin.csv: not utf-8 text"):  # through the command: the file is named
        main(["plot", str(_write_csv(tmp_path / "a.csv", ROWS)), str(binary), "--labels", "a", "b", "--out", str(tmp_path / "o.png")])


def test_a_row_with_a_missing_cell_names_file_row_and_column(tmp_path, capsys):
    short = tmp_path / "short.csv"
    short.write_text("budget,overall\n1.0,0.5\n0.5\n")
    with pytest.raises(ValueError, match=r"short.csv: row 2: column 'overall': no cell"):
        read_results_csv(short)
    long = tmp_path / "long.csv"
    long.write_text("budget,overall\n1.0,0.5,0.7\n")
    with pytest.raises(ValueError, match=r"long.csv: row 1: 3 cells for the header's 2 columns"):
        read_results_csv(long)
    gaps = tmp_path / "gaps.csv"  # an empty cell is a score the run has not: left out, as before
    gaps.write_text("budget,overall,colour\n1.0,0.5,\n0.5,0.4,0.3\n")
    assert read_results_csv(gaps) == [{"budget": 1.0, "overall": 0.5}, {"budget": 0.5, "overall": 0.4, "colour": 0.3}]
    no_budget = tmp_path / "no_budget.csv"
    no_budget.write_text("budget,overall\n,0.5\n")
    with pytest.raises(ValueError, match=r"no_budget.csv: row 1: column 'budget' is empty"):
        read_results_csv(no_budget)


def test_a_budget_twice_in_one_file_is_refused(tmp_path):
    twice = tmp_path / "dup.csv"
    twice.write_text("budget,overall\n1.0,0.5\n0.6,0.4\n1,0.7\n")
    with pytest.raises(ValueError, match=r"dup.csv: row 3: budget 1 appears twice \(first in row 1\)"):
        read_results_csv(twice)


def test_a_run_directory_stands_for_its_results_file(tmp_path, capsys):
    run = tmp_path / "static"
    run.mkdir()
    _write_csv(run / "test_results.csv", ROWS)
    assert read_results_csv(run) == read_results_csv(run / "test_results.csv")
    out = tmp_path / "curves.png"
    main(["plot", str(run), str(_write_csv(tmp_path / "b.csv", ROWS)), "--labels", "Static", "L", "--out", str(out)])
    assert out.is_file()
    other = tmp_path / "seed1" / "learned"
    other.mkdir(parents=True)
    _write_csv(other / "test_results.csv", ROWS)
    main(["plot", str(run), str(other), "--out", str(tmp_path / "default.png")])  # labelled by the directories' names
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: a directory without test_results.csv \(expected a test run's log dir"):
        read_results_csv(empty)


def test_an_out_matplotlib_cannot_write_names_out_and_the_formats(tmp_path, capsys):
    results = _write_csv(tmp_path / "a.csv", ROWS)
    with pytest.raises(SystemExit) as exit_:
        main(["plot", str(results), "--out", str(tmp_path / "x.xyz")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--out" in err and "x.xyz: matplotlib cannot write .xyz figures; supported: " in err and "png" in err and "pdf" in err
    assert not (tmp_path / "x.xyz").exists()
    main(["plot", str(results), "--out", str(tmp_path / "x.PDF")])  # matplotlib takes the extension in any case
    assert (tmp_path / "x.PDF").read_bytes()[:4] == b"%PDF"


def test_plot_overwrite_replaces_a_link_at_out_never_the_file_it_points_to(tmp_path):
    results = _write_csv(tmp_path / "test_results.csv", ROWS)
    figure = tmp_path / "other-run" / "budget_curves.png"
    figure.parent.mkdir()
    figure.write_bytes(b"another run's figure")
    link = tmp_path / "comparison.png"
    link.symlink_to(figure)
    main(["plot", str(results), "--out", str(link), "--overwrite"])
    assert figure.read_bytes() == b"another run's figure"  # it was written through the link
    assert not link.is_symlink() and link.read_bytes().startswith(b"\x89PNG")
    pdf = tmp_path / "curves.pdf"
    main(["plot", str(results), "--out", str(pdf)])
    assert pdf.read_bytes().startswith(b"%PDF")  # the suffix still names the format
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comparison.png", "curves.pdf", "other-run", "test_results.csv"]
