"""LLaVA instruction data: a JSON list of records plus an image folder, as a Lightning datamodule.

A record is ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}``; any extra field is kept out of the way except
``question_kind``, which groups the accuracy. Bad data fails loudly and early: the structure of every
record is checked when the dataset is built (cheap, no tokenizer needed), and what needs the model's
tokenizer or the image bytes is checked when an item is loaded. Each problem is a :class:`DataError`
naming the JSON file, the record and the field; ``skip_bad_records`` turns them into warnings and
counts instead.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from adaptive_mllm.backbones.base import InputProcessor
from adaptive_mllm.backbones.templates import IGNORE_INDEX, IMAGE_PLACEHOLDER, ConversationError
from adaptive_mllm.checkpoints import every_process
from adaptive_mllm.data.errors import DataError, DataWarning
from adaptive_mllm.data.modality_grouping import ModalityGroupedSampler, modality_lengths
from adaptive_mllm.data.resumable import ResumableDataLoader, ResumableSampler
from adaptive_mllm.metrics import (
    RESERVED_GROUPS,
    GroupedExactMatch,
    majority_baseline_accuracy,
)
from adaptive_mllm.metrics import majority_answers as metric_majority_answers

HUMAN = "human"
GPT = "gpt"
DEFAULT_QUESTION_KIND = "all"


@dataclass(frozen=True)
class LlavaRecord:
    """A structurally valid record, reduced to what an item needs."""

    index: int  # position in the JSON list
    id: str
    image: Path | None  # absolute path of the image file, None for a text-only record
    questions: tuple[str, ...]  # human turns
    answers: tuple[str, ...]  # gpt turns; one fewer than questions for an open (unanswered) record
    question_kind: str
    words: int = 0  # whitespace-separated words of all turns as written (LLaVA's modality_lengths)
    dropped_opening_answer: bool = False  # the conversation opened with a gpt turn, left out as LLaVA's preprocess does


# --- reading ---------------------------------------------------------------------------------------
def read_json_records(json_path: str | Path) -> list[Any]:
    """The raw record list of a LLaVA JSON file (a DataError if it is not a JSON list)."""
    try:
        with open(json_path, encoding="utf-8") as handle:
            text = handle.read()
        records = json.loads(text)
    except json.JSONDecodeError as error:
        if is_json_lines(text, error):
            raise DataError.at(
                json_path,
                f"{JSON_LINES}, not a JSON file: expected LLaVA's instruction JSON, one JSON list of records "
                '[{"id", "image", "conversations"}, ...] (records in that form convert with `jq -s . FILE.jsonl > FILE.json`)',
            ) from error
        raise DataError.at(json_path, f"cannot read the JSON file: {error}") from error
    except (OSError, UnicodeDecodeError) as error:
        raise DataError.at(json_path, f"cannot read the JSON file: {error}") from error
    if not isinstance(records, list):
        raise DataError.at(json_path, f"expected a JSON list of records, got {type(records).__name__}")
    return records


JSON_LINES = "one JSON object per line (JSON Lines)"


def is_json_lines(text: str, error: json.JSONDecodeError) -> bool:
    """Whether ``json.loads(text)`` failed as it does on JSON Lines: its first value fills the first line and more
    follows on the next ("Extra data: line 2 column 1"), which names neither the format nor the file's wanted one. A
    JSON file with trailing garbage after a value spread over lines is not taken for it."""
    return error.msg == "Extra data" and error.lineno >= 2 and "\n" not in text[: error.pos].strip()


def image_inside(image_folder: str | Path, name: str, linked_folders: Sequence[str | Path] = ()) -> Path:
    """``image_folder / name`` with every symlink resolved; a ValueError if that leads out of the folder (and out of
    every one of ``linked_folders``, the places the user's own links in the folder lead to).

    A JSON file must not reach any file the process can read: an absolute path, ``..`` and a symlink
    (file or directory) that leads out of the image folder are all refused. Directories are resolved
    through a cache (cleared for each dataset): 665k records share a few hundred directories, and
    resolving every path component of every record took minutes.
    """
    if os.path.isabs(name):
        raise ValueError(f"{name!r} is an absolute path; expected a path relative to the image folder {image_folder}")
    root = _real_directory(os.fspath(image_folder))
    directory, file_name = os.path.split(os.path.join(root, name))
    if file_name in ("", ".", ".."):
        resolved = os.path.realpath(os.path.join(root, name))
    else:
        resolved = os.path.join(_real_directory(directory), file_name)
        if os.path.islink(resolved):
            resolved = os.path.realpath(resolved)
    roots = [root, *(_real_directory(os.fspath(folder)) for folder in linked_folders)]
    if not any(resolved.startswith(allowed.rstrip(os.sep) + os.sep) for allowed in roots):
        linked = f" and the linked folders {roots[1:]}" if linked_folders else ""
        raise ValueError(
            f"{name!r} resolves to {resolved}, outside the image folder {root}{linked}; where a link of yours in the "
            "folder leads to your data stored elsewhere (data/llava/coco -> /datasets/coco), name its target in "
            "linked_image_folders"
        )
    return Path(resolved)


@functools.lru_cache(maxsize=65536)
def _real_directory(path: str) -> str:
    return os.path.realpath(path)


def forget_resolved_directories() -> None:
    """Clear :func:`image_inside`'s directory cache before reading a dataset: links may have changed since."""
    _real_directory.cache_clear()


def parse_record(
    raw: Any, index: int, json_path: str | Path, image_folder: Path, require_answer: bool = True,
    linked_folders: Sequence[str | Path] = (),
) -> LlavaRecord:
    """Check one record's structure (no tokenizer, no image decoding) and reduce it to a LlavaRecord."""
    record_id = raw.get("id") if isinstance(raw, dict) else None

    def fail(field: str, reason: str) -> DataError:
        return DataError.at(json_path, reason, record_id=record_id, index=index, field=field)

    if not isinstance(raw, dict):
        raise fail("record", f"expected a JSON object, got {type(raw).__name__}")
    if record_id is not None and (isinstance(record_id, bool) or not isinstance(record_id, str | int)):
        # LLaVA's ids are strings ("000000033471") or integers; another value would be reported as its repr
        raise fail("id", f"expected a string or integer, got {type(record_id).__name__}")
    if "conversations" not in raw:
        raise fail("conversations", "missing: every record needs a list of human / gpt turns")
    conversations = raw["conversations"]
    if not isinstance(conversations, list) or not conversations:
        raise fail("conversations", f"expected a non-empty list of turns, got {conversations!r:.80}")
    questions: list[str] = []
    answers: list[str] = []
    first = 0  # LLaVA's preprocess drops a gpt turn that opens the conversation (ShareGPT-style records)
    if len(conversations) > 1 and isinstance(conversations[0], dict) and conversations[0].get("from") == GPT:
        if IMAGE_PLACEHOLDER in str(conversations[0].get("value", "")):
            raise fail("conversations[0].value", f"{IMAGE_PLACEHOLDER} in an opening gpt turn, which is dropped")
        first = 1
    for position, turn in enumerate(conversations[first:], start=first):
        field = f"conversations[{position}]"
        if not isinstance(turn, dict):
            raise fail(field, f"expected an object with 'from' and 'value', got {turn!r:.80}")
        for key in ("from", "value"):
            if key not in turn:
                raise fail(f"{field}.{key}", "missing")
        value = turn["value"]
        if not isinstance(value, str):
            raise fail(f"{field}.value", f"expected a string, got {type(value).__name__}")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as error:  # a lone surrogate ("\ud800" in the JSON): no tokenizer takes it
                raise fail(f"{field}.value", f"not valid Unicode text ({error.reason} at character {error.start})") from None
        expected = HUMAN if (position - first) % 2 == 0 else GPT
        if turn["from"] != expected:
            raise fail(
                f"{field}.from",
                f"expected {expected!r}, got {turn['from']!r}: turns alternate human / gpt, starting with human",
            )
        if expected == GPT:
            if not value.strip():
                raise fail(f"{field}.value", "empty answer")
            if IMAGE_PLACEHOLDER in value:
                raise fail(f"{field}.value", f"{IMAGE_PLACEHOLDER} in an answer")
            answers.append(value)
        else:
            if position > first and IMAGE_PLACEHOLDER in value:
                raise fail(f"{field}.value", f"{IMAGE_PLACEHOLDER} may only appear in the first human turn")
            questions.append(value)
    if require_answer and len(answers) < len(questions):
        raise fail("conversations", "the conversation ends with a human turn: the last gpt answer is missing")
    placeholders = questions[0].count(IMAGE_PLACEHOLDER)
    if placeholders > 1:
        raise fail(f"conversations[{first}].value", f"{placeholders} {IMAGE_PLACEHOLDER} placeholders; one image per record")
    if placeholders:  # LLaVA's preprocess_multimodal: the image first, on its own line, the text stripped
        questions[0] = f"{IMAGE_PLACEHOLDER}\n{questions[0].replace(IMAGE_PLACEHOLDER, '').strip()}".strip()
    image = raw.get("image")
    image_path = None
    if image is None:
        if placeholders:
            raise fail("image", f"missing, but the first human turn has {IMAGE_PLACEHOLDER}")
    else:
        if not isinstance(image, str) or not image:
            raise fail("image", f"expected a file name relative to the image folder, got {image!r}")
        if not placeholders:
            raise fail(f"conversations[{first}].value", f"the record has an image but no {IMAGE_PLACEHOLDER} placeholder")
        try:
            image_path = image_inside(image_folder, image, linked_folders)
        except ValueError as error:
            raise fail("image", str(error)) from error
        if not os.path.exists(image_path):
            raise fail("image", f"image file {image_path} does not exist")
    kind = raw.get("question_kind")
    if kind is None:  # absent (or null): one group
        kind = DEFAULT_QUESTION_KIND
    elif not isinstance(kind, str):  # grouped as "all" before: a kind silently lost
        raise fail("question_kind", f"expected a string, got {type(kind).__name__}")
    elif not kind.strip():  # empty: one group, as before and as the benchmark loaders read an empty group
        kind = DEFAULT_QUESTION_KIND
    if kind in RESERVED_GROUPS:
        raise fail("question_kind", f"{kind!r} is a column of the test report (reserved: {', '.join(RESERVED_GROUPS)}); rename the kind")
    return LlavaRecord(
        index=index,
        id=record_id_of(record_id, json_path, index),
        image=image_path,
        questions=tuple(questions),
        answers=tuple(answers),
        question_kind=kind,
        words=sum(len(str(turn.get("value", "")).split()) for turn in conversations),
        dropped_opening_answer=bool(first),
    )


# --- dataset ---------------------------------------------------------------------------------------
def cut_to_length(input_ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int], int]:
    """The first ``max_length`` ids and labels, and the prompt length of the cut sequence: the position after
    its last ignored label, where the release puts the latency token (``ada_llava_llama.py``)."""
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    last_ignored = max((i for i, label in enumerate(labels) if label == IGNORE_INDEX), default=-1)
    return input_ids, labels, last_ignored + 1


