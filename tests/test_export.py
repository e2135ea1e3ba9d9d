"""Project checkpoints: a trained model exported as a plain directory loads back, without Lightning, to the
same logits; the `adaptive-mllm export` command does it from a recipe and a Lightning checkpoint."""

from __future__ import annotations

import json
import os
import re
import warnings

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from adaptive_mllm.cli import build_cli, main
from adaptive_mllm.export import export_module, load_exported
from adaptive_mllm.module import AdaptiveMLLM
from adaptive_mllm.schedulers import HeadScheduler, LayerScheduler, StaticScheduler
from tests.conftest import make_backbone, random_images
from tests.test_recipes_real import ON_CPU, RECIPE_DIR, lay_out_standins


def _batch(backbone) -> dict:
    encoded = backbone.chat_template.encode(
        [("<image>\nHow many shapes are there ?", "two")], backbone.tokenizer, backbone.image_token_id,
        backbone.num_image_tokens,
    )
    ids = torch.tensor([encoded.input_ids, encoded.input_ids])
    size = backbone.llava_config.vision_config.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([encoded.labels] * 2),
            "prompt_lengths": torch.tensor([encoded.prompt_length] * 2), "pixel_values": random_images(2, size)}


def _logits(module: AdaptiveMLLM, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return module(batch, budgets=torch.tensor([1.0, 0.6]))[0]


@pytest.mark.parametrize("scheduler", [lambda: LayerScheduler(2), lambda: HeadScheduler(2, rank=2), lambda: None],
                         ids=["layer", "head", "none"])
def test_export_then_load_gives_identical_logits(scheduler, tokenizer_dir, tmp_path):
    module = AdaptiveMLLM(make_backbone(tokenizer_dir), scheduler(), budget=0.8, max_new_tokens=7, decode="eager")
    module.configure_model()
    module.eval()
    export_module(module, tmp_path / "export")
    for name in ["config.json", "model.safetensors", "tokenizer.json", "backbone.json"]:
        assert (tmp_path / "export" / name).is_file(), name
    assert (tmp_path / "export" / "scheduler.safetensors").is_file() == (module.scheduler is not None)
    torch.manual_seed(123)  # a fresh scheduler initialises differently: only the file can make it equal
    loaded = load_exported(tmp_path / "export")
    batch = _batch(module.backbone)
    assert torch.equal(_logits(loaded, batch), _logits(module, batch))
    assert loaded.backbone.chat_template.name == "plain_chat"
    # it answers as the exported model did (not with AdaptiveMLLM's defaults 1.0 / 16 / auto), unless told otherwise
    assert (loaded.budget, loaded.max_new_tokens, loaded.decode) == (0.8, 7, "eager")
    assert load_exported(tmp_path / "export", max_new_tokens=3).max_new_tokens == 3
    if module.scheduler is not None:
        spec = json.loads((tmp_path / "export" / "scheduler.json").read_text())
        assert spec["class_path"] == f"adaptive_mllm.schedulers.{type(module.scheduler).__module__.split('.')[-1]}." \
            f"{type(module.scheduler).__name__}"
        assert spec["init_args"]["num_prefix_layers"] == 2
    # the backbone part is a plain transformers LLaVA checkpoint
    assert isinstance(LlavaForConditionalGeneration.from_pretrained(tmp_path / "export"), LlavaForConditionalGeneration)


def test_a_baseline_inserting_the_latency_token_round_trips(tokenizer_dir, tmp_path):
    module = AdaptiveMLLM(make_backbone(tokenizer_dir), StaticScheduler(2, insert_latency_token=True))
    module.configure_model()
    export_module(module, tmp_path / "a")
    spec = json.loads((tmp_path / "a" / "scheduler.json").read_text())
    assert spec["init_args"] == {"num_prefix_layers": 2, "insert_latency_token": True, "budget_rule": "release"}
    loaded = load_exported(tmp_path / "a")
    module.eval()
    assert torch.equal(_logits(loaded, _batch(module.backbone)), _logits(module, _batch(module.backbone)))


class _OpaqueScheduler(StaticScheduler):
    """Keeps its constructor argument under another name, so export cannot read it back."""

    def __init__(self, num_prefix_layers: int, offset: int = 0) -> None:
        super().__init__(num_prefix_layers)
        self._offset = offset


def test_scheduler_whose_arguments_cannot_be_read_back_needs_a_spec(tokenizer_dir, tmp_path):
    module = AdaptiveMLLM(make_backbone(tokenizer_dir), _OpaqueScheduler(2, offset=1))
    module.configure_model()
    with pytest.raises(ValueError, match=r"_OpaqueScheduler's constructor argument 'offset'.*scheduler_spec"):
        export_module(module, tmp_path / "a")
    spec = {"class_path": "adaptive_mllm.schedulers.StaticScheduler", "init_args": {"num_prefix_layers": 2}}
    export_module(module, tmp_path / "b", scheduler_spec=spec)
    loaded = load_exported(tmp_path / "b")
    module.eval()
    assert torch.equal(_logits(loaded, _batch(module.backbone)), _logits(module, _batch(module.backbone)))


def test_load_of_a_directory_that_is_not_an_export_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"backbone\.json is missing"):
        load_exported(tmp_path)


