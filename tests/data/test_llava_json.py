"""LLaVA JSON loading: encodings checked against hand-built token lists, padding, every kind of bad
record (error message naming file, record and field, or a warning and a count), the datamodule."""

from __future__ import annotations

import json
import multiprocessing
import pickle
import subprocess
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch._utils import ExceptionWrapper
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from adaptive_mllm.backbones.templates import IGNORE_INDEX, ChatTemplate, ConversationError
from adaptive_mllm.data import (
    DataError,
    DataWarning,
    LlavaCollator,
    LlavaDataModule,
    LlavaJsonDataset,
    majority_answers,
    majority_baseline,
)


def vocab(tokenizer, *words: str) -> list[int]:
    """Ids of whole words, looked up in the vocabulary (never through the tokenizer's splitting)."""
    ids = [tokenizer.convert_tokens_to_ids(word) for word in words]
    assert tokenizer.unk_token_id not in ids, words
    return ids


def conversation(*turns: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": value} for i, value in enumerate(turns)]


# --- encoding, by hand ----------------------------------------------------------------------------
def test_single_turn_with_image_matches_hand_built_ids(write_llava, make_record, processor):
    tok = processor.tokenizer
    bos, eos, image = tok.bos_token_id, tok.eos_token_id, tok.convert_tokens_to_ids("<image>")
    assert (bos, eos, image) == (2, 3, 4)
    path = write_llava([make_record("r0", "<image>\nWhat colour is the circle?", "red", question_kind="colour")])
    item = LlavaJsonDataset(path, input_processor=processor, image_folder=path.parent / "images")[0]

    prompt = [bos] + vocab(tok, "USER", ":") + [image] * 16 + vocab(tok, "What", "colour", "is", "the", "circle", "?", "ASSISTANT", ":")
    answer = vocab(tok, "red") + [eos]
    assert item["input_ids"].tolist() == prompt + answer
    assert item["labels"].tolist() == [IGNORE_INDEX] * len(prompt) + answer
    assert item["prompt_length"] == len(prompt) == 27
    assert item["prompt_ids"].tolist() == prompt
    assert (item["answer"], item["question_kind"], item["id"]) == ("red", "colour", "r0")
    expected_pixels = torch.tensor([200, 30, 30], dtype=torch.float32)[:, None, None] / 255 * 2 - 1
    assert torch.allclose(item["pixel_values"], expected_pixels.expand(3, 64, 64))


def test_multi_turn_labels_only_the_answers(write_llava, processor):
    tok = processor.tokenizer
    bos, eos, image = tok.bos_token_id, tok.eos_token_id, tok.convert_tokens_to_ids("<image>")
    turns = conversation("<image>\nHow many circles are there?", "two", "What colour is the square?", "blue")
    path = write_llava([{"id": "multi", "image": "good.png", "conversations": turns}])
    item = LlavaJsonDataset(path, path.parent / "images", input_processor=processor)[0]

    question_1 = [bos] + vocab(tok, "USER", ":") + [image] * 16 + vocab(tok, "How", "many", "circles", "are", "there", "?", "ASSISTANT", ":")
    answer_1 = vocab(tok, "two") + [eos]
    question_2 = vocab(tok, "USER", ":", "What", "colour", "is", "the", "square", "?", "ASSISTANT", ":")
    answer_2 = vocab(tok, "blue") + [eos]
    assert item["input_ids"].tolist() == question_1 + answer_1 + question_2 + answer_2
    assert item["labels"].tolist() == (
        [IGNORE_INDEX] * len(question_1) + answer_1 + [IGNORE_INDEX] * len(question_2) + answer_2
    )
    # the latency token's place: after the last ignored label, before the LAST answer (AdaLLaVA's release
    # insert_latency_token), not before the first
    assert item["prompt_length"] == len(question_1 + answer_1 + question_2)
    # for generation: every question, every answer but the last (the reference), the open role
    assert item["prompt_ids"].tolist() == question_1 + answer_1 + question_2
    assert item["answer"] == "blue" and item["question_kind"] == "all"


def test_text_only_record(write_llava, make_record, processor):
    tok = processor.tokenizer
    path = write_llava([make_record("text", "How many circles are there?", "one", image=None)])
    item = LlavaJsonDataset(path, input_processor=processor)[0]
    prompt = [tok.bos_token_id] + vocab(tok, "USER", ":", "How", "many", "circles", "are", "there", "?", "ASSISTANT", ":")
    assert item["input_ids"].tolist() == prompt + vocab(tok, "one") + [tok.eos_token_id]
    assert item["pixel_values"] is None


def test_image_folder_defaults_to_the_json_directory(make_record, processor, write_llava, tmp_path):
    write_llava([])  # creates images/good.png
    path = tmp_path / "images" / "inside.json"
    path.write_text(json.dumps([make_record("here")]))
    assert LlavaJsonDataset(path, input_processor=processor)[0]["pixel_values"].shape == (3, 64, 64)


# --- collation ------------------------------------------------------------------------------------
def test_collator_pads_right_for_training_and_left_for_prompts(write_llava, make_record, processor, tmp_path):
    records = [
        {"id": "long", "image": "good.png", "conversations": conversation("<image>\nHow many circles are there?", "two", "What colour is the square?", "blue")},
        make_record("text", "How many circles are there?", "four", image=None, question_kind="count"),
        make_record("short", question_kind="colour"),
    ]
    dataset = LlavaJsonDataset(write_llava(records), tmp_path / "images", input_processor=processor)
    items = [dataset[0], None, dataset[1], dataset[2]]  # None: a record skipped by the dataset
    batch = LlavaCollator(pad_token_id=processor.pad_token_id)(items)
    kept = [items[0], items[2], items[3]]
    pad = processor.tokenizer.pad_token_id
    assert pad == 0

    lengths = [len(item["input_ids"]) for item in kept]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
    for row, (item, length) in enumerate(zip(kept, lengths, strict=True)):
        assert batch["input_ids"][row, :length].tolist() == item["input_ids"].tolist()
        assert batch["input_ids"][row, length:].tolist() == [pad] * (max(lengths) - length)
        assert batch["labels"][row, :length].tolist() == item["labels"].tolist()
        assert batch["labels"][row, length:].tolist() == [IGNORE_INDEX] * (max(lengths) - length)
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (max(lengths) - length)

    prompt_lengths = [len(item["prompt_ids"]) for item in kept]
    width = max(prompt_lengths)
    assert batch["prompt_ids"].shape == batch["prompt_attention_mask"].shape == (3, width)
    for row, (item, length) in enumerate(zip(kept, prompt_lengths, strict=True)):
        assert batch["prompt_ids"][row].tolist() == [pad] * (width - length) + item["prompt_ids"].tolist()
        assert batch["prompt_attention_mask"][row].tolist() == [0] * (width - length) + [1] * length

    assert batch["prompt_lengths"].tolist() == [item["prompt_length"] for item in kept]
    assert batch["prompt_lengths"].dtype == torch.long
    assert batch["has_image"].tolist() == [True, False, True] and batch["has_image"].dtype == torch.bool
    assert torch.equal(batch["pixel_values"], torch.stack([kept[0]["pixel_values"], kept[2]["pixel_values"]]))
    assert batch["answers"] == ["blue", "four", "red"]
    assert batch["question_kinds"] == ["all", "count", "colour"]
    assert batch["ids"] == ["long", "text", "short"]
    assert batch["num_skipped"] == 1


def test_collator_all_skipped_and_text_only_batches(write_llava, make_record, processor):
    collate = LlavaCollator(pad_token_id=0)
    empty = collate([None, None])
    assert empty["input_ids"].shape == empty["prompt_ids"].shape == (0, 0)
    assert empty["prompt_lengths"].shape == empty["has_image"].shape == (0,)
    assert empty["pixel_values"] is None and empty["ids"] == [] and empty["num_skipped"] == 2
    dataset = LlavaJsonDataset(write_llava([make_record("t", "How many circles are there?", "one", image=None)]), input_processor=processor)
    text_only = collate([dataset[0]])
    assert text_only["pixel_values"] is None and text_only["has_image"].tolist() == [False]


# --- bad records ----------------------------------------------------------------------------------
@dataclass
class BadCase:
    record: dict
    field: str
    says: str  # a fragment of the reason
    lazy: bool  # found in __getitem__ (needs the tokenizer / image bytes), not when the dataset is built


def bad_cases(image_folder, make_record) -> dict[str, BadCase]:
    """Every kind of bad record, each with id 'bad-record'; writes the broken image files it needs."""
    (image_folder / "corrupt.png").write_bytes(b"this is not a PNG file" * 20)
    good = (image_folder / "good.png").read_bytes()
    (image_folder / "truncated.png").write_bytes(good[: len(good) // 2])
    bad = "bad-record"
    two_turns = conversation("<image>\nHow many circles are there?", "two", "What colour is the square?", "blue")
    return {
        "missing image file": BadCase(make_record(bad, image="nowhere.png"), "image", "does not exist", False),
        "corrupt image file": BadCase(make_record(bad, image="corrupt.png"), "image", "cannot read image file", True),
        "truncated image file": BadCase(make_record(bad, image="truncated.png"), "image", "cannot read image file", True),
        "no conversations": BadCase({"id": bad, "image": "good.png"}, "conversations", "missing", False),
        "conversations not a list": BadCase({"id": bad, "conversations": "hi"}, "conversations", "non-empty list", False),
        "image but no placeholder": BadCase(make_record(bad, "What colour is the circle?"), "conversations[0].value", "no <image>", False),
        "placeholder but no image": BadCase(make_record(bad, image=None), "image", "missing", False),
        "empty answer": BadCase(make_record(bad, answer="  "), "conversations[1].value", "empty answer", False),
        "roles out of order": BadCase(
            {"id": bad, "conversations": [{"from": "gpt", "value": "red"}]}, "conversations[0].from", "expected 'human'", False
        ),
        "turn without value": BadCase(
            {"id": bad, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]}, "conversations[1].value", "missing", False
        ),
        "ends without answer": BadCase(
            {"id": bad, "conversations": [{"from": "human", "value": "How many circles are there?"}]}, "conversations", "human turn", False
        ),
        "lone surrogate in the text": BadCase(
            make_record(bad, "<image>\nWhat colour is the \ud800 circle?"), "conversations[0].value", "not valid Unicode", False
        ),
        "longer than max_length": BadCase(
            {"id": bad, "image": "good.png", "conversations": two_turns}, "conversations", "exceed max_length 40", True
        ),
        "a question kind named as a report column": BadCase(
            {**make_record(bad), "question_kind": "units"}, "question_kind", "'units' is a column of the test report", False
        ),
        "a question kind that is not a string": BadCase(  # was grouped as "all" without a word
            {**make_record(bad), "question_kind": ["colour"]}, "question_kind", "expected a string, got list", False
        ),
    }


MAX_LENGTH = 40  # the good records have 29 tokens, the two-turn one 41


BAD_CASES = [
    "missing image file", "corrupt image file", "truncated image file", "no conversations", "conversations not a list",
    "image but no placeholder", "placeholder but no image", "empty answer", "roles out of order", "turn without value",
    "ends without answer", "lone surrogate in the text", "longer than max_length", "a question kind named as a report column",
    "a question kind that is not a string",
]


@pytest.mark.parametrize("case_name", BAD_CASES)
def test_bad_record_error_names_file_record_and_field(case_name, write_llava, make_record, make_processor, tmp_path):
    cases = bad_cases(tmp_path / "images", make_record)
    assert sorted(cases) == sorted(BAD_CASES)
    case = cases[case_name]
    path = write_llava([make_record("good-record"), case.record], name="train.json")
    if case.lazy:
        dataset = LlavaJsonDataset(path, tmp_path / "images", input_processor=make_processor(max_length=MAX_LENGTH))
        assert dataset[0]["id"] == "good-record"
        with pytest.raises(DataError) as info:
            dataset[1]
    else:
        with pytest.raises(DataError) as info:
            LlavaJsonDataset(path, tmp_path / "images")
    message = str(info.value)
    assert str(path) in message and "train.json" in message
    assert "record id 'bad-record' (index 1)" in message
    assert f"field '{case.field}'" in message
    assert case.says in message
    assert (info.value.record_id, info.value.index, info.value.field) == ("bad-record", 1, case.field)
    assert isinstance(info.value, ValueError)


def test_errors_from_worker_processes_are_still_data_errors(write_llava, make_record, processor, tmp_path):
    """A DataLoader worker's exception is re-built in the main process as ``type(error)(message)``
    (torch's ExceptionWrapper); done here in-process, since a real worker costs seconds at shutdown."""
    (tmp_path / "images" / "corrupt.png").write_bytes(b"garbage" * 10)
    path = write_llava([make_record("ok"), make_record("broken", image="corrupt.png")], name="train.json")
    dataset = LlavaJsonDataset(path, tmp_path / "images", input_processor=processor)
    try:
        dataset[1]
    except DataError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError, match=r"train.json, record id 'broken' \(index 1\), field 'image': cannot read image file"):
        wrapper.reraise()
    error = DataError.at(path, "bad", record_id="r", index=3, field="image")
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.record_id, copy.index, copy.field, copy.reason) == (str(error), "r", 3, "image", "bad")


