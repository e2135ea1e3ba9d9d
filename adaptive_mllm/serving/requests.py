"""Parsing and validating an OpenAI-style chat request: text turns, one image, a budget or a deadline.

Every problem becomes a :class:`RequestError` (an HTTP 4xx status, a message, the offending field), so
the server answers it and keeps serving. Images come as a base64 ``data:`` URL or as a file path inside
the one folder the operator allows; nothing else on disk is readable, and nothing is fetched remotely.
"""

from __future__ import annotations

import base64
import binascii
import errno
import io
import math
import os
import re
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import torch
from PIL import Image, UnidentifiedImageError

from adaptive_mllm.backbones.base import InputProcessor
from adaptive_mllm.backbones.templates import IMAGE_PLACEHOLDER, ConversationError

# The longest side of an accepted image over its shortest. CLIP's resize sets the short side to the tower's size
# S and scales the long one, so the resized image is at most S x S * MAX_ASPECT_RATIO (336 x 6720 for LLaVA's
# tower); a 1 x 100000 strip would become 336 x 33.6M.
MAX_ASPECT_RATIO = 20
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")  # RFC 3986's scheme
# The image formats OpenAI's API accepts, the only ones decoded: Pillow reads dozens more, EPS by running Ghostscript
# (a subprocess with a history of sandbox escapes) on the client's PostScript, and rarely used decoders besides
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
# At most this many characters of a value the client sent appear in an error (a base64 image sent as a path was
# echoed whole, megabytes of it)
SHOWN_CHARS = 60
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = _SHOWN.maxlong = SHOWN_CHARS
_SHOWN.maxlist = _SHOWN.maxdict = _SHOWN.maxtuple = 4
_SHOWN.maxlevel = 2
KNOWN_FIELDS = frozenset(
    {"model", "messages", "budget", "deadline_ms", "stream", "temperature", "user", "max_tokens", "max_completion_tokens"}
)


