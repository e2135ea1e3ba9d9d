"""MME in its released layout (``MME_Benchmark_release_version/``): one folder per subtask, holding the
images and, per image, a text file of its two questions with their Yes / No answers."""

from __future__ import annotations

import io
import os
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn

from adaptive_mllm.data.benchmarks.base import (
    SHORT_ANSWER,
    VQA_ANSWER_TOKENS,
    BenchmarkDataModule,
    BenchmarkQuestion,
    TextOrigin,
    inside_image_folder,
    read_text,
    with_suffix,
)
from adaptive_mllm.data.llava_json import DataError
from adaptive_mllm.metrics import MME_SUBTASKS, MMEScore
from adaptive_mllm.metrics.mme import MME_COGNITION, MME_PERCEPTION

QA_FOLDER = "questions_answers_YN"
MME_INSTRUCTION = "Please answer yes or no."  # ends every MME question; LLaVA-1.5 asks without it  # subtasks with their own images/ folder keep the text files here
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


class MMEDataModule(BenchmarkDataModule):
    """MME, scored by :class:`MMEScore` (per subtask acc + acc+, perception and cognition totals).

    Two folder shapes occur in the release: ``<subtask>/images/<name>.jpg`` with
    ``<subtask>/questions_answers_YN/<name>.txt`` (artwork, celebrity, landmark, posters, scene), and
    ``<subtask>/<name>.jpg`` beside ``<subtask>/<name>.txt`` (the others). Each text line is
    ``question<TAB>Yes|No``.

    The prompt is the question without MME's own " Please answer yes or no." and then the instruction,
    one per line, as in LLaVA-1.5's ``llava_mme.jsonl`` (its convert_answer_to_mme.py adds MME's
    sentence back to find the answer). With an empty ``prompt_suffix`` the question is asked as MME
    wrote it.

    Args:
        root: the release folder.
        subtasks: which subtasks; None = every official subtask whose folder is there.
        prompt_suffix: the instruction after each question, in place of MME's own.
    """

    extra_fields = ("image_id",)

    def __init__(
        self,
        root: str,
        subtasks: list[str] | None = None,
        prompt_suffix: str = SHORT_ANSWER,
        batch_size: int = 16,
        num_workers: int = 0,
        max_new_tokens: int | None = VQA_ANSWER_TOKENS,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, max_new_tokens=max_new_tokens)
        self.root = root
        unknown = sorted(set(subtasks or ()) - set(MME_SUBTASKS))
        if unknown:
            raise ValueError(f"unknown MME subtasks {unknown}; the official ones are {list(MME_SUBTASKS)}")
        if subtasks is not None and len(set(subtasks)) != len(subtasks):  # a subtask read twice: its ids twice
            raise ValueError(f"subtasks must be distinct subtask names, got {subtasks}")
        self.subtasks = subtasks
        self.prompt_suffix = prompt_suffix

    @property
    def source(self) -> Path:
        return Path(self.root)

    def _subtasks(self) -> list[str]:
        root = Path(self.root)
        if not root.is_dir():
            raise DataError.at(root, "MME folder not found")
        if self.subtasks is not None:
            for subtask in self.subtasks:
                if not (root / subtask).is_dir():
                    raise DataError.at(root / subtask, f"subtask folder {subtask!r} not found")
            return list(self.subtasks)
        found = [subtask for subtask in MME_SUBTASKS if (root / subtask).is_dir()]
        if not found:
            raise DataError.at(root, f"no MME subtask folder here; expected some of {list(MME_SUBTASKS)}")
        missing = [subtask for subtask in MME_SUBTASKS if subtask not in found]
        if missing:  # the sums would be over fewer subtasks and read like MME's
            others = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and entry.name not in MME_SUBTASKS)
            perception = sum(subtask in found for subtask in MME_PERCEPTION)
            rank_zero_warn(
                f"{root}: MME subtask folders {missing} are missing"
                + (f" (folders here that are no MME subtask: {others}; misnamed?)" if others else "")
                + f": perception (the overall score) is summed over {perception} of {len(MME_PERCEPTION)} subtasks and "
                f"cognition over {len(found) - perception} of {len(MME_COGNITION)}, not comparable with published MME "
                "scores; pass --data.init_args.subtasks to score a subset on purpose"
            )
        return found

    def read_questions(self, require_answers: bool) -> list[BenchmarkQuestion]:
        questions = []
        for subtask in self._subtasks():
            folder = Path(self.root) / subtask
            qa_folder, image_folder = (folder / QA_FOLDER, folder / "images") if (folder / QA_FOLDER).is_dir() else (folder, folder)
            texts = sorted(name for name in os.listdir(qa_folder) if name.endswith(".txt"))
            if not texts:
                raise DataError.at(qa_folder, "no question file (<image name>.txt) in this subtask folder")
            for name in texts:
                stem = name[: -len(".txt")]
                path = qa_folder / name
                record = f"{subtask}/{stem}"
                # a symlink (the file's, or a folder's on the way) must not lead out of the MME folder: its
                # question file would be read, and its text shown in answers and errors
                path = inside_image_folder(Path(self.root), os.path.relpath(path, self.root), path, record, 0, "question")
                image = next((image_folder / (stem + ext) for ext in IMAGE_EXTENSIONS if (image_folder / (stem + ext)).is_file()), None)
                if image is not None:
                    image = inside_image_folder(Path(self.root), os.path.relpath(image, self.root), path, record, 0, "image")
                if image is None:
                    raise DataError.at(path, f"no image {stem}.jpg / .png in {image_folder}", record, 0, "image")
                # split as open() splits (universal newlines); read_text names the file of a byte that is not UTF-8
                lines = [line.rstrip("\r\n") for line in io.StringIO(read_text(path), newline=None) if line.strip()]
                if not lines:
                    raise DataError.at(path, "empty question file", f"{subtask}/{stem}", 0, "question")
                for index, line in enumerate(lines):
                    record_id = f"{subtask}/{stem}/{index}"
                    question, tab, answer = line.partition("\t")
                    if not tab or not question.strip():
                        raise DataError.at(path, f"expected 'question<TAB>Yes|No', got {line!r:.80}", record_id, index, "question")
                    answer = answer.strip()
                    if answer.lower() not in ("yes", "no") and (require_answers or answer):
                        raise DataError.at(path, f"expected Yes or No, got {answer!r:.40}", record_id, index, "answer")
                    questions.append(
                        BenchmarkQuestion(
                            id=record_id,
                            image=image,
                            text=with_suffix(self._without_instruction(question), self.prompt_suffix),
                            answer=answer,
                            kind=subtask,
                            extra={"image_id": stem},
                            text_origin=TextOrigin(path, record_id, index, "question"),
                        )
                    )
        return questions

    def _without_instruction(self, question: str) -> str:
        """The question without MME's closing instruction (one or two spaces before it in the release),
        when LLaVA's instruction replaces it."""
        question = question.strip()
        if self.prompt_suffix and question.endswith(MME_INSTRUCTION):
            return question[: -len(MME_INSTRUCTION)].rstrip()
        return question

    def make_metric(self, stage: str = "test") -> MMEScore:
        return MMEScore(self.question_kinds(stage))
