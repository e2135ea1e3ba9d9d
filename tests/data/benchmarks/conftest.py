"""Stand-ins for the benchmarks: a handful of records written in each benchmark's published format
(file names, JSON / JSON-lines / TSV / folder layout as released), with images drawn by the shapes
generator, so that every loader runs without the real data."""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaptive_mllm.backbones.base import InputProcessor
from adaptive_mllm.data.shapes import draw_scene, sample_scene

# the keys of every batch (LlavaCollator's) beside each benchmark's extra fields
BATCH_KEYS = {
    "input_ids", "labels", "attention_mask", "prompt_ids", "prompt_attention_mask", "prompt_lengths",
    "pixel_values", "has_image", "answers", "questions", "question_kinds", "ids", "num_skipped",
}  # fmt: skip


def scene_image(seed: int) -> Image.Image:
    """A 64x64 shapes scene, different per seed."""
    rng = np.random.default_rng(seed)
    return draw_scene(sample_scene(rng, 1 + seed % 3))


def save_image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    scene_image(seed).save(path)
    return path


def write_json(path: Path, payload: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return path


# --- VQAv2 ------------------------------------------------------------------------------------------
VQAV2_QUESTIONS = [  # (question_id, image_id, question, answers of 10 humans, answer type)
    (42000, 42, "What colour is the circle?", ["red"] * 7 + ["dark red"] * 3, "other"),
    (42001, 42, "How many shapes are there?", ["2"] * 2 + ["3"] * 8, "number"),
    (7000, 7, "Is there a square?", ["yes"] * 10, "yes/no"),
]


def write_vqav2(root: Path) -> dict[str, Path]:
    for image_id in (42, 7):
        save_image(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", image_id)
    questions = {
        "info": {"description": "stand-in"}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
        "data_subtype": "val2014",
        "questions": [{"image_id": i, "question": q, "question_id": qid} for qid, i, q, _, _ in VQAV2_QUESTIONS],
    }  # fmt: skip
    annotations = {
        "info": {}, "license": {}, "data_subtype": "val2014",
        "annotations": [
            {
                "question_type": "what", "multiple_choice_answer": max(set(a), key=a.count), "image_id": i,
                "answer_type": kind, "question_id": qid,
                "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": n + 1} for n, x in enumerate(a)],
            }
            for qid, i, _, a, kind in VQAV2_QUESTIONS
        ],
    }  # fmt: skip
    return {
        "questions": write_json(root / "v2_OpenEnded_mscoco_val2014_questions.json", questions),
        "annotations": write_json(root / "v2_mscoco_val2014_annotations.json", annotations),
        "images": root / "val2014",
    }


# --- GQA --------------------------------------------------------------------------------------------
def _gqa_question(question: str, image_id: str, answer: str, structural: str, full: str) -> dict:
    return {
        "semantic": [], "entailed": [], "equivalent": [], "question": question, "imageId": image_id,
        "isBalanced": True, "groups": {"global": None, "local": "x"}, "answer": answer, "semanticStr": "",
        "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
        "types": {"structural": structural, "semantic": "attr", "detailed": "x"}, "fullAnswer": full,
    }  # fmt: skip


def write_gqa(root: Path) -> dict[str, Path]:
    for seed, image_id in enumerate(("n15423", "n98765")):
        save_image(root / "images" / f"{image_id}.jpg", seed)
    questions = {
        "201307251": _gqa_question("Is the circle red?", "n15423", "no", "verify", "No, the circle is blue."),
        "201640614": _gqa_question("What shape is on the left?", "n98765", "triangle", "query", "It is a triangle."),
        "20968379": _gqa_question("Which colour is the square?", "n98765", "green", "query", "It is green."),
    }
    return {"questions": write_json(root / "testdev_balanced_questions.json", questions), "images": root / "images"}


# --- TextVQA ----------------------------------------------------------------------------------------
TEXTVQA = [  # (question_id, image_id, question, answers, OCR tokens)
    (34602, "003a8ae2ef43b901", "what is the brand of this camera?", ["dakota"] * 8 + ["dakota digital"] * 2, ["dakota", "digital"]),
    (34603, "00ab2ed9f2c1de1a", "what does the sign say?", ["stop"] * 4 + ["halt"] * 6, []),
]  # fmt: skip


