"""A bad record met by one of several processes stops every process at the same batch, and ``last.ckpt`` keeps the
steps done, as with one process. Before, only the process that met it stopped: the others went on into the next
step's collectives, nothing was saved, and every step since the last periodic save was lost."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from adaptive_mllm.backbones.base import InputProcessor
from adaptive_mllm.backbones.templates import plain_chat
from adaptive_mllm.checkpoints import RunCheckpoint
from adaptive_mllm.data.errors import DataError
from adaptive_mllm.data.llava_json import (
    CarriedBatch,
    LlavaDataModule,
    StoppingTogetherDataLoader,
    StoppingTogetherResumableDataLoader,
    stop_together,
)
from adaptive_mllm.data.resumable import ResumableDataLoader, ResumableSampler

REPO = Path(__file__).parents[1]
NUM_RECORDS = 16


def preprocess(image: Image.Image) -> torch.Tensor:
    """[3, 8, 8] in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB").resize((8, 8)), dtype=np.float32) / 255.0).permute(2, 0, 1)


def make_processor(tokenizer_dir: str | Path) -> InputProcessor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return InputProcessor(
        tokenizer=tokenizer, chat_template=plain_chat(), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        num_image_tokens=2, max_length=64, preprocess_image=preprocess,
    )  # fmt: skip


def write_records(folder: Path, name: str, count: int) -> Path:
    """``count`` one-turn records ``{name}{i}``, each with its own image ``{name}{i}.png``."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        Image.new("RGB", (8, 8), (index * 15, 30, 200)).save(folder / "images" / f"{name}{index}.png")
        question = "<image>\nWhat colour is the red circle ?"
        conversations = [{"from": "human", "value": question}, {"from": "gpt", "value": "blue"}]
        records.append({"id": f"{name}{index}", "image": f"{name}{index}.png", "conversations": conversations})
    path = folder / f"{name}.json"
    path.write_text(json.dumps(records))
    return path


class Reader(L.LightningModule):
    """One weight trained on each batch's mean token id; the record ids of every step it trains, in ``seen``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(list(batch["ids"]))
        return self.layer(batch["input_ids"].float().mean(dim=1, keepdim=True)).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class ImageGoesMissing(L.Callback):
    """Deletes the image of the record at ``position`` of this process's training order once the order is drawn
    (after the first step; the datasets checked that every image exists when they were built)."""

    def __init__(self, position: int) -> None:
        self.position = position
        self.deleted: Path | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.deleted is None:
            sampler = trainer.train_dataloader.sampler
            dataset = trainer.train_dataloader.dataset
            record = dataset.records[sampler.indices(sampler.epoch)[self.position]]
            record.image.unlink()
            self.deleted = record.image  # once


