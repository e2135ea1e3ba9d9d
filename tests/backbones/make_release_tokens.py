"""Writes ``release_tokens.json``: the AdaLLaVA release's own token ids and labels for generated LLaVA
conversations, the fixture that ``test_release_tokens.py`` holds our encoding to.

Not part of the test run: it needs the reference stack, in a separate environment (the release pins
transformers 4.37.2 and the slow SentencePiece ``LlamaTokenizer``, which transformers 5 no longer has):

    python -m venv /tmp/tf4 && /tmp/tf4/bin/pip install transformers==4.37.2 tokenizers==0.15.1 \\
        sentencepiece==0.1.99 protobuf torch
    PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python /tmp/tf4/bin/python tests/backbones/make_release_tokens.py \\
        --llava <checkout of haotian-liu/LLaVA> --release-git <git dir of ChulanZhang/SmartVLM> \\
        --tokenizer-model <mistral_common/data/tokenizer.model.v1>

The release's functions (``preprocess_multimodal``, ``preprocess_v1`` from src/adallava/train/train.py at
the pinned commit, LLaVA's ``tokenizer_image_token`` and ``conv_vicuna_v1``) are run as they are, read
from those checkouts; nothing of them is copied here.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import hashlib
import io
import json
import random
import subprocess
import sys
import tempfile
import types
from pathlib import Path

RELEASE_COMMIT = "8ea416e7f841210b73382c29ae1005580c7a652e"  # ChulanZhang/SmartVLM "update bibtext" (the AdaLLaVA release)
OUT = Path(__file__).with_name("release_tokens.json")

WORDS = (
    "the a cat dog man woman is are on in under red blue green sitting standing holding picture image what where "
    "why how many color colour street car bus sign table two three yes no left right top"
).split()
ODD = ["3.14", "1,000", "42%", "e.g.", "café", "naïve", "日本語", "🙂", "—", "“quoted”", "'single'", "(paren)",
       "C++", "x_y", "$5", "http://example.com", "foo.bar()", "<b>", "A:", "\t", "  ", "   ", "...", "'s", "n't", "\u00a0"]
HAND = [  # cases the generated text may miss: whitespace runs, code, an image-only question, text-only records
    [("<image>", "A red bus.")],
    [("<image>\nWrite the code.", "def f(x):\n    if x:\n        return  x\n\treturn None")],
    [("<image>\nWhat is it?", " A cat."), ("And now?  ", "Two  spaces,   three   and\n  a newline.")],
    [("Text only, no image.", "Fine."), ("Again:", "  leading spaces")],
    [("Is it red? <image>", "Yes"), ("Why?", "Because  it is.\n\n\nDone  ")],
]


def generated(rng: random.Random, count: int) -> list[list[tuple[str, str]]]:
    def phrase(length: int) -> str:
        tokens = [rng.choice(ODD) if rng.random() < 0.25 else rng.choice(WORDS) for _ in range(length)]
        text = rng.choice([" ", "\n", "\n\n", ", ", "  "]).join(tokens) if rng.random() < 0.3 else " ".join(tokens)
        return text + rng.choice(["", ".", "?", " ", "\n", "  "])

    conversations = []
    for _ in range(count):
        turns = []
        for number in range(rng.choice([1, 1, 2, 3])):
            question, answer = phrase(rng.randint(1, 10)), phrase(rng.randint(1, 16))
            if number == 0 and rng.random() < 0.8:
                question = rng.choice(["<image>\n" + question, question + "\n<image>", question + " <image>", " <image>\n" + question])
            if rng.random() < 0.1:
                answer = " " + answer
            turns.append((question, answer))
        conversations.append(turns)
    return conversations


def release_functions(release_git: Path) -> dict:
    source = subprocess.run(
        ["git", f"--git-dir={release_git}", "show", f"{RELEASE_COMMIT}:src/adallava/train/train.py"],
        capture_output=True, text=True, check=True,
    ).stdout
    import tokenizers
    import torch
    import transformers
    from llava import conversation as conversation_lib
    from llava.constants import (
        DEFAULT_IM_END_TOKEN,
        DEFAULT_IM_START_TOKEN,
        DEFAULT_IMAGE_TOKEN,
        IGNORE_INDEX,
    )
    from llava.mm_utils import tokenizer_image_token
    from packaging import version

    namespace = dict(
        torch=torch, transformers=transformers, copy=copy, conversation_lib=conversation_lib, Dict=dict, Sequence=list,
        DataArguments=object, tokenizer_image_token=tokenizer_image_token, IGNORE_INDEX=IGNORE_INDEX,
        DEFAULT_IMAGE_TOKEN=DEFAULT_IMAGE_TOKEN, DEFAULT_IM_START_TOKEN=DEFAULT_IM_START_TOKEN,
        DEFAULT_IM_END_TOKEN=DEFAULT_IM_END_TOKEN,
        IS_TOKENIZER_GREATER_THAN_0_14=version.parse(tokenizers.__version__) >= version.parse("0.14"),
    )
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name in ("preprocess_multimodal", "preprocess_v1"):
            exec(compile(ast.Module([node], []), f"release train.py@{RELEASE_COMMIT[:7]}", "exec"), namespace)
    conversation_lib.default_conversation = conversation_lib.conv_templates["v1"]  # the release's --version v1
    return namespace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llava", type=Path, required=True)
    parser.add_argument("--release-git", type=Path, required=True)
    parser.add_argument("--tokenizer-model", type=Path, required=True)
    parser.add_argument("--count", type=int, default=120)
    args = parser.parse_args()
    package = types.ModuleType("llava")  # LLaVA's modules without its __init__, which imports the whole model
    package.__path__ = [str(args.llava / "llava")]
    sys.modules["llava"] = package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import transformers

    from tests.backbones.spm_tokenizer import write_spm_tokenizer

    functions = release_functions(args.release_git)
    directory = write_spm_tokenizer(Path(tempfile.mkdtemp()), legacy=False, model_file=args.tokenizer_model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, model_max_length=100000, padding_side="right", use_fast=False)
    tokenizer.pad_token = tokenizer.unk_token  # the release, for --version v1
    data_args = types.SimpleNamespace(is_multimodal=True, mm_use_im_start_end=False)
    records = []
    for number, turns in enumerate([*HAND, *generated(random.Random(0), args.count)]):
        if any("ASSISTANT" in text or "USER" in text for turn in turns for text in turn):
            continue  # role words inside the text: the release's mask splits there (docs/architecture.md)
        has_image = "<image>" in turns[0][0]
        conversations = [{"from": role, "value": text} for turn in turns for role, text in zip(("human", "gpt"), turn, strict=True)]
        sources = copy.deepcopy([conversations])
        if has_image:
            sources = functions["preprocess_multimodal"](sources, data_args)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            encoded = functions["preprocess_v1"](sources, tokenizer, has_image=has_image)
        if "mismatch" in printed.getvalue():
            raise SystemExit(f"conversation {number}: the release reports a tokenization mismatch: {printed.getvalue()}")
        ids, labels = encoded["input_ids"][0].tolist(), encoded["labels"][0].tolist()
        spans, start = [], None
        for position, label in enumerate([*labels, -100]):
            if label != -100 and start is None:
                start = position
            elif label == -100 and start is not None:
                spans.append([start, position])
                start = None
        assert all(labels[p] == ids[p] for a, b in spans for p in range(a, b))
        record = {"id": f"c{number}", "conversations": conversations, "input_ids": ids, "label_spans": spans}
        if has_image:
            record["image"] = "image.png"
        records.append(record)
    fixture = {
        "made_by": "tests/backbones/make_release_tokens.py",
        "release_commit": RELEASE_COMMIT,
        "transformers": transformers.__version__,
        "tokenizer_model_sha256": hashlib.sha256(args.tokenizer_model.read_bytes()).hexdigest(),
        "tokenizer_legacy": False,
        "image_sentinel": -200,
        "records": records,
    }
    OUT.write_text(json.dumps(fixture, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"{OUT}: {len(records)} conversations")


if __name__ == "__main__":
    main()
