"""GQA test-dev (balanced) in its official layout: ``testdev_balanced_questions.json`` + ``images/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adaptive_mllm.data.benchmarks.base import (
    SHORT_ANSWER,
    VQA_ANSWER_TOKENS,
    BenchmarkDataModule,
    BenchmarkQuestion,
    IdOrigin,
    TextOrigin,
    existing_image,
    question_kind,
    read_json,
    require,
    with_suffix,
)
from adaptive_mllm.data.llava_json import DataError
from adaptive_mllm.metrics import GQAAccuracy


def _content_and_keys(path: str | Path) -> tuple[Any, list[str]]:
    """The JSON file's content and its outermost object's keys in file order, repeats kept: GQA's question
    ids are those keys, and json keeps only the last of two equal keys (a question would be lost unseen)."""
    outermost: list[list[tuple[str, Any]]] = [[]]

    def keep_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        outermost[0] = pairs  # objects are built inside out: the outermost one is the last
        return dict(pairs)

    content = read_json(path, object_pairs_hook=keep_pairs)
    return content, [key for key, _ in outermost[0]]


class GQADataModule(BenchmarkDataModule):
    """GQA, scored as LLaVA-1.5's convert_gqa_for_eval.py + GQA's eval.py do (:class:`GQAAccuracy`:
    exact match after trailing periods are stripped and the text lower-cased) per structural type
    (verify, query, choose, logical, compare). The prompt is the question and the instruction, one per
    line, as in LLaVA-1.5's ``llava_gqa_testdev_balanced.jsonl``.

    Args:
        questions_json: ``testdev_balanced_questions.json``: ``{question id: {"question", "imageId",
            "answer", "types": {"structural": ...}, ...}}``.
        image_folder: the GQA images (``<imageId>.jpg``); None = ``<questions dir>/images``.
        prompt_suffix: the instruction after each question.
    """

    def __init__(
        self,
        questions_json: str,
        image_folder: str | None = None,
        prompt_suffix: str = SHORT_ANSWER,
        batch_size: int = 16,
        num_workers: int = 0,
        max_new_tokens: int | None = VQA_ANSWER_TOKENS,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, max_new_tokens=max_new_tokens)
        self.questions_json = questions_json
        self.image_root = image_folder
        self.prompt_suffix = prompt_suffix

    @property
    def source(self) -> Path:
        return Path(self.questions_json)

    def read_questions(self, require_answers: bool) -> list[BenchmarkQuestion]:
        path = self.questions_json
        content, keys = _content_and_keys(path)
        if not isinstance(content, dict) or any(isinstance(content.get(k), list) for k in ("questions", "annotations")):
            found = sorted(content)[:8] if isinstance(content, dict) else type(content).__name__
            raise DataError.at(
                path,
                f"expected GQA's questions file, a JSON object {{question id: {{'question', 'imageId', 'answer', ...}}}}, "
                f"found {found} (a VQA-style file?)",
            )
        first: dict[str, int] = {}
        for index, question_id in enumerate(keys):
            earlier = first.setdefault(question_id, index)
            if earlier != index:
                raise DataError.at(path, f"duplicate id: record {earlier} has the same key", question_id, index)
        folder = Path(self.image_root) if self.image_root is not None else Path(path).parent / "images"
        questions = []
        for index, (question_id, raw) in enumerate(content.items()):
            text = require(raw, "question", str, path, question_id, index)
            image_id = require(raw, "imageId", str, path, question_id, index)
            answer = ""
            if require_answers or raw.get("answer") is not None:
                answer = require(raw, "answer", str, path, question_id, index)
                if require_answers and not answer.strip():  # scored against "", every answer would be wrong
                    raise DataError.at(path, "expected a non-empty answer", question_id, index, "answer")
            types = raw.get("types")
            if types is not None and not isinstance(types, dict):
                raise DataError.at(path, f"expected a JSON object, got {type(types).__name__}: {types!r:.80}", question_id, index, "types")
            kind = question_kind((types or {}).get("structural"), path, question_id, index, "types.structural")
            questions.append(
                BenchmarkQuestion(
                    id=str(question_id),
                    image=existing_image(folder, f"{image_id}.jpg", path, question_id, index, "imageId"),
                    text=with_suffix(text, self.prompt_suffix),
                    answer=answer,
                    kind=kind,
                    origin=IdOrigin(path, question_id, index, None),
                    text_origin=TextOrigin(path, question_id, index, "question", "imageId"),
                )
            )
        return questions

    def make_metric(self, stage: str = "test") -> GQAAccuracy:
        return GQAAccuracy(self.question_kinds(stage))
