"""PruMerge / PruMerge+ against an independent, loop-by-loop reimplementation of the rule in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptive_mllm.backbones.base import VisualFeatures
from adaptive_mllm.inputs import embed_selected
from adaptive_mllm.token_selection import PruMerge, PruMergePlus
from tests.conftest import make_backbone, random_images


def _visual(batch: int, length: int, channels: int, seed: int) -> VisualFeatures:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, generator=generator)
    logits[:, :: max(length // 6, 1)] += 3.0  # a few clear outliers per row, at different places
    logits += torch.randn(batch, length, generator=generator)
    return VisualFeatures(
        features=torch.randn(batch, length, channels, generator=generator, dtype=torch.float64),
        cls_attention=logits.double().softmax(-1),
        keys=torch.randn(batch, length, 5, generator=generator, dtype=torch.float64),
    )


def _reference_kept(attention: np.ndarray, plus: bool) -> list[int]:
    """The kept patches in the authors' output order: the outliers by descending CLS attention (their
    ``topk(..., sorted=True)``), then PruMerge+'s uniform samples not already kept, in index order."""
    q1, q3 = np.percentile(attention, 25), np.percentile(attention, 75)
    kept = sorted((i for i, value in enumerate(attention) if value > q3 + 1.5 * (q3 - q1)), key=lambda i: -attention[i])
    if plus:
        length = len(attention)
        step = max(1, (length // max(len(kept), 1)) // 3)
        kept = kept + [i for i in range(0, length - 1, step) if i not in kept]
    return kept


def _reference_kept_batch(attention: np.ndarray, plus: bool) -> list[list[int]]:
    """The release's batch rule as written (clip_encoder.py ``outlier_dectection`` on the whole batch):
    ``r`` = outliers of the flattened batch / its size; each image keeps its ``int(N r)`` top patches,
    descending; PruMerge+ adds ``range(0, N - 1, int(int(1 / r) / 3))`` minus those, in index order."""
    batch, length = attention.shape
    flat = attention.flatten()
    q1, q3 = np.percentile(flat, 25), np.percentile(flat, 75)
    ratio = int((flat > q3 + 1.5 * (q3 - q1)).sum()) / flat.size
    rows = []
    for b in range(batch):
        kept = [int(i) for i in np.argsort(-attention[b], kind="stable")[: int(length * ratio)]]
        if plus:
            kept = kept + [i for i in range(0, length - 1, int(int(1 / ratio) / 3)) if i not in kept]
        rows.append(kept)
    return rows


def _reference(visual: VisualFeatures, k: int, plus: bool, batch_rule: bool = False) -> list[np.ndarray]:
    """Per example: the kept patches merged with their k most similar others, then the pruned sum."""
    out = []
    per_batch = _reference_kept_batch(visual.cls_attention.numpy(), plus) if batch_rule else None
    for b in range(visual.features.shape[0]):
        x = visual.features[b].numpy()
        a = visual.cls_attention[b].numpy()
        keys = visual.keys[b].numpy()
        keys = keys / np.linalg.norm(keys, axis=1, keepdims=True)
        kept = per_batch[b] if batch_rule else _reference_kept(a, plus)
        rows = []
        for i in kept:
            others = [j for j in range(len(a)) if j != i]
            similarity = np.array([keys[i] @ keys[j] for j in others])
            nearest = [others[j] for j in np.argsort(-similarity)[:k]]
            rows.append(x[i] + sum(a[j] * x[j] for j in nearest))
        pruned = [j for j in range(len(a)) if j not in kept]
        rows.append(sum((a[j] * x[j] for j in pruned), np.zeros(x.shape[1])))
        out.append(np.stack(rows))
    return out


@pytest.mark.parametrize("selector_class", [PruMerge, PruMergePlus])
def test_kept_set_is_the_iqr_rule_per_example(selector_class):
    visual = _visual(4, 576, 3, seed=0)
    kept = selector_class().keep_mask(visual.cls_attention)
    for b in range(4):
        expected = _reference_kept(visual.cls_attention[b].numpy(), plus=selector_class is PruMergePlus)
        assert kept[b].nonzero().flatten().tolist() == sorted(expected)
    counts = kept.sum(-1)
    assert len(set(counts.tolist())) > 1  # examples really keep different numbers
    if selector_class is PruMerge:
        assert bool((counts < 576 // 4).all())


@pytest.mark.parametrize("selector_class", [PruMerge, PruMergePlus])
@pytest.mark.parametrize("k", [1, 4])
def test_merged_features_match_the_rule(selector_class, k):
    visual = _visual(3, 40, 6, seed=1)
    out = selector_class(num_neighbours=k).before_llm(visual)
    expected = _reference(visual, k, plus=selector_class is PruMergePlus)
    for b, rows in enumerate(expected):
        count = int(out.token_mask[b].sum())
        assert count == len(rows)  # kept + the extra token
        assert bool(out.token_mask[b, :count].all()) and not bool(out.token_mask[b, count:].any())
        np.testing.assert_allclose(out.features[b, :count].numpy(), rows, rtol=1e-10, atol=1e-12)
        assert bool((out.features[b, count:] == 0).all())


@pytest.mark.parametrize("selector_class", [PruMerge, PruMergePlus])
def test_output_order_is_the_authors(selector_class):
    """The kept tokens come out by descending CLS attention (then PruMerge+'s samples by index), the
    extra token last: read back through the merge of an identity-like feature set with no neighbours."""
    visual = _visual(3, 48, 48, seed=4)
    visual.features = torch.eye(48, dtype=torch.float64).expand(3, -1, -1).clone()  # feature j = one-hot j
    out = selector_class(num_neighbours=0).before_llm(visual)
    for b in range(3):
        count = int(out.token_mask[b].sum()) - 1  # without the extra token
        emitted = out.features[b, :count].argmax(-1).tolist()  # which patch each output token is
        expected = _reference_kept(visual.cls_attention[b].numpy(), plus=selector_class is PruMergePlus)
        assert emitted == expected
        attention = visual.cls_attention[b]
        outliers = [i for i in emitted if i in _reference_kept(attention.numpy(), plus=False)]
        assert outliers == emitted[: len(outliers)] and attention[outliers].tolist() == sorted(attention[outliers].tolist(), reverse=True)
        assert emitted != sorted(emitted)  # not raster order


@pytest.mark.parametrize("selector_class", [PruMerge, PruMergePlus])
def test_batch_outlier_rule_is_the_releases(selector_class):
    visual = _visual(4, 60, 6, seed=5)
    visual.cls_attention[1] = visual.cls_attention[1] ** 3 / (visual.cls_attention[1] ** 3).sum()  # a peakier image
    selector = selector_class(num_neighbours=4, outliers="batch")
    out = selector.before_llm(visual)
    expected = _reference(visual, 4, plus=selector_class is PruMergePlus, batch_rule=True)
    per_image = _reference(visual, 4, plus=selector_class is PruMergePlus)
    assert [len(rows) for rows in expected] != [len(rows) for rows in per_image]  # the two rules differ here
    for b, rows in enumerate(expected):
        count = int(out.token_mask[b].sum())
        assert count == len(rows)
        np.testing.assert_allclose(out.features[b, :count].numpy(), rows, rtol=1e-10, atol=1e-12)


def test_an_example_never_depends_on_its_batch():
    visual = _visual(5, 64, 4, seed=2)
    selector = PruMergePlus(num_neighbours=8)
    together = selector.before_llm(visual)
    for b in range(5):
        alone = selector.before_llm(
            VisualFeatures(visual.features[b : b + 1], visual.cls_attention[b : b + 1], visual.keys[b : b + 1])
        )
        count = int(alone.token_mask.sum())
        assert count == int(together.token_mask[b].sum())
        torch.testing.assert_close(alone.features[0, :count], together.features[b, :count], rtol=0, atol=0)


def test_neighbours_are_clipped_to_the_other_patches():
    visual = _visual(2, 6, 3, seed=3)
    out = PruMergePlus(num_neighbours=32).before_llm(visual)
    expected = _reference(visual, 5, plus=True)
    for b, rows in enumerate(expected):
        assert len(rows) > 2  # some kept patches, merged with all 5 others
        np.testing.assert_allclose(out.features[b, : len(rows)].numpy(), rows, rtol=1e-10, atol=1e-12)


def test_cls_attention_is_the_last_layer_on_the_penultimate_states(tokenizer_dir):
    """Independently, as the release does it: forward hooks on the last encoder layer's q / k projections."""
    backbone = make_backbone(tokenizer_dir)
    tower = backbone.model.model.vision_tower
    captured = {}
    last = getattr(tower, "vision_model", tower).encoder.layers[-1].self_attn
    hooks = [
        last.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o)),
        last.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o)),
    ]
    images = random_images(3)
    with torch.no_grad():
        tower(images)
        for hook in hooks:
            hook.remove()
        q, k = captured["q"], captured["k"]
        attention = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)[:, 0, 1:]
        visual = backbone.encode_images(images, with_attention=True)
    torch.testing.assert_close(visual.cls_attention, attention, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(visual.keys, k[:, 1:])
    torch.testing.assert_close(visual.features, backbone.encode_images(images).features)


def test_embedding_keeps_each_examples_tokens_and_labels(tokenizer_dir):
    backbone = make_backbone(tokenizer_dir)
    n = backbone.num_image_tokens
    image, text = backbone.image_token_id, 7
    # right-padded rows: [image x n, text...], one without an image
    rows = [[image] * n + [text, text + 1, text + 2], [image] * n + [text], [text, text + 3]]
    width = max(len(r) for r in rows)
    pad = backbone.tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = torch.where(ids == image, -100, ids)
    labels[mask == 0] = -100
    images = random_images(2)

    class KeepFirst(PruMerge):  # a known, per-image count: image 0 keeps 1 token, image 1 keeps 2
        def before_llm(self, visual):
            features = visual.features[:, :2]
            return VisualFeatures(features=features, token_mask=torch.tensor([[True, False], [True, True]]))

    with torch.no_grad():
        out = embed_selected(backbone, ids, mask, images, KeepFirst(), labels)
        projected = backbone.project(backbone.encode_images(images).features)
    assert out.image_mask.sum(-1).tolist() == [1, 2, 0]
    assert out.attention_mask.sum(-1).tolist() == [1 + 3, 2 + 1, 2]
    for row in range(3):
        real = out.attention_mask[row].bool()
        kept_text = [int(ids[row, c]) for c in out.source_index[row][real & ~out.image_mask[row]]]
        assert kept_text == [t for t in rows[row] if t != image]
        assert out.labels[row][real & ~out.image_mask[row]].tolist() == kept_text
        assert bool((out.labels[row][~real] == -100).all())
    # left padding, the kept image features in place
    assert bool(out.attention_mask[:, -1].all())
    torch.testing.assert_close(out.embeds[0][out.image_mask[0]], projected[0, :1])
    torch.testing.assert_close(out.embeds[1][out.image_mask[1]], projected[1, :2])
