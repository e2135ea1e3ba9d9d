"""Running a LLaVA-family reference's own training preprocessing on generated conversations, and reading the
fixtures that come out of it.

The generators (``make_release_tokens.py`` for the AdaLLaVA release on LLaVA's code, ``make_mipha_tokens.py``
for Mipha) run in a separate environment with the reference's transformers; they share the conversations,
the way the reference's functions are loaded and run, and the fixture's record form. The tests read the
fixtures back with :func:`expected_ids_and_labels`.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import importlib
import io
import random
import sys
import types
from pathlib import Path

WORDS = (
    "the a cat dog man woman is are on in under red blue green sitting standing holding picture image what where "
    "why how many color colour street car bus sign table two three yes no left right top"
).split()
ODD = ["3.14", "1,000", "42%", "e.g.", "café", "naïve", "日本語", "🙂", "—", "“quoted”", "'single'", "(paren)",
       "C++", "x_y", "$5", "http://example.com", "foo.bar()", "<b>", "A:", "\t", "  ", "   ", "...", "'s", "n't", "\u00a0"]
HAND = [  # cases the generated text may miss: whitespace runs, code, an image-only question, text-only records
    [("<image>", "A red bus.")],
    [("<image>\nWrite the code.", "def f(x):\n    if x:\n        return  x\n\treturn None")],
    [("<image>\nWhat is it?", " A cat."), ("And now?  ", "Two  spaces,   three   and\n  a newline.")],
    [("Text only, no image.", "Fine."), ("Again:", "  leading spaces")],
    [("Is it red? <image>", "Yes"), ("Why?", "Because  it is.\n\n\nDone  ")],
]
IGNORE = -100
IMAGE_SENTINEL = -200  # LLaVA's IMAGE_TOKEN_INDEX: one id per image, expanded to the features later


def generated(rng: random.Random, count: int) -> list[list[tuple[str, str]]]:
    def phrase(length: int) -> str:
        tokens = [rng.choice(ODD) if rng.random() < 0.25 else rng.choice(WORDS) for _ in range(length)]
        text = rng.choice([" ", "\n", "\n\n", ", ", "  "]).join(tokens) if rng.random() < 0.3 else " ".join(tokens)
        return text + rng.choice(["", ".", "?", " ", "\n", "  "])

    conversations = []
    for _ in range(count):
        turns = []
        for number in range(rng.choice([1, 1, 2, 3])):
            question, answer = phrase(rng.randint(1, 10)), phrase(rng.randint(1, 16))
            if number == 0 and rng.random() < 0.8:
                question = rng.choice(["<image>\n" + question, question + "\n<image>", question + " <image>", " <image>\n" + question])
            if rng.random() < 0.1:
                answer = " " + answer
            turns.append((question, answer))
        conversations.append(turns)
    return conversations


def conversations(count: int) -> list[list[tuple[str, str]]]:
    """The hand-written cases, then ``count`` generated ones (seed 0); those holding a role word are left out
    (the references' masks split the text there: docs/architecture.md)."""
    every = [*HAND, *generated(random.Random(0), count)]
    return [turns for turns in every if not any("ASSISTANT" in text or "USER" in text for turn in turns for text in turn)]


def load_reference_package(name: str, checkout: Path) -> None:
    """``name``'s modules importable from ``checkout`` without its ``__init__``, which imports the whole model."""
    package = types.ModuleType(name)
    package.__path__ = [str(checkout / name)]
    sys.modules[name] = package


def reference_functions(package: str, source: str, names: tuple[str, ...], origin: str, **extra: object) -> dict:
    """The top-level functions ``names`` of a reference's train.py ``source``, executed as they are in a namespace
    holding what they use from ``package`` (its conversation, constants and mm_utils modules)."""
    import torch
    import transformers

    constants = importlib.import_module(f"{package}.constants")
    namespace = dict(
        torch=torch, transformers=transformers, copy=copy, Dict=dict, Sequence=list, DataArguments=object,
        conversation_lib=importlib.import_module(f"{package}.conversation"),
        tokenizer_image_token=importlib.import_module(f"{package}.mm_utils").tokenizer_image_token,
        **{name: getattr(constants, name) for name in
           ("IGNORE_INDEX", "DEFAULT_IMAGE_TOKEN", "DEFAULT_IM_START_TOKEN", "DEFAULT_IM_END_TOKEN")},
        **extra,
    )
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            exec(compile(ast.Module([node], []), origin, "exec"), namespace)
    return namespace


def run_reference(functions: dict, preprocess: str, tokenizer: object, number: int, turns: list[tuple[str, str]]) -> dict:
    """One conversation through the reference's ``preprocess_multimodal`` (when it has an image) and its
    ``preprocess`` function: the fixture record (ids, label spans; ``reference_mismatch`` when the reference
    reported a tokenization mismatch, i.e. ignored every label)."""
    has_image = "<image>" in turns[0][0]
    messages = [{"from": role, "value": text} for turn in turns for role, text in zip(("human", "gpt"), turn, strict=True)]
    sources = copy.deepcopy([messages])
    if has_image:
        sources = functions["preprocess_multimodal"](sources, types.SimpleNamespace(is_multimodal=True, mm_use_im_start_end=False))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        encoded = functions[preprocess](sources, tokenizer, has_image=has_image)
    ids, labels = encoded["input_ids"][0].tolist(), encoded["labels"][0].tolist()
    record = {"id": f"c{number}", "conversations": messages, "input_ids": ids, "label_spans": label_spans(ids, labels)}
    if "mismatch" in printed.getvalue():
        record["reference_mismatch"] = True
    if has_image:
        record["image"] = "image.png"
    return record


def label_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The [start, end) runs of labelled positions (a label is always the id at its position)."""
    spans, start = [], None
    for position, label in enumerate([*labels, IGNORE]):
        if label != IGNORE and start is None:
            start = position
        elif label == IGNORE and start is not None:
            spans.append([start, position])
            start = None
    assert all(labels[p] == ids[p] for a, b in spans for p in range(a, b))
    return spans


def expected_ids_and_labels(record: dict, image_token_id: int, sentinel: int = IMAGE_SENTINEL) -> tuple[list[int], list[int]]:
    """A fixture record's ids with the image sentinel as ``image_token_id`` (one image token), and its labels."""
    ids = [image_token_id if token == sentinel else token for token in record["input_ids"]]
    labels = [IGNORE] * len(ids)
    for start, end in record["label_spans"]:
        labels[start:end] = ids[start:end]
    return ids, labels
