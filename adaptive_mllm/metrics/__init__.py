"""Answer metrics as torchmetrics Metrics, one file per rule: their states are integer counts that sum (or
concatenate) across processes, so DDP gives every rank the same score.

:class:`GroupedExactMatch` (``exact_match.py``), the metric of LLaVA-JSON data, compares answers after the
normalisation of the official VQA evaluation script (``answers.py``, GT-Vision-Lab/VQA's vqaEval.py), so
that "Yes." and "yes", or "two" and "2", count as the same answer. The benchmark metrics (``vqa.py``,
``gqa.py``, ``multiple_choice.py``, ``pope.py``, ``mme.py``) read and compare answers exactly as each
benchmark's official pipeline does (LLaVA-1.5's conversion scripts, then the benchmark's own scorer), so that
their numbers are comparable with published tables: docs/benchmarks.md names the script each one matches.

Every benchmark metric has the interface of the benchmark datamodules (adaptive_mllm.data.benchmarks):
``update(predictions, batch)`` with the generated answers and the collated batch (each metric reads the
per-record fields it needs from it), and ``compute() -> dict[str, Tensor]`` with the headline score under
``"overall"`` beside its parts; a metric that scores each answer alone also has
``question_scores(predictions, batch)`` (the ``score`` of the test's answers file: a fraction in [0, 1], which
`adaptive-mllm compare` reads and refuses otherwise). Where examples must be
regrouped (MME's image pairs, MMBench's circular shifts) the states are integer lists concatenated over
processes.
"""

from adaptive_mllm.metrics.answers import evalai_answer, normalize_answer
from adaptive_mllm.metrics.base import (
    DEFAULT_GROUP,
    OVERALL,
    REPORT_COLUMNS,
    RESERVED_GROUPS,
    UNPARSABLE,
    CountMetric,
)
from adaptive_mllm.metrics.exact_match import GroupedExactMatch
from adaptive_mllm.metrics.gqa import GQAAccuracy, gqa_prediction
from adaptive_mllm.metrics.majority import majority_answers, majority_baseline_accuracy
from adaptive_mllm.metrics.mme import MME_COGNITION, MME_PERCEPTION, MME_SUBTASKS, MMEScore, mme_answer
from adaptive_mllm.metrics.multiple_choice import (
    CHOICE_RULES,
    OPTION_LETTERS,
    SCIENCEQA_OPTIONS,
    MultipleChoiceAccuracy,
    mmbench_choice,
    scienceqa_letter,
)
from adaptive_mllm.metrics.pope import POPE_SPLITS, POPEMetrics, pope_answer
from adaptive_mllm.metrics.vqa import VQA_RULES, VQA_SCALE, VQAAccuracy, vqa_accuracy

__all__ = [
    "CHOICE_RULES",
    "DEFAULT_GROUP",
    "MME_COGNITION",
    "MME_PERCEPTION",
    "MME_SUBTASKS",
    "OPTION_LETTERS",
    "OVERALL",
    "POPE_SPLITS",
    "REPORT_COLUMNS",
    "RESERVED_GROUPS",
    "SCIENCEQA_OPTIONS",
    "UNPARSABLE",
    "VQA_RULES",
    "VQA_SCALE",
    "CountMetric",
    "GQAAccuracy",
    "GroupedExactMatch",
    "MMEScore",
    "MultipleChoiceAccuracy",
    "POPEMetrics",
    "VQAAccuracy",
    "evalai_answer",
    "gqa_prediction",
    "majority_answers",
    "majority_baseline_accuracy",
    "mme_answer",
    "mmbench_choice",
    "normalize_answer",
    "pope_answer",
    "scienceqa_letter",
    "vqa_accuracy",
]
