"""Metrics against hand-computed answers: VQA normalisation, (grouped) exact match, DDP merging,
majority baseline, and for every benchmark a corpus of tricky predictions scored by the official rule
(each expected value derived by hand from the script named above its test)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adaptive_mllm.metrics import (
    DEFAULT_GROUP,
    OVERALL,
    GQAAccuracy,
    GroupedExactMatch,
    MMEScore,
    MultipleChoiceAccuracy,
    POPEMetrics,
    VQAAccuracy,
    evalai_answer,
    gqa_prediction,
    majority_answers,
    majority_baseline_accuracy,
    mmbench_choice,
    mme_answer,
    normalize_answer,
    pope_answer,
    scienceqa_letter,
    vqa_accuracy,
)


# --- normalisation --------------------------------------------------------------------------------
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


# --- GroupedExactMatch ----------------------------------------------------------------------------
# color: 1 of 2, count: 2 of 3, yesno: 1 of 1, shape: no example; overall 4 of 6
PREDICTIONS = ["Red", "blue", "two", "3", "4", "No."]
REFERENCES = ["red", "green", "2", "three", "5", "no"]
GROUPS = ["color", "color", "count", "count", "count", "yesno"]
KINDS = ["color", "count", "yesno", "shape"]


def _scores(metric: GroupedExactMatch) -> dict[str, float]:
    return {group: value.item() for group, value in metric.compute().items()}


def test_grouped_exact_match_hand_computed():
    metric = GroupedExactMatch(KINDS)
    metric.update(PREDICTIONS, REFERENCES, GROUPS)
    assert _scores(metric) == pytest.approx({OVERALL: 4 / 6, "color": 1 / 2, "count": 2 / 3, "yesno": 1.0})
    assert "shape" not in metric.compute()  # no example: no accuracy
    assert metric.counts() == {OVERALL: 6, "color": 2, "count": 3, "yesno": 1, "shape": 0}


def test_grouped_exact_match_accumulates_over_batches():
    metric = GroupedExactMatch(KINDS)
    for start in range(0, len(PREDICTIONS), 2):
        metric.update(PREDICTIONS[start : start + 2], REFERENCES[start : start + 2], GROUPS[start : start + 2])
    assert _scores(metric) == pytest.approx({OVERALL: 4 / 6, "color": 1 / 2, "count": 2 / 3, "yesno": 1.0})


def test_grouped_exact_match_reset():
    metric = GroupedExactMatch(KINDS)
    metric.update(PREDICTIONS, REFERENCES, GROUPS)
    metric.reset()
    assert metric.total.tolist() == [0, 0, 0, 0]
    metric.update(["circle"], ["square"], ["shape"])
    assert _scores(metric) == {OVERALL: 0.0, "shape": 0.0}


def test_grouped_exact_match_default_group():
    metric = GroupedExactMatch()
    assert metric.groups == [DEFAULT_GROUP]
    metric.update(["yes", "no", "two"], ["yes", "yes", "2"], [DEFAULT_GROUP] * 3)
    assert _scores(metric) == pytest.approx({OVERALL: 2 / 3, DEFAULT_GROUP: 2 / 3})


def test_grouped_exact_match_unknown_group_is_an_error():
    metric = GroupedExactMatch(["color"])
    with pytest.raises(KeyError, match="size"):
        metric.update(["red", "big"], ["red", "big"], ["color", "size"])
    assert metric.total.tolist() == [0]  # nothing of the refused batch was counted


@pytest.mark.parametrize(
    ("groups", "error"),
    [([], ValueError), (["a", "a"], ValueError), ([OVERALL], ValueError), ("color", TypeError)],
)
def test_grouped_exact_match_rejects_bad_groups(groups, error):
    with pytest.raises(error):
        GroupedExactMatch(groups)


def test_grouped_exact_match_rejects_bad_batches():
    metric = GroupedExactMatch(KINDS)
    with pytest.raises(TypeError, match="one string"):  # not scored character by character
        metric.update("red", ["red", "e", "d"], ["color"] * 3)
    with pytest.raises(ValueError, match="lengths differ"):
        metric.update(["red"], ["red"], ["color", "color"])
    with pytest.raises(TypeError, match="groups"):
        metric.update(["red"], ["red"], "color")


def test_grouped_exact_match_merge_of_two_ranks_equals_one_pass():
    single = GroupedExactMatch(KINDS)
    single.update(PREDICTIONS, REFERENCES, GROUPS)
    rank0, rank1 = GroupedExactMatch(KINDS), GroupedExactMatch(KINDS)
    rank0.update(PREDICTIONS[:3], REFERENCES[:3], GROUPS[:3])
    rank1.update(PREDICTIONS[3:], REFERENCES[3:], GROUPS[3:])
    assert _scores(rank0) != _scores(single)

    # by hand, as DDP's sum reduction does it
    summed = {name: getattr(rank0, name) + getattr(rank1, name) for name in ("correct", "total")}
    assert torch.equal(summed["correct"], single.correct) and torch.equal(summed["total"], single.total)

    rank0.merge_state(rank1)
    assert _scores(rank0) == _scores(single)
    assert rank0.counts() == single.counts()


def _list_state_results(rank: int) -> dict[str, float]:
    """MMEScore and circular MultipleChoiceAccuracy on one of two ranks, with uneven list states: rank 0
    sees three MME questions, rank 1 one, and image b's pair (and question q's shifts) span both ranks."""
    mme = MMEScore(["existence"])
    part = slice(0, 3) if rank == 0 else slice(3, 4)
    batch = {"answers": ["Yes", "No", "Yes", "No"], "question_kinds": ["existence"] * 4, "image_id": ["a", "a", "b", "b"]}
    mme.update(["Yes", "No", "Yes", "Yes"][part], {k: v[part] for k, v in batch.items()})  # the last one wrong
    circular = MultipleChoiceAccuracy(rule="mmbench", circular=True)
    if rank == 0:
        circular.update(["A"], {"answers": ["A"], "question_group": ["q"], "circular_shift": [0], "options": [["x", "y", "z"]]})
    else:
        shifts = {"circular_shift": [1, 1]}  # r's shift 0 is not asked: vanilla counts q's on rank 0 only
        batch = {"answers": ["B", "B"], "question_group": ["q", "r"], "options": [["y", "z", "x"], ["x", "y"]], **shifts}
        circular.update(["C", "B"], batch)
    scores = circular.compute()
    return {"mme": mme.compute()["existence"].item(), "circular": scores[OVERALL].item(), "vanilla": scores["vanilla"].item()}


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        metric = GroupedExactMatch(KINDS)
        shard = slice(rank, None, world_size)  # ranks see different, uneven mixes of groups
        metric.update(PREDICTIONS[shard], REFERENCES[shard], GROUPS[shard])
        result = {"scores": {k: v.item() for k, v in metric.compute().items()}, "counts": metric.counts()}
        result.update(_list_state_results(rank))
        with open(f"{out_dir}/rank{rank}.json", "w") as handle:
            json.dump(result, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_grouped_exact_match_syncs_across_real_processes(tmp_path):
    world_size = 2
    mp.spawn(_ddp_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size, join=True)
    expected = {OVERALL: 4 / 6, "color": 1 / 2, "count": 2 / 3, "yesno": 1.0}
    for rank in range(world_size):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["scores"] == pytest.approx(expected)
        assert result["counts"] == {OVERALL: 6, "color": 2, "count": 3, "yesno": 1, "shape": 0}
        # list states (cat): the pairs / circular shifts split over the ranks are regrouped after the gather
        # image a both right, b one right: acc 3/4, acc+ 1/2 (rank 0 alone would give 200, rank 1 alone 0)
        assert result["mme"] == pytest.approx(125.0)
        assert result["circular"] == pytest.approx(0.5)  # q wrong in its shift on rank 1, r right
        assert result["vanilla"] == pytest.approx(1.0)  # the one shift-0 record (rank 0's) right


# --- majority baseline ----------------------------------------------------------------------------
def test_majority_answers():
    answers = ["Yes", "yes.", "no", "red", "Blue", "blue", "2", "two", "3", "three"]
    groups = ["yesno", "yesno", "yesno", "color", "color", "color", "count", "count", "count", "count"]
    # yesno: yes 2 / no 1; color: blue 2 / red 1; count: 2 and 3 tie at 2 each -> "2" (alphabetical)
    assert majority_answers(answers, groups) == {"color": "blue", "count": "2", "yesno": "yes"}


def test_majority_baseline_accuracy_hand_computed():
    majority = {"yesno": "yes", "color": "Red.", "count": "two"}
    references = ["yes", "no", "Yes.", "red", "blue", "2", "3", "circle"]
    groups = ["yesno", "yesno", "yesno", "color", "color", "count", "count", "shape"]
    # yesno 2/3, color 1/2 (majority normalised), count 1/2 ("two" == "2"), shape 0/1 (no majority answer)
    assert majority_baseline_accuracy(majority, references, groups) == pytest.approx(
        {OVERALL: 4 / 8, "yesno": 2 / 3, "color": 1 / 2, "count": 1 / 2, "shape": 0.0}
    )


def test_majority_baseline_agrees_with_grouped_exact_match():
    majority = {"color": "red", "count": "2", "yesno": "no"}
    metric = GroupedExactMatch(KINDS)
    metric.update([majority[g] for g in GROUPS], REFERENCES, GROUPS)
    assert majority_baseline_accuracy(majority, REFERENCES, GROUPS) == pytest.approx(_scores(metric))


def test_majority_baseline_rejects_bad_input():
    with pytest.raises(ValueError, match="lengths differ"):
        majority_baseline_accuracy({"a": "x"}, ["x", "y"], ["a"])
    with pytest.raises(ValueError, match="reserved"):
        majority_baseline_accuracy({OVERALL: "x"}, ["x"], [OVERALL])


# --- benchmark metrics: update(predictions, batch) ------------------------------------------------
def _values(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    return {key: value.item() for key, value in scores.items()}


def test_exact_match_metrics_take_a_batch():
    batch = {"answers": ["red", "2", "cat"], "question_kinds": ["color", "count", "color"]}
    grouped = GroupedExactMatch(["color", "count"])
    grouped.update(["Red.", "two", "dog"], batch)
    assert _scores(grouped) == pytest.approx({OVERALL: 2 / 3, "color": 1 / 2, "count": 1.0})
    assert grouped.question_scores(["Red.", "two", "dog"], batch) == [1.0, 1.0, 0.0]  # the answers file's scores


def test_gqa_question_scores_follow_its_rule():
    batch = {"answers": ["dog", "a dog"], "question_kinds": ["all", "all"]}
    assert GQAAccuracy().question_scores(["Dog.", "dog"], batch) == [1.0, 0.0]  # no VQA normalisation: "a dog" stays


# --- VQAv2: LLaVA-1.5's convert_vqav2_for_submission.py (EvalAI answer processor), then vqaEval.py ---------
# Each expected value by hand: the prediction, stripped, goes through the EvalAI processor (lower-case;
# "," and "?" deleted; "'s" -> " 's"; punctuation, number words, articles, contractions); vqaEval then
# normalises both sides only when the ten humans disagree, and averages min(#matching / 3, 1) over the
# ten leave-one-out subsets of nine humans.
@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("red", ["red"] * 10, 1.0),
        ("red", ["red"] * 3 + ["blue"] * 7, 0.9),  # 3 subsets hold 2 of the 3 (2/3), 7 hold all 3
        ("red", ["red"] * 4 + ["blue"] * 6, 1.0),  # every subset holds at least 3
        ("red", ["red"] * 2 + ["blue"] * 8, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
        ("red", ["red"] + ["blue"] * 9, 0.3),  # (0 + 9 * 1/3) / 10
        ("red", ["blue"] * 10, 0.0),
        ("Yes.", ["yes"] * 10, 1.0),  # EvalAI: lower-cased, the period stripped
        ("YES", ["yes"] * 10, 1.0),
        ("yes!", ["yes"] * 10, 1.0),  # "!" touches no space: a space, then dropped by the word split
        ("Two.", ["2"] * 3 + ["3"] * 7, 0.9),  # EvalAI: "two" -> "2"; humans disagree: normalised too
        ("Two", ["2"] * 10, 1.0),  # EvalAI maps the number word itself
        ("a dog", ["dog"] * 10, 1.0),  # EvalAI drops articles
        ("The Dog!", ["dog"] * 10, 1.0),
        ("black-and-white", ["black and white"] * 10, 1.0),  # "-" inside a word becomes a space
        ("dont know", ["don't know"] * 10, 1.0),  # contraction restored by EvalAI
        ("1,000", ["1000"] * 10, 1.0),  # EvalAI deletes commas
        ("red\nblue", ["red blue"] * 10, 1.0),  # newline to space
        ("  red  ", ["red"] * 10, 1.0),  # model_vqa_loader strips the generated text
        ("", ["yes"] * 10, 0.0),  # an empty answer matches no human
        ("The answer is yes", ["yes"] * 10, 0.0),  # "the" dropped, "answer is yes" != "yes"
        # ten humans agree: vqaEval compares their answer as written, so a capitalised one never matches
        # the lower-cased submission, and "2" never matches "two"
        ("Dog", ["Dog"] * 10, 0.0),
        ("2", ["two"] * 10, 0.0),
        ("2", ["two"] * 9 + ["2"], 1.0),  # disagree: "two" -> "2" for all ten, so every subset holds 9
        # EvalAI splits "'s" off ("man 's"); vqaEval's own normalisation keeps "man's": never equal
        ("man's", ["man's"] * 10, 0.0),
        ("man's", ["man's"] * 9 + ["man"], 0.0),
    ],
)
def test_vqav2_accuracy_official_rule(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers, rule="vqav2") == pytest.approx(expected)


def test_evalai_answer_processor():
    # m4c_evaluator.py's EvalAIAnswerProcessor, by hand
    assert evalai_answer("Man's hat?") == "man 's hat"
    assert evalai_answer("Hello, World") == "hello world"
    assert evalai_answer("hello,world") == "helloworld"  # the comma deleted, not made a space
    assert evalai_answer("Coca-Cola") == "coca cola"
    assert evalai_answer("The two dogs.") == "2 dogs"
    assert evalai_answer("3.5 m.") == "3.5 m"
    assert evalai_answer("") == ""


# --- TextVQA: m4c_evaluator.py's TextVQAAccuracyEvaluator (LLaVA's eval_textvqa.py) ---------------------
# EvalAI processor on the prediction and on all ten human answers, always; then the leave-one-out mean.
@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("Dakota", ["dakota"] * 10, 1.0),
        ("DAKOTA.", ["dakota"] * 10, 1.0),
        ("the nokia", ["nokia"] * 10, 1.0),  # article dropped
        ("nokia\n", ["nokia"] * 10, 1.0),
        ("", ["nokia"] * 10, 0.0),
        ("coca-cola", ["coca cola"] * 10, 1.0),
        ("man's", ["man's"] * 10, 1.0),  # both sides become "man 's"
        ("Dog", ["Dog"] * 10, 1.0),  # humans are processed even when they agree (unlike VQAv2)
        ("hello,world", ["hello world"] * 10, 0.0),  # EvalAI deletes the comma: "helloworld"
        ("Hello, World", ["hello world"] * 10, 1.0),
        ("stop", ["stop"] * 2 + ["halt"] * 8, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
        ("STOP!", ["stop"] * 4 + ["halt"] * 6, 1.0),
        ("cant", ["can't"] * 10, 1.0),
    ],
)
def test_textvqa_accuracy_official_rule(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers, rule="textvqa") == pytest.approx(expected)


def test_textvqa_needs_ten_answers():
    with pytest.raises(ValueError, match="exactly 10 human answers"):
        vqa_accuracy("red", ["red"] * 9, rule="textvqa")
    with pytest.raises(ValueError, match="unknown VQA rule"):
        VQAAccuracy(rule="lenient")


def test_vqa_accuracy_metric_groups_and_batches():
    metric = VQAAccuracy(["yes/no", "number", "other"])
    batch = {
        "all_answers": [["yes"] * 10, ["2"] * 2 + ["3"] * 8, ["red"] * 3 + ["blue"] * 7],
        "question_kinds": ["yes/no", "number", "other"],
    }
    metric.update(["Yes", "two", "red"], batch)
    metric.update(["no"], {"all_answers": [["yes"] * 10], "question_kinds": ["yes/no"]})
    assert _values(metric.compute()) == pytest.approx({OVERALL: (1 + 0.6 + 0.9 + 0) / 4, "yes/no": 0.5, "number": 0.6, "other": 0.9})
    assert metric.score.dtype == torch.long  # integer states: untouched by a module's precision cast
    scores = metric.question_scores(["Yes", "two", "red"], batch)
    assert scores == pytest.approx([1.0, 0.6, 0.9])  # each answer's accuracy, as the hand values above


def test_vqa_metric_corpus_per_rule():
    # the same predictions, scored by each rule (values from the two parametrised corpora above)
    predictions = ["Dog", "man's", "hello,world", "Two"]
    answers = [["Dog"] * 10, ["man's"] * 10, ["hello world"] * 10, ["2"] * 10]
    vqav2, textvqa = VQAAccuracy(rule="vqav2"), VQAAccuracy(rule="textvqa")
    vqav2.update(predictions, {"all_answers": answers})
    textvqa.update(predictions, {"all_answers": answers})
    # vqav2: 0 ("Dog" vs agreeing "Dog"), 0 ("man 's" vs "man's"), 0 ("helloworld"), 1 -> 1/4
    assert vqav2.compute()[OVERALL].item() == pytest.approx(1 / 4)
    # textvqa: 1, 1, 0, 1 -> 3/4
    assert textvqa.compute()[OVERALL].item() == pytest.approx(3 / 4)


def test_vqa_accuracy_needs_the_human_answers():
    metric = VQAAccuracy()
    with pytest.raises(KeyError, match="all_answers"):
        metric.update(["red"], {"answers": ["red"]})
    with pytest.raises(ValueError, match="non-empty"):
        metric.update(["red"], {"all_answers": [[]]})
    with pytest.raises(KeyError, match="unknown groups"):
        metric.update(["red"], {"all_answers": [["red"]], "question_kinds": ["other"]})


# --- GQA: LLaVA-1.5's convert_gqa_for_eval.py (rstrip "." and lower-case), then GQA's eval.py (==) ----
@pytest.mark.parametrize(
    ("prediction", "answer", "hit"),
    [
        ("Dog", "dog", 1),
        ("dog.", "dog", 1),
        ("Dog..", "dog", 1),  # every trailing period
        (" no\n", "no", 1),  # model_vqa_loader strips the generated text
        ("3.", "3", 1),
        ("a dog", "dog", 0),  # no article removal
        ("the dog", "dog", 0),
        ("two", "2", 0),  # no number words
        ("yes!", "yes", 0),  # no punctuation removal
        ("Yes, it is.", "yes", 0),
        ("Black-and-white", "black and white", 0),
        ("black and white", "black and white", 1),
        ("", "no", 0),
        ("no .", "no", 0),  # "no " after the period goes: the space stays
    ],
)
def test_gqa_official_rule(prediction, answer, hit):
    metric = GQAAccuracy()
    metric.update([prediction], [answer], [DEFAULT_GROUP])
    assert metric.compute()[OVERALL].item() == hit


def test_gqa_metric_corpus_per_group():
    metric = GQAAccuracy(["verify", "query"])
    batch = {"answers": ["no", "triangle", "green", "2"], "question_kinds": ["verify", "query", "query", "query"]}
    metric.update(["No.", "A triangle", "Green", "two"], batch)  # hits 1, 0, 1, 0 by the rule above
    assert _values(metric.compute()) == pytest.approx({OVERALL: 2 / 4, "verify": 1.0, "query": 1 / 3})
    assert gqa_prediction("  Left..\n") == "left"


# --- ScienceQA: LLaVA-1.5's eval_science_qa.py letter parsing ----------------------------------------
# The stripped answer is one of A-E; or it starts with a letter of A-E and ". "; or it holds exactly one
# match of "The answer is ([A-Z])." (the "." is any character); else FAILED. A letter past the options
# (or not in A-E) counts as wrong.
@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B", "B"), (" C\n", "C"), ("B. cat", "B"), ("The answer is B.", "B"), ("The answer is B,", "B"),
        ("I think so. The answer is C. Done", "C"),
        ("b", None),  # lower case: not an option
        ("(B)", None), ("B.", None), ("B)", None), ("B: cat", None),  # none of the three forms
        ("The answer is B", None),  # nothing after the letter: the pattern's "." needs a character
        ("the answer is B.", None),  # lower-case "the"
        ("The answer is (B).", None),
        ("The answer is B. The answer is C.", None),  # two matches
        ("A cat", None), ("cat", None), ("", None),
        ("E", None),  # past the 4 options
        ("F", None),  # not in A-E at all
    ],
)  # fmt: skip
def test_scienceqa_letter_official_rule(prediction, expected):
    assert scienceqa_letter(prediction, num_choices=4) == expected


def test_scienceqa_metric_counts_unparsable():
    metric = MultipleChoiceAccuracy(["nat", "soc"], rule="scienceqa")
    batch = {"answers": ["B", "A", "C", "A", "B"], "num_choices": [2, 2, 3, 2, 3], "question_kinds": ["nat", "nat", "soc", "soc", "soc"]}
    # B right; "(A)" unparsable; "The answer is C." right; "C" past 2 options: unparsable; "A. cat" parsed, wrong
    metric.update(["B", "(A)", "The answer is C.", "C", "A. cat"], batch)
    assert _values(metric.compute()) == pytest.approx({OVERALL: 2 / 5, "nat": 1 / 2, "soc": 1 / 3, "unparsable": 2})
    with pytest.raises(ValueError, match="unknown multiple-choice rule"):
        MultipleChoiceAccuracy(rule="lenient")


# --- MMBench: can_infer of open-compass/VLMEvalKit (no LLM judge) ------------------------------------
# can_infer_option: ".()[],:;!*#{}" become spaces, split into words; exactly one option letter among the
# words -> that letter; no letter but a "Z" word, or a refusal phrase -> no option. Else can_infer_text:
# exactly one option text (lower-cased) inside the lower-cased answer -> that option.
MMBENCH_OPTIONS = ["dog", "cat", "bird"]


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B) cat", "B"), ("The answer is B.", "B"), ("**B**", "B"),
        ("cat\nB", "B"),  # split on any whitespace
        ("The bird, option C", "C"),
        ("A cat", "A"),  # MMBench reads the capital "A" as option A
        ("cat", "B"), ("It is a cat.", "B"), ("Birds", "C"), ("CAT", "B"),  # by option text
        ("b", None),  # a lower-case letter is no option letter, and no option text is in "b"
        ("B or C", None),  # two letters, no option text
        ("a cat or a dog", None),  # two option texts
        ("D", None),  # not an option: no letter, no text
        ("Z", None), ("", None), ("I don't know", None),
        ("Cannot determine the answer", None),  # a refusal
    ],
)  # fmt: skip
def test_mmbench_choice_official_rule(prediction, expected):
    assert mmbench_choice(prediction, MMBENCH_OPTIONS) == expected


def test_mmbench_circular_across_batches_and_ranks():
    options = [["dog", "cat", "bird"], ["cat", "bird", "dog"], ["bird", "dog", "cat"], ["red", "blue"], ["blue", "red"]]
    batch = {
        "answers": ["B", "A", "C", "B", "A"],
        "options": options,
        "question_group": ["q1", "q1", "q1", "q2", "q2"],
        "circular_shift": [0, 1, 2, 1, 0],
        "question_kinds": ["x", "x", "x", "y", "y"],
    }
    # q1: "cat" (text -> B), "A." (A), "(C) cat" (C): right in every shift; q2: "blue" (B) right, "I don't know"
    # (no option) wrong
    predictions = ["cat", "A.", "(C) cat", "blue", "I don't know"]
    single = MultipleChoiceAccuracy(["x", "y"], rule="mmbench", circular=True)
    single.update(predictions, batch)
    # vanilla: the shift-0 records only (q1's "cat" right, q2's "I don't know" wrong), not 4 of 5 records
    expected = {OVERALL: 0.5, "vanilla": 1 / 2, "x": 1.0, "y": 0.0, "unparsable": 1}
    assert _values(single.compute()) == pytest.approx(expected)
    # the shifts of q1 split over two ranks: merged, still one question
    rank0 = MultipleChoiceAccuracy(["x", "y"], rule="mmbench", circular=True)
    rank1 = MultipleChoiceAccuracy(["x", "y"], rule="mmbench", circular=True)
    rank0.update(predictions[:2], {k: v[:2] for k, v in batch.items()})
    rank1.update(predictions[2:], {k: v[2:] for k, v in batch.items()})
    rank0.merge_state(rank1)
    assert _values(rank0.compute()) == pytest.approx(expected)
    with pytest.raises(KeyError, match="question_group"):
        MultipleChoiceAccuracy(rule="mmbench", circular=True).update(["A"], {"answers": ["A"], "options": [["x", "y"]]})
    with pytest.raises(KeyError, match="circular_shift"):
        batch = {"answers": ["A"], "options": [["x", "y"]], "question_group": ["q"]}
        MultipleChoiceAccuracy(rule="mmbench", circular=True).update(["A"], batch)
    with pytest.raises(KeyError, match="options"):
        MultipleChoiceAccuracy(rule="mmbench").update(["A"], {"answers": ["A"]})


# --- POPE: LLaVA-1.5's eval_pope.py ----------------------------------------------------------------
# Text before the first ".", commas deleted, split on single spaces: "No" / "no" / "not" a word -> no.
@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("Yes", "yes"), ("No", "no"), ("no", "no"), ("No, there is not.", "no"), ("There is not a dog.", "no"),
        ("Yes. There is no dog.", "yes"),  # only the first sentence counts
        ("No.", "no"), (" no \n", "no"),  # model_vqa_loader strips the generated text
        ("NO", "yes"), ("Nope", "yes"), ("I cannot tell", "yes"), ("", "yes"),  # eval_pope.py's rule, literally
        ("yes, no", "no"),  # commas dropped, then "no" is a word
        ("No\nThere is a dog", "yes"),  # split on spaces only: "No\nThere" is one word
        ("no\tdog", "yes"),
        ("Yes.\nNo", "yes"),
    ],
)  # fmt: skip
def test_pope_answer(prediction, expected):
    assert pope_answer(prediction) == expected


def test_pope_corpus_scores_by_eval_pope():
    # eval_pope.py per answer: yes, yes ("No\nThere" is one word), yes ("NO"), no, yes (empty), no
    labels = ["yes", "yes", "no", "no", "yes", "no"]
    predictions = ["Yes", "No\nThere is a cat", "NO", "There is no dog.", "", "no."]
    metric = POPEMetrics(["random"])
    metric.update(predictions, {"answers": labels, "question_kinds": ["random"] * 6})
    scores = _values(metric.compute())
    # TP 3 (answers 1, 2, 5), FP 1 (answer 3), TN 2, FN 0
    assert metric.counts.tolist() == [[3, 1, 2, 0]]
    assert metric.question_scores(predictions, {"answers": labels}) == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]  # accuracy 5/6
    assert scores["random/precision"] == pytest.approx(3 / 4) and scores["random/recall"] == 1.0
    assert scores["random/f1"] == pytest.approx(6 / 7) and scores[OVERALL] == pytest.approx(6 / 7)
    assert scores["random/accuracy"] == pytest.approx(5 / 6) and scores["random/yes_ratio"] == pytest.approx(4 / 6)


def test_pope_counts_hand_computed():
    metric = POPEMetrics(["adversarial", "random"])
    labels = ["yes", "yes", "no", "no", "yes", "no"]
    predictions = ["Yes", "No", "Yes", "No", "yes", "no"]  # TP FN FP TN | TP TN
    metric.update(predictions, {"answers": labels, "question_kinds": ["adversarial"] * 4 + ["random"] * 2})
    assert metric.counts.tolist() == [[1, 1, 1, 1], [1, 0, 1, 0]]  # tp, fp, tn, fn
    scores = _values(metric.compute())
    assert scores["adversarial/accuracy"] == 0.5 and scores["adversarial/precision"] == 0.5
    assert scores["adversarial/recall"] == 0.5 and scores["adversarial/f1"] == 0.5 and scores["adversarial/yes_ratio"] == 0.5
    assert scores["random/f1"] == 1.0 and scores["random/yes_ratio"] == 0.5
    # pooled: TP 2, FP 1, TN 2, FN 1
    assert scores["accuracy"] == pytest.approx(4 / 6) and scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3) and scores["f1"] == pytest.approx(2 / 3)
    assert scores["yes_ratio"] == pytest.approx(3 / 6)
    assert scores[OVERALL] == pytest.approx((0.5 + 1.0) / 2)  # mean F1 over the splits
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        metric.update(["yes"], {"answers": ["maybe"], "question_kinds": ["random"]})


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"), ("No.", "no"), ("NO.", "no"), (" yes \n", "yes"),
        ("Yes\nIt is", "yes"),  # "yes" in the first four characters
        ("Not sure", "no"), ("nope", "no"), ("no, yes", "no"),  # "no" in the first four, "yes" not
        ("Eyes", "yes"), ("Knob", "no"),  # calculation.py's substring test, literally
        ("It is yes", None), ("maybe", None), ("I don't know", None), ("Unknown", None), ("", None),
    ],
)  # fmt: skip
def test_mme_answer(prediction, expected):
    # MME's eval_tool/calculation.py: lower-cased; exactly "yes" / "no"; else "yes" in the first four
    # characters, else "no" in them; else "other" (wrong)
    assert mme_answer(prediction) == expected


def test_mme_pairs_across_batches_and_ranks():
    # existence: img a both right, img b one right -> acc 3/4, acc+ 1/2 -> 125
    # OCR: img c both right -> 200; code_reasoning: img d none right -> 0
    predictions = ["Yes", "No", "Yes", "Yes", "yes", "no", "No", "Yes"]
    batch = {
        "answers": ["Yes", "No", "Yes", "No", "Yes", "No", "Yes", "No"],
        "question_kinds": ["existence"] * 4 + ["OCR"] * 2 + ["code_reasoning"] * 2,
        "image_id": ["a", "a", "b", "b", "c", "c", "d", "d"],
    }
    expected = {"existence": 125.0, "OCR": 200.0, "code_reasoning": 0.0, "perception": 325.0, "cognition": 0.0, "total": 325.0}
    whole = MMEScore()
    whole.update(predictions, batch)
    scores = _values(whole.compute())
    assert {k: scores[k] for k in expected} == pytest.approx(expected)
    assert scores[OVERALL] == pytest.approx(325.0) and scores["existence/acc_plus"] == 0.5
    # each image's two questions in different batches, on different ranks
    rank0, rank1 = MMEScore(), MMEScore()
    for metric, part in ((rank0, slice(0, None, 2)), (rank1, slice(1, None, 2))):
        metric.update(predictions[part], {k: v[part] for k, v in batch.items()})
    rank0.merge_state(rank1)
    assert _values(rank0.compute()) == pytest.approx(scores)
    with pytest.raises(ValueError, match="unknown MME subtasks"):
        MMEScore(["colour"])


def test_mme_same_image_name_in_two_subtasks_is_two_images():
    metric = MMEScore(["existence", "count"])
    batch = {"answers": ["Yes", "No", "Yes", "No"], "question_kinds": ["existence", "existence", "count", "count"], "image_id": ["x"] * 4}
    metric.update(["Yes", "No", "No", "No"], batch)
    scores = _values(metric.compute())
    assert scores["existence"] == 200.0 and scores["count"] == pytest.approx(50.0)
