"""MME loader on its stand-in: both folder shapes of the release, pairs of questions per image."""

from __future__ import annotations

import pytest

from adaptive_mllm.data import DataError
from adaptive_mllm.data.benchmarks import SHORT_ANSWER, MMEDataModule
from adaptive_mllm.metrics import MMEScore


def test_reads_the_release_folder(mme_files, first_batch, prompts_of):
    dm = MMEDataModule(str(mme_files["root"]), batch_size=8)
    batch = first_batch(dm)
    assert batch["ids"] == [
        "existence/000000006040/0", "existence/000000006040/1", "existence/000000018918/0", "existence/000000018918/1",
        "artwork/10002/0", "artwork/10002/1", "code_reasoning/0020/0", "code_reasoning/0020/1",
    ]  # fmt: skip
    assert batch["answers"] == ["Yes", "No"] * 4
    assert batch["image_id"][:3] == ["000000006040", "000000006040", "000000018918"]
    assert batch["pixel_values"].shape == (8, 3, 64, 64)
    # MME's own "Please answer yes or no." gives way to LLaVA-1.5's instruction (llava_mme.jsonl)
    assert prompts_of(dm)[4] == f"<image>\nDoes this artwork exist in the form of painting?\n{SHORT_ANSWER}"
    assert prompts_of(dm)[0] == f"<image>\nIs there a circle in this image?\n{SHORT_ANSWER}"
    assert prompts_of(dm)[7] == f"<image>\nIs the output of the code 'World'?\n{SHORT_ANSWER}"
    assert dm.question_kinds("test") == ["artwork", "code_reasoning", "existence"]


def test_without_an_instruction_the_question_is_mme_s_own(mme_files, first_batch, prompts_of):
    dm = MMEDataModule(str(mme_files["root"]), prompt_suffix="", batch_size=8)
    first_batch(dm)
    assert prompts_of(dm)[4] == "<image>\nDoes this artwork exist in the form of painting? Please answer yes or no."


def test_metric_pairs_questions_by_image(mme_files, first_batch):
    dm = MMEDataModule(str(mme_files["root"]), batch_size=8)
    batch = first_batch(dm)
    metric = dm.make_metric()
    assert isinstance(metric, MMEScore)
    # existence: image 1 both right, image 2 one right -> acc 3/4, acc+ 1/2: 125; artwork: both right: 200;
    # code_reasoning: "maybe" unparsable (wrong), second right -> acc 1/2, acc+ 0: 50
    metric.update(["Yes", "No", "yes.", "Yes", "Yes, it is.", "no", "maybe", "No"], batch)
    scores = metric.compute()
    assert scores["existence"].item() == pytest.approx(125.0)
    assert scores["artwork"].item() == pytest.approx(200.0)
    assert scores["code_reasoning"].item() == pytest.approx(50.0)
    assert scores["perception"].item() == pytest.approx(325.0) and scores["overall"].item() == pytest.approx(325.0)
    assert scores["cognition"].item() == pytest.approx(50.0) and scores["unparsable"].item() == 1


def test_chosen_subtask_missing(mme_files):
    with pytest.raises(DataError, match="subtask folder 'OCR' not found"):
        MMEDataModule(str(mme_files["root"]), subtasks=["OCR"]).setup("test")
    with pytest.raises(ValueError, match="unknown MME subtasks"):
        MMEDataModule(str(mme_files["root"]), subtasks=["colour"])


def test_bad_answer_line(mme_files):
    path = mme_files["root"] / "existence" / "000000018918.txt"
    path.write_text("Is there a circle in this image? Please answer yes or no.\tPerhaps\n")
    with pytest.raises(DataError, match=r"record id 'existence/000000018918/0' \(index 0\), field 'answer': expected Yes or No") as error:
        MMEDataModule(str(mme_files["root"])).setup("test")
    assert error.value.json_path == str(path)


def test_question_without_image(mme_files):
    (mme_files["root"] / "artwork" / "images" / "10002.jpg").unlink()
    with pytest.raises(DataError, match="no image 10002.jpg"):
        MMEDataModule(str(mme_files["root"])).setup("test")


def test_not_an_mme_folder(tmp_path):
    with pytest.raises(DataError, match="no MME subtask folder"):
        MMEDataModule(str(tmp_path)).setup("test")


@pytest.mark.parametrize("escape", ["question file", "subtask folder"])
def test_a_symlink_out_of_the_mme_folder_is_refused(mme_files, tmp_path, escape):
    """A question file (or a whole subtask folder) linked from outside would be read, and its text shown in
    answers and errors: refused as images are, naming the file."""
    import shutil

    root = mme_files["root"]
    outside = tmp_path / "outside"
    outside.mkdir()
    if escape == "question file":
        (outside / "private.txt").write_text("Is SECRET red ?\tYes\n")
        target = root / "existence" / "000000006040.txt"
        target.unlink()
        target.symlink_to(outside / "private.txt")
    else:
        shutil.move(root / "code_reasoning", outside / "code_reasoning")
        (root / "code_reasoning").symlink_to(outside / "code_reasoning")
    with pytest.raises(DataError, match="outside the image folder") as refused:
        MMEDataModule(str(root)).setup("test")
    assert "SECRET" not in str(refused.value)


def test_a_subtask_named_twice_is_refused(mme_files):
    with pytest.raises(ValueError, match="subtasks must be distinct"):
        MMEDataModule(str(mme_files["root"]), subtasks=["existence", "artwork", "existence"])


def test_missing_subtask_folders_are_named_unless_a_subset_is_asked(mme_files):
    """A partial unzip or a misnamed folder (`ocr`) scored perception over fewer subtasks, silently, as if it were MME's."""
    from adaptive_mllm.metrics.mme import MME_PERCEPTION

    root = mme_files["root"]
    present = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    (root / "ocr").mkdir()
    with pytest.warns(UserWarning, match=r"MME subtask folders \[.*'OCR'.*\] are missing \(folders here that are no MME "
                      r"subtask: \['ocr'\]; misnamed\?\): perception \(the overall score\) is summed over \d of "
                      rf"{len(MME_PERCEPTION)} subtasks .*not comparable .*--data.init_args.subtasks"):  # fmt: skip
        MMEDataModule(str(root)).setup("test")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        MMEDataModule(str(root), subtasks=present).setup("test")  # a subset on purpose: nothing to say
