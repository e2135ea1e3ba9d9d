"""`adaptive-mllm ask`: each budget's answer is the one ``AdaptiveMLLM.generate`` gives the same prompt alone,
and bad input is one clear line naming the option."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from adaptive_mllm.ask import main
from adaptive_mllm.cli import main as cli_main
from adaptive_mllm.serving.server import build_model
from tests.serving.conftest import write_tiny_recipe

QUESTION = "How many shapes are there ?"


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return write_tiny_recipe(tmp_path_factory.mktemp("generate") / "recipe.yaml", tokenizer_dir, max_new_tokens=4)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "shapes.png"
    pixels = (torch.rand(40, 56, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()
    Image.fromarray(pixels).save(path)
    return path


def _alone(recipe: Path, image: Path, budget: float) -> dict:
    """The module's own generate on the prompt built by hand from the template: the independent answer."""
    return _generate(build_model(str(recipe), None, None, []).eval(), image, budget)


def _generate(module, image: Path, budget: float = 1.0) -> dict:
    backbone = module.backbone
    ids = backbone.chat_template.encode_prompt(
        [f"<image>\n{QUESTION}"], [], backbone.tokenizer, backbone.image_token_id, backbone.num_image_tokens
    )
    batch = {"prompt_ids": torch.tensor([ids]), "prompt_attention_mask": torch.ones(1, len(ids), dtype=torch.long),
             "pixel_values": backbone.preprocess_image(Image.open(image))[None]}
    with torch.no_grad():
        return module.generate(batch, budget)


def test_each_budget_is_answered_as_generate_answers_it_alone(recipe, image, capsys):
    rows = main(["--config", str(recipe), "--image", str(image), "--question", QUESTION, "--budgets", "1.0", "0.6", "0.4"])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("budget")]
    assert len(rows) == len(printed) == 3
    for row, line in zip(rows, printed, strict=True):
        expected = _alone(recipe, image, row["requested_budget"])
        assert row["answer"] == expected["answers"][0] and line.endswith(row["answer"])
        assert row["units"] == expected["units_per_example"][0] and row["budget"] == row["requested_budget"]
        assert row["flops_fraction"] == pytest.approx(expected["flops_fractions"][0])
        assert row["ms"] > 0
    assert rows[0]["flops_fraction"] > rows[1]["flops_fraction"] > rows[2]["flops_fraction"]


def test_an_image_whose_name_has_a_colon_is_read(recipe, image, capsys):
    """``shot-10:15:00.png`` was refused: its name went to the request parser as a URL of scheme ``shot-10``."""
    timestamped = image.rename(image.with_name("shot-10:15:00.png"))
    rows = main(["--config", str(recipe), "--image", str(timestamped), "--question", QUESTION, "--json"])
    assert rows[0]["answer"] == _alone(recipe, timestamped, 1.0)["answers"][0]


def test_a_budget_below_the_smallest_runs_at_the_smallest_and_says_so(recipe, image, capsys):
    flops = "--model.scheduler.init_args.budget_rule=flops"  # the release's rule admits every budget in [0, 1]
    rows = main(["--config", str(recipe), "--image", str(image), "--question", QUESTION, "--budgets", "0", "--json", flops])
    assert rows[0]["requested_budget"] == 0.0 and rows[0]["budget"] > 0.0  # the prefix layer and the LM head
    assert rows[0]["units"] == 0
    assert '"requested_budget": 0.0' in capsys.readouterr().out
    main(["--config", str(recipe), "--image", str(image), "--question", QUESTION, "--budgets", "0", flops])
    assert "(asked 0: below this prompt's smallest)" in capsys.readouterr().out
    rows = main(["--config", str(recipe), "--image", str(image), "--question", QUESTION, "--budgets", "0", "--json"])
    assert rows[0]["budget"] == 0.25 and rows[0]["units"] == 0  # release: 0 units, at what they cost (1 layer of 4)


def test_the_subcommand_is_on_the_command_line(recipe, image, capsys):
    cli_main(["ask", "--config", str(recipe), "--image", str(image), "--question", QUESTION])
    assert capsys.readouterr().out.startswith("budget 1  units ")


