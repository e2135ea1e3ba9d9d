"""Reliability (issue 18): each kind of bad input fails early with a message naming the file (and the
record and field), or, with ``skip_bad_records``, is counted and warned about; a run with no usable
record never reports success; a generated data set in use is never replaced by another run.

One test per kind of bad input; the whole module runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from PIL import Image

from adaptive_mllm.checkpoints import CheckpointError, check_checkpoint
from adaptive_mllm.data import DataError, DataWarning, LlavaDataModule, LlavaJsonDataset, ShapesVQADataModule
from adaptive_mllm.data.shapes import generate_shapes_vqa, is_generated
from adaptive_mllm.module import AdaptiveMLLM
from tests.conftest import make_backbone

REPO = Path(__file__).resolve().parents[1]


def record(record_id, image: str | None = "good.png", answer: str = "red", question: str = "What colour is the circle ?") -> dict:
    out = {
        "id": record_id,
        "conversations": [
            {"from": "human", "value": ("<image>\n" if image is not None else "") + question},
            {"from": "gpt", "value": answer},
        ],
    }
    if image is not None:
        out["image"] = image
    return out


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """``{tmp}/data/images`` holding ``good.png`` (valid) and ``corrupt.png``; ``{tmp}/secret.png``
    is a readable image outside the data folder."""
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(images / "good.png")
    (images / "corrupt.png").write_bytes(b"not a PNG file at all" * 10)
    Image.new("RGB", (32, 32), (0, 0, 0)).save(tmp_path / "secret.png")
    return images.resolve()


def write(folder: Path, records: list, name: str = "train.json") -> Path:
    path = folder.parent / name
    path.write_text(json.dumps(records))
    return path


def fake_trainer(processor) -> SimpleNamespace:
    backbone = SimpleNamespace(input_processor=lambda: processor)
    return SimpleNamespace(lightning_module=SimpleNamespace(backbone=backbone), strategy=SimpleNamespace(root_device=torch.device("cpu")))


# --- item 3: image paths stay inside the image folder ------------------------------------------
def refused(path: Path, folder: Path, record_id: str, says: str) -> str:
    with pytest.raises(DataError) as info:
        LlavaJsonDataset(path, folder)
    message = str(info.value)
    assert message.startswith(f"{path}, record id {record_id!r} (index 1), field 'image': "), message
    assert says in message
    return message


def test_image_path_with_dotdot_out_of_the_folder_is_refused(folder, tmp_path):
    path = write(folder, [record("ok"), record("escape", image="../../secret.png")])
    message = refused(path, folder, "escape", "outside the image folder")
    assert os.path.realpath(tmp_path / "secret.png") in message  # where it led
    # `..` that stays inside is fine
    (folder / "sub").mkdir()
    assert LlavaJsonDataset(write(folder, [record("in", image="sub/../good.png")]), folder).records[0].image == folder / "good.png"


def test_absolute_image_path_is_refused(folder, tmp_path):
    secret = str(tmp_path / "secret.png")
    path = write(folder, [record("ok"), record("absolute", image=secret)])
    refused(path, folder, "absolute", f"{secret!r} is an absolute path")
    inside = str(folder / "good.png")  # absolute, even inside: a record names files relative to the folder
    refused(write(folder, [record("ok"), record("absolute", image=inside)]), folder, "absolute", "absolute path")


def test_symlink_out_of_the_image_folder_is_refused(folder, tmp_path):
    os.symlink(tmp_path / "secret.png", folder / "link.png")  # a file link out
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere" / "x.png")
    os.symlink(tmp_path / "elsewhere", folder / "linked_dir")  # a directory link out
    os.symlink("good.png", folder / "alias.png")  # a link that stays inside: allowed
    refused(write(folder, [record("ok"), record("file-link", image="link.png")]), folder, "file-link", "outside the image folder")
    refused(write(folder, [record("ok"), record("dir-link", image="linked_dir/x.png")]), folder, "dir-link", "outside the image folder")
    dataset = LlavaJsonDataset(write(folder, [record("alias", image="alias.png")]), folder)
    assert dataset.records[0].image == folder / "good.png"
    with pytest.warns(DataWarning, match="'file-link'"):  # with skip_bad_records, dropped and counted
        dataset = LlavaJsonDataset(write(folder, [record("ok"), record("file-link", image="link.png")]), folder, skip_bad_records=True)
    assert [r.id for r in dataset.records] == ["ok"] and dataset.num_skipped_at_load == 1


def test_a_link_to_data_stored_elsewhere_is_followed_once_its_target_is_named(folder, tmp_path):
    """LLaVA-665k's layout is often links to where the image sets live (data/llava/coco -> /datasets/coco): refused
    by default with a message that says what to do, read once the target is listed in linked_image_folders, and
    still no way out of both through another link or ``..``."""
    coco = tmp_path / "datasets" / "coco"
    (coco / "train2017").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(coco / "train2017" / "1.png")
    os.symlink(coco, folder / "coco")
    os.symlink(tmp_path / "secret.png", coco / "train2017" / "secret.png")  # a link out of the linked folder too
    path = write(folder, [record("ok"), record("linked", image="coco/train2017/1.png")])
    message = refused(path, folder, "linked", "outside the image folder")
    assert "name its target in linked_image_folders" in message
    datamodule = LlavaDataModule(test_json=str(path), image_folder=str(folder), linked_image_folders=[str(coco)])
    datamodule.setup("test")
    assert datamodule.datasets["test"].records[1].image == (coco / "train2017" / "1.png").resolve()
    for escape in ("coco/train2017/secret.png", "coco/../../secret.png"):
        escaping = write(folder, [record("ok"), record("out", image=escape)], name="escape.json")
        with pytest.raises(DataError, match=r"field 'image': .* outside the image folder .* and the linked folders"):
            LlavaDataModule(test_json=str(escaping), image_folder=str(folder), linked_image_folders=[str(coco)]).setup("test")


# --- item 4: duplicate ids -----------------------------------------------------------------------
def test_duplicate_record_ids_are_refused(folder):
    path = write(folder, [record("a"), record("b"), record("a")])
    with pytest.raises(DataError) as info:
        LlavaJsonDataset(path, folder)
    assert str(info.value) == f"{path}, record id 'a' (index 2), field 'id': duplicate id: record 0 has the same id"
    # ids are compared as the strings answers are keyed by: 7 and "7" collide
    with pytest.raises(DataError, match=r"record id '7' \(index 1\), field 'id': duplicate id: record 0"):
        LlavaJsonDataset(write(folder, [record(7), record("7")], name="sevens.json"), folder)
    with pytest.warns(DataWarning, match="duplicate id"):
        dataset = LlavaJsonDataset(path, folder, skip_bad_records=True)
    assert [r.id for r in dataset.records] == ["a", "b"] and dataset.num_skipped_at_load == 1


# --- item 5: nothing to use ------------------------------------------------------------------------
def test_empty_json_list_fails_at_setup_naming_the_file(folder):
    path = write(folder, [])
    datamodule = LlavaDataModule(train_json=str(path), image_folder=str(folder))
    with pytest.raises(DataError) as info:
        datamodule.setup("fit")
    assert str(info.value) == f"{path}: the JSON list is empty: no records to use"


def test_every_record_skipped_when_read_fails_at_setup(folder):
    path = write(folder, [record("missing", image="nowhere.png"), {"id": "no-turns"}])
    datamodule = LlavaDataModule(train_json=str(path), image_folder=str(folder), skip_bad_records=True)
    with pytest.warns(DataWarning), pytest.raises(DataError) as info:
        datamodule.setup("fit")
    assert str(info.value) == f"{path}: all 2 records are bad and were skipped (see the warnings above): no records to use"


# --- item 6: every record bad when loaded, with skip_bad_records ------------------------------------
class CountingModule(L.LightningModule):
    """Sums ``num_skipped`` as AdaptiveMLLM does; its backbone only gives the InputProcessor."""

    def __init__(self, processor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.processor = processor
        self.steps = 0

    def configure_model(self) -> None:
        self.backbone = SimpleNamespace(input_processor=lambda: self.processor)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        if batch["input_ids"].shape[0] == 0:
            return None
        return (self.weight * batch["attention_mask"].sum()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_every_record_bad_when_loaded_never_reports_success(folder, tokenizer_dir, tmp_path):
    processor = make_backbone(tokenizer_dir).input_processor()
    long_question = " ".join(["circle"] * (processor.max_length + 1))
    path = write(folder, [record("corrupt", image="corrupt.png"), record("too-long", image=None, question=long_question)])
    datamodule = LlavaDataModule(train_json=str(path), image_folder=str(folder), batch_size=2, skip_bad_records=True)
    module = CountingModule(processor)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, default_root_dir=tmp_path / "run", logger=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.warns(DataWarning) as caught, pytest.raises(DataError) as info:
        trainer.fit(module, datamodule=datamodule)
    assert str(info.value) == (
        f"{path}: none of the 2 records is usable: 0 skipped when the file was read, 2 when their items were "
        "loaded (see the warnings above)"
    )
    assert module.steps == 0 and not list((tmp_path / "run").rglob("*.ckpt"))  # no step, no checkpoint
    assert {"'corrupt'", "'too-long'"} <= {word for w in caught for word in str(w.message).split() if word.startswith("'")}


# --- item 7: records skipped when read are counted ----------------------------------------------------
def test_records_skipped_when_read_are_logged_in_skipped_records(folder, tokenizer_dir, tmp_path):
    """Five records: three good, one dropped when the file is read (missing image), one when its item
    is loaded (corrupt image): train/skipped_records must be 2, as AdaptiveMLLM logs it."""
    records = [record("g0"), record("missing", image="nowhere.png"), record("g1"), record("corrupt", image="corrupt.png"), record("g2")]
    path = write(folder, records)
    datamodule = LlavaDataModule(train_json=str(path), image_folder=str(folder), batch_size=2, skip_bad_records=True)
    model = AdaptiveMLLM(make_backbone(tokenizer_dir), freeze=[])
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=datamodule)
    assert trainer.callback_metrics["train/skipped_records"].item() == 2.0
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert f"{path}: 1 of 5 records skipped as bad, 4 kept" in messages


def test_records_skipped_in_test_and_predict_are_said_and_left_out_of_the_baseline(folder, tokenizer_dir, tmp_path):
    """Six test records, two bad (one found when read, one when loaded): the report says 4 scored and 2 skipped, and
    its majority baseline is taken over the 4 scored; predict's predict_done.json counts the 2 without an answer."""
    from adaptive_mllm.callbacks import SweepReport
    from adaptive_mllm.data.llava_json import majority_baseline
    from adaptive_mllm.prediction_writer import DONE, PredictionWriter

    train = write(folder, [record(f"t{i}", answer=answer) for i, answer in enumerate(["red", "red", "blue"])])
    tests = [record("a", answer="red"), record("missing", image="nowhere.png", answer="blue"), record("b", answer="blue"),
             record("corrupt", image="corrupt.png", answer="red"), record("c", answer="blue"), record("d", answer="blue")]
    test = write(folder, tests, name="test.json")
    datamodule = LlavaDataModule(train_json=str(train), test_json=str(test), predict_json=str(test), image_folder=str(folder),
                                 batch_size=2, skip_bad_records=True)
    model = AdaptiveMLLM(make_backbone(tokenizer_dir), max_new_tokens=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path / "run", callbacks=[SweepReport(), PredictionWriter(str(tmp_path / "answers"))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        trainer.test(model, datamodule=datamodule)
        trainer.predict(model, datamodule=datamodule, return_predictions=False)
    table = (tmp_path / "run" / "test_results.md").read_text()
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]] for line in table.splitlines()}
    assert rows["questions scored"][0] == "4" and rows["records skipped as bad"][0] == "2"
    baseline = majority_baseline(train, test, ids={"a", "b", "c", "d"})["overall"]  # red answers 1 of the 4 kept
    assert baseline == 0.25 != majority_baseline(train, test)["overall"]
    assert rows["overall"][1] == f"{100 * baseline:.1f}%"
    done = json.loads((tmp_path / "answers" / DONE).read_text())
    assert (done["total"], done["skipped_records"]) == (4, 2)


