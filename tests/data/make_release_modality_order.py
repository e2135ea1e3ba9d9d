"""Writes ``release_modality_order.json``: the training orders LLaVA's own ``group_by_modality_length`` code
gives for a few cases, the fixture that ``test_modality_grouping.py`` holds ours to.

Not part of the test run (it reads a LLaVA checkout, which CI does not have); torch is all it needs:

    python tests/data/make_release_modality_order.py --llava <checkout of haotian-liu/LLaVA>

``split_to_even_chunks``, ``get_length_grouped_indices`` and ``get_modality_length_grouped_indices`` are read
from ``llava/train/llava_trainer.py`` and run as they are (the module itself imports the whole HF Trainer);
nothing of them is copied here. Each case seeds torch's global generator first: LLaVA's sampler draws from it.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
from pathlib import Path

import torch

OUT = Path(__file__).with_name("release_modality_order.json")
NAMES = ("split_to_even_chunks", "get_length_grouped_indices", "get_modality_length_grouped_indices")


def cases() -> list[dict]:
    rng = random.Random(0)
    out = []
    for number, (count, image_share, micro_batch, chunks) in enumerate(
        [(40, 0.7, 2, 4), (37, 0.8, 2, 4), (64, 1.0, 4, 2), (23, 0.0, 3, 2), (101, 0.5, 4, 8), (9, 0.5, 16, 1), (50, 0.9, 1, 1)]
    ):
        lengths = [rng.randint(1, 300) * (1 if rng.random() < image_share else -1) for _ in range(count)]
        out.append({"seed": number, "lengths": lengths, "micro_batch": micro_batch, "chunks": chunks})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llava", type=Path, required=True)
    args = parser.parse_args()
    source = (args.llava / "llava" / "train" / "llava_trainer.py").read_text()
    namespace = {"torch": torch}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name in NAMES:
            exec(compile(ast.Module([node], []), "llava_trainer.py", "exec"), namespace)
    results = []
    for case in cases():
        torch.manual_seed(case["seed"])
        order = namespace["get_modality_length_grouped_indices"](case["lengths"], case["micro_batch"], case["chunks"])
        results.append({**case, "order": [int(index) for index in order]})
    OUT.write_text(json.dumps({"made_by": "tests/data/make_release_modality_order.py", "torch": torch.__version__, "cases": results}) + "\n")
    print(f"{OUT}: {len(results)} cases")


if __name__ == "__main__":
    main()
