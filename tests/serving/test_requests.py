"""Request parsing: a huge text is refused before it is tokenized; an image read ahead gives the same
request, and its error is reported where reading it would have failed."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import EpsImagePlugin, Image

from adaptive_mllm.serving.requests import (
    SHOWN_CHARS,
    RequestError,
    RequestLimits,
    parse_chat_request,
    read_request_image,
)
from adaptive_mllm.serving.server import build_model
from tests.serving.conftest import write_tiny_recipe


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path):
    recipe = write_tiny_recipe(tmp_path_factory.mktemp("requests") / "recipe.yaml", tokenizer_dir)
    return build_model(str(recipe), None, None, []).backbone.input_processor()


def _body(text: str) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": text}]}]}  # fmt: skip


def test_a_huge_text_is_refused_before_tokenizing(processor, monkeypatch: pytest.MonkeyPatch):
    limits = RequestLimits(max_text_chars=1000)
    calls = []
    template = type(processor.chat_template)
    encode_prompt = template.encode_prompt
    monkeypatch.setattr(template, "encode_prompt", lambda *args: calls.append(1) or encode_prompt(*args))
    with pytest.raises(RequestError) as refused:
        parse_chat_request(_body("a " * 500 + "!"), processor, 4, limits)  # 1,001 characters
    assert (refused.value.status, refused.value.field) == (413, "messages") and "1001 characters" in refused.value.message
    assert calls == []  # never tokenized
    # at the limit the text is tokenized, and its token count refuses it (max_length 256)
    with pytest.raises(RequestError, match="exceeds the model's maximum length") as too_long:
        parse_chat_request(_body("a " * 500), processor, 4, limits)
    assert too_long.value.status == 400 and calls == [1]
    assert parse_chat_request(_body("What colour is the circle ?"), processor, 4, limits).prompt_ids


def test_an_image_read_ahead_gives_the_same_request(processor):
    body, limits = _body("What colour is the circle ?"), RequestLimits()
    pixels = read_request_image(body, processor, limits)
    assert isinstance(pixels, torch.Tensor)
    ahead = parse_chat_request(body, processor, 4, limits, pixels)
    assert ahead.pixel_values is pixels  # used as given, not read again
    here = parse_chat_request(body, processor, 4, limits)
    assert ahead.prompt_ids == here.prompt_ids
    assert torch.equal(ahead.pixel_values, here.pixel_values)


def test_an_unreadable_image_read_ahead_is_reported_after_the_checks_before_it(processor):
    body = _body("What colour is the circle ?")
    not_png = "data:image/png;base64," + base64.b64encode(b"not a png").decode()
    body["messages"][0]["content"][0]["image_url"]["url"] = not_png
    limits = RequestLimits()
    error = read_request_image(body, processor, limits)
    assert isinstance(error, RequestError) and error.status == 400 and "not a readable image" in error.message
    with pytest.raises(RequestError, match="not a readable image"):
        parse_chat_request(body, processor, 4, limits, error)
    # a budget out of range is checked first, as when the image is read during parsing
    with pytest.raises(RequestError, match="outside") as refused:
        parse_chat_request({**body, "budget": 2.0}, processor, 4, limits, error)
    assert refused.value.field == "budget"


@pytest.mark.parametrize(
    "body",
    [[1, 2], {"messages": "hello"}, {"messages": [{"role": "user", "content": "no image"}]}],
    ids=["not an object", "messages not a list", "no image"],
)
def test_a_body_naming_no_image_is_left_to_the_parser(processor, body):
    assert read_request_image(body, processor, RequestLimits()) is None
    with pytest.raises(RequestError):
        parse_chat_request(body, processor, 4, RequestLimits(), None)


def test_a_huge_text_is_not_worth_reading_its_image(processor):
    assert read_request_image(_body("a " * 600), processor, RequestLimits(max_text_chars=1000)) is None


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"max_tokens": 0}, "max_tokens", "whole number >= 1"),
        ({"max_tokens": 1.5}, "max_tokens", "whole number >= 1"),
        ({"max_tokens": True}, "max_tokens", "whole number >= 1"),
        ({"max_completion_tokens": 5}, "max_completion_tokens", "more than this server's 4 tokens per answer"),
        ({"max_tokens": 2, "max_completion_tokens": 3}, "max_tokens", "differ"),
    ],
)
def test_a_bad_max_tokens_is_refused_naming_the_field(processor, fields, field, message):
    with pytest.raises(RequestError, match=message) as refused:
        parse_chat_request({**_body("What colour is the circle ?"), **fields}, processor, 4, RequestLimits())
    assert (refused.value.status, refused.value.field) == (400, field)


@pytest.mark.parametrize("fields", [{"max_tokens": 2}, {"max_completion_tokens": 2}, {"max_tokens": 2, "max_completion_tokens": 2}])
def test_max_tokens_under_either_name(processor, fields):
    assert parse_chat_request({**_body("What colour is the circle ?"), **fields}, processor, 4, RequestLimits()).max_tokens == 2
    assert parse_chat_request(_body("What colour is the circle ?"), processor, 4, RequestLimits()).max_tokens is None


def test_the_length_check_counts_the_requests_own_answer_cap(processor):
    """A prompt that leaves room for a 1-token answer but not the model's 4 is refused without max_tokens and
    served with max_tokens 1 (prompt + latency token + answer within max_length 256)."""
    limits = RequestLimits()

    def refused(body: dict) -> bool:
        try:
            parse_chat_request(body, processor, 4, limits)
        except RequestError as error:
            assert "with the answer's 4 tokens it exceeds the model's maximum length 256" in error.message
            return True
        return False

    body = next(_body("a " * words) for words in range(150, 260) if refused(_body("a " * words)))
    capped = parse_chat_request({**body, "max_tokens": 1}, processor, 4, limits)
    assert len(capped.prompt_ids) + 1 + 1 <= processor.max_length < len(capped.prompt_ids) + 1 + 4
    with pytest.raises(RequestError, match="answer's 4 tokens"):
        parse_chat_request({**body, "max_tokens": 4}, processor, 4, limits)


@pytest.mark.parametrize("latency_token", [True, False])
def test_a_prompt_and_answer_may_fill_the_maximum_length_with_the_latency_token_only_where_there_is_one(processor, latency_token):
    """A model that inserts no latency token (no scheduler, or a baseline reading none) was refused an answer that
    fits: the parser counted the token for every model."""
    limits = RequestLimits()
    body = _body("What colour is the circle ?")
    prompt = len(parse_chat_request(body, processor, 1, limits).prompt_ids)
    room = processor.max_length - prompt - int(latency_token)
    assert parse_chat_request(body, processor, room, limits, latency_token=latency_token).prompt_ids
    with pytest.raises(RequestError, match=f"with the answer's {room + 1} tokens it exceeds the model's maximum length"):
        parse_chat_request(body, processor, room + 1, limits, latency_token=latency_token)


def _with_url(url: str) -> dict:
    body = _body("What colour is the circle ?")
    body["messages"][0]["content"][0]["image_url"]["url"] = url
    return body


def _truncated_ihdr_png() -> bytes:
    """A PNG whose header chunk is 4 bytes, not 13: PIL's decoder raises ValueError, not OSError."""
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 4) + b"IHDR\0\0\0\x10" + struct.pack(">I", zlib.crc32(b"IHDR\0\0\0\x10"))


