"""Both backbone families behind one name: the learned-position ViTs of DINOv2 (``vit_small`` ... ``vit_giant2``)
and the RoPE ViTs of DINOv3 (the presets ``vits16`` ... ``vit7b16``, or any DINOv2 arch name with
``pos_embed_type="rope"``, as DINOv3's own configs write it)."""

from __future__ import annotations

from typing import Any

from dinoreg.models.rope_vit import ROPE_PRESETS, RopeVisionTransformer, build_rope_backbone, is_rope_arch
from dinoreg.models.vit import ARCH_DIMS, DinoVisionTransformer, VisionTransformer
from dinoreg.models.vit import build_backbone as build_learned_backbone

POS_EMBED_TYPES = ("learned", "rope")
ALL_ARCHS = (*ARCH_DIMS, *ROPE_PRESETS)

__all__ = ["ALL_ARCHS", "POS_EMBED_TYPES", "arch_family", "backbone_from_arch_kwargs", "build_backbone"]


def arch_family(arch: str, pos_embed_type: str | None = None) -> str:
    """``"rope"`` or ``"learned"``: a DINOv3 preset is RoPE; a DINOv2 arch is what ``pos_embed_type`` says
    (``learned`` when None)."""
    if arch in ROPE_PRESETS:
        if pos_embed_type not in (None, "rope"):
            raise ValueError(f"arch {arch!r} is a RoPE preset; pos_embed_type={pos_embed_type!r} does not fit it")
        return "rope"
    if arch not in ARCH_DIMS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ALL_ARCHS)}")
    if pos_embed_type not in (None, *POS_EMBED_TYPES):
        raise ValueError(f"unknown pos_embed_type {pos_embed_type!r}; choose one of {POS_EMBED_TYPES}")
    return pos_embed_type or "learned"


def build_backbone(arch: str = "vit_small", *, pos_embed_type: str | None = None, **kwargs: Any) -> VisionTransformer:
    """Build ``arch`` with its family's official keyword arguments (DINOv2's for ``vit_*``, DINOv3's for RoPE);
    ``embed_dim``/``depth``/``num_heads`` given in ``kwargs`` override the arch's (handy for tiny test models), and
    ``None`` values keep the arch's."""
    if arch_family(arch, pos_embed_type) == "learned":
        return build_learned_backbone(arch, **kwargs)
    if arch in ROPE_PRESETS:
        return build_rope_backbone(arch, **kwargs)
    embed_dim, depth, num_heads = ARCH_DIMS[arch]  # DINOv3's configs: vit_large with pos_embed_type rope
    dims = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}
    given = {key: value for key, value in kwargs.items() if value is not None}
    return RopeVisionTransformer(**{**dims, **given})


def backbone_from_arch_kwargs(arch_kwargs: dict[str, Any]) -> VisionTransformer:
    """Rebuild a backbone from its ``arch_kwargs`` (as stored in checkpoints and exports): the RoPE family when they
    are its arguments (:func:`is_rope_arch`), else the learned-position family."""
    return (RopeVisionTransformer if is_rope_arch(arch_kwargs) else DinoVisionTransformer)(**arch_kwargs)
