"""Chat templates: the rendered strings match LLaVA's conversation templates byte for byte, and the token
ids are exactly the rendered string's tokens (image placeholder expanded), with only answers as labels."""

from __future__ import annotations

from adaptive_mllm.backbones.templates import IGNORE_INDEX, llava_v1, vicuna_v1
from tests.backbones.release_layout import write_release_tokenizer

# Written out by hand from LLaVA's conversation.py (SeparatorStyle.TWO, sep " ", sep2 "</s>").
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
TURNS = [("<image>\nWhat is in the picture?", "A cat on a sofa."), ("What colour is it?", "Grey.")]


def test_vicuna_v1_training_string():
    expected = (
        VICUNA_SYSTEM + " USER: <image>\nWhat is in the picture? ASSISTANT: A cat on a sofa.</s>"
        "USER: What colour is it? ASSISTANT: Grey.</s>"
    )
    assert vicuna_v1().render(TURNS) == expected


def test_vicuna_v1_generation_prompt_ends_with_the_open_role():
    expected = VICUNA_SYSTEM + " USER: <image>\nWhat is in the picture? ASSISTANT:"
    assert vicuna_v1().render([(TURNS[0][0], None)]) == expected


def test_llava_v1_is_the_curious_human_variant():
    expected = LLAVA_SYSTEM + " USER: <image>\nDescribe it. ASSISTANT: A cat.</s>"
    assert llava_v1().render([("<image>\nDescribe it.", "A cat.")]) == expected


def test_token_ids_are_the_rendered_string_and_labels_the_answers(tmp_path):
    tokenizer = write_release_tokenizer(tmp_path)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    turns = [("<image>\nHow many shapes ?", "a chat"), ("How many ?", "an assistant")]
    template = vicuna_v1()
    encoded = template.encode(turns, tokenizer, image_id, num_image_tokens=3)
    rendered = template.render(turns).replace("<image>", "<image> " * 3)
    assert encoded.input_ids == [tokenizer.bos_token_id] + tokenizer(rendered, add_special_tokens=False)["input_ids"]
    kept = [token for token, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(kept) == "a chat </s> an assistant </s>"
    assert encoded.labels[: encoded.prompt_length] == [IGNORE_INDEX] * encoded.prompt_length
    assert encoded.labels[encoded.prompt_length] != IGNORE_INDEX
