"""What every benchmark loader shares: an image path built from a benchmark file must stay inside the
image folder (``..``, an absolute path and a symlink to elsewhere are refused, with an error naming the
file, the record and the field), by the LLaVA JSON loader's own rule (``llava_json.image_inside``)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from adaptive_mllm.data import DataError
from adaptive_mllm.data.benchmarks import (
    GQADataModule,
    MMEDataModule,
    POPEDataModule,
    ScienceQADataModule,
    TextVQADataModule,
    VQAv2DataModule,
)
from tests.data.benchmarks.conftest import (
    save_image,
    write_gqa,
    write_json,
    write_mme,
    write_pope,
    write_scienceqa,
    write_textvqa,
    write_vqav2,
)


def _edit_json(path: Path, edit: Callable[[object], object]) -> Path:
    content = json.loads(path.read_text())
    edit(content)
    write_json(path, content)
    return path


def _set_pope(files: dict[str, Path], name: str) -> Path:
    path = files["questions"] / "coco_pope_random.json"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[0]["image"] = name
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


@dataclass(frozen=True)
class Loader:
    """A loader that takes an image name from its question file: how to build it and point its first
    record's image at ``name`` (the loader appends ``suffix``), and where the error must point."""

    name: str
    write: Callable[[Path], dict[str, Path]]
    make: Callable[[dict[str, Path]], object]
    set_image: Callable[[dict[str, Path], str], Path]  # returns the edited question file
    folder: Callable[[dict[str, Path]], Path]  # the name is relative to this folder
    suffix: str  # what the loader appends to the name
    record_id: object
    field: str


LOADERS = [
    Loader(
        "pope",
        write_pope,
        lambda f: POPEDataModule(str(f["questions"]), str(f["images"]), splits=["random"]),
        _set_pope,
        lambda f: f["images"],
        "",
        1,
        "image",
    ),
    Loader(
        "gqa",
        write_gqa,
        lambda f: GQADataModule(str(f["questions"])),
        lambda f, name: _edit_json(f["questions"], lambda c: c["201307251"].update(imageId=name)),
        lambda f: f["images"],
        ".jpg",
        "201307251",
        "imageId",
    ),
    Loader(
        "textvqa",
        write_textvqa,
        lambda f: TextVQADataModule(str(f["questions"]), use_ocr=False),
        lambda f, name: _edit_json(f["questions"], lambda c: c["data"][0].update(image_id=name)),
        lambda f: f["images"],
        ".jpg",
        34602,
        "image_id",
    ),
    Loader(
        "scienceqa",
        write_scienceqa,
        lambda f: ScienceQADataModule(str(f["problems"])),
        lambda f, name: _edit_json(f["problems"], lambda c: c["5"].update(image=name)),
        lambda f: f["images"] / "5",  # images/test/<pid>/<image>
        "",
        "5",
        "image",
    ),
]


def _outside(tmp_path: Path, suffix: str) -> Path:
    """A readable image outside every benchmark folder."""
    return save_image(tmp_path / "outside" / f"out{suffix or '.png'}", 99)


def _escape(kind: str, tmp_path: Path, files: dict[str, Path], loader: Loader) -> str:
    """The name (without the loader's suffix) that reaches the outside image in the way ``kind`` says."""
    outside = _outside(tmp_path, loader.suffix)
    folder = loader.folder(files)
    if kind == "dotdot":
        name = os.path.relpath(outside, folder)
        assert name.startswith("..")
    elif kind == "absolute":
        name = str(outside)
    else:  # a symlink inside the folder to the outside file
        name = f"link{Path(outside).suffix}"
        (folder / name).symlink_to(outside)
    return name[: len(name) - len(loader.suffix)] if loader.suffix else name


def _assert_refused(error: DataError, path: Path, record_id: object, index: int, field: str) -> None:
    message = str(error)
    assert "\n" not in message
    assert error.json_path == str(path) and message.startswith(f"{path}, ")
    assert (error.record_id, error.index, error.field) == (record_id, index, field)
    assert f"record id {record_id!r} (index {index}), field {field!r}: " in message
    assert "outside the image folder" in message or "absolute path" in message


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
@pytest.mark.parametrize("loader", LOADERS, ids=[loader.name for loader in LOADERS])
def test_image_outside_the_folder_is_refused(tmp_path, loader, kind):
    files = loader.write(tmp_path / loader.name)
    path = loader.set_image(files, _escape(kind, tmp_path, files, loader))
    with pytest.raises(DataError) as error:
        loader.make(files).setup("test")
    _assert_refused(error.value, path, loader.record_id, 0, loader.field)