def test_template_errors_keep_their_field(write_llava, make_record, make_processor):
    """A ConversationError raised while encoding becomes a DataError with the template's field."""

    @dataclass(frozen=True)
    class Refusing(ChatTemplate):
        def encode(self, *args, **kwargs):
            raise ConversationError("this template refuses", field="conversations[1].value")

    path = write_llava([make_record("refused")])
    dataset = LlavaJsonDataset(path, path.parent / "images", input_processor=make_processor(chat_template=Refusing()))
    with pytest.raises(DataError, match=r"record id 'refused' \(index 0\), field 'conversations\[1\].value': this template refuses"):
        dataset[0]


def test_unreadable_json_file(tmp_path):
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataError, match="broken.json: cannot read the JSON file"):
        LlavaJsonDataset(tmp_path / "broken.json")
    (tmp_path / "object.json").write_text("{}")
    with pytest.raises(DataError, match="object.json: expected a JSON list"):
        LlavaJsonDataset(tmp_path / "object.json")


def test_json_lines_given_for_llava_json_say_so_and_what_is_expected(tmp_path, make_record):
    """json's ``Extra data: line 2 column 1`` named neither JSON Lines nor the format LLaVA's JSON is."""
    lines = tmp_path / "train.jsonl"
    lines.write_text("".join(json.dumps(make_record(f"r{i}")) + "\n" for i in range(3)))
    with pytest.raises(DataError, match=rf"^{lines}: one JSON object per line \(JSON Lines\), not a JSON file: expected LLaVA's "
                       r"instruction JSON, one JSON list of records \[\{\"id\", \"image\", \"conversations\"\}, \.\.\.\] "
                       r"\(records in that form convert with `jq -s \. FILE\.jsonl > FILE\.json`\)$"):
        LlavaJsonDataset(lines)
    spread = tmp_path / "spread.json"  # a JSON list over several lines with more after it: not JSON Lines
    spread.write_text(json.dumps([make_record("r0")], indent=1) + "\n[]\n")
    with pytest.raises(DataError, match=r"spread\.json: cannot read the JSON file: Extra data: line \d+ column 1"):
        LlavaJsonDataset(spread)


