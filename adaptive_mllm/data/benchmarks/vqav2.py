"""VQAv2 in its official layout: the questions JSON, the annotations JSON and the COCO image folder."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn

from adaptive_mllm.data.benchmarks.base import (
    SHORT_ANSWER,
    VQA_ANSWER_TOKENS,
    BenchmarkDataModule,
    BenchmarkQuestion,
    IdOrigin,
    TextOrigin,
    existing_image,
    plain_name,
    question_kind,
    read_json,
    require,
    with_suffix,
)
from adaptive_mllm.data.llava_json import DataError
from adaptive_mllm.metrics import VQAAccuracy

TEST2015_QUESTIONS = "v2_OpenEnded_mscoco_test2015_questions.json"  # every test question; EvalAI's files cover it
SUBMISSION_FLAG = "--data.init_args.submission_questions_json"


def _records(path: str | Path, key: str, other: str) -> list:
    """The ``key`` list of an official VQA file (a DataError naming the file if it is not one)."""
    content = read_json(path)
    if not isinstance(content, dict) or not isinstance(content.get(key), list):
        found = sorted(content)[:8] if isinstance(content, dict) else type(content).__name__
        hint = f" (this looks like the {other} file)" if isinstance(content, dict) and other in content else ""
        raise DataError.at(path, f"expected an official VQAv2 file: a JSON object with a {key!r} list, found {found}{hint}")
    return content[key]


class VQAv2DataModule(BenchmarkDataModule):
    """VQAv2 (questions + annotations, as released by visualqa.org), scored by :class:`VQAAccuracy`
    with the ``"vqav2"`` rule (LLaVA-1.5's EvalAI answer processing, then vqaEval.py's accuracy) per
    answer type ("yes/no", "number", "other"). The prompt is the question and the instruction, one per
    line, as in LLaVA-1.5's ``llava_vqav2_mscoco_test-dev2015.jsonl``.

    Args:
        questions_json: e.g. ``v2_OpenEnded_mscoco_val2014_questions.json``.
        annotations_json: e.g. ``v2_mscoco_val2014_annotations.json``; needed to test, not to predict
            (test-dev has none: predict and submit the answers to the evaluation server).
        image_folder: the COCO images; None = ``<questions dir>/<data_subtype>`` (``val2014``; test-dev's
            images are in ``test2015``).
        image_prefix: the image file name before the 12-digit image id; None = ``COCO_<subtype>_``.
        prompt_suffix: the instruction after each question.
        submission_questions_json: the questions file whose every question the EvalAI result file of a
            ``predict`` lists ("" where unanswered). None: for test-dev questions (``data_subtype``
            ``test-dev2015``) ``v2_OpenEnded_mscoco_test2015_questions.json`` beside them (EvalAI's test-dev
            phase rejects a file without every test2015 question; without that file no submission is
            written, with a warning), otherwise the questions file itself.
    """

    extra_fields = ("all_answers", "question_id")

    def __init__(
        self,
        questions_json: str,
        annotations_json: str | None = None,
        image_folder: str | None = None,
        image_prefix: str | None = None,
        prompt_suffix: str = SHORT_ANSWER,
        batch_size: int = 16,
        num_workers: int = 0,
        max_new_tokens: int | None = VQA_ANSWER_TOKENS,
        submission_questions_json: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, max_new_tokens=max_new_tokens)
        self.questions_json = questions_json
        self.annotations_json = annotations_json
        self.image_root = image_folder
        self.image_prefix = image_prefix
        self.prompt_suffix = prompt_suffix
        self.submission_questions_json = submission_questions_json
        self._data_subtype: str | None = None

    @property
    def source(self) -> Path:
        return Path(self.questions_json)

    def is_test_dev(self) -> bool:
        """Whether the questions are VQAv2 test-dev's (``data_subtype`` ``test-dev*``, else the file's name)."""
        if self._data_subtype is None:
            content = read_json(self.questions_json)
            subtype = content.get("data_subtype") if isinstance(content, dict) else None
            self._data_subtype = subtype if isinstance(subtype, str) else ""
        if self._data_subtype:
            return self._data_subtype.startswith("test-dev")
        return "test-dev" in Path(self.questions_json).name

    def submission_questions(self) -> str:
        """The questions file the EvalAI result file covers, every question of it (see ``submission_questions_json``);
        it may not exist (:func:`~adaptive_mllm.data.benchmarks.write_submission` then writes none)."""
        if self.submission_questions_json is not None:
            return self.submission_questions_json
        if self.is_test_dev():
            return str(Path(self.questions_json).with_name(TEST2015_QUESTIONS))
        return self.questions_json

    def _annotations(self, require_answers: bool) -> dict[int, tuple[int, dict]]:
        """Each annotation (with its position in the annotations file) by question id."""
        if self.annotations_json is None:
            if require_answers:
                raise ValueError("VQAv2DataModule: scoring needs annotations_json (the official annotations file)")
            return {}
        by_question, first = {}, {}
        for index, raw in enumerate(_records(self.annotations_json, "annotations", "questions")):
            question_id = require(raw, "question_id", int, self.annotations_json, None, index)
            earlier = first.setdefault(question_id, index)
            if earlier != index:  # which of the two would score the question?
                raise DataError.at(
                    self.annotations_json, f"duplicate id: annotation {earlier} has the same question_id", question_id, index, "question_id"
                )
            answers = require(raw, "answers", list, self.annotations_json, question_id, index)
            if not answers or not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
                raise DataError.at(
                    self.annotations_json, "expected a non-empty list of {'answer': str} objects", question_id, index, "answers"
                )
            by_question[question_id] = (index, raw)
        return by_question

    def read_questions(self, require_answers: bool) -> list[BenchmarkQuestion]:
        content = read_json(self.questions_json)
        records = _records(self.questions_json, "questions", "annotations")
        subtype = content.get("data_subtype")
        self._data_subtype = subtype if isinstance(subtype, str) else ""
        if self.image_prefix is None and not isinstance(subtype, str):
            raise DataError.at(self.questions_json, "missing: needed to name the image files (or set image_prefix)", field="data_subtype")
        if isinstance(subtype, str) and (self.image_prefix is None or self.image_root is None):
            plain_name(subtype, self.questions_json, None, None, "data_subtype")  # it names the image folder / files
        image_subtype = "test2015" if isinstance(subtype, str) and subtype.startswith("test") else subtype
        prefix = self.image_prefix if self.image_prefix is not None else f"COCO_{image_subtype}_"
        folder = Path(self.image_root) if self.image_root is not None else Path(self.questions_json).parent / str(image_subtype)
        annotations = self._annotations(require_answers)
        questions = []
        for index, raw in enumerate(records):
            question_id = require(raw, "question_id", int, self.questions_json, None, index)
            image_id = require(raw, "image_id", int, self.questions_json, question_id, index)
            text = require(raw, "question", str, self.questions_json, question_id, index)
            image = existing_image(folder, f"{prefix}{image_id:012d}.jpg", self.questions_json, question_id, index, "image_id")
            annotation_index, annotation = annotations.get(question_id, (None, None))
            if annotation is None and self.annotations_json is not None:
                raise DataError.at(self.annotations_json, "no annotation for this question", question_id, index, "question_id")
            humans = [a["answer"] for a in annotation["answers"]] if annotation else []
            answer = annotation.get("multiple_choice_answer") if annotation else None
            kind = question_kind(
                annotation.get("answer_type") if annotation else None, str(self.annotations_json), question_id, annotation_index, "answer_type"
            )
            questions.append(
                BenchmarkQuestion(
                    id=str(question_id),
                    image=image,
                    text=with_suffix(text, self.prompt_suffix),
                    answer=answer if isinstance(answer, str) else (humans[0] if humans else ""),
                    kind=kind,
                    extra={"all_answers": humans, "question_id": question_id},
                    origin=IdOrigin(self.questions_json, question_id, index, "question_id"),
                    text_origin=TextOrigin(self.questions_json, question_id, index, "question", "image_id"),
                )
            )
        if not require_answers and not Path(self.submission_questions()).is_file():
            rank_zero_warn(
                f"VQAv2DataModule: {self.submission_questions()} not found: predict writes the answers but no EvalAI "
                f"submission file (EvalAI's test-dev phase rejects one without every question of {TEST2015_QUESTIONS}); "
                f"put it there or pass {SUBMISSION_FLAG}=PATH"
            )
        return questions

    def make_metric(self, stage: str = "test") -> VQAAccuracy:
        return VQAAccuracy(self.question_kinds(stage), rule="vqav2")
