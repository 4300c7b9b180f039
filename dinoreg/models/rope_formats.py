"""The DINOv3 (RoPE) family's layouts: Hugging Face's ``DINOv3ViTModel`` and timm's ``Eva`` DINOv3 models
(``vit_*_patch16_dinov3*``). ``to_hf``, ``to_timm``, ``from_hf`` and ``from_timm`` of :mod:`dinoreg.models.formats`
dispatch here for a RoPE backbone (``arch_kwargs`` with ``n_storage_tokens`` / ``pos_embed_rope_*``, or a
``dinov3_vit`` config); inputs and outputs as there.

Both recompute the RoPE periods from one base in fp32 and rotate only the patches' queries and keys, as ours;
neither has min/max periods, other coordinate normalisations, RMSNorm or an untied class-token norm, so a model
using those is refused rather than exported to compute other features. The global/local class-token norm
untie is training-only (evaluation uses ``norm``): ``local_cls_norm`` is left out.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch
from torch import Tensor

from dinoreg.models.format_common import FormatError, TimmNameError, completed_arch_kwargs, copy_hf_block
from dinoreg.models.rope import RopePositionEmbedding
from dinoreg.models.rope_vit import ROPE_FFN_LAYERS, RopeVisionTransformer
from dinoreg.models.strict import CheckpointMismatchError, check_state_dict_fits

HF_DINOV3_ARCHITECTURE = "DINOv3ViTModel"
HF_DINOV3_MODEL_TYPE = "dinov3_vit"
ROPE_NORM_EPS = {"layernorm": 1e-6, "layernormbf16": 1e-5}  # our LayerNorm names -> their eps
# (embed_dim, depth, num_heads, ffn_layer) -> timm's DINOv3 entry point (the "_qkvb" variant has q/v biases)
TIMM_DINOV3_NAMES: dict[tuple[int, int, int, str], str] = {
    (192, 12, 3, "mlp"): "vit_tiny_patch16_dinov3",
    (384, 12, 6, "mlp"): "vit_small_patch16_dinov3",
    (384, 12, 6, "swiglu"): "vit_small_plus_patch16_dinov3",
    (768, 12, 12, "mlp"): "vit_base_patch16_dinov3",
    (1024, 24, 16, "mlp"): "vit_large_patch16_dinov3",
    (1280, 32, 20, "swiglu"): "vit_huge_plus_patch16_dinov3",
    (4096, 40, 32, "swiglu64"): "vit_7b_patch16_dinov3",
}
TIMM_DINOV3_QKVB_ONLY = ("vit_tiny_patch16_dinov3",)  # registered with q/v biases only
TIMM_DINOV3_NO_QKVB = ("vit_7b_patch16_dinov3",)  # registered without
_TIMM_DINOV3_NAME = re.compile(r"vit_[a-z0-9_]+_patch16_dinov3(_qkvb)?")
_ROPE_OTHER_FORMATS = ("export --format dinov3 or safetensors instead (dinoreg.load_backbone and the official code "
                       "read them)")


def full_rope_arch_kwargs(arch_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``arch_kwargs`` completed with ``RopeVisionTransformer``'s defaults; unknown names are an error."""
    return completed_arch_kwargs(RopeVisionTransformer, arch_kwargs)


def checked_rope_state_dict(state_dict: Mapping[str, Tensor], arch: Mapping[str, Any]) -> dict[str, Tensor]:
    """``state_dict`` as a plain dict, after checking it has exactly the keys and shapes of ``arch``'s RoPE model."""
    with torch.device("meta"):
        expected = RopeVisionTransformer(**arch).state_dict()
    check_state_dict_fits(state_dict, expected, given_name="state dict", expected_name="arch_kwargs",
                          hint="Pass the model's own arch_kwargs and its state_dict().")
    return {k: state_dict[k].detach() for k in expected}


