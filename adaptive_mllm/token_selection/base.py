"""TokenSelector: which visual tokens reach the LLM.

A selector has two optional hooks: ``before_llm`` works on the vision tower's features (PruMerge),
``after_layer`` runs inside the LLM after layer ``layer_index`` (FastV). A selector knows nothing of
schedulers, and the other way round; the engine calls ``after_layer``, the module ``before_llm``.
"""

from __future__ import annotations

from torch import nn

from adaptive_mllm.backbones.base import VisualFeatures


class TokenSelector(nn.Module):
    """Base class: the identity selector (every visual token is kept)."""

    #: LLM layer after which ``after_layer`` runs; None = no in-LLM hook.
    layer_index: int | None = None

    def before_llm(self, visual: VisualFeatures) -> VisualFeatures:
        return visual
