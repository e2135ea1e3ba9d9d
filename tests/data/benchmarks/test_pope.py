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