def test_export_command_from_a_trained_lightning_checkpoint(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lay_out_standins(tmp_path, "llava7b-h.yaml", tokenizer_dir)
    recipe = str(RECIPE_DIR / "llava7b-h.yaml")
    cli = build_cli(["fit", "--config", recipe, *ON_CPU, "--trainer.max_steps=1", "--trainer.accumulate_grad_batches=1",
                     "--data.init_args.batch_size=3"])
    cli.trainer.save_checkpoint(tmp_path / "trained.ckpt")
    main(["export", "--config", recipe, "--ckpt_path", str(tmp_path / "trained.ckpt"), "--out_dir", str(tmp_path / "out")])
    trained = cli.model.eval()
    loaded = load_exported(tmp_path / "out")
    assert type(loaded.scheduler) is HeadScheduler and loaded.scheduler.rank == 8
    assert loaded.max_new_tokens == trained.max_new_tokens == 128  # the recipe's, not the default 16
    batch = _batch(trained.backbone)
    assert torch.equal(_logits(loaded, batch), _logits(trained, batch))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["export", "--config", recipe, "--ckpt_path", str(tmp_path / "nope.ckpt"), "--out_dir", str(tmp_path / "x")])
    # an earlier export is not written over unasked
    weights = {path.name: path.read_bytes() for path in (tmp_path / "out").glob("*.safetensors")}
    again = ["export", "--config", recipe, "--ckpt_path", str(tmp_path / "trained.ckpt"), "--out_dir", str(tmp_path / "out")]
    with pytest.raises(FileExistsError, match=r"out already holds .* entries .*--overwrite"):
        main(again)
    assert {path.name: path.read_bytes() for path in (tmp_path / "out").glob("*.safetensors")} == weights
    main([*again, "--overwrite"])
    assert load_exported(tmp_path / "out").max_new_tokens == 128


def test_a_mipha_model_exports_and_loads_back(tokenizer_dir, tmp_path):
    from adaptive_mllm.backbones import MiphaBackbone

    config = {
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16),
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4),
    }
    module = AdaptiveMLLM(MiphaBackbone(config=config, tokenizer=str(tokenizer_dir), template="plain_chat"), LayerScheduler(2))
    module.configure_model()
    module.eval()
    export_module(module, tmp_path / "export")
    torch.manual_seed(123)
    loaded = load_exported(tmp_path / "export")
    assert isinstance(loaded.backbone, MiphaBackbone)
    backbone = module.backbone
    encoded = backbone.chat_template.encode(
        [("<image>\nHow many shapes are there ?", "two")], backbone.tokenizer, backbone.image_token_id, backbone.num_image_tokens
    )
    ids = torch.tensor([encoded.input_ids] * 2)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([encoded.labels] * 2),
             "prompt_lengths": torch.tensor([encoded.prompt_length] * 2), "pixel_values": random_images(2, 32)}
    assert torch.equal(_logits(loaded, batch), _logits(module, batch))