def test_skip_bad_records_warns_once_and_counts(write_llava, make_record, make_processor, tmp_path):
    cases = bad_cases(tmp_path / "images", make_record)
    good = [make_record(f"good-{i}") for i in range(4)]
    bad = [{**case.record, "id": f"bad-record-{i}"} for i, case in enumerate(cases.values())]  # ids must be unique
    path = write_llava(good[:2] + bad + good[2:])
    structural = [case for case in cases.values() if not case.lazy]
    lazy = [case for case in cases.values() if case.lazy]

    with pytest.warns(DataWarning) as caught:
        dataset = LlavaJsonDataset(path, tmp_path / "images", skip_bad_records=True)
    per_record, summary = caught[:-1], caught[-1]
    assert len(per_record) == dataset.num_skipped_at_load == len(structural)
    assert {w.message.args[0].split("field ")[1].split(":")[0].strip("'") for w in per_record} == {c.field for c in structural}
    total = len(good) + len(cases)
    assert str(summary.message) == f"{path}: {len(structural)} of {total} records skipped as bad, {len(good) + len(lazy)} kept"
    assert len(dataset.records) == len(good) + len(lazy)
    assert len(dataset) == total  # one position per record of the file: those skipped when read load as None

    dataset.set_input_processor(make_processor(max_length=MAX_LENGTH))
    with warnings.catch_warnings(record=True) as first_pass:
        warnings.simplefilter("always")
        items = [dataset[i] for i in range(len(dataset))]
    assert len(first_pass) == len(lazy)
    assert sum(item is None for item in items) == len(lazy) + len(structural)
    assert all(issubclass(w.category, DataWarning) and "'bad-record-" in str(w.message) for w in first_pass)
    with warnings.catch_warnings(record=True) as second_pass:
        warnings.simplefilter("always")
        assert [dataset[i] is None for i in range(len(dataset))] == [item is None for item in items]
    assert second_pass == []  # once per record

    loader = DataLoader(dataset, batch_size=3, collate_fn=LlavaCollator(0))
    batches = list(loader)
    assert sum(batch["num_skipped"] for batch in batches) == len(lazy) + len(structural)
    assert [i for batch in batches for i in batch["ids"]] == [record["id"] for record in good]


