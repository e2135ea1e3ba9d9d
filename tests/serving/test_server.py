"""A real server process on 127.0.0.1, called over HTTP (openai client and httpx): answers equal
``AdaptiveMLLM.generate``'s, mixed budgets batch together, bad requests get their own 4xx."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from adaptive_mllm.serving.latency import Measurement, save_profile
from adaptive_mllm.serving.server import build_model
from tests.serving.conftest import write_tiny_recipe

REPO = Path(__file__).resolve().parents[2]
QUESTION = "What colour is the red circle ?"  # 7 words of the tiny vocabulary
OTHER = "How many shapes are there ?"  # a different question
MAX_PIXELS = 64 * 64
MAX_BYTES = 200_000  # the server then refuses bodies over 4/3 of this + 1 MiB unread
PAYLOAD_LIMIT = MAX_BYTES * 4 // 3 + 4 * 100_000 + 1024 * 1024  # + 4 x the default --max_text_chars
SERVED_NAME = "tiny-adaptive"


def _png(seed: int, size: int = 32) -> bytes:
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _messages(image_url: str, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path):
    """The tiny model (AdaLLaVA-L, random weights) saved as a checkpoint, served by a subprocess."""
    root = tmp_path_factory.mktemp("served")
    write_tiny_recipe(root / "recipe.yaml", tokenizer_dir, max_new_tokens=4)
    module = build_model(str(root / "recipe.yaml"), None, None, []).eval()
    torch.save({"state_dict": module.state_dict()}, root / "model.ckpt")
    images = root / "images"
    images.mkdir()
    (images / "a.png").write_bytes(_png(1))
    (root / "secret.png").write_bytes(_png(1))
    (images / "link.png").symlink_to(root / "secret.png")  # inside the folder, pointing out of it
    # a hand-made profile: prefill 5 + 0.01 BT + 0.5 bBT ms, decode 2 + 0.1 B + 1.0 bB ms per step
    rows = [
        Measurement(b, b, t, n, 5 + 0.01 * n * t + 0.5 * b * n * t, 2 + 0.1 * n + 1.0 * b * n)
        for b in (1.0, 0.5) for t in (20, 60) for n in (1, 4)
    ]  # fmt: skip
    profile = save_profile(root / "profile.json", rows, {"device": "test", "dtype": "float32", "torch": "", "grid": {}})
    port = _free_port()
    command = [
        sys.executable, "-c", "import sys; from adaptive_mllm.serving import serve; serve(sys.argv[1:])",
        "--config", str(root / "recipe.yaml"), "--ckpt_path", str(root / "model.ckpt"), "--profile", str(profile),
        "--port", str(port), "--image_dir", str(images), "--max_image_pixels", str(MAX_PIXELS),
        "--max_image_bytes", str(MAX_BYTES), "--max_batch_size", "3", "--batch_timeout", "1.0", "--margin", "0.1",
        "--served_model_name", SERVED_NAME,
    ]  # fmt: skip
    process = _start_server(command, root)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(base, process, root / "server.log")
        yield {"base": base, "module": module, "images": images, "root": root}
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and the workers it spawned
        process.wait(timeout=30)


def _start_server(command: list[str], root: Path, **env_vars: str) -> subprocess.Popen:
    """The server in its own process group, logging to root/server.log, with SIGINT at its default (as in a
    terminal; a shell's background job would start with it ignored)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env_vars}
    with open(root / "server.log", "w") as log:
        return subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_default_sigint)  # fmt: skip


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_until_healthy(base: str, process: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _expected(module, image: bytes, text: str, budget: float) -> str:
    """``AdaptiveMLLM.generate`` on a batch built the way the data pipeline builds one (LLaVA's
    "<image>\\n" + question, the backbone's template and image preprocessing)."""
    processor = module.backbone.input_processor()
    ids = processor.chat_template.encode_prompt(
        [f"<image>\n{text}"], [], processor.tokenizer, processor.image_token_id, processor.num_image_tokens
    )
    pixels = processor.preprocess_image(Image.open(io.BytesIO(image)).convert("RGB"))
    batch = {
        "prompt_ids": torch.tensor([ids]),
        "prompt_attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": pixels[None],
    }
    return module.generate(batch, budget)["answers"][0]


def _post(base: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=timeout)


def test_answers_like_generate_through_the_openai_client(served):
    from openai import OpenAI

    client = OpenAI(base_url=f"{served['base']}/v1", api_key="unused", timeout=120, max_retries=0)
    assert [model.id for model in client.models.list()] == [SERVED_NAME]  # what a client lists on connecting
    image = _png(7)
    for budget in (1.0, 0.6):
        reply = client.chat.completions.create(model="tiny", messages=_messages(_data_url(image), QUESTION), extra_body={"budget": budget})
        assert reply.choices[0].message.content == _expected(served["module"], image, QUESTION, budget)
        assert reply.model == SERVED_NAME
        extra = reply.model_dump()["adaptive"]
        assert extra["budget"] == budget and extra["requested"] == "budget"
        # 3 scheduled layers of equal cost: 1.0 runs all 3, 0.6 runs 1 (the prefix layer and LM head take the rest)
        assert extra["units"] == (3.0 if budget == 1.0 else 1.0)
        assert extra["measured_ms"] > 0 and extra["predicted_ms"] > 0
    # the client's max_tokens caps the answer (OpenAI's field, sent by the client as it is)
    full = client.chat.completions.create(model="tiny", messages=_messages(_data_url(image), QUESTION), extra_body={"budget": 1.0})
    capped = client.chat.completions.create(
        model="tiny", messages=_messages(_data_url(image), QUESTION), max_tokens=1, extra_body={"budget": 1.0}
    )
    assert capped.usage.completion_tokens == min(1, full.usage.completion_tokens)
    assert full.choices[0].message.content.startswith(capped.choices[0].message.content)
    assert capped.choices[0].finish_reason == ("length" if full.usage.completion_tokens >= 1 else "stop")


def test_mixed_budgets_in_one_batch_answer_as_each_alone(served):
    # LitServe's 1 s window to fill a batch opens when the worker starts collecting, not at a request: an idle
    # worker opens one after another, and three requests could straddle two. One request first: the next window
    # opens as its batch ends, and the three sent then fall in it
    assert _post(served["base"], {"messages": _messages(_data_url(_png(10)), QUESTION), "budget": 1.0}).status_code == 200
    cases = [(_png(11), QUESTION, 1.0), (_png(12), OTHER, 0.3), (_png(13), QUESTION, 0.6)]
    with ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(lambda c: _post(served["base"], {"messages": _messages(_data_url(c[0]), c[1]), "budget": c[2]}), cases))
    queued = []
    for (image, text, budget), reply in zip(cases, replies, strict=True):
        assert reply.status_code == 200, reply.text
        body = reply.json()
        queued.append(body["adaptive"]["queued_ms"])
        assert body["adaptive"]["batch_size"] == 3  # one engine call for all three
        assert body["adaptive"]["budget"] == budget
        assert body["choices"][0]["message"]["content"] == _expected(served["module"], image, text, budget)
    assert min(queued) >= 0 and max(queued) > 0  # the first waited for the others (the worker saw its arrival time)