def test_an_image_over_pillows_own_pixel_limit_is_a_413_as_any_image_over_the_limit(processor):
    """A 20000 x 20000 PNG header (400M pixels): Pillow refuses it inside ``Image.open`` (DecompressionBombError),
    before the server's own size check; it was a 400 "not a readable image" where every other image too large is a
    413."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    error = read_request_image(_with_url(url), processor, RequestLimits())
    assert isinstance(error, RequestError) and error.status == 413, error
    assert "longest side may be at most 4096" in error.message and "more pixels than Pillow reads" in error.message


def test_paths_and_images_that_break_the_libraries_are_this_requests_400(processor, tmp_path: Path):
    """A symlink loop, a name too long for the file system, a decoder that raises an unusual error: each is
    refused as a bad request (a raise here failed the whole batch with 500s)."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "loop_a").symlink_to("loop_b")
    (images / "loop_b").symlink_to("loop_a")
    limits = RequestLimits(image_dir=str(images))
    png = "data:image/png;base64," + base64.b64encode(_truncated_ihdr_png()).decode()
    for url, message in [("loop_a", "cannot read it"), ("a" * 300, "cannot read it"), (png, "not a readable image (ValueError")]:
        error = read_request_image(_with_url(url), processor, limits)
        assert isinstance(error, RequestError) and error.status == 400 and message in error.message, (url[:20], error)
        with pytest.raises(RequestError, match=re.escape(message)):
            parse_chat_request(_with_url(url), processor, 4, limits)


