"""The majority-answer baseline: what answering every question with its group's most common answer scores."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

from adaptive_mllm.metrics.answers import normalize_answer
from adaptive_mllm.metrics.base import OVERALL, check_batch


def majority_answers(answers: Sequence[str], groups: Sequence[str]) -> dict[str, str]:
    """The most common normalised answer per group (ties: alphabetically first, so runs agree)."""
    check_batch(answers=answers, groups=groups)
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for answer, group in zip(answers, groups, strict=True):
        counts[group][normalize_answer(answer)] += 1
    return {group: min(counter.items(), key=lambda item: (-item[1], item[0]))[0] for group, counter in sorted(counts.items())}


def majority_baseline_accuracy(majority: dict[str, str], references: Sequence[str], groups: Sequence[str]) -> dict[str, float]:
    """Accuracy per group and ``"overall"`` of answering every question with its group's majority answer:
    the floor a model must beat to show it looks at the image. A group with no majority answer scores 0."""
    check_batch(references=references, groups=groups)
    if OVERALL in groups:
        raise ValueError(f"{OVERALL!r} is reserved for the accuracy over every group")
    correct: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for reference, group in zip(references, groups, strict=True):
        guess = majority.get(group)
        hit = int(guess is not None and normalize_answer(guess) == normalize_answer(reference))
        for key in (OVERALL, group):
            correct[key] += hit
            total[key] += 1
    return {key: correct[key] / total[key] for key in total}
