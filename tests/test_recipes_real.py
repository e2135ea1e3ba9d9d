"""The real recipes (LLaVA-1.5-7B / -7B-H / -13B, Mipha-3B) parse and train one step, run exactly as a user
would from a directory laid out as docs/checkpoints-and-data.md says, with tiny stand-ins in those places:
a transformers-layout LLaVA or a Mipha-release-layout Mipha of the real depth (32 / 40 layers, width 64) and
a 6-record LLaVA JSON set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from adaptive_mllm.backbones import LlavaBackbone
from adaptive_mllm.cli import build_cli
from tests.conftest import tiny_config

RECIPE_DIR = Path(__file__).parents[1] / "recipes"
REAL = {"llava7b.yaml": (32, "LayerScheduler", 16), "llava7b-h.yaml": (32, "HeadScheduler", 16),
        "llava13b.yaml": (40, "LayerScheduler", 20), "mipha3b.yaml": (32, "LayerScheduler", 16)}
TEMPLATES = {"mipha3b.yaml": "phi_v0"}  # the others: vicuna_v1
VARIANTS = {"llava7b-lora.yaml": 32}  # recipes tested on their own (other training settings): their depth
# what a user overrides to try a GPU recipe on one CPU process
ON_CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true",
          "--data.init_args.num_workers=0"]
RECORDS = [
    ("coco/train2017/000000033471.jpg", [("<image>\nWhat colour is the red circle ?", "blue"),
                                         ("How many shapes are there ?", "two")]),
    ("gqa/images/2354786.jpg", [("Is the green square left of the yellow triangle ?\n<image>", "yes")]),
    ("ocr_vqa/images/140031996.jpg", [("<image>\nHow many shapes are there ?", "three")]),
    ("textvqa/train_images/0054c91397f2fe05.jpg", [("<image>\nWhat colour is the red circle ?", "purple")]),
    ("vg/VG_100K/2356347.jpg", [("<image>\nIs the green square left of the yellow triangle ?", "no")]),
    (None, [("What colour is the red circle ?", "orange shape")]),  # a text-only (ShareGPT) record
]


def write_llava_data(root: Path) -> Path:
    """``data/llava/llava_v1_5_mix665k.json`` + its image folders, as LLaVA-1.5's mix is laid out."""
    folder = root / "data" / "llava"
    records = []
    for index, (image, turns) in enumerate(RECORDS):
        record = {"id": f"record-{index}", "conversations": []}
        for question, answer in turns:
            record["conversations"] += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        if image is not None:
            record["image"] = image
            (folder / image).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (48 + 8 * index, 32), (40 * index, 200, 90)).save(folder / image)
        records.append(record)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "llava_v1_5_mix665k.json").write_text(json.dumps(records))
    return folder


def write_checkpoint(directory: Path, tokenizer_dir: Path, num_layers: int) -> None:
    """A transformers-layout LLaVA with the real depth, 8 heads (HeadScheduler rank 8), width 64."""
    from adaptive_mllm.backbones import LlavaBackbone

    config = tiny_config(num_layers=num_layers, num_heads=8, num_kv_heads=8, hidden=64)
    backbone = LlavaBackbone(config=config, tokenizer=str(tokenizer_dir), template="vicuna_v1")
    backbone.build()
    backbone.save_pretrained(directory)


def write_mipha_checkpoint(directory: Path, num_layers: int) -> None:
    """A Mipha-release-layout Mipha (SigLIP + projector + Phi) with the real depth, 8 heads, width 64, and a
    Phi-2-like tokenizer (<|endoftext|> ends answers)."""
    from adaptive_mllm.backbones import MiphaBackbone
    from tests.backbones.mipha_layout import write_phi_tokenizer

    tokenizer_dir = directory.parent / "phi-tokenizer"
    tokenizer_dir.mkdir(parents=True)
    write_phi_tokenizer(tokenizer_dir)
    config = {"vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=16),
              "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=8,
                           max_position_embeddings=2048)}
    backbone = MiphaBackbone(config=config, tokenizer=str(tokenizer_dir), template="phi_v0")
    backbone.build()
    backbone.save_pretrained(directory)


def lay_out_standins(root: Path, recipe: str, tokenizer_dir: Path) -> None:
    """Put the stand-ins where ``recipe`` looks for the real checkpoint and data (relative to ``root``)."""
    config = yaml.safe_load((RECIPE_DIR / recipe).read_text())
    checkpoint = config["model"]["backbone"]["init_args"]["checkpoint"]
    depth = REAL[recipe][0] if recipe in REAL else VARIANTS[recipe]
    if config["model"]["backbone"]["class_path"].endswith("MiphaBackbone"):
        write_mipha_checkpoint(root / checkpoint, depth)
    else:
        write_checkpoint(root / checkpoint, tokenizer_dir, depth)
    write_llava_data(root)


