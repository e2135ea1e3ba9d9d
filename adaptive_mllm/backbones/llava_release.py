"""LLaVA-1.5 as its authors released it (``liuhaotian/llava-v1.5-7b``), read into transformers' LLaVA modules.

The original release is a Llama checkpoint directory with a few extra config keys (``mm_vision_tower``,
``mm_projector_type``, ``mm_hidden_size``, ...) and extra weights (``model.mm_projector.0/.2``); the
CLIP tower is not in it (the config names a hub id), and its tokenizer has no ``<image>`` token (the
release splices image features in at a sentinel id). This file maps that layout onto
``LlavaForConditionalGeneration`` by name, with the CLIP tower from its own local directory (the HF
``CLIPVisionModel`` or ``CLIPModel`` layout), and adds ``<image>`` to the tokenizer (one new
embedding / output row, set to the mean of the others). Every weight of the model must be found and
every weight found must be used: anything else fails with the list of keys.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.initialization import no_init_weights

RELEASE_ARCHITECTURE = "LlavaLlamaForCausalLM"
RELEASE_MODEL_TYPES = ("llava", "llava_llama")
# The AdaLLaVA release (ChulanZhang/SmartVLM; zhuoyanxu/ada-llava-*-v1.5-7b) saves LLaVA's layout plus its
# scheduler's weights (scheduler.*), which a scheduler's ``release_checkpoint`` reads (schedulers/release.py).
ADALLAVA_ARCHITECTURE = "AdaLlavaLlamaForCausalLM"
ADALLAVA_MODEL_TYPE = "ada_llava_llama"
ADALLAVA_SCHEDULER_PREFIX = "scheduler."
RELEASE_LAYOUT = (
    "the original LLaVA release layout (as liuhaotian/llava-v1.5-7b): config.json with architectures "
    f"['{RELEASE_ARCHITECTURE}'], mm_hidden_size, mm_projector_type 'mlp2x_gelu', mm_vision_select_layer, "
    "mm_vision_select_feature 'patch'; weights model.embed_tokens / model.layers.* / model.norm / lm_head / "
    "model.mm_projector.{0,2}.* in *.safetensors or pytorch_model*.bin (sharded with an index json); "
    f"tokenizer files beside them; or the AdaLLaVA release's ({ADALLAVA_ARCHITECTURE}, model_type "
    f"'{ADALLAVA_MODEL_TYPE}'), the same plus scheduler.* weights"
)
LORA_LAYOUT = (
    "LLaVA's LoRA output (as liuhaotian/llava-v1.5-7b-lora): the release's config.json, adapter_config.json (a peft "
    "LoRA: r, lora_alpha), adapter_model.safetensors or adapter_model.bin (base_model.model.model.layers.*.lora_A / "
    "lora_B), non_lora_trainables.bin (the projector), read with `model_base`: the LLM directory it was trained on "
    "(lmsys/vicuna-7b-v1.5 for LLaVA-1.5: Llama weights model.* / lm_head.* and its tokenizer)"
)
PROJECTOR_LAYOUT = (
    "LLaVA's stage-1 output (as liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5): the release's config.json "
    "and mm_projector.bin (model.mm_projector.{0,2}.*), read with `model_base`: the LLM it was trained on "
    "(lmsys/vicuna-7b-v1.5 for LLaVA-1.5: Llama weights model.* / lm_head.* and its tokenizer)"
)
BASE_LAYOUT = "an LLM directory in the Llama layout (model.embed_tokens / model.layers.* / model.norm / lm_head weights)"
TOWER_LAYOUT = (
    "a local CLIP vision tower directory in the transformers CLIPVisionModel (or CLIPModel) layout, as "
    "openai/clip-vit-large-patch14-336 is published: config.json + model.safetensors or pytorch_model.bin"
)

# Release key -> transformers LlavaForConditionalGeneration key (prefix rewrites, first match wins).
_LLM_PREFIXES = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
_TOWER_TARGET = "model.vision_tower."
# An unconsolidated checkpoint (saved with the tower attached) also holds LLaVA's CLIPVisionTower weights.
_TOWER_IN_CHECKPOINT = "model.vision_tower.vision_tower."
_CLIP_TEXT_SIDE = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")  # a CLIPModel's other half
# Buffers that older transformers saved and that are recomputed, not loaded.
_RECOMPUTED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")
_VOCAB_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")
# Llama keys of the release's flat config that define the decoder.
_LLAMA_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_scaling", "attention_bias", "mlp_bias", "head_dim", "bos_token_id", "eos_token_id", "pad_token_id",
    "tie_word_embeddings", "initializer_range",
)
PROJECTOR_FILE = "mm_projector.bin"  # what LLaVA's stage 1 saves (--tune_mm_mlp_adapter)
_PROJECTOR_KEYS = ("model.multi_modal_projector.linear_1.", "model.multi_modal_projector.linear_2.")
_PROJECTORS = {"mlp2x_gelu": "gelu"}  # release projector type -> transformers projector activation
# release feature selection -> transformers strategy: "patch" drops CLS, "cls_patch" keeps every token
_SELECT_FEATURES = {"patch": "default", "cls_patch": "full"}


class ReleaseLayoutError(ValueError):
    """A directory that claims the original release layout but does not hold it."""


def is_release_config(raw: dict) -> bool:
    """True for a config.json written by the LLaVA code base rather than by transformers' LLaVA."""
    architectures = raw.get("architectures") or []
    return "text_config" not in raw and (
        "mm_vision_tower" in raw or "mm_projector_type" in raw or RELEASE_ARCHITECTURE in architectures
        or ADALLAVA_ARCHITECTURE in architectures
    )


