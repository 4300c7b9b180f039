"""Pure nn.Modules of the backbones (DINOv2's learned-position ViTs, DINOv3's RoPE ViTs) and their heads;
importable with torch alone."""

from dinoreg.models.backbones import ALL_ARCHS, POS_EMBED_TYPES, arch_family, backbone_from_arch_kwargs, build_backbone
from dinoreg.models.head import DINOHead
from dinoreg.models.attention import ATTENTION_BACKENDS
from dinoreg.models.ffn import FFN_LAYERS
from dinoreg.models.layers import CHECKPOINTING_MODES
from dinoreg.models.vit import (
    ARCH_DIMS,
    ARCHS,
    DinoVisionTransformer,
    VisionTransformer,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_tiny,
)
from dinoreg.models.rope_vit import ROPE_FFN_LAYERS, ROPE_PRESETS, RopeVisionTransformer, build_rope_backbone
from dinoreg.models.weights import CheckpointMismatchError, load_backbone, load_state_dict_strict, save_backbone

__all__ = [
    "ARCHS", "ARCH_DIMS", "ATTENTION_BACKENDS", "CHECKPOINTING_MODES", "FFN_LAYERS", "CheckpointMismatchError", "DINOHead", "DinoVisionTransformer",
    "ALL_ARCHS", "POS_EMBED_TYPES", "ROPE_FFN_LAYERS", "ROPE_PRESETS", "RopeVisionTransformer", "VisionTransformer",
    "arch_family", "backbone_from_arch_kwargs", "build_rope_backbone",
    "build_backbone", "load_backbone", "load_state_dict_strict", "save_backbone",
    "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2",
]