def test_bad_input_is_one_line_naming_the_option(recipe, image, tmp_path, capsys):
    common = ["--config", str(recipe), "--question", QUESTION]
    with pytest.raises(SystemExit, match=r"--image .*missing.png: no such file"):
        main([*common, "--image", str(tmp_path / "missing.png")])
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(SystemExit, match=r"--image .*notes.png: not a readable image \(UnidentifiedImageError"):
        main([*common, "--image", str(tmp_path / "notes.png")])
    with pytest.raises(SystemExit, match=r"--question: the prompt is \d+ tokens .* exceeds the model's maximum length"):
        main(["--config", str(recipe), "--image", str(image), "--question", "shapes " * 400])
    with pytest.raises(SystemExit) as error:
        main([*common, "--image", str(image), "--budgets", "1.5"])
    assert error.value.code == 2 and "--budgets: 1.5 is outside [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"--question: leave <image> out"):
        main(["--config", str(recipe), "--image", str(image), "--question", f"<image>\n{QUESTION}"])
    with pytest.raises(SystemExit, match=r"--config .*nowhere.yaml does not exist"):
        main(["--config", str(tmp_path / "nowhere.yaml"), "--image", str(image), "--question", QUESTION])


def test_a_deadline_is_answered_at_the_budget_serve_would_pick(recipe, image, tmp_path, capsys):
    """A hand-made profile (time grows with the budget): each deadline runs at the largest budget the latency model
    predicts in time for this prompt at the answer's full length; one too short for any runs at the smallest."""
    from adaptive_mllm.serving.latency import LatencyModel, Measurement, save_profile

    rows = [Measurement(b, b, t, 1, 1.0 + 0.5 * b * t, 0.1 + 2.0 * b) for b in (1.0, 0.5) for t in (10, 40)]
    profile = save_profile(tmp_path / "profile.json", rows, {"device": "test", "dtype": "float32", "torch": "", "grid": {}})
    deadlines = ["30", "12", "0.5"]  # the tiny prompt is about a dozen tokens: about 16 ms at budget 1.0 with the margin
    answered = main(["--config", str(recipe), "--image", str(image), "--question", QUESTION, "--profile", str(profile),
                     "--deadline_ms", *deadlines])
    module = build_model(str(recipe), None, None, [])
    backbone = module.backbone
    ids = backbone.chat_template.encode_prompt([f"<image>\n{QUESTION}"], [], backbone.tokenizer, backbone.image_token_id,
                                               backbone.num_image_tokens)
    prompt = len(ids) + 1  # + the latency token
    minimum = module.scheduler.cost.min_budget(prompt)
    latency = LatencyModel.load(profile, 0.2)
    for row, deadline in zip(answered, deadlines, strict=True):
        choice = latency.budget_for_deadline(float(deadline), prompt, module.max_new_tokens, 1, minimum)
        assert (row["deadline_ms"], row["budget"], row["feasible"]) == (float(deadline), choice.budget, choice.met)
        assert row["answer"] == _alone(recipe, image, choice.budget)["answers"][0]
    assert answered[0]["budget"] > answered[1]["budget"] > answered[2]["budget"] == minimum and not answered[2]["feasible"]
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("deadline")]
    assert printed[2].startswith("deadline 0.5 ms -> budget") and "predicted to miss even at the smallest budget" in printed[2]
    with pytest.raises(SystemExit) as error:
        main(["--config", str(recipe), "--image", str(image), "--question", QUESTION, "--deadline_ms", "20"])
    assert error.value.code == 2 and "--deadline_ms needs --profile" in capsys.readouterr().err


def test_max_new_tokens_may_raise_the_models_own(recipe, image):
    """The recipe says 4 tokens; asked for 12, the answer may run to 12 (an export's limit is not fixed either)."""
    rows = main(["--config", str(recipe), "--image", str(image), "--question", QUESTION, "--max_new_tokens", "12"])
    module = build_model(str(recipe), None, None, []).eval()
    module.max_new_tokens = 12
    expected = _generate(module, image)["answers"][0]
    assert rows[0]["answer"] == expected and len(module.backbone.tokenizer(expected)["input_ids"]) > 4


@pytest.mark.parametrize(("overrides", "latency_token"), [([], 1), (["--model.scheduler=null"], 0)])
def test_the_longest_answer_that_fits_counts_the_latency_token_only_where_the_model_inserts_one(recipe, image, overrides, latency_token):
    """ask counted a latency token for every model: one without a scheduler was refused an answer that fits, and
    told one token fewer fit than do."""
    from adaptive_mllm.ask import encode_question

    model = build_model(str(recipe), None, None, overrides)
    model.max_new_tokens = 10_000  # as main raises it to --max_new_tokens
    prompt = len(encode_question(model, image, QUESTION, 1).prompt_ids)
    room = model.backbone.max_length - prompt - latency_token
    assert encode_question(model, image, QUESTION, room).max_tokens == room
    with pytest.raises(SystemExit, match=rf"^--max_new_tokens {room + 1}: the prompt is {prompt} tokens; .*\(at most {room} fit\)$"):
        encode_question(model, image, QUESTION, room + 1)