@pytest.mark.parametrize("recipe", sorted(REAL))
def test_real_recipe_trains_a_step_on_standins(recipe, tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lay_out_standins(tmp_path, recipe, tokenizer_dir)
    cli = build_cli(["fit", "--config", str(RECIPE_DIR / recipe), *ON_CPU, "--trainer.fast_dev_run=true",
                     "--data.init_args.batch_size=3"])
    num_layers, scheduler, prefix = REAL[recipe]
    assert cli.trainer.global_step == 1
    assert cli.model.backbone.shape.num_layers == num_layers
    assert type(cli.model.scheduler).__name__ == scheduler and cli.model.scheduler.num_prefix_layers == prefix
    assert cli.model.backbone.max_length == 2048
    assert cli.model.backbone.chat_template.name == TEMPLATES.get(recipe, "vicuna_v1")
    assert not any(p.requires_grad for p in cli.model.backbone.parameter_groups()["vision_tower"])
    assert all(p.requires_grad for p in cli.model.backbone.parameter_groups()["llm"])


@pytest.mark.parametrize("recipe", sorted(REAL))
def test_real_recipe_keeps_the_release_hyperparameters(recipe):
    config = yaml.safe_load((RECIPE_DIR / recipe).read_text())
    trainer, model, data = config["trainer"], config["model"], config["data"]["init_args"]
    assert trainer["devices"] * data["batch_size"] * trainer["accumulate_grad_batches"] == 128
    assert trainer["precision"] == "bf16-mixed" and trainer["max_epochs"] == 1
    assert trainer["strategy"]["class_path"] == "adaptive_mllm.sharding.LayerShardedStrategy"  # per-layer FSDP2 units
    assert (model["learning_rate"], model["warmup_ratio"], model["freeze"]) == (1.0e-5, 0.03, ["vision_tower"])
    assert model["scheduler"]["init_args"]["num_prefix_layers"] == REAL[recipe][2]
    assert model["backbone"]["init_args"]["max_length"] == 2048
    assert data["train_json"].endswith("llava_v1_5_mix665k.json")
    if recipe == "llava7b-h.yaml":
        assert model["scheduler"]["init_args"]["rank"] == 8


def test_the_zero3_variant_is_the_release_setup_on_the_7b_recipe():
    """recipes/llava7b-zero3.yaml: llava7b.yaml with the release's scripts/zero3.json as DeepSpeed's config."""
    base = yaml.safe_load((RECIPE_DIR / "llava7b.yaml").read_text())
    zero3 = yaml.safe_load((RECIPE_DIR / "llava7b-zero3.yaml").read_text())
    strategy = zero3["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.DeepSpeedStrategy"
    config = strategy["init_args"]["config"]
    zero = config["zero_optimization"]
    assert (zero["stage"], zero["overlap_comm"], zero["contiguous_gradients"]) == (3, True, True)
    assert zero["stage3_gather_16bit_weights_on_model_save"] and zero["sub_group_size"] == 1e9
    # the release's "auto" batch sizes: Lightning fills them from the data and trainer settings
    assert not {"train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps"} & set(config)
    assert zero3["trainer"]["precision"] == "bf16-mixed"  # the release's bf16
    assert zero3["model"] == base["model"] and zero3["data"] == base["data"]
    for key in ("devices", "accumulate_grad_batches", "gradient_clip_val", "max_epochs"):
        assert zero3["trainer"][key] == base["trainer"][key]


def test_the_lora_variant_is_llava_loras_setup_on_the_7b_recipe(tokenizer_dir, tmp_path, monkeypatch):
    """recipes/llava7b-lora.yaml: llava7b.yaml with LLaVA-1.5's finetune_lora.sh settings; on stand-ins only the
    adapters of the LLM train (with the projector and the scheduler)."""
    base = yaml.safe_load((RECIPE_DIR / "llava7b.yaml").read_text())
    lora = yaml.safe_load((RECIPE_DIR / "llava7b-lora.yaml").read_text())
    assert lora["model"]["lora"] == {"rank": 128, "alpha": 256.0, "dropout": 0.05}
    assert (lora["model"]["learning_rate"], lora["model"]["part_learning_rates"]) == (2.0e-4, {"projector": 2.0e-5})
    assert lora["trainer"]["devices"] * lora["data"]["init_args"]["batch_size"] * lora["trainer"]["accumulate_grad_batches"] == 128
    differs = {"lora", "learning_rate", "part_learning_rates"}
    assert {k: v for k, v in lora["model"].items() if k not in differs} == {k: v for k, v in base["model"].items() if k not in differs}
    monkeypatch.chdir(tmp_path)
    lay_out_standins(tmp_path, "llava7b-lora.yaml", tokenizer_dir)
    cli = build_cli(["fit", "--config", str(RECIPE_DIR / "llava7b-lora.yaml"), *ON_CPU, "--trainer.fast_dev_run=true",
                     "--data.init_args.batch_size=3"])
    assert cli.trainer.global_step == 1
    llm = dict(cli.model.backbone.model.model.language_model.named_parameters())
    trains = {name for name, p in llm.items() if p.requires_grad}
    assert trains and trains == {name for name in llm if ".lora_" in name}
    assert cli.model.lora.rank == 128 and cli.model.backbone.shape.num_layers == 32


def write_stage_one_standins(root: Path) -> None:
    """recipes/llava7b-pretrain.yaml's inputs: a Vicuna stand-in (a Llama LLM of the real depth, transformers' own
    layout, with a SentencePiece Llama tokenizer: the plain template ends captions at a newline, which a word-level
    one drops), a CLIP tower directory and LLaVA-Pretrain's caption records (blip_laion_cc_sbu_558k.json's form)."""
    import torch
    from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from tests.backbones.spm_tokenizer import write_spm_tokenizer

    vicuna = write_spm_tokenizer(root / "checkpoints" / "vicuna-7b-v1.5")
    tokenizer = AutoTokenizer.from_pretrained(vicuna)
    torch.manual_seed(0)
    text = tiny_config(num_layers=32, num_heads=8, num_kv_heads=8, hidden=64)["text"]
    llama = LlamaForCausalLM(LlamaConfig(**text, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2))
    llama.save_pretrained(vicuna)
    CLIPVisionModel(CLIPVisionConfig(**tiny_config()["vision"])).save_pretrained(root / "checkpoints" / "clip-vit-large-patch14-336")
    folder = root / "data" / "llava-pretrain"
    records = []
    for index, (question, caption) in enumerate([("Render a clear and concise summary of the photo.\n<image>", "a red circle"),
                                                 ("<image>\nGive a brief description of the image.", "two blue shapes"),
                                                 ("<image>\nDescribe the image concisely.", "a green square")]):
        image = f"0045{index}/00453937{index}.jpg"
        (folder / "images" / image).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + 8 * index, 32), (60 * index, 120, 90)).save(folder / "images" / image)
        records.append({"id": f"00453937{index}", "image": image, "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": caption}]})
    (folder / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(records))


