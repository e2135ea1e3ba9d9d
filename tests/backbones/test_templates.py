"""Chat templates: the rendered strings match LLaVA's conversation templates byte for byte, and the token
ids are exactly the rendered string's tokens (image placeholder expanded), with only answers as labels."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from adaptive_mllm.backbones.templates import (
    IGNORE_INDEX,
    ConversationError,
    llava_plain,
    llava_v1,
    plain_chat,
    vicuna_v1,
)
from tests.backbones.release_layout import write_release_tokenizer
from tests.backbones.spm_tokenizer import write_spm_tokenizer

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
    # the latency position: after the last ignored label, i.e. before the LAST answer (AdaLLaVA's release)
    last_answer = tokenizer(" an assistant", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert encoded.prompt_length == len(encoded.input_ids) - len(last_answer)
    assert encoded.labels[encoded.prompt_length - 1] == IGNORE_INDEX
    assert encoded.labels[encoded.prompt_length :] == last_answer


# --- LLaVA's rules with a real SentencePiece tokenizer -------------------------------------------------
# Restated here from LLaVA's llava/mm_utils.py (tokenizer_image_token) and llava/train/train.py
# (preprocess_v1), independently of the template's code: the expected ids and labels.
LLAVA_IMAGE_SENTINEL = -200  # LLaVA's IMAGE_TOKEN_INDEX: one id per image, expanded to the features later


def llava_image_tokens(prompt: str, tokenizer) -> list[int]:
    """tokenizer_image_token: each chunk between <image> tokenised with the tokenizer's own BOS; the BOS of
    the first chunk kept, those of the others dropped, one sentinel id per <image>."""
    chunks = [tokenizer(chunk)["input_ids"] for chunk in prompt.split("<image>")]
    has_bos = bool(chunks[0]) and chunks[0][0] == tokenizer.bos_token_id
    ids = chunks[0][:1] if has_bos else []
    for index, chunk in enumerate(chunks):
        if index > 0:
            ids.append(LLAVA_IMAGE_SENTINEL)
        ids += chunk[1:] if has_bos else chunk
    return ids


def llava_v1_targets(conversation: str, ids: list[int], tokenizer) -> list[int]:
    """preprocess_v1's mask: BOS ignored; per round (split at sep2 "</s>"), the instruction up to
    "ASSISTANT:" ignored (its length: tokens of "... ASSISTANT: " less BOS and the trailing word-start
    token), the round's tokens plus one (the split-off "</s>", counted by the BOS) advance the cursor;
    a non-legacy tokenizer counts one token fewer for rounds after the first; everything after ignored."""
    targets = list(ids)
    targets[0] = IGNORE_INDEX
    cursor = 1
    separator = " ASSISTANT: "
    for number, round_text in enumerate(conversation.split("</s>")):
        if not round_text:
            break
        instruction, _ = round_text.split(separator)
        round_length = len(llava_image_tokens(round_text, tokenizer))
        instruction_length = len(llava_image_tokens(instruction + separator, tokenizer)) - 2
        if number > 0 and not tokenizer.legacy:
            round_length -= 1
            instruction_length -= 1
        targets[cursor : cursor + instruction_length] = [IGNORE_INDEX] * instruction_length
        cursor += round_length
    targets[cursor:] = [IGNORE_INDEX] * (len(targets) - cursor)
    assert cursor == len(ids), "LLaVA would report a tokenization mismatch and mask the whole record"
    return targets


def expand_images(ids: list[int], targets: list[int], image_id: int, count: int) -> tuple[list[int], list[int]]:
    """LLaVA's prepare_inputs_labels_for_multimodal: the sentinel becomes ``count`` image positions, ignored."""
    out_ids, out_targets = [], []
    for token, target in zip(ids, targets, strict=True):
        if token == LLAVA_IMAGE_SENTINEL:
            out_ids += [image_id] * count
            out_targets += [IGNORE_INDEX] * count
        else:
            out_ids.append(token)
            out_targets.append(target)
    return out_ids, out_targets


SINGLE = [("<image>\nWhat is the man in the picture doing?", "He is ironing clothes on the back of a taxi.")]
MULTI = [
    ("<image>\nWhat colour is the cat?", "The cat is grey, with white paws."),
    ("Where is it sitting?", "On a red sofa."),
    ("Is it asleep?", "No."),
]


@pytest.fixture(scope="module", params=[False, True], ids=["vicuna-1.5-non-legacy", "legacy"])
def spm_tokenizer(request, tmp_path_factory):
    directory = write_spm_tokenizer(tmp_path_factory.mktemp("spm"), legacy=request.param)
    return AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("turns", [SINGLE, MULTI], ids=["single", "multi"])
