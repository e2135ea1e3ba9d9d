"""Our Mipha token ids and labels are Mipha's own, with Phi-2's tokenizer.

``mipha_tokens.json`` was written by Mipha's preprocessing (``preprocess_multimodal`` + ``preprocess_v0``,
``conv_phi_v0``) under transformers 4.37.2 with the fast tokenizer it trains with
(``make_mipha_tokens.py`` says how); here the same conversations go through our record parsing, the
Mipha backbone's tokenizer loading (Phi-2's slow files, and the directory our backbone saves) and our
``phi_v0`` template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaptive_mllm.backbones import MiphaBackbone
from adaptive_mllm.data.llava_json import parse_record
from tests.backbones.mipha_layout import release_config
from tests.backbones.phi_tokenizer import WHITESPACE_TOKENS, write_phi2_tokenizer
from tests.backbones.reference_preprocessing import expected_ids_and_labels

FIXTURE = json.loads(Path(__file__).with_name("mipha_tokens.json").read_text())
PHI2_ROWS = 51200  # Phi-2's embedding rows, more than its 50,295 tokens


@pytest.fixture(scope="module", params=["phi-2 files", "saved by the backbone"])
def mipha_backbone(request, tmp_path_factory):
    directory = write_phi2_tokenizer(tmp_path_factory.mktemp("mipha"))
    (directory / "config.json").write_text(json.dumps(release_config(PHI2_ROWS, 2, 4)))
    backbone = MiphaBackbone(checkpoint=str(directory))
    if request.param == "saved by the backbone":
        saved = tmp_path_factory.mktemp("saved")
        backbone.tokenizer.save_pretrained(saved)  # what MiphaBackbone.save_pretrained writes beside the weights
        (saved / "config.json").write_text((directory / "config.json").read_text())
        backbone = MiphaBackbone(checkpoint=str(saved))
    return backbone


def test_the_tokenizer_is_phi_2s(tmp_path):
    """50,295 tokens, whitespace runs kept whole: what makes Phi-2's ids differ from GPT-2's."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(write_phi2_tokenizer(tmp_path))
    assert len(tokenizer) == 50295 == 50257 + len(WHITESPACE_TOKENS)
    assert tokenizer.tokenize("a  b\t\tc") == ["a", "  ", "b", "\t\t", "c"]


@pytest.mark.parametrize("record", FIXTURE["records"], ids=lambda record: record["id"])
def test_ids_and_labels_equal_miphas(record, mipha_backbone, tmp_path):
    tokenizer, image_id = mipha_backbone.tokenizer, mipha_backbone.image_token_id
    (tmp_path / "image.png").write_bytes(b"")  # parse_record checks the file exists, nothing more
    parsed = parse_record(record, 0, "mipha_tokens.json", tmp_path)
    encoded = mipha_backbone.chat_template.encode(list(zip(parsed.questions, parsed.answers, strict=True)),
                                                  tokenizer, image_id, 1)
    expected_ids, expected_labels = expected_ids_and_labels(record, image_id, FIXTURE["image_sentinel"])
    assert tokenizer.convert_ids_to_tokens(encoded.input_ids) == tokenizer.convert_ids_to_tokens(expected_ids)
    assert encoded.labels == expected_labels


def test_the_fixture_holds_whitespace_runs_and_multi_turn():
    texts = [turn["value"] for record in FIXTURE["records"] for turn in record["conversations"]]
    assert sum("  " in text or "\t" in text for text in texts) >= 20
    assert sum(len(record["conversations"]) > 2 for record in FIXTURE["records"]) >= 20
    assert not any(record.get("reference_mismatch") for record in FIXTURE["records"])


# Generated answers (ids of Phi-2's tokenizer, closed by <|endoftext|>) and Mipha's text for them: its eval scripts'
# batch_decode(skip_special_tokens=True) + strip under transformers 4.37.2, run on these ids with the tokenizer
# phi_tokenizer.py writes (Phi-2's tokenizer_config asks for clean_up_tokenization_spaces, which transformers 5 ignores
# for BPE tokenizers)
MIPHA_DECODED = [
    ([1026, 705, 82, 257, 3290, 837, 314, 892, 764, 50256], "It's a dog, I think."),
    ([2949, 837, 340, 318, 299, 470, 764, 50256], "No, it isn't."),
    ([5297, 764, 50256], "Yes."),
    ([40, 466, 299, 470, 760, 5145, 50256], "I don't know!"),
    ([2061, 5633, 4162, 5633, 50256], "What? Why?"),
    ([2990, 705, 260, 994, 837, 356, 705, 303, 1775, 705, 368, 764, 50256], "They're here, we've seen 'em."),
    ([734, 6844, 50256], "two dogs"),
]


def test_answers_read_as_mipha_decodes_them(mipha_backbone):
    from adaptive_mllm.module import decode_answer

    for ids, text in MIPHA_DECODED:
        assert decode_answer(mipha_backbone.tokenizer, ids) == text