@pytest.mark.parametrize("loader", LOADERS, ids=[loader.name for loader in LOADERS])
def test_image_inside_the_folder_still_loads(tmp_path, loader, first_batch):
    files = loader.write(tmp_path / loader.name)
    folder = loader.folder(files)
    # a sub folder and a symlink that stays inside: both fine
    real = save_image(folder / "sub" / f"inside{loader.suffix or '.png'}", 7)
    (folder / f"alias{real.suffix}").symlink_to(real)
    for name in (f"sub/inside{real.suffix}", f"sub/../alias{real.suffix}"):
        loader.set_image(files, name[: len(name) - len(loader.suffix)] if loader.suffix else name)
        dm = loader.make(files)
        first_batch(dm)
        assert dm.datasets["test"].records[0].image == real.resolve()


def test_scienceqa_pid_outside_the_folder_is_refused(tmp_path):
    files = write_scienceqa(tmp_path / "scienceqa")
    save_image(tmp_path / "outside" / "image.png", 3)
    pid = os.path.relpath(tmp_path / "outside", files["images"])  # ../../../outside
    _edit_json(files["problems"], lambda c: c.update({pid: c.pop("5")}))
    _edit_json(files["splits"], lambda c: c.update(test=[pid, "9", "11"]))
    with pytest.raises(DataError) as error:
        ScienceQADataModule(str(files["problems"])).setup("test")
    _assert_refused(error.value, files["splits"], pid, 0, "test")


@pytest.mark.parametrize("subtype", ["../outside", "/abs/val2014", "..", "val2014/../../outside"])
def test_vqav2_data_subtype_must_be_a_plain_name(vqav2_files, subtype):
    path = _edit_json(vqav2_files["questions"], lambda c: c.update(data_subtype=subtype))
    with pytest.raises(DataError, match="field 'data_subtype': expected a plain folder name") as error:
        VQAv2DataModule(str(path), str(vqav2_files["annotations"])).setup("test")
    assert error.value.json_path == str(path) and "\n" not in str(error.value)


def test_vqav2_image_symlink_outside_is_refused(tmp_path, vqav2_files):
    outside = _outside(tmp_path, ".jpg")
    image = vqav2_files["images"] / "COCO_val2014_000000000042.jpg"
    image.unlink()
    image.symlink_to(outside)
    with pytest.raises(DataError) as error:
        VQAv2DataModule(str(vqav2_files["questions"]), str(vqav2_files["annotations"])).setup("test")
    _assert_refused(error.value, vqav2_files["questions"], 42000, 0, "image_id")


def test_vqav2_symlinked_image_folder_still_loads(tmp_path, first_batch):
    """The usual setup: the COCO folder next to the questions is a symlink to where COCO lives."""
    files = write_vqav2(tmp_path / "coco")
    questions = tmp_path / "vqav2" / files["questions"].name
    questions.parent.mkdir()
    questions.write_text(files["questions"].read_text())
    (questions.parent / "val2014").symlink_to(files["images"])
    first_batch(VQAv2DataModule(str(questions), str(files["annotations"])))


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "images-folder"])
def test_mme_image_symlink_outside_is_refused(tmp_path, flat):
    files = write_mme(tmp_path / "mme")
    outside = _outside(tmp_path, ".jpg")
    subtask, stem = ("existence", "000000006040") if flat else ("artwork", "10002")
    image = files["root"] / subtask / ("" if flat else "images") / f"{stem}.jpg"
    image.unlink()
    image.symlink_to(outside)
    with pytest.raises(DataError) as error:
        MMEDataModule(str(files["root"]), subtasks=[subtask]).setup("test")
    text = files["root"] / subtask / ("" if flat else "questions_answers_YN") / f"{stem}.txt"
    _assert_refused(error.value, text, f"{subtask}/{stem}", 0, "image")


# --- a question id used twice: answers, predictions and `adaptive-mllm compare` are keyed by id -----------
def _repeat_pope_id(files: dict[str, Path]) -> Path:
    path = files["questions"] / "coco_pope_random.json"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines[1]["question_id"] = lines[0]["question_id"]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def _repeat_gqa_key(files: dict[str, Path]) -> Path:
    path = files["questions"]
    # json keeps the last of two equal keys: the file is written by hand, as a repeated key would be
    first, second, _ = json.loads(path.read_text()).items()
    path.write_text("{" + ", ".join(f"{json.dumps(key)}: {json.dumps(raw)}" for key, raw in (first, second, (first[0], second[1]))) + "}")
    return path


@dataclass(frozen=True)
class Repeat:
    """A benchmark file edited so that its record ``index`` repeats an earlier record's id, and where the
    error must point."""

    name: str
    write: Callable[[Path], dict[str, Path]]
    make: Callable[[dict[str, Path]], object]
    repeat: Callable[[dict[str, Path]], Path]  # returns the edited file
    record_id: object
    index: int
    field: str | None
    first: int  # the index of the earlier record with that id