def is_lora_release(directory: Path) -> bool:
    """LLaVA's LoRA output: adapters over an LLM that lives in another directory (``model_base``)."""
    return (directory / "adapter_config.json").is_file()


def is_projector_release(directory: Path) -> bool:
    """LLaVA's stage-1 output: the projector alone (``mm_projector.bin``) over an LLM in ``model_base``."""
    return (directory / PROJECTOR_FILE).is_file()


def is_language_model_config(raw: dict) -> bool:
    """A Llama LLM's config.json (Vicuna's): what LLaVA's stage 1 builds LLaVA on (``--model_name_or_path``)."""
    return raw.get("model_type") == "llama" and not is_release_config(raw)


def is_adallava_release(raw: dict) -> bool:
    return raw.get("model_type") == ADALLAVA_MODEL_TYPE and (raw.get("architectures") or []) == [ADALLAVA_ARCHITECTURE]


def release_llava_config(config_file: Path, raw: dict, vision_tower: Path | None) -> LlavaConfig:
    """The transformers LlavaConfig equivalent to a release config.json plus a local CLIP tower directory."""
    architectures = raw.get("architectures") or []
    llava = architectures == [RELEASE_ARCHITECTURE] and raw.get("model_type") in RELEASE_MODEL_TYPES
    if not (llava or is_adallava_release(raw)):
        raise ReleaseLayoutError(
            f"{config_file}: architectures {architectures} / model_type {raw.get('model_type')!r} is not a LLaVA "
            f"release over Llama; expected {RELEASE_LAYOUT}"
        )
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "mm_hidden_size"):
        if key not in raw:
            raise ReleaseLayoutError(f"{config_file}: key {key!r} is missing; expected {RELEASE_LAYOUT}")
    projector = raw.get("mm_projector_type", "linear")
    if projector not in _PROJECTORS:
        raise ReleaseLayoutError(
            f"{config_file}: mm_projector_type {projector!r} is not supported; expected one of {sorted(_PROJECTORS)}"
        )
    select = raw.get("mm_vision_select_feature", "patch")
    if select not in _SELECT_FEATURES:
        raise ReleaseLayoutError(
            f"{config_file}: mm_vision_select_feature {select!r} is not supported; expected one of {sorted(_SELECT_FEATURES)}"
        )
    if raw.get("mm_use_im_start_end"):
        raise ReleaseLayoutError(
            f"{config_file}: mm_use_im_start_end is true (<im_start> / <im_end> around the image tokens), which "
            "LLaVA-1.5 does not use and this project does not build"
        )
    vision = _tower_config(vision_tower, raw.get("mm_vision_tower"))
    if vision.hidden_size != raw["mm_hidden_size"]:
        raise ReleaseLayoutError(
            f"{config_file}: mm_hidden_size {raw['mm_hidden_size']} differs from the vision tower's hidden_size "
            f"{vision.hidden_size} ({vision_tower / 'config.json'})"
        )
    text = LlamaConfig(**{key: raw[key] for key in _LLAMA_KEYS if key in raw})
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        vision_feature_layer=raw.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=_SELECT_FEATURES[select],
        projector_hidden_act=_PROJECTORS[projector],
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
    )


