"""BudgetSweep: per-budget sums, plan usage per question kind, and the cross-process sum."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adaptive_mllm.schedulers.plan import ExecutionPlan
from adaptive_mllm.sweep import BudgetSweep, group_fractions, summary_row, usage_fractions


def _plan() -> ExecutionPlan:
    # 2 prefix layers + 3 schedulable; 3 examples
    layer_mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    attention = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]],
            [[0.0, 0.0], [0.0, 0.0], [0.0, 1.0]],
            [[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]],
        ]
    )
    return ExecutionPlan(2, layer_mask, head_mask=attention, units=torch.tensor([3, 1, 5]))


def test_usage_per_kind_is_the_fraction_of_its_examples_that_ran_each_layer() -> None:
    sweep = BudgetSweep()
    sweep.update(0.7, ["a", "b", "a"], 0.6, 0.3, 3.0, 0.2, 0.01, _plan(), num_layers=5, num_groups=2)
    stats = sweep.stats[0.7]
    fractions = usage_fractions(stats)
    # kind a = examples 0 and 2: layers 0-1 always, then [1,0,1] and [1,1,1]
    assert fractions["a"].tolist() == [1.0, 1.0, 1.0, 0.5, 1.0]
    assert fractions["b"].tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert torch.allclose(fractions["overall"], torch.tensor([1.0, 1.0, 2 / 3, 1 / 3, 1.0]))
    groups = group_fractions(stats)
    assert groups.shape == (5, 2)
    assert groups[0].tolist() == [1.0, 1.0]  # prefix: every group
    assert torch.allclose(groups[2], torch.tensor([2 / 3, 1 / 3]))  # examples 0 and 2 keep g0, only 2 keeps g1
    assert torch.allclose(groups[4], torch.tensor([2 / 3, 1.0]))


def test_summary_means_are_per_example_for_plans_and_per_batch_for_time() -> None:
    sweep = BudgetSweep()
    sweep.update(1.0, ["a", "a"], 1.0, 0.5, 4.0, 0.5, 0.02, None, num_layers=5, num_groups=2)
    sweep.update(1.0, ["a"], 0.4, 0.2, 1.0, 0.1, 0.04, None, num_layers=5, num_groups=2)
    row = summary_row(sweep.stats[1.0])
    assert row["flops_fraction"] == pytest.approx((2 * 1.0 + 0.4) / 3)
    assert row["flops_vs_plain"] == pytest.approx((2 * 0.5 + 0.2) / 3)
    assert row["units"] == pytest.approx(9 / 3)
    assert row["prefill_ms"] == pytest.approx(1000 * 0.6 / 2)
    assert row["decode_ms_per_token"] == pytest.approx(1000 * 0.06 / 2)
    assert usage_fractions(sweep.stats[1.0])["a"].tolist() == [1.0] * 5  # no plan: everything ran


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        sweep = BudgetSweep()
        if rank == 0:
            sweep.update(0.7, ["a", "b", "a"], 0.6, 0.3, 3.0, 0.2, 0.01, _plan(), num_layers=5, num_groups=2)
        else:
            sweep.update(0.7, ["b"], 0.9, 0.5, 5.0, 0.4, 0.03, None, num_layers=5, num_groups=2)
        synced = sweep.synced(["a", "b"], num_layers=5, num_groups=2)[0.7]
        out[rank] = (summary_row(synced), {k: v.tolist() for k, v in usage_fractions(synced).items()})
    finally:
        dist.destroy_process_group()


def test_stats_are_summed_across_processes() -> None:
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_rank_main, args=(_free_port(), out), nprocs=2, join=True)
    row0, usage0 = out[0]
    assert (row0, usage0) == out[1]  # both ranks report the same
    assert row0["flops_fraction"] == pytest.approx((3 * 0.6 + 0.9) / 4)
    assert row0["flops_vs_plain"] == pytest.approx((3 * 0.3 + 0.5) / 4)
    assert row0["prefill_ms"] == pytest.approx(1000 * 0.6 / 2) and row0["units"] == pytest.approx((3 * 3.0 + 5.0) / 4)
    assert row0["prefill_ms"] == pytest.approx(1000 * 0.6 / 2)
    # kind b: example 1 of rank 0 (layers 2, 3 off) and rank 1's example (no plan: all on)
    assert usage0["b"] == pytest.approx([1.0, 1.0, 0.5, 0.5, 1.0])
    assert usage0["a"] == pytest.approx([1.0, 1.0, 1.0, 0.5, 1.0])
