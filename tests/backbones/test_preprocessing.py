"""LLaVA-1.5 image preprocessing: pad to a square of the processor's mean colour, then CLIP's 336 resize."""

from __future__ import annotations

import json

import torch
from PIL import Image

from adaptive_mllm.backbones import LlavaBackbone
from adaptive_mllm.backbones.local import pad_to_square
from tests.backbones.release_layout import write_release

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# preprocessor_config.json of openai/clip-vit-large-patch14-336, written out by hand
CLIP_336 = {
    "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
    "resample": 3, "size": 336,
}


def test_pad_to_square_is_llavas_expand2square_by_hand():
    # 5 wide, 2 high: pasted at (0, (5 - 2) // 2) = row 1, rows 0, 3, 4 are the fill colour
    image = Image.new("RGB", (5, 2), (255, 0, 0))
    fill = (122, 116, 104)  # int(255 * m) for CLIP's mean (0.4815, 0.4578, 0.4082): 122.77, 116.75, 104.09
    square = pad_to_square(image, fill)
    assert square.size == (5, 5)
    rows = torch.tensor(list(square.getdata())).view(5, 5, 3)
    for row, colour in enumerate([fill, (255, 0, 0), (255, 0, 0), fill, fill]):
        assert rows[row].eq(torch.tensor(colour)).all(), row
    tall = pad_to_square(Image.new("RGB", (1, 4), (0, 255, 0)), fill)  # column (4 - 1) // 2 = 1
    columns = torch.tensor(list(tall.getdata())).view(4, 4, 3)
    assert columns[:, 1].eq(torch.tensor([0, 255, 0])).all()
    assert columns[:, [0, 2, 3]].eq(torch.tensor(fill)).all()


def test_llava15_preprocessing_pads_with_the_mean_and_resizes_to_336(tmp_path):
    release, tower, _, _ = write_release(tmp_path)
    (tower / "preprocessor_config.json").write_text(json.dumps(CLIP_336))
    backbone = LlavaBackbone(checkpoint=str(release), vision_tower=str(tower))  # the processor of the tower dir
    pixels = backbone.preprocess_image(Image.new("RGB", (40, 20), (255, 0, 0)))
    assert pixels.shape == (3, 336, 336)
    # by hand: top band is the fill colour (122, 116, 104) / 255, the middle the red image, normalised by CLIP
    fill = torch.tensor([(v / 255 - m) / s for v, m, s in zip((122, 116, 104), CLIP_MEAN, CLIP_STD, strict=True)])
    red = torch.tensor([(v - m) / s for v, m, s in zip((1.0, 0.0, 0.0), CLIP_MEAN, CLIP_STD, strict=True)])
    torch.testing.assert_close(pixels[:, 10, 168], fill, atol=1e-4, rtol=0)
    torch.testing.assert_close(pixels[:, 325, 20], fill, atol=1e-4, rtol=0)
    torch.testing.assert_close(pixels[:, 168, 168], red, atol=1e-4, rtol=0)
    # without padding the red image would fill the whole square
    backbone.pad_to_square = False
    assert torch.allclose(backbone.preprocess_image(Image.new("RGB", (40, 20), (255, 0, 0)))[:, 10, 168], red, atol=1e-4)
