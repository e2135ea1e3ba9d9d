"""MMBench in its released form: one TSV (e.g. ``mmbench_dev_20230712.tsv``) with base64 images, scored
with circular evaluation."""

from __future__ import annotations

import base64
import csv
import io
import os
import sys
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image

from adaptive_mllm.data.benchmarks.base import (
    CHOICE_ANSWER_TOKENS,
    LETTERS,
    OPTION_LETTER,
    BenchmarkDataModule,
    BenchmarkDataset,
    BenchmarkQuestion,
    IdOrigin,
    TextOrigin,
    options_text,
    question_kind,
)
from adaptive_mllm.data.llava_json import DataError, LlavaRecord
from adaptive_mllm.metrics import MultipleChoiceAccuracy

CIRCULAR_OFFSET = 1_000_000  # a TSV that holds the shifted copies numbers them index + k * 1e6
# LLaVA's model_vqa_mmbench.py reads the TSV with pd.read_table, whose default missing-value strings
# (case-sensitive, whole cell, no stripping) become NaN, and its is_none also drops any case of "nan" / "none":
# an option or hint written "N/A" or "NULL" is absent, one written " N/A " is not
_PANDAS_MISSING = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
                   "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}  # fmt: skip
# the columns MMBench's releases have (not CCBench, which has no hint) and LLaVA-1.5's model_vqa_mmbench.py reads (``answer`` is not in the test
# split; options past B, C and D, may be absent); a misspelled ``hint`` would silently drop every hint from the
# prompts, a misspelled ``category`` put every question in one group
REQUIRED_COLUMNS = ("index", "question", "hint", "A", "B", "category", "image")


def _joined(text: str, suffix: str) -> str:
    return f"{text}\n{suffix}" if suffix else text


def _present(value: str | None) -> bool:
    if value is None:
        return False
    return value not in _PANDAS_MISSING and value.lower() not in ("nan", "none")


