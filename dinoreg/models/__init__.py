"""Pure nn.Modules of the DINOv2 backbone; importable with torch alone."""

from dinoreg.models.head import DINOHead
from dinoreg.models.layers import ATTENTION_BACKENDS, CHECKPOINTING_MODES, FFN_LAYERS
from dinoreg.models.vit import (
    ARCH_DIMS,
    ARCHS,
    DinoVisionTransformer,
    build_backbone,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_tiny,
)
from dinoreg.models.weights import CheckpointMismatchError, load_backbone, load_state_dict_strict, save_backbone

__all__ = [
    "ARCHS", "ARCH_DIMS", "ATTENTION_BACKENDS", "CHECKPOINTING_MODES", "FFN_LAYERS", "CheckpointMismatchError", "DINOHead", "DinoVisionTransformer",
    "build_backbone", "load_backbone", "load_state_dict_strict", "save_backbone",
    "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2",
]
