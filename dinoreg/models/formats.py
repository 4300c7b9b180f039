"""Conversions of a backbone between our (official DINOv2) layout and those of Hugging Face transformers and timm.

Input everywhere: ``state_dict`` with the official DINOv2 hub keys (``DinoVisionTransformer.state_dict()``)
and ``arch_kwargs`` (``model.arch_kwargs``; missing entries take the constructor's defaults). Output: tensors
and metadata only; nothing is written or downloaded here. The state dict must fit ``arch_kwargs`` exactly.

Hugging Face. Tensors carry the names of the official hub checkpoints (``facebook/dinov2-*``,
``facebook/dinov2-with-registers-*``): older transformers load them as they are, and 5.x renames them on
load (``attention.attention.query`` -> ``attention.q_proj``, ``mlp.weights_in`` -> ``gate_proj``/``up_proj``,
see ``transformers/conversion_mapping.py``), so one file serves both. Write them with
``safetensors.torch.save_file(tensors, "model.safetensors", metadata={"format": "pt"})`` next to
``config.json``.

Position embeddings at other input sizes: each HF class hard-codes one resize, and neither config has a flag
for it (transformers 5.23, ``interpolate_pos_encoding``):

* ``Dinov2WithRegistersModel``: ``F.interpolate(size=grid, mode="bicubic", antialias=True)``, i.e. our
  ``interpolate_antialias=True, interpolate_offset=0.0`` (the official registers family);
* ``Dinov2Model``: ``F.interpolate(size=grid, mode="bicubic")`` without antialiasing, i.e. our
  ``interpolate_antialias=False, interpolate_offset=0.0``. This is *not* the legacy family of the official
  models without registers (``scale_factor=(grid + 0.1) / M``), which only old transformers releases used.

A model whose interpolation its target class does not reproduce is refused (``ValueError``) unless the caller
accepts outputs that agree only at ``img_size`` (``allow_interpolation_mismatch=True``).

timm. Follows timm's ``_convert_dinov2`` (``timm/models/vision_transformer.py``): with registers the model is a
``no_embed_class`` one, so the cls position is folded into ``cls_token`` and ``pos_embed`` covers patches only.

The DINOv3 (RoPE) family has its own module, :mod:`dinoreg.models.rope_formats`: Hugging Face's ``DINOv3ViTModel``
and timm's ``Eva`` DINOv3 models (``vit_*_patch16_dinov3*``). ``to_hf``, ``to_timm``, ``from_hf`` and ``from_timm``
dispatch on the family (``arch_kwargs`` with ``n_storage_tokens`` / ``pos_embed_rope_*``, or a ``dinov3_vit``
config). The errors both families raise live in :mod:`dinoreg.models.format_common`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from dinoreg.models.format_common import FormatError, TimmNameError, completed_arch_kwargs, copy_hf_block
from dinoreg.models.ffn import swiglu_hidden_features
from dinoreg.models.rope_formats import (
    HF_DINOV3_ARCHITECTURE,
    HF_DINOV3_MODEL_TYPE,
    resolve_rope_timm_name,
    rope_from_hf,
    rope_from_timm,
    rope_to_hf,
    rope_to_timm,
)
from dinoreg.models.rope_vit import is_rope_arch
from dinoreg.models.strict import CheckpointMismatchError, check_state_dict_fits
from dinoreg.models.vit import DinoVisionTransformer

# (interpolate_antialias, interpolate_offset) that each HF class reproduces when it resizes position embeddings
HF_INTERPOLATION: dict[str, tuple[bool, float]] = {
    "Dinov2WithRegistersModel": (True, 0.0),
    "Dinov2Model": (False, 0.0),
}
HF_MODEL_TYPES = {"Dinov2WithRegistersModel": "dinov2_with_registers", "Dinov2Model": "dinov2"}

# (embed_dim, depth, num_heads, ffn family) -> the size word of timm's DINOv2 model names (all patch 14)
TIMM_SIZES: dict[tuple[int, int, int, str], str] = {
    (384, 12, 6, "mlp"): "small",
    (768, 12, 12, "mlp"): "base",
    (1024, 24, 16, "mlp"): "large",
    (1536, 40, 24, "swiglu"): "giant",
}
TIMM_REGISTER_COUNTS = (0, 4)


# timm's DINOv2 entry points that build SwiGLUPacked MLPs (the only ones a SwiGLU backbone fits)
TIMM_SWIGLU_NAMES = ("vit_giant_patch14_dinov2", "vit_giant_patch14_reg4_dinov2")
# how timm resizes position embeddings for another input size (``dynamic_img_size=True``):
# ``resample_abs_pos_embed``, bicubic to the exact grid with antialiasing, i.e. our (antialias, offset)
TIMM_INTERPOLATION = (True, 0.0)


def full_arch_kwargs(arch_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``arch_kwargs`` completed with ``DinoVisionTransformer``'s defaults; unknown names are an error."""
    return completed_arch_kwargs(DinoVisionTransformer, arch_kwargs)