def read_mmbench_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of an MMBench TSV as strings by column, or a DataError naming the file."""
    if not os.path.isfile(path):
        raise DataError.at(path, "file not found")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are far longer than csv's default
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            rows = list(reader)
            columns = set(reader.fieldnames or ())
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError.at(path, f"cannot read the TSV file: {error}") from error
    missing = [column for column in REQUIRED_COLUMNS if column not in columns]
    if missing:
        raise DataError.at(path, f"not an MMBench TSV: columns {missing} missing (found {sorted(columns)[:12]})", field=missing[0])
    return rows


class MMBenchDataset(BenchmarkDataset):
    """Decodes each record's image from the TSV's base64 text when the item is loaded."""

    def __init__(self, source: str | Path, questions: list[BenchmarkQuestion], images: list[str]) -> None:
        super().__init__(source, questions)
        self.images = images  # base64 per record (records of one row share the string)

    def _open_image(self, record: LlavaRecord) -> Image.Image:
        return Image.open(io.BytesIO(base64.b64decode(self.images[record.index], validate=True)))


class MMBenchDataModule(BenchmarkDataModule):
    """MMBench, scored by :class:`MultipleChoiceAccuracy` with the ``"mmbench"`` rule (MMBench's answer
    matching without an LLM judge: an option letter, else an option's text) and circular evaluation,
    per category.

    Columns used: ``index``, ``question``, ``hint``, ``A``..``D`` (absent options empty), ``answer``,
    ``category``, ``image`` (base64; a short number refers to the row of that index, as some releases
    de-duplicate images); all but ``answer`` (not in the test split) and ``C`` / ``D`` must be columns of
    the TSV, as in MMBench's releases (a cell may be empty; LLaVA's script reads ``hint`` too). The prompt is the hint (when there is
    one), the question, the options as ``A. ...`` lines and the instruction, as LLaVA-1.5's
    model_vqa_mmbench.py with ``--single-pred-prompt`` builds it. With ``circular``, every question is asked once per rotation
    of its options (as LLaVA-1.5's ``--all-rounds``) and is right only if every rotation is; a TSV that
    already holds the rotations (indices ``>= 1e6``) is grouped by ``index % 1e6`` instead. Without
    ``circular``, only the original rows (index ``< 1e6``) are asked and scored.

    Args:
        tsv: the MMBench TSV.
        circular: circular evaluation (False: each row once, plain accuracy).
        prompt_suffix: the instruction after the options.
    """

    extra_fields = ("num_choices", "question_group", "circular_shift", "options")

    def __init__(
        self,
        tsv: str,
        circular: bool = True,
        prompt_suffix: str = OPTION_LETTER,
        batch_size: int = 16,
        num_workers: int = 0,
        max_new_tokens: int | None = CHOICE_ANSWER_TOKENS,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, max_new_tokens=max_new_tokens)
        self.tsv = tsv
        self.circular = circular
        self.prompt_suffix = prompt_suffix

    @property
    def source(self) -> Path:
        return Path(self.tsv)

    def _read(self, require_answers: bool) -> tuple[list[BenchmarkQuestion], list[str]]:
        """The questions (one per rotation) and the base64 image of each."""
        path = self.tsv
        rows = read_mmbench_rows(path)
        indices = []
        for position, row in enumerate(rows):
            try:
                indices.append(int(row["index"]))
            except (TypeError, ValueError) as error:
                raise DataError.at(path, f"expected an integer, got {row['index']!r}", None, position, "index") from error
        by_index = dict(zip(indices, rows, strict=True))
        pre_expanded = any(index >= CIRCULAR_OFFSET for index in indices)
        questions, images, unreachable = [], [], []
        for position, (index, row) in enumerate(zip(indices, rows, strict=True)):
            if pre_expanded and not self.circular and index >= CIRCULAR_OFFSET:
                continue  # a rotated copy: vanilla evaluation scores the original rows only
            options = []
            for letter in LETTERS:
                if not _present(row.get(letter)):
                    break
                options.append(row[letter])  # as read, as LLaVA asks and MMBench matches them
            if len(options) < 2:
                raise DataError.at(path, "expected at least options A and B", index, position, "B")
            answer = (row.get("answer") or "").strip().upper()
            if answer or require_answers:
                if len(answer) != 1 or answer not in LETTERS:
                    raise DataError.at(path, f"expected one of {list(LETTERS[: len(options)])}, got {answer!r}", index, position, "answer")
                if answer not in LETTERS[: len(options)]:
                    # an option cell read as missing ("None", "N/A") ends the options before the answer: LLaVA asks
                    # the shorter question and MMBench scores it wrong; so do we
                    unreachable.append(f"{index} ({answer})")
            image = (row.get("image") or "").strip()
            if len(image) <= 64 and image.isdigit() and int(image) in by_index:  # a reference to another row's image
                image = by_index[int(image)]["image"].strip()
            if not image:
                raise DataError.at(path, "missing (expected a base64 image)", index, position, "image")
            hint = f"{row['hint']}\n" if _present(row.get("hint")) else ""
            category = question_kind((row.get("category") or "").strip(), path, index, position, "category")
            group = str(index % CIRCULAR_OFFSET if pre_expanded else index)
            rounds = len(options) if self.circular and not pre_expanded else 1
            for shift in range(rounds):
                shifted = options[shift:] + options[:shift]
                reachable = answer and answer in LETTERS[: len(options)]
                letter = LETTERS[(LETTERS.index(answer) - shift) % len(options)] if reachable else answer
                questions.append(
                    BenchmarkQuestion(
                        id=f"{index}" if rounds == 1 else f"{index}-{shift}",
                        image=Path(f"{path}#index={index}"),  # named in errors; the pixels come from `images`
                        # the cells as read, unstripped, as model_vqa_mmbench.py joins them
                        text=_joined(f"{hint}{row['question']}\n{options_text(shifted)}", self.prompt_suffix),
                        answer=letter,
                        kind=category,
                        extra={
                            "num_choices": len(options),
                            "question_group": group,
                            "circular_shift": index // CIRCULAR_OFFSET if pre_expanded else shift,
                            "options": shifted,
                        },
                        # a repeated index repeats the ids; a rotation's own ids ("<index>-<shift>" here,
                        # index + k * 1e6 in a TSV that holds them) are distinct
                        origin=IdOrigin(path, index, position, "index"),
                        text_origin=TextOrigin(path, index, position, "question"),
                    )
                )
                images.append(image)
        if unreachable:
            rank_zero_warn(
                f"{path}: {len(unreachable)} records' answer lies past their options (an option cell read as missing "
                f"ends them, as pandas reads it for LLaVA); they are asked with the options before it and score wrong: "
                f"index {', '.join(unreachable[:5])}{' ...' if len(unreachable) > 5 else ''}"
            )
        return questions, images

    def read_questions(self, require_answers: bool) -> list[BenchmarkQuestion]:
        return self._read(require_answers)[0]

    def build_dataset(self, require_answers: bool) -> MMBenchDataset:
        questions, images = self._read(require_answers)
        return MMBenchDataset(self.source, questions, images)

    def make_metric(self, stage: str = "test") -> MultipleChoiceAccuracy:
        return MultipleChoiceAccuracy(self.question_kinds(stage), rule="mmbench", circular=self.circular)