def test_a_symlink_loop_answers_as_any_path_inside_or_outside_the_folder(processor, tmp_path: Path):
    """``Path.resolve`` raised a RuntimeError naming the absolute path for a loop: its text was the 400's (the server's
    folder shown), a loop outside the folder was a 400 where any other outside path is a 403, and after a loop it
    resolved no further links: ``loop_a/../out/secret.png`` passed as a path inside the folder and was read through
    the link ``out`` leading outside."""
    images, outside = tmp_path / "images", tmp_path / "outside"
    images.mkdir()
    outside.mkdir()
    (images / "loop_a").symlink_to("loop_b")
    (images / "loop_b").symlink_to("loop_a")
    (outside / "loop_c").symlink_to("loop_d")
    (outside / "loop_d").symlink_to("loop_c")
    Image.new("RGB", (16, 16), "red").save(outside / "secret.png")
    (images / "out").symlink_to(outside)
    limits = RequestLimits(image_dir=str(images))
    for url, status, message in [
        ("loop_a", 400, "loop_a: cannot read it in the allowed image folder (Too many levels of symbolic links)"),
        ("loop_a/x.png", 400, "loop_a/x.png: cannot read it in the allowed image folder"),
        (str(images / "loop_b"), 400, "cannot read it in the allowed image folder"),
        (str(outside / "loop_c"), 403, "is outside the allowed image folder"),
        ("out/loop_c", 403, "out/loop_c is outside the allowed image folder"),
        ("../outside/loop_d/x.png", 403, "is outside the allowed image folder"),
        ("loop_a/../out/secret.png", 400, "cannot read it in the allowed image folder"),
        ("out/secret.png", 403, "is outside the allowed image folder"),
    ]:
        error = read_request_image(_with_url(url), processor, limits)
        assert isinstance(error, RequestError), (url, error)  # never the pixels of outside/secret.png
        assert (error.status, error.field) == (status, "messages[0].content.image_url") and message in error.message, (url, error)
        if not Path(url).is_absolute():
            assert str(tmp_path) not in error.message, error.message  # no server path the client did not send


