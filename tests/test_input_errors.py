"""Input mistakes named where the input is first read, with the file and what it should be: here, a benchmark's JSON
file given as JSON Lines (LLaVA-1.5's own evaluation .jsonl, or POPE's files)."""

from __future__ import annotations

import json

import pytest

from adaptive_mllm.data import DataError
from adaptive_mllm.data.benchmarks import GQADataModule, ScienceQADataModule
from adaptive_mllm.data.benchmarks.base import read_json

BENCHMARK_JSON_LINES = (
    r"one JSON object per line \(JSON Lines\), not a JSON file: the benchmark's loader reads the benchmark's official JSON "
    r"file, one JSON document \(docs/benchmarks\.md lists each benchmark's files\)"
)


def test_json_lines_given_for_a_benchmarks_json_file_say_so(tmp_path):
    """json's ``Extra data: line 2 column 1 (char 143)`` named neither JSON Lines nor which file the loader reads."""
    llava = tmp_path / "llava_gqa_testdev_balanced.jsonl"  # LLaVA-1.5's GQA prompts, given for GQA's questions
    llava.write_text("".join(
        json.dumps({"question_id": str(100 + i), "image": f"img{i}.jpg", "text": "What colour?", "category": "default"}) + "\n"
        for i in range(3)
    ))  # fmt: skip
    with pytest.raises(DataError, match=rf"^{llava}: {BENCHMARK_JSON_LINES}; LLaVA-1\.5's evaluation \.jsonl files hold its prompts"):
        GQADataModule(str(llava)).setup("test")
    pope = tmp_path / "coco_pope_random.json"  # POPE's questions (JSON Lines) given for ScienceQA's problems
    pope.write_text('{"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"}\n' * 2)
    (tmp_path / "pid_splits.json").write_text('{"test": ["1"]}')
    with pytest.raises(DataError, match=rf"^{pope}: {BENCHMARK_JSON_LINES}"):
        ScienceQADataModule(str(pope)).setup("test")


@pytest.mark.parametrize(("text", "says"), [("[1, 2", "Expecting ','"), ('{"a": 1} {"b": 2}', "Extra data: line 1 column 10")])
def test_other_broken_json_keeps_jsons_own_message(text, says, tmp_path):
    """Only a first value that fills line 1 with more on the next is taken for JSON Lines."""
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"^{path}: cannot read the JSON file: {says}"):
        read_json(path)


def test_a_benchmark_given_to_fit_names_the_stage_by_its_name(tmp_path):
    """``fit --data recipes/benchmarks/pope.yaml`` said ``not <TrainerFn.FITTING: 'fit'>``."""
    from lightning.pytorch.trainer.states import TrainerFn

    with pytest.raises(ValueError, match=r"^GQADataModule is an evaluation benchmark: stages test / validate / predict, not 'fit'$"):
        GQADataModule(str(tmp_path / "questions.json")).setup(TrainerFn.FITTING)
