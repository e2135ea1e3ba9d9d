"""train_word_tokenizer: what transformers loads back is the vocabulary we trained, special ids included."""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from adaptive_mllm.backbones.templates import plain_chat
from adaptive_mllm.data.tokenizer import SPECIAL_TOKENS, train_word_tokenizer

TEMPLATE = plain_chat()
CORPUS = [
    TEMPLATE.render([("<image>\nWhat colour is the circle?", "red")]),
    TEMPLATE.render([("<image>\nHow many shapes are there?", "three"), ("Is the red circle left of the blue square?", "no")]),
]


def test_reload_keeps_vocabulary_and_special_ids(tmp_path):
    trained = train_word_tokenizer(CORPUS, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, PreTrainedTokenizerFast) and loaded.is_fast
    assert loaded.get_vocab() == trained.get_vocab()
    assert len(loaded) == len(trained.get_vocab()) == max(loaded.get_vocab().values()) + 1  # ids are 0..V-1
    assert (loaded.pad_token, loaded.unk_token, loaded.bos_token, loaded.eos_token) == ("<pad>", "<unk>", "<s>", "</s>")
    assert (loaded.pad_token_id, loaded.unk_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2, 3)
    assert loaded.convert_tokens_to_ids("<image>") == 4
    assert set(SPECIAL_TOKENS) <= set(loaded.all_special_tokens)
    for word in ["USER", "ASSISTANT", ":", "colour", "circle", "?", "three", "no"]:
        assert loaded.convert_tokens_to_ids(word) not in (None, loaded.unk_token_id), word


def test_special_tokens_in_the_corpus_get_no_second_id(tmp_path):
    """The trap: a special token the trainer also counts as a word ends up with two ids."""
    train_word_tokenizer(CORPUS, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer("<image> red</s>", add_special_tokens=False)["input_ids"]
    assert ids == [4, tokenizer.convert_tokens_to_ids("red"), 3]
    assert tokenizer("</s>", add_special_tokens=False)["input_ids"] == [tokenizer.eos_token_id]
    vocab = tokenizer.get_vocab()
    for fragment in ["<", ">", "/", "s", "image"]:  # pieces of the special tokens must not be words
        assert fragment not in vocab, fragment
    assert sorted(vocab.values()) == list(range(len(vocab)))


def test_role_words_are_in_the_vocabulary_whatever_the_corpus(tmp_path):
    train_word_tokenizer(["what colour is it ?", "red"], tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    for word in ["USER", "ASSISTANT", ":"]:
        assert tokenizer.convert_tokens_to_ids(word) != tokenizer.unk_token_id, word


def test_round_trip_and_unknown_words(tmp_path):
    train_word_tokenizer(CORPUS, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    question = "Is the red circle left of the blue square?"
    ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["Is", "the", "red", "circle", "left", "of", "the", "blue", "square", "?"]
    assert tokenizer.decode(ids) == question
    for answer in ["red", "three", "no"]:
        answer_ids = tokenizer(f" {answer}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert tokenizer.decode(answer_ids, skip_special_tokens=True).strip() == answer
    assert tokenizer("zebra", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id]
    assert tokenizer("red")["input_ids"] == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("red")]


def test_training_is_deterministic(tmp_path):
    train_word_tokenizer(CORPUS, tmp_path / "a")
    train_word_tokenizer(CORPUS, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