def test_only_the_image_formats_openai_accepts_are_decoded(processor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Pillow decoded any format it knows: EPS by running Ghostscript on the client's PostScript (whatever type the
    data URL declared). Only PNG, JPEG, WEBP and GIF are decoded; another format is refused naming it and the
    accepted ones, its decoder never run."""
    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: ran.append(args) or Image.new("RGB", (8, 8)))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"
    images = tmp_path / "images"
    images.mkdir()
    limits = RequestLimits(image_dir=str(images))
    refused = {"EPS": eps}
    for kind in ("BMP", "TIFF", "PPM", "TGA"):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), "red").save(buffer, kind)
        refused[kind] = buffer.getvalue()
    (images / "a.bmp").write_bytes(refused["BMP"])
    urls = {kind: "data:image/png;base64," + base64.b64encode(data).decode() for kind, data in refused.items()}
    for kind, url in [*urls.items(), ("BMP", "a.bmp")]:
        error = read_request_image(_with_url(url), processor, limits)
        assert isinstance(error, RequestError) and (error.status, error.field) == (400, "messages[0].content.image_url"), kind
        assert "PNG, JPEG, WEBP or GIF" in error.message and "Ghostscript" not in error.message, (kind, error.message)
        if kind != "TGA":  # TGA has no signature: not named, refused all the same
            assert f"an image in {kind} format" in error.message, error.message
    assert ran == []
    for kind in ("PNG", "JPEG", "WEBP", "GIF"):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), "red").save(buffer, kind)
        url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()  # the bytes decide, not the label
        assert isinstance(read_request_image(_with_url(url), processor, limits), torch.Tensor), kind


def test_a_data_url_scheme_in_any_case_is_a_data_url(processor, tmp_path: Path):
    """``DATA:image/png;base64,...`` was read as a file name (URL schemes are case-insensitive, RFC 3986), and the
    whole base64 came back in the "no such file" error."""
    url = _png_url(16, 16)
    payload = url.partition(",")[2]
    for variant in (url, "DATA:image/png;base64," + payload, "Data:image/PNG;BASE64," + payload):
        assert isinstance(read_request_image(_with_url(variant), processor, RequestLimits()), torch.Tensor), variant[:30]


def test_errors_show_at_most_a_short_prefix_of_what_the_client_sent(processor, tmp_path: Path):
    """A base64 image sent as a path was echoed whole in "no such file" (megabytes); so were a long unknown field's name,
    a long role or budget string."""
    images = tmp_path / "images"
    images.mkdir()
    limits = RequestLimits(image_dir=str(images))
    long = "iVBORw0KGgo" + "A" * 50_000
    body = _body("What colour is the circle ?")
    cases = [
        _with_url(long),
        _with_url(f"{long}/../../x.png"),
        _with_url(f"file://{long}/a.png"),
        _with_url(f"{long}://host/a.png"),
        {**body, "budget": long},
        {**body, "deadline_ms": [long] * 1000},
        {**body, "temperature": {long: long}},
        {**body, "max_tokens": 10**4000},
        {**body, long: 1},
        {"messages": [{"role": long, "content": "x"}]},
    ]
    for index, request in enumerate(cases):
        with pytest.raises(RequestError) as refused:
            parse_chat_request(request, processor, 4, limits)
        text = json.dumps(refused.value.body())
        assert "A" * (SHOWN_CHARS + 1) not in text and len(text) < 1000, (index, text[:300])


def test_more_turns_than_the_model_takes_tokens_are_refused_before_templating(processor, monkeypatch: pytest.MonkeyPatch):
    """100,000 empty turns passed the text limit (their content has no characters) and were templated and tokenized
    in the model's worker for over a second. Each turn takes at least one token (its role), so more turns than the
    model's maximum length are refused first, before a turn or the image is looked at."""
    calls = []
    template = type(processor.chat_template)
    encode_prompt = template.encode_prompt
    monkeypatch.setattr(template, "encode_prompt", lambda *args: calls.append(1) or encode_prompt(*args))
    turns = processor.max_length + 1  # odd: the last is a user turn
    body = _body("What colour is the circle ?")
    body["messages"] += [{"role": "assistant" if index % 2 == 0 else "user", "content": ""} for index in range(turns - 1)]
    assert read_request_image(body, processor, RequestLimits()) is None  # not worth reading its image
    with pytest.raises(RequestError) as refused:
        parse_chat_request(body, processor, 4, RequestLimits())
    assert (refused.value.status, refused.value.field) == (400, "messages")
    assert f"{turns} turns; at most {processor.max_length} fit" in refused.value.message
    assert calls == []  # never templated or tokenized
    body["messages"] = body["messages"][:-2]  # at the limit the turns are looked at: the token count refuses them
    with pytest.raises(RequestError, match="exceeds the model's maximum length"):
        parse_chat_request(body, processor, 4, RequestLimits())
    assert calls == [1]


