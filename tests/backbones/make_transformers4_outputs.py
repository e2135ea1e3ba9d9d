"""Writes ``transformers4_outputs.json``: what transformers 4.37.2's modules (the version LLaVA-1.5, the AdaLLaVA
release and Mipha pin) compute for tiny Llama, Phi, CLIP and SigLIP models, the fixture that
``test_transformers4_outputs.py`` holds transformers 5's modules (the ones our backbones run) to.

Not part of the test run: it needs transformers 4.37.2, in a separate environment:

    python -m venv /tmp/tf4 && /tmp/tf4/bin/pip install transformers==4.37.2 torch
    /tmp/tf4/bin/python tests/backbones/make_transformers4_outputs.py

The weights are not stored: :func:`fill` draws them from a seed, parameter by parameter in name order, so both
versions build the same model from the same config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

OUT = Path(__file__).with_name("transformers4_outputs.json")
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
MODELS = {  # name: (transformers class, config class, config kwargs); the LLMs as LLaVA-1.5 and Mipha use them
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(TEXT, num_key_value_heads=4)),
    "phi": ("PhiForCausalLM", "PhiConfig", dict(TEXT, hidden_size=80, partial_rotary_factor=0.4)),  # rotary 8 of 20, as Phi-2's 32 of 80
    "clip": ("CLIPVisionModel", "CLIPVisionConfig", VISION),
    "siglip": ("SiglipVisionModel", "SiglipVisionConfig", VISION),
}


def fill(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and buffer-free weight drawn N(0, 0.2) in name order: equal models across versions."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def build(name: str) -> torch.nn.Module:
    import transformers

    model_class, config_class, kwargs = MODELS[name]
    config = getattr(transformers, config_class)(**kwargs)
    return fill(getattr(transformers, model_class)._from_config(config, attn_implementation="eager"))


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TEXT["vocab_size"], (1, 12), generator=generator)
    pixels = torch.randn(1, 3, VISION["image_size"], VISION["image_size"], generator=generator)
    return ids, pixels


def outputs(name: str) -> torch.Tensor:
    """The LLMs' logits; the towers' second-to-last hidden states (what LLaVA and Mipha feed the projector)."""
    model, (ids, pixels) = build(name), inputs()
    with torch.no_grad():
        if name in ("llama", "phi"):
            return model(ids).logits
        return model(pixels, output_hidden_states=True).hidden_states[-2]


def main() -> None:
    import transformers

    fixture = {"made_by": "tests/backbones/make_transformers4_outputs.py", "transformers": transformers.__version__,
               "torch": torch.__version__, "outputs": {name: outputs(name).flatten().tolist() for name in MODELS}}
    OUT.write_text(json.dumps(fixture) + "\n")
    print(f"{OUT}: {', '.join(MODELS)} under transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
