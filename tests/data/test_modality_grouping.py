"""LLaVA's group_by_modality_length order: equal to LLaVA's own code's (fixture), every optimizer step one
modality, micro-batches dealt to processes, resumed epochs, and the datamodule's switch."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from adaptive_mllm.data import LlavaDataModule
from adaptive_mllm.data.llava_json import DataWarning, parse_record
from adaptive_mllm.data.modality_grouping import ModalityGroupedSampler, modality_grouped_order
from adaptive_mllm.data.resumable import ResumableSampler

FIXTURE = json.loads(Path(__file__).with_name("release_modality_order.json").read_text())


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=lambda case: f"seed{case['seed']}")
def test_the_order_is_llavas_for_the_same_random_numbers(case):
    """LLaVA's sampler drew from torch's global generator seeded with ``seed``; ours from a generator seeded alike."""
    generator = torch.Generator().manual_seed(case["seed"])
    assert modality_grouped_order(case["lengths"], case["micro_batch"], case["chunks"], generator) == case["order"]


def test_the_fixture_covers_both_modalities_and_each_alone():
    kinds = {(any(x > 0 for x in case["lengths"]), any(x < 0 for x in case["lengths"])) for case in FIXTURE["cases"]}
    assert kinds == {(True, True), (True, False), (False, True)}


def _lengths(count: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    words = torch.randint(1, 200, (count,), generator=generator).tolist()
    image = (torch.rand(count, generator=generator) < 0.7).tolist()
    return [w if i else -w for w, i in zip(words, image, strict=True)]


@pytest.mark.parametrize("micro_batch, chunks", [(2, 4), (4, 1), (3, 2)])
def test_every_step_is_one_modality_but_the_last_and_micro_batches_are_balanced(micro_batch, chunks):
    lengths = _lengths(203, seed=micro_batch * 10 + chunks)
    order = modality_grouped_order(lengths, micro_batch, chunks, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(len(lengths)))  # each record once
    step = micro_batch * chunks
    images, texts = sum(x > 0 for x in lengths), sum(x < 0 for x in lengths)
    full_steps = -(-images // step) - 1 + -(-texts // step) - 1  # each modality's last megabatch (even full) goes last
    for number in range(full_steps):
        records = order[number * step : (number + 1) * step]
        signs = {lengths[i] > 0 for i in records}
        assert len(signs) == 1, f"step {number} mixes modalities"
        totals = [sum(abs(lengths[i]) for i in records[k * micro_batch : (k + 1) * micro_batch]) for k in range(chunks)]
        # greedy balancing of a longest-first list: totals differ by at most the longest record
        assert max(totals) - min(totals) <= max(abs(lengths[i]) for i in records)
    tail = order[full_steps * step :]  # the two last megabatches, together, by index
    assert tail == sorted(tail) and len(tail) == (images - 1) % step + 1 + (texts - 1) % step + 1


def test_processes_get_whole_micro_batches_of_one_step():
    lengths = _lengths(50, seed=3)
    dataset = list(range(50))
    shares = [list(ModalityGroupedSampler(dataset, lengths, 2, 2, num_replicas=2, rank=rank, seed=7)) for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == len(ModalityGroupedSampler(dataset, lengths, 2, 2, num_replicas=2, seed=7))
    order = modality_grouped_order(lengths, 2, 4, torch.Generator().manual_seed(7))  # epoch 0: seed + 0
    assert shares[0][:4] == order[0:2] + order[4:6] and shares[1][:4] == order[2:4] + order[6:8]
    assert set(shares[0]) | set(shares[1]) == set(dataset)
    assert isinstance(ModalityGroupedSampler(dataset, lengths, 2), ResumableSampler)


def test_a_resumed_epoch_is_the_rest_of_the_interrupted_one():
    lengths = _lengths(40, seed=5)
    sampler = ModalityGroupedSampler(list(range(40)), lengths, 4, seed=11)
    sampler.set_epoch(2)
    whole = list(sampler)
    restarted = ModalityGroupedSampler(list(range(40)), lengths, 4, seed=0)
    restarted.load_state_dict(sampler.state_dict(), skip=12)
    assert list(restarted) == whole[12:]
    with pytest.warns(UserWarning, match="micro-batches of 4 x 1"):
        ModalityGroupedSampler(list(range(40)), lengths, 2).load_state_dict(sampler.state_dict())


def test_a_records_words_are_counted_as_written(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    raw = {"image": "a.png", "conversations": [
        {"from": "gpt", "value": "Hi there"}, {"from": "human", "value": "What is  this?\n<image>"},
        {"from": "gpt", "value": "A cat."}]}  # fmt: skip
    record = parse_record(raw, 0, "x.json", tmp_path)
    assert record.dropped_opening_answer and record.questions == ("<image>\nWhat is  this?",)
    assert record.words == 2 + 4 + 2  # LLaVA counts every turn of the record, the dropped one too


def test_the_datamodule_trains_in_grouped_steps(write_llava, make_record, processor, tmp_path):
    records = [make_record(f"i{n}", answer="red " * (n % 5 + 1)) for n in range(9)]
    records += [make_record(f"t{n}", question="What colour is the circle?", image=None) for n in range(7)]
    train = write_llava(records, name="train.json")
    datamodule = LlavaDataModule(str(train), image_folder=str(tmp_path / "images"), batch_size=2, group_by_modality_length=True)
    datamodule.setup("fit")
    datamodule.set_input_processor(processor)
    datamodule.trainer = SimpleNamespace(accumulate_grad_batches=2, fit_loop=None, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    loader = datamodule.train_dataloader()
    assert isinstance(loader.sampler, ModalityGroupedSampler) and loader.sampler.accumulation == 2
    batches = [batch["ids"] for batch in loader]
    kinds = [{identifier[0] for identifier in batch} for batch in batches]
    steps = [kinds[k] | kinds[k + 1] for k in range(0, len(kinds) - 1, 2)]  # two micro-batches per optimizer step
    assert all(len(step) == 1 for step in steps[:-1])  # 9 image / 7 text records: 2 + 1 full steps, then the rest
    assert sorted(i for batch in batches for i in batch) == sorted(record["id"] for record in records)
    plain = LlavaDataModule(str(train), image_folder=str(tmp_path / "images"), batch_size=2)
    plain.setup("fit")
    plain.set_input_processor(processor)
    assert type(plain.train_dataloader().sampler) is ResumableSampler


def test_records_skipped_at_load_are_left_out_of_the_grouped_order(write_llava, make_record, processor, tmp_path):
    """skip_bad_records with grouping (the LLaVA recipes' setting): a record refused when the file is read has no
    length, and the grouped order is over the records kept (it was "3 lengths for 4 records")."""
    records = [make_record(f"i{n}") for n in range(3)] + [{"id": "bad", "conversations": [{"from": "robot", "value": "?"}]}]
    train = write_llava(records, name="train.json")
    datamodule = LlavaDataModule(str(train), image_folder=str(tmp_path / "images"), batch_size=2,
                                 group_by_modality_length=True, skip_bad_records=True)
    with pytest.warns(DataWarning):
        datamodule.setup("fit")
    datamodule.set_input_processor(processor)
    datamodule.trainer = SimpleNamespace(accumulate_grad_batches=1, fit_loop=None, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    batches = [batch["ids"] for batch in datamodule.train_dataloader()]
    assert sorted(i for batch in batches for i in batch) == ["i0", "i1", "i2"]


def test_resuming_across_a_change_of_order_kind_is_warned():
    """A checkpoint saved in the plain shuffle (or before grouping existed: no "order" key) resumed with grouping,
    and the reverse, would skip the consumed batches of another permutation."""
    lengths = _lengths(40, seed=5)
    plain, grouped = ResumableSampler(list(range(40)), seed=3), ModalityGroupedSampler(list(range(40)), lengths, 4, seed=3)
    old_state = {key: value for key, value in plain.state_dict().items() if key != "order"}
    for state, sampler in [(plain.state_dict(), grouped), (old_state, grouped), (grouped.state_dict(), plain)]:
        with pytest.warns(UserWarning, match="order, this run's is"):
            sampler.load_state_dict(state, skip=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grouped.load_state_dict(grouped.state_dict(), skip=8)
        plain.load_state_dict(old_state, skip=8)


def test_an_empty_dataset_on_several_processes_gives_empty_shares():
    assert list(ModalityGroupedSampler([], [], 4, num_replicas=2, seed=0)) == []