class RequestError(Exception):
    """A bad request: ``status`` (400 bad input, 403 forbidden path, 413 too large), message, field."""

    def __init__(self, status: int, message: str, field: str) -> None:
        super().__init__(f"{field}: {message}")
        self.status = status
        self.message = message
        self.field = field

    def body(self) -> dict[str, Any]:
        """The OpenAI error object."""
        return {"error": {"message": f"{self.field}: {self.message}", "type": "invalid_request_error", "param": self.field}}


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """A client's string as an error message shows it: its first ``limit`` characters, and its length if longer."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def shown_repr(value: Any) -> str:
    """``repr`` of a client's JSON value, cut to about ``SHOWN_CHARS`` characters at a bounded cost (a 10 MB string or
    a long list is never rendered whole)."""
    return _SHOWN.repr(value)


@dataclass(frozen=True)
class RequestLimits:
    """What the operator allows.

    Args:
        image_dir: the only folder image paths may point into; None = paths refused (data URLs only).
        max_image_bytes: largest encoded image (base64-decoded or file size).
        max_image_pixels: largest square the image fits in (longest side squared), checked before the pixels are
            decoded: LLaVA's ``pad_to_square`` builds that square before resizing. The long side may also be at
            most ``MAX_ASPECT_RATIO`` times the short one (the resize scales the short side up to the tower's).
        max_text_chars: most characters of text over all turns, checked before tokenizing (the token
            limit, the model's maximum length, is checked after; the number of turns, which the characters do not
            count, is refused over that length before either).
        strict: unknown top-level fields are an error (else ignored).
    """

    image_dir: str | None = None
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_text_chars: int = 100_000
    strict: bool = True


@dataclass
class ChatRequest:
    """A valid request, encoded for the model."""

    prompt_ids: list[int]
    pixel_values: torch.Tensor  # [3, H, W]
    budget: float | None
    deadline_ms: float | None
    max_tokens: int | None = None  # the client's cap on the answer (None: the model's max_new_tokens)
    received: float | None = None  # time.monotonic() when the request reached the server, if known


def parse_chat_request(
    body: Any,
    processor: InputProcessor,
    max_new_tokens: int,
    limits: RequestLimits,
    pixel_values: torch.Tensor | RequestError | None = None,
    latency_token: bool = True,
) -> ChatRequest:
    """The request as the model's input, or a :class:`RequestError` naming the problem.

    ``pixel_values``: the image already read by :func:`read_request_image` (its pixels or its error,
    reported where reading the image would have failed); None reads it here. ``latency_token``: whether the model
    inserts one (``model.planner.uses_latency_token``); True for a model that has none refuses one token early,
    never lets a too-long sequence through."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}", "body")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown and limits.strict:
        names = [shown(name) for name in unknown[:5]] + (["..."] if len(unknown) > 5 else [])
        raise RequestError(400, f"unknown field(s) {names}; known: {sorted(KNOWN_FIELDS)}", shown(unknown[0]))
    if body.get("stream"):
        raise RequestError(400, "streaming is not supported: answers are a few tokens, sent whole", "stream")
    temperature = body.get("temperature")
    if isinstance(temperature, bool) or temperature not in (None, 0, 0.0):  # false == 0 in Python: refused as budget's
        raise RequestError(400, f"only greedy decoding (temperature 0) is served, got {shown_repr(temperature)}", "temperature")
    budget, deadline_ms = _budget_or_deadline(body)
    max_tokens = _max_tokens(body, max_new_tokens)
    questions, answers, image_url = _turns(body.get("messages"), processor.max_length)
    _check_text_length(questions + answers, limits)
    questions[0] = f"{IMAGE_PLACEHOLDER}\n{questions[0]}"  # the image before the first question, as LLaVA's data has it
    if isinstance(pixel_values, RequestError):
        raise pixel_values
    if pixel_values is None:
        pixel_values = processor.preprocess_image(_read_image(image_url, limits))
    try:
        prompt_ids = processor.chat_template.encode_prompt(
            questions, answers, processor.tokenizer, processor.image_token_id, processor.num_image_tokens
        )
    except ConversationError as error:
        raise RequestError(400, str(error), "messages") from error
    placeholders = sum(1 for token in prompt_ids if token == processor.image_token_id)
    if placeholders != processor.num_image_tokens:
        raise RequestError(
            400, f"{placeholders} image placeholder tokens after encoding, expected {processor.num_image_tokens}", "messages"
        )
    # + the latency token, + this request's answer: in a batch with a longer allowed answer the row decodes on past
    # its cap, but nothing of it is kept (positions are computed, not looked up; the cache is sized per batch)
    answer_tokens = max_tokens or max_new_tokens
    if answer_tokens > tokens_left(len(prompt_ids), processor.max_length, latency_token):
        raise RequestError(
            400,
            f"the prompt is {len(prompt_ids)} tokens ({placeholders} of them image placeholders); with the answer's "
            f"{answer_tokens} tokens it exceeds the model's maximum length {processor.max_length}",
            "messages",
        )
    return ChatRequest(prompt_ids, pixel_values, budget, deadline_ms, max_tokens)


def tokens_left(taken: int, max_length: int, latency_token: bool) -> int:
    """How many tokens the model's maximum length leaves beside ``taken`` (a prompt, image placeholders included, or an
    answer) and the latency token where the model inserts one (:attr:`Planner.uses_latency_token`, at the embedding
    level). The one copy of the rule by which serve, ask, benchmark and profile refuse a prompt with its answer."""
    return max_length - taken - int(latency_token)


def read_request_image(body: Any, processor: InputProcessor, limits: RequestLimits) -> torch.Tensor | RequestError | None:
    """The request's image as the model's pixels, or why it cannot be read; None when the body is too
    malformed to name an image (:func:`parse_chat_request` then says what is wrong).

    Decoding an image is most of a request's parsing (a 4096x4096 JPEG: about half a second of CPU), so the
    server does it ahead, in threads, while the model answers other requests; this touches no tokenizer
    (a fast tokenizer shared between threads can fail with "Already borrowed")."""
    try:
        if not isinstance(body, dict):
            return None
        questions, answers, image_url = _turns(body.get("messages"), processor.max_length)
        _check_text_length(questions + answers, limits)
    except RequestError:
        return None  # refused for its structure or text before its image is looked at
    try:
        return processor.preprocess_image(_read_image(image_url, limits))
    except RequestError as error:
        return error


