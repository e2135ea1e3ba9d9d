"""Chat templates: a conversation -> token ids and labels, by LLaVA's rules.

Ids: the rendered conversation is tokenised whole, split only at ``<image>`` (LLaVA's
``tokenizer_image_token``); tokenising role words, questions and answers apart would add a
SentencePiece word-start token before each piece that the reference never sees.
Labels: each answer and its end-of-turn token, nothing else (LLaVA's ``preprocess_v1`` mask). The
boundaries are found by tokenising the rendered text up to each one and checking that those ids are a
prefix of the whole conversation's ids, so a tokenizer that merges across a role boundary fails with a
clear error instead of silently shifting the mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from adaptive_mllm.backbones.sentencepiece_tokenizer import adds_no_word_start_before_space

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"


class ConversationError(ValueError):
    """A conversation that cannot be encoded; ``field`` names the offending part of the record."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside the answers
    # Tokens before the LAST answer's first token: where the latency token goes in training (AdaLLaVA's
    # release inserts it after the last ignored label).
    prompt_length: int


@dataclass(frozen=True)
class ChatTemplate:
    """A two-role template in the style of FastChat's ``SeparatorStyle.TWO`` (vicuna_v1).

    Rendered: ``{system}{sep}{user}: {q1}{sep}{assistant}: {a1}{sep2}{user}: {q2}{sep}{assistant}:``.
    """

    name: str = "vicuna_v1"
    system: str = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    user_role: str = "USER"
    assistant_role: str = "ASSISTANT"
    sep: str = " "
    sep2: str = "</s>"
    add_bos: bool = True

    # --- strings ---------------------------------------------------------------------------------
    def render(self, turns: list[tuple[str, str | None]]) -> str:
        """(question, answer) turns -> the prompt string; an answer of None ends with the open role."""
        text = self.system + self.sep if self.system else ""
        for question, answer in turns:
            text += f"{self.user_role}: {question}{self.sep}"
            if answer is None:
                text += f"{self.assistant_role}:"
            else:
                text += f"{self.assistant_role}: {answer}{self.sep2}"
        return text

    def jinja(self) -> str:
        """The same rendering as a transformers chat template (``apply_chat_template`` on HF messages: a
        user turn's images first, each as ``<image>\\n``, then its text), written beside exported models
        so that ``LlavaProcessor`` prompts as this template does; a leading system message replaces the
        system prompt."""
        literal = json.dumps  # a Jinja string literal with the same escapes
        return (
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
            f"{{%- else -%}}{{%- set system = {literal(self.system)} -%}}{{%- endif -%}}"
            f"{{%- if system -%}}{{{{ system + {literal(self.sep)} }}}}{{%- endif -%}}"
            "{%- for message in messages -%}"
            f"{{%- if message['role'] == 'user' -%}}{{{{ {literal(self.user_role + ': ')} }}}}"
            f"{{%- else -%}}{{{{ {literal(self.assistant_role + ': ')} }}}}{{%- endif -%}}"
            "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
            f"{{%- for part in message['content'] if part['type'] == 'image' -%}}{{{{ {literal(IMAGE_PLACEHOLDER + chr(10))} }}}}"
            "{%- endfor -%}"
            "{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}"
            "{%- endif -%}"
            f"{{%- if message['role'] == 'user' -%}}{{{{ {literal(self.sep)} }}}}{{%- else -%}}{{{{ {literal(self.sep2)} }}}}"
            "{%- endif -%}{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{ {literal(self.assistant_role + ':')} }}}}{{%- endif -%}}"
        )

    # --- token ids -------------------------------------------------------------------------------
    def encode(
        self,
        turns: list[tuple[str, str]],
        tokenizer: PreTrainedTokenizerBase,
        image_token_id: int,
        num_image_tokens: int,
    ) -> EncodedConversation:
        """Training encoding: every answer (and its end-of-turn token) is a label, nothing else."""
        if not turns:
            raise ConversationError("the conversation has no (human, gpt) turn", field="conversations")
        for index, (_, answer) in enumerate(turns):
            if not answer.strip():
                raise ConversationError(f"turn {index} has an empty answer", field=f"conversations[{2 * index + 1}].value")
        self._check_placeholders([question for question, _ in turns])
        image_args = (tokenizer, image_token_id, num_image_tokens)
        input_ids = self.tokenize(self.render(turns), *image_args)
        labels = [IGNORE_INDEX] * len(input_ids)
        prompt_length = 0
        for index, (question, _) in enumerate(turns):
            start = self._boundary(self.render([*turns[:index], (question, None)]), input_ids, *image_args)
            end = self._boundary(self.render(turns[: index + 1]), input_ids, *image_args)
            labels[start:end] = input_ids[start:end]
            prompt_length = start
        return EncodedConversation(input_ids, labels, prompt_length)

    def encode_prompt(
        self,
        questions: list[str],
        answers: list[str],
        tokenizer: PreTrainedTokenizerBase,
        image_token_id: int,
        num_image_tokens: int,
    ) -> list[int]:
        """Generation encoding: earlier turns with their answers, then the last question, then the open
        assistant role; ``len(answers) == len(questions) - 1``."""
        if len(answers) != len(questions) - 1:
            raise ConversationError("a prompt needs one answer fewer than questions", field="conversations")
        self._check_placeholders(questions)
        turns: list[tuple[str, str | None]] = [*zip(questions[:-1], answers, strict=True), (questions[-1], None)]
        return self.tokenize(self.render(turns), tokenizer, image_token_id, num_image_tokens)

    def tokenize(
        self, text: str, tokenizer: PreTrainedTokenizerBase, image_token_id: int, num_image_tokens: int
    ) -> list[int]:
        """LLaVA's ``tokenizer_image_token``: BOS, then the text between ``<image>`` placeholders tokenised
        piece by piece, each placeholder expanded to ``num_image_tokens`` image token ids."""
        ids = [tokenizer.bos_token_id] if self.add_bos and tokenizer.bos_token_id is not None else []
        # SentencePiece gives each piece its word-start mark even before a leading space (" ASSISTANT:" after an
        # image-only question: "▁ ▁ASS..."); tokenizers' Metaspace does not, so that space is doubled for it
        double_leading_space = adds_no_word_start_before_space(tokenizer)
        for index, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if index > 0:
                ids += [image_token_id] * num_image_tokens
            if piece.startswith(" ") and double_leading_space:
                piece = " " + piece
            if piece:
                ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

    def stop_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        if tokenizer.eos_token is not None and self.sep2 == tokenizer.eos_token:
            return [tokenizer.eos_token_id]
        return list(tokenizer(self.sep2, add_special_tokens=False)["input_ids"])[-1:]

    # --- pieces ----------------------------------------------------------------------------------
    def _boundary(
        self, prefix: str, input_ids: list[int], tokenizer: PreTrainedTokenizerBase, image_token_id: int,
        num_image_tokens: int,
    ) -> int:
        """The number of tokens of ``prefix`` (a rendered start of the conversation) within ``input_ids``."""
        prefix_ids = self.tokenize(prefix, tokenizer, image_token_id, num_image_tokens)
        if input_ids[: len(prefix_ids)] != prefix_ids:
            raise ConversationError(
                f"the tokenizer merges text across the end of {prefix[-40:]!r} (template {self.name!r}): the "
                "answer labels cannot be placed on whole tokens",
                field="conversations",
            )
        return len(prefix_ids)

    @staticmethod
    def _check_placeholders(questions: list[str]) -> None:
        for index, question in enumerate(questions):
            if IMAGE_PLACEHOLDER in question and index > 0:
                raise ConversationError(
                    f"{IMAGE_PLACEHOLDER} may only appear in the first human turn", field=f"conversations[{2 * index}].value"
                )
        if questions and questions[0].count(IMAGE_PLACEHOLDER) > 1:
            raise ConversationError(f"more than one {IMAGE_PLACEHOLDER} in a turn", field="conversations[0].value")


