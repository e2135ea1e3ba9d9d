"""Our image preprocessing gives the pixels of transformers 4.37.2's PIL-based processors, which LLaVA-1.5,
the AdaLLaVA release (CLIP) and Mipha (SigLIP) used; ``release_pixels.json`` was written by them
(``make_release_pixels.py``). transformers 5's default processors resize with torchvision, up to two
pixel levels apart."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest
import torch
from PIL import Image

from adaptive_mllm.backbones.local import preprocess_padded
from adaptive_mllm.backbones.pil_image_processors import pil_clip_processor, pil_pixels, pil_siglip_processor
from tests.backbones.make_release_pixels import pattern_image

FIXTURE = json.loads(Path(__file__).with_name("release_pixels.json").read_text())
SAMPLES = Path(matplotlib.get_data_path()) / "sample_data"


def _image(name: str) -> Image.Image:
    return pattern_image() if name == "pattern" else Image.open(SAMPLES / name)


def _processor(kind: str):
    size = FIXTURE["size"]
    if kind == "clip":
        return pil_clip_processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return pil_siglip_processor(size={"height": size, "width": size})


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=lambda case: f"{case['processor']}-{case['image']}-pad{case['pad']}")
def test_pixels_equal_the_releases(case):
    pixels = preprocess_padded(_processor(case["processor"]), _image(case["image"]), case["pad"])
    expected = torch.tensor(case["pixels"]).reshape(case["shape"])
    torch.testing.assert_close(pixels, expected, atol=2e-6, rtol=0)


def test_the_fixture_has_non_square_photos_and_both_processors():
    assert {case["image"] for case in FIXTURE["cases"]} == {"grace_hopper.jpg", "logo2.png", "pattern"}
    assert {case["processor"] for case in FIXTURE["cases"]} == {"clip", "siglip"}
    assert all(_image(name).size[0] != _image(name).size[1] for name in ("grace_hopper.jpg", "logo2.png", "pattern"))


def test_the_lean_path_runs_and_equals_the_processor_on_odd_sizes():
    """``pil_pixels`` (what ``preprocess_padded`` uses: the processor's steps on the PIL image) equals calling the
    PIL processor itself, on sizes whose shortest-side resize truncates; other settings fall back to the processor."""
    generator = torch.Generator().manual_seed(0)
    for kind in ("clip", "siglip"):
        processor = _processor(kind)
        for width, height in [(31, 77), (77, 31), (24, 24), (101, 64), (5, 300)]:
            array = (torch.rand(height, width, 3, generator=generator) * 255).byte().numpy()
            image = Image.fromarray(array)
            lean = pil_pixels(processor, image)
            assert lean is not None, (kind, width, height)
            torch.testing.assert_close(lean, processor(images=image, return_tensors="pt")["pixel_values"][0], atol=2e-6, rtol=0)
    odd = pil_clip_processor(size={"longest_edge": 24}, crop_size={"height": 24, "width": 24})
    assert pil_pixels(odd, _image("pattern")) is None