def _check_text_length(texts: list[str], limits: RequestLimits) -> None:
    """Refuse a huge text before tokenizing it: a megabyte prompt would hold the model's worker (and every
    queued deadline) for seconds only to be refused for its token count."""
    characters = sum(len(text) for text in texts)
    if characters > limits.max_text_chars:
        raise RequestError(413, f"the text is {characters} characters, more than {limits.max_text_chars}", "messages")


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(400, f"must be a finite number, got {shown_repr(value)}", name)
    try:
        number = float(value)
    except OverflowError:  # an integer beyond a float's range (JSON has no size limit); its repr can be 4300 digits
        raise RequestError(400, "must be a finite number, got an integer too large for a float", name) from None
    if not math.isfinite(number):
        raise RequestError(400, f"must be a finite number, got {value!r}", name)
    return number


def _max_tokens(body: dict[str, Any], max_new_tokens: int) -> int | None:
    """The client's cap on the answer's tokens (OpenAI's ``max_tokens`` or its newer name
    ``max_completion_tokens``), at most the model's ``max_new_tokens``: a shorter answer also lets a deadline
    afford a larger budget."""
    given = {name: body[name] for name in ("max_completion_tokens", "max_tokens") if body.get(name) is not None}
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RequestError(400, f"must be a whole number >= 1, got {shown_repr(value)}", name)
        if value > max_new_tokens:
            raise RequestError(
                400, f"{shown_repr(value)} is more than this server's {max_new_tokens} tokens per answer (the model's "
                "max_new_tokens)", name,
            )  # fmt: skip
    if len(set(given.values())) > 1:
        raise RequestError(400, "max_tokens and max_completion_tokens (its newer name) differ; give one", "max_tokens")
    return next(iter(given.values()), None)


def _budget_or_deadline(body: dict[str, Any]) -> tuple[float | None, float | None]:
    budget, deadline_ms = _number(body, "budget"), _number(body, "deadline_ms")
    if budget is not None and deadline_ms is not None:
        raise RequestError(400, "give either `budget` or `deadline_ms`, not both", "budget")
    if budget is not None and not 0.0 <= budget <= 1.0:
        raise RequestError(400, f"budget {budget:g} is outside [0, 1]", "budget")
    if deadline_ms is not None and deadline_ms <= 0:
        raise RequestError(400, f"deadline_ms {deadline_ms:g} must be > 0", "deadline_ms")
    return budget, deadline_ms


def _turns(messages: Any, max_turns: int) -> tuple[list[str], list[str], str]:
    """(questions, answers, image URL): user / assistant turns alternating, the last one a user turn,
    exactly one image, in the first user turn.

    At most ``max_turns`` turns (the model's maximum length in tokens), counted before any is looked at: every
    turn renders its role and a colon (``USER:``), at least one token, so more cannot fit; 100,000 empty turns
    passed the text limit and held the model's worker for over a second of templating and tokenizing."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "must be a non-empty list of {role, content} objects", "messages")
    if len(messages) > max_turns:
        raise RequestError(
            400, f"{len(messages)} turns; at most {max_turns} fit the model's maximum length of {max_turns} tokens "
            "(each turn takes at least one, its role)", "messages",
        )  # fmt: skip
    questions: list[str] = []
    answers: list[str] = []
    image_url = None
    for index, message in enumerate(messages):
        field = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(400, "must be an object with `role` and `content`", field)
        role = message.get("role")
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            raise RequestError(400, f"role {shown_repr(role)}, expected {expected!r} (user and assistant turns alternate, "
                                    "starting with user; the chat template sets its own system prompt)", f"{field}.role")  # fmt: skip
        text, url = _content(message.get("content"), f"{field}.content")
        if IMAGE_PLACEHOLDER in text:
            raise RequestError(400, f"{IMAGE_PLACEHOLDER} in the text; send the image as an image_url part", f"{field}.content")
        if url is not None and index != 0:
            raise RequestError(400, "the image must be in the first user turn", f"{field}.content")
        if url is not None:
            image_url = url
        (questions if role == "user" else answers).append(text)
    if len(messages) % 2 == 0:
        raise RequestError(400, "the last message must be a user turn", f"messages[{len(messages) - 1}].role")
    if image_url is None:
        raise RequestError(400, "no image: the first user turn needs one image_url part", "messages[0].content")
    return questions, answers, image_url


def _content(content: Any, field: str) -> tuple[str, str | None]:
    """A message's text and its image URL (if any): a string, or a list of text / image_url parts."""
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        raise RequestError(400, "must be a string or a list of {type: text | image_url} parts", field)
    texts, urls = [], []
    for index, part in enumerate(content):
        part_field = f"{field}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise RequestError(400, "image_url needs a `url` string", part_field)
            urls.append(url)
        else:
            raise RequestError(400, "each part must be {type: text, text} or {type: image_url, image_url: {url}}", part_field)
    if len(urls) > 1:
        raise RequestError(400, f"{len(urls)} images; the model takes one image per request", field)
    return " ".join(texts), (urls[0] if urls else None)