# --- datamodule -----------------------------------------------------------------------------------
def fake_trainer(processor) -> SimpleNamespace:
    backbone = SimpleNamespace(input_processor=lambda: processor)
    return SimpleNamespace(lightning_module=SimpleNamespace(backbone=backbone), strategy=SimpleNamespace(root_device=torch.device("cpu")))


def test_datamodule_takes_the_processor_from_the_trainers_model(write_llava, make_record, processor, tmp_path):
    train = write_llava([make_record(f"t{i}") for i in range(5)], name="train.json")
    val = write_llava([make_record(f"v{i}") for i in range(3)], name="val.json")
    datamodule = LlavaDataModule(str(train), str(val), image_folder=str(tmp_path / "images"), batch_size=2, eval_batch_size=3, num_workers=2)
    datamodule.setup("fit")
    with pytest.raises(RuntimeError, match="no InputProcessor"):
        datamodule.train_dataloader()
    datamodule.trainer = fake_trainer(processor)
    train_loader, val_loader = datamodule.train_dataloader(), datamodule.val_dataloader()
    assert isinstance(train_loader.sampler, RandomSampler) and isinstance(val_loader.sampler, SequentialSampler)
    assert (train_loader.batch_size, val_loader.batch_size) == (2, 3)
    assert train_loader.persistent_workers and train_loader.num_workers == 2
    assert not train_loader.pin_memory
    assert datamodule.datasets["train"].input_processor is processor
    assert datamodule.num_skipped_at_load == {"train": 0, "val": 0}


