"""PruMerge and PruMerge+ (arXiv 2403.15388): prune the vision tower's patches to the few the CLS token
attends to most, and merge what was pruned into them, before the projector.

1. ``a`` [N]: the CLS token's attention to each patch (``VisualFeatures.cls_attention``, computed by the
   backbone as the release does: last encoder layer's q / k on the penultimate hidden states);
2. kept = the inter-quartile outliers ``a > Q3 + 1.5 (Q3 - Q1)`` (quartiles with linear interpolation,
   as ``numpy.percentile``). ``outliers="image"`` (default) takes the quartiles per image, so an image
   never depends on its batch; the release's count is ``int(N * r)`` with ``r`` the outlier fraction,
   i.e. the outliers themselves, counted here exactly, not through a float ratio. ``outliers="batch"`` is
   the release's rule as written: quartiles over the whole batch, and every image keeps its
   ``int(N * r)`` (= outliers in the batch // batch size) patches of highest attention;
3. PruMerge+ only: add the spatially uniform patches ``0, s, 2s, ... < N - 1`` not already kept, with
   ``s = max(1, int(1 / r) // 3)`` (the release's ``int(int(1 / r) / 3)``, in exact integers; no outlier
   counts as one);
4. each kept patch ``i`` becomes ``x_i + sum_{j in nn_k(i)} a_j x_j``: its ``k`` most similar other
   patches (cosine similarity of keys, among all other patches, kept or pruned), weighted by their CLS
   attention and summed (not averaged);
5. one extra token is appended: ``sum_{j pruned} a_j x_j``.

Output order, as the authors' code emits it (and checkpoints fine-tuned with PruMerge saw): the outliers
in descending CLS attention, then PruMerge+'s samples in index order, then the extra token. Images keep
different numbers of tokens: the output is padded, with ``token_mask``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from adaptive_mllm.backbones.base import VisualFeatures
from adaptive_mllm.token_selection.base import TokenSelector


def iqr_outliers(attention: torch.Tensor) -> torch.Tensor:
    """[B, N] -> [B, N] bool: values above ``Q3 + 1.5 IQR`` of their own row."""
    values = attention.float()
    quartiles = torch.quantile(values, torch.tensor([0.25, 0.75], device=values.device), dim=1)  # [2, B]
    q1, q3 = quartiles[0], quartiles[1]
    return values > (q3 + 1.5 * (q3 - q1))[:, None]


def top_per_row(attention: torch.Tensor, count: int) -> torch.Tensor:
    """[B, N] -> [B, N] bool: the ``count`` highest values of each row (ties: the lower index)."""
    order = attention.argsort(dim=-1, descending=True, stable=True)  # [B, N]
    rank = order.argsort(dim=-1)
    return rank < count


def uniform_step(outliers: torch.Tensor, denominator: int) -> torch.Tensor:
    """[B] outlier counts -> [B] PruMerge+'s sampling step for the outlier fraction ``r = outliers /
    denominator`` (``N`` per image, ``B N`` per batch): ``int(1 / r) // 3`` in integers, at least 1."""
    return ((denominator // outliers.clamp(min=1)) // 3).clamp(min=1)


class PruMerge(TokenSelector):
    """Adaptive pruning by CLS attention outliers, then merging of similar patches into the kept ones.

    Args:
        num_neighbours: ``k``, the most similar patches merged into each kept patch (32 in the release;
            clipped to ``N - 1``).
        outliers: ``"image"``: the inter-quartile rule per image (an image never depends on its batch);
            ``"batch"``: the release's rule, quartiles over the whole batch and the same count per image.
    """

    needs_visual_attention = True

    def __init__(self, num_neighbours: int = 32, outliers: Literal["image", "batch"] = "image") -> None:
        super().__init__()
        if num_neighbours < 0:
            raise ValueError(f"num_neighbours={num_neighbours} must be >= 0")
        if outliers not in ("image", "batch"):
            raise ValueError(f"outliers={outliers!r} must be 'image' or 'batch'")
        self.num_neighbours = num_neighbours
        self.outliers = outliers

    def selected(self, cls_attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N] -> the outliers [B, N] bool and PruMerge+'s added samples [B, N] bool (disjoint)."""
        batch, length = cls_attention.shape
        if self.outliers == "image":
            top = iqr_outliers(cls_attention)
            found, denominator = top.sum(-1), length  # [B], the fraction's parts
        else:
            total = int(iqr_outliers(cls_attention.reshape(1, -1)).sum())
            top = top_per_row(cls_attention.float(), total // batch)  # int(N * total / (B N))
            found, denominator = torch.full((batch,), total, device=cls_attention.device), batch * length
        return top, self.samples(found, denominator, length) & ~top

    def samples(self, outliers: torch.Tensor, denominator: int, length: int) -> torch.Tensor:
        """[B] outlier counts -> [B, N] bool patches added to the outliers (none for PruMerge)."""
        return torch.zeros(outliers.shape[0], length, dtype=torch.bool, device=outliers.device)

    def keep_mask(self, cls_attention: torch.Tensor) -> torch.Tensor:
        """[B, N] -> [B, N] bool: the patches kept (before merging)."""
        top, samples = self.selected(cls_attention)
        return top | samples

    def before_llm(self, visual: VisualFeatures) -> VisualFeatures:
        if visual.cls_attention is None or visual.keys is None:
            raise ValueError(f"{type(self).__name__} needs VisualFeatures.cls_attention and keys (encode_images(with_attention=True))")
        features = visual.features  # [B, N, C]
        batch, length, channels = features.shape
        attention = visual.cls_attention.to(features.dtype)  # [B, N]
        top, samples = self.selected(visual.cls_attention)  # [B, N], [B, N]
        kept = top | samples

        counts = kept.sum(-1)  # [B]
        width = int(counts.max()) + 1  # kept patches + the extra token
        # the kept patches in the release's order (outliers by descending attention, then the samples by
        # index), padded with pruned ones (overwritten below): [B, n_max - 1]
        index = torch.arange(length, device=features.device).expand(batch, -1)
        within = torch.where(top, -visual.cls_attention.double(), index.double())  # order inside each part
        order = within.argsort(dim=1, stable=True)
        part = torch.where(top, 0, torch.where(samples, 1, 2)).gather(1, order)  # outliers, samples, pruned
        order = order.gather(1, part.argsort(dim=1, stable=True))[:, : width - 1]

        # each kept patch's k nearest other patches by key cosine similarity, among all N
        k = min(self.num_neighbours, length - 1)
        keys = F.normalize(visual.keys.float(), dim=-1)  # [B, N, Ck]
        kept_keys = keys.gather(1, order[..., None].expand(-1, -1, keys.shape[-1]))  # [B, n_max - 1, Ck]
        similarity = kept_keys @ keys.transpose(1, 2)  # [B, n_max - 1, N]
        similarity.scatter_(2, order[..., None], float("-inf"))  # never itself
        neighbours = similarity.topk(k, dim=-1).indices  # [B, n_max - 1, k]
        weighted = features * attention[..., None]  # [B, N, C]: a_j x_j
        merged = features.gather(1, order[..., None].expand(-1, -1, channels))  # [B, n_max - 1, C]
        gathered = weighted.gather(1, neighbours.reshape(batch, -1, 1).expand(-1, -1, channels))
        merged = merged + gathered.view(batch, width - 1, k, channels).sum(2)  # x_i + sum a_j x_j

        extra = (weighted * (~kept)[..., None].to(features.dtype)).sum(1)  # [B, C]: the pruned, summed

        slots = torch.arange(width, device=features.device)[None, :]  # [1, n_max]
        out = features.new_zeros(batch, width, channels)  # [B, n_max, C]
        out[:, : width - 1] = merged
        out = torch.where((slots == counts[:, None])[..., None], extra[:, None, :], out)
        token_mask = slots <= counts[:, None]  # [B, n_max]
        out = out.masked_fill(~token_mask[..., None], 0.0)
        return VisualFeatures(features=out, token_mask=token_mask)


class PruMergePlus(PruMerge):
    """PruMerge plus spatially uniform patches added to the kept set before merging (about 25% kept
    on CLIP ViT-L/14-336 in the paper).

    Args:
        num_neighbours: ``k``, the most similar patches merged into each kept patch (32 in the release).
        outliers: ``"image"`` (per image, default) or ``"batch"`` (the release's quartiles over the batch).
    """

    def samples(self, outliers: torch.Tensor, denominator: int, length: int) -> torch.Tensor:
        step = uniform_step(outliers, denominator)  # [B]
        index = torch.arange(length, device=outliers.device)[None, :]  # [1, N]
        return (index % step[:, None] == 0) & (index < length - 1)