def _rope_unportable(arch: Mapping[str, Any], target: str, sd: Mapping[str, Tensor], allow_periods_mismatch: bool
                     ) -> None:
    """Refuse what ``target`` (``"hf"`` or ``"timm"``) cannot compute as ours does, naming each reason."""
    problems = []
    periods = _periods_mismatch(arch, sd)
    if periods and not allow_periods_mismatch:
        problems.append(periods)
    if arch["norm_layer"] not in ROPE_NORM_EPS or (target == "timm" and arch["norm_layer"] != "layernormbf16"):
        problems.append(f"norm_layer={arch['norm_layer']!r} (" + ("timm's DINOv3 models hard-code LayerNorm eps 1e-5, "
                        "our 'layernormbf16'" if target == "timm" else "DINOv3ViTModel has LayerNorm only") + ")")
    if arch["untie_cls_and_patch_norms"]:
        problems.append("untie_cls_and_patch_norms=True (one final norm there)")
    if arch["pos_embed_rope_min_period"] is not None or arch["pos_embed_rope_base"] is None:
        problems.append("RoPE min/max periods (a base only there)")
    if arch["pos_embed_rope_normalize_coords"] != "separate":
        problems.append(f"pos_embed_rope_normalize_coords={arch['pos_embed_rope_normalize_coords']!r} "
                        "('separate' only there)")
    if arch["pos_embed_rope_dtype"] != "fp32":
        problems.append(f"pos_embed_rope_dtype={arch['pos_embed_rope_dtype']!r} (RoPE in fp32 there)")
    if target == "timm" and arch["qkv_bias"] and not arch["mask_k_bias"]:
        problems.append("a learned key bias (qkv_bias without mask_k_bias: timm's attention has none)")
    if problems:
        where = "transformers' DINOv3ViTModel" if target == "hf" else "timm's DINOv3 models"
        also = " (or pass allow_periods_mismatch=True to accept features that differ)" if periods else ""
        raise FormatError(f"{where} cannot compute this backbone as dinoreg does: {'; '.join(problems)}; "
                          f"{_ROPE_OTHER_FORMATS}{also}")


def _periods_mismatch(arch: Mapping[str, Any], sd: Mapping[str, Tensor]) -> str:
    """Why the model's ``rope_embed.periods`` buffer is not what its base gives in fp32, which transformers and timm
    recompute instead of reading it (empty when it is). The released DINOv3 files hold periods rounded to bf16 (timm
    notes it); a model continued from them keeps those, and a transformers or timm copy then differs by about 2e-3
    in its tokens (measured on ViT-S/16, docs/EXPORT.md)."""
    if arch["pos_embed_rope_base"] is None:
        return ""  # min/max periods: refused on their own
    expected = RopePositionEmbedding(arch["embed_dim"], num_heads=arch["num_heads"], base=arch["pos_embed_rope_base"],
                                     dtype="fp32").periods
    if torch.allclose(sd["rope_embed.periods"].float(), expected, rtol=1e-6, atol=0):
        return ""
    worst = ((sd["rope_embed.periods"].float() - expected).abs() / expected).max().item()
    return (f"rope_embed.periods differ from what base {arch['pos_embed_rope_base']} gives (relative {worst:.1e}, "
            "e.g. rounded to bf16 as in the released DINOv3 files), and they recompute them")


def _rope_mlp(arch: Mapping[str, Any], sd: Mapping[str, Tensor]) -> tuple[int, int | None]:
    """(hidden width, SwiGLU alignment or None for the GELU MLP)."""
    align = ROPE_FFN_LAYERS[arch["ffn_layer"]]
    first = "blocks.0.mlp.fc1.weight" if align is None else "blocks.0.mlp.w1.weight"
    return (sd[first].shape[0] if first in sd else int(arch["embed_dim"] * arch["ffn_ratio"])), align


def _split_qkv(sd: Mapping[str, Tensor], prefix: str, kind: str) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = sd[f"{prefix}attn.qkv.{kind}"].chunk(3, dim=0)
    return q.clone(), k.clone(), v.clone()  # clones: safetensors refuses tensors sharing storage