def language_model_llava_config(config_file: Path, raw: dict, vision_tower: Path) -> LlavaConfig:
    """LLaVA-1.5 over a Llama LLM (``config_file``) and a CLIP tower, as LLaVA's ``train.py`` builds it for stage 1
    (``--mm_projector_type mlp2x_gelu --mm_vision_select_layer -2``, patch features)."""
    vision = _tower_config(vision_tower, None)
    llava = {**raw, "architectures": [RELEASE_ARCHITECTURE], "model_type": "llava", "mm_hidden_size": vision.hidden_size,
             "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch"}
    return release_llava_config(config_file, llava, vision_tower)


def _tower_config(vision_tower: Path | None, named: str | None) -> CLIPVisionConfig:
    if vision_tower is None:
        raise ReleaseLayoutError(
            f"the release config names the vision tower {named!r} (a hub id, never downloaded here); pass "
            f"`vision_tower`: {TOWER_LAYOUT}"
        )
    config_file = vision_tower / "config.json"
    if not config_file.is_file():
        raise ReleaseLayoutError(f"{config_file} is missing; `vision_tower` must be {TOWER_LAYOUT}")
    model_type = read_json_object(config_file).get("model_type")
    if model_type not in ("clip", "clip_vision_model"):
        raise ReleaseLayoutError(
            f"{config_file} has model_type {model_type!r}, expected 'clip_vision_model' or 'clip': {TOWER_LAYOUT}"
        )
    return CLIPVisionConfig.from_pretrained(vision_tower)


# --- weights ---------------------------------------------------------------------------------------
def weight_files(directory: Path, layout: str) -> list[Path]:
    """The weight files of a directory: the shards its index json lists, else its single weight file."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_file = directory / index_name
        if index_file.is_file():
            weight_map = read_json_object(index_file).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ReleaseLayoutError(f"{index_file} has no 'weight_map'; expected {layout}")
            files = [directory / name for name in sorted(set(weight_map.values()))]
            absent = [str(path) for path in files if not path.is_file()]
            if absent:
                raise ReleaseLayoutError(f"{index_file} lists shards that are missing: {absent}")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    raise ReleaseLayoutError(
        f"{directory} holds no model.safetensors, pytorch_model.bin or *.index.json; expected {layout}"
    )


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors or PyTorch pickle weight file, as tensors on the CPU (the pickle read safely); a file
    that cannot be read is named (the libraries' own errors name none)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # safetensors' header errors, torch's zip / unpickling errors
        raise ReleaseLayoutError(
            f"{path} ({path.stat().st_size} bytes): cannot read its weights ({type(error).__name__}: {error}); "
            "the file is truncated (a download or copy cut short) or not a weight file"
        ) from error


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (a config, a shard index), or a ReleaseLayoutError naming it."""
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReleaseLayoutError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(content, dict):
        raise ReleaseLayoutError(f"{path} holds a JSON {type(content).__name__}, expected an object")
    return content


def _llm_key(key: str) -> str | None:
    for source, target in _LLM_PREFIXES:
        if key.startswith(source):
            return target + key[len(source):]
    return None


def _tower_key(key: str) -> str | None:
    if key.startswith(_CLIP_TEXT_SIDE):
        return ""  # a CLIPModel's text half: not part of the vision tower, dropped
    if key.startswith("vision_model."):  # the CLIPModel layout, and CLIPVisionModel as transformers 4 saved it
        key = key[len("vision_model."):]
    return _TOWER_TARGET + key