def test_a_sigterm_from_outside_leaves_the_workers_to_the_main_process(write_llava, make_record, processor, tmp_path):
    """A SIGTERM to the whole process group (SLURM, systemd) reaches the DataLoader workers too: they died of it, and
    the main process failed at its next fetch ("DataLoader worker ... killed by signal"), before Lightning's SIGTERM
    stop could save the run. A worker now ignores it and the loader goes on; the main process ends it."""
    train = write_llava([make_record(f"t{i}") for i in range(8)], name="train.json")
    datamodule = LlavaDataModule(str(train), image_folder=str(tmp_path / "images"), batch_size=2, num_workers=1)
    datamodule.setup("fit")
    datamodule.trainer = fake_trainer(processor)
    loader = datamodule.train_dataloader()
    before = set(multiprocessing.active_children())
    batches = iter(loader)
    ids = list(next(batches)["ids"])
    (worker,) = set(multiprocessing.active_children()) - before
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # sent by another process, as a group signal is
    worker.join(timeout=2)
    assert worker.is_alive()
    ids += [record_id for batch in batches for record_id in batch["ids"]]
    assert sorted(ids) == [f"t{i}" for i in range(8)]
    worker.terminate()  # the main process's own SIGTERM (torch's shutdown, Python's exit) still ends it: ignored, the
    worker.join(timeout=10)  # exit of a process holding a loader hung on it
    assert not worker.is_alive() and worker.exitcode == 0


