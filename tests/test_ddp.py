"""Two CPU processes (gloo DDP) train the real 7B recipe on the tiny stand-ins for a few steps, launched as a
user launches it (the `adaptive-mllm` command in a subprocess), and end with identical weights."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tests.test_recipes_real import RECIPE_DIR, lay_out_standins

REPO = Path(__file__).parents[1]


class WeightDigest(Callback):
    """Each rank writes a digest of its weights at the start and the end of training."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.start: str | None = None

    @staticmethod
    def _digest(module: torch.nn.Module) -> str:
        digest = hashlib.sha256()
        for name, parameter in sorted(module.named_parameters()):
            digest.update(name.encode())
            digest.update(parameter.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = self._digest(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        result = {"start": self.start, "end": self._digest(pl_module), "step": trainer.global_step,
                  "world_size": trainer.world_size}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def test_two_process_ddp_ranks_agree_on_the_weights(tokenizer_dir, tmp_path):
    lay_out_standins(tmp_path, "llava7b.yaml", tokenizer_dir)
    digest = {"class_path": "tests.test_ddp.WeightDigest", "init_args": {"out_dir": str(tmp_path / "digests")}}
    command = [
        sys.executable, "-m", "adaptive_mllm.cli", "fit", "--config", str(RECIPE_DIR / "llava7b.yaml"),
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.precision=32-true",
        "--trainer.max_steps=2", "--trainer.accumulate_grad_batches=1",
        "--trainer.enable_progress_bar=false", f"--trainer.callbacks+={json.dumps(digest)}",
        "--data.init_args.batch_size=2", "--data.init_args.num_workers=0",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / "digests" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [2, 2]  # the whole epoch: 6 records, 2 ranks, batch 2
    assert ranks[0]["start"] == ranks[1]["start"]  # DDP broadcast rank 0's weights (the scheduler is random-init)
    assert ranks[0]["end"] != ranks[0]["start"]  # it trained
    assert ranks[0]["end"] == ranks[1]["end"]  # and the ranks stayed in sync


def test_two_process_test_scores_each_question_once_and_writes_its_report(tmp_path):
    # 9 questions on 2 processes: DistributedSampler pads to 10, giving one question twice
    command = [
        sys.executable, "-m", "adaptive_mllm.cli", "test", "--config", str(RECIPE_DIR / "tiny.yaml"),
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.logger=false",
        "--trainer.default_root_dir=run", "--model.eval_budgets=[1.0,0.5]",
        "--data.init_args.num_train=8", "--data.init_args.num_val=2", "--data.init_args.num_test=9",
        "--data.init_args.eval_batch_size=2", "--data.init_args.num_workers=0",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-4000:]
    run = tmp_path / "run"
    assert (run / "test_results.md").is_file()  # the report is written (finding the directory is a collective)
    rows = [json.loads(line) for rank in (0, 1) for line in (run / f"test_answers.rank{rank}.jsonl").read_text().splitlines()]
    for budget in (1.0, 0.5):
        answered = [row for row in rows if row["budget"] == budget]
        assert len(answered) == 9 and len({row["id"] for row in answered}) == 9  # every question once, the repeat dropped
        with open(run / "test_results.csv") as handle:
            table = {float(row["budget"]): row for row in csv.DictReader(handle)}
        # the reported score is the mean over the 9 questions' own scores, computed here from the answers files
        assert float(table[budget]["overall"]) == pytest.approx(sum(row["score"] for row in answered) / 9)