def test_a_model_without_a_scheduler_answers_whole_and_refuses_other_budgets(recipe, image, capsys):
    rows = main(["--config", str(recipe), "--model.scheduler=null", "--image", str(image), "--question", QUESTION])
    assert rows[0]["budget"] == 1.0 and rows[0]["flops_fraction"] == 1.0
    assert "units" not in capsys.readouterr().out.splitlines()[-1]  # a full model has no units to count
    with pytest.raises(SystemExit, match="this model has no scheduler, it always runs whole"):
        main(["--config", str(recipe), "--model.scheduler=null", "--image", str(image), "--question", QUESTION, "--budgets", "0.5"])


def test_bad_options_are_named_each_for_what_is_wrong(recipe, image, tmp_path, capsys, monkeypatch):
    """Each of these was reported against another option, or named none."""
    common = ["--config", str(recipe), "--question", QUESTION]
    # the answer's length, not the question, is what does not fit
    with pytest.raises(SystemExit) as error:
        main([*common, "--image", str(image), "--max_new_tokens", "100000"])
    message = str(error.value.code)
    assert message.startswith("--max_new_tokens 100000: the prompt is ") and "exceeds the model's maximum length" in message
    assert "--question" not in message
    with pytest.raises(SystemExit, match=r"--question: the prompt is \d+ tokens"):  # a question too long even so
        main([*common[:2], "--question", "shapes " * 400, "--image", str(image), "--max_new_tokens", "2"])
    # a folder is not "no such file"
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(SystemExit, match=r"--image .*folder.png is a directory; name an image file"):
        main([*common, "--image", str(tmp_path / "folder.png")])
    # an unreadable image names the file, not PIL's in-memory buffer
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(SystemExit) as error:
        main([*common, "--image", str(tmp_path / "notes.png")])
    message = str(error.value.code)
    notes = str((tmp_path / "notes.png").resolve())
    assert message == (f"--image {notes}: not a readable image (UnidentifiedImageError: cannot identify image file {notes!r}); "
                       "images are read in PNG, JPEG, WEBP or GIF format")
    # CUDA asked for where there is none: said before the model loads, naming --device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(SystemExit) as error:
            main([*common, "--image", str(image), "--device", device])
        assert error.value.code == 2 and f"--device {device}: CUDA is not available on this machine" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:
        main([*common, "--image", str(image), "--device", "gpu"])
    assert error.value.code == 2 and "--device gpu: not a device" in capsys.readouterr().err


@pytest.mark.parametrize("question", ["", "  \n"])
def test_an_empty_question_is_refused(recipe, image, question, capsys):
    """``--question "$Q"`` with Q unset was answered (the image alone, unasked) without a word."""
    with pytest.raises(SystemExit) as error:
        main(["--config", str(recipe), "--image", str(image), "--question", question])
    assert error.value.code == 2 and "--question: empty; ask a question about the image" in capsys.readouterr().err


@pytest.mark.parametrize("margin", ["nan", "inf", "-0.1"])
def test_a_margin_that_is_not_a_finite_number_at_least_0_is_refused(recipe, image, tmp_path, margin, capsys):
    """``--margin nan`` was accepted: every deadline then ran at the smallest budget, flagged unmeetable."""
    with pytest.raises(SystemExit) as error:
        main(["--config", str(recipe), "--image", str(image), "--question", QUESTION, "--profile", str(tmp_path / "p.json"),
              "--deadline_ms", "50", "--margin", margin])  # fmt: skip
    assert error.value.code == 2 and f"--margin {float(margin)} must be a finite number >= 0" in capsys.readouterr().err


def test_threads_are_set_as_serve_and_profile_set_them(recipe, image, capsys, monkeypatch):
    """``ask`` had no --threads (an unrecognized argument): on a shared CPU its times, and its deadline verdicts, were
    torch's default threads' while the profile and the server ran with the threads given to them."""
    from adaptive_mllm import ask

    before = torch.get_num_threads()
    seen = []
    generate = ask.answer
    monkeypatch.setattr(ask, "answer", lambda *args: seen.append(torch.get_num_threads()) or generate(*args))
    try:
        rows = main(["--config", str(recipe), "--image", str(image), "--question", QUESTION, "--threads", "1"])
        assert rows[0]["answer"] == _alone(recipe, image, 1.0)["answers"][0]
        assert seen and set(seen) == {1}  # every call, warm-up and timed, with the threads asked for
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit) as error:
        main(["--config", str(recipe), "--image", str(image), "--question", QUESTION, "--threads", "0"])
    assert error.value.code == 2 and "--threads 0 must be >= 1" in capsys.readouterr().err
