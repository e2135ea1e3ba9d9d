"""Request parsing: a huge text is refused before it is tokenized."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from adaptive_mllm.serving.requests import RequestError, RequestLimits, parse_chat_request
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
