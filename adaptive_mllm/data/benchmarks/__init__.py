"""Benchmark datamodules: each reads one benchmark's published files (local paths only) into the LLaVA
record format and gives the benchmark's metric with ``make_metric(stage)``. See docs/benchmarks.md."""

from adaptive_mllm.data.benchmarks.base import (
    OPTION_LETTER,
    SHORT_ANSWER,
    BenchmarkCollator,
    BenchmarkDataModule,
    BenchmarkDataset,
    BenchmarkQuestion,
)
from adaptive_mllm.data.benchmarks.gqa import GQADataModule
from adaptive_mllm.data.benchmarks.mmbench import MMBenchDataModule
from adaptive_mllm.data.benchmarks.mme import MMEDataModule
from adaptive_mllm.data.benchmarks.pope import POPEDataModule
from adaptive_mllm.data.benchmarks.scienceqa import ScienceQADataModule
from adaptive_mllm.data.benchmarks.submission import write_mmbench_submission, write_vqav2_submission
from adaptive_mllm.data.benchmarks.textvqa import TextVQADataModule
from adaptive_mllm.data.benchmarks.vqav2 import VQAv2DataModule

__all__ = [
    "OPTION_LETTER",
    "SHORT_ANSWER",
    "BenchmarkCollator",
    "BenchmarkDataModule",
    "BenchmarkDataset",
    "BenchmarkQuestion",
    "GQADataModule",
    "MMBenchDataModule",
    "MMEDataModule",
    "POPEDataModule",
    "ScienceQADataModule",
    "TextVQADataModule",
    "VQAv2DataModule",
    "write_mmbench_submission",
    "write_vqav2_submission",
]
