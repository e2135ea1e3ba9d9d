"""LLaVA's ``group_by_modality_length`` training order: every optimizer step all-image or all-text.

LLaVA-1.5 and the AdaLLaVA release train with it (``--group_by_modality_length True``). Its rule, from
LLaVA's ``llava/train/llava_trainer.py`` (re-implemented here, drawing the same random numbers in the
same order, so one generator state gives the same order; ``tests/data/test_modality_grouping.py``):

1. A record's length is the number of whitespace-separated words of all its turns, positive with an
   image, negative without (``modality_lengths``).
2. Per modality: a random permutation cut into *megabatches* of ``micro_batch * chunks`` records (one
   optimizer step over every process and accumulation step; ``chunks`` = processes x accumulation),
   each sorted longest first and split into ``chunks`` micro-batches of equal count whose word totals
   are balanced (each record to the micro-batch with the smallest total so far).
3. The full megabatches of both modalities in a random order, then the two modalities' last, partial
   megabatches together as one, sorted by index (so the last steps may mix modalities).

Micro-batch ``j`` of the order goes to process ``j % processes`` (as accelerate deals batches to
processes in the release's HF Trainer).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch.utils.data import Dataset

from adaptive_mllm.data.resumable import ResumableSampler


def modality_lengths(word_counts: list[int], has_image: list[bool]) -> list[int]:
    """LLaVA's signed lengths: words of the record's turns, negative for a text-only record."""
    return [count if image else -count for count, image in zip(word_counts, has_image, strict=True)]


def balanced_micro_batches(megabatch: list[int], lengths: list[int], chunks: int) -> list[list[int]]:
    """``megabatch`` (longest first) as ``chunks`` micro-batches of equal count with balanced length totals;
    a megabatch that does not divide evenly is dealt round-robin instead (LLaVA's ``split_to_even_chunks``)."""
    if len(megabatch) % chunks:
        return [megabatch[start::chunks] for start in range(chunks)]
    per_chunk = len(megabatch) // chunks
    batches: list[list[int]] = [[] for _ in range(chunks)]
    totals = [0.0] * chunks
    for index in megabatch:
        shortest = totals.index(min(totals))
        batches[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(batches[shortest]) == per_chunk:
            totals[shortest] = float("inf")  # full
    return batches


def length_grouped_order(lengths: list[int], micro_batch: int, chunks: int, generator: torch.Generator) -> list[int]:
    """One modality: permuted, cut into megabatches, each longest first and dealt
    into balanced micro-batches; the micro-batches in order."""
    permutation = torch.randperm(len(lengths), generator=generator).tolist()
    size = micro_batch * chunks
    order = []
    for start in range(0, len(permutation), size):
        megabatch = sorted(permutation[start : start + size], key=lambda index: lengths[index], reverse=True)
        order += [index for batch in balanced_micro_batches(megabatch, lengths, chunks) for index in batch]
    return order


def modality_grouped_order(lengths: list[int], micro_batch: int, chunks: int, generator: torch.Generator) -> list[int]:
    """Every index of ``lengths`` (signed, none zero) once, in LLaVA's modality-grouped training order."""
    if any(length == 0 for length in lengths):
        raise ValueError("a record of zero words has no modality length")
    if all(length > 0 for length in lengths) or all(length < 0 for length in lengths):
        # one modality: LLaVA sorts by the signed lengths, so an all-text set goes shortest first
        return length_grouped_order(lengths, micro_batch, chunks, generator)
    image = [index for index, length in enumerate(lengths) if length > 0]
    text = [index for index, length in enumerate(lengths) if length < 0]
    image_order = [image[i] for i in length_grouped_order([lengths[i] for i in image], micro_batch, chunks, generator)]
    text_order = [text[i] for i in length_grouped_order([-lengths[i] for i in text], micro_batch, chunks, generator)]
    size = micro_batch * chunks
    image_megabatches = [image_order[start : start + size] for start in range(0, len(image_order), size)]
    text_megabatches = [text_order[start : start + size] for start in range(0, len(text_order), size)]
    last = image_megabatches.pop() + text_megabatches.pop()  # the partial ones (or full: popped all the same)
    megabatches = image_megabatches + text_megabatches
    shuffled = [megabatches[i] for i in torch.randperm(len(megabatches), generator=generator).tolist()]
    if last:
        shuffled.append(sorted(last))
    return [index for megabatch in shuffled for index in megabatch]


class ModalityGroupedSampler(ResumableSampler):
    """A :class:`ResumableSampler` whose epochs follow :func:`modality_grouped_order` (seeded with the seed +
    the epoch, so a resumed epoch is the interrupted one) and deal whole micro-batches to processes.

    Args:
        dataset: what is sampled.
        lengths: each record's signed modality length (:func:`modality_lengths`), for the dataset's first
            ``len(lengths)`` positions, the ones drawn (a LLaVA JSON dataset's later positions are records skipped
            as bad when the file was read).
        micro_batch: records per process per step (the DataLoader's batch size).
        accumulation: micro-batches per optimizer step on each process (gradient accumulation).
        num_replicas, rank, seed: as :class:`ResumableSampler`'s. On several processes each gets the same
            number of micro-batches: the order is padded from its start (as accelerate's even batches).
    """

    order = "modality_grouped"

    def __init__(
        self,
        dataset: Dataset,
        lengths: list[int],
        micro_batch: int,
        accumulation: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, seed=seed)
        if len(lengths) > len(dataset):  # type: ignore[arg-type]
            raise ValueError(f"{len(lengths)} lengths for {len(dataset)} records")  # type: ignore[arg-type]
        if micro_batch < 1 or accumulation < 1:
            raise ValueError(f"micro_batch and accumulation must be >= 1, got {micro_batch} and {accumulation}")
        self.lengths, self.micro_batch, self.accumulation = list(lengths), micro_batch, accumulation
        steps = math.ceil(len(lengths) / (micro_batch * num_replicas))
        self.num_samples = len(lengths) if num_replicas == 1 else steps * micro_batch
        self.total_size = self.num_samples * num_replicas

    def indices(self, epoch: int) -> list[int]:
        chunks = self.num_replicas * self.accumulation
        order = modality_grouped_order(self.lengths, self.micro_batch, chunks, self.epoch_generator(epoch))
        if self.num_replicas == 1 or not order:
            return order
        order += (order * math.ceil(self.total_size / len(order)))[: self.total_size - len(order)]
        batches = [order[start : start + self.micro_batch] for start in range(0, self.total_size, self.micro_batch)]
        return [index for batch in batches[self.rank :: self.num_replicas] for index in batch]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "micro_batch": self.micro_batch, "accumulation": self.accumulation}

    def load_state_dict(self, state: dict[str, Any], skip: int = 0) -> None:
        saved = (state.get("micro_batch"), state.get("accumulation"))
        if saved != (None, None) and saved != (self.micro_batch, self.accumulation):
            warnings.warn(
                f"the checkpoint's epoch was grouped for micro-batches of {saved[0]} x {saved[1]} accumulated, this run's "
                f"are {self.micro_batch} x {self.accumulation}: the rest of the epoch is another order",
                stacklevel=2,
            )
        super().load_state_dict(state, skip)