REPEATS = [
    Repeat("pope", write_pope, lambda f: POPEDataModule(str(f["questions"]), str(f["images"])), _repeat_pope_id, 1, 1, "question_id", 0),
    Repeat("gqa", write_gqa, lambda f: GQADataModule(str(f["questions"])), _repeat_gqa_key, "201307251", 2, None, 0),
    Repeat(
        "textvqa", write_textvqa, lambda f: TextVQADataModule(str(f["questions"]), use_ocr=False),
        lambda f: _edit_json(f["questions"], lambda c: c["data"][1].update(question_id=34602)), 34602, 1, "question_id", 0,
    ),
    Repeat(
        "scienceqa", write_scienceqa, lambda f: ScienceQADataModule(str(f["problems"])),
        lambda f: _edit_json(f["splits"], lambda c: c.update(test=["5", "9", "11", "9"])), "9", 3, "test", 1,
    ),
    Repeat(
        "vqav2", write_vqav2, lambda f: VQAv2DataModule(str(f["questions"])),  # predict: no annotations needed
        lambda f: _edit_json(f["questions"], lambda c: c["questions"][2].update(question_id=42000)), 42000, 2, "question_id", 0,
    ),
]  # fmt: skip


@pytest.mark.parametrize("repeat", REPEATS, ids=[repeat.name for repeat in REPEATS])
def test_a_question_id_used_twice_is_refused(tmp_path, repeat):
    files = repeat.write(tmp_path / repeat.name)
    path = repeat.repeat(files)
    with pytest.raises(DataError) as error:
        repeat.make(files).setup("predict")
    message = str(error.value)
    assert error.value.json_path == str(path) and message.startswith(f"{path}, ") and "\n" not in message
    assert (error.value.record_id, error.value.index, error.value.field) == (repeat.record_id, repeat.index, repeat.field)
    assert f"record id {repeat.record_id!r} (index {repeat.index})" in message
    assert f"duplicate id: record {repeat.first} has the same" in message


# --- bytes that are not UTF-8: the file and the line named, not a bare UnicodeDecodeError ----------------
def _spoil_line(path: Path, line: int) -> Path:
    """Writes the file (JSON re-written one value per line) with a 0xff byte, never UTF-8, opening ``line``."""
    if path.suffix == ".json" and "pope" not in path.name:
        path.write_text(json.dumps(json.loads(path.read_text()), indent=1))
    lines = path.read_bytes().split(b"\n")
    lines[line - 1] = b"\xff" + lines[line - 1]
    path.write_bytes(b"\n".join(lines))
    return path


@dataclass(frozen=True)
class Spoiled:
    """A benchmark file of which one line holds a byte that is not UTF-8."""

    name: str
    write: Callable[[Path], dict[str, Path]]
    make: Callable[[dict[str, Path]], object]
    file: Callable[[dict[str, Path]], Path]
    line: int


SPOILED = [
    Spoiled("pope", write_pope, lambda f: POPEDataModule(str(f["questions"]), str(f["images"])), lambda f: f["questions"] / "coco_pope_popular.json", 2),
    Spoiled("gqa", write_gqa, lambda f: GQADataModule(str(f["questions"])), lambda f: f["questions"], 3),
    Spoiled("textvqa", write_textvqa, lambda f: TextVQADataModule(str(f["questions"]), use_ocr=False), lambda f: f["questions"], 4),
    Spoiled("textvqa-ocr", write_textvqa, lambda f: TextVQADataModule(str(f["questions"]), ocr_json=str(f["ocr"])), lambda f: f["ocr"], 5),
    Spoiled("scienceqa", write_scienceqa, lambda f: ScienceQADataModule(str(f["problems"])), lambda f: f["problems"], 6),
    Spoiled("scienceqa-splits", write_scienceqa, lambda f: ScienceQADataModule(str(f["problems"])), lambda f: f["splits"], 2),
    Spoiled("vqav2", write_vqav2, lambda f: VQAv2DataModule(str(f["questions"]), str(f["annotations"])), lambda f: f["questions"], 7),
    Spoiled("vqav2-annotations", write_vqav2, lambda f: VQAv2DataModule(str(f["questions"]), str(f["annotations"])), lambda f: f["annotations"], 8),
    Spoiled(
        "mme", write_mme, lambda f: MMEDataModule(str(f["root"])),
        lambda f: f["root"] / "existence" / "000000018918.txt", 2,
    ),
]  # fmt: skip


@pytest.mark.parametrize("spoiled", SPOILED, ids=[spoiled.name for spoiled in SPOILED])
def test_a_byte_that_is_not_utf8_names_file_and_line(tmp_path, spoiled):
    files = spoiled.write(tmp_path / spoiled.name)
    path = _spoil_line(spoiled.file(files), spoiled.line)
    with pytest.raises(DataError) as error:
        spoiled.make(files).setup("test")
    message = str(error.value)
    assert error.value.json_path == str(path) and "\n" not in message
    assert message.startswith(f"{path}: line {spoiled.line} is not UTF-8 text (invalid start byte: byte 0xff"), message
