"""A real Llama-family SentencePiece tokenizer, offline: the 32,000-token ``tokenizer.model`` that the
``mistral-common`` package ships (``mistral_common/data/tokenizer.model.v1``, Llama's SentencePiece BPE
settings, not Llama's own vocabulary), written as a ``tokenizer.model``-only directory with the
``tokenizer_config.json`` keys of ``lmsys/vicuna-7b-v1.5`` (written out by hand)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path


def spm_model_file() -> Path:
    spec = importlib.util.find_spec("mistral_common")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the tests need the `mistral-common` package (a dev dependency) for its tokenizer.model")
    return Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"


def write_spm_tokenizer(directory: Path, legacy: bool = False, model_file: Path | None = None) -> Path:
    """``tokenizer.model`` + ``tokenizer_config.json``; ``legacy`` as Vicuna-1.5 sets it (False) or older Llamas.
    ``model_file`` defaults to mistral-common's."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_file or spm_model_file(), directory / "tokenizer.model")
    config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "legacy": legacy, "clean_up_tokenization_spaces": False, "model_max_length": 4096,
        "padding_side": "right", "tokenizer_class": "LlamaTokenizer",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory
