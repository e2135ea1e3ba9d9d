"""VQA answer normalisation (vqaEval.py's) against hand-normalised answers."""

from __future__ import annotations

import pytest

from adaptive_mllm.metrics import (
    normalize_answer,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Yes.", "yes"),  # case and trailing period
        ("YES", "yes"),
        ("Yes!", "yes"),  # a glued mark becomes a space, then whitespace collapses
        ("two", "2"),  # number words
        ("Ten apples", "10 apples"),
        ("none", "0"),
        ("Two.", "2"),
        ("the dog", "dog"),  # articles
        ("a red ball", "red ball"),
        ("An apple", "apple"),
        ("theory", "theory"),  # only whole words are articles
        ("  red   and  blue  ", "red and blue"),  # extra spaces
        ("red\tand\nblue", "red and blue"),
        ("2.5", "2.5"),  # a decimal point stays
        ("3.", "3"),  # a period not followed by a digit goes
        ("3.14 m.", "3.14 m"),
        (".5", ".5"),  # vqaEval.py's regex keeps a period before a digit even with no digit before it
        ("black-and-white", "black and white"),  # a mark inside a word splits it
        ("black - white", "black white"),  # a mark beside a space is deleted
        ("red, blue", "red blue"),
        ("red,blue", "red blue"),
        ("1,000", "1000"),  # a digit grouping: every mark deleted, none made a space
        ("(left)", "left"),
        ("dont", "don't"),  # contractions restored
        ("isnt", "isn't"),
        ("don't", "don't"),  # apostrophes are not punctuation to the script
        ("Im", "im"),  # the script's capitalised key never matches the lower-cased word
        # each mark is judged against the answer as it came in: "-" touches no space in "p-q r-(s", so
        # it becomes a space (checked against the text after "(" became a space, it would be deleted: "pq")
        ("p-q r-(s", "p q r s"),
        ("", ""),
        ("...", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalisation_makes_equivalent_answers_equal():
    assert normalize_answer("Yes.") == normalize_answer("yes")
    assert normalize_answer("2") == normalize_answer("two")
    assert normalize_answer("The cat.") == normalize_answer("cat")
    assert normalize_answer("yes") != normalize_answer("no")
    assert normalize_answer("2") != normalize_answer("3")