class LlavaJsonDataset(Dataset):
    """The records of one LLaVA JSON file as model inputs.

    Structure, unique ids and image paths (which must stay inside ``image_folder``) are validated
    here, eagerly; a file with no usable record is a DataError. The tokenizer-dependent encoding and
    the image decoding happen in ``__getitem__``, once :meth:`set_input_processor` has given the
    model's tokenizer.

    Args:
        json_path: the LLaVA JSON list.
        image_folder: root of the records' ``image`` paths; None = the JSON file's directory.
        skip_bad_records: warn (:class:`DataWarning`, once per record) and drop bad records instead of
            raising; structural drops are counted in ``num_skipped_at_load``. Every bad record, found
            when the file is read or when its item is loaded, makes ``__getitem__`` return None at its
            position, which the collator counts in ``num_skipped``.
        require_answer: False accepts conversations that end with a human turn (prediction inputs).
        input_processor: the model's InputProcessor, if already known.
        cut_overlong: a record longer than the model's ``max_length`` is cut to its first ``max_length``
            tokens (and labels), with a warning, as LLaVA's training cuts at ``model_max_length``; False
            refuses it (a DataError). A cut never removes image placeholders, nor leaves no answer token.
            Prompts to answer (no answer, or evaluation splits) are never cut.
        evaluation: the answers are references to score against (validation, test): only the prompt must fit
            ``max_length``; a reference that does not fit beside it is cut for the validation loss alone.
        linked_folders: folders outside ``image_folder`` that links in it may lead to (see ``image_inside``).
    """

    carry_bad_records = False  # set by LlavaDataModule under several processes: see CarryingBadRecords

    def __init__(
        self,
        json_path: str | Path,
        image_folder: str | Path | None = None,
        skip_bad_records: bool = False,
        require_answer: bool = True,
        input_processor: InputProcessor | None = None,
        cut_overlong: bool = False,
        evaluation: bool = False,
        linked_folders: Sequence[str | Path] = (),
    ) -> None:
        self.json_path = Path(json_path)
        self.cut_overlong = cut_overlong
        self.evaluation = evaluation
        self.image_folder = Path(image_folder) if image_folder is not None else self.json_path.parent
        self.skip_bad_records = skip_bad_records
        self.require_answer = require_answer
        self.input_processor = input_processor
        self.num_skipped_at_load = 0
        self.records: list[LlavaRecord] = []
        raw_records = read_json_records(self.json_path)
        forget_resolved_directories()
        first_index: dict[str, int] = {}  # record id -> index of the first record with it
        for index, raw in enumerate(raw_records):
            try:
                record = parse_record(raw, index, self.json_path, self.image_folder, require_answer, linked_folders)
                if record.id in first_index:  # answers and predictions are keyed by id
                    raise DataError.at(
                        self.json_path, f"duplicate id: record {first_index[record.id]} has the same id",
                        record_id=record.id, index=index, field="id",
                    )
                first_index[record.id] = index
                self.records.append(record)
            except DataError as error:
                if not skip_bad_records:
                    raise
                warnings.warn(str(error), DataWarning, stacklevel=2)
                self.num_skipped_at_load += 1
        self._check_some_left(len(raw_records))
        opened_by_gpt = [record.id for record in self.records if record.dropped_opening_answer]
        if opened_by_gpt:
            shown = ", ".join(repr(record_id) for record_id in opened_by_gpt[:5]) + (", ..." if len(opened_by_gpt) > 5 else "")
            warnings.warn(
                f"{self.json_path}: {len(opened_by_gpt)} conversation(s) open with a gpt turn (record ids {shown}); "
                "trained without that turn, as LLaVA's preprocess drops it",
                DataWarning,
                stacklevel=2,
            )
        self._bad: set[int] = set()  # lazily found bad records (per process: each worker has its own)

    def _check_some_left(self, num_read: int) -> None:
        """A DataError for a file with no usable record (torch's empty-sampler error names no file);
        a summary warning when records were skipped."""
        if num_read == 0:
            raise DataError.at(self.json_path, "the JSON list is empty: no records to use")
        if not self.records:
            raise DataError.at(
                self.json_path, f"all {num_read} records are bad and were skipped (see the warnings above): no records to use"
            )
        if self.num_skipped_at_load:
            warnings.warn(
                f"{self.json_path}: {self.num_skipped_at_load} of {num_read} records skipped as bad, {len(self.records)} kept",
                DataWarning,
                stacklevel=3,
            )

    def set_input_processor(self, processor: InputProcessor) -> None:
        self.input_processor = processor

    def __len__(self) -> int:
        """One position per record of the file: those skipped when it was read come last and load as
        None, so the collator counts them in ``num_skipped`` like the records found bad later."""
        return len(self.records) + self.num_skipped_at_load

    def __getitem__(self, index: int) -> dict[str, Any] | DataError | None:
        """The encoded example, or None for a bad record when ``skip_bad_records`` is on; with
        ``carry_bad_records``, a bad record's DataError is returned instead of raised."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        if index < 0:
            index += len(self)
        if index >= len(self.records):  # skipped when the file was read
            return None
        record = self.records[index]
        if record.index in self._bad:
            return None
        try:
            return self._encode(record)
        except DataError as error:
            if self.carry_bad_records and not self.skip_bad_records:
                return error  # not remembered as bad: a resume after the record is fixed reads it again
            if not self.skip_bad_records:
                raise
            self._bad.add(record.index)
            warnings.warn(str(error), DataWarning, stacklevel=2)
            return None

    def check_usable(self) -> None:
        """With ``skip_bad_records``, a DataError unless some record loads: a run whose every record is
        bad must fail before it starts, not train on nothing and report success. Stops at the first good
        record, so it costs one item unless the leading records are bad. Needs the InputProcessor."""
        if not self.skip_bad_records:
            return  # the first bad record raises when it is loaded
        for position in range(len(self.records)):
            if self[position] is not None:
                return
        raise DataError.at(
            self.json_path,
            f"none of the {len(self)} records is usable: {self.num_skipped_at_load} skipped when the file was read, "
            f"{len(self.records)} when their items were loaded (see the warnings above)",
        )

    def _open_image(self, record: LlavaRecord) -> Image.Image:
        """The record's image, opened lazily (a hook for datasets whose images are not files, e.g. base64)."""
        return Image.open(record.image)

    def _encode(self, record: LlavaRecord) -> dict[str, Any]:
        processor = self.input_processor
        if processor is None:
            raise RuntimeError(f"{self.json_path}: no InputProcessor; call set_input_processor() before loading items")

        def fail(field: str, reason: str) -> DataError:
            return DataError.at(self.json_path, reason, record_id=record.id, index=record.index, field=field)

        pixel_values = None
        if record.image is not None:
            try:
                with self._open_image(record) as image:
                    rgb = image.convert("RGB")  # decodes the whole file: truncated data fails here
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
                raise fail("image", f"cannot read image file {record.image}: {error}") from error
            pixel_values = processor.preprocess_image(rgb)  # [3, H, W]

        template, tokenizer = processor.chat_template, processor.tokenizer
        image_args = (processor.image_token_id, processor.num_image_tokens)
        answered = len(record.answers) == len(record.questions)
        try:
            if answered:  # the generation prompt is the conversation up to the last answer: a prefix of the ids
                encoded = template.encode(list(zip(record.questions, record.answers, strict=True)), tokenizer, *image_args)
                input_ids, labels, prompt_length = encoded.input_ids, encoded.labels, encoded.prompt_length
                prompt_ids = input_ids[:prompt_length]
            else:  # an open record (prediction input): nothing to learn from
                prompt_ids = template.encode_prompt(list(record.questions), list(record.answers), tokenizer, *image_args)
                input_ids, labels, prompt_length = prompt_ids, [IGNORE_INDEX] * len(prompt_ids), len(prompt_ids)
        except ConversationError as error:
            raise fail(error.field, str(error)) from error

        expected_placeholders = processor.num_image_tokens if record.image is not None else 0
        found = sum(1 for token in input_ids if token == processor.image_token_id)
        if found != expected_placeholders:  # e.g. text that the tokenizer maps onto the image token
            raise fail("conversations", f"{found} image placeholder tokens after encoding, expected {expected_placeholders}")
        if self.evaluation and answered and len(prompt_ids) <= processor.max_length < len(input_ids):
            # the prompt is what is answered, whole; the reference beyond max_length only served the loss
            input_ids, labels = input_ids[: processor.max_length], labels[: processor.max_length]
        if len(input_ids) > processor.max_length:
            too_long = f"{len(input_ids)} tokens ({found} of them image placeholders) exceed max_length {processor.max_length}"
            if not (self.cut_overlong and answered):
                raise fail("conversations", f"{too_long}; a prompt to answer is never cut: shorten it or raise max_length")
            input_ids, labels, prompt_length = cut_to_length(input_ids, labels, processor.max_length)
            prompt_ids = input_ids[:prompt_length]
            if sum(1 for token in input_ids if token == processor.image_token_id) != found:
                raise fail("conversations", f"{too_long}, and a cut there would cut the image: raise max_length")
            if all(label == IGNORE_INDEX for label in labels):
                raise fail("conversations", f"{too_long}, and a cut there keeps no answer token: raise max_length")
            warnings.warn(
                f"{self.json_path}: record id {record.id!r} (index {record.index}): {too_long}; trained on its first "
                f"{processor.max_length} tokens, as LLaVA's training cuts them",
                DataWarning,
                stacklevel=2,
            )
        return {
            "id": record.id,
            "input_ids": torch.tensor(input_ids, dtype=torch.long),  # [T]
            "labels": torch.tensor(labels, dtype=torch.long),  # [T]
            "prompt_length": prompt_length,
            "prompt_ids": torch.tensor(prompt_ids, dtype=torch.long),  # [Tp]
            "pixel_values": pixel_values,  # [3, H, W] or None
            "answer": record.answers[-1] if answered else "",
            "question": record.questions[-1].replace(IMAGE_PLACEHOLDER, "").strip(),  # the one the answer is to
            "question_kind": record.question_kind,
        }