# --- item 8: broken checkpoint files ----------------------------------------------------------------
def test_empty_or_truncated_checkpoint_is_named(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.arange(1000.0)}, "global_step": 3, "pytorch-lightning_version": "2.6.0"}, good)
    assert check_checkpoint(good) == good
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        check_checkpoint(empty)
    assert str(info.value).startswith(f"checkpoint {empty}: the file is empty (0 bytes)")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(RuntimeError) as torch_error:  # what the check saves users from: no file named
        torch.load(truncated)
    assert "truncated.ckpt" not in str(torch_error.value)
    with pytest.raises(CheckpointError) as info:
        check_checkpoint(truncated)
    assert str(info.value).startswith(f"checkpoint {truncated} ({truncated.stat().st_size} bytes): not a complete PyTorch checkpoint")
    with pytest.raises(CheckpointError, match="no such file"):
        check_checkpoint(tmp_path / "absent.ckpt")


def test_a_file_or_directory_that_is_no_lightning_checkpoint_is_named(tmp_path):
    bare = tmp_path / "weights.pt"
    torch.save({"model.w": torch.zeros(3)}, bare)  # a bare state dict
    with pytest.raises(CheckpointError, match=r"weights.pt: a PyTorch file but not a Lightning checkpoint \(no 'state_dict', "
                                              r"'pytorch-lightning_version'; found \['model.w'\]\)"):
        check_checkpoint(bare)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model: a directory, but not a sharded Lightning checkpoint"):
        check_checkpoint(folder)
    (folder / ".metadata").write_bytes(b"")  # what a sharded (FSDP) checkpoint holds: left to Lightning
    assert check_checkpoint(folder) == folder


