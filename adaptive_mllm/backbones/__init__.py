from adaptive_mllm.backbones.base import Backbone, DecoderShape, InputProcessor, VisualFeatures
from adaptive_mllm.backbones.llava import LlavaBackbone
from adaptive_mllm.backbones.local import CheckpointError, ModelSizes
from adaptive_mllm.backbones.mipha import MiphaBackbone
from adaptive_mllm.backbones.templates import ChatTemplate

__all__ = [
    "Backbone", "ChatTemplate", "CheckpointError", "DecoderShape", "InputProcessor", "LlavaBackbone", "MiphaBackbone",
    "ModelSizes", "VisualFeatures",
]