def load_release_model(
    checkpoint: Path,
    vision_tower: Path,
    config: LlavaConfig,
    dtype: torch.dtype,
    attn_implementation: str,
    model_base: Path | None = None,
    seed: int = 0,
) -> LlavaForConditionalGeneration:
    """Build the transformers model without initialising it and fill every weight from the two directories
    (three with ``model_base``, as LLaVA's loader does with ``--model-base``: the LLM from ``model_base`` and, for a
    LoRA output, the projector from ``non_lora_trainables.bin``, then the adapters merged into the LLM's weights; for
    a stage-1 output, the projector from ``mm_projector.bin``).

    ``checkpoint`` may also be a Llama LLM (Vicuna): LLaVA built on it as LLaVA's stage 1 starts, the projector new,
    initialised as PyTorch initialises ``nn.Linear`` (LLaVA's ``build_vision_projector``), from ``seed``.

    ``config.text_config.vocab_size`` may exceed the checkpoint's rows (the added ``<image>`` token): the
    extra embedding and output rows are the mean of the checkpoint's rows.

    An unconsolidated checkpoint (tower weights ``model.vision_tower.vision_tower.*`` inside it) is read as
    LLaVA's loader reads it, with a warning: its tower weights replace ``vision_tower``'s when config.json
    sets ``unfreeze_mm_vision_tower`` (the tower was trained), and are ignored otherwise (LLaVA builds the
    tower lazily from ``mm_vision_tower`` and drops them).
    """
    with no_init_weights():
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    expected = model.state_dict()
    loaded: set[str] = set()
    unexpected: list[str] = []
    raw = read_json_object(checkpoint / "config.json")
    use_inner_tower = bool(raw.get("unfreeze_mm_vision_tower", False))
    adallava = is_adallava_release(raw)
    inner_tower_keys: list[str] = []

    def checkpoint_key(key: str) -> str | None:
        if key.startswith(ADALLAVA_SCHEDULER_PREFIX) and adallava:
            return ""  # the release scheduler's: read by a scheduler's release_checkpoint, not part of LLaVA
        if key.startswith(_TOWER_IN_CHECKPOINT):
            inner_tower_keys.append(key)
            return _tower_key(key[len(_TOWER_IN_CHECKPOINT):]) if use_inner_tower else ""
        return _llm_key(key)

    # the tower directory first, so that a checkpoint's own tower weights (when used) overwrite it
    sources = [(path, _tower_key) for path in weight_files(vision_tower, TOWER_LAYOUT)]
    fresh_projector = model_base is None and is_language_model_config(raw)
    if fresh_projector:  # LLaVA's stage 1: the LLM's weights, a new projector
        sources += [(path, _llm_key) for path in weight_files(checkpoint, BASE_LAYOUT)]
    elif model_base is None:
        sources += [(path, checkpoint_key) for path in weight_files(checkpoint, RELEASE_LAYOUT)]
    elif is_lora_release(checkpoint):
        sources += [(path, _llm_key) for path in weight_files(model_base, BASE_LAYOUT)]
        sources += [(_lora_file(checkpoint, ("non_lora_trainables.bin",)), _non_lora_key)]
    else:  # LLaVA's stage-1 output: the projector alone (its loader's "mm projector only")
        sources += [(path, _llm_key) for path in weight_files(model_base, BASE_LAYOUT)]
        sources += [(checkpoint / PROJECTOR_FILE, _projector_key)]
    for path, rename in sources:
        mapped: dict[str, torch.Tensor] = {}
        for key, tensor in read_weights(path).items():
            target = rename(key)
            if target == "" or key.endswith(_RECOMPUTED_SUFFIXES):
                continue
            if target is None or target not in expected:
                unexpected.append(f"{path.name}: {key}")
                continue
            if target in _VOCAB_KEYS:
                tensor = grow_rows(tensor, expected[target].shape[0], path, key)
            if tensor.shape != expected[target].shape:
                raise ReleaseLayoutError(
                    f"{path}: {key} has shape {tuple(tensor.shape)}, the config expects {tuple(expected[target].shape)}"
                )
            mapped[target] = tensor
        model.load_state_dict(mapped, strict=False)
        loaded.update(mapped)
        del mapped
    if inner_tower_keys:
        action = (
            f"used instead of {vision_tower}'s (config.json sets unfreeze_mm_vision_tower)"
            if use_inner_tower
            else f"ignored: the tower comes from {vision_tower} (config.json does not set unfreeze_mm_vision_tower)"
        )
        warnings.warn(
            f"{checkpoint} is an unconsolidated LLaVA checkpoint: {len(inner_tower_keys)} vision tower weights "
            f"({inner_tower_keys[0]}, ...) are {action}, as LLaVA's own loader does",
            UserWarning,
            stacklevel=3,
        )
    if model_base is not None and is_lora_release(checkpoint):
        merge_release_adapters(model, checkpoint)
    if fresh_projector:
        loaded.update(initialise_projector(model, seed))
    missing = sorted(set(expected) - loaded)
    if missing or unexpected:
        raise ReleaseLayoutError(
            f"{checkpoint} + {vision_tower} do not match the LLaVA modules: missing keys {missing}, "
            f"unexpected keys {unexpected}; expected {RELEASE_LAYOUT}, and {TOWER_LAYOUT}"
        )
    return model


def _projector_key(key: str) -> str | None:
    """``mm_projector.bin``'s names (``model.mm_projector.0.weight``, ...): the projector's, nothing else."""
    target = _llm_key(key)
    return target if target is not None and target.startswith(_PROJECTOR_KEYS) else None


