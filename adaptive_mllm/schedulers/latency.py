"""LatencyEncoder: a budget, already quantised to scheduler units, -> the latency token.

The scheduler turns a budget into ``k`` units (through the cost model) and hands over
``k / (num_units + 1)``, as the reference normalises ``k`` by ``L_total - L_prefix + 1``. The value is
encoded like a position, ``2 pi value`` through 128 sine and 128 cosine frequencies
``1 / 10000^(i / 128)``, then a small MLP maps the 256 features to the LLM's hidden size.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LatencyEncoder(nn.Module):
    """[B] unit fraction in [0, 1) -> [B, hidden] latency token.

    Args:
        hidden_size: the LLM's hidden size.
        num_frequencies: sine (and as many cosine) frequencies; 2 x this many features.
    """

    def __init__(self, hidden_size: int, num_frequencies: int = 128) -> None:
        super().__init__()
        self.num_frequencies = num_frequencies
        features = 2 * num_frequencies
        self.norm = nn.LayerNorm(features)
        self.up = nn.Linear(features, hidden_size)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden_size, hidden_size)

    def features(self, value: torch.Tensor) -> torch.Tensor:
        """[B] -> [B, 2F] sin / cos features, in float32 (frequencies are not a buffer, so casting the
        module to bf16 does not round them)."""
        index = torch.arange(self.num_frequencies, device=value.device, dtype=torch.float32)
        frequencies = 1.0 / (10000.0 ** (index / self.num_frequencies))  # [F]
        angles = (2 * math.pi * value.float())[:, None] * frequencies  # [B, F]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)  # [B, 2F]

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        x = self.features(value).to(self.up.weight.dtype)  # [B, 2F]
        return self.down(self.act(self.up(self.norm(x))))  # [B, hidden]
