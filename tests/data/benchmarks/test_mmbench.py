"""MMBench loader on its stand-in: base64 images, options, circular shifts."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch

from adaptive_mllm.data import DataError
from adaptive_mllm.data.benchmarks import (
    OPTION_LETTER,
    MMBenchDataModule,
    write_mmbench_submission,
    write_submission,
)
from adaptive_mllm.metrics import MultipleChoiceAccuracy
from tests.data.benchmarks.conftest import MMBENCH_COLUMNS


def test_circular_rotations(mmbench_files, first_batch, prompts_of):
    dm = MMBenchDataModule(str(mmbench_files["tsv"]), batch_size=8)
    batch = first_batch(dm)
    assert batch["ids"] == ["0-0", "0-1", "0-2", "1-0", "1-1", "1-2", "1-3"]
    # question 0: B of (circle, square, triangle); rotated once B is A, twice C
    assert batch["answers"] == ["B", "A", "C", "D", "C", "B", "A"]
    assert batch["question_group"] == ["0"] * 3 + ["1"] * 4
    assert batch["num_choices"] == [3] * 3 + [4] * 4
    assert batch["options"][1] == ["square", "triangle", "circle"]  # each rotation's option texts, for matching
    assert batch["question_kinds"] == ["object_localization"] * 3 + ["image_scene"] * 4
    assert prompts_of(dm)[1] == f"<image>\nWhich shape is in the top left?\nA. square\nB. triangle\nC. circle\n{OPTION_LETTER}"
    assert prompts_of(dm)[3] == f"<image>\nLook at the shapes.\nWhich scene is this?\nA. beach\nB. forest\nC. city\nD. grid\n{OPTION_LETTER}"
    # row 1's image field refers to row 0's image: the same pixels
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][3])


def test_circular_metric(mmbench_files, first_batch):
    dm = MMBenchDataModule(str(mmbench_files["tsv"]), batch_size=8)
    batch = first_batch(dm)
    metric = dm.make_metric()
    assert isinstance(metric, MultipleChoiceAccuracy) and metric.circular and metric.rule == "mmbench"
    # MMBench's can_infer: "square" is option B's text in rotation 0; "The answer is C" holds one letter;
    # "grid" is D in rotation 0 of question 1; question 1 wrong in its last rotation: "a city or a beach"
    # names two option texts (unparsable)
    metric.update(["square", "A.", "The answer is C", "grid", "(C) city", "B", "a city or a beach"], batch)
    scores = metric.compute()
    assert scores["overall"].item() == 0.5
    assert scores["object_localization"].item() == 1.0 and scores["image_scene"].item() == 0.0
    assert scores["unparsable"].item() == 1
    # MMBench's vanilla accuracy: the question as first written (shift 0) only, what circular=False scores
    assert batch["circular_shift"] == [0, 1, 2, 0, 1, 2, 3]
    assert scores["vanilla"].item() == 1.0
    vanilla = MMBenchDataModule(str(mmbench_files["tsv"]), circular=False, batch_size=8)
    plain = vanilla.make_metric()
    plain.update(["square", "grid"], first_batch(vanilla))
    assert plain.compute()["overall"].item() == 1.0


def test_without_circular(mmbench_files, first_batch):
    dm = MMBenchDataModule(str(mmbench_files["tsv"]), circular=False, batch_size=8)
    batch = first_batch(dm)
    assert batch["ids"] == ["0", "1"] and batch["answers"] == ["B", "D"]
    assert not dm.make_metric().circular


def add_rotation(rows):
    copy = dict(rows[0], index="1000000", A="square", B="triangle", C="circle", answer="A")
    rows.append(copy)


def test_tsv_holding_the_rotations(mmbench_tsv, first_batch):
    dm = MMBenchDataModule(str(mmbench_tsv(add_rotation)), batch_size=8)
    batch = first_batch(dm)
    assert batch["ids"] == ["0", "1", "1000000"]  # not rotated again
    assert batch["question_group"] == ["0", "1", "0"]
    assert batch["circular_shift"] == [0, 0, 1]
    # vanilla evaluation: the original rows only, as MMBench scores them
    vanilla = MMBenchDataModule(str(mmbench_tsv(add_rotation)), circular=False, batch_size=8)
    assert first_batch(vanilla)["ids"] == ["0", "1"]


def test_missing_answer(mmbench_tsv, first_batch):
    path = mmbench_tsv(lambda rows: rows[1].update(answer=""))
    with pytest.raises(DataError, match=r"record id 1 \(index 1\), field 'answer'"):
        MMBenchDataModule(str(path)).setup("test")
    batch = first_batch(MMBenchDataModule(str(path), batch_size=8), "predict")  # a test split without answers
    assert batch["answers"][3:] == ["", "", "", ""]


def test_not_an_mmbench_tsv(mmbench_tsv):
    path = mmbench_tsv(columns=["index", "question", "answer"])
    with pytest.raises(DataError, match=r"not an MMBench TSV: columns \['hint', 'A', 'B', 'category', 'image'\] missing"):
        MMBenchDataModule(str(path)).setup("test")


@pytest.mark.parametrize(("column", "typo"), [("hint", "hnt"), ("category", "categroy")])
def test_a_tsv_without_the_hint_or_category_column_is_refused(mmbench_tsv, column, typo):
    # every MMBench release has both: without hint every prompt would lose its hint (LLaVA's model_vqa_mmbench.py
    # reads it), without category every question would land in one group
    columns = [typo if name == column else name for name in MMBENCH_COLUMNS]
    path = mmbench_tsv(lambda rows: [row.update({typo: row.pop(column)}) for row in rows], columns=columns)
    with pytest.raises(DataError) as error:
        MMBenchDataModule(str(path)).setup("test")
    assert str(error.value).startswith(f"{path}, field {column!r}: not an MMBench TSV: columns [{column!r}] missing")


def test_a_test_split_tsv_without_answer_column_still_reads(mmbench_tsv, first_batch):
    columns = [name for name in MMBENCH_COLUMNS if name != "answer"]  # MMBench's test split has no answers
    batch = first_batch(MMBenchDataModule(str(mmbench_tsv(columns=columns)), circular=False, batch_size=8), "predict")
    assert batch["ids"] == ["0", "1"] and batch["answers"] == ["", ""]


def test_a_tsv_with_a_header_only_has_no_questions(mmbench_tsv):
    path = mmbench_tsv(lambda rows: rows.clear())
    with pytest.raises(DataError, match="no questions to evaluate") as error:
        MMBenchDataModule(str(path)).setup("test")
    assert error.value.json_path == str(path)


def test_bad_base64_image(mmbench_tsv, first_batch):
    # the TSV's row (index 0, its first row) and column, not the rotation's record id ("0-0")
    path = mmbench_tsv(lambda rows: rows[0].update(image="not base64!"))
    with pytest.raises(DataError, match=r"mmbench.tsv, record id 0 \(index 0\), field 'image': cannot read image"):
        first_batch(MMBenchDataModule(str(path), batch_size=8))


def test_vanilla_submission_of_a_tsv_holding_the_rotations_warns(mmbench_tsv, tmp_path):
    path = str(mmbench_tsv(add_rotation))
    vanilla = MMBenchDataModule(path, circular=False)  # asks rows 0 and 1 only: the rotated copy stays blank
    expected = r"1 of 3 rows have no answer.*indices \[1000000\].*rotated copies.*circular=false asks its original rows only"
    with pytest.warns(UserWarning, match=expected):
        sheet = write_submission(vanilla, tmp_path / "vanilla", {"0": "B", "1": "D"})
    assert sheet.suffix == ".xlsx"
    with warnings.catch_warnings():  # every row answered (circular on such a TSV asks each row once): no warning
        warnings.simplefilter("error")
        full = write_submission(MMBenchDataModule(path), tmp_path / "full", {"0": "B", "1": "D", "1000000": "A"})
    assert full.is_file()


def test_tsv_submission_lists_blank_rows(mmbench_tsv, tmp_path):
    with pytest.warns(UserWarning, match=r"2 of 2 rows have no answer") as caught:
        sheet = write_mmbench_submission(tmp_path / "none.tsv", {}, str(mmbench_tsv()))
    assert "rotated" not in str(caught[0].message)
    with open(sheet, encoding="utf-8", newline="") as handle:
        assert [row[6] for row in csv.reader(handle, delimiter="\t")] == ["prediction", "", ""]


@pytest.mark.parametrize("absent", ["N/A", "NA", "NULL", "null", "nan", "NONE", ""])
def test_an_option_or_hint_written_as_missing_is_absent_as_pandas_reads_it(mmbench_tsv, first_batch, prompts_of, absent):
    # LLaVA's model_vqa_mmbench.py: pd.read_table's missing-value strings, then is_none ("nan" / "none", any case)
    path = mmbench_tsv(lambda rows: rows[0].update(D=absent, hint=absent))
    dm = MMBenchDataModule(str(path), circular=False, batch_size=8)
    assert first_batch(dm)["num_choices"][0] == 3
    assert prompts_of(dm)[0] == f"<image>\nWhich shape is in the top left?\nA. circle\nB. square\nC. triangle\n{OPTION_LETTER}"


def test_an_option_that_only_looks_missing_stays(mmbench_tsv, first_batch):
    for kept in ("n.a.", " None ", "NA "):  # not one of pandas' strings (it compares the whole cell, unstripped)
        path = mmbench_tsv(lambda rows, kept=kept: rows[0].update(D=kept))
        assert first_batch(MMBenchDataModule(str(path), circular=False, batch_size=8))["num_choices"][0] == 4


@pytest.mark.parametrize("circular", [True, False], ids=["circular", "vanilla"])
def test_an_index_used_twice_is_refused(mmbench_tsv, circular):
    # a test's answers are keyed by id ("0", or "0-<shift>" per rotation): the second row's would replace the first's
    path = mmbench_tsv(lambda rows: rows[1].update(index="0"))
    with pytest.raises(DataError) as error:
        MMBenchDataModule(str(path), circular=circular).setup("test")
    assert str(error.value).startswith(f"{path}, record id 0 (index 1), field 'index': duplicate id: record 0 has the same index")
    assert (error.value.json_path, error.value.field) == (str(path), "index")


def test_rotations_are_not_ids_used_twice(mmbench_tsv, first_batch):
    # a TSV that holds the rotations (index + k * 1e6) of both rows, asked with circular on and off
    def rotations(rows):
        for row in list(rows):
            for shift in (1, 2):
                rows.append(dict(row, index=str(int(row["index"]) + shift * 1_000_000)))

    path = str(mmbench_tsv(rotations))
    assert first_batch(MMBenchDataModule(path, batch_size=8))["ids"] == ["0", "1", "1000000", "2000000", "1000001", "2000001"]
    assert first_batch(MMBenchDataModule(path, circular=False, batch_size=8))["ids"] == ["0", "1"]
    # ... but a rotation's index used twice is refused
    repeated = mmbench_tsv(lambda rows: (rotations(rows), rows[3].update(index="1000000")))
    with pytest.raises(DataError, match=r"record id 1000000 \(index 3\), field 'index': duplicate id: record 2 has the same index"):
        MMBenchDataModule(str(repeated)).setup("test")


def test_cells_keep_their_whitespace_as_llava_joins_them(mmbench_tsv, prompts_of, first_batch):
    # model_vqa_mmbench.py joins hint, question and options as pandas read them, stripping nothing
    path = mmbench_tsv(lambda rows: rows[0].update(hint=" N/A ", question="  Which shape?  ", C="triangle "))
    dm = MMBenchDataModule(str(path), circular=False, batch_size=8)
    first_batch(dm)
    expected = f"<image>\n N/A \n  Which shape?  \nA. circle\nB. square\nC. triangle \n{OPTION_LETTER}"
    assert prompts_of(dm)[0] == expected


@pytest.mark.parametrize("circular", [True, False], ids=["circular", "vanilla"])
def test_an_answer_past_a_missing_option_is_asked_and_scored_wrong(mmbench_tsv, first_batch, circular):
    # option C written "None" (missing to pandas) ends the options before the answer C: LLaVA asks A and B only, and
    # MMBench's scorer marks whatever the model picks wrong; the run goes on (test and predict alike)
    path = mmbench_tsv(lambda rows: rows[0].update(C="None", answer="C"))
    dm = MMBenchDataModule(str(path), circular=circular, batch_size=8)
    with pytest.warns(UserWarning, match=r"1 records' answer lies past their options.*index 0 \(C\)"):
        batch = first_batch(dm)
    rounds = 2 if circular else 1
    assert batch["num_choices"][:rounds] == [2] * rounds
    assert batch["answers"][:rounds] == ["C"] * rounds  # not rotated onto a real option
    metric = dm.make_metric()
    metric.update(["A", "B", "D", "C", "B", "A"][: len(batch["ids"])] if circular else ["C", "D"], batch)
    assert metric.compute()["overall"].item() == 0.5
    with pytest.raises(DataError, match=r"field 'answer': expected one of \['A', 'B'\], got 'CC'"):
        MMBenchDataModule(str(mmbench_tsv(lambda rows: rows[0].update(C="None", answer="CC")))).setup("test")
