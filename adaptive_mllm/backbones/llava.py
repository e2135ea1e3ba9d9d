"""LLaVA: CLIP vision tower -> MLP projector -> Llama decoder, as transformers' own modules.

Two ways in, one code path:
- ``checkpoint``: a local directory in the transformers LLaVA layout (``config.json`` of
  ``model_type: llava``, ``*.safetensors``, tokenizer files, ``preprocessor_config.json``), as
  ``llava-hf/llava-1.5-7b-hf`` is published and as :meth:`LlavaBackbone.save_pretrained` writes it;
  or in the original LLaVA release layout (``liuhaotian/llava-v1.5-7b``) with ``vision_tower`` a local
  CLIP directory, mapped onto the same transformers modules by :mod:`.llava_release`; or LLaVA's own
  outputs with ``model_base`` (LoRA adapters, a stage-1 projector); or a Llama LLM (Vicuna) with
  ``vision_tower``, LLaVA-1.5 built on them with a new projector, as LLaVA's stage 1 starts;
- ``config``: sizes for a freshly initialised model (the tiny path), with ``tokenizer`` a local
  tokenizer directory.
Nothing is ever downloaded. Weights are created or loaded in :meth:`build` (called from the
LightningModule's ``configure_model``), so parsing a recipe stays instant.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from torch import nn
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)

from adaptive_mllm.backbones import llava_release
from adaptive_mllm.backbones.base import DecoderShape, VisualFeatures
from adaptive_mllm.backbones.local import (
    IMAGE_TOKEN,
    CheckpointError,
    LocalBackbone,
    ModelSizes,
    building_on_meta,
    has_image_processor,
    read_config_json,
)
from adaptive_mllm.backbones.pil_image_processors import pil_clip_processor, pil_llava_processor
from adaptive_mllm.backbones.templates import llava_plain, llava_v1, plain_chat, vicuna_v1


class LlavaBackbone(LocalBackbone):
    """LLaVA-1.5 style backbone.

    Args:
        checkpoint: local directory in the transformers LLaVA layout or the original LLaVA release layout, or a
            Llama LLM (Vicuna: LLaVA-1.5 built on it with a new projector, LLaVA's stage 1); mutually exclusive
            with ``config``.
        vision_tower: local CLIP directory (transformers CLIPVisionModel / CLIPModel layout); needed by the
            release layout and an LLM, whose config.json names no local tower.
        model_base: for LLaVA's LoRA output (``checkpoint`` holds ``adapter_config.json``, as
            ``liuhaotian/llava-v1.5-7b-lora``) or stage-1 output (``mm_projector.bin``, as
            ``liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5``), the LLM directory it was trained on
            (Vicuna): its weights, with the adapters merged in at load or the projector beside them, and its
            tokenizer unless ``tokenizer`` is given; LLaVA's ``--model-base``.
        config: sizes of a freshly initialised model (:class:`ModelSizes`: ``vision`` CLIPVisionConfig kwargs,
            ``text`` LlamaConfig kwargs, ``vision_feature_layer``, ...); a dict with those keys works too.
        tokenizer: local tokenizer directory; defaults to ``checkpoint``.
        template: chat template name (``vicuna_v1`` for LLaVA-1.5, ``plain`` for LLaVA's stage 1, ``plain_chat``
            for the tiny model).
        max_length: longest sequence accepted; defaults to the text config's ``max_position_embeddings``.
        pad_to_square: pad images to a square with the processor's mean colour before resizing (LLaVA-1.5).
        seed: initialisation seed of the ``config`` path, and of the new projector on an LLM.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        attn_implementation: transformers attention backend of the reference modules (``sdpa`` or ``eager``).
    """

    templates = {"vicuna_v1": vicuna_v1, "llava_v1": llava_v1, "plain": llava_plain, "plain_chat": plain_chat}

    def __init__(
        self,
        checkpoint: str | None = None,
        vision_tower: str | None = None,
        model_base: str | None = None,
        config: ModelSizes | None = None,
        tokenizer: str | None = None,
        template: str = "vicuna_v1",
        max_length: int | None = None,
        pad_to_square: bool = True,
        seed: int = 0,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__(checkpoint, config, tokenizer, template, pad_to_square, seed, dtype, attn_implementation)
        self.vision_tower = None if vision_tower is None else Path(vision_tower)
        self.model_base = None if model_base is None else Path(model_base)
        if self.model_base is not None and tokenizer is None:
            self.tokenizer_dir = self.model_base  # LLaVA's LoRA output holds no tokenizer: the base's
        self.release_layout = False  # set by _read_config for an original LLaVA release directory
        self.llava_config = self._read_config(config)
        self._max_length = max_length or self.llava_config.text_config.max_position_embeddings
        self.model: LlavaForConditionalGeneration | None = None

    # --- construction ----------------------------------------------------------------------------
    def _read_config(self, config: ModelSizes | dict[str, Any] | None) -> LlavaConfig:
        if config is not None:
            config = ModelSizes.of(config)
            vision = CLIPVisionConfig(**config.vision)
            text = LlamaConfig(**config.text)
            return LlavaConfig(  # transformers checks the strategy ("default" / "full") and the layer (int / list)
                vision_config=vision,
                text_config=text,
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
                projector_hidden_act=config.projector_hidden_act,
            )
        config_file, raw = read_config_json(
            self.checkpoint,
            "a transformers LLaVA checkpoint directory (config.json with model_type 'llava', *.safetensors, tokenizer files)",
        )
        self._check_model_base(config_file, raw)
        if llava_release.is_language_model_config(raw):
            return self._language_model_config(config_file, raw)
        if llava_release.is_release_config(raw):
            self.release_layout = True
            pads = raw.get("image_aspect_ratio") == "pad"  # LLaVA's process_images pads only then
            # a stage-1 output's config.json says how the projector was pretrained, not how this model will read images
            if pads != self.pad_to_square and not llava_release.is_projector_release(self.checkpoint):
                warnings.warn(
                    f"{config_file}: image_aspect_ratio {raw.get('image_aspect_ratio')!r} means LLaVA {'pads' if pads else 'does not pad'} "
                    f"images to a square, this backbone has pad_to_square={self.pad_to_square}; pass pad_to_square={pads} to match",
                    stacklevel=2,
                )
            try:
                return llava_release.release_llava_config(config_file, raw, self.vision_tower)
            except llava_release.ReleaseLayoutError as error:
                raise CheckpointError(str(error)) from error
        if raw.get("model_type") != "llava":
            raise CheckpointError(
                f"{config_file} has model_type {raw.get('model_type')!r}, expected 'llava' "
                "(the transformers LLaVA layout, as llava-hf/llava-1.5-7b-hf is published, or "
                f"{llava_release.RELEASE_LAYOUT})"
            )
        if raw.get("text_config", {}).get("model_type", "llama") != "llama":
            raise CheckpointError(f"{config_file}: text_config.model_type must be 'llama' for LlavaBackbone")
        return LlavaConfig.from_pretrained(self.checkpoint)

    def _check_model_base(self, config_file: Path, raw: dict) -> None:
        """``model_base`` comes with LLaVA's LoRA or stage-1 outputs, and only with them (its loader's rule)."""
        lora = llava_release.is_lora_release(self.checkpoint)
        projector = llava_release.is_projector_release(self.checkpoint) and not lora
        if self.model_base is None:
            if lora or projector:
                what = ("LoRA adapters (adapter_config.json)", llava_release.LORA_LAYOUT) if lora else (
                    f"a projector alone ({llava_release.PROJECTOR_FILE})", llava_release.PROJECTOR_LAYOUT)
                raise CheckpointError(
                    f"{self.checkpoint} holds {what[0]}: pass model_base, the LLM directory it was trained on; expected {what[1]}"
                )
            return
        if not (lora or projector):
            raise CheckpointError(
                f"model_base={self.model_base} is read only for LLaVA's LoRA output (adapter_config.json) or stage-1 output "
                f"({llava_release.PROJECTOR_FILE}), and {self.checkpoint} holds neither: drop model_base"
            )
        if not self.model_base.is_dir():
            raise CheckpointError(f"model_base {self.model_base} does not exist; it must be {llava_release.BASE_LAYOUT}")
        if not llava_release.is_release_config(raw):
            layout = llava_release.LORA_LAYOUT if lora else llava_release.PROJECTOR_LAYOUT
            raise CheckpointError(f"{config_file} is not the LLaVA release's config.json; expected {layout}")

    def _language_model_config(self, config_file: Path, raw: dict) -> LlavaConfig:
        """A Llama LLM (Vicuna) and a CLIP tower: LLaVA-1.5 built on them with a new projector, as LLaVA's stage 1."""
        if self.vision_tower is None:
            raise CheckpointError(
                f"{config_file} is a Llama language model, not LLaVA: to build LLaVA-1.5 on it (LLaVA's stage 1, a new "
                f"projector) pass vision_tower, {llava_release.TOWER_LAYOUT}"
            )
        self.release_layout = True
        warnings.warn(
            f"{self.checkpoint} is a language model: LLaVA-1.5 is built on it and {self.vision_tower} with a new projector "
            "(LLaVA's stage 1, which trains the projector); its answers mean nothing before that",
            UserWarning,
            stacklevel=3,
        )
        try:
            return llava_release.language_model_llava_config(config_file, raw, self.vision_tower)
        except llava_release.ReleaseLayoutError as error:
            raise CheckpointError(str(error)) from error

    def build(self) -> None:
        if self.model is not None:
            return
        tokenizer = self.tokenizer
        if building_on_meta() and self.checkpoint is not None:  # shapes only (a memory plan): nothing read
            model = self._skeleton(tokenizer)
        elif self.release_layout:
            model = self._load_release(tokenizer)
        elif self.checkpoint is not None:
            if not any(self.checkpoint.glob("*.safetensors")):
                raise CheckpointError(f"{self.checkpoint} holds no *.safetensors weight file")
            try:
                model, loading = LlavaForConditionalGeneration.from_pretrained(
                    self.checkpoint, dtype=self.torch_dtype, attn_implementation=self.attn_implementation,
                    output_loading_info=True,
                )
            except Exception as error:  # a truncated shard, a tensor of another shape: transformers names no file
                raise CheckpointError(
                    f"{self.checkpoint}: transformers could not load its weights ({type(error).__name__}: {error}); a weight "
                    "file is truncated or the checkpoint holds another model size than its config.json"
                ) from error
            # transformers only reports what it did not find (and initialises it at random): a model that trains on
            # random layers must not start silently
            missing, unexpected = sorted(loading.get("missing_keys", ())), sorted(loading.get("unexpected_keys", ()))
            if missing or unexpected:
                raise CheckpointError(
                    f"{self.checkpoint}: the weight files do not match config.json's model: missing keys "
                    f"{missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)}), unexpected keys "
                    f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)})"
                )
            image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
            if image_token_id != model.config.image_token_id:
                raise CheckpointError(
                    f"{self.checkpoint}: the tokenizer's {IMAGE_TOKEN} id {image_token_id} differs from "
                    f"config.json image_token_id {model.config.image_token_id}"
                )
        else:
            config = self.llava_config
            text = config.text_config
            text.vocab_size = len(tokenizer)
            text.pad_token_id = tokenizer.pad_token_id
            text.bos_token_id = tokenizer.bos_token_id
            text.eos_token_id = tokenizer.eos_token_id
            config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
            config._attn_implementation = self.attn_implementation
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                model = LlavaForConditionalGeneration(config).to(self.torch_dtype)
        model.train()  # from_pretrained hands back eval mode; a built backbone starts in train mode either way
        self.llava_config = model.config
        self.model = model

    def _skeleton(self, tokenizer: PreTrainedTokenizerBase) -> LlavaForConditionalGeneration:
        """The checkpoint's modules with its config's sizes, on the meta device: no weight file is read."""
        config = self.llava_config
        if self.release_layout:  # as _load_release: the vocabulary grown by the added <image> token
            config.text_config.vocab_size = len(tokenizer)
        config._attn_implementation = self.attn_implementation
        return LlavaForConditionalGeneration(config).to(self.torch_dtype)

    def _load_release(self, tokenizer: PreTrainedTokenizerBase) -> LlavaForConditionalGeneration:
        """The original release layout: vocabulary grown by the added <image> token, weights mapped by name."""
        config = self.llava_config
        config.text_config.vocab_size = len(tokenizer)
        config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        try:
            return llava_release.load_release_model(
                self.checkpoint, self.vision_tower, config, self.torch_dtype, self.attn_implementation, self.model_base,
                self.seed,
            )
        except llava_release.ReleaseLayoutError as error:
            raise CheckpointError(str(error)) from error

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            tokenizer = self._load_tokenizer()
            if self.release_layout and IMAGE_TOKEN not in tokenizer.get_vocab():
                # the release splices images in at a sentinel id; transformers' LLaVA needs a real token
                tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
            if IMAGE_TOKEN not in tokenizer.get_vocab():
                raise CheckpointError(f"the tokenizer in {self.tokenizer_dir} has no {IMAGE_TOKEN} token")
            self._tokenizer = tokenizer
        return self._tokenizer

    @property
    def image_processor(self) -> CLIPImageProcessor:
        """CLIP's preprocessing, resized with PIL as LLaVA's (``pil_image_processors.py``)."""
        if self._image_processor is None:
            found = [d for d in (self.checkpoint, self.vision_tower) if d and has_image_processor(d)]
            if found:
                self._image_processor = pil_clip_processor(found[0])
            else:
                size = self.llava_config.vision_config.image_size
                self._image_processor = pil_clip_processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return self._image_processor

    # --- text side -------------------------------------------------------------------------------
    @property
    def num_image_tokens(self) -> int:
        vision = self.llava_config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        return patches + int(self.llava_config.vision_feature_select_strategy == "full")  # "full" keeps CLS

    # --- image side ------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, with_attention: bool = False) -> VisualFeatures:
        tower = self.model.model.vision_tower
        outputs = tower(pixel_values.to(tower.dtype), output_hidden_states=True)
        layers = self.llava_config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        selected = torch.cat([outputs.hidden_states[layer] for layer in layers], dim=-1)  # [B, 1 + N, C * layers]
        full = self.llava_config.vision_feature_select_strategy == "full"
        features = selected if full else selected[:, 1:]  # "default" drops CLS, as LLaVA-1.5
        if not with_attention:
            return VisualFeatures(features=features)
        if full:
            raise ValueError(
                "vision_feature_select_strategy 'full' keeps the CLS token among the image features; a token selector "
                "that reads CLS attention (PruMerge) needs the patch tokens only: use the 'default' strategy"
            )
        # As the PruMerge release reads it: the q / k projections of the tower's last encoder layer, on
        # what that layer's attention sees (layer_norm1 of the penultimate hidden states), attention over
        # the whole width (not per head), scaled by 1 / sqrt(C); only the CLS query row is needed.
        last = getattr(tower, "vision_model", tower).encoder.layers[-1]  # CLIPVisionModel or its transformer
        x = last.layer_norm1(outputs.hidden_states[-2])  # [B, 1 + N, C]
        queries = last.self_attn.q_proj(x[:, :1])  # [B, 1, C]
        keys = last.self_attn.k_proj(x)  # [B, 1 + N, C]
        scores = queries @ keys.transpose(1, 2) * keys.shape[-1] ** -0.5  # [B, 1, 1 + N]
        cls_attention = scores.float().softmax(-1)[:, 0, 1:]  # [B, N], CLS -> patches
        return VisualFeatures(features=features, cls_attention=cls_attention, keys=keys[:, 1:])

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)

    # --- LLM side --------------------------------------------------------------------------------
    @property
    def shape(self) -> DecoderShape:
        text = self.llava_config.text_config
        vocab = len(self._tokenizer) if self.model is None and self._tokenizer is not None else text.vocab_size
        return DecoderShape(
            num_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            intermediate_size=text.intermediate_size,
            vocab_size=vocab,
        )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.language_model.embed_tokens(input_ids)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.language_model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.model.model.language_model.norm

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def rotary_embeddings(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.model.language_model.rotary_emb(x, position_ids)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        inner = self.model.model
        return {
            "vision_tower": list(inner.vision_tower.parameters()),
            "projector": list(inner.multi_modal_projector.parameters()),
            "llm": list(inner.language_model.parameters()) + list(self.model.lm_head.parameters()),
        }

    # --- persistence -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """The transformers LLaVA layout: weights and config, ``preprocessor_config.json`` (as transformers 4
        wrote it), and what ``LlavaProcessor.from_pretrained`` reads (``processor_config.json``, the chat
        template, the tokenizer)."""
        directory = Path(directory)
        self.model.save_pretrained(directory, safe_serialization=True)
        self.image_processor.save_pretrained(directory)
        self.processor().save_pretrained(directory)

    def processor(self) -> LlavaProcessor:
        """transformers' LlavaProcessor equivalent to this backbone's inputs: the image processor, the tokenizer,
        the chat template (as Jinja), and the patch size and strategy that give ``num_image_tokens``
        placeholders per image (CLIP's CLS is the one additional token). Its image processor is transformers'
        LlavaImageProcessor (resizing with PIL) with the CLIP settings, padding to a square of the mean colour when
        ``pad_to_square`` (LLaVA-1.5's expand2square)."""
        config = self.llava_config
        own = ("image_processor_type", "processor_class", "do_pad")  # set here, whatever the loaded config said
        settings = {key: value for key, value in self.image_processor.to_dict().items() if key not in own}
        return LlavaProcessor(
            image_processor=pil_llava_processor(**settings, do_pad=self.pad_to_square),
            tokenizer=self.tokenizer,
            patch_size=config.vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            chat_template=self.chat_template.jinja(),
            image_token=IMAGE_TOKEN,
            num_additional_image_tokens=1,
        )