def test_deadlines_become_budgets_and_an_unmeetable_one_is_flagged(served):
    image = _data_url(_png(3))
    generous = _post(served["base"], {"messages": _messages(image, QUESTION), "deadline_ms": 1e7}).json()["adaptive"]
    assert generous["budget"] == 1.0 and generous["requested"] == "deadline" and generous["deadline_feasible"]
    # the smallest budget alone is predicted at >= 5 ms of prefill; 1 ms cannot be met
    tight = _post(served["base"], {"messages": _messages(image, QUESTION), "deadline_ms": 1}).json()["adaptive"]
    assert tight["deadline_feasible"] is False
    assert tight["units"] == 0.0 and tight["budget"] < 0.5  # the smallest admissible budget: prefix layer + LM head


def _disconnect_mid_request(base: str, body: dict) -> None:
    """Two clients that go away: one in the middle of its body, one while its answer is computed."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 5000\r\n\r\n{\"messages\": [")  # fmt: skip
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)  # fmt: skip


def test_bad_requests_interleaved_with_good_ones(served):
    base, images = served["base"], served["images"]
    good_image = (images / "a.png").read_bytes()
    expected = _expected(served["module"], good_image, QUESTION, 0.6)
    good = {"messages": _messages(_data_url(good_image), QUESTION), "budget": 0.6}
    ok = lambda image_url: {"messages": _messages(image_url, QUESTION)}  # noqa: E731
    huge = io.BytesIO()
    Image.new("RGB", (65, 65)).save(huge, "PNG")  # 4225 pixels > 64 * 64
    long_text = " ".join(["shape"] * 300)
    bad = [
        ("malformed JSON", b"{\"messages\": [", 422, "JSON decode error"),
        ("missing image", {"messages": [{"role": "user", "content": QUESTION}]}, 400, "no image"),
        ("non-image bytes", ok("data:image/png;base64," + base64.b64encode(b"not an image at all").decode()), 400, "not a readable image"),
        ("bad base64", ok("data:image/png;base64,%%%"), 400, "invalid base64"),
        ("huge image", ok(_data_url(huge.getvalue())), 413, "65x65 pixels"),
        ("path outside the folder", ok(str(served["root"] / "secret.png")), 403, "outside the allowed image folder"),
        ("dot-dot path", ok("../secret.png"), 403, "outside the allowed image folder"),
        ("symlink out of the folder", ok("link.png"), 403, "outside the allowed image folder"),
        ("image over the byte limit", ok(_data_url(b"x" * (MAX_BYTES + 10))), 413, f"larger than {MAX_BYTES} bytes"),
        ("text over --max_text_chars", {"messages": _messages(_data_url(good_image), "x " * 60_000)}, 413, "120000 characters"),
        ("body over the payload limit", {"messages": _messages(_data_url(good_image), "x" * 2_000_000)}, 413,
         f"more than this server's payload limit of {PAYLOAD_LIMIT} bytes"),
        ("remote URL", ok("http://example.com/a.png"), 400, "nothing is fetched"),
        ("prompt too long", {"messages": _messages(_data_url(good_image), long_text)}, 400, "maximum length 256"),
        ("budget above 1", {**good, "budget": 1.5}, 400, "budget 1.5 is outside [0, 1]"),
        ("budget not a number", {**good, "budget": "high"}, 400, "must be a finite number"),
        ("zero deadline", {"messages": good["messages"], "deadline_ms": 0}, 400, "deadline_ms 0 must be > 0"),
        ("negative deadline", {"messages": good["messages"], "deadline_ms": -5}, 400, "deadline_ms -5 must be > 0"),
        ("both", {**good, "deadline_ms": 100}, 400, "either `budget` or `deadline_ms`"),
        ("unknown field", {**good, "n": 2}, 400, "unknown field(s) ['n']"),
        ("streaming", {**good, "stream": True}, 400, "streaming is not supported"),
        ("system turn", {"messages": [{"role": "system", "content": "x"}, *good["messages"]]}, 400, "expected 'user'"),
        ("not an object", [1, 2], 422, "dict"),
    ]

    def send(body: dict | bytes) -> httpx.Response:
        if isinstance(body, bytes):
            return httpx.post(f"{base}/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=120)
        return _post(base, body)

    # each bad request is sent with two good ones at once: three fill the server's batch (no wait for its 1 s
    # timeout), and a bad request that reaches the worker shares their batch
    with ThreadPoolExecutor(3) as pool:
        for name, body, status, message in bad:
            if name == "unknown field":
                _disconnect_mid_request(base, good)
            reply, *answers = pool.map(send, [body, good, good])
            assert reply.status_code == status, (name, reply.text)
            assert message in reply.text, (name, reply.text)
            for answer in answers:
                assert answer.status_code == 200, (name, answer.text)
                assert answer.json()["choices"][0]["message"]["content"] == expected, name
        # a path inside the allowed folder is read, relative or absolute
        urls = ("a.png", str(images / "a.png"), f"file://{images / 'a.png'}")
        for reply in pool.map(lambda url: _post(base, {"messages": _messages(url, QUESTION), "budget": 0.6}), urls):
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"] == expected


def test_health_and_metrics(served):
    assert httpx.get(f"{served['base']}/health", timeout=10).text == "ok"
    _post(served["base"], {"messages": _messages(_data_url(_png(5)), QUESTION), "budget": 2})  # rejected
    before = httpx.get(f"{served['base']}/metrics", timeout=10).json()
    image = _data_url(_png(5))
    _post(served["base"], {"messages": _messages(image, QUESTION), "deadline_ms": 1e7})  # met
    _post(served["base"], {"messages": _messages(image, QUESTION), "deadline_ms": 1})  # missed
    metrics = httpx.get(f"{served['base']}/metrics", timeout=10).json()
    # the HTTP server's middleware timed them end to end: one of the two deadlines met
    assert metrics["server_deadline_requests"] - before["server_deadline_requests"] == 2
    assert metrics["server_deadline_met"] - before["server_deadline_met"] == 1
    assert metrics["outside_worker_ms"] > 0  # reading and writing HTTP takes some time
    assert metrics["rejected"] >= 1 and metrics["answered"] >= 1
    kinds = ("answered", "rejected", "timed_out", "failed", "disconnected")
    assert metrics["requests"] == sum(metrics[kind] for kind in kinds)
    # clients gone before their reply (one mid-body, one while its answer is computed) got nothing: not answered
    before = metrics
    _disconnect_mid_request(served["base"], {"messages": _messages(image, QUESTION), "budget": 1.0})
    deadline = time.monotonic() + 30
    while metrics["disconnected"] - before["disconnected"] < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        metrics = httpx.get(f"{served['base']}/metrics", timeout=10).json()
    assert {kind: metrics[kind] - before[kind] for kind in kinds} == {
        "answered": 0, "rejected": 0, "timed_out": 0, "failed": 0, "disconnected": 2}  # fmt: skip
    # refused by the HTTP layer, never seen by the worker: counted too
    before = metrics
    malformed = httpx.post(f"{served['base']}/v1/chat/completions", content=b"{bad", headers={"content-type": "application/json"}, timeout=60)
    too_large = _post(served["base"], {"messages": _messages(image, "x" * 2_000_000)})
    assert (malformed.status_code, too_large.status_code) == (422, 413)
    metrics = httpx.get(f"{served['base']}/metrics", timeout=10).json()
    assert (metrics["requests"] - before["requests"], metrics["rejected"] - before["rejected"]) == (2, 2)
    assert metrics["answered"] == before["answered"]
    assert metrics["batches"] <= metrics["answered"] + metrics["disconnected"]  # the worker answered those too
    assert json.dumps(metrics)  # plain JSON


def test_command_line_errors_name_the_problem(
    tmp_path: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    from adaptive_mllm.serving import serve, server

    monkeypatch.setattr(server, "make_server", _refuse_to_start)  # nothing here may start a server

    for flags, message in [
        (["--pinned_budget", "1.5"], "--pinned_budget 1.5 must be in [0, 1]"),
        (["--margin", "-0.1"], "--margin -0.1 must be a finite number >= 0"),
        (["--margin", "nan"], "--margin nan must be a finite number >= 0"),  # NaN gave every deadline the smallest budget
        (["--margin", "inf"], "--margin inf must be a finite number >= 0"),
        (["--image_dir", str(tmp_path / "no-such-folder")], f"--image_dir {tmp_path / 'no-such-folder'} does not exist"),
        (["--image_dir", __file__], f"--image_dir {__file__} is not a directory"),
        (["--max_batch_size", "0"], "--max_batch_size 0 must be >= 1"),
        (["--prepare_threads", "-1"], "--prepare_threads -1 must be >= 0"),
        (["--served_model_name", " "], "--served_model_name must not be empty"),
        (["--export_dir", str(tmp_path), "--model.max_new_tokens=4"], "--export_dir takes no recipe flags"),
    ]:  # refused before anything is loaded, not on every request
        with pytest.raises(SystemExit) as exit_info:
            serve(["--config", "recipe.yaml", *flags])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err

    with pytest.raises(SystemExit, match="--profile .*missing.json does not exist"):
        serve(["--config", "recipe.yaml", "--profile", str(tmp_path / "missing.json")])
    with pytest.raises(ValueError, match="give --export_dir, or --config"):
        build_model(None, None, None, [])
    with pytest.raises(SystemExit) as exit_info:
        serve([])
    assert exit_info.value.code == 2 and "give --export_dir, or --config" in capsys.readouterr().err

    # model files a worker would fail to load are named alone, before the server starts (not under LitServe's
    # worker traceback and "One or more workers failed to start")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "backbone.json").write_text("{not json")
    (tmp_path / "recipe.yaml").write_text("model: {}\n")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    for flags, message in [
        (["--export_dir", str(tmp_path / "wrong")], r"--export_dir: export directory .*wrong does not exist"),
        (["--export_dir", str(tmp_path / "empty")], r"--export_dir: .*empty/backbone\.json is missing"),
        (["--export_dir", str(tmp_path / "broken")], r"--export_dir: .*broken/backbone\.json: not valid JSON"),
        (["--config", str(tmp_path / "missing.yaml")], r"--config .*missing\.yaml does not exist"),
        (["--config", str(tmp_path / "recipe.yaml"), "--ckpt_path", str(tmp_path / "nope.ckpt")],
         r"--ckpt_path: checkpoint .*nope\.ckpt: no such file"),
        (["--config", str(tmp_path / "recipe.yaml"), "--ckpt_path", str(tmp_path / "empty.ckpt")],
         r"--ckpt_path: checkpoint .*empty\.ckpt: the file is empty"),
    ]:
        with pytest.raises(SystemExit, match=message) as exit_info:
            serve(flags)
        assert "\n" not in str(exit_info.value.code)
    write_tiny_recipe(tmp_path / "recipe.yaml", tokenizer_dir)
    with pytest.raises(_Started):  # files that pass go on to the server
        serve(["--config", str(tmp_path / "recipe.yaml")])
    with pytest.raises(_Started):  # an image folder that is there too
        serve(["--config", str(tmp_path / "recipe.yaml"), "--image_dir", str(tmp_path / "empty")])
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:  # the worker failed on it, naming the driver
        serve(["--config", str(tmp_path / "recipe.yaml"), "--device", "cuda"])
    assert exit_info.value.code == 2 and "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--prepare-threads", "0"], ["--model.budgt=0.5"], ["--bogus_flag", "3"]])
def test_an_unknown_or_mistyped_flag_is_refused_before_the_server_starts(
    tmp_path: Path, tokenizer_dir: Path, flags: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """Such a flag reached the recipe parser in the worker only: the worker exited, and the server waited for it
    forever."""
    from adaptive_mllm.serving import serve, server

    monkeypatch.setattr(server, "make_server", _refuse_to_start)
    write_tiny_recipe(tmp_path / "recipe.yaml", tokenizer_dir)
    with pytest.raises(SystemExit) as exit_info:
        serve(["--config", str(tmp_path / "recipe.yaml"), *flags])
    assert exit_info.value.code == 2 and flags[0].split("=")[0] in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "problem"),
    [("not json", "not JSON"), ('{"format": 1}', "measurements"), ("[1]", "a JSON object"), ('{"format": 2}', "format 2"),
     ('{"format": 1, "measurements": [{"budget": 1.0, "flops_fraction": 1.0, "prompt_tokens": 20, "batch_size": 1, '
      '"prefill_ms": -100, "decode_ms_per_token": 1.0}]}', "measurements[0].prefill_ms -100 must be > 0")],
)
def test_a_bad_profile_is_named_in_one_line_before_the_server_starts(
    tmp_path: Path, tokenizer_dir: Path, text: str, problem: str, monkeypatch: pytest.MonkeyPatch
):
    from adaptive_mllm.serving import serve, server

    monkeypatch.setattr(server, "make_server", _refuse_to_start)
    write_tiny_recipe(tmp_path / "recipe.yaml", tokenizer_dir)
    (tmp_path / "profile.json").write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        serve(["--config", str(tmp_path / "recipe.yaml"), "--profile", str(tmp_path / "profile.json")])
    message = str(exit_info.value.code)
    assert message.startswith("--profile") and str(tmp_path / "profile.json") in message and problem in message, message
    assert "\n" not in message


class _Started(Exception):
    """The arguments got past every check, to make_server."""


def _refuse_to_start(*_: object) -> None:
    raise _Started


def test_sigterm_to_the_server_stops_its_workers_too(tmp_path: Path, tokenizer_dir: Path):
    """kill / docker stop signal the main process only: its worker processes must not outlive it (they kept
    answering /health)."""
    write_tiny_recipe(tmp_path / "recipe.yaml", tokenizer_dir, max_new_tokens=4)
    port = _free_port()
    command = [sys.executable, "-c", "import sys; from adaptive_mllm.serving import serve; serve(sys.argv[1:])",
               "--config", str(tmp_path / "recipe.yaml"), "--port", str(port)]
    # the server's temporary folder (tempfile reads TMPDIR); a short path: multiprocessing puts its sockets there, and
    # a socket path over 107 bytes (a long pytest folder) stops the server's start
    temporary = Path(tempfile.mkdtemp(prefix="serve-"))
    process = _start_server(command, tmp_path, TMPDIR=str(temporary))
    try:
        _wait_until_healthy(f"http://127.0.0.1:{port}", process, tmp_path / "server.log")
        made = list(temporary.glob("adaptive-mllm-*"))
        assert len(made) == 1 and (made[0] / "metrics.json").is_file()  # no --metrics_path: the counts go there
        process.send_signal(signal.SIGTERM)  # the main process only, not its group
        process.wait(timeout=60)
        deadline = time.monotonic() + 30
        while _group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _group_alive(process.pid), "worker processes outlived the server"
        log = (tmp_path / "server.log").read_text()
        assert "Traceback" not in log, log[-2000:]  # the workers inherited the handler and printed theirs
        assert not made[0].exists(), "the server left its temporary metrics folder behind"  # every start left one
    finally:
        if _group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
        shutil.rmtree(temporary, ignore_errors=True)


@pytest.mark.parametrize("stop", ["returns", "second signal"])
def test_the_metrics_folder_the_server_made_is_removed_when_it_stops(
    tmp_path: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch, stop: str
):
    """Without --metrics_path every start left a tempfile folder with metrics.json in /tmp; a --metrics_path given is
    the user's, and kept. (No server runs here: LitServer.run is replaced; a real one is stopped in the test above.)"""
    import signal as signals

    from adaptive_mllm.serving import serve
    from adaptive_mllm.serving.lifecycle import DeadlineServer

    write_tiny_recipe(tmp_path / "recipe.yaml", tokenizer_dir, max_new_tokens=4)
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    monkeypatch.setattr(signals, "signal", lambda *args: None)  # serve installs its handlers in this test process
    seen: list[Path] = []

    def run(self: DeadlineServer, **kwargs) -> None:
        seen.append(self.own_metrics_dir)
        assert self.own_metrics_dir is not None and self.own_metrics_dir.is_dir()
        if stop == "second signal":
            raise KeyboardInterrupt

    monkeypatch.setattr(DeadlineServer, "run", run)
    flags = ["--config", str(tmp_path / "recipe.yaml"), "--port", str(_free_port())]
    if stop == "second signal":
        with pytest.raises(SystemExit) as error:
            serve(flags)
        assert error.value.code == 130
    else:
        serve(flags)
    assert len(seen) == 1 and seen[0].parent == temporary and not seen[0].exists()
    assert list(temporary.iterdir()) == []
    given = tmp_path / "counts" / "metrics.json"
    given.parent.mkdir()
    given.write_text("{}")
    monkeypatch.setattr(DeadlineServer, "run", lambda self, **kwargs: None)
    serve([*flags, "--metrics_path", str(given)])
    assert given.is_file()  # the user's path: kept


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _tiny_server(root: Path, tokenizer_dir: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """A server of the tiny model (random weights), healthy, and its base URL."""
    write_tiny_recipe(root / "recipe.yaml", tokenizer_dir, max_new_tokens=4)
    port = _free_port()
    command = [sys.executable, "-c", "import sys; from adaptive_mllm.serving import serve; serve(sys.argv[1:])",
               "--config", str(root / "recipe.yaml"), "--port", str(port), *flags]  # fmt: skip
    process = _start_server(command, root)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(base, process, root / "server.log")
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return process, base


def _outcome(base: str, body: dict) -> str:
    try:
        reply = _post(base, body, timeout=60)
    except httpx.HTTPError as error:
        return type(error).__name__
    return str(reply.status_code) if reply.status_code == 200 else f"{reply.status_code} {reply.text[:100]}"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_whole_process_group_answers_the_requests_in_flight(tmp_path: Path, tokenizer_dir: Path, signum):
    """Ctrl+C (SIGINT to the terminal's process group) and ``kill -- -PGID`` (systemd's default) reached the worker
    and the queue Manager too: the requests in flight hung for 30 s and got no answer, or a 500 with a traceback.
    Now the main process alone acts, as on its own SIGTERM: those requests are answered, then everything exits."""
    # a batch waits 3 s to fill: requests sent 1.5 s before the signal are in the worker when it comes (0.4 s of
    # 1 s was too little for the third on a loaded machine: it was not yet sent and got a reset connection)
    process, base = _tiny_server(tmp_path, tokenizer_dir, "--max_batch_size", "8", "--batch_timeout", "3.0")
    body = {"messages": _messages(_data_url(_png(4)), QUESTION), "budget": 1.0}
    try:
        with ThreadPoolExecutor(4) as pool:
            in_flight = [pool.submit(_outcome, base, body) for _ in range(3)]
            time.sleep(1.5)
            signalled = time.monotonic()
            os.killpg(process.pid, signum)
            time.sleep(0.3)
            late = pool.submit(_outcome, base, body)  # after the signal: refused, not kept waiting
            assert [future.result() for future in in_flight] == ["200"] * 3
            assert late.result() != "200"
        assert process.wait(timeout=30) == 0
        while _group_alive(process.pid) and time.monotonic() - signalled < 30:
            time.sleep(0.2)
        assert time.monotonic() - signalled < 20, "the shutdown waited out uvicorn's 30 s graceful timeout"
        log = (tmp_path / "server.log").read_text()
        assert "Traceback" not in log and "died" not in log, log[-3000:]
    finally:
        if _group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)


