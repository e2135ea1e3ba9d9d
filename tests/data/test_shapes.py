"""Shapes-VQA generation: deterministic, in the LLaVA format, and every answer true of the drawn image.

The answers are checked against a scene read back from the PNG pixels (independent of the generator's
code), and against the generator's own scene description."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaptive_mllm.backbones.templates import IGNORE_INDEX
from adaptive_mllm.data import LlavaCollator, LlavaJsonDataset, ShapesVQADataModule, generate_shapes_vqa
from adaptive_mllm.data.shapes import (
    BACKGROUND,
    CELL_SIZE,
    COLOURS,
    DEFAULT_QUESTION_KINDS,
    QUESTION_KINDS,
    generate_examples,
)

COUNT_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4}
NUMBER_WORDS = {0: "zero", **{n: word for word, n in COUNT_WORDS.items()}, 5: "five", 6: "six", 7: "seven", 8: "eight"}


def split_sizes(sizes: dict[str, int]) -> dict[str, int]:
    return {split: sizes[f"num_{split}"] for split in ("train", "val", "test")}


def all_files(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


# --- reading a scene back from pixels, answering from it (the test's own logic) -----------------------
def scene_from_image(path: Path) -> set[tuple[int, int, str, str]]:
    """{(row, col, colour, shape)} from the pixels: palette colour of the cell's non-background pixels,
    shape from how much of their bounding box they fill (square 1, circle ~0.78, triangle ~0.52)."""
    pixels = np.asarray(Image.open(path).convert("RGB"))  # [64, 64, 3]
    assert pixels.shape == (64, 64, 3)
    palette = {rgb: name for name, rgb in COLOURS.items()}
    scene = set()
    for row in range(4):
        for col in range(4):
            cell = pixels[row * CELL_SIZE : (row + 1) * CELL_SIZE, col * CELL_SIZE : (col + 1) * CELL_SIZE]
            drawn = (cell != np.array(BACKGROUND)).any(-1)  # [16, 16]
            if not drawn.any():
                continue
            colours = {tuple(int(v) for v in rgb) for rgb in cell[drawn]}
            assert len(colours) == 1 and next(iter(colours)) in palette, f"{path}: cell {row, col} has colours {colours}"
            # nothing touches the cell border: each shape stays inside its own cell (and patch)
            assert not (drawn[0].any() or drawn[-1].any() or drawn[:, 0].any() or drawn[:, -1].any())
            ys, xs = np.nonzero(drawn)
            fill = drawn.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
            shape = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
            scene.add((row, col, palette[next(iter(colours))], shape))
    return scene


def answer_from_scene(question: str, scene: set[tuple[int, int, str, str]]) -> str:
    """The answer, asserting that the question names exactly one object."""
    if question == "How many shapes are there?":
        return NUMBER_WORDS[len(scene)]
    if match := re.fullmatch(r"How many (circle|square|triangle)s are there\?", question):
        return NUMBER_WORDS[sum(shape == match[1] for _, _, _, shape in scene)]
    if match := re.fullmatch(r"What colour is the (\w+)\?", question):
        found = [colour for _, _, colour, shape in scene if shape == match[1]]
        assert len(found) == 1, (question, scene)
        return found[0]
    if match := re.fullmatch(r"What shape is the (\w+) object\?", question):
        found = [shape for _, _, colour, shape in scene if colour == match[1]]
        assert len(found) == 1, (question, scene)
        return found[0]
    if match := re.fullmatch(r"Is the (\w+) (\w+) left of the (\w+) (\w+)\?", question):
        first = [col for _, col, colour, shape in scene if (colour, shape) == (match[1], match[2])]
        second = [col for _, col, colour, shape in scene if (colour, shape) == (match[3], match[4])]
        assert len(first) == 1 and len(second) == 1 and first[0] != second[0], (question, scene)
        return "yes" if first[0] < second[0] else "no"
    raise AssertionError(f"unexpected question {question!r}")


def kind_of(question: str) -> str:
    if question.startswith("How many"):
        return "count" if question == "How many shapes are there?" else "count_shape"
    if question.startswith("Is"):
        return "left_of"
    return "colour" if question.startswith("What colour") else "shape"


# --- tests ----------------------------------------------------------------------------------------
def test_same_seed_gives_identical_files_and_another_seed_does_not(shapes_sizes, shapes_dir, tmp_path):
    again = generate_shapes_vqa(tmp_path / "again", seed=0, **shapes_sizes)
    first, second = all_files(shapes_dir), all_files(again)
    assert first.keys() == second.keys()
    assert len([name for name in first if name.endswith(".png")]) == sum(split_sizes(shapes_sizes).values())
    for name in first:
        assert first[name] == second[name], name
    other = generate_shapes_vqa(tmp_path / "other", seed=1, **shapes_sizes)
    assert (other / "train.json").read_bytes() != (shapes_dir / "train.json").read_bytes()


def test_llava_format_exactly(shapes_sizes, shapes_dir):
    ids = set()
    for split, size in split_sizes(shapes_sizes).items():
        records = json.loads((shapes_dir / f"{split}.json").read_text())
        assert isinstance(records, list) and len(records) == size
        for record in records:
            assert set(record) == {"id", "image", "conversations", "question_kind"}
            human, gpt = record["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt" and set(human) == set(gpt) == {"from", "value"}
            assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
            assert record["image"].startswith(f"{split}/")
            with Image.open(shapes_dir / "images" / record["image"]) as image:
                assert image.size == (64, 64) and image.mode == "RGB"
            assert record["question_kind"] == kind_of(human["value"].split("\n", 1)[1])
            ids.add(record["id"])
    assert len(ids) == sum(split_sizes(shapes_sizes).values())  # unique across splits
    meta = json.loads((shapes_dir / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["num_train"] == shapes_sizes["num_train"] and "format_version" in meta


def test_answers_are_true_of_the_drawn_images(shapes_sizes, shapes_dir, tmp_path):
    every_kind = generate_shapes_vqa(tmp_path / "every-kind", seed=0, question_kinds=QUESTION_KINDS, **shapes_sizes)
    asked = Counter()
    for directory in (shapes_dir, every_kind):
        for split in split_sizes(shapes_sizes):
            for record in json.loads((directory / f"{split}.json").read_text()):
                question = record["conversations"][0]["value"].split("\n", 1)[1]
                scene = scene_from_image(directory / "images" / record["image"])
                assert 1 <= len(scene) <= 4
                assert answer_from_scene(question, scene) == record["conversations"][1]["value"], record["id"]
                asked[record["question_kind"]] += 1
    assert set(asked) == set(QUESTION_KINDS)


def test_the_default_kinds_are_the_tiny_recipes(shapes_dir):
    assert json.loads((shapes_dir / "meta.json").read_text())["question_kinds"] == list(DEFAULT_QUESTION_KINDS)
    assert set(DEFAULT_QUESTION_KINDS) < set(QUESTION_KINDS)


def test_files_follow_the_generators_scene_description(shapes_sizes, shapes_dir):
    for split, size in split_sizes(shapes_sizes).items():
        examples = generate_examples(size, seed=0, split=split)
        records = json.loads((shapes_dir / f"{split}.json").read_text())
        for example, record in zip(examples, records, strict=True):
            assert record["conversations"][0]["value"] == f"<image>\n{example.question}"
            assert record["conversations"][1]["value"] == example.answer
            described = {(s.row, s.col, s.colour, s.shape) for s in example.shapes}
            assert scene_from_image(shapes_dir / "images" / record["image"]) == described
            assert answer_from_scene(example.question, described) == example.answer
            for placed in example.shapes:  # each box lies inside its own cell
                x0, y0, x1, y1 = placed.box
                assert placed.col * CELL_SIZE < x0 <= x1 < (placed.col + 1) * CELL_SIZE - 1
                assert placed.row * CELL_SIZE < y0 <= y1 < (placed.row + 1) * CELL_SIZE - 1


def test_question_kinds_and_answers_are_balanced():
    examples = generate_examples(1000, seed=3, question_kinds=QUESTION_KINDS)
    kinds = Counter(example.kind for example in examples)
    assert kinds == {kind: 200 for kind in QUESTION_KINDS}
    answers = {kind: Counter(e.answer for e in examples if e.kind == kind) for kind in QUESTION_KINDS}
    assert answers["left_of"] == {"yes": 100, "no": 100}
    assert set(answers["count"]) == set(COUNT_WORDS) and min(answers["count"].values()) >= 30
    assert set(answers["colour"]) == set(COLOURS) and min(answers["colour"].values()) >= 15
    assert set(answers["shape"]) == {"circle", "square", "triangle"} and min(answers["shape"].values()) >= 40
    assert {"zero", "one", "two"} <= set(answers["count_shape"]) <= set(NUMBER_WORDS.values())
    # the kinds are shuffled, not in a fixed cycle
    assert [e.kind for e in examples[:8]] != list(QUESTION_KINDS) * 2


def test_every_generated_record_passes_the_loader(shapes_sizes, shapes_dir, processor):
    for split in split_sizes(shapes_sizes):
        dataset = LlavaJsonDataset(shapes_dir / f"{split}.json", shapes_dir / "images")
        dataset.set_input_processor(processor)
        records = json.loads((shapes_dir / f"{split}.json").read_text())
        assert len(dataset) == len(records) and dataset.num_skipped_at_load == 0
        for index, record in enumerate(records):
            item = dataset[index]
            assert item["id"] == record["id"] and item["answer"] == record["conversations"][1]["value"]
            assert item["question_kind"] == record["question_kind"]
            assert item["pixel_values"].shape == (3, 64, 64)
            assert int((item["input_ids"] == processor.image_token_id).sum()) == 16
            assert processor.tokenizer.unk_token_id not in item["input_ids"].tolist()  # vocabulary covers all text
            answer_ids = item["input_ids"][item["labels"] != IGNORE_INDEX]
            assert processor.tokenizer.decode(answer_ids, skip_special_tokens=True).strip() == item["answer"]


def test_generation_is_skipped_when_present_and_another_set_is_refused(shapes_sizes, shapes_dir, tmp_path):
    """Audit defect 3: asking for other sizes / seed / kinds in a data_dir that holds a set once regenerated it,
    tokenizer included, and the word ids of the runs trained on it swapped (a trained run scored at chance)."""
    directory = tmp_path / "copy"
    shutil.copytree(shapes_dir, directory)
    stamps = {path: path.stat().st_mtime_ns for path in directory.rglob("*") if path.is_file()}
    generate_shapes_vqa(directory, seed=0, **shapes_sizes)
    assert {path: path.stat().st_mtime_ns for path in directory.rglob("*") if path.is_file()} == stamps
    before = all_files(directory)
    for other in ({"num_train": 8}, {"num_test": 30}, {"seed": 1}, {"question_kinds": ["count"]}, {"max_shapes": 6}):
        with pytest.raises(FileExistsError, match=r"holds another shapes-VQA set .* not the one asked for"):
            generate_shapes_vqa(directory, **{**shapes_sizes, "seed": 0, **other})
        with pytest.raises(FileExistsError, match="not replaced"):
            ShapesVQADataModule(data_dir=str(directory), **{**shapes_sizes, **other}).prepare_data()
    assert all_files(directory) == before  # the tokenizer the trained runs read above all
    assert {path: path.stat().st_mtime_ns for path in directory.rglob("*") if path.is_file()} == stamps
    # each split has its own random stream: the training size leaves val / test unchanged
    resized = generate_shapes_vqa(tmp_path / "resized", **{**shapes_sizes, "num_train": 8}, seed=0)
    assert len(json.loads((resized / "train.json").read_text())) == 8
    for split in ("val", "test"):
        assert (resized / f"{split}.json").read_bytes() == (shapes_dir / f"{split}.json").read_bytes()


def test_the_refusal_of_another_set_is_one_line_naming_the_folder_both_sets_and_what_to_do(shapes_sizes, shapes_dir, tmp_path):
    directory = tmp_path / "copy"
    shutil.copytree(shapes_dir, directory)
    datamodule = ShapesVQADataModule(data_dir=str(directory), **{**shapes_sizes, "num_test": 30})
    with pytest.raises(FileExistsError) as refused:
        datamodule.prepare_data()
    message = str(refused.value)
    assert "\n" not in message
    assert message == (
        f"{directory} holds another shapes-VQA set (sizes 40 / 12 / 12, seed 0, kinds ['colour', 'shape', 'count_shape'], "
        "max_shapes 4, format version 2), not the one asked for (sizes 40 / 12 / 30, seed 0, kinds ['colour', 'shape', "
        f"'count_shape'], max_shapes 4, format version 2): it is not replaced, since runs trained on it read its tokenizer "
        f"({directory / 'tokenizer'}). Use another data_dir (and, to train on the new set, a backbone tokenizer in that "
        f"data_dir's tokenizer/), or delete {directory} to regenerate it there"
    )
    # a set of an older format is a set too: its runs read its tokenizer
    meta = json.loads((directory / "meta.json").read_text())
    (directory / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(FileExistsError, match=r"format version 1\), not the one asked for \(.*format version 2\)"):
        generate_shapes_vqa(directory, seed=0, **shapes_sizes)
    assert not (directory / ".generating").exists()
    # what the message says to do works: the folder deleted, the set asked for is generated there
    shutil.rmtree(directory)
    datamodule.prepare_data()
    assert json.loads((directory / "meta.json").read_text())["num_test"] == 30
    datamodule.teardown("test")


def test_a_set_with_a_file_missing_is_completed(shapes_sizes, shapes_dir, tmp_path):
    """An incomplete copy of the set asked for is written again (byte-identical, so its tokenizer too)."""
    directory = tmp_path / "copy"
    shutil.copytree(shapes_dir, directory)
    (directory / "tokenizer" / "tokenizer.json").unlink()
    (directory / "images" / "test" / "shapes-test-000003.png").unlink()
    generate_shapes_vqa(directory, seed=0, **shapes_sizes)
    assert all_files(directory) == all_files(shapes_dir)


def test_shapes_datamodule(shapes_sizes, shapes_dir, processor, tmp_path):
    data_dir = tmp_path / "fresh"
    datamodule = ShapesVQADataModule(data_dir=str(data_dir), batch_size=5, eval_batch_size=7, **shapes_sizes)
    with pytest.raises(RuntimeError, match="prepare_data"):
        datamodule.setup("fit")
    datamodule.prepare_data()
    assert all_files(data_dir) == all_files(shapes_dir)
    assert datamodule.tokenizer_dir == data_dir / "tokenizer"
    datamodule.set_input_processor(processor)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["input_ids"].shape[0] == 5 and batch["pixel_values"].shape == (5, 3, 64, 64)
    assert next(iter(datamodule.val_dataloader()))["input_ids"].shape[0] == 7
    datamodule.setup("test")
    assert sum(len(b["ids"]) for b in datamodule.test_dataloader()) == shapes_sizes["num_test"]
    baseline = datamodule.majority_baseline("test")
    assert set(baseline) == {"overall", *DEFAULT_QUESTION_KINDS} and all(0 <= v <= 1 for v in baseline.values())
    assert isinstance(datamodule.train_dataloader().collate_fn, LlavaCollator)


def test_a_subset_of_question_kinds_is_asked_in_equal_shares_and_needs_its_own_data_dir(shapes_sizes, shapes_dir, tmp_path):
    examples = generate_examples(300, seed=3, question_kinds=["colour", "count", "shape"])
    assert Counter(e.kind for e in examples) == {"colour": 100, "count": 100, "shape": 100}
    for bad in ([], ["colour", "colour"], ["size"]):
        with pytest.raises(ValueError, match="expected distinct kinds out of"):
            generate_examples(4, seed=3, question_kinds=bad)
    directory = tmp_path / "copy"
    shutil.copytree(shapes_dir, directory)
    datamodule = ShapesVQADataModule(data_dir=str(directory), question_kinds=["count"], **shapes_sizes)
    with pytest.raises(RuntimeError, match=r"kinds \['count'\]"):
        datamodule.setup("test")  # the set on disk asks three kinds
    with pytest.raises(FileExistsError, match=r"kinds \['colour', 'shape', 'count_shape'\].*not the one asked for \(.*kinds \['count'\]"):
        datamodule.prepare_data()  # not regenerated over the set there
    datamodule = ShapesVQADataModule(data_dir=str(tmp_path / "count"), question_kinds=["count"], **shapes_sizes)
    datamodule.prepare_data()
    meta = json.loads((tmp_path / "count" / "meta.json").read_text())
    assert meta["question_kinds"] == ["count"]
    records = json.loads((tmp_path / "count" / "test.json").read_text())
    assert {r["question_kind"] for r in records} == {"count"}
    datamodule.teardown("test")


def test_a_split_of_size_zero_is_not_set(processor, tmp_path):
    """An empty JSON list is an error (issue 18): a split asked with 0 examples is simply absent."""
    datamodule = ShapesVQADataModule(data_dir=str(tmp_path / "no-val"), num_train=4, num_val=0, num_test=0, batch_size=2)
    datamodule.prepare_data()
    datamodule.set_input_processor(processor)
    datamodule.setup("fit")
    assert datamodule.val_dataloader() == []  # fitting without validation
    with pytest.raises(ValueError, match="needs test_json"):
        datamodule.setup("test")
    datamodule.teardown("fit")


def test_crowded_scenes_are_drawn_and_answered_right(tmp_path):
    sizes = {"num_train": 60, "num_val": 0, "num_test": 20}
    crowded = generate_shapes_vqa(tmp_path / "crowded", seed=5, question_kinds=QUESTION_KINDS, max_shapes=8, **sizes)
    counts = Counter()
    for split in ("train", "test"):
        for record in json.loads((crowded / f"{split}.json").read_text()):
            question = record["conversations"][0]["value"].split("\n", 1)[1]
            scene = scene_from_image(crowded / "images" / record["image"])
            assert 1 <= len(scene) <= 8
            counts[len(scene)] += 1
            assert answer_from_scene(question, scene) == record["conversations"][1]["value"], record["id"]
    assert max(counts) > 4  # scenes past the default's four shapes
    assert json.loads((crowded / "meta.json").read_text())["max_shapes"] == 8
    # the default set's files are unchanged by the option: no max_shapes in its meta.json
    default = generate_shapes_vqa(tmp_path / "default", seed=5, **sizes)
    assert "max_shapes" not in json.loads((default / "meta.json").read_text())
    with pytest.raises(ValueError, match="max_shapes=17"):
        generate_examples(4, seed=0, max_shapes=17)


def test_a_directory_of_someone_elses_files_is_refused_and_left_as_it_was(shapes_sizes, tmp_path):
    """The generator once moved such files aside and deleted them; now it writes nothing there at all."""
    user = tmp_path / "user"
    (user / "images" / "coco").mkdir(parents=True)
    (user / "train.json").write_text('[{"my": "precious annotations"}]\n')
    (user / "images" / "coco" / "000001.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (user / "meta.json").write_text('{"dataset": "mine"}\n')  # a meta.json, but not the generator's
    before = all_files(user)
    with pytest.raises(FileExistsError, match=r"holds files that are not a generated shapes-VQA set \(images/, meta\.json, train\.json\)"):
        generate_shapes_vqa(user, seed=0, **shapes_sizes)
    with pytest.raises(FileExistsError, match="choose an empty or new data_dir"):
        ShapesVQADataModule(data_dir=str(user), **shapes_sizes).prepare_data()
    assert all_files(user) == before  # byte-identical, and not even a lock file added
    (user / "empty").mkdir()
    assert (generate_shapes_vqa(user / "empty", seed=0, **shapes_sizes) / "meta.json").is_file()  # empty is fine


def test_completing_its_own_set_replaces_only_the_files_it_wrote(shapes_sizes, shapes_dir, tmp_path):
    """A run killed while it replaced a set leaves the old set's files under meta.json's mark: the next run
    writing its set there removes the old set's files (stale images too), and no file of the user's."""
    directory = tmp_path / "copy"
    shutil.copytree(shapes_dir, directory)
    (directory / "meta.json").write_text('{"dataset": "shapes-vqa", "format_version": 2, "state": "being written"}\n')
    mine = {"notes.txt": b"my notes\n", "images/coco/000001.jpg": b"a photo", "images/train/README": b"not an image of the set",
            "tokenizer/notes.md": b"# about the tokenizer\n"}  # fmt: skip
    for name, data in mine.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    generate_shapes_vqa(directory, **{**shapes_sizes, "num_train": 8}, seed=0)
    assert json.loads((directory / "meta.json").read_text())["num_train"] == 8
    assert sorted(path.name for path in (directory / "images" / "train").iterdir()) == [
        "README", *(f"shapes-train-{index:06d}.png" for index in range(8))]  # fmt: skip
    assert {name: data for name, data in all_files(directory).items() if name in mine} == mine
    fresh = all_files(generate_shapes_vqa(tmp_path / "fresh", **{**shapes_sizes, "num_train": 8}, seed=0))
    assert {name: data for name, data in all_files(directory).items() if name not in mine} == fresh
    assert not (directory / ".generating").exists()


def test_a_set_whose_files_were_being_replaced_is_regenerated(shapes_sizes, shapes_dir, tmp_path):
    """A run killed while it swapped the files leaves meta.json's mark without a set: the next run writes it."""
    directory = tmp_path / "copy"
    shutil.copytree(shapes_dir, directory)
    (directory / "meta.json").write_text('{"dataset": "shapes-vqa", "format_version": 2, "state": "being written"}\n')
    (directory / "val.json").unlink()  # already moved out
    generate_shapes_vqa(directory, seed=0, **shapes_sizes)
    assert all_files(directory) == all_files(shapes_dir)