# --- item 10: a generated set is never replaced (audit defect 3: runs trained on it read its tokenizer) ---
SMALL = {"num_train": 6, "num_val": 3, "num_test": 3}
# A second run that uses the set: it holds the set as a datamodule does (DirectoryLock.shared), with
# the lock module loaded by path so that the process starts in a blink (no torch import).
HOLDER = textwrap.dedent(
    """
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("directory_lock", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lock = module.DirectoryLock(sys.argv[2])
    lock.shared()
    print("holding", flush=True)
    sys.stdin.readline()  # until killed
    """
)


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def few_attempts(monkeypatch):
    """Decide "held by another run" after 3 tries instead of ~3 s of them."""
    monkeypatch.setattr("adaptive_mllm.data.shapes._LOCK_ATTEMPTS", 3)


def hold_in_another_process(data_dir: Path) -> subprocess.Popen:
    lock_module = REPO / "adaptive_mllm" / "data" / "directory_lock.py"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock_module), str(data_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "holding"
    return holder


def test_a_set_in_use_by_another_process_is_never_replaced(tmp_path, few_attempts):
    data_dir = generate_shapes_vqa(tmp_path / "shapes", **SMALL)
    holder = hold_in_another_process(data_dir)
    try:
        before = files(data_dir)
        other = ShapesVQADataModule(data_dir=str(data_dir), num_train=8, num_val=3, num_test=3)
        with pytest.raises(FileExistsError) as info:
            other.prepare_data()
        assert str(info.value).startswith(f"{data_dir} holds another shapes-VQA set (sizes 6 / 3 / 3, seed 0,")
        assert files(data_dir) == before  # the running set is untouched
        same = ShapesVQADataModule(data_dir=str(data_dir), **SMALL)  # the same set is shared
        same.prepare_data()
        same.setup("fit")
        same.teardown("fit")
    finally:
        holder.kill()  # kill -9: the operating system drops its lock
        holder.wait(timeout=30)
    with pytest.raises(FileExistsError, match="not replaced"):
        other.prepare_data()  # nobody uses the set now, but the runs trained on it still read its tokenizer
    assert files(data_dir) == before


def test_an_incomplete_set_in_use_by_another_process_is_not_written(tmp_path, few_attempts):
    """A set a run was writing when it stopped is completed by the next run, unless some run holds the
    directory: then nothing is written and the error says that it is in use."""
    data_dir = generate_shapes_vqa(tmp_path / "shapes", **SMALL)
    (data_dir / "meta.json").write_text('{"dataset": "shapes-vqa", "format_version": 2, "state": "being written"}\n')
    holder = hold_in_another_process(data_dir)
    try:
        before = files(data_dir)
        with pytest.raises(RuntimeError, match=rf"^{data_dir} is in use by another run and does not hold the shapes-VQA set asked for"):
            generate_shapes_vqa(data_dir, **{**SMALL, "num_train": 8})
        assert files(data_dir) == before
    finally:
        holder.kill()
        holder.wait(timeout=30)
    generate_shapes_vqa(data_dir, **{**SMALL, "num_train": 8})
    assert is_generated(data_dir, **{**SMALL, "num_train": 8})


def test_a_datamodule_holds_its_set_and_another_set_is_refused_there(tmp_path, few_attempts):
    data_dir = tmp_path / "shapes"
    first = ShapesVQADataModule(data_dir=str(data_dir), **SMALL)
    first.prepare_data()
    first.setup("fit")
    second = ShapesVQADataModule(data_dir=str(data_dir), **{**SMALL, "num_test": 4})
    with pytest.raises(FileExistsError, match="holds another shapes-VQA set"):
        second.prepare_data()
    assert is_generated(data_dir, **SMALL)
    first.teardown("fit")
    with pytest.raises(FileExistsError, match="holds another shapes-VQA set"):
        second.prepare_data()  # released, but still the set of the first run's tokenizer
    assert is_generated(data_dir, **SMALL)
    second.teardown("fit")


def test_an_interrupted_generation_leaves_the_previous_files(tmp_path, monkeypatch):
    data_dir = generate_shapes_vqa(tmp_path / "shapes", **SMALL)
    (data_dir / "val.json").unlink()  # an incomplete set: written again
    before = files(data_dir)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the run were stopped while it trained the tokenizer

    monkeypatch.setattr("adaptive_mllm.data.shapes.train_word_tokenizer", killed)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes_vqa(data_dir, **SMALL)
    assert {name: data for name, data in files(data_dir).items() if not name.startswith(".generating")} == before
    monkeypatch.undo()
    generate_shapes_vqa(data_dir, **SMALL)  # the next try writes it and tidies up
    assert is_generated(data_dir, **SMALL) and not (data_dir / ".generating").exists()
