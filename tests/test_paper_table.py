"""`adaptive-mllm table`: the paper's table (budget rows, benchmark columns, % of full) read from runs'
test_results.csv, and one checkpoint evaluated on several benchmarks through the recipe's `test`."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from adaptive_mllm.cli import main as cli_main
from adaptive_mllm.paper_table import column_of, main
from tests.data.benchmarks.conftest import write_mme, write_pope

RECIPE_DIR = Path(__file__).parents[1] / "recipes"
PAPER_ORDER = ["VQAv2", "GQA", "SQA-I", "TextVQA", "POPE", "MME", "MMB"]  # METHOD.md's table, GQA where LLaVA-1.5 has it


def _write_run(directory: Path, class_path: str | None, rows: list[dict[str, float]], **init_args: object) -> Path:
    """A finished `test` run as the module writes it: config.yaml (data section) and test_results.csv."""
    directory.mkdir(parents=True)
    if class_path is not None:
        (directory / "config.yaml").write_text(yaml.safe_dump({"data": {"class_path": class_path, "init_args": init_args}}))
    fields = sorted({key for row in rows for key in row})
    with open(directory / "test_results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return directory


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _markdown_rows(text: str, title: str) -> dict[str, dict[str, str]]:
    """The Markdown table under ``title``: first cell -> {header: cell}."""
    after = text.split(title, 1)[1]
    lines = [line for line in after.splitlines() if line.startswith("|") or not line][1:]  # from the table on
    lines = lines[lines.index(next(line for line in lines if line)) :]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


@pytest.fixture
def hand_runs(tmp_path: Path) -> list[Path]:
    pope = _write_run(
        tmp_path / "runs" / "pope",
        "adaptive_mllm.data.benchmarks.POPEDataModule",
        [
            # a token selector's run: its FLOPs against plain LLaVA below those against the same selection
            {"budget": 1.0, "overall": 0.80, "accuracy": 0.5, "flops_fraction": 1.0, "flops_vs_plain": 0.5},
            {"budget": 0.85, "overall": 0.76, "accuracy": 0.5, "flops_fraction": 0.84, "flops_vs_plain": 0.42},
            {"budget": 0.6, "overall": 0.60, "accuracy": 0.5, "flops_fraction": 0.58, "flops_vs_plain": 0.29},
        ],
    )
    mme = _write_run(  # MME's headline is perception points; no 0.6 row
        tmp_path / "runs" / "mme",
        "MMEDataModule",
        [
            {"budget": 1.0, "overall": 1500.0, "perception": 1500.0, "flops_fraction": 1.0},
            {"budget": 0.85, "overall": 1200.0, "perception": 1200.0, "flops_fraction": 0.86},
        ],
    )
    gqa = _write_run(
        tmp_path / "runs" / "gqa",
        "adaptive_mllm.data.benchmarks.GQADataModule",
        [{"budget": 1.0, "overall": 0.5, "flops_fraction": 1.0}, {"budget": 0.85, "overall": 0.55, "flops_fraction": 0.85}, {"budget": 0.6, "overall": 0.25, "flops_fraction": 0.61}],
    )
    shapes = _write_run(tmp_path / "runs" / "shapes", None, [{"budget": 1.0, "overall": 0.0}, {"budget": 0.6, "overall": 0.3}])
    return [pope, mme, gqa, shapes]


def test_from_runs_prints_paper_columns_scores_and_percent_of_full(hand_runs, tmp_path, capsys):
    out = tmp_path / "table"
    with pytest.warns(UserWarning, match=r"mme: test_results.csv has no flops_vs_plain column"):
        main(["--from_runs", *map(str, hand_runs), "--out", str(out)])
    rows = _read_csv(out / "paper_table.csv")
    columns = PAPER_ORDER + ["shapes"]  # the paper's columns in its order (GQA too, being run), then others
    assert list(rows[0]) == ["budget", "flops_fraction", *columns, *(f"{c} % of full" for c in columns)]
    by_budget = {float(row["budget"]): row for row in rows}
    assert list(by_budget) == [1.0, 0.85, 0.6]
    # scores: accuracy-like headlines x 100 (POPE mean F1 0.76 -> 76), MME perception points as they are
    assert float(by_budget[0.85]["POPE"]) == pytest.approx(76.0)
    assert float(by_budget[0.85]["MME"]) == pytest.approx(1200.0)
    assert float(by_budget[0.6]["GQA"]) == pytest.approx(25.0)
    # % of full by hand: 0.76 / 0.80 = 95%, 0.60 / 0.80 = 75%, 1200 / 1500 = 80%, 0.55 / 0.5 = 110%
    assert float(by_budget[0.85]["POPE % of full"]) == pytest.approx(95.0)
    assert float(by_budget[0.6]["POPE % of full"]) == pytest.approx(75.0)
    assert float(by_budget[0.85]["MME % of full"]) == pytest.approx(80.0)
    assert float(by_budget[0.85]["GQA % of full"]) == pytest.approx(110.0)
    assert float(by_budget[1.0]["POPE % of full"]) == pytest.approx(100.0)
    # FLOPs against plain LLaVA: the mean over the runs that report one at that budget, POPE's flops_vs_plain and
    # the older runs' flops_fraction: (0.42 + 0.86 + 0.85) / 3
    assert float(by_budget[0.85]["flops_fraction"]) == pytest.approx(0.71)
    # absent: benchmarks not run, MME at 0.6, shapes at 0.85, and % of a full score of 0
    for budget in (1.0, 0.85, 0.6):
        assert all(by_budget[budget][c] == "" for c in ("VQAv2", "SQA-I", "TextVQA", "MMB"))
    assert by_budget[0.6]["MME"] == "" and by_budget[0.85]["shapes"] == "" and by_budget[0.6]["shapes % of full"] == ""

    text = (out / "paper_table.md").read_text()
    assert text in capsys.readouterr().out
    scores = _markdown_rows(text, "Scores")
    assert list(scores) == ["100", "85", "60"]
    assert list(scores["85"]) == ["budget", "FLOPs %", *columns]
    assert scores["85"] == {"budget": "85", "FLOPs %": "71.0", "VQAv2": "-", "GQA": "55.0", "SQA-I": "-", "TextVQA": "-",
                            "POPE": "76.0", "MME": "1200.0", "MMB": "-", "shapes": "-"}  # fmt: skip
    assert scores["60"]["MME"] == "-" and scores["60"]["shapes"] == "30.0"
    kept = _markdown_rows(text, "% of full")
    assert kept["60"]["POPE"] == "75.0" and kept["85"]["MME"] == "80.0" and kept["60"]["shapes"] == "-"


def test_from_runs_name_overrides_the_column_and_sqa_over_all_problems_is_not_sqa_i(hand_runs, tmp_path):
    out = tmp_path / "table"
    every = _write_run(tmp_path / "runs" / "sqa", "ScienceQADataModule", [{"budget": 1.0, "overall": 0.7}], images_only=False)
    main(["--from_runs", f"MMB={hand_runs[3]}", str(every), "--out", str(out)])
    rows = _read_csv(out / "paper_table.csv")
    assert [row["MMB"] for row in rows] == ["0.0", "30.0"] and "shapes" not in rows[0]
    assert [row["SQA"] for row in rows] == ["70.0", ""] and [row["SQA-I"] for row in rows] == ["", ""]


def test_arguments_choose_one_mode(hand_runs, tmp_path):
    for argv in ([], ["--config", "x.yaml", "--from_runs", str(hand_runs[0])], ["--config", "x.yaml"], ["--from_runs", str(hand_runs[0]), "--ckpt_path", "c.ckpt"]):
        with pytest.raises(SystemExit):
            main(argv)


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--budgets", "0.3", "1.0", "0.3"], "each budget once"), (["--model.eval_budgets=[0.7]"], "not --model.eval_budgets")],
)
def test_budgets_are_refused_before_anything_runs(flags, message, capsys):
    """A budget twice, or a forwarded eval_budgets (which the test runs would score instead, leaving the table's
    rows empty), fail at once, not after every benchmark has been evaluated."""
    with pytest.raises(SystemExit):
        main(["--config", "x.yaml", "--benchmarks", "b.yaml", *flags])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", ["vqav2", "gqa", "scienceqa", "textvqa", "pope", "mme", "mmbench"])
def test_benchmark_yamls_parse_as_the_data_section_and_fill_their_column(name, capsys):
    path = RECIPE_DIR / "benchmarks" / f"{name}.yaml"
    with pytest.raises(SystemExit) as exit_:
        cli_main(["test", "--config", str(RECIPE_DIR / "tiny.yaml"), "--data", str(path), "--print_config"])
    assert exit_.value.code == 0
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    expected = {"vqav2": "VQAv2", "gqa": "GQA", "scienceqa": "SQA-I", "textvqa": "TextVQA", "pope": "POPE", "mme": "MME", "mmbench": "MMB"}
    assert column_of(data, "?") == expected[name]
    assert data["init_args"] == {**data["init_args"], **yaml.safe_load(path.read_text())["init_args"]}  # the file's paths reach the datamodule


def test_from_runs_errors_name_the_file_and_field(hand_runs, tmp_path):
    out = str(tmp_path / "table")
    with pytest.raises(ValueError, match=r"two runs for column 'POPE'.*runs/pope and .*runs/shapes"):
        main(["--from_runs", str(hand_runs[0]), f"POPE={hand_runs[3]}", "--out", out])
    broken = _write_run(tmp_path / "runs" / "broken", "VQAv2DataModule", [{"budget": 1.0, "accuracy": 0.5}])
    with pytest.raises(ValueError, match=r"broken/test_results.csv: row 1 \(budget 1\): field 'overall' missing"):
        main(["--from_runs", str(broken), "--out", out])
    with pytest.raises(FileNotFoundError, match=r"nowhere/test_results.csv"):
        main(["--from_runs", str(tmp_path / "nowhere"), "--out", out])
    table_file = tmp_path / "paper_table.md"  # what `--from_runs out/*` picks up beside the runs
    table_file.write_text("| |\n")
    with pytest.raises(ValueError, match=r"paper_table.md: a file, not a run directory"):
        main(["--from_runs", str(hand_runs[0]), str(table_file), "--out", out])


def test_a_table_never_replaces_an_earlier_one_unasked_nor_writes_through_a_symlink(hand_runs, tmp_path, monkeypatch, capsys):
    """Audit defect 4: a second `table --out DIR` replaced DIR's paper_table.md / .csv without a word, and wrote
    through a symlink there to a file outside DIR."""
    out = tmp_path / "table"
    main(["--from_runs", f"POPE={hand_runs[0]}", "--out", str(out)])
    first = {name: (out / name).read_bytes() for name in ("paper_table.md", "paper_table.csv")}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["--from_runs", f"own={hand_runs[3]}", "--out", str(out)])
    assert exit_.value.code == 2
    assert f"error: --out {out}: {out / 'paper_table.md'} exists; choose another --out, or pass --overwrite to replace " \
           "paper_table.md and paper_table.csv (nothing else in it is written over)" in capsys.readouterr().err  # fmt: skip
    assert {name: (out / name).read_bytes() for name in first} == first
    # evaluating into it is refused before any benchmark runs: no run's work is lost to the refusal
    calls = []
    monkeypatch.setattr("adaptive_mllm.paper_table.run_test", lambda args: calls.append(args) or 0)
    pope = _benchmark_yaml(tmp_path / "pope.yaml", "POPEDataModule", question_folder="p", image_folder="i")
    with pytest.raises(SystemExit):
        main(["--config", "r.yaml", "--benchmarks", str(pope), "--out", str(out)])
    assert calls == [] and sorted(path.name for path in out.iterdir()) == ["paper_table.csv", "paper_table.md"]
    # only the csv left there: refused too, naming it
    (out / "paper_table.md").unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--from_runs", f"own={hand_runs[3]}", "--out", str(out)])
    assert f"--out {out}: {out / 'paper_table.csv'} exists" in capsys.readouterr().err
    assert (out / "paper_table.csv").read_bytes() == first["paper_table.csv"]
    # --overwrite replaces both, whole
    main(["--from_runs", f"own={hand_runs[3]}", "--out", str(out), "--overwrite"])
    assert [row["own"] for row in _read_csv(out / "paper_table.csv")] == ["0.0", "30.0"]
    assert _markdown_rows((out / "paper_table.md").read_text(), "Scores")["60"]["own"] == "30.0"
    assert sorted(path.name for path in out.iterdir()) == ["paper_table.csv", "paper_table.md"]  # no temporary file left

    # a symlink in --out: refused like a file (a dangling one too); with --overwrite replaced, never written through
    victim = tmp_path / "victim.md"
    victim.write_text("my notes\n")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "paper_table.md").symlink_to(victim)
    with pytest.raises(SystemExit):
        main(["--from_runs", f"POPE={hand_runs[0]}", "--out", str(linked)])
    (linked / "paper_table.md").unlink()
    (linked / "paper_table.csv").symlink_to(tmp_path / "nowhere.csv")
    with pytest.raises(SystemExit):
        main(["--from_runs", f"POPE={hand_runs[0]}", "--out", str(linked)])
    (linked / "paper_table.md").symlink_to(victim)
    main(["--from_runs", f"POPE={hand_runs[0]}", "--out", str(linked), "--overwrite"])
    assert victim.read_text() == "my notes\n" and not (tmp_path / "nowhere.csv").exists()
    for name in first:
        assert not (linked / name).is_symlink() and (linked / name).read_bytes() == first[name]


def test_each_benchmark_is_one_test_run_with_the_exact_budgets_in_its_own_directory(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run_test(args: list[str]) -> int:  # stands in for the `test` process: writes what it would
        calls.append(args)
        flags = dict(arg.split("=", 1) for arg in args if arg.startswith("--") and "=" in arg)
        run_dir = Path(flags["--trainer.default_root_dir"])
        budgets = yaml.safe_load(flags["--model.eval_budgets"])
        _write_run(run_dir, None, [{"budget": b, "overall": b / 2} for b in budgets])
        return 0

    monkeypatch.setattr("adaptive_mllm.paper_table.run_test", fake_run_test)
    pope = _benchmark_yaml(tmp_path / "pope.yaml", "POPEDataModule", question_folder="p", image_folder="i")
    own = _benchmark_yaml(tmp_path / "own.yaml", "POPEDataModule", question_folder="q", image_folder="i")
    out = tmp_path / "table"
    main(["--config", "r.yaml", "--ckpt_path", "c.ckpt", "--benchmarks", str(pope), f"adv={own}", "--budgets", "1.0", "0.123456789",
          "--out", str(out), "--trainer.devices=1"])  # fmt: skip
    assert calls[0] == ["test", "--config", "r.yaml", "--data", str(pope), "--model.eval_budgets=[1.0,0.123456789]", "--trainer.logger=false",
                        f"--trainer.default_root_dir={out / 'POPE'}", "--trainer.devices=1", "--ckpt_path", "c.ckpt"]  # fmt: skip
    assert f"--trainer.default_root_dir={out / 'adv'}" in calls[1]
    rows = _read_csv(out / "paper_table.csv")
    assert [float(row["budget"]) for row in rows] == [1.0, 0.123456789]
    # 0.123456789 / 2 in %, and its % of full: (0.123456789 / 2) / (1.0 / 2) = 12.3456789%
    assert float(rows[1]["POPE"]) == pytest.approx(100 * 0.123456789 / 2) and float(rows[1]["adv % of full"]) == pytest.approx(12.3456789)
    # a second table into the same --out and any name clash stop before running anything
    calls.clear()
    with pytest.raises(SystemExit) as exit_:  # the table there first
        main(["--config", "r.yaml", "--benchmarks", str(pope), "--out", str(out)])
    assert exit_.value.code == 2 and f"--out {out}: {out / 'paper_table.md'} exists" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="table/POPE: already holds a run"):  # --overwrite is for the table files only
        main(["--config", "r.yaml", "--benchmarks", str(pope), "--out", str(out), "--overwrite"])
    with pytest.raises(ValueError, match=r"pope.yaml and .*own.yaml both fill column 'POPE'"):
        main(["--config", "r.yaml", "--benchmarks", str(pope), str(own), "--out", str(tmp_path / "new")])
    assert calls == []


def test_a_failed_benchmark_run_stops_the_table_with_its_exit_code(tmp_path, monkeypatch, capsys):
    calls = []

    def failing_run_test(args: list[str]) -> int:  # the second benchmark's `test` refuses a flag, as argparse does
        calls.append(args)
        if len(calls) == 1:
            run_dir = Path(dict(arg.split("=", 1) for arg in args if arg.startswith("--") and "=" in arg)["--trainer.default_root_dir"])
            _write_run(run_dir, None, [{"budget": 1.0, "overall": 0.5}])
            return 0
        return 2

    monkeypatch.setattr("adaptive_mllm.paper_table.run_test", failing_run_test)
    first = _benchmark_yaml(tmp_path / "pope.yaml", "POPEDataModule", question_folder="p", image_folder="i")
    second = _benchmark_yaml(tmp_path / "mme.yaml", "MMEDataModule", root="m")
    out = tmp_path / "table"
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "r.yaml", "--benchmarks", str(first), str(second), "--budgets", "1.0", "--out", str(out)])
    assert exit_.value.code == 2 and len(calls) == 2
    message = capsys.readouterr().err
    assert "mme.yaml failed (exit code 2" in message and "--from_runs" in message
    assert (out / "POPE" / "test_results.csv").is_file() and not (out / "paper_table.csv").exists()


def test_a_benchmark_run_killed_by_a_signal_stops_the_table_as_the_shell_reports_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("adaptive_mllm.paper_table.run_test", lambda args: -9)  # subprocess: killed by SIGKILL
    pope = _benchmark_yaml(tmp_path / "pope.yaml", "POPEDataModule", question_folder="p", image_folder="i")
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "r.yaml", "--benchmarks", str(pope), "--budgets", "1.0", "--out", str(tmp_path / "table")])
    assert exit_.value.code == 137 and "was killed by signal 9" in capsys.readouterr().err


def _benchmark_yaml(path: Path, class_path: str, **init_args: object) -> Path:
    path.write_text(yaml.safe_dump({"class_path": class_path, "init_args": {**init_args, "batch_size": 8, "num_workers": 0}}))
    return path


def test_evaluates_a_checkpoint_on_two_benchmarks_at_the_paper_budgets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = str(RECIPE_DIR / "tiny.yaml")
    small = ["--data.init_args.num_train=16", "--data.init_args.num_val=8", "--data.init_args.num_test=8",
             "--data.init_args.batch_size=8", "--data.init_args.num_workers=0"]  # fmt: skip
    cli_main(["fit", "--config", recipe, *small, "--trainer.max_steps=2", "--trainer.logger=CSVLogger", "--trainer.logger.save_dir=runs/tiny",
              "--trainer.num_sanity_val_steps=0", "--trainer.limit_val_batches=0", "--test_after_fit=false"])  # fmt: skip
    ckpt = tmp_path / "runs" / "tiny" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    pope = write_pope(tmp_path / "pope")
    mme = write_mme(tmp_path / "mme")
    pope_yaml = _benchmark_yaml(tmp_path / "pope.yaml", "adaptive_mllm.data.benchmarks.POPEDataModule", question_folder=str(pope["questions"]), image_folder=str(pope["images"]))
    mme_yaml = _benchmark_yaml(tmp_path / "mme.yaml", "MMEDataModule", root=str(mme["root"]))
    out = tmp_path / "table"
    table = ["--config", recipe, "--ckpt_path", str(ckpt), "--benchmarks", str(mme_yaml), str(pope_yaml), "--out", str(out)]
    # an unknown flag goes to every test run; two DDP processes, as the real recipes' eight: each test run is a process
    # of its own, which the strategy relaunches (not the table)
    main([*table, "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu", "--trainer.devices=2",
          "--trainer.strategy=ddp"])

    runs = {}
    for column in ("POPE", "MME"):
        rows = _read_csv(out / column / "test_results.csv")  # each benchmark in its own directory
        assert [float(row["budget"]) for row in rows] == [1.0, 0.85, 0.6]  # the paper's budgets by default
        runs[column] = {float(row["budget"]): row for row in rows}
    config = yaml.safe_load((out / "POPE" / "config.yaml").read_text())
    assert config["data"]["class_path"].endswith("POPEDataModule") and config["trainer"]["enable_model_summary"] is False
    assert str(config["trainer"]["devices"]) == "2"
    answers = [json.loads(line) for path in (out / "POPE").glob("test_answers*.jsonl") for line in path.read_text().splitlines()]
    assert len(answers) == len({(answer["id"], answer["budget"]) for answer in answers}) == 3 * 6  # each question once
    table_rows = {float(row["budget"]): row for row in _read_csv(out / "paper_table.csv")}
    assert list(table_rows) == [1.0, 0.85, 0.6]
    for budget, row in table_rows.items():
        pope_f1, mme_points = float(runs["POPE"][budget]["overall"]), float(runs["MME"][budget]["overall"])
        assert float(row["POPE"]) == pytest.approx(100 * pope_f1)
        assert float(row["MME"]) == pytest.approx(mme_points)  # perception points, not x 100
        assert float(runs["MME"][budget]["overall"]) == pytest.approx(float(runs["MME"][budget]["perception"]))
        pope_full = float(runs["POPE"][1.0]["overall"])
        if pope_full == 0:
            assert row["POPE % of full"] == ""
        else:
            assert float(row["POPE % of full"]) == pytest.approx(100 * pope_f1 / pope_full)
        fractions = [float(runs[c][budget]["flops_fraction"]) for c in ("POPE", "MME")]
        assert float(row["flops_fraction"]) == pytest.approx(sum(fractions) / 2)
        assert all(row[c] == "" for c in ("VQAv2", "SQA-I", "TextVQA", "MMB"))
    assert float(table_rows[0.6]["flops_fraction"]) <= 0.6 + 1e-9

    # reading the same runs back gives the same table; evaluating into the same --out refuses before running
    again = tmp_path / "again"
    main(["--from_runs", str(out / "POPE"), str(out / "MME"), "--out", str(again)])
    assert (again / "paper_table.csv").read_text() == (out / "paper_table.csv").read_text()
    with pytest.raises(FileExistsError, match=r"table/MME: already holds a run"):
        main([*table, "--overwrite"])  # (without it, the table files there are refused first)


def test_an_older_run_without_a_token_selector_is_taken_without_a_warning(tmp_path):
    # before flops_vs_plain, flops_fraction was against the same selection: exact where the run had no selector
    import warnings

    from adaptive_mllm.paper_table import read_run, table_rows

    run = _write_run(tmp_path / "gqa", "GQADataModule", [{"budget": 1.0, "overall": 0.5, "flops_fraction": 1.0},
                                                         {"budget": 0.6, "overall": 0.4, "flops_fraction": 0.58}])  # fmt: skip
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "model": {"token_selector": None}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, rows = table_rows([read_run(str(run))])
    assert rows[1]["flops_fraction"] == pytest.approx(0.58)
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "model": {"token_selector": {"class_path": "PruMergePlus"}}}))
    with pytest.warns(UserWarning, match="no flops_vs_plain column"):
        table_rows([read_run(str(run))])


@pytest.mark.filterwarnings("ignore:.*no flops_vs_plain column")
def test_from_runs_refuses_a_name_that_is_another_benchmarks_column(hand_runs, tmp_path):
    # POPE=<a GQA run> printed GQA's accuracy as POPE's F1
    out = str(tmp_path / "table")
    gqa = hand_runs[2]
    with pytest.raises(ValueError, match=rf"--from_runs POPE={gqa}: that run \(.*gqa/config.yaml\) tested GQADataModule, which fills column 'GQA', not 'POPE'"):
        main(["--from_runs", f"GQA={gqa}", f"POPE={gqa}", "--out", out])
    every = _write_run(tmp_path / "runs" / "sqa", "ScienceQADataModule", [{"budget": 1.0, "overall": 0.7}], images_only=False)
    with pytest.raises(ValueError, match=r"tested ScienceQADataModule, which fills column 'SQA', not 'SQA-I'"):
        main(["--from_runs", f"SQA-I={every}", "--out", out])  # every problem is not the paper's IMG subset
    # allowed: the run's own column, a name of one's own, and any name for data that fills no column
    main(["--from_runs", f"GQA={gqa}", f"POPE-adv={hand_runs[0]}", f"POPE={hand_runs[3]}", "--out", out])
    own = _write_run(tmp_path / "runs" / "own", "adaptive_mllm.data.LlavaDataModule", [{"budget": 1.0, "overall": 0.4}])
    main(["--from_runs", f"MMB={own}", "--out", str(tmp_path / "table2")])
    rows = _read_csv(tmp_path / "table2" / "paper_table.csv")
    assert rows[0]["MMB"] == "40.0"


def test_benchmarks_name_that_is_another_benchmarks_column_is_refused_before_running(tmp_path, monkeypatch):
    monkeypatch.setattr("adaptive_mllm.paper_table.run_test", lambda args: pytest.fail("no benchmark may run"))
    gqa = _benchmark_yaml(tmp_path / "gqa.yaml", "GQADataModule", question_file="q.json", image_folder="i")
    with pytest.raises(ValueError, match=r"--benchmarks POPE=.*gqa.yaml: .*gqa.yaml tested GQADataModule, which fills column 'GQA', not 'POPE'"):
        main(["--config", "r.yaml", "--benchmarks", f"POPE={gqa}", "--out", str(tmp_path / "table")])


def test_an_out_that_cannot_be_written_is_named_before_any_benchmark_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("adaptive_mllm.paper_table.run_test", lambda args: pytest.fail("no benchmark may run"))
    pope = _benchmark_yaml(tmp_path / "pope.yaml", "POPEDataModule", question_folder="p", image_folder="i")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    for out, says in ((blocker / "table", r"--out .*a-file/table: .*a-file is not a directory"),
                      (blocker, r"--out .*a-file is a file; name a directory")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            main(["--config", "r.yaml", "--benchmarks", str(pope), "--out", str(out)])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert re.search(says, err), err
        assert "evaluated" not in err


def test_a_first_benchmark_that_fails_claims_no_evaluated_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("adaptive_mllm.paper_table.run_test", lambda args: 1)
    pope = _benchmark_yaml(tmp_path / "pope.yaml", "POPEDataModule", question_folder="p", image_folder="i")
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "r.yaml", "--benchmarks", str(pope), "--out", str(tmp_path / "table")])
    assert exit_.value.code == 1
    message = capsys.readouterr().err
    assert "pope.yaml failed (exit code 1" in message and "No benchmark was evaluated before it" in message
    assert "evaluated before it are in" not in message and "--from_runs" not in message


def test_from_runs_keeps_the_rows_of_the_budgets_given(hand_runs, tmp_path, capsys):
    """--budgets was checked, then ignored with --from_runs: every budget of the runs was shown."""
    out = tmp_path / "table"
    with pytest.warns(UserWarning, match="no flops_vs_plain column"):
        main(["--from_runs", *map(str, hand_runs), "--budgets", "0.6", "1.0", "--out", str(out)])
    assert [float(row["budget"]) for row in _read_csv(out / "paper_table.csv")] == [0.6, 1.0]
    with pytest.raises(SystemExit), pytest.warns(UserWarning):
        main(["--from_runs", *map(str, hand_runs), "--budgets", "1.0", "0.7", "--out", str(tmp_path / "other")])
    assert "--budgets [0.7]: no run has them; the runs have [1.0, 0.85, 0.6]" in capsys.readouterr().err
