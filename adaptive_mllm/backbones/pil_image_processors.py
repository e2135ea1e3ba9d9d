"""Image processors that resize with PIL, as the references' did.

LLaVA-1.5, the AdaLLaVA release and Mipha preprocess with transformers 4's ``CLIPImageProcessor`` /
``SiglipImageProcessor``, which resize with PIL. transformers 5's classes of those names resize with
torchvision, whose bicubic filter rounds differently: up to two pixel levels apart on a few pixels
(0.029 after normalisation; ``tests/backbones/test_release_pixels.py``). Its ``...Pil`` classes give the
references' pixels exactly; on transformers 4 the plain classes are the PIL ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image


def _pil_class(name: str) -> Any:
    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def pil_clip_processor(directory: str | Path | None = None, **settings: Any) -> Any:
    """CLIP preprocessing (bicubic resize of the shortest side, centre crop, CLIP's mean / std) with PIL: from a
    directory's ``preprocessor_config.json``, or from ``settings``."""
    cls = _pil_class("CLIPImageProcessor")
    return cls.from_pretrained(directory) if directory is not None else cls(**settings)


def pil_siglip_processor(directory: str | Path | None = None, **settings: Any) -> Any:
    """SigLIP preprocessing (a plain bicubic resize, mean / std 0.5) with PIL; as :func:`pil_clip_processor`."""
    cls = _pil_class("SiglipImageProcessor")
    return cls.from_pretrained(directory) if directory is not None else cls(**settings)


def pil_llava_processor(**settings: Any) -> Any:
    """transformers' LLaVA image processor (CLIP's steps after an optional square padding) with PIL: what an
    export's ``preprocessor_config.json`` names, so that ``LlavaProcessor`` gives this model's pixels."""
    return _pil_class("LlavaImageProcessor")(**settings)


def pil_pixels(processor: Any, image: Image.Image) -> torch.Tensor | None:
    """[3, H, W]: ``processor``'s steps (convert to RGB, shortest-side or fixed-size bicubic resize, centre crop,
    rescale, normalise) done on the PIL image itself, as transformers 4 computed them; None when the processor
    has settings this does not cover (then call the processor).

    The same pixels as the processor (``tests/backbones/test_release_pixels.py``) without its copies of the
    full-size image into arrays and back: a 4096 x 4096 photo takes about half the time (serving decodes such
    images while the model runs; docs/serving.md)."""
    size, crop = _settings(getattr(processor, "size", None)), _settings(getattr(processor, "crop_size", None))
    if not (getattr(processor, "do_resize", False) and getattr(processor, "do_rescale", False) and getattr(processor, "do_normalize", False)):
        return None
    if image.mode != "RGB":  # convert() would copy even an RGB image (52 ms for a 4096 x 4096 one)
        image = image.convert("RGB")
    width, height = image.size
    if set(size) == {"shortest_edge"}:  # CLIP: the short side to S, the long one scaled and truncated
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = int(size["shortest_edge"]), int(int(size["shortest_edge"]) * long / short)
        new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    elif set(size) == {"height", "width"}:  # SigLIP: a plain resize
        new_width, new_height = int(size["width"]), int(size["height"])
    else:
        return None
    resample = getattr(processor, "resample", None)
    image = image.resize((new_width, new_height), resample=int(resample if resample is not None else Image.BICUBIC))
    if getattr(processor, "do_center_crop", False):
        if set(crop) != {"height", "width"} or crop["height"] > new_height or crop["width"] > new_width:
            return None
        top, left = (new_height - crop["height"]) // 2, (new_width - crop["width"]) // 2
        image = image.crop((left, top, left + crop["width"], top + crop["height"]))
    pixels = (np.asarray(image) * float(processor.rescale_factor)).astype(np.float32)  # [H, W, 3]
    mean = np.asarray(processor.image_mean, dtype=np.float32)
    std = np.asarray(processor.image_std, dtype=np.float32)
    return torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1).copy())


def _settings(value: Any) -> dict[str, int]:
    """A size setting as a plain dict of the keys it sets (transformers 5's ``SizeDict`` iterates as pairs)."""
    if value is None:
        return {}
    pairs = value.items() if isinstance(value, dict) else list(value)
    return {key: item for key, item in pairs if item is not None}
