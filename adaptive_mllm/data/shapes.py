"""Shapes-VQA: a generated visual question answering set small enough to train a tiny LLaVA on a CPU.

Each 64x64 image is a 4x4 grid of 16-px cells, one cell per vision-tower patch, holding 1-4 shapes
(circle / square / triangle in one of six colours), each drawn inside its own cell. Questions ask for
a colour, a shape, a count, the count of one shape or a left-of relation (by default the three that the
tiny model learns: colour, shape, count of a shape); answers are single words, so exact match is a fair
metric. Everything is drawn from a seeded numpy Generator, so a seed gives byte-identical files, and
the output is the LLaVA instruction format that :mod:`adaptive_mllm.data.llava_json` reads, plus a
word-level tokenizer trained on the generated text.

    python -c "from adaptive_mllm.data import generate_shapes_vqa; generate_shapes_vqa('data/shapes-vqa')"
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from adaptive_mllm.backbones.templates import IMAGE_PLACEHOLDER, plain_chat
from adaptive_mllm.data.directory_lock import LOCK_FILE, DirectoryLock
from adaptive_mllm.data.tokenizer import train_word_tokenizer

# Bump whenever the generated content changes. A set of another version is not replaced in its data_dir (runs
# trained on it read its tokenizer): generate the new one into another data_dir.
FORMAT_VERSION = 2

IMAGE_SIZE = 64
CELL_SIZE = 16  # = the vision tower's patch size, so a shape never straddles two patches
GRID = IMAGE_SIZE // CELL_SIZE  # 4 x 4 cells
MAX_SHAPES = 4  # the default; up to GRID * GRID with ``max_shapes``
# Every shape is 12 px wide and centred in its cell: a shape/colour pair is then one exact patch pattern,
# which a tiny vision tower trained from scratch picks up quickly (jittered 10-14 px shapes were learned
# far slower: shape questions stayed near chance after 3,000 steps of recipes/tiny.yaml).
SHAPE_SIZE = 12

SHAPES = ("circle", "square", "triangle")
# Far apart in RGB (the closest pair, yellow / orange, is ~100 apart) and from the light background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (130, 40, 170),
    "orange": (245, 140, 90),
}
BACKGROUND = (235, 235, 235)
# counts are answered in words, never digits
COUNT_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
               "thirteen", "fourteen", "fifteen", "sixteen")  # fmt: skip
ZERO_AND_COUNT_WORDS = ("zero", *COUNT_WORDS)

QUESTION_KINDS = ("colour", "shape", "count", "count_shape", "left_of")
# What the tiny recipe trains on. "count_shape" ("How many circles are there?") is there for the vision
# tower: answering it needs every patch's shape, which keeps shape features from fading behind colour
# (shape explains 16% of the visual tokens' variance at initialisation; in from-scratch runs without it,
# that fell to 7.5% and shape questions stayed at chance). left_of is not learned by the tiny model.
DEFAULT_QUESTION_KINDS = ("colour", "shape", "count_shape")
SPLITS = ("train", "val", "test")
_SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}  # each split its own random stream

DATASET_NAME = "shapes-vqa"  # meta.json's "dataset": the mark of a directory this generator wrote
META_FILE = "meta.json"
IMAGE_DIR = "images"
TOKENIZER_DIR = "tokenizer"
# What ``save_pretrained`` writes for the word tokenizer, in this or other transformers versions: the
# files of a set's tokenizer/ that a regeneration replaces (any other file there is the user's).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja")  # fmt: skip


@dataclass(frozen=True)
class PlacedShape:
    """One drawn shape: what it is and exactly where (pixel box inclusive, inside cell (row, col))."""

    shape: str
    colour: str
    row: int
    col: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1, inclusive

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Example:
    """A scene and the one question asked about it: the generator's ground truth."""

    shapes: tuple[PlacedShape, ...]
    kind: str
    question: str
    answer: str


