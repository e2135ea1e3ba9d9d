"""Per-layer sharding (FSDP2) on 2 CPU processes (gloo): the same losses and weights as one process running
the whole batch, each rank holding half of every decoder layer, with the L and H schedulers, with and
without a token selector, with LoRA adapters, and validation's skipping path answering as one process does."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import Callback
from torch import nn

from adaptive_mllm.export import export_module, module_from_checkpoint
from adaptive_mllm.sharding import is_sharded, local_numel, on_every_rank, shard_module, through_unit
from tests.test_module import ANSWERS, QUESTIONS, _batch
from tests.test_recipes_real import RECIPE_DIR, lay_out_standins

REPO = Path(__file__).parents[1]

STEPS = 3
SCENARIOS = ["layer", "head+fastv", "layer+prumerge", "head+lora"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _make_model(tokenizer_dir: Path, scenario: str):
    from adaptive_mllm.lora import LoRA
    from adaptive_mllm.module import AdaptiveMLLM
    from adaptive_mllm.schedulers import HeadScheduler, LayerScheduler
    from adaptive_mllm.token_selection import FastV, PruMergePlus
    from tests.conftest import make_backbone

    torch.manual_seed(0)  # the scheduler's initial weights
    scheduler = HeadScheduler(num_prefix_layers=2, rank=2) if scenario.startswith("head") else LayerScheduler(num_prefix_layers=2)
    selector = FastV(layer_index=2, drop_ratio=0.5) if "fastv" in scenario else PruMergePlus() if "prumerge" in scenario else None
    backbone = make_backbone(tokenizer_dir, num_layers=6, num_kv_heads=2)
    lora = LoRA(rank=2, alpha=4.0, dropout=0.0) if "lora" in scenario else None
    model = AdaptiveMLLM(backbone, scheduler, selector, train_budget_range=(0.6, 1.0), lora=lora)
    model.configure_model()
    if lora is not None:  # adapters that already matter, so that a sharded step that lost them would show
        with torch.no_grad():
            for parameter in backbone.adapter_parameters():
                parameter.normal_(0.0, 0.1)
    return model


def _halves(model) -> list[tuple[dict, torch.Tensor]]:
    """The global batch (4 examples) split into the two ranks' halves, each with its budgets."""
    questions, answers = QUESTIONS + QUESTIONS[:1], ANSWERS + ANSWERS[:1]
    budgets = torch.tensor([0.7, 1.0, 0.8, 0.65])
    halves = []
    for rank in range(2):
        rows = slice(2 * rank, 2 * rank + 2)
        batch = _batch(model, questions[rows], answers[rows])
        batch["pixel_values"] = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))[rows]
        halves.append((batch, budgets[rows]))
    return halves


def _train_step(model, optimizer, batch, budgets, seed: int, scale: float = 1.0) -> float:
    torch.manual_seed(seed)  # the same Gumbel noise for a half, sharded or not
    logits, labels = model(batch, budgets)
    loss = model._loss(logits, labels)
    (loss * scale).backward()
    return float(loss)