def test_datamodule_stages(write_llava, make_record, processor, tmp_path):
    train = write_llava([make_record("t0"), make_record("t1")], name="train.json")
    open_record = {"id": "p0", "image": "good.png", "conversations": conversation("<image>\nWhat colour is the circle?")}
    predict = write_llava([open_record, make_record("p1")], name="predict.json")
    datamodule = LlavaDataModule(train_json=str(train), predict_json=str(predict), image_folder=str(tmp_path / "images"), batch_size=2)
    datamodule.set_input_processor(processor)
    datamodule.setup("fit")
    assert datamodule.val_dataloader() == []  # fitting without validation
    with pytest.raises(ValueError, match="test_json"):
        datamodule.setup("test")
    datamodule.setup("predict")  # a prediction input may end with the question
    batch = next(iter(datamodule.predict_dataloader()))
    assert batch["ids"] == ["p0", "p1"] and batch["answers"] == ["", "red"]
    assert torch.equal(batch["prompt_ids"][0], batch["prompt_ids"][1])  # same question, same prompt
    with pytest.raises(DataError, match="field 'conversations'"):
        LlavaDataModule(train_json=str(predict), image_folder=str(tmp_path / "images")).setup("fit")  # ... a training record may not


def test_datamodule_in_a_lightning_fit(write_llava, make_record, processor, tmp_path):
    """The real hook order: setup, then configure_model builds the backbone, then the dataloaders."""
    (tmp_path / "images" / "corrupt.png").write_bytes(b"garbage" * 10)
    records = [make_record(f"t{i}") for i in range(5)] + [make_record("broken", image="corrupt.png")]
    datamodule = LlavaDataModule(
        train_json=str(write_llava(records, name="train.json")),
        val_json=str(write_llava(records[:3], name="val.json")),
        image_folder=str(tmp_path / "images"),
        batch_size=2,
        skip_bad_records=True,
    )

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.skipped = 0
            self.seen: list[str] = []

        def configure_model(self) -> None:
            self.backbone = SimpleNamespace(input_processor=lambda: processor)

        def training_step(self, batch, batch_idx):
            self.skipped += batch["num_skipped"]
            self.seen += batch["ids"]
            if batch["input_ids"].shape[0] == 0:
                return None
            return (self.weight * batch["attention_mask"].sum()).sum()

        def validation_step(self, batch, batch_idx):
            assert batch["answers"] == ["red"] * len(batch["ids"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Module()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    with pytest.warns(DataWarning, match="'broken'"):
        trainer.fit(module, datamodule=datamodule)
    assert module.skipped == 1
    assert sorted(module.seen) == [f"t{i}" for i in range(5)]


# --- majority baseline ----------------------------------------------------------------------------
def test_majority_answers_and_baseline(tmp_path):
    def rec(answer, kind=None):
        out = {"id": answer, "conversations": conversation("q?", answer)}
        if kind:
            out["question_kind"] = kind
        return out

    train = [rec("red", "colour"), rec("Red", "colour"), rec("blue", "colour"), rec("two", "count"), rec("Two", "count"),
             rec("three", "count"), rec("three.", "count"), rec("yes"), {"id": "malformed"}]
    (tmp_path / "train.json").write_text(json.dumps(train))
    assert majority_answers(tmp_path / "train.json") == {"all": "yes", "colour": "red", "count": "2"}  # VQA-normalised; tie "2"/"3": alphabetical
    evaluation = [rec("red", "colour"), rec("blue", "colour"), rec("Three", "count"), rec("no"), rec("circle", "shape")]
    (tmp_path / "test.json").write_text(json.dumps(evaluation))
    assert majority_baseline(tmp_path / "train.json", tmp_path / "test.json") == {
        "colour": 0.5, "count": 0.0, "all": 0.0, "shape": 0.0, "overall": 0.2,
    }
    (tmp_path / "empty.json").write_text("[]")  # a test-only split (num_train=0): no baseline rather than 0%
    assert majority_baseline(tmp_path / "empty.json", tmp_path / "test.json") == {}


def test_the_image_goes_first_on_its_own_line_as_llava_trains(write_llava, make_record, processor):
    # LLaVA's preprocess_multimodal: <image> removed, the text stripped, "<image>\n" put in front
    written = ["<image>\nWhat colour is the circle?", "What colour is the circle?\n<image>",
               "What colour <image> is the circle?  \n", "<image>\n\nWhat colour is the circle?"]  # fmt: skip
    path = write_llava([make_record(f"r{i}", text, "red") for i, text in enumerate(written)])
    dataset = LlavaJsonDataset(path, input_processor=processor, image_folder=path.parent / "images")
    assert [record.questions[0] for record in dataset.records] == [
        "<image>\nWhat colour is the circle?",
        "<image>\nWhat colour is the circle?",
        "<image>\nWhat colour  is the circle?",  # LLaVA strips the ends only
        "<image>\nWhat colour is the circle?",
    ]
    assert all(torch.equal(dataset[i]["input_ids"], dataset[0]["input_ids"]) for i in range(4))


# --- records longer than max_length ---------------------------------------------------------------
def _two_turn_record(record_id: str = "long") -> dict:
    return {"id": record_id, "image": "good.png",
            "conversations": conversation("<image>\nHow many circles are there?", "two", "What colour is the square?", "blue")}  # fmt: skip


@pytest.mark.parametrize("max_length", [40, 36, 30])
def test_a_long_training_record_is_cut_as_llava_cuts_it(write_llava, make_processor, tmp_path, max_length):
    path = write_llava([_two_turn_record()], name="train.json")
    full = LlavaJsonDataset(path, tmp_path / "images", input_processor=make_processor(max_length=64))[0]
    assert len(full["input_ids"]) == 41
    cutting = LlavaJsonDataset(path, tmp_path / "images", input_processor=make_processor(max_length=max_length), cut_overlong=True)
    with pytest.warns(DataWarning, match=rf"record id 'long' \(index 0\): 41 tokens .* first {max_length} tokens"):
        item = cutting[0]
    assert item["input_ids"].tolist() == full["input_ids"][:max_length].tolist()
    assert item["labels"].tolist() == full["labels"][:max_length].tolist()
    # the latency token's place: after the cut sequence's last ignored label (the release's rule)
    labels = item["labels"].tolist()
    expected = max(i for i, label in enumerate(labels) if label == IGNORE_INDEX) + 1
    assert item["prompt_length"] == expected and item["prompt_ids"].tolist() == item["input_ids"][:expected].tolist()
    if max_length == 40:  # cut inside the last answer: its prompt is whole
        assert item["prompt_length"] == full["prompt_length"]


@pytest.mark.parametrize(("max_length", "says"), [(20, "keeps no answer token"), (10, "would cut the image")])
def test_a_cut_that_would_lose_the_image_or_every_answer_is_refused(write_llava, make_processor, tmp_path, max_length, says):
    path = write_llava([_two_turn_record()], name="train.json")
    cutting = LlavaJsonDataset(path, tmp_path / "images", input_processor=make_processor(max_length=max_length), cut_overlong=True)
    with pytest.raises(DataError, match=says) as info:
        cutting[0]
    assert (info.value.record_id, info.value.field) == ("long", "conversations")


def test_the_datamodule_cuts_training_records_only(write_llava, make_processor, tmp_path):
    train = write_llava([_two_turn_record("t")], name="train.json")
    val = write_llava([_two_turn_record("v")], name="val.json")
    datamodule = LlavaDataModule(str(train), str(val), image_folder=str(tmp_path / "images"))
    datamodule.setup("fit")
    for split in ("train", "val"):
        datamodule.datasets[split].set_input_processor(make_processor(max_length=40))
    with pytest.warns(DataWarning, match="as LLaVA's training cuts them"):
        assert len(datamodule.datasets["train"][0]["input_ids"]) == 40
    # evaluation answers the whole prompt: a reference that does not fit beside it is cut for the loss alone, no warning
    full = LlavaJsonDataset(val, tmp_path / "images", input_processor=make_processor(max_length=64))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        item = datamodule.datasets["val"][0]
    assert len(full["input_ids"]) == 41 and item["input_ids"].tolist() == full["input_ids"][:40].tolist()
    assert item["prompt_ids"].tolist() == full["prompt_ids"].tolist() and item["answer"] == "blue"
    datamodule.datasets["val"].set_input_processor(make_processor(max_length=30))  # now the prompt itself is too long
    with pytest.raises(DataError, match="a prompt to answer is never cut"):
        datamodule.datasets["val"][0]
    refusing = LlavaDataModule(str(train), image_folder=str(tmp_path / "images"), cut_overlong=False)
    refusing.setup("fit")
    refusing.datasets["train"].set_input_processor(make_processor(max_length=40))
    with pytest.raises(DataError, match="exceed max_length 40"):
        refusing.datasets["train"][0]


def test_an_opening_gpt_turn_is_dropped_as_llava_does(write_llava, processor, tmp_path):
    """LLaVA's preprocess (and the AdaLLaVA release's) skips a gpt turn that opens a conversation; the record
    trains on the rest, with a warning naming it. Later fields keep their positions in the file."""
    opening = [{"from": "gpt", "value": "Hello, how can I help?"}]
    record = {"id": "opens-with-gpt", "image": "good.png", "conversations": opening + conversation("<image>\nHow many circles are there?", "two")}
    plain = {"id": "plain", "image": "good.png", "conversations": conversation("<image>\nHow many circles are there?", "two")}
    path = write_llava([record, plain])
    with pytest.warns(DataWarning, match=r"1 conversation\(s\) open with a gpt turn \(record ids 'opens-with-gpt'\)"):
        dataset = LlavaJsonDataset(path, path.parent / "images", input_processor=processor)
    assert dataset[0]["input_ids"].tolist() == dataset[1]["input_ids"].tolist()
    assert dataset[0]["labels"].tolist() == dataset[1]["labels"].tolist()

    shifted = {"id": "bad", "conversations": opening + conversation("hi", "  ")}
    with pytest.raises(DataError, match=r"field 'conversations\[2\].value': empty answer"):
        LlavaJsonDataset(write_llava([shifted], name="shifted.json"), tmp_path / "images")
    image_in_opening = {"id": "bad", "conversations": [{"from": "gpt", "value": "<image>\nhi"}, *conversation("q", "a")]}
    with pytest.raises(DataError, match=r"field 'conversations\[0\].value': <image> in an opening gpt turn"):
        LlavaJsonDataset(write_llava([image_in_opening], name="opening.json"), tmp_path / "images")


@pytest.mark.parametrize(("record_id", "type_name"), [({"x": 1}, "dict"), ([1], "list"), (1.5, "float"), (True, "bool")])
def test_an_id_that_is_not_a_string_or_integer_names_file_record_and_field(write_llava, make_record, tmp_path, record_id, type_name):
    # a dict id was stringified ("{'x': 1}") into the answers file
    path = write_llava([make_record("good-record"), make_record(record_id)], name="train.json")
    with pytest.raises(DataError) as info:
        LlavaJsonDataset(path, tmp_path / "images")
    message = str(info.value)
    assert f"{path}, record id {record_id!r} (index 1), field 'id': expected a string or integer, got {type_name}" == message
    assert (info.value.index, info.value.field) == (1, "id")


def test_valid_ids_and_question_kinds_are_kept(write_llava, make_record, tmp_path):
    # LLaVA's ids: strings of digits ("000000033471") or integers; a record may have none (keyed <stem>-<index>);
    # a question kind absent, null or empty is the one group "all" (as the benchmark loaders read an empty group)
    records = [make_record("000000033471", question_kind="colour"), make_record(42), {**make_record(None), "question_kind": None},
               {**make_record("blank"), "question_kind": " "}]  # fmt: skip
    del records[2]["id"]
    path = write_llava(records, name="train.json")
    dataset = LlavaJsonDataset(path, tmp_path / "images")
    kept = [(record.id, record.question_kind) for record in dataset.records]
    assert kept == [("000000033471", "colour"), ("42", "all"), ("train-2", "all"), ("blank", "all")]


def test_records_the_shapes_generator_writes_stay_valid(tmp_path):
    from adaptive_mllm.data.shapes import _write_split, generate_examples

    records = _write_split(tmp_path, "test", generate_examples(6, seed=0, split="test"))
    (tmp_path / "test.json").write_text(json.dumps(records))
    dataset = LlavaJsonDataset(tmp_path / "test.json", tmp_path / "images")
    assert [record.question_kind for record in dataset.records] == [record["question_kind"] for record in records]
    assert [record.id for record in dataset.records] == [record["id"] for record in records]