def _fit_one_process(root: Path, tokenizer_dir, missing_at: int | None = None, ckpt_path=None) -> Reader:
    L.seed_everything(0)
    data = LlavaDataModule(train_json=str(root / "train.json"), image_folder=str(root / "images"), batch_size=1)
    data.set_input_processor(make_processor(tokenizer_dir))
    callbacks: list = [RunCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=100)]
    if missing_at is not None:
        callbacks.append(ImageGoesMissing(missing_at))
    trainer = L.Trainer(
        default_root_dir=root, max_steps=6, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    model = Reader()
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model


def test_stopping_together_leaves_the_state_a_raise_at_fetch_leaves(tmp_path, tokenizer_dir, monkeypatch):
    """The decision is taken as the loader hands the batch out, where one process alone raises its bad record: the
    fit stops in the same state, saves the same loop counters (the batches consumed: the bad record's batch is read
    again on resume), and warns the same. Here one process, the stop-together path forced on."""
    for run in ("alone", "together"):
        write_records(tmp_path / run, "train", NUM_RECORDS)
    with pytest.warns(UserWarning, match=r"a bad record stopped the fit at step 3: .*last\.ckpt holds step 3 \(resume with"):
        with pytest.raises(DataError, match="cannot read image file") as alone:
            _fit_one_process(tmp_path / "alone", tokenizer_dir, missing_at=3)
    monkeypatch.setattr(LlavaDataModule, "_stops_together", lambda self: True)
    with pytest.warns(UserWarning, match=r"a bad record stopped the fit at step 3: .*last\.ckpt holds step 3 \(resume with"):
        with pytest.raises(DataError, match="cannot read image file") as together:
            _fit_one_process(tmp_path / "together", tokenizer_dir, missing_at=3)
    assert together.value.stopped_together and not alone.value.stopped_together
    assert together.value.met_by_process is None  # this process met it
    alone_saved, saved = (torch.load(tmp_path / run / "ckpt" / "last.ckpt", weights_only=False) for run in ("alone", "together"))
    assert saved["loops"] == alone_saved["loops"] and saved["global_step"] == alone_saved["global_step"] == 3
    batches = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    assert batches["current"]["ready"] == batches["current"]["completed"] == 3 and not batches["is_last_batch"]
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches_consumed"] == 3
    assert all(torch.equal(tensor, alone_saved["state_dict"][name]) for name, tensor in saved["state_dict"].items())
    state, alone_state = _random_state(saved), _random_state(alone_saved)  # the draws after a resume go on alike
    assert torch.equal(state["torch"], alone_state["torch"]) and state["python"] == alone_state["python"]


def _random_state(checkpoint: dict) -> dict:
    (states,) = [state["random_states"] for name, state in checkpoint["callbacks"].items() if name.startswith("RunCheckpoint")]
    return states[0]


def test_a_resume_trains_on_the_bad_records_batch(tmp_path, tokenizer_dir, monkeypatch):
    """Stopped together, fixed and resumed: the batches trained are those of a run that never stopped."""
    monkeypatch.setattr(LlavaDataModule, "_stops_together", lambda self: True)
    for run in ("whole", "stopped"):
        write_records(tmp_path / run, "train", NUM_RECORDS)
    whole = _fit_one_process(tmp_path / "whole", tokenizer_dir)
    with pytest.warns(UserWarning, match="a bad record stopped the fit at step 3"), pytest.raises(DataError):
        _fit_one_process(tmp_path / "stopped", tokenizer_dir, missing_at=3)
    (missing,) = [path for path in (tmp_path / "whole" / "images").iterdir() if not (tmp_path / "stopped" / "images" / path.name).exists()]
    Image.new("RGB", (8, 8)).save(tmp_path / "stopped" / "images" / missing.name)  # the image restored
    last = tmp_path / "stopped" / "ckpt" / "last.ckpt"
    resumed = _fit_one_process(tmp_path / "stopped", tokenizer_dir, ckpt_path=last)
    assert len(whole.seen) == 6 and resumed.seen == whole.seen[3:]  # steps 4-6, from the bad record's batch on
    assert missing.stem in resumed.seen[0]
    assert torch.load(last, weights_only=False)["global_step"] == 6


class _Strategy:
    """Process 0 of 2, as stop_together sees it: ``reduce_boolean_decision`` ors in the other process's vote."""

    def __init__(self, *others: bool) -> None:
        self.others = list(others)

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        assert not all
        return decision or self.others.pop(0)


def test_a_process_without_a_bad_record_stops_with_the_one_that_met_it(monkeypatch):
    import adaptive_mllm.data.llava_json as llava_json

    met = DataError.at("train.json", "cannot read image file x.png: gone", record_id="r7", index=7, field="image")
    monkeypatch.setattr(llava_json, "every_process", lambda bad_record: [bad_record, met])
    trainer = SimpleNamespace(strategy=_Strategy(False, True), world_size=2)
    stop_together(None, trainer)  # no bad record anywhere: the batch is trained on
    with pytest.raises(DataError, match=r"process 1 of 2 met a bad record, and every process stops with it: train\.json, "
                       r"record id 'r7' \(index 7\), field 'image': cannot read image file x\.png") as stopped:
        stop_together(None, trainer)
    assert stopped.value.stopped_together and stopped.value.met_by_process == 1
    assert (stopped.value.record_id, stopped.value.field, stopped.value.json_path) == ("r7", "image", "train.json")
    assert not trainer.strategy.others  # one decision per batch


def _datamodule(world_size: int, fn: str = "fit", skip: bool = False) -> LlavaDataModule:
    processor = SimpleNamespace(pad_token_id=0)
    data = LlavaDataModule(train_json="train.json", val_json="val.json", skip_bad_records=skip)
    data.input_processor = lambda: processor
    data.datasets = {split: _Plain() for split in ("train", "val")}
    data.trainer = SimpleNamespace(
        world_size=world_size, state=SimpleNamespace(fn=fn), strategy=SimpleNamespace(root_device=torch.device("cpu")),
        distributed_sampler_kwargs={"num_replicas": world_size, "rank": 0}, accumulate_grad_batches=1,
    )  # fmt: skip
    return data


class _Plain(torch.utils.data.Dataset):
    carry_bad_records = False

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index):
        return index

    def set_input_processor(self, processor) -> None:
        pass

    def check_usable(self) -> None:
        pass


