"""Bad input every benchmark loader must name: a benchmark file with no question to evaluate, an item error
(a prompt longer than ``max_length``, an image that cannot be decoded) at the benchmark's own file, record
and field, and a group named like a column of the test report, refused when the file is read."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from adaptive_mllm.data import DataError
from adaptive_mllm.data.benchmarks import (
    GQADataModule,
    MMBenchDataModule,
    MMEDataModule,
    POPEDataModule,
    ScienceQADataModule,
    TextVQADataModule,
    VQAv2DataModule,
)
from adaptive_mllm.metrics import RESERVED_GROUPS
from tests.data.benchmarks.conftest import (
    mmbench_rows,
    write_gqa,
    write_json,
    write_mme,
    write_pope,
    write_scienceqa,
    write_textvqa,
    write_tsv,
    write_vqav2,
)

LONG = " ".join(["circle"] * 400)  # far past the bench processor's max_length of 256 tokens


def _edit_json(path: Path, edit: Callable[[dict], object]) -> Path:
    content = json.loads(path.read_text())
    edit(content)
    return write_json(path, content)


def _edit_pope_line(path: Path, line: int, **fields: object) -> Path:
    lines = [json.loads(text) for text in path.read_text().splitlines()]
    lines[line].update(fields)
    path.write_text("\n".join(json.dumps(raw) for raw in lines) + "\n")
    return path


def _write_mmbench(root: Path) -> dict[str, Path]:
    return {"tsv": write_tsv(root / "mmbench_dev_20230712.tsv", mmbench_rows())}


def _edit_mmbench(files: dict[str, Path], edit: Callable[[list[dict[str, str]]], object]) -> Path:
    rows = mmbench_rows()
    edit(rows)
    return write_tsv(files["tsv"], rows)


def _assert_names(error: DataError, path: Path, record_id: object, index: int | None, field: str | None) -> str:
    message = str(error)
    assert "\n" not in message
    assert error.json_path == str(path) and message.startswith(f"{path}"), message
    assert (error.record_id, error.index, error.field) == (record_id, index, field), message
    if index is not None:
        assert f"record id {record_id!r} (index {index})" in message
    if field is not None:
        assert f"field {field!r}: " in message
    return message


# --- item 2: a benchmark file that holds no question --------------------------------------------------------
@dataclass(frozen=True)
class Empty:
    name: str
    write: Callable[[Path], dict[str, Path]]
    empty: Callable[[dict[str, Path]], Path]  # empties the benchmark; returns the file the error must name
    make: Callable[[dict[str, Path]], object]
    field: str | None = None


def _empty_pope(files: dict[str, Path]) -> Path:
    for path in files["questions"].glob("coco_pope_*.json"):
        path.write_text("")
    return files["questions"] / "coco_pope_adversarial.json"  # the first split read


EMPTIES = [
    Empty("gqa", write_gqa, lambda f: write_json(f["questions"], {}), lambda f: GQADataModule(str(f["questions"]))),
    Empty(
        "vqav2", write_vqav2,
        lambda f: (_edit_json(f["annotations"], lambda c: c.update(annotations=[])), _edit_json(f["questions"], lambda c: c.update(questions=[])))[1],
        lambda f: VQAv2DataModule(str(f["questions"]), str(f["annotations"])),
    ),
    Empty(
        "textvqa", write_textvqa, lambda f: _edit_json(f["questions"], lambda c: c.update(data=[])),
        lambda f: TextVQADataModule(str(f["questions"]), use_ocr=False),
    ),
    Empty(
        "scienceqa", write_scienceqa, lambda f: _edit_json(f["splits"], lambda c: c.update(test=["11"])),  # 11: no image
        lambda f: ScienceQADataModule(str(f["problems"])), "test",
    ),
    Empty("pope", write_pope, _empty_pope, lambda f: POPEDataModule(str(f["questions"]), str(f["images"]))),
    Empty("mmbench", _write_mmbench, lambda f: _edit_mmbench(f, lambda rows: rows.clear()), lambda f: MMBenchDataModule(str(f["tsv"]))),
]  # fmt: skip


@pytest.mark.parametrize("empty", EMPTIES, ids=[empty.name for empty in EMPTIES])
@pytest.mark.parametrize("stage", ["test", "predict"])
def test_a_benchmark_with_no_question_is_refused(tmp_path, empty, stage):
    files = empty.write(tmp_path / empty.name)
    path = empty.empty(files)
    with pytest.raises(DataError) as error:
        empty.make(files).setup(stage)
    message = _assert_names(error.value, path, None, None, empty.field)
    assert "no questions" in message


# --- item 19: an item error names the benchmark's file, record and field -------------------------------------
@dataclass(frozen=True)
class Long:
    """A benchmark whose one question is made too long for ``max_length``, and where the error must point."""

    name: str
    write: Callable[[Path], dict[str, Path]]
    lengthen: Callable[[dict[str, Path]], Path]  # returns the edited file
    make: Callable[[dict[str, Path]], object]
    record_id: object
    index: int
    field: str


def _lengthen_mme(files: dict[str, Path]) -> Path:
    path = files["root"] / "existence" / "000000018918.txt"
    path.write_text(f"Is there a circle in this image? Please answer yes or no.\tYes\n{LONG}? Please answer yes or no.\tNo\n")
    return path


LONGS = [
    Long(
        "pope", write_pope, lambda f: _edit_pope_line(f["questions"] / "coco_pope_random.json", 1, text=LONG),
        lambda f: POPEDataModule(str(f["questions"]), str(f["images"])), 2, 1, "text",
    ),
    Long(
        "gqa", write_gqa, lambda f: _edit_json(f["questions"], lambda c: c["20968379"].update(question=LONG)),
        lambda f: GQADataModule(str(f["questions"])), "20968379", 2, "question",
    ),
    Long(
        "vqav2", write_vqav2, lambda f: _edit_json(f["questions"], lambda c: c["questions"][1].update(question=LONG)),
        lambda f: VQAv2DataModule(str(f["questions"]), str(f["annotations"])), 42001, 1, "question",
    ),
    Long(
        "textvqa", write_textvqa, lambda f: _edit_json(f["questions"], lambda c: c["data"][1].update(question=LONG)),
        lambda f: TextVQADataModule(str(f["questions"]), use_ocr=False), 34603, 1, "question",
    ),
    Long(  # the split lists 9 first: the record is problem 9's place in problems.json (1), not in the split (0)
        "scienceqa", write_scienceqa,
        lambda f: (_edit_json(f["splits"], lambda c: c.update(test=["9", "5", "11"])),
                   _edit_json(f["problems"], lambda c: c["9"].update(question=LONG)))[1],
        lambda f: ScienceQADataModule(str(f["problems"])), "9", 1, "question",
    ),
    Long("mme", write_mme, _lengthen_mme, lambda f: MMEDataModule(str(f["root"])), "existence/000000018918/1", 1, "question"),
    Long(
        "mmbench", _write_mmbench, lambda f: _edit_mmbench(f, lambda rows: rows[1].update(question=LONG)),
        lambda f: MMBenchDataModule(str(f["tsv"])), 1, 1, "question",
    ),
]  # fmt: skip


def _load_every_item(datamodule, processor) -> None:
    """Every test batch, as a test run loads them."""
    datamodule.set_input_processor(processor)
    datamodule.setup("test")
    for _ in datamodule.test_dataloader():
        pass


@pytest.mark.parametrize("long", LONGS, ids=[long.name for long in LONGS])
def test_a_prompt_too_long_names_the_benchmark_record(tmp_path, bench_processor, long):
    files = long.write(tmp_path / long.name)
    path = long.lengthen(files)
    with pytest.raises(DataError) as error:
        _load_every_item(long.make(files), bench_processor)
    message = _assert_names(error.value, path, long.record_id, long.index, long.field)
    assert "exceed max_length 256" in message and "conversations" not in message


def test_an_unreadable_image_names_the_benchmark_field(tmp_path, bench_processor):
    files = write_vqav2(tmp_path / "vqav2")
    (files["images"] / "COCO_val2014_000000000007.jpg").write_bytes(b"not an image")  # question 7000, record 2
    with pytest.raises(DataError) as error:
        _load_every_item(VQAv2DataModule(str(files["questions"]), str(files["annotations"])), bench_processor)
    message = _assert_names(error.value, files["questions"], 7000, 2, "image_id")
    assert "cannot read image file" in message


def test_an_item_error_survives_a_dataloader_worker(tmp_path, bench_processor):
    files = write_pope(tmp_path / "pope")
    path = _edit_pope_line(files["questions"] / "coco_pope_random.json", 1, text=LONG)
    dm = POPEDataModule(str(files["questions"]), str(files["images"]), batch_size=8, num_workers=1)
    dm.set_input_processor(bench_processor)
    dm.setup("test")
    with pytest.raises(DataError) as error:
        next(iter(dm.test_dataloader()))
    # the worker's DataError, re-raised in this process (with the worker's traceback, which the CLI drops)
    assert f"{path}, record id 2 (index 1), field 'text': " in str(error.value)


# --- item 20: a group named like a column of the test report --------------------------------------------------
@dataclass(frozen=True)
class Reserved:
    """A benchmark whose one question's group is ``name``, and where the error must point."""

    name: str
    write: Callable[[Path], dict[str, Path]]
    rename: Callable[[dict[str, Path], str], Path]  # returns the edited file
    make: Callable[[dict[str, Path]], object]
    record_id: object
    index: int
    field: str


