"""POPE loader on its stand-in: the three JSON-lines splits."""

from __future__ import annotations

import json

import pytest

from adaptive_mllm.data import DataError
from adaptive_mllm.data.benchmarks import SHORT_ANSWER, POPEDataModule
from adaptive_mllm.metrics import POPEMetrics


def test_reads_every_split(pope_files, first_batch, prompts_of):
    dm = POPEDataModule(str(pope_files["questions"]), str(pope_files["images"]), batch_size=6)
    batch = first_batch(dm)
    assert batch["ids"] == ["adversarial-1", "adversarial-2", "popular-1", "popular-2", "random-1", "random-2"]
    assert batch["answers"] == ["yes", "no", "no", "yes", "yes", "no"]
    assert batch["question_kinds"] == ["adversarial"] * 2 + ["popular"] * 2 + ["random"] * 2
    assert prompts_of(dm)[0] == f"<image>\nIs there a circle in the image?\n{SHORT_ANSWER}"
    metric = dm.make_metric()
    assert isinstance(metric, POPEMetrics) and metric.groups == ["adversarial", "popular", "random"]
    # adversarial right twice (F1 1); popular: "no" for the yes (FN) -> F1 0; random: always yes (TP, FP) -> F1 2/3
    metric.update(["Yes, there is.", "No.", "No, there is not.", "There is no triangle.", "yes", "yes"], batch)
    scores = metric.compute()
    assert scores["adversarial/f1"].item() == 1.0 and scores["popular/f1"].item() == 0.0
    assert scores["random/f1"].item() == pytest.approx(2 / 3)
    assert scores["overall"].item() == pytest.approx((1 + 0 + 2 / 3) / 3)


def test_one_split(pope_files, first_batch):
    dm = POPEDataModule(str(pope_files["questions"]), str(pope_files["images"]), splits=["random"])
    assert first_batch(dm)["ids"] == ["random-1", "random-2"]
    assert dm.question_kinds("test") == ["random"]


def test_json_list_instead_of_lines(pope_files):
    path = pope_files["questions"] / "coco_pope_random.json"
    path.write_text(json.dumps([{"question_id": 1}], indent=1))
    with pytest.raises(DataError, match="one JSON object per line") as error:
        POPEDataModule(str(pope_files["questions"]), str(pope_files["images"]), splits=["random"]).setup("test")
    assert error.value.json_path == str(path)


def test_bad_label(pope_files):
    path = pope_files["questions"] / "coco_pope_popular.json"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"label": "yes"', '"label": "maybe"')
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"record id 2 \(index 1\), field 'label': expected 'yes' or 'no'"):
        POPEDataModule(str(pope_files["questions"]), str(pope_files["images"])).setup("test")


def test_missing_split_file(pope_files):
    with pytest.raises(DataError, match="coco_pope_other.json: file not found"):
        POPEDataModule(str(pope_files["questions"]), str(pope_files["images"]), splits=["other"]).setup("test")


@pytest.mark.parametrize(("content", "what"), [("", "0 bytes"), ("\n  \n\r\n", "only blank lines")], ids=["0-bytes", "blank-lines"])
def test_a_split_file_with_no_question_is_refused(pope_files, content, what):
    # its split would be left out of the mean F1 without a word
    path = pope_files["questions"] / "coco_pope_random.json"
    path.write_text(content)
    with pytest.raises(DataError) as error:
        POPEDataModule(str(pope_files["questions"]), str(pope_files["images"])).setup("test")
    assert str(error.value).startswith(f"{path}: no questions ({what})")
    assert error.value.json_path == str(path)


def test_a_file_pattern_without_split_is_refused(pope_files):
    # every split would read that one file: its questions counted once per split
    with pytest.raises(ValueError, match=r"file_pattern 'coco_pope_random.json' has no \{split\}: every split would read the same file"):
        POPEDataModule(str(pope_files["questions"]), str(pope_files["images"]), file_pattern="coco_pope_random.json")


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("coco_{name}.json", r"file_pattern 'coco_\{name\}.json': unknown placeholder \{name\}; the only one is \{split\}"),
        ("coco_{split}_{}.json", r"file_pattern 'coco_\{split\}_\{\}.json': unknown placeholder \{\}"),
        ("coco_{split}_{0}.json", r"file_pattern 'coco_\{split\}_\{0\}.json': unknown placeholder \{0\}"),
        ("coco_{split.json", r"file_pattern 'coco_\{split.json': .*expected a file name with \{split\}"),
    ],
)
def test_a_file_pattern_with_another_placeholder_is_refused(pope_files, pattern, expected):
    with pytest.raises(ValueError, match=expected):
        POPEDataModule(str(pope_files["questions"]), str(pope_files["images"]), file_pattern=pattern)


def test_a_file_pattern_with_split_still_reads(tmp_path, pope_files, first_batch):
    for path in pope_files["questions"].glob("coco_pope_*.json"):
        path.rename(path.with_name(path.name.replace("coco_pope_", "pope-")))
    dm = POPEDataModule(str(pope_files["questions"]), str(pope_files["images"]), file_pattern="pope-{split}.json", batch_size=6)
    assert first_batch(dm)["ids"][-2:] == ["random-1", "random-2"]