def write_textvqa(root: Path) -> dict[str, Path]:
    for seed, (_, image_id, *_) in enumerate(TEXTVQA):
        save_image(root / "train_images" / f"{image_id}.jpg", seed)
    data = [
        {
            "question": q, "image_id": i, "image_classes": ["Camera"], "flickr_original_url": "", "flickr_300k_url": "",
            "image_width": 64, "image_height": 64, "answers": a, "question_tokens": q.split(), "question_id": qid,
            "set_name": "val",
        }
        for qid, i, q, a, _ in TEXTVQA
    ]  # fmt: skip
    ocr = [{"image_id": i, "ocr_tokens": tokens, "ocr_info": []} for _, i, _, _, tokens in TEXTVQA]
    return {
        "questions": write_json(
            root / "TextVQA_0.5.1_val.json",
            {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data},
        ),
        "ocr": write_json(root / "TextVQA_Rosetta_OCR_v0.2_val.json", {"dataset_name": "textvqa", "data": ocr}),
        "images": root / "train_images",
    }


# --- ScienceQA --------------------------------------------------------------------------------------
def _sqa_problem(question: str, choices: list[str], answer: int, hint: str, image: str | None, subject: str, split: str) -> dict:
    return {
        "question": question, "choices": choices, "answer": answer, "hint": hint, "image": image, "task": "closed choice",
        "grade": "grade3", "subject": subject, "topic": "x", "category": "x", "skill": "x", "lecture": "", "solution": "",
        "split": split,
    }  # fmt: skip


def write_scienceqa(root: Path) -> dict[str, Path]:
    problems = {
        "5": _sqa_problem("Which shape is red?", ["circle", "square", "triangle"], 1, "The figure shows shapes.", "image.png", "natural science", "test"),
        "9": _sqa_problem("Which is on the map?", ["a river", "a road"], 0, "", "image.png", "social science", "test"),
        "11": _sqa_problem("Which word is a noun?", ["run", "dog"], 1, "", None, "language science", "test"),
        "2": _sqa_problem("Which shape is blue?", ["circle", "square"], 0, "", "image.png", "natural science", "train"),
    }  # fmt: skip
    for seed, pid in enumerate(("5", "9")):
        save_image(root / "images" / "test" / pid / "image.png", seed)
    return {
        "problems": write_json(root / "problems.json", problems),
        "splits": write_json(root / "pid_splits.json", {"train": ["2"], "val": [], "test": ["5", "9", "11"], "minival": []}),
        "images": root / "images" / "test",
    }


# --- POPE ---------------------------------------------------------------------------------------------
POPE = {  # split -> (image id, object, label)
    "adversarial": [(310196, "circle", "yes"), (310196, "dog", "no")],
    "popular": [(310196, "square", "no"), (84, "triangle", "yes")],
    "random": [(84, "circle", "yes"), (84, "car", "no")],
}


def write_pope(root: Path) -> dict[str, Path]:
    for image_id in (310196, 84):
        save_image(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", image_id)
    for split, questions in POPE.items():
        lines = [
            json.dumps({"question_id": n + 1, "image": f"COCO_val2014_{i:012d}.jpg", "text": f"Is there a {obj} in the image?", "label": label})
            for n, (i, obj, label) in enumerate(questions)
        ]
        (root / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
    return {"questions": root, "images": root / "val2014"}


# --- MME ----------------------------------------------------------------------------------------------
def write_mme(root: Path) -> dict[str, Path]:
    release = root / "MME_Benchmark_release_version"
    # a subtask with images/ + questions_answers_YN/
    save_image(release / "artwork" / "images" / "10002.jpg", 1)
    qa = release / "artwork" / "questions_answers_YN"
    qa.mkdir(parents=True)
    (qa / "10002.txt").write_text(
        "Does this artwork exist in the form of painting? Please answer yes or no.\tYes\n"
        "Does this artwork exist in the form of sculpture? Please answer yes or no.\tNo\n"
    )
    # flat subtasks: image and text side by side
    for seed, stem in enumerate(("000000006040", "000000018918")):
        save_image(release / "existence" / f"{stem}.jpg", seed)
        (release / "existence" / f"{stem}.txt").write_text(
            "Is there a circle in this image? Please answer yes or no.\tYes\n"
            "Is there a car in this image? Please answer yes or no.\tNo\n"
        )
    save_image(release / "code_reasoning" / "0020.png", 5)
    (release / "code_reasoning" / "0020.txt").write_text(
        # the release has a few questions with two spaces before its instruction
        "Is the output of the code 'Hello'? Please answer yes or no.\tYes\nIs the output of the code 'World'?  Please answer yes or no.\tNo\n"
    )
    return {"root": release}


# --- MMBench --------------------------------------------------------------------------------------------
MMBENCH_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category", "comment", "split"]


def png_base64(seed: int) -> str:
    buffer = io.BytesIO()
    scene_image(seed).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def mmbench_rows() -> list[dict[str, str]]:
    common = {"source": "stand-in", "l2-category": "x", "comment": "", "split": "dev"}
    return [
        {"index": "0", "question": "Which shape is in the top left?", "hint": "", "A": "circle", "B": "square", "C": "triangle",
         "D": "", "answer": "B", "category": "object_localization", "image": png_base64(0), **common},
        {"index": "1", "question": "Which scene is this?", "hint": "Look at the shapes.", "A": "beach", "B": "forest", "C": "city",
         "D": "grid", "answer": "D", "category": "image_scene", "image": "0", **common},  # refers to row 0's image
    ]  # fmt: skip


def write_tsv(path: Path, rows: list[dict[str, str]], columns: list[str] = MMBENCH_COLUMNS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_mmbench(root: Path) -> dict[str, Path]:
    return {"tsv": write_tsv(root / "mmbench_dev_20230712.tsv", mmbench_rows())}


# --- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture
def bench_processor(make_processor: Callable[..., InputProcessor]) -> InputProcessor:
    """The data tests' InputProcessor (shapes tokenizer, plain_chat, 16 image tokens), room for long prompts."""
    return make_processor(max_length=256)


@pytest.fixture
def vqav2_files(tmp_path: Path) -> dict[str, Path]:
    return write_vqav2(tmp_path / "vqav2")


@pytest.fixture
def gqa_files(tmp_path: Path) -> dict[str, Path]:
    return write_gqa(tmp_path / "gqa")


@pytest.fixture
def textvqa_files(tmp_path: Path) -> dict[str, Path]:
    return write_textvqa(tmp_path / "textvqa")


@pytest.fixture
def scienceqa_files(tmp_path: Path) -> dict[str, Path]:
    return write_scienceqa(tmp_path / "scienceqa")


@pytest.fixture
def pope_files(tmp_path: Path) -> dict[str, Path]:
    return write_pope(tmp_path / "pope")


@pytest.fixture
def mme_files(tmp_path: Path) -> dict[str, Path]:
    return write_mme(tmp_path / "mme")


@pytest.fixture
def mmbench_files(tmp_path: Path) -> dict[str, Path]:
    return write_mmbench(tmp_path / "mmbench")


@pytest.fixture
def first_batch(bench_processor: InputProcessor) -> Callable[..., dict]:
    """setup(stage) and the first batch of that stage's dataloader (checked to hold the common keys)."""

    def load(datamodule, stage: str = "test") -> dict:
        datamodule.set_input_processor(bench_processor)
        datamodule.setup(stage)
        loader = {"test": datamodule.test_dataloader, "predict": datamodule.predict_dataloader}[stage]()
        batch = next(iter(loader))
        answer_length = {"max_new_tokens"} if datamodule.max_new_tokens is not None else set()
        assert BATCH_KEYS | set(datamodule.extra_fields) | answer_length == set(batch)
        return batch

    return load


def prompts(datamodule, split: str = "test") -> list[str]:
    """The prompt text (first human turn) of each record of a built split."""
    return [record.questions[0] for record in datamodule.datasets[split].records]


@pytest.fixture
def prompts_of() -> Callable[..., list[str]]:
    return prompts


@pytest.fixture
def mmbench_tsv(tmp_path: Path) -> Callable[..., Path]:
    """Write MMBench rows (default: the stand-in's; a callable edits them) as a TSV; returns its path."""

    def write(edit: Callable[[list[dict[str, str]]], object] | None = None, columns: list[str] = MMBENCH_COLUMNS) -> Path:
        rows = mmbench_rows()
        if edit is not None:
            edit(rows)
        return write_tsv(tmp_path / "edited" / "mmbench.tsv", rows, columns)

    return write
