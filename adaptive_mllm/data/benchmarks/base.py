"""What the benchmark datamodules share: each reads its benchmark's published files and turns every
question into a :class:`LlavaRecord`, so that the LLaVA collator, chat template and image preprocessing
of :mod:`adaptive_mllm.data.llava_json` are used unchanged; what the benchmark's metric needs beyond the
reference answer (the ten human answers, the image a question is paired with, ...) travels as extra
per-record fields, which the collator adds to the batch as lists.

A benchmark is for evaluation only: ``setup("test")`` / ``"validate"`` / ``"predict"``; ``make_metric``
gives the benchmark's metric, with the interface ``update(predictions, batch)`` / ``compute() -> dict``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader
from torchmetrics import Metric

from adaptive_mllm.backbones.base import InputProcessor
from adaptive_mllm.backbones.templates import IMAGE_PLACEHOLDER
from adaptive_mllm.data.llava_json import (
    DEFAULT_QUESTION_KIND,
    JSON_LINES,
    DataError,
    LlavaCollator,
    LlavaDataModule,
    LlavaJsonDataset,
    LlavaRecord,
    forget_resolved_directories,
    image_inside,
    is_json_lines,
)
from adaptive_mllm.metrics import RESERVED_GROUPS

# the instructions LLaVA-1.5's evaluation appends to each benchmark's question
SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# how long LLaVA-1.5's scripts let an answer run: model_vqa_loader.py's default (VQAv2, GQA, TextVQA, POPE, MME),
# model_vqa_science.py and model_vqa_mmbench.py's (ScienceQA, MMBench)
VQA_ANSWER_TOKENS = 128
CHOICE_ANSWER_TOKENS = 1024
_STAGE_SPLIT = {"test": "test", "validate": "val", "val": "val", "fit": "val", "predict": "predict"}


@dataclass(frozen=True)
class IdOrigin:
    """Where a question's id was read: the file, the id as written there, the record's position and the
    field that holds it (None: the id is a JSON key); named in the error about an id two questions share."""

    path: str | Path
    record_id: Any
    index: int
    field: str | None


@dataclass(frozen=True)
class TextOrigin:
    """Where a question's text (and its image's name) was read: the file, the record's id as written there,
    its position in that file (a line, a list index, a key's position) and the fields that hold the
    question and the image. Named in the errors raised when the question's item is encoded (a prompt longer
    than ``max_length``, an image that cannot be decoded), in place of the LLaVA loader's ``conversations``."""

    path: str | Path
    record_id: Any
    index: int
    field: str
    image_field: str = "image"


@dataclass(frozen=True)
class BenchmarkQuestion:
    """One question of a benchmark, read from its files: the prompt text (without the image placeholder),
    the reference answer ("" when the file has none), its group, the metric's extra fields, where its id
    was read (None: the benchmark's source, field ``id``) and where its text was read (None: ``origin``,
    else the source, with field ``question``)."""

    id: str
    image: Path | None
    text: str
    answer: str
    kind: str = DEFAULT_QUESTION_KIND
    extra: dict[str, Any] = field(default_factory=dict)
    origin: IdOrigin | None = None
    text_origin: TextOrigin | None = None


def with_suffix(text: str, suffix: str) -> str:
    """The question and the benchmark's answer instruction, one per line (as LLaVA-1.5 asks them)."""
    text = text.strip()
    return f"{text}\n{suffix}" if suffix else text


def options_text(options: list[str]) -> str:
    """``A. first`` / ``B. second`` ..., one option per line."""
    return "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))


# --- reading, with errors that name the file, the record and the field ------------------------------
def read_text(path: str | Path) -> str:
    """A UTF-8 text file's content, or a DataError naming the file (and the line of a byte that is not
    UTF-8: the codec's own error names only a byte offset, and no file)."""
    if not os.path.isfile(path):
        raise DataError.at(path, "file not found")
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise DataError.at(path, f"cannot read the file: {error}") from error
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError.at(path, f"line {line} is not UTF-8 text ({error.reason}: byte {data[error.start]:#04x} at offset {error.start})") from error


def read_json(path: str | Path, object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """A JSON file's content, or a DataError naming the file (``object_pairs_hook``: as ``json.loads``'s)."""
    text = read_text(path)
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as error:
        if is_json_lines(text, error):  # e.g. LLaVA-1.5's llava_gqa_testdev_balanced.jsonl given for GQA's questions
            raise DataError.at(
                path,
                f"{JSON_LINES}, not a JSON file: the benchmark's loader reads the benchmark's official JSON file, one "
                "JSON document (docs/benchmarks.md lists each benchmark's files); LLaVA-1.5's evaluation .jsonl files "
                "hold its prompts, without the benchmark's answers",
            ) from error
        raise DataError.at(path, f"cannot read the JSON file: {error}") from error


def require(
    raw: Any, name: str, types: type | tuple[type, ...], path: str | Path, record_id: Any, index: int
) -> Any:
    """``raw[name]`` if it is there and of one of ``types``, else a DataError naming the field."""
    if not isinstance(raw, dict):
        raise DataError.at(path, f"expected a JSON object, got {type(raw).__name__}", record_id, index, "record")
    if name not in raw or raw[name] is None:
        raise DataError.at(path, "missing", record_id, index, name)
    value = raw[name]
    if not isinstance(value, types) or isinstance(value, bool):
        expected = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise DataError.at(path, f"expected {expected}, got {type(value).__name__}: {value!r:.80}", record_id, index, name)
    return value


def question_kind(value: Any, path: str | Path, record_id: Any, index: int | None, field_name: str) -> str:
    """A group (question kind) read from a benchmark file: ``value`` if it is a non-empty string, the
    default group when it is absent (None or ""), else a DataError naming the field; a group named like a
    column of the test report (``overall``, ``budget``, ...: :data:`~adaptive_mllm.metrics.RESERVED_GROUPS`)
    is a DataError too, as the LLaVA JSON loader's ``question_kind`` (the metric would refuse it mid-test,
    naming no file)."""
    if value is None or value == "":
        return DEFAULT_QUESTION_KIND
    if not isinstance(value, str):
        raise DataError.at(path, f"expected a string, got {type(value).__name__}: {value!r:.80}", record_id, index, field_name)
    if value in RESERVED_GROUPS:
        raise DataError.at(
            path, f"{value!r} is a column of the test report (reserved: {', '.join(RESERVED_GROUPS)}); rename the group",
            record_id, index, field_name,
        )  # fmt: skip
    return value


def inside_image_folder(folder: Path, name: str, path: str | Path, record_id: Any, index: int, field_name: str) -> Path:
    """``folder / name`` with its symlinks resolved, or a DataError naming the record when that leads out
    of ``folder`` (an absolute path, ``..``, a symlink to elsewhere): the LLaVA JSON loader's rule,
    :func:`~adaptive_mllm.data.llava_json.image_inside`, so that a question file cannot make the loader
    read any file the process can read."""
    try:
        return image_inside(folder, name)
    except ValueError as error:  # also a name with a NUL byte
        raise DataError.at(path, str(error), record_id, index, field_name) from error


def existing_image(folder: Path, name: str, path: str | Path, record_id: Any, index: int, field_name: str) -> Path:
    """``folder / name`` (resolved, and inside ``folder``: see :func:`inside_image_folder`), or a
    DataError naming the record whose image path leads out of the folder or whose image file is missing."""
    image = inside_image_folder(folder, name, path, record_id, index, field_name)
    if not os.path.isfile(image):
        raise DataError.at(path, f"image file {image} does not exist", record_id, index, field_name)
    return image


def plain_name(value: str, path: str | Path, record_id: Any, index: int | None, field_name: str) -> str:
    """``value`` if it is one plain file or folder name (no separator, not ``.`` / ``..``), else a
    DataError: for a name read from a file that picks the image folder itself."""
    if value in ("", ".", "..") or any(c in value for c in ("/", os.sep, os.altsep or "/", "\0")):
        raise DataError.at(path, f"expected a plain folder name (no path), got {value!r:.80}", record_id, index, field_name)
    return value


def check_unique_ids(questions: list[BenchmarkQuestion], source: str | Path) -> None:
    """A DataError naming the second of two questions with one id: test answers, predictions, submissions
    and ``adaptive-mllm compare`` are keyed by id, and would keep only one of them."""
    first: dict[str, int] = {}
    for position, question in enumerate(questions):
        earlier = first.setdefault(question.id, position)
        if earlier == position:
            continue
        where = question.origin or IdOrigin(source, question.id, position, "id")
        before = questions[earlier].origin or IdOrigin(source, question.id, earlier, "id")
        other = f"record {before.index}" if Path(before.path) == Path(where.path) else f"{before.path}, record {before.index},"
        held_in = f"the same {where.field}" if where.field is not None else "the same key"
        raise DataError.at(where.path, f"duplicate id: {other} has {held_in}", where.record_id, where.index, where.field)


def check_some_questions(questions: list[BenchmarkQuestion], source: str | Path) -> None:
    """A DataError naming the benchmark's file when it holds no question to evaluate: a test would
    otherwise score nothing and exit as if it had passed (Lightning only warns of an empty dataloader).
    LlavaJsonDataset's own check (``_check_some_left``) speaks of "the JSON list", which a benchmark file
    (a JSON object, a TSV, a folder) is not; loaders that know which file or split came up empty raise
    their own, more precise error first."""
    if not questions:
        raise DataError.at(source, "no questions to evaluate: the benchmark file holds none")


def text_origin(question: BenchmarkQuestion, source: str | Path, position: int) -> TextOrigin:
    """Where ``question``'s text was read (its ``text_origin``; else where its id was, field ``question``)."""
    if question.text_origin is not None:
        return question.text_origin
    if question.origin is not None:
        return TextOrigin(question.origin.path, question.origin.record_id, question.origin.index, "question")
    return TextOrigin(source, question.id, position, "question")


def check_kinds(questions: list[BenchmarkQuestion], source: str | Path) -> None:
    """A DataError naming the first question whose group is a column of the test report (loaders check
    the field they read the group from, with :func:`question_kind`; this is the last line)."""
    for position, question in enumerate(questions):
        if question.kind in RESERVED_GROUPS:
            where = text_origin(question, source, position)
            raise DataError.at(
                where.path, f"group {question.kind!r} is a column of the test report (reserved: {', '.join(RESERVED_GROUPS)})",
                where.record_id, where.index,
            )  # fmt: skip


# --- dataset and collator ---------------------------------------------------------------------------
class BenchmarkDataset(LlavaJsonDataset):
    """A benchmark's questions as LLaVA records: items are encoded by LlavaJsonDataset's code, plus the
    extra fields of each question.

    LlavaJsonDataset's constructor reads a LLaVA JSON file; the benchmark's files are read by its
    datamodule instead, so this constructor sets the same attributes from the parsed questions, and
    refuses two questions with one id, and a benchmark with no question, as LlavaJsonDataset does (every
    loader's questions pass here). An error raised when an item is encoded names the benchmark's own file,
    record and field (each question's ``text_origin``), not LLaVA's ``conversations``.
    """

    def __init__(
        self, source: str | Path, questions: list[BenchmarkQuestion], input_processor: InputProcessor | None = None
    ) -> None:
        check_some_questions(questions, source)
        check_unique_ids(questions, source)
        check_kinds(questions, source)
        self.json_path = Path(source)  # named in every error about an item
        self.image_folder = self.json_path.parent
        self.skip_bad_records = False
        self.require_answer = False
        self.evaluation = True  # references to score against: only the prompt must fit
        self.cut_overlong = False  # a prompt to answer is never cut
        self.input_processor = input_processor
        self.num_skipped_at_load = 0
        self._bad: set[int] = set()
        self.records = [
            LlavaRecord(
                index=index,
                id=question.id,
                image=question.image,
                questions=(f"{IMAGE_PLACEHOLDER}\n{question.text}" if question.image is not None else question.text,),
                answers=(question.answer,) if question.answer.strip() else (),
                question_kind=question.kind,
            )
            for index, question in enumerate(questions)
        ]
        self.extras = [dict(question.extra) for question in questions]
        self.references = [question.answer for question in questions]
        self.text_origins = [text_origin(question, source, position) for position, question in enumerate(questions)]

    def _encode(self, record: LlavaRecord) -> dict[str, Any]:
        try:
            item = super()._encode(record)
        except DataError as error:
            raise self._located(error, record) from error
        item["answer"] = self.references[record.index]  # also for an open record ("" when unknown)
        item.update(self.extras[record.index])
        return item

    def _located(self, error: DataError, record: LlavaRecord) -> DataError:
        """``error`` (raised by LlavaJsonDataset's encoding, which names the LLaVA record) at the benchmark's
        own file, record and field: the image's field for an image that cannot be read, else the question's."""
        origin = self.text_origins[record.index]
        field_name = origin.image_field if error.field == "image" else origin.field
        reason = error.reason if error.reason is not None else str(error)
        return DataError.at(origin.path, reason, origin.record_id, origin.index, field_name)


class BenchmarkCollator(LlavaCollator):
    """LlavaCollator's batch, plus each extra per-record field as a list in batch order, and the benchmark's
    answer length as ``max_new_tokens`` (one number: every rank's batches decode as long)."""

    def __init__(self, pad_token_id: int, extra_fields: tuple[str, ...] = (), max_new_tokens: int | None = None) -> None:
        super().__init__(pad_token_id)
        self.extra_fields = tuple(extra_fields)
        self.max_new_tokens = max_new_tokens

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        batch = super().__call__(items)
        kept = [item for item in items if item is not None]
        for name in self.extra_fields:
            batch[name] = [item[name] for item in kept]
        if self.max_new_tokens is not None:
            batch["max_new_tokens"] = self.max_new_tokens
        return batch


# --- datamodule ---------------------------------------------------------------------------------------
class BenchmarkDataModule(LlavaDataModule):
    """A benchmark's test questions as a LlavaDataModule (test, validate and predict all read them).

    Subclasses read their files in :meth:`read_questions`, name the extra batch fields in
    ``extra_fields`` and build the metric in :meth:`make_metric`.

    Args:
        batch_size: evaluation batch size.
        num_workers: DataLoader worker processes.
        max_new_tokens: the answer's most tokens on this benchmark, in place of the model's ``max_new_tokens``
            (each benchmark's default is the length LLaVA-1.5's script for it generates: :data:`VQA_ANSWER_TOKENS`
            or :data:`CHOICE_ANSWER_TOKENS`); None: the model's.
    """

    extra_fields: tuple[str, ...] = ()

    def __init__(self, batch_size: int = 16, num_workers: int = 0, max_new_tokens: int | None = None) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1):
            raise ValueError(f"{type(self).__name__}: max_new_tokens={max_new_tokens!r} must be a whole number >= 1 (or None: the model's)")
        self.max_new_tokens = max_new_tokens
        self._built: dict[bool, BenchmarkDataset] = {}  # by "with reference answers"

    # --- to implement -----------------------------------------------------------------------------------
    @property
    def source(self) -> Path:
        """The main file (or folder) of the benchmark: named in the errors about its items."""
        raise NotImplementedError

    def read_questions(self, require_answers: bool) -> list[BenchmarkQuestion]:
        """Every question, read and checked (DataError on bad input); ``require_answers`` for scoring."""
        raise NotImplementedError

    def make_metric(self, stage: str = "test") -> Metric:
        """The benchmark's metric, with the groups of :meth:`question_kinds`."""
        raise NotImplementedError

    # --- datasets ---------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Read the benchmark (test, validate: with its answers; predict: answers optional)."""
        if stage not in _STAGE_SPLIT or stage == "fit":
            stage = getattr(stage, "value", stage)  # Lightning passes its TrainerFn enum: named by its value, not its repr
            raise ValueError(f"{type(self).__name__} is an evaluation benchmark: stages test / validate / predict, not {stage!r}")
        split = _STAGE_SPLIT[stage]
        if split not in self.datasets:
            scored = split != "predict"
            if scored not in self._built:
                forget_resolved_directories()
                self._built[scored] = self.build_dataset(require_answers=scored)
            self.datasets[split] = self._built[scored]

    def build_dataset(self, require_answers: bool) -> BenchmarkDataset:
        """The dataset of :meth:`read_questions` (a hook for benchmarks whose images are not files)."""
        return BenchmarkDataset(self.source, self.read_questions(require_answers))

    def _split(self, stage: str) -> str:
        split = _STAGE_SPLIT.get(stage, stage)
        if split not in self.datasets:
            self.setup({"val": "validate"}.get(split, split))
        return split

    def question_kinds(self, split: str = "test") -> list[str]:
        """The groups a score is reported by (e.g. POPE split, MME subtask), sorted; reads the data if needed."""
        return super().question_kinds(self._split(split))

    # --- dataloaders -------------------------------------------------------------------------------------
    def _collator(self, processor: InputProcessor) -> BenchmarkCollator:
        return BenchmarkCollator(processor.pad_token_id, self.extra_fields, self.max_new_tokens)

    def train_dataloader(self) -> DataLoader:
        raise RuntimeError(f"{type(self).__name__} is an evaluation benchmark: it has no training data")

    def val_dataloader(self) -> DataLoader:
        return self._dataloader(self._split("val"), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._dataloader(self._split("test"), self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._dataloader(self._split("predict"), self.eval_batch_size, shuffle=False)