def _worker(rank: int, port: int, tokenizer_dir: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    results = {}
    for scenario in SCENARIOS:
        model = _make_model(Path(tokenizer_dir), scenario).train()
        reference = copy.deepcopy(model)  # one process, the whole batch, no sharding
        total = sum(p.numel() for p in model.backbone.decoder_layers.parameters())
        shard_module(model, mesh)
        local = local_numel(model.backbone.decoder_layers.parameters())
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        ref_optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-3)
        halves = _halves(reference)
        losses, ref_losses = [], []
        for step in range(STEPS):
            batch, budgets = halves[rank]
            losses.append(_train_step(model, optimizer, batch, budgets, seed=100 * step + rank))
            optimizer.step()
            optimizer.zero_grad()
            # the reference: both halves, each half's loss weighted 1/2 (DDP's mean over ranks)
            ref_losses.append([_train_step(reference, ref_optimizer, b, g, seed=100 * step + r, scale=0.5) for r, (b, g) in enumerate(halves)])
            ref_optimizer.step()
            ref_optimizer.zero_grad()
        gathered = [None, None]
        dist.all_gather_object(gathered, losses)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        model.eval(), reference.eval()
        batch, _ = halves[rank]
        with torch.no_grad():
            sharded_eval = model.generate(batch, 0.7)  # the skipping path, every layer gathered per step
            ref_eval = reference.generate(batch, 0.7)
            sharded_logits, _ = model(batch, torch.tensor([0.8, 0.8]))
            ref_logits, _ = reference(batch, torch.tensor([0.8, 0.8]))
        results[scenario] = {
            "losses": gathered, "ref_losses": ref_losses, "local": local, "total": total,
            "sharded_layers": sum(is_sharded(layer) for layer in model.backbone.decoder_layers),
            "state": {k: v.clone() for k, v in state.items()} if rank == 0 else None,
            "ref_state": {k: v.detach().clone() for k, v in reference.state_dict().items()} if rank == 0 else None,
            "answers": (sharded_eval["answers"], ref_eval["answers"]),
            "units": (sharded_eval["units_per_example"], ref_eval["units_per_example"]),
            "logits": (sharded_logits, ref_logits),
        }  # fmt: skip
    # decoding stops when every rank's batch is done: rank 0 done, rank 1 not -> both go on
    results["done_everywhere"] = on_every_rank(rank == 0, model.backbone.decoder_layers, torch.device("cpu"))
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tokenizer_dir, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("sharding")
    mp.spawn(_worker, args=(_free_port(), str(tokenizer_dir), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_sharded_ranks_train_as_one_process(two_ranks, scenario):
    rank0, rank1 = two_ranks[0][scenario], two_ranks[1][scenario]
    ref_losses = torch.tensor(rank0["ref_losses"])  # [steps, ranks]
    assert rank1["losses"] == rank0["losses"]  # both ranks gathered both ranks' losses
    sharded = torch.tensor(rank0["losses"]).T  # [steps, ranks]
    torch.testing.assert_close(sharded, ref_losses, rtol=1e-4, atol=1e-5)
    assert sharded[-1].mean() != sharded[0].mean()  # it trained
    state, ref_state = rank0["state"], rank0["ref_state"]
    assert state.keys() == ref_state.keys()
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_each_rank_holds_half_of_the_decoder(two_ranks, scenario):
    for rank in two_ranks:
        result = rank[scenario]
        assert result["sharded_layers"] == 6
        assert abs(result["local"] / result["total"] - 0.5) < 0.02, (result["local"], result["total"])
    assert two_ranks[0][scenario]["local"] + two_ranks[1][scenario]["local"] >= two_ranks[0][scenario]["total"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sharded_evaluation_answers_as_one_process(two_ranks, scenario):
    for rank in two_ranks:
        result = rank[scenario]
        assert result["answers"][0] == result["answers"][1]
        assert result["units"][0] == result["units"][1]
        torch.testing.assert_close(result["logits"][0], result["logits"][1], rtol=1e-4, atol=1e-5)


def test_sharded_decoding_stops_only_when_every_rank_is_done(two_ranks):
    assert [rank["done_everywhere"] for rank in two_ranks] == [False, False]


def test_through_unit_is_a_plain_call_without_sharding():
    layer = nn.Linear(2, 2)
    x = torch.ones(1, 2)
    assert torch.equal(through_unit(layer, layer, x), layer(x))
    assert not is_sharded(layer)
    assert local_numel(layer.parameters()) == 6
    assert on_every_rank(True, nn.ModuleList([layer]), torch.device("cpu")) is True


class FullWeightDigest(Callback):
    """Each rank writes a digest of the full (gathered) weights and the step, at the start and the end of training."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.start: tuple[str, int] | None = None

    @staticmethod
    def _digest(module: nn.Module) -> str:
        digest = hashlib.sha256()
        for name, parameter in sorted(module.named_parameters()):
            full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter  # collective: every rank
            digest.update(name.encode())
            digest.update(full.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = (self._digest(pl_module), trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        decoder = pl_module.backbone.decoder_layers
        result = {"start": self.start, "end": (self._digest(pl_module), trainer.global_step), "world_size": trainer.world_size,
                  "local": local_numel(decoder.parameters()), "total": sum(p.numel() for p in decoder.parameters()),
                  "strategy": type(trainer.strategy).__name__}  # fmt: skip
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def _fit(root: Path, name: str, devices: int, max_steps: int, *extra: str) -> list[dict]:
    digest = {"class_path": "tests.test_sharding.FullWeightDigest", "init_args": {"out_dir": str(root / name)}}
    saver = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(root / "sharded"), "every_n_train_steps": 2, "save_top_k": -1}}  # fmt: skip
    command = [
        sys.executable, "-m", "adaptive_mllm.cli", "fit", "--config", str(RECIPE_DIR / "llava7b.yaml"),
        "--trainer.accelerator=cpu", f"--trainer.devices={devices}",  # the recipe's bf16-mixed, layers gathered in bf16
        f"--trainer.max_steps={max_steps}", "--trainer.accumulate_grad_batches=1", "--trainer.enable_progress_bar=false",
        f"--trainer.callbacks+={json.dumps(digest)}", f"--trainer.callbacks+={json.dumps(saver)}",
        "--data.init_args.batch_size=2", "--data.init_args.num_workers=0", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((root / name / f"rank{rank}.json").read_text()) for rank in range(devices)]


def test_the_7b_recipe_trains_sharded_on_two_processes_and_resumes_from_a_sharded_checkpoint(tokenizer_dir, tmp_path, monkeypatch):
    """The llava7b recipe as is (its LayerShardedStrategy, bf16), on the tiny stand-ins. One process trains 2
    steps and writes a sharded checkpoint (a directory); 2 gloo processes resume it (another number of
    processes) at its step with its weights and train on, each rank holding half of the decoder, the ranks
    agreeing on the weights; export reads their sharded checkpoint (in one process) with those weights."""
    monkeypatch.chdir(tmp_path)
    lay_out_standins(tmp_path, "llava7b.yaml", tokenizer_dir)
    first = _fit(tmp_path, "first", 1, 2)
    assert first[0]["strategy"] == "LayerShardedStrategy" and first[0]["end"][1] == 2
    assert first[0]["end"][0] != first[0]["start"][0]  # it trained
    checkpoint = tmp_path / "sharded" / "epoch=0-step=2.ckpt"
    assert checkpoint.is_dir() and (checkpoint / "meta.pt").is_file()
    resumed = _fit(tmp_path, "resumed", 2, 4, f"--ckpt_path={checkpoint}", "--trainer.max_epochs=3")
    assert [r["start"] for r in resumed] == [first[0]["end"]] * 2  # the same step, the same weights
    assert [r["end"][1] for r in resumed] == [4, 4] and resumed[0]["end"][0] != resumed[0]["start"][0]
    assert resumed[0]["end"] == resumed[1]["end"]  # the ranks agree on the (gathered) weights
    for rank in resumed:
        assert abs(rank["local"] / rank["total"] - 0.5) < 0.01  # each holds half of the decoder
    written = next(path for path in (tmp_path / "sharded").iterdir() if "step=4" in path.name)
    assert len(list(written.glob("*.distcp"))) == 2  # each rank wrote its shards
    module, _ = module_from_checkpoint(written, RECIPE_DIR / "llava7b.yaml", [])
    assert FullWeightDigest._digest(module) == resumed[0]["end"][0]
    export_module(module, tmp_path / "exported")
    assert (tmp_path / "exported" / "scheduler.safetensors").is_file()
