"""Writes ``adallava_release_outputs.json``: what the AdaLLaVA release's own model code answers, per budget, for
tiny AdaLLaVA-L and AdaLLaVA-H checkpoints, the fixture that ``test_adallava_release.py`` holds this project's
reading of such checkpoints to (backbone, scheduler weights, latency token, plans, decoding).

Not part of the test run: it needs the reference stack, in a separate environment:

    python -m venv /tmp/tf4 && /tmp/tf4/bin/pip install transformers==4.37.2 tokenizers==0.15.1 torch einops
    /tmp/tf4/bin/python tests/backbones/make_adallava_release_outputs.py \\
        --llava <checkout of haotian-liu/LLaVA> --release <checkout of ChulanZhang/SmartVLM at 8ea416e>

The release's ``AdaLlavaLlamaForCausalLM`` (src/adallava/model, with LLaVA's ``llava_arch``) builds each model,
saves it with its own ``save_pretrained``, loads it back with ``from_pretrained`` and answers with its own
``generate(images=..., latency=b)``; nothing of it is copied here. Weights are a function of each key
(``adallava_release_layout.keyed_tensor``), so the tests rebuild the same checkpoint from the recorded keys.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402 - after the repository is on the path
from safetensors.torch import load_file, save_file  # noqa: E402

from tests.backbones.adallava_release_layout import (  # noqa: E402
    FIXTURE_FILE,
    TOWER_IN_CHECKPOINT,
    keyed_state,
)
from tests.backbones.reference_preprocessing import IMAGE_SENTINEL, load_reference_package  # noqa: E402

RELEASE_COMMIT = "8ea416e7f841210b73382c29ae1005580c7a652e"
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
             patch_size=8, projection_dim=32)
VARIANTS = {"L": dict(scheduler_type="L"), "H": dict(scheduler_type="H", scheduler_rank=2)}
PROMPTS = [[1, 5, 9, 13, IMAGE_SENTINEL, 20, 21, 22, 23], [1, 7, IMAGE_SENTINEL, 30, 31, 40, 8, 3]]
BUDGETS = [1.0, 0.85, 0.7, 0.6, 0.5]
NEW_TOKENS = 5


def pixels(seed: int) -> torch.Tensor:
    return torch.randn(3, TOWER["image_size"], TOWER["image_size"], generator=torch.Generator().manual_seed(seed))


def write_tower(directory: Path) -> dict:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(**TOWER)
    config.save_pretrained(directory)
    size = TOWER["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(directory)
    shapes = {key: list(value.shape) for key, value in CLIPVisionModel(config).state_dict().items()
              if value.is_floating_point() and not key.endswith("position_ids")}
    save_file(keyed_state(shapes), directory / "model.safetensors", metadata={"format": "pt"})
    return {"tower_config": json.loads((directory / "config.json").read_text()),
            "tower_preprocessor": json.loads((directory / "preprocessor_config.json").read_text()),
            "tower_shapes": shapes}


def release_model(variant: str, tower: Path, directory: Path) -> tuple[torch.nn.Module, dict]:
    """The release's model built, keyed, saved and loaded back; its config.json and weight shapes."""
    from adallava.model.ada_llava_llama import AdaLlavaConfig, AdaLlavaLlamaForCausalLM

    config = AdaLlavaConfig(
        **TEXT, **VARIANTS[variant], num_prefix_layers=3, token_selecting="none", architectures=["AdaLlavaLlamaForCausalLM"],
        mm_vision_tower=str(tower), mm_hidden_size=TOWER["hidden_size"], mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_use_im_start_end=False,
        mm_use_im_patch_token=False, image_aspect_ratio="pad",
    )
    model = AdaLlavaLlamaForCausalLM(config)
    model.get_vision_tower().load_model()
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()
              if value.is_floating_point() and not key.startswith(TOWER_IN_CHECKPOINT) and not key.endswith("inv_freq")}
    missing, unexpected = model.load_state_dict(keyed_state(shapes), strict=False)
    assert not unexpected and all(key.startswith(TOWER_IN_CHECKPOINT) or key.endswith("inv_freq") for key in missing)
    model.save_pretrained(directory, safe_serialization=True)
    saved = load_file(directory / "model.safetensors")
    assert {key for key in saved if not key.startswith(TOWER_IN_CHECKPOINT)} == set(shapes), "save_pretrained wrote other keys"
    loaded = AdaLlavaLlamaForCausalLM.from_pretrained(directory)  # the release's own loading path, as its builder
    loaded.get_vision_tower().load_model()
    loaded.generation_config.eos_token_id = None  # answer NEW_TOKENS tokens whatever they are
    return loaded.eval(), {"config": json.loads((directory / "config.json").read_text()), "shapes": shapes}


def answers(model: torch.nn.Module) -> list[dict]:
    from adallava.model.language_model.ada_llama.cache_utils import DynamicCacheWithExecutionPlan

    rows = []
    for case, prompt in enumerate(PROMPTS):
        for budget in BUDGETS:
            with torch.no_grad():
                out = model.generate(
                    inputs=torch.tensor([prompt]), images=pixels(case)[None], latency=torch.tensor([budget]),
                    max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1, use_cache=True, pad_token_id=0,
                    return_dict_in_generate=True, output_scores=True,
                )
            plan = DynamicCacheWithExecutionPlan.get_execution_plan_from_legacy_cache(out.past_key_values, TEXT["num_hidden_layers"])
            # per layer [2, heads]: attention heads (row 0) and MLP groups (row 1) kept; None where every unit runs
            plan = [None if layer is None else layer.reshape(-1, 2, TEXT["num_attention_heads"])[0].int().tolist() for layer in plan]
            # with inputs_embeds, transformers 4.37 starts the sequence with BOS: the answer is what follows
            rows.append({"case": case, "budget": budget, "tokens": out.sequences[0, -NEW_TOKENS:].tolist(),
                         "first_logits": out.scores[0][0].tolist(), "plan": plan})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llava", type=Path, required=True, help="a checkout of haotian-liu/LLaVA")
    parser.add_argument("--release", type=Path, required=True, help=f"a checkout of ChulanZhang/SmartVLM at {RELEASE_COMMIT[:7]}")
    args = parser.parse_args()
    load_reference_package("llava", args.llava)
    load_reference_package("adallava", args.release / "src")
    import transformers

    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp())
    fixture = {"made_by": "tests/backbones/make_adallava_release_outputs.py", "release_commit": RELEASE_COMMIT,
               "transformers": transformers.__version__, "prompts": PROMPTS, "image_sentinel": IMAGE_SENTINEL,
               "new_tokens": NEW_TOKENS, **write_tower(root / "tower"), "variants": {}}
    for variant in VARIANTS:
        model, layout = release_model(variant, root / "tower", root / variant)
        fixture["variants"][variant] = {**layout, "answers": answers(model)}
    FIXTURE_FILE.write_text(json.dumps(fixture) + "\n")
    counts = ", ".join(f"{variant}: {len(layout['answers'])} answers" for variant, layout in fixture["variants"].items())
    print(f"{FIXTURE_FILE}: {counts}")


if __name__ == "__main__":
    main()