# --- scenes ----------------------------------------------------------------------------------------
def sample_scene(rng: np.random.Generator, num_shapes: int) -> tuple[PlacedShape, ...]:
    """``num_shapes`` shapes in distinct cells, each with a random size and offset inside its cell."""
    cells = rng.choice(GRID * GRID, size=num_shapes, replace=False)
    shapes = []
    for cell in sorted(int(c) for c in cells):  # row-major order, so the description is canonical
        row, col = divmod(cell, GRID)
        size = SHAPE_SIZE
        left = top = (CELL_SIZE - size) // 2
        x0, y0 = col * CELL_SIZE + left, row * CELL_SIZE + top
        shapes.append(
            PlacedShape(
                shape=SHAPES[int(rng.integers(len(SHAPES)))],
                colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
                row=row,
                col=col,
                box=(x0, y0, x0 + size - 1, y0 + size - 1),
            )
        )
    return tuple(shapes)


def draw_scene(shapes: tuple[PlacedShape, ...]) -> Image.Image:
    """The RGB image of a scene; no anti-aliasing, so every shape pixel has exactly its palette colour."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for placed in shapes:
        x0, y0, x1, y1 = placed.box
        fill = COLOURS[placed.colour]
        if placed.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif placed.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif placed.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {placed.shape!r}")
    return image


# --- questions -------------------------------------------------------------------------------------
def _unique(shapes: tuple[PlacedShape, ...], key: str) -> list[PlacedShape]:
    """Shapes whose ``key`` attribute (shape / colour / name) no other shape in the scene shares."""
    values = [getattr(s, key) for s in shapes]
    return [s for s, value in zip(shapes, values, strict=True) if values.count(value) == 1]


def ask(rng: np.random.Generator, shapes: tuple[PlacedShape, ...], kind: str, yes: bool = True) -> tuple[str, str] | None:
    """(question, answer) of ``kind`` about the scene, or None when the scene cannot be asked it
    unambiguously (colour of a shape that appears twice, left-of with nothing in different columns).
    ``yes`` is the wanted answer of a left-of question."""
    if kind == "colour":
        candidates = _unique(shapes, "shape")
        if not candidates:
            return None
        target = candidates[int(rng.integers(len(candidates)))]
        return f"What colour is the {target.shape}?", target.colour
    if kind == "shape":
        candidates = _unique(shapes, "colour")
        if not candidates:
            return None
        target = candidates[int(rng.integers(len(candidates)))]
        return f"What shape is the {target.colour} object?", target.shape
    if kind == "count":
        return "How many shapes are there?", COUNT_WORDS[len(shapes) - 1]
    if kind == "count_shape":
        target = SHAPES[int(rng.integers(len(SHAPES)))]
        number = sum(placed.shape == target for placed in shapes)
        return f"How many {target}s are there?", ZERO_AND_COUNT_WORDS[number]
    if kind == "left_of":
        named = _unique(shapes, "name")  # "the red circle" must denote one shape
        pairs = [(a, b) for a in named for b in named if a.col < b.col]  # a strictly left of b
        if not pairs:
            return None
        left, right = pairs[int(rng.integers(len(pairs)))]
        first, second = (left, right) if yes else (right, left)
        return f"Is the {first.name} left of the {second.name}?", "yes" if yes else "no"
    raise ValueError(f"unknown question kind {kind!r}; expected one of {QUESTION_KINDS}")


def sample_example(rng: np.random.Generator, kind: str, yes: bool = True, max_shapes: int = MAX_SHAPES) -> Example:
    """A random scene of 1 to ``max_shapes`` shapes that can be asked ``kind``, with its question (rejection
    sampling, a few tries)."""
    low = 2 if kind == "left_of" else 1
    while True:
        shapes = sample_scene(rng, int(rng.integers(low, max_shapes + 1)))
        asked = ask(rng, shapes, kind, yes)
        if asked is not None:
            return Example(shapes=shapes, kind=kind, question=asked[0], answer=asked[1])


def check_question_kinds(question_kinds: Sequence[str]) -> tuple[str, ...]:
    kinds = tuple(question_kinds)
    unknown = [kind for kind in kinds if kind not in QUESTION_KINDS]
    if not kinds or unknown or len(set(kinds)) != len(kinds):
        raise ValueError(f"question_kinds={list(kinds)}: expected distinct kinds out of {list(QUESTION_KINDS)}")
    return kinds


def check_max_shapes(max_shapes: int) -> int:
    if not 2 <= max_shapes <= GRID * GRID:
        raise ValueError(f"max_shapes={max_shapes}: expected 2 to {GRID * GRID} (one shape per cell of the {GRID}x{GRID} grid)")
    return max_shapes


def generate_examples(
    num_examples: int,
    seed: int,
    split: str = "train",
    question_kinds: Sequence[str] = DEFAULT_QUESTION_KINDS,
    max_shapes: int = MAX_SHAPES,
) -> list[Example]:
    """The examples of one split: kinds exactly balanced (and left-of answers split yes / no), then
    shuffled. Each split draws from its own stream, so resizing one split leaves the others unchanged."""
    if split not in _SPLIT_STREAMS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    kinds = check_question_kinds(question_kinds)
    check_max_shapes(max_shapes)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_STREAMS[split]]))
    slots = [(kinds[i % len(kinds)], (i // len(kinds)) % 2 == 0) for i in range(num_examples)]
    order = rng.permutation(num_examples)
    return [sample_example(rng, *slots[int(i)], max_shapes=max_shapes) for i in order]


# --- files -----------------------------------------------------------------------------------------
def _record_id(split: str, index: int) -> str:
    return f"shapes-{split}-{index:06d}"


def _write_json(path: Path, payload: object) -> None:
    """Write to a temporary file and rename, so a reader never sees half a file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(temporary, path)


