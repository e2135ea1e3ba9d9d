from adaptive_mllm.token_selection.base import TokenLayout, TokenSelector
from adaptive_mllm.token_selection.fastv import FastV
from adaptive_mllm.token_selection.prumerge import PruMerge, PruMergePlus

__all__ = ["FastV", "PruMerge", "PruMergePlus", "TokenLayout", "TokenSelector"]
