"""GQA accuracy as LLaVA-1.5 converts its answers and GQA's eval.py compares them."""

from __future__ import annotations

from collections.abc import Sequence

from adaptive_mllm.metrics.exact_match import GroupedExactMatch


def gqa_prediction(prediction: str) -> str:
    """A generated answer as LLaVA-1.5's convert_gqa_for_eval.py writes it for GQA's eval.py: the text
    (stripped by model_vqa_loader) without trailing periods, lower-cased; nothing else ("a dog" stays)."""
    return prediction.strip().rstrip(".").lower()


class GQAAccuracy(GroupedExactMatch):
    """GQA's eval.py accuracy after LLaVA-1.5's conversion: ``gqa_prediction(p) == answer``, the answer
    exactly as in the questions file (no VQA normalisation), overall and per group (structural type)."""

    def hits(self, predictions: Sequence[str], references: Sequence[str]) -> list[int]:
        return [int(gqa_prediction(p) == r) for p, r in zip(predictions, references, strict=True)]