def _http_pid(log: Path, main_pid: int) -> int:
    pid = int(re.search(r"Started server process \[(\d+)\]", log.read_text()).group(1))
    assert pid != main_pid
    return pid


def _worker_pid(log: Path, main_pid: int) -> int:
    children = [int(path.parent.name) for path in Path("/proc").glob("[0-9]*/stat") if _parent(path) == main_pid]
    (worker,) = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return worker


@pytest.mark.parametrize(
    ("find", "said"),
    [(_http_pid, "the HTTP server process LitServer-0 exited"), (_worker_pid, "the inference worker process")],
    ids=["http process", "worker"],
)
def test_the_server_exits_when_a_process_of_its_dies(tmp_path: Path, tokenizer_dir: Path, find, said):
    """LitServe watched its inference workers (through a thread that raced the queue Manager's shutdown) but not
    its HTTP process: when that died, the main process, the Manager and the worker stayed up holding the port,
    /health hung, and a supervisor saw nothing to restart. One watch now covers both."""
    process, _ = _tiny_server(tmp_path, tokenizer_dir)
    try:
        os.kill(find(tmp_path / "server.log", process.pid), signal.SIGKILL)
        assert process.wait(timeout=30) == 1
        deadline = time.monotonic() + 20
        while _group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_alive(process.pid), "a process of the server outlived it"
        log = (tmp_path / "server.log").read_text()
        assert said in log and "exited (exit code -9) while serving" in log, log[-3000:]
    finally:
        if _group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)


