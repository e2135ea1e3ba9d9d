from adaptive_mllm.token_selection.base import TokenSelector

__all__ = ["TokenSelector"]
