"""Writes ``release_tokens.json``: the AdaLLaVA release's own token ids and labels for generated LLaVA
conversations, the fixture that ``test_release_tokens.py`` holds our encoding to.

Not part of the test run: it needs the reference stack, in a separate environment (the release pins
transformers 4.37.2 and the slow SentencePiece ``LlamaTokenizer``, which transformers 5 no longer has):

    python -m venv /tmp/tf4 && /tmp/tf4/bin/pip install transformers==4.37.2 tokenizers==0.15.1 \\
        sentencepiece==0.1.99 protobuf torch
    PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python /tmp/tf4/bin/python tests/backbones/make_release_tokens.py \\
        --llava <checkout of haotian-liu/LLaVA> --release-git <git dir of ChulanZhang/SmartVLM> \\
        --tokenizer-model <mistral_common/data/tokenizer.model.v1>

The release's functions (``preprocess_multimodal``, ``preprocess_v1`` and, for LLaVA's stage-1 template
``--version plain``, ``preprocess_plain`` from src/adallava/train/train.py at the pinned commit, LLaVA's ``tokenizer_image_token`` and ``conv_vicuna_v1``) are run as they are, read
from those checkouts (``reference_preprocessing.py`` runs them); nothing of them is copied here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.backbones.reference_preprocessing import (  # noqa: E402 - after the repository is on the path
    IMAGE_SENTINEL,
    conversations,
    load_reference_package,
    reference_functions,
    run_reference,
)

RELEASE_COMMIT = "8ea416e7f841210b73382c29ae1005580c7a652e"  # ChulanZhang/SmartVLM "update bibtext" (the AdaLLaVA release)
OUT = Path(__file__).with_name("release_tokens.json")


def release_functions(release_git: Path) -> dict:
    source = subprocess.run(
        ["git", f"--git-dir={release_git}", "show", f"{RELEASE_COMMIT}:src/adallava/train/train.py"],
        capture_output=True, text=True, check=True,
    ).stdout
    import tokenizers
    from packaging import version

    functions = reference_functions(
        "llava", source, ("preprocess_multimodal", "preprocess_v1", "preprocess_plain"), f"release train.py@{RELEASE_COMMIT[:7]}",
        IS_TOKENIZER_GREATER_THAN_0_14=version.parse(tokenizers.__version__) >= version.parse("0.14"),
    )
    functions["conversation_lib"].default_conversation = functions["conversation_lib"].conv_templates["v1"]  # --version v1
    return functions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llava", type=Path, required=True)
    parser.add_argument("--release-git", type=Path, required=True)
    parser.add_argument("--tokenizer-model", type=Path, required=True)
    parser.add_argument("--count", type=int, default=120)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    load_reference_package("llava", args.llava)
    import transformers

    from tests.backbones.spm_tokenizer import write_spm_tokenizer

    functions = release_functions(args.release_git)
    directory = write_spm_tokenizer(Path(tempfile.mkdtemp()), legacy=False, model_file=args.tokenizer_model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, model_max_length=100000, padding_side="right", use_fast=False)
    tokenizer.pad_token = tokenizer.unk_token  # the release, for --version v1
    every = conversations(args.count)
    records = [run_reference(functions, "preprocess_v1", tokenizer, number, turns) for number, turns in enumerate(every)]
    if mismatched := [record["id"] for record in records if record.get("reference_mismatch")]:
        raise SystemExit(f"the release reports a tokenization mismatch for {mismatched}")
    # --version plain (LLaVA's stage 1): one (human, gpt) turn with an image, as preprocess_plain asserts
    conversation_lib = functions["conversation_lib"]
    conversation_lib.default_conversation = conversation_lib.conv_templates["plain"]
    functions["preprocess_plain_run"] = lambda sources, tokenizer, has_image: functions["preprocess_plain"](sources, tokenizer)
    captions = [turns for turns in every if len(turns) == 1 and "<image>" in turns[0][0]]
    plain_records = [run_reference(functions, "preprocess_plain_run", tokenizer, number, turns) for number, turns in enumerate(captions)]
    fixture = {
        "made_by": "tests/backbones/make_release_tokens.py",
        "release_commit": RELEASE_COMMIT,
        "transformers": transformers.__version__,
        "tokenizer_model_sha256": hashlib.sha256(args.tokenizer_model.read_bytes()).hexdigest(),
        "tokenizer_legacy": False,
        "image_sentinel": IMAGE_SENTINEL,
        "records": records,
        "plain_records": plain_records,
    }
    args.out.write_text(json.dumps(fixture, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"{args.out}: {len(records)} conversations, {len(plain_records)} captions (--version plain)")


if __name__ == "__main__":
    main()