def _parent(stat: Path) -> int | None:
    try:
        return int(stat.read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def test_a_body_that_is_not_json_gets_the_documented_error(served):
    """An image uploaded as the body (octet-stream, multipart) is not UTF-8: FastAPI's 422 handler failed echoing
    it (a plain-text 500 and a traceback), and /metrics did not count it. The 422 now has the error format of
    every other refusal and echoes nothing of the body."""
    image = (served["images"] / "a.png").read_bytes()
    url = f"{served['base']}/v1/chat/completions"
    before = httpx.get(f"{served['base']}/metrics", timeout=10).json()
    replies = [
        httpx.post(url, content=image, headers={"content-type": "application/octet-stream"}, timeout=60),
        httpx.post(url, files={"file": ("a.png", image, "image/png")}, timeout=60),
        httpx.post(url, content=json.dumps({"messages": _messages(_data_url(image), QUESTION)}), headers={"content-type": "text/plain"}, timeout=60),
    ]  # fmt: skip
    for reply in replies:
        assert reply.status_code == 422, reply.text
        error = reply.json()["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", "body")
        assert "must be a JSON object" in error["message"] and "application/json" in error["message"]
        assert base64.b64encode(image).decode()[:40] not in reply.text and "PNG" not in reply.text  # not echoed
    metrics = httpx.get(f"{served['base']}/metrics", timeout=10).json()
    assert (metrics["requests"] - before["requests"], metrics["rejected"] - before["rejected"]) == (3, 3)
    assert metrics["failed"] == before["failed"]


def _raw_reply(base: str, head: bytes, body: bytes, seconds: float = 20) -> tuple[bytes, dict]:
    """Send a request's head and the start of its body over a socket; the status line and the JSON reply."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=seconds) as sock:
        sock.sendall(head + body)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < int(
            re.search(rb"content-length: (\d+)", reply, re.IGNORECASE).group(1)
        ):
            chunk = sock.recv(65536)
            assert chunk, reply
            reply += chunk
    status, _, rest = reply.partition(b"\r\n")
    return status, json.loads(rest.partition(b"\r\n\r\n")[2])


def test_a_body_over_the_payload_limit_is_refused_at_once_from_its_length(served):
    """The docs say a body over the payload limit is refused unread (413), but LitServe counts the bytes as they arrive:
    a client declaring more than the limit and sending a few bytes waited for --timeout (60 s) and got a 504. Its
    Content-Length now refuses it at once; a body sent without one (chunked) is refused as it outgrows the limit,
    in the same error format (LitServe's was FastAPI's {"detail": "Payload too large"})."""
    base = served["base"]
    before = httpx.get(f"{base}/metrics", timeout=10).json()
    for declared in (999_999_999, PAYLOAD_LIMIT + 1):
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {declared}\r\n\r\n".encode())  # fmt: skip
        start = time.monotonic()
        status, reply = _raw_reply(base, head, b'{"messages": [')  # socket timeout (20 s) before the fix
        assert status.startswith(b"HTTP/1.1 413") and time.monotonic() - start < 10, status
        assert (reply["error"]["param"], reply["error"]["type"]) == ("body", "invalid_request_error"), reply
        assert f"the body is {declared} bytes (its Content-Length), more than this server's payload limit of {PAYLOAD_LIMIT} bytes" in (
            reply["error"]["message"]
        )
    chunked = httpx.post(f"{base}/v1/chat/completions", content=iter([b'{"messages": "' + b"x" * 1_000_000] * 2),
                         headers={"content-type": "application/json"}, timeout=60)  # fmt: skip
    assert chunked.status_code == 413 and chunked.json()["error"] == {
        "message": f"body: the body is larger than this server's payload limit of {PAYLOAD_LIMIT} bytes",
        "type": "invalid_request_error", "param": "body"}  # fmt: skip
    metrics = httpx.get(f"{base}/metrics", timeout=10).json()
    assert (metrics["requests"] - before["requests"], metrics["rejected"] - before["rejected"]) == (3, 3)


@pytest.mark.parametrize(
    ("body", "reason"),
    [(b'{"messages": "\xff\xfe"}', "not UTF-8"), (b'{"budget": 1' + b"0" * 5000 + b"}", "4,300 digits"),
     (b"[" * 100_000 + b"]" * 100_000, "nested too deeply")],
    ids=["not UTF-8", "a huge integer", "deep nesting"],
)  # fmt: skip
def test_json_the_parser_refuses_gets_the_error_format_of_every_refusal(served, body: bytes, reason: str):
    """FastAPI answers a body its JSON parser fails on (not a JSON decode error) with {"detail": "There was an error
    parsing the body"}; the server's other refusals are OpenAI's error objects naming the field."""
    reply = httpx.post(f"{served['base']}/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "body") and reason in error["message"], error
    assert "must be a JSON object" in error["message"] and "000000" not in reply.text