@pytest.mark.parametrize("world_size, fn, skip, together", [
    (2, "fit", False, True),
    (2, "validate", False, True),
    (2, "test", False, True),
    (2, "predict", False, False),  # the processes' shares differ: no round per batch
    (2, "fit", True, False),  # skip_bad_records: dropped with a warning, as before
    (1, "fit", False, False),  # one process: raised where it is met, as before
])
def test_the_loaders_stop_together_under_several_processes_only(world_size, fn, skip, together):
    data = _datamodule(world_size, fn, skip)
    train, val = data.train_dataloader(), data.val_dataloader()
    assert isinstance(train, ResumableDataLoader) and isinstance(train, StoppingTogetherResumableDataLoader) == together
    assert isinstance(val, StoppingTogetherDataLoader) == together
    assert data.datasets["train"].carry_bad_records == together
    if together:
        assert isinstance(train.sampler, ResumableSampler) and train.sampler.num_replicas == 2
        error = DataError("train.json, record id 'r1' (index 1), field 'image': cannot read image file")
        carried = train.collate_fn([None, error, None])  # a skipped position, the bad record, another
        assert isinstance(carried, CarriedBatch) and carried.bad_record is error and carried.batch["input_ids"].shape[0] == 0


RANK_SCRIPT = """
import json, sys
from pathlib import Path
import lightning as L
from adaptive_mllm.checkpoints import RunCheckpoint
from adaptive_mllm.data.errors import DataError
from adaptive_mllm.data.llava_json import LlavaDataModule
from tests.test_bad_record_processes import Reader, make_processor

root, tokenizer_dir, phase, missing, workers = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])

class Missing(L.Callback):
    def on_train_start(self, trainer, pl_module):
        if missing and trainer.global_rank == 0:
            (root / "images" / missing).unlink()  # gone after the datasets were built
        trainer.strategy.barrier()

class Logged(Reader):
    def training_step(self, batch, batch_idx):
        with open(root / f"seen-{phase}.rank{self.global_rank}.jsonl", "a") as file:
            file.write(json.dumps({"step": self.global_step + 1, "ids": list(batch["ids"])}) + "\\n")
        return super().training_step(batch, batch_idx)

L.seed_everything(0)
val = root / "val.json"
data = LlavaDataModule(train_json=str(root / "train.json"), val_json=str(val) if val.exists() else None,
                       image_folder=str(root / "images"), batch_size=1, num_workers=workers)
data.set_input_processor(make_processor(tokenizer_dir))
trainer = L.Trainer(
    default_root_dir=root, accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False,
    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=2,
    limit_val_batches=2, callbacks=[RunCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=2), Missing()],
)
try:
    trainer.fit(Logged(), datamodule=data, ckpt_path=root / "ckpt" / "last.ckpt" if phase == "resumed" else None)
except DataError as error:
    print(f"DataError on process {trainer.global_rank}: {error}", flush=True)
    sys.exit(3)
"""


