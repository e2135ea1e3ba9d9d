"""Chat templates: a conversation -> token ids and labels, built from per-turn spans.

Labels come from the spans we tokenised ourselves (prompt spans ignored, answer spans kept), never
from re-tokenising the joined string and guessing offsets, so a template/tokenizer mismatch cannot
silently turn a loss to zero: the ids the model sees are exactly the concatenated spans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

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
    prompt_length: int  # tokens before the first answer token: where the latency token goes in training


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
        input_ids, labels = self._prefix(tokenizer)
        prompt_length = None
        for index, (question, answer) in enumerate(turns):
            if not answer.strip():
                raise ConversationError(f"turn {index} has an empty answer", field=f"conversations[{2 * index + 1}].value")
            prompt = self._question_ids(question, tokenizer, image_token_id, num_image_tokens, first=index == 0)
            input_ids += prompt
            labels += [IGNORE_INDEX] * len(prompt)
            if prompt_length is None:
                prompt_length = len(input_ids)
            answer_ids = self._text_ids(f" {answer}", tokenizer) + self._end_of_turn_ids(tokenizer)
            input_ids += answer_ids
            labels += answer_ids
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
        ids, _ = self._prefix(tokenizer)
        for index, question in enumerate(questions):
            ids += self._question_ids(question, tokenizer, image_token_id, num_image_tokens, first=index == 0)
            if index < len(answers):
                ids += self._text_ids(f" {answers[index]}", tokenizer) + self._end_of_turn_ids(tokenizer)
        return ids

    def stop_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        return self._end_of_turn_ids(tokenizer)[-1:]

    # --- pieces ----------------------------------------------------------------------------------
    def _prefix(self, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
        ids = [tokenizer.bos_token_id] if self.add_bos and tokenizer.bos_token_id is not None else []
        if self.system:
            ids += self._text_ids(self.system + self.sep, tokenizer)
        return ids, [IGNORE_INDEX] * len(ids)

    def _question_ids(
        self, question: str, tokenizer: PreTrainedTokenizerBase, image_token_id: int, num_image_tokens: int, first: bool
    ) -> list[int]:
        if IMAGE_PLACEHOLDER in question and not first:
            raise ConversationError(f"{IMAGE_PLACEHOLDER} may only appear in the first human turn", field="conversations")
        if question.count(IMAGE_PLACEHOLDER) > 1:
            raise ConversationError(f"more than one {IMAGE_PLACEHOLDER} in a turn", field="conversations[0].value")
        ids: list[int] = []
        pieces = question.split(IMAGE_PLACEHOLDER)
        text = f"{self.user_role}: "
        for index, piece in enumerate(pieces):
            ids += self._text_ids(text + piece, tokenizer)
            text = ""
            if index < len(pieces) - 1:
                ids += [image_token_id] * num_image_tokens
        return ids + self._text_ids(f"{self.sep}{self.assistant_role}:", tokenizer)

    def _end_of_turn_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        if tokenizer.eos_token is not None and self.sep2 == tokenizer.eos_token:
            return [tokenizer.eos_token_id]
        return self._text_ids(self.sep2, tokenizer)

    @staticmethod
    def _text_ids(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        if not text:
            return []
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])


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


def phi_v0() -> ChatTemplate:
    """Mipha's ``conv_phi_v0`` (``--version v0``, also named ``phi`` / ``phi-2`` there): the vicuna system prompt
    and roles, answers closed by Phi-2's ``<|endoftext|>``, no BOS token (Phi-2's tokenizer adds none)."""
    return ChatTemplate(name="phi_v0", sep2="<|endoftext|>", add_bos=False)
