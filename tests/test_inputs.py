"""Input assembly: image features land on the placeholders, the latency token where it was asked."""

from __future__ import annotations

import pytest
import torch

from adaptive_mllm.backbones.templates import IGNORE_INDEX
from adaptive_mllm.inputs import embed_multimodal, insert_token, position_ids_from_mask
from tests.conftest import random_images


def test_insert_token_per_example_positions():
    embeds = torch.arange(2 * 4 * 1, dtype=torch.float).view(2, 4, 1)  # values 0..7
    token = torch.tensor([[100.0], [200.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    out, new_mask, new_labels = insert_token(embeds, token, torch.tensor([1, 4]), mask, labels)
    assert out[..., 0].tolist() == [[0, 100, 1, 2, 3], [4, 5, 6, 7, 200]]
    assert new_mask.tolist() == [[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert new_labels.tolist() == [[-100, IGNORE_INDEX, 5, 6, -100], [-100, -100, 7, 8, IGNORE_INDEX]]


def test_positions_ignore_left_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_image_features_fill_the_placeholders_in_order(backbone):
    n = backbone.num_image_tokens
    image_id = backbone.image_token_id
    ids = torch.tensor([[2] + [image_id] * n + [7], [2, 7] + [image_id] * n])
    images = random_images(2)
    embeds = embed_multimodal(backbone, ids, images)
    projected = backbone.project(backbone.encode_images(images).features)
    torch.testing.assert_close(embeds[0, 1 : 1 + n], projected[0])
    torch.testing.assert_close(embeds[1, 2:], projected[1])
    torch.testing.assert_close(embeds[0, 0], backbone.embed(torch.tensor([2]))[0])


def test_placeholder_count_mismatch_is_a_clear_error(backbone):
    ids = torch.tensor([[2] + [backbone.image_token_id] * 3])
    with pytest.raises(ValueError, match="every image needs exactly"):
        embed_multimodal(backbone, ids, random_images(1))
    with pytest.raises(ValueError, match="no pixel_values"):
        embed_multimodal(backbone, ids, None)
