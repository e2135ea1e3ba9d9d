"""transformers 5's Llama, Phi, CLIP and SigLIP modules (what our backbones run, and what the engine's logits are
held equal to in test_llava.py / test_mipha.py) compute what transformers 4.37.2's did, the version the references
trained and evaluated with, to float rounding: 4.37.2 divided the attention scores by sqrt(head_dim), 5 multiplies
by head_dim ** -0.5, one rounding apart unless head_dim is a power of 4.

``transformers4_outputs.json`` holds 4.37.2's outputs (eager attention, its only one for Phi, CLIP and SigLIP) for
the same seeded weights (``make_transformers4_outputs.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.backbones.make_transformers4_outputs import MODELS, build, inputs

FIXTURE = json.loads(Path(__file__).with_name("transformers4_outputs.json").read_text())


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_equal_transformers_4s_to_rounding(name, attention):
    model = build(name)
    model.set_attn_implementation(attention)
    ids, pixels = inputs()
    with torch.no_grad():
        got = model(ids).logits if name in ("llama", "phi") else model(pixels, output_hidden_states=True).hidden_states[-2]
    expected = torch.tensor(FIXTURE["outputs"][name])
    assert expected.abs().max() > 0.5  # outputs of a size where a real difference would show
    torch.testing.assert_close(got.flatten(), expected, rtol=0, atol=1e-6)


def test_the_weights_are_drawn_not_default():
    """The fixture is only a check if the models are not default-initialised alike."""
    assert build("llama").model.embed_tokens.weight.std() > 0.1
    assert len({round(value, 4) for value in FIXTURE["outputs"]["phi"]}) > 100