def vicuna_v1() -> ChatTemplate:
    """LLaVA's ``conv_vicuna_v1`` (``--version v1`` / ``--conv-mode vicuna_v1``): the template LLaVA-1.5 was
    fine-tuned and evaluated with, and AdaLLaVA after it ("curious user")."""
    return ChatTemplate()


def llava_v1() -> ChatTemplate:
    """LLaVA's ``conv_llava_v1``: ``vicuna_v1`` with the older system prompt ("curious human")."""
    return ChatTemplate(
        name="llava_v1",
        system=(
            "A chat between a curious human and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the human's questions."
        ),
    )


def plain_chat() -> ChatTemplate:
    """A short template without system prompt, for the tiny model's word-level tokenizer."""
    return ChatTemplate(name="plain_chat", system="", add_bos=True)


@dataclass(frozen=True)
class PlainTemplate(ChatTemplate):
    """LLaVA's ``conv_llava_plain`` (``--version plain``), the template of LLaVA's stage 1, which trains the projector
    on image-caption pairs: no system prompt, no roles, ``\n`` after each message.

    Training follows LLaVA's ``preprocess_plain``: one (human, gpt) turn whose question holds ``<image>``; the question
    is replaced by the image alone, so the ids are BOS, the image, then the caption and ``\n``, and only the caption
    and its ``\n`` are labels. Prompts follow the template's ``get_prompt``: the question (``<image>\n`` + text, as
    LLaVA's evaluation scripts write it), then ``\n``; answers end at ``\n``, where LLaVA's command line stops.
    """

    name: str = "plain"
    system: str = ""
    sep: str = "\n"
    sep2: str = "\n"

    def render(self, turns: list[tuple[str, str | None]]) -> str:
        if len(turns) != 1:
            raise ConversationError(
                f"template {self.name!r} (LLaVA's stage 1) takes one (human, gpt) turn, the record has {len(turns)}",
                field="conversations",
            )
        question, answer = turns[0]
        return question + self.sep if answer is None else IMAGE_PLACEHOLDER + answer + self.sep

    def jinja(self) -> str:
        literal = json.dumps
        return (
            "{%- for message in messages if message['role'] == 'user' -%}"
            "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
            f"{{%- for part in message['content'] if part['type'] == 'image' -%}}{{{{ {literal(IMAGE_PLACEHOLDER + chr(10))} }}}}"
            "{%- endfor -%}"
            "{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}"
            f"{{%- endif -%}}{{{{ {literal(self.sep)} }}}}{{%- endfor -%}}"
        )

    def encode(
        self,
        turns: list[tuple[str, str]],
        tokenizer: PreTrainedTokenizerBase,
        image_token_id: int,
        num_image_tokens: int,
    ) -> EncodedConversation:
        text = self.render(turns)  # one turn, or a ConversationError
        question, answer = turns[0]
        if IMAGE_PLACEHOLDER not in question:
            raise ConversationError(
                f"template {self.name!r} (LLaVA's stage 1) captions an image: the question holds no {IMAGE_PLACEHOLDER}",
                field="conversations[0].value",
            )
        if not answer.strip():
            raise ConversationError("turn 0 has an empty answer", field="conversations[1].value")
        input_ids = self.tokenize(text, tokenizer, image_token_id, num_image_tokens)
        prompt_length = len(self.tokenize(IMAGE_PLACEHOLDER, tokenizer, image_token_id, num_image_tokens))
        labels = [IGNORE_INDEX] * prompt_length + input_ids[prompt_length:]
        return EncodedConversation(input_ids, labels, prompt_length)

    def encode_prompt(
        self,
        questions: list[str],
        answers: list[str],
        tokenizer: PreTrainedTokenizerBase,
        image_token_id: int,
        num_image_tokens: int,
    ) -> list[int]:
        if len(questions) != 1 or answers:
            raise ConversationError(
                f"template {self.name!r} (LLaVA's stage 1) prompts with one question, no earlier turns", field="conversations"
            )
        self._check_placeholders(questions)
        return self.tokenize(self.render([(questions[0], None)]), tokenizer, image_token_id, num_image_tokens)

    def stop_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        stop = super().stop_token_ids(tokenizer)
        if not stop:
            raise ValueError(
                f"template {self.name!r} ends answers at a newline, which this tokenizer drops (a word-level tokenizer "
                "splitting on whitespace): it cannot tell where an answer ends"
            )
        return stop


def llava_plain() -> ChatTemplate:
    """LLaVA's ``conv_llava_plain`` (``--version plain``): its stage-1 (projector pretraining) template."""
    return PlainTemplate()


def phi_v0() -> ChatTemplate:
    """Mipha's ``conv_phi_v0`` (``--version v0``, also named ``phi`` / ``phi-2`` there): the vicuna system prompt
    and roles, answers closed by Phi-2's ``<|endoftext|>``, no BOS token (Phi-2's tokenizer adds none)."""
    return ChatTemplate(name="phi_v0", sep2="<|endoftext|>", add_bos=False)
