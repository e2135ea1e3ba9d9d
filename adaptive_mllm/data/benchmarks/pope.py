"""POPE in its released layout: one JSON-lines file per split (``coco_pope_adversarial.json``,
``coco_pope_popular.json``, ``coco_pope_random.json``) over the COCO val2014 images."""

from __future__ import annotations

import io
import json
import string
from pathlib import Path

from adaptive_mllm.data.benchmarks.base import (
    SHORT_ANSWER,
    VQA_ANSWER_TOKENS,
    BenchmarkDataModule,
    BenchmarkQuestion,
    IdOrigin,
    TextOrigin,
    existing_image,
    read_text,
    require,
    with_suffix,
)
from adaptive_mllm.data.llava_json import DataError
from adaptive_mllm.metrics import POPE_SPLITS, RESERVED_GROUPS, POPEMetrics


def check_file_pattern(file_pattern: str) -> str:
    """``file_pattern`` if ``{split}`` is its one placeholder, else a ValueError naming the option: without
    ``{split}`` every split would read the same file (its questions counted once per split); another
    placeholder has no value."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(file_pattern) if name is not None]
    except ValueError as error:  # an unmatched brace
        raise ValueError(f"file_pattern {file_pattern!r}: {error}; expected a file name with {{split}}") from error
    others = sorted({name for name in names if name != "split"})
    if others:
        shown = ", ".join(f"{{{name}}}" for name in others)
        raise ValueError(f"file_pattern {file_pattern!r}: unknown placeholder {shown}; the only one is {{split}}, the split's name")
    if "split" not in names:
        raise ValueError(
            f"file_pattern {file_pattern!r} has no {{split}}: every split would read the same file; "
            "use e.g. 'coco_pope_{split}.json', and splits to pick the splits"
        )
    return file_pattern


class POPEDataModule(BenchmarkDataModule):
    """POPE, scored by :class:`POPEMetrics` per split (its headline: the mean F1 over the splits).

    Each line of a split file is ``{"question_id", "image", "text", "label": "yes" | "no"}``.

    Args:
        question_folder: the folder of the split files.
        image_folder: COCO ``val2014``.
        splits: which splits to read.
        file_pattern: a split's file name, ``{split}`` (its one placeholder, required) replaced.
        prompt_suffix: the instruction after each question.
    """

    def __init__(
        self,
        question_folder: str,
        image_folder: str,
        splits: list[str] | None = None,
        file_pattern: str = "coco_pope_{split}.json",
        prompt_suffix: str = SHORT_ANSWER,
        batch_size: int = 16,
        num_workers: int = 0,
        max_new_tokens: int | None = VQA_ANSWER_TOKENS,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, max_new_tokens=max_new_tokens)
        self.question_folder = question_folder
        self.image_root = image_folder
        self.splits = list(POPE_SPLITS) if splits is None else list(splits)
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits must be distinct split names, got {self.splits}")
        reserved = [split for split in self.splits if split in RESERVED_GROUPS]
        if reserved:  # a split is the group its scores are reported by
            raise ValueError(f"splits {reserved} are columns of the test report (reserved: {', '.join(RESERVED_GROUPS)})")
        self.file_pattern = check_file_pattern(file_pattern)
        self.prompt_suffix = prompt_suffix

    @property
    def source(self) -> Path:
        return Path(self.question_folder)

    def _lines(self, path: Path) -> list[tuple[int, dict]]:
        records = []
        text = read_text(path)
        # the lines as open() splits them (universal newlines), of text read_text has checked is UTF-8
        for index, line in enumerate(io.StringIO(text, newline=None)):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError.at(path, f"line {index + 1} is not JSON ({error}); POPE files hold one JSON object per line", None, index, "line") from error
            if not isinstance(raw, dict):
                raise DataError.at(path, f"expected one JSON object per line, got {type(raw).__name__}", None, index, "line")
            records.append((index, raw))
        if not records:  # the split's scores would silently be missing from the mean F1
            what = "0 bytes" if not text else "only blank lines"
            raise DataError.at(path, f"no questions ({what}); every split file holds one JSON object per line")
        return records

    def read_questions(self, require_answers: bool) -> list[BenchmarkQuestion]:
        folder = Path(self.image_root)
        questions = []
        for split in self.splits:
            path = Path(self.question_folder) / self.file_pattern.format(split=split)
            for index, raw in self._lines(path):
                question_id = require(raw, "question_id", (int, str), path, None, index)
                text = require(raw, "text", str, path, question_id, index)
                image = require(raw, "image", str, path, question_id, index)
                label = ""
                if require_answers or "label" in raw:
                    label = require(raw, "label", str, path, question_id, index).strip().lower()
                    if label not in ("yes", "no"):
                        raise DataError.at(path, f"expected 'yes' or 'no', got {label!r}", question_id, index, "label")
                questions.append(
                    BenchmarkQuestion(
                        id=f"{split}-{question_id}",  # question ids restart in every split
                        image=existing_image(folder, image, path, question_id, index, "image"),
                        text=with_suffix(text, self.prompt_suffix),
                        answer=label,
                        kind=split,
                        origin=IdOrigin(path, question_id, index, "question_id"),
                        text_origin=TextOrigin(path, question_id, index, "text"),
                    )
                )
        return questions

    def make_metric(self, stage: str = "test") -> POPEMetrics:
        return POPEMetrics(self.question_kinds(stage))
