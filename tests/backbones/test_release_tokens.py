"""Our token ids and labels are the AdaLLaVA release's, with a real SentencePiece tokenizer.

``release_tokens.json`` was written by the release's own preprocessing under transformers 4.37.2 with
the slow SentencePiece tokenizer it trains with (``make_release_tokens.py`` says how); here the same
conversations go through our record parsing, our tokenizer loading (a release directory holding only
``tokenizer.model``) and our chat template. The SentencePiece library itself is the second reference for
the tokenizer alone."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import sentencepiece
from transformers import AutoTokenizer

from adaptive_mllm.backbones import LlavaBackbone
from adaptive_mllm.backbones.sentencepiece_tokenizer import (
    adds_no_word_start_before_space,
    order_merges_by_score,
)
from adaptive_mllm.backbones.templates import llava_plain, vicuna_v1
from adaptive_mllm.data.llava_json import parse_record
from adaptive_mllm.data.tokenizer import train_word_tokenizer
from tests.backbones.reference_preprocessing import expected_ids_and_labels
from tests.backbones.release_layout import VISION, release_config
from tests.backbones.spm_tokenizer import spm_model_file, write_spm_tokenizer

FIXTURE = json.loads(Path(__file__).with_name("release_tokens.json").read_text())


@pytest.fixture(scope="module", params=["llava", "llava_llama"])
def release_tokenizer(request, tmp_path_factory):
    """The tokenizer as LlavaBackbone reads it from a release directory (tokenizer.model, no tokenizer.json).
    transformers 5 builds it two ways: a generic backend for model_type "llava" (liuhaotian/llava-v1.5-7b), its
    LlamaTokenizer for "llava_llama" (LLaVA's code since 2024, the AdaLLaVA release), which lost the merge order."""
    release = write_spm_tokenizer(tmp_path_factory.mktemp("release"), legacy=FIXTURE["tokenizer_legacy"])
    (release / "config.json").write_text(json.dumps({**release_config(32000), "model_type": request.param}))
    tower = tmp_path_factory.mktemp("tower")
    (tower / "config.json").write_text(json.dumps({"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", **VISION}))
    backbone = LlavaBackbone(checkpoint=str(release), vision_tower=str(tower))
    return backbone.tokenizer, backbone.image_token_id


def test_the_fixture_was_made_with_this_tokenizer_model():
    digest = hashlib.sha256(spm_model_file().read_bytes()).hexdigest()
    assert digest == FIXTURE["tokenizer_model_sha256"], (
        "mistral-common's tokenizer.model.v1 changed: re-run tests/backbones/make_release_tokens.py"
    )


@pytest.mark.parametrize("record", FIXTURE["records"], ids=lambda record: record["id"])
def test_ids_and_labels_equal_the_releases(record, release_tokenizer, tmp_path):
    tokenizer, image_id = release_tokenizer
    (tmp_path / "image.png").write_bytes(b"")  # parse_record checks the file exists, nothing more
    parsed = parse_record(record, 0, "release_tokens.json", tmp_path)
    encoded = vicuna_v1().encode(list(zip(parsed.questions, parsed.answers, strict=True)), tokenizer, image_id, 1)

    expected_ids, expected_labels = expected_ids_and_labels(record, image_id, FIXTURE["image_sentinel"])
    assert tokenizer.convert_ids_to_tokens(encoded.input_ids) == tokenizer.convert_ids_to_tokens(expected_ids)
    assert encoded.labels == expected_labels


@pytest.mark.parametrize("record", FIXTURE["plain_records"], ids=lambda record: record["id"])
def test_stage_one_ids_and_labels_equal_the_releases(record, release_tokenizer, tmp_path):
    """LLaVA's stage-1 template (``--version plain``) against the release's own ``preprocess_plain``: the question
    replaced by the image, the caption and its ``\n`` the only labels."""
    tokenizer, image_id = release_tokenizer
    (tmp_path / "image.png").write_bytes(b"")
    parsed = parse_record(record, 0, "release_tokens.json", tmp_path)
    encoded = llava_plain().encode(list(zip(parsed.questions, parsed.answers, strict=True)), tokenizer, image_id, 1)

    expected_ids, expected_labels = expected_ids_and_labels(record, image_id, FIXTURE["image_sentinel"])
    assert tokenizer.convert_ids_to_tokens(encoded.input_ids) == tokenizer.convert_ids_to_tokens(expected_ids)
    assert encoded.labels == expected_labels
    assert encoded.prompt_length == 2  # BOS and the image: what preprocess_plain leaves unlabelled


def test_the_fixture_holds_the_cases_that_differed():
    """Whitespace runs, a space opening a piece after the image: what transformers 5 alone tokenised differently."""
    texts = [turn["value"] for record in FIXTURE["records"] for turn in record["conversations"]]
    assert sum("  " in text for text in texts) >= 20
    assert any(turn["value"] == "<image>" for record in FIXTURE["records"] for turn in record["conversations"][:1])


def _adversarial_strings(count: int) -> list[str]:
    rng = random.Random(0)
    atoms = [" ", "  ", "   ", "    ", "\t", "\n", "a", "the", "two", "x", "ASSISTANT", ":", "日本", "🙂", "1234", "é",
             ".", "def", "return", "\u00a0"]
    return ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 12))) for _ in range(count)]


def test_merges_follow_sentencepiece_scores(tmp_path):
    """Against the SentencePiece library: transformers 5 alone joins whitespace runs first ("▁▁ two")."""
    processor = sentencepiece.SentencePieceProcessor(model_file=str(spm_model_file()))
    directory = write_spm_tokenizer(tmp_path / "spm")
    converted = AutoTokenizer.from_pretrained(directory)
    ordered = order_merges_by_score(AutoTokenizer.from_pretrained(directory), directory / "tokenizer.model")
    texts = [text for text in _adversarial_strings(3000) if not text.startswith(" ")]
    assert all(ordered(text, add_special_tokens=False)["input_ids"] == processor.encode(text) for text in texts)
    assert ordered.tokenize("ASSISTANT:  two") == processor.encode("ASSISTANT:  two", out_type=str)
    assert processor.encode("ASSISTANT:  two", out_type=str)[-2:] == ["▁", "▁two"]
    # what the fix is for: without it, a share of these strings tokenise differently
    assert sum(converted(text, add_special_tokens=False)["input_ids"] != processor.encode(text) for text in texts) > 100


def test_a_leading_space_gets_sentencepieces_word_start(release_tokenizer):
    """SentencePiece prefixes "▁" to every text, also to one that starts with a space; Metaspace does not, so the
    template doubles that space: the piece after an image-only question tokenises as SentencePiece's."""
    tokenizer, image_id = release_tokenizer
    processor = sentencepiece.SentencePieceProcessor(model_file=str(spm_model_file()))
    assert adds_no_word_start_before_space(tokenizer)
    ids = vicuna_v1().tokenize("<image> ASSISTANT: A", tokenizer, image_id, 1)
    assert ids == [tokenizer.bos_token_id, image_id, *processor.encode(" ASSISTANT: A")]
    assert processor.encode(" ASSISTANT: A", out_type=str)[:2] == ["▁", "▁ASS"]


def test_the_tiny_word_level_tokenizer_is_left_alone(tmp_path):
    """No Metaspace: its spaces only separate words, and the template's leading spaces stay single."""
    tokenizer = train_word_tokenizer(["a b c"], tmp_path / "words")
    assert not adds_no_word_start_before_space(tokenizer)
    assert order_merges_by_score(tokenizer, spm_model_file()) is tokenizer  # a WordLevel model has no merges
