"""TextVQA loader on its stand-in: OCR tokens in the prompt, the ten answers in the batch."""

from __future__ import annotations

import json

import pytest

from adaptive_mllm.data import DataError
from adaptive_mllm.data.benchmarks import SHORT_ANSWER, TextVQADataModule
from adaptive_mllm.metrics import VQAAccuracy


def test_reads_questions_and_ocr(textvqa_files, first_batch, prompts_of):
    dm = TextVQADataModule(str(textvqa_files["questions"]), ocr_json=str(textvqa_files["ocr"]), batch_size=2)
    batch = first_batch(dm)
    assert batch["ids"] == ["34602", "34603"]
    assert batch["answers"] == ["dakota", "halt"]  # the most common human answer
    assert batch["all_answers"][0] == ["dakota"] * 8 + ["dakota digital"] * 2
    assert prompts_of(dm) == [
        # the question capitalised as in LLaVA-1.5's llava_textvqa_val_v051_ocr.jsonl
        f"<image>\nWhat is the brand of this camera?\nReference OCR token: dakota, digital\n{SHORT_ANSWER}",
        f"<image>\nWhat does the sign say?\nReference OCR token: \n{SHORT_ANSWER}",  # no OCR token: the line, empty
    ]
    metric = dm.make_metric()
    assert isinstance(metric, VQAAccuracy) and metric.rule == "textvqa"
    metric.update(["Dakota", "stop"], batch)  # 1.0 and 4 of 10 humans: min(1, 3/3 or 4/3) -> 1.0 in every subset
    assert metric.compute()["overall"].item() == pytest.approx(1.0)


def test_ocr_from_the_records_or_none(textvqa_files, first_batch, prompts_of):
    path = textvqa_files["questions"]
    content = json.loads(path.read_text())
    content["data"][0]["ocr_tokens"] = ["kodak"]
    content["data"][1]["ocr_tokens"] = []
    path.write_text(json.dumps(content))
    dm = TextVQADataModule(str(path), batch_size=2)
    first_batch(dm)
    assert "Reference OCR token: kodak\n" in prompts_of(dm)[0]
    plain = TextVQADataModule(str(path), use_ocr=False)
    first_batch(plain)
    assert all("OCR" not in prompt for prompt in prompts_of(plain))


def test_missing_ocr_tokens(textvqa_files):
    # TextVQA's own file has no OCR tokens (Hugging Face's copy of it lists none): the message names the file to add
    with pytest.raises(DataError, match=r"record id 34602 \(index 0\), field 'ocr_tokens': missing: .*give ocr_json the Rosetta file"):
        TextVQADataModule(str(textvqa_files["questions"])).setup("test")


def test_ocr_file_lacks_an_image(textvqa_files):
    path = textvqa_files["ocr"]
    content = json.loads(path.read_text())
    content["data"] = content["data"][:1]
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match="no OCR tokens for image '00ab2ed9f2c1de1a'") as error:
        TextVQADataModule(str(textvqa_files["questions"]), ocr_json=str(path)).setup("test")
    assert error.value.json_path == str(path)


def test_wrong_file(textvqa_files):
    wrong = textvqa_files["questions"].parent / "annotations.json"
    wrong.write_text(json.dumps({"annotations": []}))
    with pytest.raises(DataError, match="Rosetta OCR file: a JSON object with a 'data' list"):
        TextVQADataModule(str(textvqa_files["questions"]), ocr_json=str(wrong)).setup("test")
    path = textvqa_files["questions"]
    path.write_text(json.dumps({"questions": []}))
    with pytest.raises(DataError, match="TextVQA questions file"):
        TextVQADataModule(str(path), use_ocr=False).setup("test")


def _set_answers(path, answers):
    content = json.loads(path.read_text())
    content["data"][1]["answers"] = answers
    path.write_text(json.dumps(content))


@pytest.mark.parametrize("answers", [[], ["stop"] * 9], ids=["empty", "nine"])
def test_a_record_without_ten_answers_is_refused_when_read(textvqa_files, first_batch, answers):
    # not mid-test by the metric (TextVQA's evaluator scores against exactly ten), where no record is named
    path = textvqa_files["questions"]
    _set_answers(path, answers)
    with pytest.raises(DataError) as error:
        TextVQADataModule(str(path), use_ocr=False).setup("test")
    assert str(error.value).startswith(f"{path}, record id 34603 (index 1), field 'answers': expected 10 human answers")
    assert (error.value.json_path, error.value.field) == (str(path), "answers")
    first_batch(TextVQADataModule(str(path), use_ocr=False, batch_size=2), "predict")  # predict scores nothing


def test_answers_that_are_not_a_list_are_refused_for_predict_too(textvqa_files):
    path = textvqa_files["questions"]
    _set_answers(path, "stop")  # not read as the characters s, t, o, p
    with pytest.raises(DataError, match=r"record id 34603 \(index 1\), field 'answers': expected list, got str"):
        TextVQADataModule(str(path), use_ocr=False).setup("predict")


def _ask_again(path, question: str, answers: list[str]) -> None:
    """A third record: the first record's image, asked ``question`` again, with other answers."""
    content = json.loads(path.read_text())
    again = dict(content["data"][0], question_id=34604, question=question, answers=answers)
    content["data"].append(again)
    path.write_text(json.dumps(content))


@pytest.mark.parametrize("question", ["what is the brand of this camera?", "What is the BRAND of this camera?"])
def test_a_question_asked_twice_about_one_image_is_scored_as_llavas_eval_textvqa_does(textvqa_files, first_batch, question):
    """eval_textvqa.py looks the answers up by (image, lower-cased question): both copies get the last one's; the
    named option scores each against its own."""
    path = textvqa_files["questions"]
    _ask_again(path, question, ["canon"] * 10)
    llava = first_batch(TextVQADataModule(str(path), use_ocr=False, batch_size=3))
    assert llava["ids"] == ["34602", "34603", "34604"]
    assert llava["all_answers"][0] == llava["all_answers"][2] == ["canon"] * 10
    assert llava["answers"][0] == "canon"  # the reference follows the answers it is scored against
    metric = TextVQADataModule(str(path), use_ocr=False).make_metric()
    metric.update(["dakota", "halt", "dakota"], llava)
    assert metric.compute()["overall"].item() == pytest.approx(1 / 3)  # "dakota" is wrong twice, as LLaVA scores it
    own = first_batch(TextVQADataModule(str(path), use_ocr=False, batch_size=3, answers_by="question_id"))
    assert own["all_answers"][0] == ["dakota"] * 8 + ["dakota digital"] * 2 and own["all_answers"][2] == ["canon"] * 10
    assert own["answers"] == ["dakota", "halt", "canon"]


def test_another_question_about_the_same_image_keeps_its_answers(textvqa_files, first_batch):
    path = textvqa_files["questions"]
    _ask_again(path, "what color is the camera?", ["black"] * 10)
    batch = first_batch(TextVQADataModule(str(path), use_ocr=False, batch_size=3))
    assert batch["answers"] == ["dakota", "halt", "black"]


def test_answers_by_must_be_a_known_rule(textvqa_files):
    with pytest.raises(ValueError, match=r"answers_by='id' must be one of 'image_and_question', 'question_id'"):
        TextVQADataModule(str(textvqa_files["questions"]), answers_by="id")
