"""Mipha: SigLIP vision tower -> 2-layer MLP projector -> Phi-2, as transformers' own modules.

Mipha-3B (``zhumj34/Mipha-3B``, code in ``zhuyiche/llava-phi``) is one directory: ``config.json`` of
``model_type: mipha_phi`` (a PhiConfig plus ``vision_config: {vision_tower: {...SigLIP sizes,
mm_vision_select_layer, vision_model_name_or_path}, mm_projector: {mm_projector_type, mm_hidden_size,
hidden_size}}``), safetensors (or ``pytorch_model*.bin``) with the Phi weights under ``model.*`` /
``lm_head.*``, the SigLIP tower under ``model.vision_tower.vision_model.*`` and the projector under
``model.mm_projector.{0,2}.*``, Phi-2's tokenizer (no ``<image>`` token: the release splices images
in at a sentinel id, so one is added here) and SigLIP's ``preprocessor_config.json``.

Two ways in, one code path:
- ``checkpoint``: such a directory (the release, or what :meth:`MiphaBackbone.save_pretrained` writes:
  the same layout, so it round-trips);
- ``config``: sizes for a freshly initialised model (the tiny path), with ``tokenizer`` a local directory.

The modules are transformers' ``PhiForCausalLM`` (its ``PhiDecoderLayer`` run by the engine through
:class:`adaptive_mllm.layers.PhiLayer`) and ``SiglipVisionModel``. SigLIP has no CLS token: every patch
(729 for so400m-patch14-384) is a visual token, and PruMerge's CLS attention does not exist.
Nothing is ever downloaded; weights are created or loaded in :meth:`build`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from torch import nn
from transformers import (
    PhiConfig,
    PhiForCausalLM,
    PreTrainedTokenizerBase,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.initialization import no_init_weights

from adaptive_mllm.backbones.base import DecoderShape, VisualFeatures
from adaptive_mllm.backbones.llava_release import ReleaseLayoutError, grow_rows, read_weights, weight_files
from adaptive_mllm.backbones.local import (
    IMAGE_TOKEN,
    CheckpointError,
    LocalBackbone,
    ModelSizes,
    building_on_meta,
    has_image_processor,
    read_config_json,
)
from adaptive_mllm.backbones.pil_image_processors import pil_siglip_processor
from adaptive_mllm.backbones.templates import phi_v0, plain_chat

MODEL_TYPE = "mipha_phi"
ARCHITECTURE = "MiphaPhiForCausalLM"
LAYOUT = (
    "the Mipha release layout (as zhumj34/Mipha-3B): config.json with model_type 'mipha_phi', architectures "
    f"['{ARCHITECTURE}'], Phi sizes and vision_config {{vision_tower: SigLIP sizes + mm_vision_select_layer, "
    "mm_projector: {mm_projector_type 'mlp2x_gelu', mm_hidden_size, hidden_size}}; weights model.embed_tokens / "
    "model.layers.* / model.final_layernorm / lm_head / model.vision_tower.vision_model.* / model.mm_projector.{0,2}.* "
    "in *.safetensors or pytorch_model*.bin (sharded with an index json); Phi-2 tokenizer files beside them"
)
# PhiConfig keys of Mipha's flat config.json that define the decoder.
_PHI_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_act", "max_position_embeddings",
    "initializer_range", "layer_norm_eps", "rope_theta", "partial_rotary_factor", "rope_scaling", "rope_parameters",
    "qk_layernorm", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
)
# SiglipVisionConfig keys of the vision_tower sub-dict (the rest are Mipha's own: select layer, name).
_SIGLIP_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels", "image_size",
    "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout",
)
_PROJECTORS = ("mlp2x_gelu",)
# Release weight prefixes of the tower (the second: a nesting some conversions write) -> SiglipVisionModel keys.
_TOWER_PREFIXES = ("model.vision_tower.vision_model.", "model.vision_tower.vision_tower.vision_model.")
_PROJECTOR_PREFIX = "model.mm_projector."
_RECOMPUTED_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")
_VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias")


class MiphaModules(nn.Module):
    """The three named parts, each a transformers module (or the projector's plain Sequential)."""

    def __init__(self, text: PhiConfig, vision: SiglipVisionConfig, dtype: torch.dtype, attn_implementation: str) -> None:
        super().__init__()
        text._attn_implementation = attn_implementation
        vision._attn_implementation = attn_implementation
        self.llm = PhiForCausalLM(text).to(dtype)
        self.vision_tower = SiglipVisionModel(vision).to(dtype)
        # mlp2x_gelu: Linear -> GELU -> Linear, indices 0 and 2 as in the release's nn.Sequential
        self.mm_projector = nn.Sequential(
            nn.Linear(vision.hidden_size, text.hidden_size), nn.GELU(), nn.Linear(text.hidden_size, text.hidden_size)
        ).to(dtype)

    def forward(self, **kwargs: Any) -> Any:
        """transformers' own Phi forward (``inputs_embeds=...``): the reference the benchmark times the engine against."""
        return self.llm(**kwargs)


class MiphaBackbone(LocalBackbone):
    """Mipha (SigLIP + MLP projector + Phi-2).

    Args:
        checkpoint: local directory in the Mipha release layout (or as ``save_pretrained`` writes it);
            mutually exclusive with ``config``.
        config: sizes of a freshly initialised model (:class:`ModelSizes`: ``vision`` SiglipVisionConfig kwargs,
            ``text`` PhiConfig kwargs, ``vision_feature_layer``); a dict with those keys works too.
        tokenizer: local tokenizer directory; defaults to ``checkpoint``.
        template: chat template name (``phi_v0``: Mipha's conversation template; ``plain_chat`` for tiny models).
        max_length: longest sequence accepted; defaults to the text config's ``max_position_embeddings``.
        pad_to_square: pad images to a square with the processor's mean colour first (Mipha's
            ``image_aspect_ratio pad``).
        seed: initialisation seed of the ``config`` path.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        attn_implementation: transformers attention backend of the reference modules (``sdpa`` or ``eager``).
    """

    templates = {"phi_v0": phi_v0, "plain_chat": plain_chat}

    def __init__(
        self,
        checkpoint: str | None = None,
        config: ModelSizes | None = None,
        tokenizer: str | None = None,
        template: str = "phi_v0",
        max_length: int | None = None,
        pad_to_square: bool = True,
        seed: int = 0,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__(checkpoint, config, tokenizer, template, pad_to_square, seed, dtype, attn_implementation)
        self.text_config, self.vision_config, self.vision_feature_layer = self._read_config(config)
        self._max_length = max_length or self.text_config.max_position_embeddings
        self.model: MiphaModules | None = None

    # --- construction ----------------------------------------------------------------------------
    def _read_config(self, config: ModelSizes | dict[str, Any] | None) -> tuple[PhiConfig, SiglipVisionConfig, int]:
        if config is not None:
            config = ModelSizes.of(config)
            if (config.vision_feature_select_strategy, config.projector_hidden_act) != ("default", "gelu"):
                raise ValueError("MiphaBackbone config: vision_feature_select_strategy and projector_hidden_act are "
                                 "LLaVA's; Mipha drops no CLS token and its projector uses GELU")
            return PhiConfig(**config.text), SiglipVisionConfig(**config.vision), config.vision_feature_layer
        config_file, raw = read_config_json(self.checkpoint, LAYOUT)
        return parse_config(config_file, raw)

    def build(self) -> None:
        if self.model is not None:
            return
        tokenizer = self.tokenizer
        text = self.text_config
        if self.checkpoint is None:
            text.vocab_size = len(tokenizer)
            text.pad_token_id = tokenizer.pad_token_id
            text.bos_token_id = tokenizer.bos_token_id
            text.eos_token_id = tokenizer.eos_token_id
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                model = MiphaModules(text, self.vision_config, self.torch_dtype, self.attn_implementation)
        else:
            text.vocab_size = max(text.vocab_size, len(tokenizer))  # Phi-2's 51,200 rows already hold <image>
            with no_init_weights():
                model = MiphaModules(text, self.vision_config, self.torch_dtype, self.attn_implementation)
            try:
                if not building_on_meta():  # on the meta device (a memory plan) the shapes are all that is needed
                    load_weights(model, self.checkpoint)
            except ReleaseLayoutError as error:
                raise CheckpointError(str(error)) from error
        model.train()
        self.model = model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            tokenizer = self._load_tokenizer()
            if IMAGE_TOKEN not in tokenizer.get_vocab():
                # the release splices images in at a sentinel id; the placeholders here need a real token
                tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token  # Phi-2 has none; Mipha pads with <|endoftext|> too
            self._tokenizer = tokenizer
        return self._tokenizer

    @property
    def image_processor(self) -> SiglipImageProcessor:
        if self._image_processor is None:
            if self.checkpoint is not None and has_image_processor(self.checkpoint):  # resized with PIL, as Mipha's
                self._image_processor = pil_siglip_processor(self.checkpoint)
            else:
                size = self.vision_config.image_size  # SigLIP: a plain resize to size x size, mean / std 0.5
                self._image_processor = pil_siglip_processor(size={"height": size, "width": size})
        return self._image_processor

    # --- text side -------------------------------------------------------------------------------
    @property
    def num_image_tokens(self) -> int:
        vision = self.vision_config
        return (vision.image_size // vision.patch_size) ** 2  # no CLS token: every patch

    # --- image side ------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, with_attention: bool = False) -> VisualFeatures:
        if with_attention:
            raise ValueError(
                "MiphaBackbone's SigLIP tower has no CLS token, so there is no CLS attention for PruMerge / "
                "PruMerge+ to rank patches by; use a selector that does not need it (FastV) or a CLIP backbone"
            )
        tower = self.model.vision_tower
        outputs = tower(pixel_values.to(tower.dtype), output_hidden_states=True)
        return VisualFeatures(features=outputs.hidden_states[self.vision_feature_layer])  # [B, N, C], all patches

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.mm_projector(features)

    # --- LLM side --------------------------------------------------------------------------------
    @property
    def shape(self) -> DecoderShape:
        text = self.text_config
        vocab = text.vocab_size
        if self.model is None and self._tokenizer is not None:
            vocab = max(vocab, len(self._tokenizer)) if self.checkpoint is not None else len(self._tokenizer)
        heads = text.num_attention_heads
        return DecoderShape(
            num_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            num_heads=heads,
            num_kv_heads=text.num_key_value_heads or heads,
            head_dim=text.hidden_size // heads,
            intermediate_size=text.intermediate_size,
            vocab_size=vocab,
            mlp_matrices=2,  # fc1, fc2
        )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.llm.model.embed_tokens(input_ids)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.llm.model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.model.llm.model.final_layernorm

    @property
    def lm_head(self) -> nn.Module:
        return self.model.llm.lm_head

    def rotary_embeddings(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.llm.model.rotary_emb(x, position_ids)  # each [B, T, rotary_dim] (partial rotary)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "vision_tower": list(self.model.vision_tower.parameters()),
            "projector": list(self.model.mm_projector.parameters()),
            "llm": list(self.model.llm.parameters()),
        }

    # --- persistence -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """The Mipha release layout (one model.safetensors), so that ``checkpoint=directory`` reads it back."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(release_config(self), indent=2))
        save_file(release_state_dict(self.model), directory / "model.safetensors", metadata={"format": "pt"})
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)


# --- the release layout ----------------------------------------------------------------------------
def parse_config(config_file: Path, raw: dict) -> tuple[PhiConfig, SiglipVisionConfig, int]:
    """(Phi config, SigLIP config, vision feature layer) of a Mipha config.json; CheckpointError otherwise."""
    architectures = raw.get("architectures") or []
    if raw.get("model_type") != MODEL_TYPE or architectures not in ([], [ARCHITECTURE]):
        raise CheckpointError(
            f"{config_file}: model_type {raw.get('model_type')!r} / architectures {architectures} is not Mipha over "
            f"Phi; expected {LAYOUT}"
        )
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in raw:
            raise CheckpointError(f"{config_file}: key {key!r} is missing; expected {LAYOUT}")
    vision = raw.get("vision_config")
    if not isinstance(vision, dict) or not isinstance(vision.get("vision_tower"), dict) or not isinstance(
        vision.get("mm_projector"), dict
    ):
        raise CheckpointError(f"{config_file}: vision_config with 'vision_tower' and 'mm_projector' dicts is missing; expected {LAYOUT}")
    tower, projector = vision["vision_tower"], vision["mm_projector"]
    name = str(tower.get("vision_model_name_or_path", "siglip"))
    if "siglip" not in name.lower():
        raise CheckpointError(
            f"{config_file}: vision_config.vision_tower.vision_model_name_or_path {name!r} is not a SigLIP tower; "
            "MiphaBackbone reads the SigLIP variant (Mipha-3B) only"
        )
    kind = projector.get("mm_projector_type", "linear")
    if kind not in _PROJECTORS:
        raise CheckpointError(f"{config_file}: mm_projector_type {kind!r} is not supported; expected one of {list(_PROJECTORS)}")
    select = tower.get("mm_vision_select_feature", "patch")
    if select != "patch":
        raise CheckpointError(f"{config_file}: mm_vision_select_feature {select!r} is not supported; expected 'patch'")
    siglip = SiglipVisionConfig(**{key: tower[key] for key in _SIGLIP_KEYS if key in tower})
    if projector.get("mm_hidden_size", siglip.hidden_size) != siglip.hidden_size:
        raise CheckpointError(
            f"{config_file}: mm_projector.mm_hidden_size {projector['mm_hidden_size']} differs from the vision tower's "
            f"hidden_size {siglip.hidden_size}"
        )
    if projector.get("hidden_size", raw["hidden_size"]) != raw["hidden_size"]:
        raise CheckpointError(
            f"{config_file}: mm_projector.hidden_size {projector['hidden_size']} differs from the LLM's hidden_size "
            f"{raw['hidden_size']}"
        )
    # None means "the default" in Mipha's config.json (num_key_value_heads, rope_scaling): leave those out
    text = PhiConfig(**{key: raw[key] for key in _PHI_KEYS if raw.get(key) is not None})
    return text, siglip, int(tower.get("mm_vision_select_layer", -2))


def release_config(backbone: MiphaBackbone) -> dict:
    """config.json as Mipha writes it: the Phi keys flat, the vision tower and projector nested."""
    text, vision = backbone.text_config, backbone.vision_config
    flat = {key: value for key, value in text.to_dict().items() if key in _PHI_KEYS}
    rope = text.rope_parameters or {}
    flat.update(rope_theta=rope.get("rope_theta", 10000.0), partial_rotary_factor=rope.get("partial_rotary_factor", 0.5))
    flat.pop("rope_parameters", None)
    tower = {key: getattr(vision, key) for key in _SIGLIP_KEYS}
    tower.update(mm_vision_select_layer=backbone.vision_feature_layer, mm_vision_select_feature="patch",
                 vision_model_name_or_path="google/siglip-so400m-patch14-384", model_type="mipha_vision_model")
    projector = {"mm_projector_type": "mlp2x_gelu", "mm_hidden_size": vision.hidden_size,
                 "hidden_size": text.hidden_size, "model_type": "mipha_projector"}
    return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, **flat, "torch_dtype": str(backbone.torch_dtype)[6:],
            "vision_config": {"vision_tower": tower, "mm_projector": projector}}


def _target(key: str) -> tuple[str, str] | None:
    """Release key -> (part, key inside that part's module); None for a key this layout does not hold."""
    for prefix in _TOWER_PREFIXES:
        if key.startswith(prefix):
            return "vision_tower", key[len(prefix):]  # SiglipVisionModel's keys have no vision_model. prefix
    if key.startswith(_PROJECTOR_PREFIX):
        return "mm_projector", key[len(_PROJECTOR_PREFIX):]
    if key.startswith(("model.", "lm_head.")):
        return "llm", key
    return None


def release_state_dict(model: MiphaModules) -> dict[str, torch.Tensor]:
    """The weights under the release's names (the inverse of :func:`_target`), contiguous and untied."""
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.llm.state_dict().items():
        state[key] = tensor.contiguous().clone()
    for key, tensor in model.vision_tower.state_dict().items():
        state[_TOWER_PREFIXES[0] + key] = tensor.contiguous().clone()
    for key, tensor in model.mm_projector.state_dict().items():
        state[_PROJECTOR_PREFIX + key] = tensor.contiguous().clone()
    return state


def load_weights(model: MiphaModules, checkpoint: Path) -> None:
    """Fill every weight of ``model`` from the release files; a ReleaseLayoutError lists missing and
    unexpected keys. Vocabulary rows beyond the checkpoint's (an added ``<image>``) are the mean row."""
    parts = {"llm": model.llm, "vision_tower": model.vision_tower, "mm_projector": model.mm_projector}
    expected = {name: part.state_dict() for name, part in parts.items()}
    loaded: set[tuple[str, str]] = set()
    unexpected: list[str] = []
    for path in weight_files(checkpoint, LAYOUT):
        mapped: dict[str, dict[str, torch.Tensor]] = {name: {} for name in parts}
        for key, tensor in read_weights(path).items():
            if key.endswith(_RECOMPUTED_SUFFIXES):
                continue
            target = _target(key)
            if target is None or target[1] not in expected[target[0]]:
                unexpected.append(f"{path.name}: {key}")
                continue
            part, name = target
            want = expected[part][name]
            if key in _VOCAB_KEYS:
                tensor = grow_rows(tensor, want.shape[0], path, key)
            if tensor.shape != want.shape:
                raise ReleaseLayoutError(f"{path}: {key} has shape {tuple(tensor.shape)}, the config expects {tuple(want.shape)}")
            mapped[part][name] = tensor
        for part, state in mapped.items():
            parts[part].load_state_dict(state, strict=False)
            loaded.update((part, name) for name in state)
    prefix = {"llm": "", "vision_tower": _TOWER_PREFIXES[0], "mm_projector": _PROJECTOR_PREFIX}
    missing = sorted(prefix[part] + name for part, state in expected.items() for name in state if (part, name) not in loaded)
    if missing or unexpected:
        raise ReleaseLayoutError(
            f"{checkpoint} does not match the Mipha modules: missing keys {missing}, unexpected keys {unexpected}; "
            f"expected {LAYOUT}"
        )