RESERVED = [
    Reserved(
        "vqav2", write_vqav2, lambda f, group: _edit_json(f["annotations"], lambda c: c["annotations"][1].update(answer_type=group)),
        lambda f: VQAv2DataModule(str(f["questions"]), str(f["annotations"])), 42001, 1, "answer_type",
    ),
    Reserved(
        "gqa", write_gqa, lambda f, group: _edit_json(f["questions"], lambda c: c["201640614"]["types"].update(structural=group)),
        lambda f: GQADataModule(str(f["questions"])), "201640614", 1, "types.structural",
    ),
    Reserved(
        "scienceqa", write_scienceqa, lambda f, group: _edit_json(f["problems"], lambda c: c["9"].update(subject=group)),
        lambda f: ScienceQADataModule(str(f["problems"])), "9", 1, "subject",
    ),
    Reserved(
        "mmbench", _write_mmbench, lambda f, group: _edit_mmbench(f, lambda rows: rows[1].update(category=group)),
        lambda f: MMBenchDataModule(str(f["tsv"])), 1, 1, "category",
    ),
]  # fmt: skip


@pytest.mark.parametrize("group", ["overall", "budget", "questions"])
@pytest.mark.parametrize("reserved", RESERVED, ids=[reserved.name for reserved in RESERVED])
def test_a_group_named_like_a_report_column_is_refused_at_load(tmp_path, reserved, group):
    assert group in RESERVED_GROUPS
    files = reserved.write(tmp_path / reserved.name)
    path = reserved.rename(files, group)
    with pytest.raises(DataError) as error:
        reserved.make(files).setup("test")
    message = _assert_names(error.value, path, reserved.record_id, reserved.index, reserved.field)
    assert f"{group!r} is a column of the test report" in message


def test_a_group_of_the_wrong_type_is_refused(gqa_files):
    path = _edit_json(gqa_files["questions"], lambda c: c["201640614"]["types"].update(structural=["query"]))
    with pytest.raises(DataError) as error:
        GQADataModule(str(path)).setup("test")
    assert "expected a string, got list" in _assert_names(error.value, path, "201640614", 1, "types.structural")


def test_a_pope_split_named_like_a_report_column_is_refused(pope_files):
    with pytest.raises(ValueError, match=r"splits \['overall'\] are columns of the test report"):
        POPEDataModule(str(pope_files["questions"]), str(pope_files["images"]), splits=["random", "overall"])
