"""A word-level tokenizer trained on a small closed-vocabulary corpus (the generated shapes-VQA text).

The tiny model needs no sub-word vocabulary: every word and punctuation mark of the questions, the
answers and the chat template is one token, so an answer is one or two tokens and a model that
learns the task is easy to read. The result is a plain transformers fast tokenizer directory that
``AutoTokenizer.from_pretrained`` loads, like any real checkpoint's tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from adaptive_mllm.backbones.templates import IMAGE_PLACEHOLDER, ChatTemplate, plain_chat

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
IMAGE_TOKEN = IMAGE_PLACEHOLDER
# Fixed order, so the ids are fixed too: <pad>=0, <unk>=1, <s>=2, </s>=3, <image>=4.
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN)

_SPECIAL_PATTERN = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS))


def train_word_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    template: ChatTemplate | None = None,
    min_frequency: int = 1,
) -> PreTrainedTokenizerFast:
    """Train a WordLevel tokenizer on ``texts`` and save it to ``out_dir`` (tokenizer.json + config).

    Args:
        texts: the corpus, ideally the rendered chat strings (``ChatTemplate.render``) of the data.
        out_dir: directory to write; ``AutoTokenizer.from_pretrained(out_dir)`` loads it.
        template: its role words and separators are always added to the vocabulary, whatever the
            corpus holds (default ``plain_chat()``, the template of the tiny model).
        min_frequency: words seen fewer times become ``<unk>``.

    Special tokens are stripped from the corpus before training: a special token that the trainer
    also counts as a word gets a second id in the WordLevel model, and transformers then resolves
    the token to that id instead of the special one (a silent, wrong eos / image id).
    """
    template = template if template is not None else plain_chat()
    specials = [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    # Split on whitespace, then isolate each punctuation character: "circle?" -> "circle", "?".
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    # Joins words with spaces; `cleanup` glues "?" / "." / "," back to the word before them.
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    trainer = trainers.WordLevelTrainer(special_tokens=specials, min_frequency=min_frequency, show_progress=False)
    role_words = template.render([("", "")])  # "USER: ASSISTANT: </s>": roles and separators
    corpus = (_SPECIAL_PATTERN.sub(" ", text) for text in [role_words, *texts])
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.add_special_tokens(specials)  # already ids 0-4; this marks them as added tokens
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # `tokenizer(text)` with add_special_tokens=True prepends <s>, as Llama's does; the chat template
    # itself always tokenises with add_special_tokens=False and adds <s> explicitly.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=[IMAGE_TOKEN],
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast
