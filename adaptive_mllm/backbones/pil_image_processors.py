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

import transformers


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