# --- batching --------------------------------------------------------------------------------------
class LlavaCollator:
    """Items -> a batch; None items (skipped records) are dropped and counted in ``num_skipped``.

    Training sequences are padded on the right, prompts on the left (so generation appends at one
    column for the whole batch). A batch whose items were all skipped is still a dict, with B = 0
    tensors (``input_ids`` of shape [0, 0]) and ``pixel_values`` None: a step checks
    ``batch["input_ids"].shape[0] == 0`` and returns early, after adding ``num_skipped``.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        kept = [item for item in items if item is not None]
        input_ids, attention_mask = self._pad([item["input_ids"] for item in kept], self.pad_token_id, left=False)
        labels, _ = self._pad([item["labels"] for item in kept], IGNORE_INDEX, left=False)
        prompt_ids, prompt_mask = self._pad([item["prompt_ids"] for item in kept], self.pad_token_id, left=True)
        images = [item["pixel_values"] for item in kept if item["pixel_values"] is not None]
        return {
            "input_ids": input_ids,  # [B, T], right-padded
            "attention_mask": attention_mask,  # [B, T], 1 = real token
            "labels": labels,  # [B, T], IGNORE_INDEX on prompt and padding
            "prompt_lengths": torch.tensor([item["prompt_length"] for item in kept], dtype=torch.long),  # [B]
            "prompt_ids": prompt_ids,  # [B, Tp], left-padded
            "prompt_attention_mask": prompt_mask,  # [B, Tp]
            "pixel_values": torch.stack(images) if images else None,  # [N_img, 3, H, W], in batch order
            "has_image": torch.tensor([item["pixel_values"] is not None for item in kept], dtype=torch.bool),  # [B]
            "answers": [item["answer"] for item in kept],
            "questions": [item["question"] for item in kept],
            "question_kinds": [item["question_kind"] for item in kept],
            "ids": [item["id"] for item in kept],
            "num_skipped": len(items) - len(kept),
        }

    @staticmethod
    def _pad(sequences: list[torch.Tensor], value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T_max] padded with ``value`` and the matching 0/1 attention mask (long)."""
        length = max((len(sequence) for sequence in sequences), default=0)
        padded = torch.full((len(sequences), length), value, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            start = length - len(sequence) if left else 0
            padded[row, start : start + len(sequence)] = sequence
            mask[row, start : start + len(sequence)] = 1
        return padded, mask


# --- bad records under several processes -----------------------------------------------------------
# A DataError raised by one process's loader stops that process only: the others go on into the next step's
# collectives and block there, and nothing can be saved. So under several processes the dataset returns a bad record's
# error, its batch carries it to the main process, and there, as the batch is handed out (where one process raises
# it), every process learns whether any batch of this round held one and then all raise together: each at the very
# point, and in the very state, where one process alone raises it.
class CarriedBatch(NamedTuple):
    """A batch, and the error of the first bad record among its items (None: none)."""

    batch: Any
    bad_record: DataError | None


class CarryingBadRecords:
    """A collate function over items of which some may be DataErrors (a dataset with ``carry_bad_records``): the
    batch of the others, as ``collate`` makes it of items with None for the bad ones, with the first error."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, items: list[Any]) -> CarriedBatch:
        bad = next((item for item in items if isinstance(item, DataError)), None)
        return CarriedBatch(self.collate([None if isinstance(item, DataError) else item for item in items]), bad)


def leave_sigterm_to_the_main_process(worker_id: int) -> None:
    """A DataLoader worker ends on a SIGTERM from its main process (how torch and Python's exit stop a worker) and
    ignores any other: the main process stops the run after the step it is in, saves, then ends its workers itself.
    A SIGTERM to the whole process group (SLURM at a time limit or ``scancel``, systemd) reached the worker too, whose
    torch handler dies of any SIGTERM its parent did not send: the main process then failed on "DataLoader worker ...
    killed by signal: Terminated" at its next fetch, before Lightning's SIGTERM stop, and saved nothing. Ignoring every
    SIGTERM instead hung the main process's exit on a worker it terminates. Python gives a handler no sender, so the
    signal is blocked and a thread takes it with ``sigwaitinfo``. Lightning's worker seeding
    (``seed_everything(workers=True)``), which it adds only to a loader without a ``worker_init_fn``, runs here."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit the mask
    parent = os.getppid()

    def take_sigterms() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)  # as torch's handler does on its parent's SIGTERM

    threading.Thread(target=take_sigterms, name="sigterm-from-the-main-process", daemon=True).start()
    if int(os.environ.get("PL_SEED_WORKERS", 0)):  # as Lightning decides whether to add it
        pl_worker_init_function(worker_id)


class StoppingTogetherDataLoader(DataLoader):
    """A DataLoader of CarriedBatches that hands out their batches, calling ``stop_together`` with each one's bad
    record first (a keyword of ``__init__``, so that Lightning keeps it where it rebuilds the loader with its own
    sampler). Every process must hand out as many batches (DistributedSampler's equal shares)."""

    def __init__(self, *args: Any, stop_together: Callable[[DataError | None], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_together = stop_together

    def __iter__(self) -> Iterator[Any]:
        return self._decided(super().__iter__())  # the iterator (and its workers) start now, as DataLoader's

    def _decided(self, carried: Iterator[CarriedBatch]) -> Iterator[Any]:
        for batch, bad_record in carried:
            self.stop_together(bad_record)
            yield batch


class StoppingTogetherResumableDataLoader(StoppingTogetherDataLoader, ResumableDataLoader):
    """The training loader (resumable mid-epoch) of a run whose processes stop together on a bad record."""


def stop_together(bad_record: DataError | None, trainer: L.Trainer) -> None:
    """Raise a DataError on every process if the batch of any holds a bad record (a collective: every process calls
    it once per batch): its own where it has one, else one naming the bad record of the first process that has one.
    Each is marked ``stopped_together`` (RunCheckpoint saves the state they all stopped in)."""
    if not trainer.strategy.reduce_boolean_decision(bad_record is not None, all=False):
        return
    met = every_process(bad_record)
    world_size = trainer.world_size
    if bad_record is None:
        first = next((process for process, error in enumerate(met) if error is not None), None)
        if first is None:  # the errors could not be gathered (no torch.distributed group: only this one)
            bad_record = DataError("another process met a bad record, and every process stops with it (see its error)")
        else:
            found = met[first]
            more = sum(error is not None for error in met) - 1
            others = f" (and {more} more process{'es' if more > 1 else ''})" if more else ""
            bad_record = DataError(
                f"process {first} of {world_size} met a bad record{others}, and every process stops with it: {found}",
                found.json_path, found.record_id, found.index, found.field, found.reason,
            )  # fmt: skip
            bad_record.met_by_process = first
    bad_record.stopped_together = True
    raise bad_record


# --- majority-answer baseline ----------------------------------------------------------------------
def record_id_of(raw_id: Any, json_path: str | Path, index: int) -> str:
    """A record's id as runs report it: its ``id`` as a string, else ``<file stem>-<index>``."""
    return str(raw_id) if raw_id is not None else f"{Path(json_path).stem}-{index}"


def _kinds_and_answers(json_path: str | Path, ids: Collection[str] | None = None) -> list[tuple[str, str]]:
    """(question kind, last answer) of every record that has one (of those with an id in ``ids``, when given);
    malformed records are passed over."""
    pairs = []
    for index, raw in enumerate(read_json_records(json_path)):
        conversations = raw.get("conversations") if isinstance(raw, dict) else None
        if not isinstance(conversations, list) or len(conversations) < 2 or not isinstance(conversations[-1], dict):
            continue
        if ids is not None and record_id_of(raw.get("id"), json_path, index) not in ids:
            continue
        last = conversations[-1]
        if last.get("from") != GPT or not isinstance(last.get("value"), str) or not last["value"].strip():
            continue
        kind = raw.get("question_kind", DEFAULT_QUESTION_KIND)
        pairs.append((kind if isinstance(kind, str) and kind else DEFAULT_QUESTION_KIND, last["value"].strip()))
    return pairs


def majority_answers(train_json: str | Path) -> dict[str, str]:
    """The most common training answer per question kind (ties: alphabetically first)."""
    pairs = _kinds_and_answers(train_json)
    return metric_majority_answers([answer for _, answer in pairs], [kind for kind, _ in pairs])


def majority_baseline(train_json: str | Path, eval_json: str | Path, ids: Collection[str] | None = None) -> dict[str, float]:
    """Accuracy on ``eval_json`` (on its records with an id in ``ids``, when given: those a run scored) of answering
    every question with its kind's majority training answer, per kind and ``overall`` (answers compared after the
    VQA normalisation the metrics use). Empty when the training file has no answers (e.g. a test-only split): there
    is then no baseline, not a 0% one."""
    majority = majority_answers(train_json)
    if not majority:
        return {}
    pairs = _kinds_and_answers(eval_json, ids)
    return majority_baseline_accuracy(majority, [answer for _, answer in pairs], [kind for kind, _ in pairs])


# --- datamodule ------------------------------------------------------------------------------------
class LlavaDataModule(L.LightningDataModule):
    """LLaVA instruction JSON files + an image folder as train / val / test / predict dataloaders.

    The datasets are built (and structurally validated) in ``setup``; items are encoded with the
    model's InputProcessor, taken from ``trainer.lightning_module.backbone`` when the dataloaders are
    created (the backbone is only built in ``configure_model``, after ``setup``), unless one was given
    with :meth:`set_input_processor`.

    Args:
        train_json: training records (needed to fit).
        val_json: validation records; None = no validation.
        test_json: test records.
        predict_json: records to answer; their last gpt turn may be missing.
        image_folder: root of the records' ``image`` paths; None = each JSON file's directory.
        batch_size: training batch size.
        eval_batch_size: validation / test / predict batch size; None = ``batch_size``.
        num_workers: DataLoader worker processes (kept alive across epochs when > 0).
        skip_bad_records: warn about bad records and drop them instead of stopping with a DataError;
            each batch carries ``num_skipped``, each dataset ``num_skipped_at_load``.
        cut_overlong: training records longer than the model's ``max_length`` are cut to it, with a
            warning, as LLaVA's training does (True, the default); False refuses them. Validation, test
            and predict prompts are never cut.
        group_by_modality_length: train in LLaVA's ``group_by_modality_length`` order (every optimizer step
            all-image or all-text records, balanced by word count; ``data/modality_grouping.py``), as LLaVA-1.5
            and the AdaLLaVA release train (their recipes set it); False, LLaVA's default, shuffles plainly.
        linked_image_folders: folders outside ``image_folder`` that your own links in it lead to, e.g.
            ``[/datasets/coco]`` for ``data/llava/coco -> /datasets/coco``; an image path that resolves out of
            ``image_folder`` and out of these is refused (a JSON file cannot make the run read other files).
    """

    def __init__(
        self,
        train_json: str | None = None,
        val_json: str | None = None,
        test_json: str | None = None,
        predict_json: str | None = None,
        image_folder: str | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        skip_bad_records: bool = False,
        cut_overlong: bool = True,
        group_by_modality_length: bool = False,
        linked_image_folders: list[str] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {eval_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.json_paths: dict[str, str | None] = {
            "train": train_json,
            "val": val_json,
            "test": test_json,
            "predict": predict_json,
        }
        self.image_folder = image_folder
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.num_workers = num_workers
        self.skip_bad_records = skip_bad_records
        self.cut_overlong = cut_overlong
        self.group_by_modality_length = group_by_modality_length
        self.linked_image_folders = list(linked_image_folders or [])
        self.datasets: dict[str, LlavaJsonDataset] = {}
        self._input_processor: InputProcessor | None = None

    # --- datasets ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Build the datasets the stage needs (fit: train and val; validate: val; test; predict)."""
        needed = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}[stage]
        for split in needed:
            path = self.json_paths[split]
            if path is None:
                if split == "val" and stage == "fit":
                    continue  # fitting without validation is fine
                raise ValueError(f"stage {stage!r} needs {split}_json, which is not set")
            if split not in self.datasets:
                self.datasets[split] = LlavaJsonDataset(
                    path, self.image_folder, skip_bad_records=self.skip_bad_records, require_answer=split != "predict",
                    cut_overlong=self.cut_overlong and split == "train", evaluation=split in ("val", "test"),
                    linked_folders=self.linked_image_folders,
                )  # fmt: skip

    @property
    def num_skipped_at_load(self) -> dict[str, int]:
        """Records dropped by structural validation, per built split."""
        return {split: dataset.num_skipped_at_load for split, dataset in self.datasets.items()}

    def question_kinds(self, split: str) -> list[str]:
        """The question kinds of a built split, sorted: the groups its accuracy is reported by."""
        return sorted({record.question_kind for record in self.datasets[split].records})

    def make_metric(self, stage: str) -> GroupedExactMatch:
        """Normalised exact match, overall and per question kind of the split ("val" / "test")."""
        split = {"validate": "val", "fit": "val"}.get(stage, stage)
        return GroupedExactMatch(self.question_kinds(split))

    # --- the model's side ------------------------------------------------------------------------------
    def set_input_processor(self, processor: InputProcessor) -> None:
        """Use this InputProcessor instead of asking the trainer's model (tests, scripts)."""
        self._input_processor = processor

    def input_processor(self) -> InputProcessor:
        if self._input_processor is not None:
            return self._input_processor
        module = self.trainer.lightning_module if self.trainer is not None else None
        backbone = getattr(module, "backbone", None)
        if backbone is None:
            raise RuntimeError(
                "no InputProcessor: attach the datamodule to a Trainer whose LightningModule has a `backbone`, "
                "or call set_input_processor()"
            )
        return backbone.input_processor()

    # --- dataloaders ---------------------------------------------------------------------------------
    def _dataloader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"no {split} dataset: call setup() for a stage that builds it first")
        dataset = self.datasets[split]
        processor = self.input_processor()
        dataset.set_input_processor(processor)
        dataset.check_usable()
        together = self._stops_together()
        dataset.carry_bad_records = together
        options = dict(
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=CarryingBadRecords(self._collator(processor)) if together else self._collator(processor),
            persistent_workers=self.num_workers > 0,
            pin_memory=self._pin_memory(),
            worker_init_fn=leave_sigterm_to_the_main_process if self.num_workers > 0 else None,
        )
        if together:
            options["stop_together"] = self._stop_together
        if shuffle:  # training: resumable mid-epoch (a checkpoint holds the epoch's seed and the batches consumed)
            loader = StoppingTogetherResumableDataLoader if together else ResumableDataLoader
            return loader(dataset, sampler=self._train_sampler(dataset), batches_consumed=self._train_batches_consumed, **options)
        # its own generator: each iterator of a loader draws its workers' base seed from torch's global one otherwise,
        # and a validation inside fit moved training's draws (budgets, Gumbel noise) on, so a run resumed from a save a
        # validation followed trained on other random numbers than the uninterrupted one (a review of 2026-12-08)
        generator = torch.Generator().manual_seed(0)
        return (StoppingTogetherDataLoader if together else DataLoader)(dataset, shuffle=False, generator=generator, **options)

    def _stops_together(self) -> bool:
        """Whether a bad record met by one process must stop every process together (see :func:`stop_together`):
        under several processes, not skipping bad records, in the stages whose processes read equally many batches
        (Lightning's DistributedSampler; predict's gives them unequal shares)."""
        trainer = self.trainer  # (a script's stand-in for one may lack these: one process then)
        if trainer is None or self.skip_bad_records or getattr(trainer, "world_size", 1) <= 1:
            return False
        return getattr(getattr(trainer, "state", None), "fn", None) in ("fit", "validate", "test")

    def _stop_together(self, bad_record: DataError | None) -> None:
        stop_together(bad_record, self.trainer)

    def _train_sampler(self, dataset: Dataset) -> ResumableSampler:
        """The training order. On one process: the first epoch is the order ``DataLoader(shuffle=True)`` gave
        (its seed drawn from torch's generator, which ``seed_everything`` seeded), epoch ``e`` uses that seed
        + ``e``. On several: this process's share of the order Lightning's DistributedSampler gave (seed
        ``PL_GLOBAL_SEED`` + epoch), dealt here so that Lightning keeps this sampler instead of replacing it."""
        trainer = self.trainer
        kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
        connector = getattr(trainer, "_accelerator_connector", None)
        shared = {}
        if kwargs and kwargs.get("num_replicas", 1) > 1 and getattr(connector, "use_distributed_sampler", True):
            shared = dict(num_replicas=kwargs["num_replicas"], rank=kwargs["rank"], seed=int(os.getenv("PL_GLOBAL_SEED", 0)))
        if self.group_by_modality_length:
            records = dataset.records  # type: ignore[attr-defined]
            lengths = modality_lengths([record.words for record in records], [record.image is not None for record in records])
            accumulation = int(getattr(trainer, "accumulate_grad_batches", 1) or 1) if trainer is not None else 1
            return ModalityGroupedSampler(dataset, lengths, self.batch_size, accumulation, **shared)
        return ResumableSampler(dataset, **shared)

    def _train_batches_consumed(self) -> int | None:
        """Training batches of the current epoch handed to ``training_step`` (None without a trainer): what a
        checkpoint's loader state counts. The loader itself runs ahead (Lightning fetches a batch early)."""
        fit_loop = getattr(self.trainer, "fit_loop", None) if self.trainer is not None else None
        if fit_loop is None:
            return None
        return fit_loop.epoch_loop.batch_progress.current.ready

    def _collator(self, processor: InputProcessor) -> LlavaCollator:
        """Pads and batches records; subclasses that carry extra per-record fields return their own."""
        return LlavaCollator(processor.pad_token_id)

    def _pin_memory(self) -> bool:
        if self.trainer is not None:
            return self.trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def train_dataloader(self) -> DataLoader:
        return self._dataloader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.json_paths["val"] is None:
            return []  # no validation
        return self._dataloader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._dataloader("test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._dataloader("predict", self.eval_batch_size, shuffle=False)

    # --- baseline ------------------------------------------------------------------------------------
    def majority_baseline(self, stage: str, ids: Collection[str] | None = None) -> dict[str, float]:
        """Accuracy per question kind (and ``overall``) of the majority training answer on a split's
        records ("val" / "test"; those with an id in ``ids`` when given); empty when the training or that
        split's JSON is not set."""
        split = {"validate": "val", "fit": "val"}.get(stage, stage)
        train, evaluated = self.json_paths["train"], self.json_paths.get(split)
        if train is None or evaluated is None:
            return {}
        return majority_baseline(train, evaluated, ids)