def test_an_export_is_a_directory_llava_processor_reads(tokenizer_dir, tmp_path):
    """LlavaProcessor.from_pretrained(export) gives this model's prompt (chat template), placeholders (patch
    size, strategy) and pixels, and transformers' LLaVA runs on its output."""
    from PIL import Image
    from transformers import LlavaProcessor

    module = AdaptiveMLLM(make_backbone(tokenizer_dir), LayerScheduler(2))
    module.configure_model()
    export_module(module, tmp_path / "export")
    processor = LlavaProcessor.from_pretrained(tmp_path / "export", backend="pil")  # resized as LLaVA's, exactly
    backbone = module.backbone
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes are there ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
        {"role": "user", "content": [{"type": "text", "text": "What colour is the circle ?"}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    questions = ["<image>\nHow many shapes are there ?", "What colour is the circle ?"]
    assert text == backbone.chat_template.render([(questions[0], "two"), (questions[1], None)])
    image = Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    inputs = processor(images=image, text=text, return_tensors="pt")
    expected = backbone.chat_template.encode_prompt(
        questions, ["two"], backbone.tokenizer, backbone.image_token_id, backbone.num_image_tokens
    )
    assert inputs["input_ids"][0].tolist() == expected
    torch.testing.assert_close(inputs["pixel_values"][0], backbone.preprocess_image(image))
    wide = image.resize((48, 20))  # LLaVA-1.5 pads to a square of the mean colour before resizing
    torch.testing.assert_close(processor(images=wide, text=text, return_tensors="pt")["pixel_values"][0],
                               backbone.preprocess_image(wide), atol=0, rtol=0)
    # transformers 5's default backend resizes with torchvision: a pixel level or two apart (docs say so)
    default = LlavaProcessor.from_pretrained(tmp_path / "export")(images=wide, text=text, return_tensors="pt")
    torch.testing.assert_close(default["pixel_values"][0], backbone.preprocess_image(wide), atol=0.03, rtol=0)
    reference = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        assert reference(**inputs).logits.shape[1] == len(expected)


def test_a_directory_that_is_no_sharded_checkpoint_is_named(tmp_path):
    from adaptive_mllm.checkpoints import CheckpointError, read_checkpoint

    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a sharded Lightning checkpoint"):
        read_checkpoint(tmp_path)


@pytest.fixture(scope="module")
def tiny_export(tokenizer_dir, tmp_path_factory):
    """A small export (LayerScheduler) that the tests below copy and break."""
    module = AdaptiveMLLM(make_backbone(tokenizer_dir), LayerScheduler(2), budget=0.8)
    module.configure_model()
    return export_module(module, tmp_path_factory.mktemp("tiny") / "export")


def _head_scheduler_spec(directory) -> None:
    (directory / "scheduler.json").write_text(json.dumps(
        {"class_path": "adaptive_mllm.schedulers.HeadScheduler", "init_args": {"num_prefix_layers": 2, "rank": 2}}
    ))


def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:40])


