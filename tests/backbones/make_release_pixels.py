"""Writes ``release_pixels.json``: pixels from transformers 4.37.2's CLIPImageProcessor and
SiglipImageProcessor (PIL-based, what LLaVA-1.5, the AdaLLaVA release and Mipha preprocess with), the
fixture that ``test_release_pixels.py`` holds our image preprocessing to.

Not part of the test run (it needs transformers 4.37.2, as make_release_tokens.py's environment):

    /tmp/tf4/bin/python tests/backbones/make_release_pixels.py \\
        <matplotlib>/mpl-data/sample_data/grace_hopper.jpg <matplotlib>/mpl-data/sample_data/logo2.png

Sizes are small (24 pixels) to keep the fixture small; the code path (bicubic resize of the shortest side,
centre crop, or SigLIP's plain resize) is the full-size one. LLaVA's square padding (``expand2square``, the
processor's mean colour) is applied to a copy of every image, as the release's ``image_aspect_ratio pad``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import CLIPImageProcessor, SiglipImageProcessor

OUT = Path(__file__).with_name("release_pixels.json")
SIZE = 24


def pattern_image() -> Image.Image:
    """A 61 x 37 image of sharp integer patterns (no random numbers, so the test rebuilds it exactly)."""
    y, x = np.mgrid[0:37, 0:61]
    channels = [(x * 7 + y * 13) % 256, (x * x + 3 * y) % 256, ((x // 4 + y // 3) % 2) * 255]
    return Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8))


def expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    width, height = image.size
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def main() -> None:
    images = {Path(path).name: Image.open(path).convert("RGB") for path in sys.argv[1:]}
    images["pattern"] = pattern_image()
    processors = {
        "clip": CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}),
        "siglip": SiglipImageProcessor(size={"height": SIZE, "width": SIZE}),
    }
    cases = []
    for kind, processor in processors.items():
        fill = tuple(int(255 * m) for m in processor.image_mean)
        for name, image in images.items():
            for pad in (False, True):
                shown = expand_to_square(image, fill) if pad else image
                pixels = processor.preprocess(shown, return_tensors="np")["pixel_values"][0]
                cases.append({"processor": kind, "image": name, "pad": pad, "shape": list(pixels.shape),
                              "pixels": [round(float(v), 6) for v in pixels.flatten()]})  # fmt: skip
    import transformers

    OUT.write_text(json.dumps({"made_by": "tests/backbones/make_release_pixels.py", "transformers": transformers.__version__,
                               "size": SIZE, "cases": cases}) + "\n")  # fmt: skip
    print(f"{OUT}: {len(cases)} cases")


if __name__ == "__main__":
    main()