def initialise_projector(model: LlavaForConditionalGeneration, seed: int) -> set[str]:
    """A new projector, as LLaVA's stage 1 starts: ``nn.Linear``'s own initialisation of both layers, in order, from
    ``seed`` (the global random state is left as it was). Returns the state-dict keys it set."""
    projector = model.model.multi_modal_projector
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        projector.linear_1.reset_parameters()
        projector.linear_2.reset_parameters()
    return {key for key in model.state_dict() if key.startswith(_PROJECTOR_KEYS)}


def grow_rows(tensor: torch.Tensor, rows: int, path: Path, key: str) -> torch.Tensor:
    """Append mean rows (or mean bias entries) for tokens the tokenizer gained beyond the checkpoint's
    rows (``<image>``), so they start neutral."""
    extra = rows - tensor.shape[0]
    if extra < 0:
        raise ReleaseLayoutError(f"{path}: {key} has {tensor.shape[0]} rows, more than the vocabulary's {rows}")
    if extra == 0:
        return tensor
    mean = tensor.float().mean(0, keepdim=True).to(tensor.dtype)
    return torch.cat([tensor, mean.expand(extra, *tensor.shape[1:])])


# --- LLaVA's LoRA output ---------------------------------------------------------------------------
_ADAPTER_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
_UNSUPPORTED_ADAPTER_SETTINGS = ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save")


def _lora_file(directory: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise ReleaseLayoutError(f"{directory} holds none of {', '.join(names)}; expected {LORA_LAYOUT}")


def _non_lora_key(key: str) -> str | None:
    """``non_lora_trainables.bin``'s names, as LLaVA's loader reads them: without ``base_model.``, and without one
    ``model.`` where that leaves ``model.model.``."""
    key = key.removeprefix("base_model.")
    if key.startswith("model.model."):
        key = key.removeprefix("model.")
    return _llm_key(key)


def merge_release_adapters(model: LlavaForConditionalGeneration, checkpoint: Path) -> None:
    """Add each adapter's ``scale * B @ A`` (in float32) to the weight it adapts: peft's ``merge_and_unload``.
    Every adapter must name a projection of the model, with both its halves."""
    settings_file = checkpoint / "adapter_config.json"
    settings = read_json_object(settings_file)
    unsupported = {key: settings[key] for key in _UNSUPPORTED_ADAPTER_SETTINGS if settings.get(key)}
    if settings.get("peft_type", "LORA") != "LORA" or settings.get("bias", "none") != "none" or unsupported:
        raise ReleaseLayoutError(
            f"{settings_file}: peft_type {settings.get('peft_type')!r}, bias {settings.get('bias')!r}"
            f"{', ' + str(unsupported) if unsupported else ''}: only plain LoRA adapters (peft_type LORA, bias none, as "
            "LLaVA trains them) are read"
        )
    try:
        rank, alpha = int(settings["r"]), float(settings["lora_alpha"])
    except (KeyError, TypeError, ValueError) as error:
        raise ReleaseLayoutError(f"{settings_file}: needs numeric 'r' and 'lora_alpha' ({error})") from error
    scale = alpha / math.sqrt(rank) if settings.get("use_rslora") else alpha / rank
    path = _lora_file(checkpoint, ("adapter_model.safetensors", "adapter_model.bin"))
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_weights(path).items():
        match = _ADAPTER_KEY.fullmatch(key)
        target = _llm_key(match["module"] + ".weight") if match else None
        if target is None:
            raise ReleaseLayoutError(f"{path}: {key} is not a LoRA weight of the LLM; expected {LORA_LAYOUT}")
        halves.setdefault(target, {})[match["part"]] = tensor
    weights = dict(model.named_parameters())
    for target, pair in sorted(halves.items()):
        weight = weights.get(target)
        down, up = pair.get("A"), pair.get("B")
        if weight is None or down is None or up is None:
            raise ReleaseLayoutError(
                f"{path}: the adapter of {target} has {sorted(pair)} (needs lora_A and lora_B)"
                f"{'' if weight is not None else ', and the model has no such weight'}"
            )
        if up.shape[1] != down.shape[0] or (up.shape[0], down.shape[1]) != tuple(weight.shape):
            raise ReleaseLayoutError(
                f"{path}: the adapter of {target} is {tuple(up.shape)} x {tuple(down.shape)}, the weight {tuple(weight.shape)}"
            )
        with torch.no_grad():
            weight.copy_((weight.float() + scale * (up.float() @ down.float())).to(weight.dtype))