def test_a_file_name_with_a_colon_is_a_path_and_only_scheme_urls_are_urls(processor, tmp_path: Path):
    """``shot-10:15:00.png`` was refused as a URL of scheme ``shot-10``: only ``scheme://`` forms (and ``data:``)
    are URLs; ``file://`` reads the path, every other scheme is refused (nothing is fetched)."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 16), "red").save(images / "shot-10:15:00.png")
    limits = RequestLimits(image_dir=str(images))
    for url in ("shot-10:15:00.png", "./shot-10:15:00.png", str(images / "shot-10:15:00.png"),
                f"file://{images}/shot-10%3A15%3A00.png", f"FILE://{images}/shot-10:15:00.png"):  # fmt: skip
        assert isinstance(read_request_image(_with_url(url), processor, limits), torch.Tensor), url
    for url in ("http://example.com/a.png", "HTTPS://example.com/a.png", "s3://bucket/a.png", "ftp://host/a.png"):
        error = read_request_image(_with_url(url), processor, limits)
        assert isinstance(error, RequestError) and error.status == 400 and "nothing is fetched" in error.message, url
    error = read_request_image(_with_url("mailto:me@example.com"), processor, limits)  # a path, and no such file
    assert isinstance(error, RequestError) and error.status == 400 and "no such file" in error.message


def _png_url(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    ("width", "height", "max_pixels"),
    [(1, 100_000, None), (100_000, 1, None), (5000, 1000, None), (1, 21, 64 * 64), (65, 10, 64 * 64)],
)
def test_an_image_that_preprocessing_would_blow_up_is_refused_before_decoding(processor, width: int, height: int, max_pixels):
    """A 1 x 100000 PNG is 471 bytes and 100,000 pixels, but CLIP's resize sets its short side to the tower's
    size (64 x 6.4M pixels) and pad_to_square first builds a 100000^2 canvas: refused by its header."""
    limits = RequestLimits() if max_pixels is None else RequestLimits(max_image_pixels=max_pixels)  # 64 x 64: no side above 64

    def not_decoded(image: Image.Image) -> torch.Tensor:
        raise AssertionError("the image was decoded")

    refusing = dataclasses.replace(processor, preprocess_image=not_decoded)
    error = read_request_image(_with_url(_png_url(width, height)), refusing, limits)
    assert isinstance(error, RequestError), error
    assert (error.status, error.field) == (413, "messages[0].content.image_url") and f"{width}x{height}" in error.message


@pytest.mark.parametrize(("width", "height"), [(1, 20), (64, 64), (64, 4)])
def test_an_image_within_the_side_and_aspect_limits_is_read_as_before(processor, width: int, height: int):
    url = _png_url(width, height)
    pixels = read_request_image(_with_url(url), processor, RequestLimits(max_image_pixels=64 * 64))
    expected = processor.preprocess_image(Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))).convert("RGB"))
    assert isinstance(pixels, torch.Tensor) and torch.equal(pixels, expected)


@pytest.mark.parametrize("field", ["budget", "deadline_ms"])
def test_a_huge_integer_budget_or_deadline_is_a_400_naming_the_field(processor, field: str):
    with pytest.raises(RequestError) as refused:
        parse_chat_request({**_body("What colour is the circle ?"), field: 10**400}, processor, 4, RequestLimits())
    assert (refused.value.status, refused.value.field) == (400, field) and "finite number" in refused.value.message


def test_an_unreadable_image_is_named_not_shown_as_a_memory_buffer(processor, tmp_path: Path):
    """PIL's "cannot identify image file <_io.BytesIO object at 0x7f...>" reached the client: the file is named."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "notes.png").write_text("not an image")
    truncated = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(truncated, format="PNG")
    (images / "cut.png").write_bytes(truncated.getvalue()[:60])
    limits = RequestLimits(image_dir=str(images))
    junk = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
    for url, expected in [
        ("notes.png", "notes.png: not a readable image (UnidentifiedImageError: cannot identify image file 'notes.png'); "
                      "images are read in PNG, JPEG, WEBP or GIF format"),
        ("cut.png", "cut.png: not a readable image ("),
        (junk, "not a readable image (UnidentifiedImageError: cannot identify image file in the data URL)"),
    ]:
        with pytest.raises(RequestError) as refused:
            parse_chat_request(_with_url(url), processor, 4, limits)
        assert refused.value.message.startswith(expected) and "BytesIO" not in refused.value.message, refused.value.message
        assert refused.value.field == "messages[0].content.image_url" and refused.value.status == 400


def test_a_file_url_with_a_host_is_refused_naming_the_field(processor, tmp_path: Path):
    """``file://a.png`` read ``a.png`` as a host and its empty path as the image folder: "no such file" where the docs
    said 403; and the host of any file:// URL was dropped (``file://evil.example.com/<folder>/a.png`` read the local
    file). A host other than localhost is now a 400 saying file:// takes an absolute path."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 16), "red").save(images / "a.png")
    limits = RequestLimits(image_dir=str(images))
    for url in ("file://a.png", f"file://evil.example.com{images}/a.png", f"file://localhost:80{images}/a.png"):
        error = read_request_image(_with_url(url), processor, limits)
        assert isinstance(error, RequestError) and (error.status, error.field) == (400, "messages[0].content.image_url"), url
        assert "file:// URL takes an absolute path, file:///path" in error.message and "was read as a host" in error.message
        assert error.body()["error"]["message"].startswith("messages[0].content.image_url: "), error.body()
        with pytest.raises(RequestError, match="was read as a host"):
            parse_chat_request(_with_url(url), processor, 4, limits)
    for url in (f"file://{images}/a.png", f"file://localhost{images}/a.png", f"file://LOCALHOST{images}/a.png"):
        assert isinstance(read_request_image(_with_url(url), processor, limits), torch.Tensor), url


@pytest.mark.parametrize("temperature", [False, True])
def test_a_boolean_temperature_is_refused(processor, temperature: bool):
    """``temperature: false`` was served as greedy (False == 0 in Python); budget and deadline_ms refuse booleans."""
    with pytest.raises(RequestError) as refused:
        parse_chat_request({**_body("What colour is the circle ?"), "temperature": temperature}, processor, 4, RequestLimits())
    assert (refused.value.status, refused.value.field) == (400, "temperature")
    for greedy in (0, 0.0, None):
        assert parse_chat_request({**_body("What colour is the circle ?"), "temperature": greedy}, processor, 4, RequestLimits())