def _read_image(url: str, limits: RequestLimits) -> Image.Image:
    """The RGB image behind a data URL or an allowed file path; size checked before pixels are decoded, and only
    ``IMAGE_FORMATS`` decoded.

    A data URL's declared type is not checked against its bytes: clients label any image ``image/jpeg``, and the
    bytes, not the label, choose the decoder (among the allowed ones either way)."""
    field = "messages[0].content.image_url"
    is_data = _is_data_url(url)
    if is_data:
        header, _, payload = url.partition(",")
        if not header.lower().endswith(";base64"):
            raise RequestError(400, "a data URL must be base64: data:image/<type>;base64,<data>", field)
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise RequestError(413, f"the image is larger than {limits.max_image_bytes} bytes", field)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise RequestError(400, f"invalid base64 data: {error}", field) from error
    else:
        data = _read_allowed_file(url, limits, field)
    prefix = "" if is_data else f"{shown(url)}: "
    buffer = io.BytesIO(data)
    try:
        image = Image.open(buffer, formats=IMAGE_FORMATS)
        _check_image_size(*image.size, limits, field)
        return image.convert("RGB")  # decodes all pixels: truncated data fails here
    except RequestError:
        raise
    except Image.DecompressionBombError as error:  # Pillow's own limit (about 179M pixels), far above any allowed
        side = math.isqrt(limits.max_image_pixels)
        raise RequestError(413, f"{prefix}the image's header gives more pixels than Pillow reads ({shown(str(error), 120)}); "
                                f"its longest side may be at most {side}", field) from None  # fmt: skip
    except Exception as error:  # noqa: BLE001 - a malformed file can make PIL's decoders raise almost anything
        accepted = f"{', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]}"
        other = _other_format(data) if isinstance(error, UnidentifiedImageError) else None
        if other is not None:  # named by the server, not by the decoder it never ran
            message = f"{prefix}an image in {other} format; only {accepted} images are read (OpenAI's formats)"
            raise RequestError(400, message, field) from None
        # PIL names the in-memory buffer (``<_io.BytesIO object at 0x...>``): the file is named instead
        detail = shown(str(error).replace(repr(buffer), "in the data URL" if is_data else repr(shown(url))), 200)
        formats = f"; images are read in {accepted} format" if isinstance(error, UnidentifiedImageError) else ""
        raise RequestError(400, f"{prefix}not a readable image ({type(error).__name__}: {detail}){formats}", field) from error


def _is_data_url(url: str) -> bool:
    """Whether ``url`` is a ``data:`` URL, its scheme in any case (RFC 3986: ``DATA:`` was read as a file name)."""
    return url[:5].lower() == "data:"


def _other_format(data: bytes) -> str | None:
    """The format outside ``IMAGE_FORMATS`` that Pillow would take ``data`` for, by its first bytes alone (each
    plugin's signature check: nothing is parsed), so that a refusal names it; None if none claims them."""
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        try:
            if name not in IMAGE_FORMATS and accept is not None and accept(data[:16]):
                return name
        except Exception:  # noqa: BLE001 - a signature check that fails only leaves the format unnamed
            continue
    return None