@pytest.mark.parametrize("template", [vicuna_v1(), llava_v1()], ids=["vicuna_v1", "llava_v1"])
def test_ids_and_labels_are_llavas_with_a_sentencepiece_tokenizer(spm_tokenizer, template, turns):
    tokenizer = spm_tokenizer
    assert len(tokenizer) == 32000
    image_id, count = 31999, 3  # any id: what matters is where the image positions are
    rendered = template.render(turns)
    reference_ids = llava_image_tokens(rendered, tokenizer)
    expected_ids, expected_labels = expand_images(
        reference_ids, llava_v1_targets(rendered, reference_ids, tokenizer), image_id, count
    )
    encoded = template.encode(turns, tokenizer, image_id, num_image_tokens=count)
    assert encoded.input_ids == expected_ids
    assert encoded.labels == expected_labels
    # the generation prompt is tokenised by the same rule (LLaVA's eval: the open "ASSISTANT:" role)
    questions, answers = [q for q, _ in turns], [a for _, a in turns]
    prompt = template.encode_prompt(questions, answers[:-1], tokenizer, image_id, num_image_tokens=count)
    open_ids = llava_image_tokens(template.render([*turns[:-1], (questions[-1], None)]), tokenizer)
    assert prompt == expand_images(open_ids, open_ids, image_id, count)[0]


def test_the_answer_starts_with_its_word_start_token(spm_tokenizer):
    """By hand: "USER: Who? ASSISTANT: He is.</s>" tokenised whole is "▁US ER : ▁Who ? ▁ASS IST ANT : ▁He ▁is . </s>",
    and the labels are the answer with its word-start token, and the end of turn."""
    tokenizer = spm_tokenizer
    encoded = vicuna_v1().encode([("Who?", "He is.")], tokenizer, 31999, 1)
    tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids)
    assert tokens[0] == "<s>"
    assert tokens[-13:] == ["▁US", "ER", ":", "▁Who", "?", "▁ASS", "IST", "ANT", ":", "▁He", "▁is", ".", "</s>"]
    labelled = [token for token, label in zip(tokens, encoded.labels, strict=True) if label != IGNORE_INDEX]
    assert labelled == ["▁He", "▁is", ".", "</s>"]
    assert encoded.prompt_length == len(tokens) - 4


def test_a_tokenizer_that_merges_across_the_answer_boundary_is_a_clear_error():
    """A character BPE with the merge ": " puts "ASSISTANT:" and the answer's space in one token: the answer's
    first label would fall inside a token, so encoding stops instead of shifting the mask."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from adaptive_mllm.backbones.templates import ConversationError

    text = plain_chat().render([("Who?", "He.")]) + "<s>"
    vocab = {char: index for index, char in enumerate(sorted(set(text)))}
    vocab[": "] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(":", " ")]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    tokenizer.add_special_tokens({"eos_token": "</s>"})
    with pytest.raises(ConversationError, match=r"merges text across the end of .*ASSISTANT:'"):
        plain_chat().encode([("Who?", "He.")], tokenizer, 0, 1)


def test_llava_plain_strings_are_llavas_stage_one():
    """conv_llava_plain (SeparatorStyle.PLAIN, sep "\\n", no system, no roles): in training preprocess_plain keeps
    only the image of the question, then the caption and "\\n"; a prompt is the question and "\\n"."""
    template = llava_plain()
    assert template.render([("Describe the image concisely.\n<image>", "a red bus")]) == "<image>a red bus\n"
    assert template.render([("<image>\nWhat is it?", None)]) == "<image>\nWhat is it?\n"


def test_llava_plain_chat_template_gives_the_prompt():
    """The Jinja written beside an export renders the prompt as the template does (transformers' chat format)."""
    import jinja2

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    rendered = jinja2.Template(llava_plain().jinja()).render(messages=messages, add_generation_prompt=True)
    assert rendered == llava_plain().render([("<image>\nWhat is it?", None)])


def test_llava_plain_refuses_what_stage_one_cannot_hold(spm_tokenizer):
    template, tokenizer, image_id = llava_plain(), spm_tokenizer, 31999
    with pytest.raises(ConversationError, match="takes one \\(human, gpt\\) turn, the record has 2") as error:
        template.encode(TURNS, tokenizer, image_id, 4)
    assert error.value.field == "conversations"
    with pytest.raises(ConversationError, match="captions an image: the question holds no <image>") as error:
        template.encode([("What is it?", "a cat")], tokenizer, image_id, 4)
    assert error.value.field == "conversations[0].value"
    with pytest.raises(ConversationError, match="prompts with one question, no earlier turns"):
        template.encode_prompt(["<image>\nWhat?", "And?"], ["a cat"], tokenizer, image_id, 4)
    assert tokenizer.convert_ids_to_tokens(template.stop_token_ids(tokenizer)) == ["<0x0A>"]


def test_llava_plain_needs_a_tokenizer_that_keeps_newlines(tmp_path):
    tokenizer = write_release_tokenizer(tmp_path)  # word-level, split on whitespace: "\\n" is dropped
    with pytest.raises(ValueError, match="ends answers at a newline, which this tokenizer drops"):
        llava_plain().stop_token_ids(tokenizer)
