"""A training DataLoader that resumes mid-epoch: the batches after a restart are the ones the
uninterrupted run would have drawn, in the same order.

Lightning 2.x saves ``state_dict()`` of every train dataloader that has one into the checkpoint
(``FitLoop.on_save_checkpoint``, key ``loops.fit_loop.state_dict.combined_loader``) and, on a restart,
calls ``load_state_dict()`` before it creates the epoch's iterator (``FitLoop.setup_data``); the resumed
iterator must then yield only the rest of the epoch. The state is small and exact:

* :class:`ResumableSampler` deals indices like ``DistributedSampler`` (it is one, so Lightning does
  not inject its own sampler under DDP: the split across processes is done here): epoch ``e`` is
  ``randperm(n, seed + e)``, padded to a multiple of the number of processes, position ``p`` going to
  process ``p % num_replicas``. Its state is the seed and the epoch.
* :class:`ResumableDataLoader` adds how many batches of the epoch were *consumed*. Lightning fetches a
  batch ahead and workers prefetch more, so a count of what was sampled or yielded would be too high:
  the count is asked from ``batches_consumed`` (the datamodule passes the fit loop's count of batches
  handed to ``training_step`` this epoch), falling back to the batches this loader has yielded when
  there is no such count (no trainer, e.g. a plain loop).

A restored loader's next iteration skips the consumed batches of the saved epoch; a state saved at the
end of an epoch (every batch consumed) resumes at the start of the next one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler


class ResumableSampler(DistributedSampler, RandomSampler):
    """Shuffled training indices of one process, per epoch, that can restart part-way through an epoch.

    A ``DistributedSampler`` (Lightning leaves it in place instead of wrapping it) and a
    ``RandomSampler`` (what a shuffling DataLoader has; Lightning reads it as shuffled). Epoch ``e``
    is the permutation ``torch.randperm(n)`` of a generator seeded with ``seed + e``, split over
    ``num_replicas`` processes exactly as ``DistributedSampler(shuffle=True)`` splits it.

    Args:
        dataset: what is sampled (only its length is used).
        num_replicas: processes sharing the epoch (data-parallel world size).
        rank: this process's place among them.
        seed: base seed, the same on every process. None (one process only) draws it from torch's
            global generator when the first epoch starts, as ``RandomSampler`` draws each epoch's seed:
            the first epoch is then the order ``DataLoader(shuffle=True)`` gives, and the global
            generator is advanced as much as it would be; later epochs draw nothing from it.
        drop_last: drop the tail that does not divide evenly between the processes instead of padding.
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int | None = None, drop_last: bool = False
    ) -> None:
        if seed is None and num_replicas > 1:
            raise ValueError("a ResumableSampler shared by several processes needs a seed (the same on each)")
        DistributedSampler.__init__(
            self, dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=0 if seed is None else seed, drop_last=drop_last
        )
        self.seed: int | None = seed
        # RandomSampler's attributes, for code that inspects one
        self.data_source = dataset
        self.replacement = False
        self._num_samples = None
        self.generator = None
        self._skip = 0  # positions of the next iteration to skip (set by load_state_dict)

    @property  # RandomSampler's is read-only; DistributedSampler assigns it
    def num_samples(self) -> int:
        return self._shard_size

    @num_samples.setter
    def num_samples(self, value: int) -> None:
        self._shard_size = value

    def __len__(self) -> int:
        """This process's share of a whole epoch (also when an iteration resumes part-way)."""
        return self.num_samples

    def epoch_generator(self, epoch: int) -> torch.Generator:
        """The random numbers of ``epoch``'s order: seeded with the seed + the epoch (the seed must be known)."""
        if self.seed is None:
            raise RuntimeError("the seed is drawn when the first epoch starts")
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        return generator

    def indices(self, epoch: int) -> list[int]:
        """This process's indices of ``epoch``, in order."""
        n = len(self.dataset)  # type: ignore[arg-type]
        order = torch.randperm(n, generator=self.epoch_generator(epoch)).tolist()
        if self.drop_last:
            order = order[: self.total_size]
        elif len(order) < self.total_size:
            padding = self.total_size - len(order)
            order += (order * math.ceil(padding / len(order)))[:padding]
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        # a generator, so that (like RandomSampler's) the seed is drawn at the first index asked for, once: later
        # epochs draw nothing from the global generator, whose state a resume restores (RunCheckpoint), so that the
        # model's draws after a resume are the uninterrupted run's
        if self.seed is None:
            self.seed = int(torch.empty((), dtype=torch.int64).random_().item())
        skip, self._skip = self._skip, 0
        yield from self.indices(self.epoch)[skip:]

    # --- state -------------------------------------------------------------------------------------------
    order = "shuffle"  # what kind of epoch order: a state of another kind resumes another permutation

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "num_replicas": self.num_replicas, "dataset_length": len(self.dataset), "order": self.order}  # type: ignore[arg-type]

    def load_state_dict(self, state: dict[str, Any], skip: int = 0) -> None:
        """Restore the seed and epoch; the next iteration starts ``skip`` positions into this process's
        share of that epoch."""
        if state.get("dataset_length") not in (None, len(self.dataset)):  # type: ignore[arg-type]
            warnings.warn(
                f"the training set has {len(self.dataset)} examples, the checkpoint's had {state['dataset_length']}: "  # type: ignore[arg-type]
                "the resumed epoch is not the one that was interrupted",
                stacklevel=2,
            )
        if state.get("order", "shuffle") != self.order:
            warnings.warn(
                f"the checkpoint's epoch was in {state.get('order', 'shuffle')!r} order, this run's is {self.order!r} "
                "(group_by_modality_length changed): the rest of the epoch is another order, some records seen twice, "
                "others not at all; resume from an epoch's end, or keep the setting",
                stacklevel=2,
            )
        if state.get("num_replicas") not in (None, self.num_replicas):
            warnings.warn(
                f"resuming on {self.num_replicas} processes a run saved on {state['num_replicas']}: each process skips "
                "its share of what was consumed, so the rest of the epoch is only approximately the one that was left",
                stacklevel=2,
            )
        if state.get("seed") is not None:
            self.seed = state["seed"]
        self.epoch = int(state.get("epoch", self.epoch))
        self._skip = max(0, int(skip))


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` with Lightning's ``state_dict`` / ``load_state_dict``.

    Args (besides DataLoader's; ``sampler`` should be a ResumableSampler, ``shuffle`` is not taken):
        batches_consumed: returns how many batches of the current epoch the training has consumed, or
            None when it cannot tell; None (or None returned) = the batches this loader has yielded.
    """

    def __init__(self, *args: Any, batches_consumed: Callable[[], int | None] | None = None, **kwargs: Any) -> None:
        if kwargs.get("generator") is None:
            # each iterator draws its workers' base seed from this, not from the global generator: the model's random
            # draws then do not depend on when Lightning creates the epoch's iterator (it differs after a resume)
            kwargs["generator"] = torch.Generator().manual_seed(torch.initial_seed())
        super().__init__(*args, **kwargs)
        self.batches_consumed = batches_consumed
        self._yielded = 0  # batches of the current epoch handed out (counting those skipped on a resume)
        self._resume_at = 0  # batches the next iteration skips (set by load_state_dict)

    def __iter__(self) -> Iterator[Any]:
        self._yielded, self._resume_at = self._resume_at, 0
        return self._counted(super().__iter__())  # the iterator (and its workers) start now, not at the first batch

    def _counted(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self._yielded += 1
            yield batch

    def _consumed(self) -> int:
        consumed = self.batches_consumed() if self.batches_consumed is not None else None
        return self._yielded if consumed is None else int(consumed)

    def state_dict(self) -> dict[str, Any]:
        """Empty unless the sampler is a ResumableSampler (e.g. Lightning swapped it for overfit_batches)."""
        if not isinstance(self.sampler, ResumableSampler):
            return {}
        return {"sampler": self.sampler.state_dict(), "batches_consumed": self._consumed(), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if not isinstance(self.sampler, ResumableSampler):
            warnings.warn("the training sampler is not a ResumableSampler: the epoch restarts from a new shuffle", stacklevel=2)
            return
        sampler_state = dict(state["sampler"])
        consumed = int(state["batches_consumed"])
        skip = consumed * int(state["batch_size"] or 1)  # positions of this process's share
        batches = consumed
        if skip >= self.sampler.num_samples:  # saved at the end of an epoch: resume at the next one's start
            sampler_state["epoch"] = int(sampler_state.get("epoch", self.sampler.epoch)) + 1
            skip = batches = 0
        self.sampler.load_state_dict(sampler_state, skip=skip)
        self._resume_at = batches