def checked_state_dict(state_dict: Mapping[str, Tensor], arch: Mapping[str, Any]) -> dict[str, Tensor]:
    """``state_dict`` as a plain dict, after checking it has exactly the keys and shapes of ``arch``'s model."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost even for ViT-g
        expected = DinoVisionTransformer(**arch).state_dict()
    check_state_dict_fits(state_dict, expected, given_name="state dict", expected_name="arch_kwargs",
                          hint="Pass the model's own arch_kwargs and flat official keys "
                               "(dinoreg.models.weights.read_checkpoint).")
    return {k: state_dict[k].detach() for k in expected}


def _with_zero_biases(sd: dict[str, Tensor], arch: Mapping[str, Any]) -> dict[str, Tensor]:
    """Add zero biases where ours are disabled: HF always has output-projection and FFN biases, and timm ties
    the FFN biases to ``proj_bias``. A zero bias is exactly a missing one."""
    out = dict(sd)
    names = []
    if not arch["proj_bias"]:
        names.append("attn.proj")
    if not arch["ffn_bias"]:
        names += ["mlp.fc1", "mlp.fc2"] if arch["ffn_layer"] == "mlp" else ["mlp.w12", "mlp.w3"]
    for i in range(arch["depth"]):
        for name in names:
            weight = sd[f"blocks.{i}.{name}.weight"]  # [out, in]
            out[f"blocks.{i}.{name}.bias"] = weight.new_zeros(weight.shape[0])
    return out


def _hf_interpolation_check(arch: Mapping[str, Any], architecture: str, allow_mismatch: bool) -> None:
    ours = (bool(arch["interpolate_antialias"]), float(arch["interpolate_offset"]))
    theirs = HF_INTERPOLATION[architecture]
    if ours == theirs or allow_mismatch:
        return
    hint = ("a registers model trained with interpolate_antialias=True, interpolate_offset=0.0" if theirs[0] else
            "a model without registers trained with interpolate_antialias=False, interpolate_offset=0.0")
    raise FormatError(
        f"transformers' {architecture} would differ from this model at input sizes other than {arch['img_size']}px: "
        f"it resizes position embeddings with interpolate_antialias={theirs[0]}, interpolate_offset={theirs[1]} "
        f"(hard-coded in interpolate_pos_encoding, no config flag), this model with "
        f"interpolate_antialias={ours[0]}, interpolate_offset={ours[1]}. Export {hint}, or pass "
        f"allow_interpolation_mismatch=True to accept outputs that agree only at {arch['img_size']}px."
    )


def _hf_tensors(sd: Mapping[str, Tensor], arch: Mapping[str, Any]) -> dict[str, Tensor]:
    out = {
        "embeddings.cls_token": sd["cls_token"],  # [1, 1, D]
        "embeddings.mask_token": sd["mask_token"],  # [1, D]
        "embeddings.position_embeddings": sd["pos_embed"],  # [1, 1 + M*M, D]
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    if arch["num_register_tokens"]:
        out["embeddings.register_tokens"] = sd["register_tokens"]  # [1, R, D]
    for i in range(arch["depth"]):
        ours, theirs = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias") if arch["qkv_bias"] else ("weight",):
            # qkv rows are [q; k; v]; clones, so the three never share storage (safetensors refuses that)
            for name, part in zip(("query", "key", "value"), sd[f"{ours}attn.qkv.{kind}"].chunk(3, dim=0)):
                out[f"{theirs}attention.attention.{name}.{kind}"] = part.clone()
        renames = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.output.dense"}
        if arch["ffn_layer"] == "mlp":
            renames |= {"mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        else:  # packed [w1; w2] is HF's weights_in, chunked the same way: silu(first half) * second half
            renames |= {"mlp.w12": "mlp.weights_in", "mlp.w3": "mlp.weights_out"}
        for src, dst in renames.items():
            for kind in ("weight", "bias"):
                out[f"{theirs}{dst}.{kind}"] = sd[f"{ours}{src}.{kind}"]
        for ls in ("1", "2"):
            gamma = sd.get(f"{ours}ls{ls}.gamma")
            # HF always scales; without layer scale ours is a scale of exactly one
            out[f"{theirs}layer_scale{ls}.lambda1"] = gamma if gamma is not None else torch.ones_like(sd["norm.weight"])
    return out


def to_hf(
    state_dict: Mapping[str, Tensor],
    arch_kwargs: Mapping[str, Any],
    *,
    allow_interpolation_mismatch: bool = False,
    allow_periods_mismatch: bool = False,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config.json dict, tensors)`` of ``Dinov2WithRegistersModel`` (registers > 0) or ``Dinov2Model``.

    Raises ``ValueError`` when the target class would silently differ from ours: at other input sizes (see the
    module docstring; ``allow_interpolation_mismatch`` waives only this), or when its config cannot express the
    architecture (a non-integer ``mlp_ratio``: transformers 5.x types it ``int``).
    """
    if is_rope_arch(arch_kwargs):
        return rope_to_hf(state_dict, arch_kwargs, allow_periods_mismatch)
    arch = full_arch_kwargs(arch_kwargs)
    sd = _with_zero_biases(checked_state_dict(state_dict, arch), arch)
    registers = arch["num_register_tokens"]
    architecture = "Dinov2WithRegistersModel" if registers else "Dinov2Model"
    _hf_interpolation_check(arch, architecture, allow_interpolation_mismatch)
    mlp_ratio = float(arch["mlp_ratio"])
    if not mlp_ratio.is_integer():
        raise FormatError(f"mlp_ratio={arch['mlp_ratio']} is not an integer; transformers 5.x Dinov2 configs type "
                         "mlp_ratio as int, so a Hugging Face export cannot express this model")
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": HF_MODEL_TYPES[architecture],
        "hidden_size": arch["embed_dim"],
        "num_hidden_layers": arch["depth"],
        "num_attention_heads": arch["num_heads"],
        "mlp_ratio": int(mlp_ratio),
        "hidden_act": "gelu",  # exact (erf) GELU, as our nn.GELU
        "use_swiglu_ffn": arch["ffn_layer"] != "mlp",
        "image_size": arch["img_size"],  # with patch_size: the grid HF resizes position embeddings from
        "patch_size": arch["patch_size"],
        "num_channels": arch["in_chans"],
        "qkv_bias": bool(arch["qkv_bias"]),
        "layerscale_value": float(arch["init_values"] or 1.0),
        "layer_norm_eps": 1e-6,
        "num_register_tokens": registers,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "initializer_range": 0.02,
        "apply_layernorm": True,
        "reshape_hidden_states": True,
    }
    if not registers:
        config["use_mask_token"] = True  # our state dicts always carry mask_token
    return config, _hf_tensors(sd, arch)


def timm_resizes_like(arch_kwargs: Mapping[str, Any]) -> bool:
    """Whether timm's ``dynamic_img_size`` resizes position embeddings as this model does (see
    ``TIMM_INTERPOLATION``); if not, outputs at other input sizes would differ from ours. RoPE backbones resample
    nothing: always."""
    if is_rope_arch(arch_kwargs):
        return True
    arch = full_arch_kwargs(arch_kwargs)
    return (bool(arch["interpolate_antialias"]), float(arch["interpolate_offset"])) == TIMM_INTERPOLATION


def timm_create_kwargs(arch_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``timm.create_model`` kwargs for a VisionTransformer matching ``arch_kwargs`` (no head: ``num_classes=0``).
    They set every architecture field, so any timm ViT entry point builds the model with them (a SwiGLU one:
    one of ``TIMM_SWIGLU_NAMES``, which set ``mlp_layer``). ``dynamic_img_size`` is on (any multiple of the patch
    size) when timm resizes position embeddings as the model does, else off (timm then refuses other sizes
    rather than computing other features)."""
    arch = full_arch_kwargs(arch_kwargs)
    dim, registers = arch["embed_dim"], arch["num_register_tokens"]
    kwargs: dict[str, Any] = dict(
        img_size=arch["img_size"], patch_size=arch["patch_size"], in_chans=arch["in_chans"], embed_dim=dim,
        depth=arch["depth"], num_heads=arch["num_heads"], mlp_ratio=arch["mlp_ratio"],
        qkv_bias=bool(arch["qkv_bias"]), proj_bias=True, init_values=arch["init_values"] or None,
        reg_tokens=registers, no_embed_class=registers > 0, num_classes=0,
        dynamic_img_size=timm_resizes_like(arch),
    )
    if arch["ffn_layer"] != "mlp":
        packed = 2 * swiglu_hidden_features(int(dim * arch["mlp_ratio"]))  # fc1 rows: [w1; w2]
        # timm's GluMlp takes fc1 width int(dim * mlp_ratio): pick a ratio that lands exactly on it
        ratio = packed / dim
        kwargs["mlp_ratio"] = ratio if int(dim * ratio) == packed else (packed + 0.5) / dim
    return kwargs


def _timm_tensors(sd: Mapping[str, Tensor], arch: Mapping[str, Any]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in ("mask_token", "register_tokens", "cls_token", "pos_embed"):
            continue
        if key.startswith("blocks.") and ".mlp.w12." in key:
            key = key.replace(".mlp.w12.", ".mlp.fc1.")
        elif key.startswith("blocks.") and ".mlp.w3." in key:
            key = key.replace(".mlp.w3.", ".mlp.fc2.")
        out[key] = value
    if arch["num_register_tokens"]:
        # no_embed_class: registers get no position, so the cls position is folded into the cls token
        out["reg_token"] = sd["register_tokens"]  # [1, R, D]
        out["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]  # [1, 1, D]
        out["pos_embed"] = sd["pos_embed"][:, 1:].clone()  # [1, M*M, D]
    else:
        out["cls_token"], out["pos_embed"] = sd["cls_token"], sd["pos_embed"]  # [1, 1 + M*M, D]
    return out


def _family(arch: Mapping[str, Any]) -> str:
    return "mlp" if arch["ffn_layer"] == "mlp" else "swiglu"


def timm_model_name(arch_kwargs: Mapping[str, Any]) -> str | None:
    """timm's registered DINOv2 name for this architecture, or ``None`` when timm has none."""
    arch = full_arch_kwargs(arch_kwargs)
    size = TIMM_SIZES.get((arch["embed_dim"], arch["depth"], arch["num_heads"], _family(arch)))
    registers = arch["num_register_tokens"]
    if size is None or arch["patch_size"] != 14 or float(arch["mlp_ratio"]) != 4.0 or registers not in TIMM_REGISTER_COUNTS:
        return None
    return f"vit_{size}_patch14_{'reg4_' if registers else ''}dinov2"


def suggested_timm_name(arch_kwargs: Mapping[str, Any]) -> str:
    """A timm DINOv2 entry point that builds this architecture with :func:`timm_create_kwargs`: the registered
    name of the nearest width in the same FFN family, with registers if the model has them."""
    arch = full_arch_kwargs(arch_kwargs)
    sizes = [(abs(dim - arch["embed_dim"]), size) for (dim, _, _, family), size in TIMM_SIZES.items()
             if family == _family(arch)]
    return f"vit_{min(sizes)[1]}_patch14_{'reg4_' if arch['num_register_tokens'] else ''}dinov2"


def resolve_timm_name(arch_kwargs: Mapping[str, Any], given: str | None) -> str:
    """The timm entry point to build this architecture with: ``given`` (checked to fit a SwiGLU model), or the
    registered one; :class:`TimmNameError` naming a name that works when neither fits. A RoPE backbone takes one of
    timm's DINOv3 entry points, a learned-position one none of them."""
    if is_rope_arch(arch_kwargs):
        return resolve_rope_timm_name(arch_kwargs, given)
    arch = full_arch_kwargs(arch_kwargs)
    if given is not None and "dinov3" in given:
        raise TimmNameError(f"timm name {given!r} builds a DINOv3 (RoPE) model, and this backbone has learned "
                            f"position embeddings (DINOv2's family); pass e.g. --timm-name {suggested_timm_name(arch)}")
    if given is not None:
        if _family(arch) == "swiglu" and given not in TIMM_SWIGLU_NAMES:
            raise TimmNameError(f"timm name {given!r} builds MLP blocks; a SwiGLU backbone needs an entry point that "
                                f"builds SwiGLUPacked ones: {' or '.join(TIMM_SWIGLU_NAMES)}")
        return given
    name = timm_model_name(arch)
    if name is None:
        raise TimmNameError(
            f"timm registers no DINOv2 model for embed_dim={arch['embed_dim']}, depth={arch['depth']}, "
            f"num_heads={arch['num_heads']}, ffn_layer={arch['ffn_layer']!r}, mlp_ratio={arch['mlp_ratio']}, "
            f"patch_size={arch['patch_size']}, num_register_tokens={arch['num_register_tokens']} (it has "
            f"ViT-S/B/L with mlp and ViT-g with SwiGLU, patch 14, 0 or 4 registers). Name an entry point to build "
            f"it with: timm_name={suggested_timm_name(arch)!r} works, since the stored create_model kwargs set every "
            f"architecture field.")
    return name


def to_timm(
    state_dict: Mapping[str, Tensor],
    arch_kwargs: Mapping[str, Any],
    *,
    timm_name: str | None = None,
    allow_periods_mismatch: bool = False,
) -> tuple[dict[str, Tensor], str, dict[str, Any]]:
    """``(tensors, timm model name, create_model kwargs)``; the tensors load with ``strict=True`` into
    ``timm.create_model(name, **kwargs)``.

    ``timm_name``: the entry point to build with (default: timm's registered DINOv2 name for the architecture).
    Raises :class:`TimmNameError` when timm registers no name and none is given (timm has ViT-S/B/L and ViT-g,
    patch 14, with 0 or 4 registers), or when the given one cannot build a SwiGLU model.
    """
    if is_rope_arch(arch_kwargs):
        return rope_to_timm(state_dict, arch_kwargs, timm_name, allow_periods_mismatch)
    arch = full_arch_kwargs(arch_kwargs)
    name = resolve_timm_name(arch, timm_name)
    sd = _with_zero_biases(checked_state_dict(state_dict, arch), arch)
    return _timm_tensors(sd, arch), name, timm_create_kwargs(arch)


# ----------------------------------------------------------------------------------------------------------------
# back to our layout (dinoreg.load_backbone reads Hugging Face directories and our timm exports with these)

# transformers 5.x module names -> the hub names written by to_hf (both load)
_HF_NEW_NAMES = {".attention.q_proj.": ".attention.attention.query.", ".attention.k_proj.": ".attention.attention.key.",
                 ".attention.v_proj.": ".attention.attention.value.", ".attention.o_proj.": ".attention.output.dense."}


def from_hf(config: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(state_dict, arch_kwargs)`` of our backbone from a Dinov2(WithRegisters)Model ``config.json`` and
    its tensors (hub names, or transformers 5.x attention names). The interpolation is the one the HF class
    hard-codes, so our model computes what transformers computes at every input size. A ``DINOv3ViTModel`` config
    gives the RoPE family's (see :func:`dinoreg.models.rope_formats.rope_from_hf`)."""
    architecture = (config.get("architectures") or ["Dinov2Model"])[0]
    if architecture == HF_DINOV3_ARCHITECTURE or config.get("model_type") == HF_DINOV3_MODEL_TYPE:
        return rope_from_hf(config, tensors)
    if architecture not in HF_INTERPOLATION:
        raise CheckpointMismatchError(f"config.json describes {architecture}, not one of "
                                      f"{sorted([*HF_INTERPOLATION, HF_DINOV3_ARCHITECTURE])}")
    sd = {}
    for key, value in tensors.items():
        for new, hub in _HF_NEW_NAMES.items():
            key = key.replace(new, hub)
        sd[key.removeprefix("dinov2.")] = value
    depth, swiglu = config["num_hidden_layers"], config.get("use_swiglu_ffn", False)
    antialias, offset = HF_INTERPOLATION[architecture]
    arch = dict(img_size=config["image_size"], patch_size=config["patch_size"], in_chans=config.get("num_channels", 3),
                embed_dim=config["hidden_size"], depth=depth, num_heads=config["num_attention_heads"],
                mlp_ratio=float(config.get("mlp_ratio", 4)), qkv_bias=config.get("qkv_bias", True),
                init_values=float(config.get("layerscale_value", 1.0)),
                ffn_layer="swiglufused" if swiglu else "mlp",
                num_register_tokens=config.get("num_register_tokens", 0),
                interpolate_antialias=antialias, interpolate_offset=offset)
    try:
        out = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
               "mask_token": sd.get("embeddings.mask_token", torch.zeros_like(sd["layernorm.weight"])[None]),
               "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
               "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
               "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
        if arch["num_register_tokens"]:
            out["register_tokens"] = sd["embeddings.register_tokens"]
        renames = {"norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj"}
        renames |= {"mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3"} if swiglu else \
            {"mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        for i in range(depth):
            theirs, ours = f"encoder.layer.{i}.", f"blocks.{i}."
            for kind in ("weight", "bias") if arch["qkv_bias"] else ("weight",):
                out[f"{ours}attn.qkv.{kind}"] = torch.cat(
                    [sd[f"{theirs}attention.attention.{name}.{kind}"] for name in ("query", "key", "value")])
            copy_hf_block(out, sd, ours=ours, theirs=theirs, renames=renames)
    except KeyError as error:
        raise CheckpointMismatchError(f"not a Dinov2 Hugging Face checkpoint: missing tensor {error.args[0]}") from None
    return out, arch


def from_timm(tensors: Mapping[str, Tensor], arch_kwargs: Mapping[str, Any]) -> dict[str, Tensor]:
    """Our state dict from timm-layout ``tensors`` written by :func:`to_timm` for ``arch_kwargs``. With registers
    the cls position was folded into ``cls_token``: it comes back as a zero cls slot in ``pos_embed``, which
    computes the same tokens. ``mask_token`` (not in timm) comes back as zeros. RoPE backbones: see
    :func:`dinoreg.models.rope_formats.rope_from_timm`."""
    if is_rope_arch(arch_kwargs):
        return rope_from_timm(tensors, arch_kwargs)
    arch = full_arch_kwargs(arch_kwargs)
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if arch["ffn_layer"] != "mlp" and key.startswith("blocks."):
            key = key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        out[key] = value
    if arch["num_register_tokens"]:
        out["register_tokens"] = out.pop("reg_token")
        pos = out["pos_embed"]  # [1, M*M, D]
        out["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
    out["mask_token"] = out["cls_token"].new_zeros(1, arch["embed_dim"])
    with torch.device("meta"):  # drop the zero biases to_timm added where ours are disabled
        expected = set(DinoVisionTransformer(**arch).state_dict())
    return {key: value for key, value in out.items() if key in expected}
