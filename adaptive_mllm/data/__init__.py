"""Data: LLaVA instruction JSON datamodule, the generated shapes-VQA set, word-level tokenizer training."""

from adaptive_mllm.data.benchmarks import (
    GQADataModule,
    MMBenchDataModule,
    MMEDataModule,
    POPEDataModule,
    ScienceQADataModule,
    TextVQADataModule,
    VQAv2DataModule,
)
from adaptive_mllm.data.llava_json import (
    DataError,
    DataWarning,
    LlavaCollator,
    LlavaDataModule,
    LlavaJsonDataset,
    LlavaRecord,
    majority_answers,
    majority_baseline,
)
from adaptive_mllm.data.shapes import generate_shapes_vqa
from adaptive_mllm.data.shapes_datamodule import ShapesVQADataModule
from adaptive_mllm.data.tokenizer import train_word_tokenizer

__all__ = [
    "GQADataModule",
    "MMBenchDataModule",
    "MMEDataModule",
    "POPEDataModule",
    "ScienceQADataModule",
    "TextVQADataModule",
    "VQAv2DataModule",
    "DataError",
    "DataWarning",
    "LlavaCollator",
    "LlavaDataModule",
    "LlavaJsonDataset",
    "LlavaRecord",
    "ShapesVQADataModule",
    "generate_shapes_vqa",
    "majority_answers",
    "majority_baseline",
    "train_word_tokenizer",
]
