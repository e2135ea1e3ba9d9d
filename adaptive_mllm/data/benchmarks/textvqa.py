"""TextVQA 0.5.1 (validation) in its official layout: ``TextVQA_0.5.1_val.json`` + ``train_images/``,
with OCR tokens in the prompt as LLaVA-1.5 asks it."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

from adaptive_mllm.data.benchmarks.base import (
    SHORT_ANSWER,
    VQA_ANSWER_TOKENS,
    BenchmarkDataModule,
    BenchmarkQuestion,
    IdOrigin,
    TextOrigin,
    existing_image,
    read_json,
    require,
)
from adaptive_mllm.data.llava_json import DataError
from adaptive_mllm.metrics import VQAAccuracy

HUMAN_ANSWERS = 10  # m4c_evaluator.py (LLaVA's eval_textvqa.py) scores against exactly ten
ANSWERS_BY = ("image_and_question", "question_id")


def most_common(humans: list[str]) -> str:
    """The reference for the loss and the plain exact match: the most common human answer (ties: the alphabetically first)."""
    common = Counter(humans).most_common()
    return min((a for a, n in common if n == common[0][1]), default="") if common else ""


def _data(path: str | Path, what: str) -> list:
    content = read_json(path)
    if not isinstance(content, dict) or not isinstance(content.get("data"), list):
        found = sorted(content)[:8] if isinstance(content, dict) else type(content).__name__
        raise DataError.at(path, f"expected the {what}: a JSON object with a 'data' list, found {found}")
    return content["data"]


class TextVQADataModule(BenchmarkDataModule):
    """TextVQA, scored by :class:`VQAAccuracy` with the ``"textvqa"`` rule (m4c_evaluator.py's
    accuracy, as LLaVA-1.5's eval_textvqa.py: ten human answers per question).

    The prompt is the question with its first letter capitalised, ``Reference OCR token: tok1, tok2,
    ...`` and the instruction, one per line (an image without tokens keeps the line, empty), as in LLaVA-1.5's
    ``llava_textvqa_val_v051_ocr.jsonl`` ("What is the brand of this camera?\nReference OCR token:
    DAKOTA, DIGITAL, ...").

    Args:
        questions_json: ``TextVQA_0.5.1_val.json`` (``{"data": [{"question", "image_id", "question_id",
            "answers": [10 strings], ...}]}``).
        image_folder: the images (``<image_id>.jpg``); None = ``<questions dir>/train_images`` (the
            validation images are in the training folder).
        ocr_json: the Rosetta OCR file, ``TextVQA_Rosetta_OCR_v0.2_val.json`` (``{"data": [{"image_id",
            "ocr_tokens"}]}``); None = each record's own ``ocr_tokens`` field.
        use_ocr: False leaves the OCR line out.
        prompt_suffix: the instruction after each question.
        answers_by: which human answers score a question. ``"image_and_question"``: LLaVA-1.5's eval_textvqa.py,
            which looks them up by (image, lower-cased question), so questions asked twice about one image are all
            scored against the last one's answers; ``"question_id"``: each question against its own.
    """

    extra_fields = ("all_answers", "question_id")

    def __init__(
        self,
        questions_json: str,
        image_folder: str | None = None,
        ocr_json: str | None = None,
        use_ocr: bool = True,
        prompt_suffix: str = SHORT_ANSWER,
        batch_size: int = 16,
        num_workers: int = 0,
        max_new_tokens: int | None = VQA_ANSWER_TOKENS,
        answers_by: str = "image_and_question",
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, max_new_tokens=max_new_tokens)
        if answers_by not in ANSWERS_BY:
            raise ValueError(f"TextVQADataModule: answers_by={answers_by!r} must be one of {', '.join(map(repr, ANSWERS_BY))}")
        self.answers_by = answers_by
        self.questions_json = questions_json
        self.image_root = image_folder
        self.ocr_json = ocr_json
        self.use_ocr = use_ocr
        self.prompt_suffix = prompt_suffix

    @property
    def source(self) -> Path:
        return Path(self.questions_json)

    def _ocr_tokens(self) -> dict[str, list[str]] | None:
        if self.ocr_json is None or not self.use_ocr:
            return None
        tokens = {}
        for index, raw in enumerate(_data(self.ocr_json, "Rosetta OCR file")):
            image_id = require(raw, "image_id", str, self.ocr_json, None, index)
            tokens[image_id] = require(raw, "ocr_tokens", list, self.ocr_json, image_id, index)
        return tokens

    def read_questions(self, require_answers: bool) -> list[BenchmarkQuestion]:
        path = self.questions_json
        records = _data(path, "TextVQA questions file")
        folder = Path(self.image_root) if self.image_root is not None else Path(path).parent / "train_images"
        ocr = self._ocr_tokens()
        questions = []
        keys = []  # (image, lower-cased question) per question: eval_textvqa.py's lookup
        for index, raw in enumerate(records):
            question_id = require(raw, "question_id", (int, str), path, None, index)
            text = require(raw, "question", str, path, question_id, index)
            image_id = require(raw, "image_id", str, path, question_id, index)
            humans: list = []
            if require_answers or raw.get("answers") is not None:
                humans = require(raw, "answers", list, path, question_id, index)
                if not all(isinstance(a, str) for a in humans):
                    raise DataError.at(path, "expected a list of strings", question_id, index, "answers")
                # checked here, not by the metric mid-test, where the error could not say which record
                if require_answers and len(humans) != HUMAN_ANSWERS:
                    raise DataError.at(
                        path, f"expected {HUMAN_ANSWERS} human answers (TextVQA's evaluator scores against ten), got {len(humans)}",
                        question_id, index, "answers",
                    )  # fmt: skip
            keys.append((image_id, text.lower()))
            text = text.strip()
            text = text[:1].upper() + text[1:]  # the annotation's lower-case question, capitalised as LLaVA asks it
            if self.use_ocr:
                if ocr is None:
                    if raw.get("ocr_tokens") is None:
                        raise DataError.at(
                            path, "missing: TextVQA's own 0.5.1 files hold no OCR tokens; give ocr_json the Rosetta file "
                            "(TextVQA_Rosetta_OCR_v0.2_val.json, as LLaVA-1.5's question file was made), or use_ocr: false",
                            question_id, index, "ocr_tokens",
                        )  # fmt: skip
                    tokens = require(raw, "ocr_tokens", list, path, question_id, index)
                elif image_id in ocr:
                    tokens = ocr[image_id]
                else:
                    raise DataError.at(self.ocr_json, f"no OCR tokens for image {image_id!r}", question_id, index, "image_id")
                # an image without tokens keeps the line, empty, as LLaVA-1.5's question file has it
                text = f"{text}\nReference OCR token: {', '.join(str(t) for t in tokens)}"
            questions.append(
                BenchmarkQuestion(
                    id=str(question_id),
                    image=existing_image(folder, f"{image_id}.jpg", path, question_id, index, "image_id"),
                    text=f"{text}\n{self.prompt_suffix}" if self.prompt_suffix else text,  # an empty OCR line keeps its space
                    answer="",
                    extra={"all_answers": list(humans), "question_id": question_id},
                    origin=IdOrigin(path, question_id, index, "question_id"),
                    text_origin=TextOrigin(path, question_id, index, "question", "image_id"),
                )
            )
        if self.answers_by == "image_and_question":
            last = {key: question.extra["all_answers"] for key, question in zip(keys, questions, strict=True)}  # later ones win
            questions = [replace(q, extra={**q.extra, "all_answers": list(last[key])}) for key, q in zip(keys, questions, strict=True)]
        return [replace(question, answer=most_common(question.extra["all_answers"])) for question in questions]

    def make_metric(self, stage: str = "test") -> VQAAccuracy:
        return VQAAccuracy(self.question_kinds(stage), rule="textvqa")
