"""ScienceQA (the IMG subset of its test split) in its official layout: ``problems.json``,
``pid_splits.json`` and ``images/<split>/<pid>/image.png``."""

from __future__ import annotations

import os
from pathlib import Path

from adaptive_mllm.data.benchmarks.base import (
    CHOICE_ANSWER_TOKENS,
    LETTERS,
    OPTION_LETTER,
    BenchmarkDataModule,
    BenchmarkQuestion,
    IdOrigin,
    TextOrigin,
    existing_image,
    inside_image_folder,
    options_text,
    question_kind,
    read_json,
    require,
    with_suffix,
)
from adaptive_mllm.data.llava_json import DataError
from adaptive_mllm.metrics import MultipleChoiceAccuracy


class ScienceQADataModule(BenchmarkDataModule):
    """ScienceQA-IMG, scored by :class:`MultipleChoiceAccuracy` with the ``"scienceqa"`` rule (the letter
    parsing of LLaVA-1.5's eval_science_qa.py; an answer it cannot parse is wrong) per subject.

    The prompt is ``Context: <hint>`` (when there is one), the question, the options as ``A. ...`` lines
    and the instruction, as in LLaVA-1.5's ``llava_test_CQM-A.json`` with ``--single-pred-prompt``; the
    reference is the correct option's letter.

    Args:
        problems_json: ``problems.json`` (``{pid: {"question", "choices", "answer": index, "hint",
            "image", "subject", ...}}``).
        pid_splits_json: ``pid_splits.json`` (``{"test": [pid, ...], ...}``); None = beside problems.json.
        split: which split of pid_splits.json.
        image_folder: None = ``<problems dir>/images/<split>`` (holding ``<pid>/image.png``).
        images_only: True keeps the problems with an image (ScienceQA-IMG, as LLaVA-1.5 reports).
        prompt_suffix: the instruction after the options.
    """

    extra_fields = ("num_choices",)

    def __init__(
        self,
        problems_json: str,
        pid_splits_json: str | None = None,
        split: str = "test",
        image_folder: str | None = None,
        images_only: bool = True,
        prompt_suffix: str = OPTION_LETTER,
        batch_size: int = 16,
        num_workers: int = 0,
        max_new_tokens: int | None = CHOICE_ANSWER_TOKENS,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, max_new_tokens=max_new_tokens)
        self.problems_json = problems_json
        self.pid_splits_json = pid_splits_json or str(Path(problems_json).parent / "pid_splits.json")
        self.split = split
        self.image_root = image_folder
        self.images_only = images_only
        self.prompt_suffix = prompt_suffix

    @property
    def source(self) -> Path:
        return Path(self.problems_json)

    def read_questions(self, require_answers: bool) -> list[BenchmarkQuestion]:
        path = self.problems_json
        problems = read_json(path)
        if not isinstance(problems, dict):
            raise DataError.at(path, f"expected ScienceQA's problems file, a JSON object {{pid: problem}}, got {type(problems).__name__}")
        splits = read_json(self.pid_splits_json)
        if not isinstance(splits, dict) or not isinstance(splits.get(self.split), list):
            found = sorted(splits) if isinstance(splits, dict) else type(splits).__name__
            raise DataError.at(self.pid_splits_json, f"expected a JSON object with a {self.split!r} list of pids, found {found}", field=self.split)
        folder = Path(self.image_root) if self.image_root is not None else Path(path).parent / "images" / self.split
        position = {pid: place for place, pid in enumerate(problems)}  # a problem's record in problems.json
        questions = []
        for index, pid in enumerate(splits[self.split]):
            pid = str(pid)
            if pid not in problems:
                raise DataError.at(self.pid_splits_json, f"pid {pid!r} is not in {path}", pid, index, self.split)
            raw, at = problems[pid], position[pid]
            # every problem of the split is checked: only a well-formed one without an image is left out of
            # SQA-IMG (the reference's rule), never one whose fields cannot be read
            if not isinstance(raw, dict):
                raise DataError.at(path, f"expected a JSON object, got {type(raw).__name__}: {raw!r:.80}", pid, at, "record")
            text = require(raw, "question", str, path, pid, at)
            choices = require(raw, "choices", list, path, pid, at)
            if not 2 <= len(choices) <= len(LETTERS) or not all(isinstance(c, str) for c in choices):
                raise DataError.at(path, f"expected 2 to {len(LETTERS)} option strings, got {choices!r:.80}", pid, at, "choices")
            answer = ""
            if require_answers or raw.get("answer") is not None:
                choice = require(raw, "answer", int, path, pid, at)
                if not 0 <= choice < len(choices):
                    raise DataError.at(path, f"option index {choice} out of range for {len(choices)} choices", pid, at, "answer")
                answer = LETTERS[choice]
            hint = raw.get("hint")
            if hint is not None and not isinstance(hint, str):
                raise DataError.at(path, f"expected a string, got {type(hint).__name__}: {hint!r:.80}", pid, at, "hint")
            image_name = raw.get("image")
            if image_name is not None and (not isinstance(image_name, str) or not image_name):
                raise DataError.at(path, f"expected a file name or null, got {image_name!r:.80}", pid, at, "image")
            kind = question_kind(raw.get("subject"), path, pid, at, "subject")
            if self.images_only and image_name is None:
                continue
            context = f"Context: {hint.strip()}\n" if hint is not None and hint.strip() else ""
            image = None
            if image_name is not None:
                # both the pid (the image's folder) and the name come from the files: each must stay inside
                inside_image_folder(folder, pid, self.pid_splits_json, pid, index, self.split)
                image = existing_image(folder, os.path.join(pid, image_name), path, pid, at, "image")
            questions.append(
                BenchmarkQuestion(
                    id=pid,
                    image=image,
                    text=with_suffix(f"{context}{text.strip()}\n{options_text(choices)}", self.prompt_suffix),
                    answer=answer,
                    kind=kind,
                    extra={"num_choices": len(choices)},
                    origin=IdOrigin(self.pid_splits_json, pid, index, self.split),
                    text_origin=TextOrigin(path, pid, at, "question"),
                )
            )
        if not questions:  # SQA-I would score nothing; torch's empty-loader warning names no file
            listed = len(splits[self.split])
            why = f"none of the split's {listed} problems has an image (images_only keeps those)" if listed else "the split lists no problem"
            raise DataError.at(self.pid_splits_json, f"no questions to evaluate: {why}", field=self.split)
        return questions

    def make_metric(self, stage: str = "test") -> MultipleChoiceAccuracy:
        return MultipleChoiceAccuracy(self.question_kinds(stage), rule="scienceqa")