def test_the_stage_one_recipe_trains_the_projector_of_a_new_llava(tmp_path, monkeypatch):
    """recipes/llava7b-pretrain.yaml: LLaVA-1.5's pretrain.sh settings. On stand-ins, LLaVA is built from the LLM and
    the tower directories, a step moves the projector alone, and the exported model is what stage 2 starts from."""
    import torch
    from safetensors.torch import load_file

    from adaptive_mllm.cli import main

    recipe = yaml.safe_load((RECIPE_DIR / "llava7b-pretrain.yaml").read_text())
    trainer, model, data = recipe["trainer"], recipe["model"], recipe["data"]["init_args"]
    assert trainer["devices"] * data["batch_size"] * trainer["accumulate_grad_batches"] == 256
    assert (model["learning_rate"], model["warmup_ratio"], model["weight_decay"]) == (1.0e-3, 0.03, 0.0)
    assert model["scheduler"] is None and model["freeze"] == ["vision_tower", "llm"]
    assert model["backbone"]["init_args"]["template"] == "plain" and not model["backbone"]["init_args"]["pad_to_square"]

    monkeypatch.chdir(tmp_path)
    write_stage_one_standins(tmp_path)
    fit = ["--config", str(RECIPE_DIR / "llava7b-pretrain.yaml"), *ON_CPU]
    with pytest.warns(UserWarning, match="is a language model: LLaVA-1.5 is built on it"):
        # one step, without the warm-up whose first step has learning rate 0 (the HF Trainer's schedule)
        cli = build_cli(["fit", *fit, "--trainer.max_steps=1", "--data.init_args.batch_size=3", "--model.warmup_ratio=0"])
    assert cli.trainer.global_step == 1 and cli.model.scheduler is None
    backbone = cli.model.backbone
    assert backbone.chat_template.name == "plain" and backbone.shape.num_layers == 32
    groups = backbone.parameter_groups()
    assert all(p.requires_grad for p in groups["projector"])
    assert not any(p.requires_grad for p in groups["llm"] + groups["vision_tower"])
    saved = load_file(tmp_path / "checkpoints" / "vicuna-7b-v1.5" / "model.safetensors")
    layer = backbone.model.model.language_model.layers[31].mlp.down_proj.weight
    assert torch.equal(layer, saved["model.layers.31.mlp.down_proj.weight"])  # the LLM is Vicuna's, untouched
    with pytest.warns(UserWarning, match="is a language model"):
        start = LlavaBackbone(checkpoint="checkpoints/vicuna-7b-v1.5", vision_tower="checkpoints/clip-vit-large-patch14-336")
    start.build()  # the recipe's seed: the projector the step started from
    for name in ("linear_1.weight", "linear_2.bias"):
        before = start.model.model.multi_modal_projector.get_parameter(name)
        after = backbone.model.model.multi_modal_projector.get_parameter(name)
        assert not torch.equal(before, after), name

    # the recipe's export command, then what stage 2 (recipes/llava7b.yaml) reads: a transformers-layout LLaVA
    with pytest.warns(UserWarning, match="is a language model"):
        main(["export", *fit, "--ckpt_path", "runs/llava7b-pretrain/checkpoints/last.ckpt",
              "--out_dir", "checkpoints/llava-v1.5-7b-pretrain-hf"])
    stage_two = LlavaBackbone(checkpoint="checkpoints/llava-v1.5-7b-pretrain-hf")
    stage_two.build()
    trained = backbone.model.state_dict()
    for name, tensor in stage_two.model.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
