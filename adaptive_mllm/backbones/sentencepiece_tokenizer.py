"""SentencePiece behaviour that transformers 5's fast Llama tokenizer does not reproduce.

LLaVA-1.5 and the AdaLLaVA release tokenise with the slow, SentencePiece-backed ``LlamaTokenizer``
(``use_fast=False``). transformers 5 has no slow tokenizer: it converts a ``tokenizer.model`` into a
tokenizers BPE, and two things then differ from SentencePiece (found by tokenising 3,000 generated
conversations both ways, docs/architecture.md "Tokenizer"):

- Merge priority. SentencePiece's BPE joins, step by step, the adjacent pair whose joined piece has the
  highest score. transformers 5 orders the merges by piece id instead, so Llama-style vocabularies, which
  score their whitespace-run pieces ("▁▁", "▁▁▁▁", ...) lowest but give them low ids, join spaces first:
  "ASSISTANT:  two" became "▁▁ two" where SentencePiece gives "▁ ▁two". ``order_merges_by_score``
  restores SentencePiece's order (transformers 4's converter did the same).
- The word-start mark of a text that starts with a space. SentencePiece adds its dummy "▁" to every text;
  tokenizers' Metaspace skips it when the text already starts with a space, one token fewer.
  ``adds_no_word_start_before_space`` tells the chat template to make up for it.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def merges_by_score(model_file: str | Path) -> list[tuple[str, str]]:
    """Every (left, right) split of every normal piece into two pieces of the vocabulary, the joined piece's
    score first (highest first), then its id: SentencePiece's order of joining."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    size = processor.get_piece_size()
    ids = {processor.id_to_piece(index): index for index in range(size)}
    ranked = []
    for index in range(size):
        if processor.is_control(index) or processor.is_unknown(index) or processor.is_byte(index) or processor.is_unused(index):
            continue
        piece, score = processor.id_to_piece(index), processor.get_score(index)
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-score, index, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def order_merges_by_score(tokenizer: PreTrainedTokenizerBase, model_file: str | Path) -> PreTrainedTokenizerBase:
    """``tokenizer`` (converted from ``model_file``, a SentencePiece BPE model) with SentencePiece's merge
    order; a tokenizer that is not a tokenizers BPE is returned unchanged."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer
    state = json.loads(backend.to_str())
    if state["model"].get("type") != "BPE":
        return tokenizer
    merges = merges_by_score(model_file)
    vocab = state["model"]["vocab"]
    if any(piece not in vocab for pair in merges for piece in pair):  # not this model's vocabulary: leave it
        return tokenizer
    state["model"]["merges"] = [list(pair) for pair in merges]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))  # transformers' fast tokenizers keep it here
    return tokenizer


_WORD_START_SKIPPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> answer (asked per text piece)


def adds_no_word_start_before_space(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``tokenizer`` marks word starts with a Metaspace pre-tokenizer that prepends "▁" to a text
    (SentencePiece's dummy prefix) but skips it when the text starts with a space."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        cached = _WORD_START_SKIPPED.get(tokenizer)
    except TypeError:  # not weakly referable: asked each time
        return _metaspace_prepends(backend)
    if cached is None or cached[0] is not backend:  # a replaced backend (order_merges_by_score) is asked again
        cached = _WORD_START_SKIPPED[tokenizer] = (backend, _metaspace_prepends(backend))
    return cached[1]


def _metaspace_prepends(backend: Tokenizer | None) -> bool:
    if backend is None or backend.pre_tokenizer is None:
        return False
    state = json.loads(backend.pre_tokenizer.__getstate__())
    steps = state.get("pretokenizers", [state]) if state.get("type") == "Sequence" else [state]
    return any(step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never" for step in steps)