def _write_split(out_dir: Path, split: str, examples: list[Example]) -> list[dict]:
    """Draw and save the images of one split; returns its LLaVA records."""
    image_dir = out_dir / IMAGE_DIR / split
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index, example in enumerate(examples):
        record_id = _record_id(split, index)
        image_name = f"{split}/{record_id}.png"
        # compress_level=1: 3x faster than the default, files barely larger at this size
        draw_scene(example.shapes).save(out_dir / IMAGE_DIR / image_name, format="PNG", compress_level=1)
        records.append(
            {
                "id": record_id,
                "image": image_name,
                "conversations": [
                    {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{example.question}"},
                    {"from": "gpt", "value": example.answer},
                ],
                "question_kind": example.kind,
            }
        )
    return records


def _meta(seed: int, sizes: dict[str, int], question_kinds: Sequence[str], max_shapes: int) -> dict:
    return {
        "dataset": DATASET_NAME,
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "question_kinds": list(question_kinds),
        **({"max_shapes": max_shapes} if max_shapes != MAX_SHAPES else {}),  # sets made before it stay valid
        "image_size": IMAGE_SIZE,
        **{f"num_{split}": sizes[split] for split in SPLITS},
    }


def is_generated(
    out_dir: str | Path,
    num_train: int,
    num_val: int,
    num_test: int,
    seed: int = 0,
    question_kinds: Sequence[str] = DEFAULT_QUESTION_KINDS,
    max_shapes: int = MAX_SHAPES,
) -> bool:
    """Whether ``out_dir`` already holds exactly this dataset (meta.json is written last)."""
    out_dir = Path(out_dir)
    meta_path = out_dir / META_FILE
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    expected = _meta(seed, {"train": num_train, "val": num_val, "test": num_test}, question_kinds, max_shapes)
    files = [out_dir / f"{split}.json" for split in SPLITS] + [out_dir / TOKENIZER_DIR / "tokenizer.json"]
    return meta == expected and all(path.is_file() for path in files)


def generate_shapes_vqa(
    out_dir: str | Path,
    num_train: int = 20_000,
    num_val: int = 1_000,
    num_test: int = 2_000,
    seed: int = 0,
    question_kinds: Sequence[str] = DEFAULT_QUESTION_KINDS,
    max_shapes: int = MAX_SHAPES,
) -> Path:
    """Write the shapes-VQA set to ``out_dir`` (``{train,val,test}.json``, ``images/``, ``tokenizer/``,
    ``meta.json``); a no-op when ``meta.json`` says the same set is already there. Returns ``out_dir``.

    ``out_dir`` must be new, empty, this very set, or an incomplete set this generator was writing: a
    directory that holds another set (other sizes, seed, question kinds, max_shapes or format version) is
    refused (FileExistsError, see ``_refuse_another_set``), since the runs trained on that set read its
    tokenizer, and so is a directory holding anything else. Completing a set touches only the files the
    generator writes, so a user's own files are never removed or overwritten."""
    hold_shapes_vqa(out_dir, num_train, num_val, num_test, seed, question_kinds, max_shapes).release()
    return Path(out_dir)


def hold_shapes_vqa(
    out_dir: str | Path,
    num_train: int,
    num_val: int,
    num_test: int,
    seed: int = 0,
    question_kinds: Sequence[str] = DEFAULT_QUESTION_KINDS,
    max_shapes: int = MAX_SHAPES,
) -> DirectoryLock:
    """Make sure ``out_dir`` holds this set and return the shared lock that keeps other runs from
    replacing it until released.

    A missing or incomplete set is written into ``out_dir/.generating`` and then moved into place,
    ``meta.json`` last, under the directory's exclusive lock, and runs asking for the same set at once
    write it once. A directory that holds another complete set is never replaced (FileExistsError, see
    ``_refuse_another_set``), nor is one that holds files but no set of this generator's, and the latter
    gets nothing written to it, not even the lock file (FileExistsError, see ``_refuse_foreign``).
    """
    question_kinds = check_question_kinds(question_kinds)
    check_max_shapes(max_shapes)
    out_dir = Path(out_dir)
    sizes = {"train": num_train, "val": num_val, "test": num_test}
    if any(size < 0 for size in sizes.values()):
        raise ValueError(f"split sizes must be >= 0, got {sizes}")
    # No lock needed yet: a run writing a set here keeps meta.json's mark on it whenever files other
    # than the lock and the staging folder are there, so it never looks foreign. Checked again below.
    _refuse_foreign(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    asked = _meta(seed, sizes, question_kinds, max_shapes)
    lock = DirectoryLock(out_dir)
    for _ in range(_LOCK_ATTEMPTS):
        lock.shared()  # waits while another run writes a set here
        if is_generated(out_dir, num_train, num_val, num_test, seed, question_kinds, max_shapes):
            return lock
        try:
            _refuse_another_set(out_dir, asked)
        finally:
            lock.release()
        if lock.try_exclusive():
            try:
                if not is_generated(out_dir, num_train, num_val, num_test, seed, question_kinds, max_shapes):
                    _refuse_foreign(out_dir)
                    _refuse_another_set(out_dir, asked)  # another run may have written one meanwhile
                    _write_set(out_dir, seed, sizes, question_kinds, max_shapes)
            finally:
                lock.release()
            continue  # hold it shared, checked again
        time.sleep(random.uniform(0.02, 0.1))  # another run holds the set: it may be the one we want
    lock.release()
    raise RuntimeError(
        f"{out_dir} is in use by another run and does not hold the shapes-VQA set asked for ({_describe_meta(asked)}; "
        f"it holds: {_describe(out_dir)}): nothing is written. Use another data_dir, or run again once that run has ended."
    )


_LOCK_ATTEMPTS = 50  # ~3 s of retries before deciding the directory is held by another run
STAGING_DIR = ".generating"
_BEING_WRITTEN = "meta.being-written.json"  # meta.json while a set's files are swapped: marked, not a set
_OWN_ENTRIES = (LOCK_FILE, STAGING_DIR)  # what a run leaves in a directory before it marks it as a set


def _describe(out_dir: Path) -> str:
    meta = _complete_meta(out_dir)
    return "being written, or not a shapes-VQA set" if meta is None else _describe_meta(meta)


def _describe_meta(meta: dict) -> str:
    """The parameters of a set's meta.json, in words ("?" for one that a set of an old version lacks)."""

    def value(key: str, default: object = "?") -> object:
        return meta.get(key, default)

    return (
        f"sizes {value('num_train')} / {value('num_val')} / {value('num_test')}, seed {value('seed')}, "
        f"kinds {value('question_kinds')}, max_shapes {value('max_shapes', MAX_SHAPES)}, format version {value('format_version')}"
    )


def _complete_meta(out_dir: Path) -> dict | None:
    """The meta.json of the complete set that ``out_dir`` holds, of any sizes, seed or version (meta.json is
    moved in last, so it marks a set that was written to the end), or None: no set, a set whose files were
    being replaced when its run stopped, or not this generator's."""
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("dataset") != DATASET_NAME or "state" in meta:
        return None
    return meta


def _refuse_another_set(out_dir: Path, asked: dict) -> None:
    """Raise FileExistsError when ``out_dir`` holds a complete set other than the one ``asked`` (its
    ``_meta``). Its tokenizer's word ids depend on the generated text, and runs trained on the set read it
    from ``{data_dir}/tokenizer``: regenerating it there would swap the ids under them, their answers would
    be wrong and nothing would say so. The same set with a file missing is completed instead (it is
    byte-identical)."""
    held = _complete_meta(out_dir)
    if held is None or held == asked:
        return
    raise FileExistsError(
        f"{out_dir} holds another shapes-VQA set ({_describe_meta(held)}), not the one asked for "
        f"({_describe_meta(asked)}): it is not replaced, since runs trained on it read its tokenizer "
        f"({out_dir / TOKENIZER_DIR}). Use another data_dir (and, to train on the new set, a backbone tokenizer "
        f"in that data_dir's {TOKENIZER_DIR}/), or delete {out_dir} to regenerate it there"
    )


def _is_marked(out_dir: Path) -> bool:
    """Whether ``meta.json`` says this generator wrote ``out_dir`` (a set of any version or sizes, or
    one whose files were being replaced when its run stopped)."""
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("dataset") == DATASET_NAME


def _refuse_foreign(out_dir: Path) -> None:
    """Raise FileExistsError when ``out_dir`` holds files but no set of this generator's: nothing tells
    which of them a regeneration could replace, so none is touched. A missing or empty directory, or one
    holding only what an interrupted first run left (the lock, the staging folder), is fine."""
    if not out_dir.is_dir() or _is_marked(out_dir):
        return
    found = sorted(f"{entry.name}/" if entry.is_dir() else entry.name for entry in out_dir.iterdir() if entry.name not in _OWN_ENTRIES)
    if found:
        shown = ", ".join(found[:5]) + (f", ... ({len(found)} entries)" if len(found) > 5 else "")
        raise FileExistsError(
            f"{out_dir} holds files that are not a generated shapes-VQA set ({shown}): none is replaced; "
            "choose an empty or new data_dir"
        )


def _own_files(out_dir: Path, tokenizer_files: set[str]) -> list[Path]:
    """The files of a marked ``out_dir`` that the generator writes: the json files, the images it names
    (``images/{split}/shapes-{split}-NNNNNN.png``) and ``tokenizer_files`` in ``tokenizer/``. Anything
    else in the directory is the user's."""
    paths = [out_dir / f"{split}.json" for split in SPLITS]
    for split in SPLITS:
        image_dir = out_dir / IMAGE_DIR / split
        if image_dir.is_dir():
            paths += [path for path in image_dir.iterdir() if re.fullmatch(rf"shapes-{split}-\d{{6}}\.png", path.name)]
    paths += [out_dir / TOKENIZER_DIR / name for name in sorted(tokenizer_files)]
    return [path for path in paths if path.is_file()]


def _write_set(out_dir: Path, seed: int, sizes: dict[str, int], question_kinds: Sequence[str], max_shapes: int) -> None:
    """Write the set into a staging directory, then move its files into ``out_dir`` (the caller holds the
    exclusive lock and has refused a foreign directory). meta.json is first swapped for a mark that no
    set matches and the new one goes last, so a run killed halfway leaves a directory that is still
    recognised as the generator's but never counts as a set; only the files the generator writes are
    removed or replaced, any other file stays where it is."""
    staging = out_dir / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)  # left by a run that died while writing
    staging.mkdir()
    template = plain_chat()
    texts = []
    for split in SPLITS:
        records = _write_split(staging, split, generate_examples(sizes[split], seed, split, question_kinds, max_shapes))
        _write_json(staging / f"{split}.json", records)
        texts += [template.render([(r["conversations"][0]["value"], r["conversations"][1]["value"])]) for r in records]
    train_word_tokenizer(texts, staging / TOKENIZER_DIR, template=template)
    _write_json(staging / META_FILE, _meta(seed, sizes, question_kinds, max_shapes))
    _write_json(staging / _BEING_WRITTEN, {"dataset": DATASET_NAME, "format_version": FORMAT_VERSION, "state": "being written"})

    os.replace(staging / _BEING_WRITTEN, out_dir / META_FILE)  # the old set no longer counts, the mark stays
    tokenizer_files = set(TOKENIZER_FILES) | {path.name for path in (staging / TOKENIZER_DIR).iterdir()}
    for path in _own_files(out_dir, tokenizer_files):  # the old set's, stale images included
        path.unlink()
    for path in sorted(staging.rglob("*")):
        if path.is_file() and path != staging / META_FILE:
            target = out_dir / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    os.replace(staging / META_FILE, out_dir / META_FILE)
    shutil.rmtree(staging)  # its folders only, emptied