def _rope_hf_tensors(sd: Mapping[str, Tensor], arch: Mapping[str, Any]) -> dict[str, Tensor]:
    dim = arch["embed_dim"]
    out = {
        "embeddings.cls_token": sd["cls_token"],  # [1, 1, D]
        "embeddings.mask_token": sd["mask_token"].reshape(1, 1, dim),
        "embeddings.register_tokens": sd.get("storage_tokens", sd["cls_token"].new_zeros(1, 0, dim)),  # [1, S, D]
        "embeddings.patch_embeddings.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.bias": sd["patch_embed.proj.bias"],
        "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"],
    }
    gelu = ROPE_FFN_LAYERS[arch["ffn_layer"]] is None
    mlp = {"fc1": "up_proj", "fc2": "down_proj"} if gelu else {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"}
    for i in range(arch["depth"]):
        ours, theirs = f"blocks.{i}.", f"layer.{i}."  # the hub names; transformers 5 adds "model." on load
        for name, part in zip(("q_proj", "k_proj", "v_proj"), _split_qkv(sd, ours, "weight")):
            out[f"{theirs}attention.{name}.weight"] = part
        if arch["qkv_bias"]:
            q, k, v = _split_qkv(sd, ours, "bias")
            out[f"{theirs}attention.q_proj.bias"], out[f"{theirs}attention.v_proj.bias"] = q, v
            if not arch["mask_k_bias"]:
                out[f"{theirs}attention.k_proj.bias"] = k
        renames = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj",
                   **{f"mlp.{src}": f"mlp.{dst}" for src, dst in mlp.items()}}
        for src, dst in renames.items():
            for kind in ("weight", "bias"):
                if f"{ours}{src}.{kind}" in sd:
                    out[f"{theirs}{dst}.{kind}"] = sd[f"{ours}{src}.{kind}"]
        for ls in ("1", "2"):  # DINOv3ViTModel always scales: without LayerScale ours is a scale of one
            gamma = sd.get(f"{ours}ls{ls}.gamma")
            out[f"{theirs}layer_scale{ls}.lambda1"] = gamma if gamma is not None else torch.ones_like(sd["norm.weight"])
    return out