CORRUPTIONS = {  # what breaks the copy, the file the error must name, what it must say
    "backbone.json invalid": (lambda d: (d / "backbone.json").write_text("{not json"), "backbone.json", "not valid JSON"),
    "backbone.json a list": (lambda d: (d / "backbone.json").write_text("[1, 2]"), "backbone.json", "a JSON object"),
    "backbone.json no init_args": (lambda d: (d / "backbone.json").write_text('{"class_path": "x.Y"}'), "backbone.json",
                                   "'init_args'"),
    "backbone.json unknown class": (
        lambda d: (d / "backbone.json").write_text('{"class_path": "adaptive_mllm.backbones.Nope", "init_args": {}}'),
        "backbone.json", "adaptive_mllm.backbones.Nope"),
    "module.json empty": (lambda d: (d / "module.json").write_text(""), "module.json", "not valid JSON"),
    "module.json unknown setting": (lambda d: (d / "module.json").write_text('{"budget": 0.8, "colour": 1}'),
                                    "module.json", "'colour'"),
    "scheduler.json no init_args": (
        lambda d: (d / "scheduler.json").write_text('{"class_path": "adaptive_mllm.schedulers.LayerScheduler"}'),
        "scheduler.json", "'init_args'"),
    "scheduler.json wrong arguments": (
        lambda d: (d / "scheduler.json").write_text(
            '{"class_path": "adaptive_mllm.schedulers.LayerScheduler", "init_args": {"layers": 2}}'),
        "scheduler.json", "LayerScheduler"),
    "scheduler.json beyond the layers": (
        lambda d: (d / "scheduler.json").write_text(
            '{"class_path": "adaptive_mllm.schedulers.LayerScheduler", "init_args": {"num_prefix_layers": 9}}'),
        "scheduler.json", "num_prefix_layers=9"),
    "scheduler.safetensors truncated": (lambda d: _truncate(d / "scheduler.safetensors"), "scheduler.safetensors",
                                        "not a complete safetensors file"),
    "scheduler.safetensors missing": (lambda d: (d / "scheduler.safetensors").unlink(), "scheduler.safetensors",
                                      "is missing"),
    "scheduler.safetensors other scheduler's": (_head_scheduler_spec, "scheduler.safetensors", "HeadScheduler"),
    # read alone, the weights were ignored: the model answered at the full budget, without its scheduler
    "scheduler.json missing": (lambda d: (d / "scheduler.json").unlink(), "scheduler.json",
                               "scheduler.safetensors is there but"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_broken_export_file_is_named_with_what_is_wrong(corruption, tiny_export, tmp_path):
    import shutil

    from adaptive_mllm.backbones.local import CheckpointError

    directory = shutil.copytree(tiny_export, tmp_path / "export")
    breaks, name, says = CORRUPTIONS[corruption]
    breaks(directory)
    with pytest.raises(CheckpointError) as error:
        load_exported(directory)
    message = str(error.value)
    assert str(directory / name) in message and says in message and "\n" not in message, message
    from adaptive_mllm.export import check_export_dir  # the cheap check (no weights read) finds them too

    with pytest.raises(CheckpointError, match=re.escape(str(directory / name))):
        check_export_dir(directory)


def test_the_cheap_check_of_an_export_dir(tiny_export, tmp_path):
    from adaptive_mllm.export import check_export_dir

    assert check_export_dir(tiny_export) == tiny_export
    with pytest.raises(FileNotFoundError, match=r"export directory .*nowhere does not exist"):
        check_export_dir(tmp_path / "nowhere")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match=r"file is a file, not a directory"):
        check_export_dir(tmp_path / "file")
    with pytest.raises(FileNotFoundError, match=r"backbone\.json is missing"):
        check_export_dir(tmp_path)


def test_a_lora_run_exports_with_its_adapters_merged(tokenizer_dir, tmp_path, monkeypatch):
    """recipes/llava7b-lora.yaml on stand-ins: fit a step, export the Lightning checkpoint; the export is a plain
    transformers LLaVA (no adapter tensors) answering as the model with its adapters did."""
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    lay_out_standins(tmp_path, "llava7b-lora.yaml", tokenizer_dir)
    recipe = str(RECIPE_DIR / "llava7b-lora.yaml")
    cli = build_cli(["fit", "--config", recipe, *ON_CPU, "--trainer.max_steps=1", "--data.init_args.batch_size=3"])
    trained = cli.model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adapters far from their start, so that a merge that missed them would show
        for name, parameter in trained.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    cli.trainer.save_checkpoint(tmp_path / "trained.ckpt")
    main(["export", "--config", recipe, "--ckpt_path", str(tmp_path / "trained.ckpt"), "--out_dir", str(tmp_path / "out")])
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert not [key for key in weights if "lora" in key or "base_layer" in key]
    plain = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")  # transformers reads it as any LLaVA
    assert plain.config.text_config.num_hidden_layers == 32
    loaded = load_exported(tmp_path / "out")
    batch = _batch(trained.backbone)
    trained.eval()
    expected = _logits(trained, batch)
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if ".lora_B." in name:
                parameter.zero_()
    assert (_logits(trained, batch) - expected).abs().max() > 1e-3  # the adapters mattered to those logits


@pytest.mark.parametrize("stops_at", ["backbone", "scheduler weights"])
def test_an_export_that_stops_midway_is_refused_until_written_again(stops_at, tokenizer_dir, tmp_path, monkeypatch):
    # a kill while exporting: over an earlier export (--overwrite) after the LLM's weights (the new LLM beside the old
    # scheduler), or into a new directory before the scheduler's weights (the model without its scheduler)
    import adaptive_mllm.export as export
    from adaptive_mllm.backbones.local import CheckpointError
    from adaptive_mllm.export import check_export_dir

    earlier = AdaptiveMLLM(make_backbone(tokenizer_dir), LayerScheduler(2), budget=0.8)
    earlier.configure_model()
    directory = tmp_path / "export"
    if stops_at == "backbone":
        export_module(earlier, directory)
    later = AdaptiveMLLM(make_backbone(tokenizer_dir, seed=1), LayerScheduler(2), budget=0.6)
    later.configure_model()

    class Killed(Exception):
        pass

    def kill(*args, **kwargs):
        raise Killed

    if stops_at == "backbone":
        monkeypatch.setattr(export, "_write_json", kill)  # right after save_pretrained
    else:
        monkeypatch.setattr(export, "save_file", kill)
    with pytest.raises(Killed):
        export_module(later, directory, overwrite=True)
    monkeypatch.undo()
    for read in (load_exported, check_export_dir):
        with pytest.raises(CheckpointError, match=r"export that did not finish \(INCOMPLETE is there\).*--overwrite"):
            read(directory)
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_module(later, directory)
    export_module(later, directory, overwrite=True)  # written again: whole, and the marker gone
    assert not (directory / "INCOMPLETE").exists()
    assert load_exported(directory).budget == 0.6


def test_an_export_is_readable_as_its_other_files_are(tokenizer_dir, tmp_path):
    # safetensors wrote the weights 0600: another user could not read an export meant to be shared
    module = AdaptiveMLLM(make_backbone(tokenizer_dir), LayerScheduler(2))
    module.configure_model()
    umask = os.umask(0o022)
    try:
        directory = export_module(module, tmp_path / "export")
    finally:
        os.umask(umask)
    modes = {path.name: path.stat().st_mode & 0o777 for path in directory.iterdir()}
    assert {"model.safetensors", "scheduler.safetensors", "module.json"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes


def test_files_an_export_over_another_did_not_write_are_named(tokenizer_dir, tmp_path):
    """A Mipha export over a LLaVA one (--overwrite) left LLaVA's chat_template.jinja, generation_config.json and
    processor_config.json beside Mipha's files, silently."""
    from adaptive_mllm.backbones import MiphaBackbone

    directory = tmp_path / "export"
    llava = AdaptiveMLLM(make_backbone(tokenizer_dir), LayerScheduler(2))
    llava.configure_model()
    export_module(llava, directory)
    (directory / "notes").mkdir()
    (directory / "notes" / "mine.txt").write_text("mine")
    config = {
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16),
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4),
    }
    mipha = AdaptiveMLLM(MiphaBackbone(config=config, tokenizer=str(tokenizer_dir), template="plain_chat"), LayerScheduler(2))
    mipha.configure_model()
    with pytest.warns(UserWarning, match=r"export .*: 4 files were there before and are not this export's: chat_template.jinja, "
                      r"generation_config.json, notes/mine.txt, processor_config.json\. Delete them if"):  # fmt: skip
        export_module(mipha, directory, overwrite=True)
    for name in ("chat_template.jinja", "generation_config.json", "processor_config.json", "notes/mine.txt"):
        (directory / name).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        export_module(mipha, directory, overwrite=True)  # the same export again: every file of it rewritten, none named


def test_a_run_directory_given_as_an_export_is_named_as_one(tmp_path):
    """A run whose test was stopped holds test's INCOMPLETE: it was called an unfinished export, to be exported
    "again into it with --overwrite" (which wrote an export into the run)."""
    from adaptive_mllm.export import check_export_dir

    run = tmp_path / "runs" / "tiny"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    (run / "INCOMPLETE").write_text("test stopped by SIGTERM: the test_answers*.jsonl files here hold only part\n")
    for read in (load_exported, check_export_dir):
        with pytest.raises(FileNotFoundError, match=r"tiny is a run directory \(config.yaml, checkpoints/\), not an export: "
                           r"pass its recipe and checkpoint \(--config <recipe> --ckpt_path .*last.ckpt\)"):  # fmt: skip
            read(run)