def _run_two_processes(root: Path, tokenizer_dir, phase: str, missing: str = "", workers: int = 0, timeout: float = 60):
    """Both processes' (exit codes, output), each started as torchrun starts it; a process still running after
    ``timeout`` seconds (blocked in a collective) is killed, and its exit code is None."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (root / "ranks.py").write_text(RANK_SCRIPT)
    processes = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "WORLD_SIZE": "2", "NODE_RANK": "0", "RANK": str(rank), "LOCAL_RANK": str(rank)}  # fmt: skip
        command = [sys.executable, str(root / "ranks.py"), str(root), str(tokenizer_dir), phase, missing, str(workers)]
        processes.append(subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs, codes = [], []
    try:
        for process in processes:
            try:
                outputs.append(process.communicate(timeout=timeout)[0])
                codes.append(process.returncode)
            except subprocess.TimeoutExpired:
                process.kill()
                outputs.append(process.communicate()[0] + "\n[killed: still running after the timeout]")
                codes.append(None)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return codes, outputs


def _seen(root: Path, phase: str, rank: int) -> list[list[str]]:
    path = root / f"seen-{phase}.rank{rank}.jsonl"
    return [json.loads(line)["ids"] for line in path.read_text().splitlines()] if path.exists() else []


def test_two_processes_stop_together_on_a_bad_record_one_meets_and_resume_from_that_step(tmp_path, tokenizer_dir):
    """16 records on 2 processes, batch 1, a save every 2 steps, one DataLoader worker each: the image of the record
    that process 1 reads in its 4th batch goes missing. Both stop at step 3 (before, process 0 went on into step 4's
    gradient all-reduce, which process 1 never joined, and step 3 was lost); restored, the run resumes at step 3 and
    trains on the batches an uninterrupted run trains on, the bad record's batch first."""
    write_records(tmp_path, "train", NUM_RECORDS)
    order = {rank: ResumableSampler(range(NUM_RECORDS), num_replicas=2, rank=rank, seed=0).indices(0) for rank in (0, 1)}
    bad = f"train{order[1][3]}"
    codes, outputs = _run_two_processes(tmp_path, tokenizer_dir, "stopped", missing=f"{bad}.png", workers=1)
    said = "\n".join(f"--- process {rank} (exit {code}) ---\n{output[-3000:]}" for rank, (code, output) in enumerate(zip(codes, outputs, strict=True)))
    assert codes == [3, 3], said  # both stopped on the DataError, neither blocked
    last = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["global_step"] == 3, said  # before: step 2, the periodic save
    batches = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert batches["ready"] == batches["completed"] == 3  # as one process saves it: the bad batch not consumed
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches_consumed"] == 3
    assert f"DataError on process 1: {tmp_path / 'train.json'}, record id '{bad}'" in outputs[1]
    assert f"DataError on process 0: process 1 of 2 met a bad record, and every process stops with it: {tmp_path / 'train.json'}, record id '{bad}'" in outputs[0]
    assert f"a bad record stopped the fit at step 3: {last} holds step 3 (resume with --ckpt_path {last})" in outputs[1]
    assert f"a bad record met by process 1 (see its error) stopped the fit at step 3: {last} holds step 3" in outputs[0]
    for rank in (0, 1):
        assert _seen(tmp_path, "stopped", rank) == [[f"train{i}"] for i in order[rank][:3]]  # no process trained past it

    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "images" / f"{bad}.png")  # the image restored
    codes, outputs = _run_two_processes(tmp_path, tokenizer_dir, "resumed", workers=1)
    assert codes == [0, 0], "\n".join(output[-3000:] for output in outputs)
    assert torch.load(last, weights_only=False)["global_step"] == 6
    for rank in (0, 1):  # steps 4-6: the uninterrupted run's, from the bad record's batch on
        assert _seen(tmp_path, "resumed", rank) == [[f"train{i}"] for i in order[rank][3:6]]
    assert _seen(tmp_path, "resumed", 1)[0] == [bad]


def test_two_processes_stop_together_on_a_bad_validation_record(tmp_path, tokenizer_dir):
    """Process 1's first validation record (DistributedSampler: records 1, 3) has lost its image: both stop in the
    validation at step 2, nothing saved then (as with one process), the periodic save of step 2 kept."""
    write_records(tmp_path, "train", NUM_RECORDS)
    write_records(tmp_path, "val", 4)
    codes, outputs = _run_two_processes(tmp_path, tokenizer_dir, "stopped", missing="val1.png")
    said = "\n".join(output[-3000:] for output in outputs)
    assert codes == [3, 3], said
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2
    assert "DataError on process 1: " in outputs[1] and "record id 'val1'" in outputs[1]
    assert "DataError on process 0: process 1 of 2 met a bad record" in outputs[0]
    for rank, bad in ((0, "a bad record met by process 1 (see its error)"), (1, "a bad record")):
        assert f"{bad} stopped the fit at step 2, while validating: nothing saved now" in outputs[rank], said