def rope_to_hf(state_dict: Mapping[str, Tensor], arch_kwargs: Mapping[str, Any], allow_periods_mismatch: bool
               ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    arch = full_rope_arch_kwargs(arch_kwargs)
    sd = checked_rope_state_dict(state_dict, arch)
    _rope_unportable(arch, "hf", sd, allow_periods_mismatch)
    hidden, align = _rope_mlp(arch, sd)
    config: dict[str, Any] = {
        "architectures": [HF_DINOV3_ARCHITECTURE], "model_type": HF_DINOV3_MODEL_TYPE,
        "hidden_size": arch["embed_dim"], "intermediate_size": hidden, "num_hidden_layers": arch["depth"],
        "num_attention_heads": arch["num_heads"], "use_gated_mlp": align is not None,
        "hidden_act": "gelu" if align is None else "silu",  # exact (erf) GELU, as our nn.GELU; SiLU gates SwiGLU
        "patch_size": arch["patch_size"], "image_size": arch["img_size"], "num_channels": arch["in_chans"],
        "query_bias": bool(arch["qkv_bias"]), "key_bias": bool(arch["qkv_bias"] and not arch["mask_k_bias"]),
        "value_bias": bool(arch["qkv_bias"]), "proj_bias": bool(arch["proj_bias"]), "mlp_bias": bool(arch["ffn_bias"]),
        "layerscale_value": float(arch["layerscale_init"] or 1.0), "layer_norm_eps": ROPE_NORM_EPS[arch["norm_layer"]],
        "rope_theta": float(arch["pos_embed_rope_base"]), "num_register_tokens": arch["n_storage_tokens"],
        # the training-time coordinate augmentations (off in eval mode, as ours)
        "pos_embed_shift": arch["pos_embed_rope_shift_coords"], "pos_embed_jitter": arch["pos_embed_rope_jitter_coords"],
        "pos_embed_rescale": arch["pos_embed_rope_rescale_coords"],
        "attention_dropout": 0.0, "drop_path_rate": 0.0, "initializer_range": 0.02,
        "apply_layernorm": True, "reshape_hidden_states": True,
    }
    return config, _rope_hf_tensors(sd, arch)


def _hf_norm_layer(eps: float) -> str:
    for name, value in ROPE_NORM_EPS.items():
        if math.isclose(eps, value, rel_tol=1e-6):
            return name
    raise CheckpointMismatchError(f"config.json has layer_norm_eps={eps}; dinoreg's LayerNorms have eps 1e-6 "
                                  "('layernorm') or 1e-5 ('layernormbf16')")


def rope_from_hf(config: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(state_dict, arch_kwargs)`` from a DINOv3ViTModel folder (hub names ``layer.{i}.`` or transformers 5's
    ``model.layer.{i}.``). The FFN's kind and ratio are left to the shapes (``load_backbone`` infers them)."""
    sd = {re.sub(r"^(?:dinov3\.)?(?:model\.)?layer\.", "layer.", key): value for key, value in tensors.items()}
    dim, depth, heads = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    q_bias, k_bias, v_bias = (config.get(f"{name}_bias", default) for name, default in
                              (("query", True), ("key", False), ("value", True)))
    arch = dict(img_size=_side(config.get("image_size", 224)), patch_size=_side(config.get("patch_size", 16)),
                in_chans=config.get("num_channels", 3), embed_dim=dim, depth=depth, num_heads=heads,
                pos_embed_rope_base=float(config.get("rope_theta", 100.0)), pos_embed_rope_min_period=None,
                pos_embed_rope_max_period=None, pos_embed_rope_normalize_coords="separate", pos_embed_rope_dtype="fp32",
                pos_embed_rope_shift_coords=config.get("pos_embed_shift"),
                pos_embed_rope_jitter_coords=config.get("pos_embed_jitter"),
                pos_embed_rope_rescale_coords=config.get("pos_embed_rescale", 2.0),
                qkv_bias=bool(q_bias or k_bias or v_bias), mask_k_bias=bool((q_bias or v_bias) and not k_bias),
                proj_bias=config.get("proj_bias", True), ffn_bias=config.get("mlp_bias", True),
                layerscale_init=float(config.get("layerscale_value", 1.0)),
                norm_layer=_hf_norm_layer(float(config.get("layer_norm_eps", 1e-5))),
                n_storage_tokens=config.get("num_register_tokens", 0),
                untie_cls_and_patch_norms=False, untie_global_and_local_cls_norm=False)
    gated = config.get("use_gated_mlp", False)
    activation = config.get("hidden_act", "gelu")
    if activation != ("silu" if gated else "gelu"):  # ours: SiLU-gated SwiGLU, or the exact GELU MLP
        raise CheckpointMismatchError(f"config.json has hidden_act={activation!r} with use_gated_mlp={gated}; dinoreg's "
                                      "DINOv3 backbones have 'silu' (gated) or 'gelu' (not gated)")
    mlp = {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"} if gated else {"up_proj": "fc1", "down_proj": "fc2"}
    try:
        out = {"cls_token": sd["embeddings.cls_token"], "mask_token": sd["embeddings.mask_token"].reshape(1, dim),
               "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
               "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
               "rope_embed.periods": RopePositionEmbedding(dim, num_heads=heads, base=arch["pos_embed_rope_base"],
                                                           dtype="fp32").periods,
               "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"]}
        if arch["n_storage_tokens"]:
            out["storage_tokens"] = sd["embeddings.register_tokens"]
        for i in range(depth):
            theirs, ours = f"layer.{i}.", f"blocks.{i}."
            out[f"{ours}attn.qkv.weight"] = torch.cat([sd[f"{theirs}attention.{n}_proj.weight"] for n in "qkv"])
            if arch["qkv_bias"]:  # a bias a projection lacks is a zero one; keys' is masked unless they have one
                zero = sd["norm.weight"].new_zeros(dim)
                out[f"{ours}attn.qkv.bias"] = torch.cat([sd.get(f"{theirs}attention.{n}_proj.bias", zero)
                                                         for n in "qkv"])
                if arch["mask_k_bias"]:
                    out[f"{ours}attn.qkv.bias_mask"] = torch.cat([zero + 1, zero, zero + 1])
            renames = {"norm1": "norm1", "norm2": "norm2", "attention.o_proj": "attn.proj",
                       **{f"mlp.{src}": f"mlp.{dst}" for src, dst in mlp.items()}}
            copy_hf_block(out, sd, ours=ours, theirs=theirs, renames=renames, optional_biases=True)
    except KeyError as error:
        raise CheckpointMismatchError(f"not a DINOv3ViTModel checkpoint: missing tensor {error.args[0]}") from None
    return out, arch


def _side(size: Any) -> int:
    """An image or patch size of a config: an int, or a square [h, w]."""
    if isinstance(size, int):
        return size
    if len(size) == 2 and size[0] == size[1]:
        return int(size[0])
    raise CheckpointMismatchError(f"config.json has a non-square size {size}; dinoreg's backbones take square ones")


def _timm_dinov3_family(arch: Mapping[str, Any]) -> str:
    return "mlp" if ROPE_FFN_LAYERS[arch["ffn_layer"]] is None else arch["ffn_layer"]


def _registered_timm_dinov3_name(arch: Mapping[str, Any]) -> str | None:
    name = TIMM_DINOV3_NAMES.get((arch["embed_dim"], arch["depth"], arch["num_heads"], _timm_dinov3_family(arch)))
    if name is None or arch["patch_size"] != 16:
        return None
    if name in TIMM_DINOV3_QKVB_ONLY or (arch["qkv_bias"] and name not in TIMM_DINOV3_NO_QKVB):
        return f"{name}_qkvb"
    return name


def resolve_rope_timm_name(arch_kwargs: Mapping[str, Any], given: str | None) -> str:
    arch = full_rope_arch_kwargs(arch_kwargs)
    if given is not None:
        if not _TIMM_DINOV3_NAME.fullmatch(given):
            raise TimmNameError(f"timm name {given!r} is not one of timm's DINOv3 models, which a RoPE backbone needs "
                                f"(vit_*_patch16_dinov3, vit_*_patch16_dinov3_qkvb); pass e.g. --timm-name "
                                f"{_registered_timm_dinov3_name(arch) or 'vit_small_patch16_dinov3_qkvb'}")
        return given
    name = _registered_timm_dinov3_name(arch)
    if name is None:
        raise TimmNameError(
            f"timm registers no DINOv3 model for embed_dim={arch['embed_dim']}, depth={arch['depth']}, "
            f"num_heads={arch['num_heads']}, ffn_layer={arch['ffn_layer']!r}, patch_size={arch['patch_size']} (it has "
            "the released ViT-S/S+/B/L/H+/7B, patch 16). Name an entry point to build it with: "
            "timm_name='vit_small_patch16_dinov3_qkvb' works, since the stored create_model kwargs set every "
            "architecture field.")
    return name


def rope_timm_create_kwargs(arch_kwargs: Mapping[str, Any], state_dict: Mapping[str, Tensor] | None = None
                            ) -> dict[str, Any]:
    """``timm.create_model`` kwargs that make any of timm's DINOv3 entry points build this RoPE architecture: every
    field set, CLS-token pooling (DINOv3's), no head, any input size (RoPE needs no resampling)."""
    arch = full_rope_arch_kwargs(arch_kwargs)
    dim = arch["embed_dim"]
    hidden, align = _rope_mlp(arch, state_dict or {})
    ratio = hidden / dim  # timm builds int(dim * mlp_ratio) hidden units (then aligns): land exactly on ours
    return dict(
        img_size=arch["img_size"], patch_size=arch["patch_size"], in_chans=arch["in_chans"], embed_dim=dim,
        depth=arch["depth"], num_heads=arch["num_heads"], qkv_bias=bool(arch["qkv_bias"]),
        mlp_ratio=ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim,
        swiglu_mlp=align is not None, swiglu_align_to=align or 0, init_values=arch["layerscale_init"],
        num_reg_tokens=arch["n_storage_tokens"], use_abs_pos_emb=False, use_rot_pos_emb=True, rope_type="dinov3",
        rope_temperature=float(arch["pos_embed_rope_base"]), rope_rotate_half=True,
        rope_shift_coords=arch["pos_embed_rope_shift_coords"], rope_jitter_coords=arch["pos_embed_rope_jitter_coords"],
        rope_rescale_coords=arch["pos_embed_rope_rescale_coords"], use_fc_norm=False, global_pool="token",
        num_classes=0, dynamic_img_size=True,
    )


def rope_to_timm(state_dict: Mapping[str, Tensor], arch_kwargs: Mapping[str, Any], timm_name: str | None,
                 allow_periods_mismatch: bool) -> tuple[dict[str, Tensor], str, dict[str, Any]]:
    """timm's own Eva layout (what its DINOv3 checkpoint filter produces from an official file, and passes
    through unchanged): ``reg_token``, ``q_bias``/``v_bias`` (the keys' bias masked), ``gamma_1``/``gamma_2``,
    SwiGLU ``fc1_g``/``fc1_x``/``fc2``; zero biases where ours are off (timm always has them)."""
    arch = full_rope_arch_kwargs(arch_kwargs)
    name = resolve_rope_timm_name(arch, timm_name)
    sd = checked_rope_state_dict(state_dict, arch)
    _rope_unportable(arch, "timm", sd, allow_periods_mismatch)
    renames = {".ls1.gamma": ".gamma_1", ".ls2.gamma": ".gamma_2", ".mlp.w1.": ".mlp.fc1_g.", ".mlp.w2.": ".mlp.fc1_x.",
               ".mlp.w3.": ".mlp.fc2."}
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in ("mask_token", "rope_embed.periods") or key.startswith("local_cls_norm.") or key.endswith(
                (".bias_mask", "attn.qkv.bias")):
            continue
        for ours, theirs in renames.items():
            key = key.replace(ours, theirs)
        out["reg_token" if key == "storage_tokens" else key] = value
    for i in range(arch["depth"]):
        prefix = f"blocks.{i}."
        if arch["qkv_bias"]:
            q, _, v = _split_qkv(sd, prefix, "bias")
            out[f"{prefix}attn.q_bias"], out[f"{prefix}attn.v_bias"] = q, v
        mlp_layers = ("fc1", "fc2") if ROPE_FFN_LAYERS[arch["ffn_layer"]] is None else ("fc1_g", "fc1_x", "fc2")
        for layer in ("attn.proj", *(f"mlp.{n}" for n in mlp_layers)):
            weight = out[f"{prefix}{layer}.weight"]  # [out, in]
            out.setdefault(f"{prefix}{layer}.bias", weight.new_zeros(weight.shape[0]))
    return out, name, rope_timm_create_kwargs(arch, sd)


def rope_from_timm(tensors: Mapping[str, Tensor], arch_kwargs: Mapping[str, Any]) -> dict[str, Tensor]:
    """Our state dict from timm-layout ``tensors`` written by :func:`dinoreg.models.formats.to_timm` for
    ``arch_kwargs``: the mask token (not in timm) comes back as zeros, the masked keys' bias as zeros with its mask,
    the periods from the base."""
    arch = full_rope_arch_kwargs(arch_kwargs)
    renames = {".gamma_1": ".ls1.gamma", ".gamma_2": ".ls2.gamma", ".mlp.fc1_g.": ".mlp.w1.", ".mlp.fc1_x.": ".mlp.w2."}
    if ROPE_FFN_LAYERS[arch["ffn_layer"]] is not None:
        renames[".mlp.fc2."] = ".mlp.w3."
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        for theirs, ours in renames.items():
            key = key.replace(theirs, ours)
        out["storage_tokens" if key == "reg_token" else key] = value
    with torch.device("meta"):
        expected = RopeVisionTransformer(**arch).state_dict()
    dim = arch["embed_dim"]
    for i in range(arch["depth"]):
        prefix = f"blocks.{i}.attn."
        q_bias, v_bias = out.pop(f"{prefix}q_bias", None), out.pop(f"{prefix}v_bias", None)
        if q_bias is not None:
            out[f"{prefix}qkv.bias"] = torch.cat([q_bias, q_bias.new_zeros(dim), v_bias])
        if f"{prefix}qkv.bias_mask" in expected:
            out[f"{prefix}qkv.bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    out["mask_token"] = out["cls_token"].new_zeros(1, dim)
    out["rope_embed.periods"] = RopePositionEmbedding(
        dim, num_heads=arch["num_heads"], base=arch["pos_embed_rope_base"], min_period=arch["pos_embed_rope_min_period"],
        max_period=arch["pos_embed_rope_max_period"], dtype=arch["pos_embed_rope_dtype"]).periods
    return {key: value for key, value in out.items() if key in expected}  # the zero biases to_timm added go