def _url_scheme(url: str) -> str | None:
    """The scheme of a ``scheme://...`` URL, lowercased; None for anything else, which is a path."""
    scheme, separator, _ = url.partition("://")
    return scheme.lower() if separator and _SCHEME.fullmatch(scheme) else None


def _check_image_size(width: int, height: int, limits: RequestLimits, field: str) -> None:
    """Refuse, from the header, an image whose preprocessing would build a huge intermediate image: the square
    ``pad_to_square`` pads it to (longest side squared) must fit ``max_image_pixels``, and the long side may be
    at most ``MAX_ASPECT_RATIO`` x the short one (CLIP's resize scales the short side up to the tower's size)."""
    longest, shortest = max(width, height), min(width, height)
    if longest * longest > limits.max_image_pixels:
        side = math.isqrt(limits.max_image_pixels)
        raise RequestError(
            413, f"the image is {width}x{height} pixels; its longest side may be at most {side} (a square of at most "
            f"{limits.max_image_pixels} pixels)", field,
        )  # fmt: skip
    if longest > MAX_ASPECT_RATIO * shortest:
        raise RequestError(
            413, f"the image is {width}x{height} pixels; its long side may be at most {MAX_ASPECT_RATIO} times its short side",
            field,
        )


def _read_allowed_file(url: str, limits: RequestLimits, field: str) -> bytes:
    """A ``file://`` URL or a path (``shot-10:15:00.png`` is a file name, not a URL of scheme ``shot-10``)."""
    scheme = _url_scheme(url)
    if scheme not in (None, "file"):
        raise RequestError(400, f"only data: URLs and file paths are served, not {shown(scheme)}:// (nothing is fetched)", field)
    host = urlparse(url).netloc if scheme == "file" else ""
    if host.lower() not in ("", "localhost"):  # file://a.png names a host a.png and an empty path
        raise RequestError(
            400, f"{shown(url)}: a file:// URL takes an absolute path, file:///path (or file://localhost/path), or send a "
            f"plain relative path; {shown_repr(host)} was read as a host, and no other host is read", field,
        )  # fmt: skip
    if limits.image_dir is None:
        raise RequestError(403, "image paths are disabled on this server (no image folder allowed); send a data URL", field)
    root = Path(limits.image_dir).resolve()
    raw = Path(unquote(urlparse(url).path) if scheme == "file" else url)
    path, problem = _resolve(raw if raw.is_absolute() else root / raw, field)
    if not path.is_relative_to(root):
        raise RequestError(403, f"{shown(url)} is outside the allowed image folder", field)
    try:
        if problem is not None:  # inside, unresolvable: never read (the path left may still hold links)
            raise problem
        if not path.is_file():
            raise RequestError(400, f"{shown(url)}: no such file in the allowed image folder", field)
        if path.stat().st_size > limits.max_image_bytes:
            raise RequestError(413, f"the image is larger than {limits.max_image_bytes} bytes", field)
        return path.read_bytes()
    except OSError as error:  # a name too long, a symlink loop, a file that cannot be read
        if error.errno == errno.ENOENT:
            raise RequestError(400, f"{shown(url)}: no such file in the allowed image folder", field) from error
        raise RequestError(400, f"{shown(url)}: cannot read it in the allowed image folder ({error.strerror})", field) from error


def _resolve(path: Path, field: str) -> tuple[Path, OSError | None]:
    """``path`` with every link and ``..`` resolved, and None; or, where that fails (no such file, a symlink loop, a
    name too long), where it leads as far as it resolves, for the outside check alone, and why.

    ``Path.resolve`` raised a RuntimeError naming the absolute path for a loop (before Python 3.13), so a loop outside
    the folder was a 400 and not a 403; and after a loop it resolved no further links, returning a path inside the
    folder that the kernel read through a link out of it (``loop/../link-out/secret``)."""
    try:
        try:
            return Path(os.path.realpath(path, strict=True)), None
        except OSError as error:
            return Path(os.path.realpath(path)), error
    except (OSError, ValueError) as error:  # a NUL byte
        reason = error.strerror if isinstance(error, OSError) else str(error)
        raise RequestError(400, f"not a usable path ({reason})", field) from error
