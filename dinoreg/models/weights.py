"""Backbone checkpoints: normalise the official and our layouts, infer the architecture, load strictly.

Accepted inputs (files: ``.pth``/``.pt`` via ``torch.load(weights_only=True)``, ``.safetensors``):
* flat official hub state dicts (``blocks.{i}.``) and block-chunked training ones (``blocks.{chunk}.{i}.``);
* Hugging Face ``Dinov2Model``/``Dinov2WithRegistersModel`` directories (``config.json`` + ``model.safetensors``)
  and our timm exports (``{"state_dict", "dinoreg_layout": "timm", "dinoreg_arch"}``), via
  :mod:`dinoreg.models.formats`;
* keys under ``module.`` / ``backbone.`` / ``teacher.backbone.`` / ``student.backbone.`` prefixes;
* wrappers ``{"model": sd}`` / ``{"teacher": sd}`` / ``{"student": sd}``, optionally carrying our
  metadata ``{"dinoreg_arch": {...}}`` (safetensors: the ``dinoreg_arch`` metadata entry, JSON);
* projection heads beside the backbone (``dino_head.*``, ``ibot_head.*``: official teacher checkpoints, our
  exports ``--with-heads``) are left out of the backbone and read by :func:`read_heads`.

A file from elsewhere is data, never code: ``.pth`` files are unpickled with ``weights_only=True`` (tensors and plain
values only), and any file that cannot be read (empty, text, truncated, a pickle of other objects, metadata that
names no architecture argument) is a :class:`WeightsFileError`: one line naming the file, what is wrong and the fix.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import pickle
import re
import warnings
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from dinoreg.errors import InputError
from dinoreg.models.formats import from_hf, from_timm
from dinoreg.models.head import HEAD_NAMES, head_from_official
from dinoreg.models.ffn import aligned_swiglu_hidden, swiglu_hidden_features
from dinoreg.models.pos_embed import resample_pos_embed
from dinoreg.models.rope import rope_periods
from dinoreg.models.rope_vit import ROPE_FFN_LAYERS, ROPE_PRESETS, ROPE_RELEASED, RopeVisionTransformer
from dinoreg.models.strict import CheckpointMismatchError, check_state_dict_fits
from dinoreg.models.vit import DinoVisionTransformer, VisionTransformer
from dinoreg.run_dir import BACKBONE_FILE, write_atomically

METADATA_KEY = "dinoreg_arch"
LAYOUT_KEY = "dinoreg_layout"  # "timm" in our timm exports
_WRAPPERS = ("model", "teacher", "student", "state_dict")
# Longest first: "teacher.backbone." must win over "backbone.".
_PREFIXES = ("teacher.backbone.", "student.backbone.", "module.backbone.", "module.", "backbone.", "_orig_mod.")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")
_FAMILY_DEFAULTS = {cls: {name: parameter.default for name, parameter in inspect.signature(cls).parameters.items()}
                    for cls in (DinoVisionTransformer, RopeVisionTransformer)}
_ARCH_DEFAULTS = {**_FAMILY_DEFAULTS[RopeVisionTransformer], **_FAMILY_DEFAULTS[DinoVisionTransformer]}
_ARCH_ARGUMENTS = set(_ARCH_DEFAULTS)  # what dinoreg_arch may hold (either family's arguments)
_FIX = ("give a backbone .safetensors written by dinoreg (e.g. RUN/teacher_backbone.safetensors), a `dinoreg export` "
        "output or an official DINOv2 or DINOv3 .pth")


class WeightsFileError(InputError, ValueError):
    """A weights file (or Hugging Face export folder) that cannot be read as a checkpoint: the message is one line
    naming the file, what is wrong with it and what to give instead; nothing the file holds was run."""

    def __init__(self, path: str, problem: str, fix: str = _FIX) -> None:
        super().__init__(f"{path} {problem}; {fix}")
        self.path = path


def read_checkpoint(source: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Return ``(state_dict, metadata)`` with the backbone keys in the flat official layout."""
    state_dict, metadata, _ = read_checkpoint_and_heads(source)
    return state_dict, metadata


def read_heads(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, dict[str, Tensor]]:
    """The DINO and iBOT heads a checkpoint holds, by name (``dino_head``, ``ibot_head``), in our layout; empty when
    it holds none (a backbone file, a Hugging Face or timm export). Reads ``dinoreg export --with-heads`` files and
    official teacher checkpoints (``{"teacher": {"dino_head.*", ...}}``, with ``last_layer.weight_g``/``weight_v``)."""
    return read_checkpoint_and_heads(source)[2]


def read_checkpoint_and_heads(source: str | os.PathLike | Mapping[str, Any]
                              ) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, dict[str, Tensor]]]:
    """:func:`read_checkpoint` and :func:`read_heads` from one read of the file. Raises :class:`WeightsFileError`
    for a file (or folder) that is no checkpoint, whatever its reader's own error."""
    if not isinstance(source, (str, os.PathLike)):
        return _split(dict(source), _checked_metadata("the given state dict", dict(source).get(METADATA_KEY)))
    path = os.fspath(source)
    if not os.path.exists(path):
        raise WeightsFileError(path, "does not exist")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol: the refusal or the result says what matters
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            read = (*_read_hf_directory(path), {}) if os.path.isdir(path) else _split(*_read_file(path))
        infer_arch_kwargs(read[0])  # a backbone's tensors, of a ViT's shapes
        return read
    except CheckpointMismatchError as error:
        raise WeightsFileError(path, f"holds no ViT backbone ({error})") from None
    except WeightsFileError:
        raise
    except Exception as error:  # noqa: BLE001 -- every reader's failure (pickle, zip, safetensors, JSON) means one thing
        raise WeightsFileError(path, _what_is_wrong(path, error)) from None


def _what_is_wrong(path: str, error: Exception) -> str:
    """Why ``path`` could not be read, in words, from the reader's ``error``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
    detail = f"{type(error).__name__}: {re.split(r'(?<=[.])[ ]', lines[0])[0][:120]}"
    if os.path.isdir(path):
        return f"is not a readable Hugging Face export folder ({detail})"
    try:
        with open(path, "rb") as file:
            start = file.read(16)
    except OSError as unreadable:
        return f"cannot be read ({unreadable.strerror})"
    if not start:
        return "is empty (0 bytes)"
    if path.endswith(".safetensors"):
        return f"is not a complete safetensors file: truncated or damaged ({detail})"
    # torch.load(weights_only=True) refused a pickle (in a torch file, or bare) for what it would construct or run
    refused = isinstance(error, pickle.UnpicklingError) and "weights only load failed" in lines[0].lower()
    if refused and ("GLOBAL" in str(error) or start[:1] == b"\x80" or start.startswith(b"PK\x03\x04")):
        reason = next((line for line in lines if "GLOBAL" in line or line.startswith("Unsupported")), "")
        return (f"holds pickled objects other than tensors and plain values ({reason[:100]}): refused unread, nothing "
                "in it was run (load files only from people you trust)")
    if start.startswith(b"PK\x03\x04"):  # torch.save's zip archive
        return f"is a truncated or damaged torch file ({detail})"
    return f"is neither a torch nor a safetensors file: it starts with {start!r} ({detail})"


def _split(raw: dict[str, Any], metadata: dict[str, Any]
           ) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, dict[str, Tensor]]]:
    """A checkpoint's backbone (official layout), architecture metadata and heads, from its top-level dict."""
    if raw.get(LAYOUT_KEY) == "timm":
        return from_timm(raw["state_dict"], metadata), metadata, {}
    unwrapped = _unwrap(raw)
    heads: dict[str, dict[str, Tensor]] = {}
    for key, value in unwrapped.items():
        if not isinstance(value, Tensor):
            continue
        for prefix in ("", *_PREFIXES):
            name, _, rest = key[len(prefix):].partition(".") if key.startswith(prefix) else ("", "", "")
            if name in HEAD_NAMES and rest:
                heads.setdefault(name, {})[rest] = value
                break
    return (normalize_state_dict(unwrapped), metadata,
            {name: head_from_official(state) for name, state in heads.items()})


def _read_file(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A file's top-level dict and our architecture metadata, if any; tensors and plain values only."""
    if path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:
            raw: Any = {k: f.get_tensor(k) for k in f.keys()}
            text = (f.metadata() or {}).get(METADATA_KEY)
        try:
            metadata = json.loads(text) if text else None
        except ValueError:
            raise WeightsFileError(path, f"has a {METADATA_KEY} metadata entry that is not JSON: {text[:40]!r}") from None
        return raw, _checked_metadata(path, metadata)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, Mapping):
        raise WeightsFileError(path, f"holds a {type(raw).__name__}, not a mapping of names to tensors")
    return dict(raw), _checked_metadata(path, raw.get(METADATA_KEY))


def _checked_metadata(source: str, metadata: Any) -> dict[str, Any]:
    """Our ``dinoreg_arch`` entry: keyword arguments of :class:`DinoVisionTransformer` (empty when absent)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise WeightsFileError(source, f"has a {METADATA_KEY} entry that is a {type(metadata).__name__}, not a mapping "
                                       "of architecture arguments")
    unknown = sorted(str(key) for key in metadata if key not in _ARCH_ARGUMENTS)
    if unknown:
        raise WeightsFileError(source, f"has {METADATA_KEY} entries no backbone takes: {', '.join(unknown[:8])}")
    mistyped = [f"{key}={value!r}"[:60] for key, value in metadata.items()
                if not _fits(_ARCH_DEFAULTS[key], value, nullable=key in _NULLABLE)]
    if mistyped:
        raise WeightsFileError(source, f"has {METADATA_KEY} entries of the wrong type: {', '.join(mistyped[:8])}")
    return dict(metadata)


# the number arguments that may also be None although their default is a number (min/max periods replace the base)
_NULLABLE = {"pos_embed_rope_base"}


def _fits(default: Any, value: Any, *, nullable: bool = False) -> bool:
    """Whether ``value`` has the type of the backbone argument whose default is ``default`` (``nullable``: None too)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if default is None or isinstance(default, float):  # init_values, layerscale_init, RoPE periods: None or a number
        return (value is None and (default is None or nullable)) or isinstance(value, (int, float))
    return isinstance(value, type(default))


def _unwrap(raw: dict[str, Any]) -> dict[str, Any]:
    for wrapper in _WRAPPERS:
        if isinstance(raw.get(wrapper), Mapping):
            return dict(raw[wrapper])
    return raw


def _read_hf_directory(path: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    config, weights = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    if not (os.path.isfile(config) and os.path.isfile(weights)):
        run_backbone = os.path.join(path, BACKBONE_FILE)  # a training run's folder: its teacher is what was meant
        fix = f"give {run_backbone} (the run's teacher backbone)" if os.path.isfile(run_backbone) else "give a backbone file"
        raise WeightsFileError(path, "is a folder without config.json and model.safetensors, not a Hugging Face export",
                               f"{fix} or a `dinoreg export --format hf` folder")
    with open(config, encoding="utf-8") as f:
        return from_hf(json.load(f), load_file(weights))


def normalize_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    """Strip wrapper prefixes, flatten chunked blocks; drop non-backbone entries of a training checkpoint
    (heads, optimizer) only when they sit beside prefixed backbone keys."""
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, Tensor) and k.split(".")[0] not in HEAD_NAMES}
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            break
    return {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in tensors.items()}


def is_rope_layout(state_dict: Mapping[str, Any]) -> bool:
    """Whether a backbone state dict (official layout) is of the RoPE family (DINOv3's): it has the RoPE periods or
    storage tokens, or a class token and patch embedding without ``pos_embed``."""
    return ("rope_embed.periods" in state_dict or "storage_tokens" in state_dict
            or ("cls_token" in state_dict and "pos_embed" not in state_dict))


def backbone_class(state_dict: Mapping[str, Any]) -> type[VisionTransformer]:
    """The backbone family a state dict (official layout) belongs to."""
    return RopeVisionTransformer if is_rope_layout(state_dict) else DinoVisionTransformer


def infer_arch_kwargs(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """Architecture keyword arguments of :func:`backbone_class` from tensor shapes (DINOv2 files: head dim 64, as in
    all official models; DINOv3 files: the head dim the RoPE periods imply)."""
    rope = is_rope_layout(state_dict)
    required = ("cls_token", "patch_embed.proj.weight") if rope else ("cls_token", "pos_embed", "patch_embed.proj.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise CheckpointMismatchError(
            f"not a ViT backbone checkpoint: missing {missing}; found keys like {sorted(state_dict)[:8]}"
        )
    try:
        return _rope_arch_kwargs_of(state_dict) if rope else _arch_kwargs_of(state_dict)
    except (KeyError, IndexError, ValueError) as error:  # a key the others imply, a tensor of too few dimensions
        shapes = {k: tuple(state_dict[k].shape) for k in required}
        raise CheckpointMismatchError(f"not a ViT backbone checkpoint: {type(error).__name__} {error} reading its "
                                      f"shapes {shapes}") from None


def _arch_kwargs_of(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    embed_dim = state_dict["cls_token"].shape[-1]
    patch_weight = state_dict["patch_embed.proj.weight"]
    patch_size = patch_weight.shape[-1]
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    num_patches = state_dict["pos_embed"].shape[1] - 1
    registers = state_dict["register_tokens"].shape[1] if "register_tokens" in state_dict else 0
    swiglu = "blocks.0.mlp.w12.weight" in state_dict
    if swiglu:
        hidden = state_dict["blocks.0.mlp.w3.weight"].shape[1]
        mlp_ratio = 4.0 if swiglu_hidden_features(4 * embed_dim) == hidden else hidden * 1.5 / embed_dim
    else:
        mlp_ratio = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim if depth else 4.0
    return dict(
        img_size=int(math.isqrt(num_patches)) * patch_size,
        patch_size=patch_size,
        in_chans=patch_weight.shape[1],
        embed_dim=embed_dim,
        depth=depth,
        num_heads=max(embed_dim // 64, 1),
        mlp_ratio=mlp_ratio,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        proj_bias="blocks.0.attn.proj.bias" in state_dict,
        ffn_bias=any(k.startswith("blocks.0.mlp.") and k.endswith(".bias") for k in state_dict),
        init_values=1.0 if "blocks.0.ls1.gamma" in state_dict else None,
        ffn_layer="swiglufused" if swiglu else "mlp",
        num_register_tokens=registers,
        # The official registers models use antialiased resizing without offset; the others the legacy path.
        interpolate_antialias=registers > 0,
        interpolate_offset=0.0 if registers else 0.1,
    )


def _rope_arch_kwargs_of(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """A DINOv3-layout file's architecture. What tensors cannot tell takes the released models' value: the norm's
    eps (``layernormbf16``, 1e-5), the coordinate normalisation (``separate``) and the training-only coordinate
    augmentation (``rescale_coords`` 2); a file of ours carries its exact arguments in its metadata instead."""
    embed_dim = state_dict["cls_token"].shape[-1]
    patch_weight = state_dict["patch_embed.proj.weight"]
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    periods = state_dict.get("rope_embed.periods")
    head_dim = 4 * periods.shape[0] if periods is not None else 64
    arch: dict[str, Any] = dict(
        ROPE_RELEASED, img_size=224, patch_size=patch_weight.shape[-1], in_chans=patch_weight.shape[1],
        embed_dim=embed_dim, depth=depth, num_heads=max(embed_dim // head_dim, 1),
        n_storage_tokens=state_dict["storage_tokens"].shape[1] if "storage_tokens" in state_dict else 0,
        # without a qkv bias there is no key bias to mask: the released value (vit7b16's), which changes nothing
        mask_k_bias="blocks.0.attn.qkv.bias_mask" in state_dict or "blocks.0.attn.qkv.bias" not in state_dict,
        layerscale_init=1e-5 if "blocks.0.ls1.gamma" in state_dict else None,
        norm_layer="layernormbf16" if "norm.bias" in state_dict else "rmsnorm",
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict, proj_bias="blocks.0.attn.proj.bias" in state_dict,
        ffn_bias=any(k.startswith("blocks.0.mlp.") and k.endswith(".bias") for k in state_dict),
        untie_cls_and_patch_norms="cls_norm.weight" in state_dict,
        untie_global_and_local_cls_norm="local_cls_norm.weight" in state_dict,
        **_rope_ffn_of(state_dict, embed_dim, depth),
    )
    if periods is not None and periods.shape[0] > 1:
        arch.update(_rope_periods_of(periods, head_dim))
    return arch


def _rope_ffn_of(state_dict: Mapping[str, Tensor], embed_dim: int, depth: int) -> dict[str, Any]:
    if not depth or "blocks.0.mlp.fc1.weight" in state_dict:
        return {"ffn_layer": "mlp", "ffn_ratio": state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim if depth else 4.0}
    hidden = state_dict["blocks.0.mlp.w1.weight"].shape[0]
    # a released model of this width first (vit7b16's swiglu64 and swiglu give the same shapes), then the first fit
    released = [(p["ffn_layer"], p["ffn_ratio"]) for p in ROPE_PRESETS.values()
                if p["embed_dim"] == embed_dim and p["ffn_layer"] != "mlp"]
    searched = [(name, ratio) for ratio in (hidden * 1.5 / embed_dim, 3.0, 4.0, 6.0)
                for name, align in ROPE_FFN_LAYERS.items() if align is not None]
    for name, ratio in (*released, *searched):
        if aligned_swiglu_hidden(int(embed_dim * ratio), ROPE_FFN_LAYERS[name] or 0) == hidden:
            return {"ffn_layer": name, "ffn_ratio": ratio}
    raise ValueError(f"no SwiGLU ratio and alignment give a hidden width of {hidden} for width {embed_dim}")


def _rope_periods_of(periods: Tensor, head_dim: int) -> dict[str, Any]:
    """RoPE ``base`` when the periods are its powers (the first is 1), else the ``min_period``/``max_period`` they
    span: the shortest decimals whose periods, computed in the buffer's dtype, are the buffer's (100, not the
    100.000064 that fp32 periods imply). The buffer itself is loaded from the file either way."""
    exact = periods.double()
    if abs(float(exact[0]) - 1) < 1e-6:
        base = float(exact[1]) ** (head_dim / 4)
        candidates = [{"pos_embed_rope_base": round(base, digits)} for digits in range(7)] + [{"pos_embed_rope_base": base}]
        nones = {"pos_embed_rope_min_period": None, "pos_embed_rope_max_period": None}
    else:
        low, high = float(exact[0]), float(exact[-1])
        candidates = [{"pos_embed_rope_min_period": round(low, digits), "pos_embed_rope_max_period": round(high, digits)}
                      for digits in range(7) if round(low, digits) > 0]
        candidates.append({"pos_embed_rope_min_period": low, "pos_embed_rope_max_period": high})
        nones = {"pos_embed_rope_base": None}
    computed = [rope_periods(head_dim, **{key[len("pos_embed_rope_"):]: value for key, value in candidate.items()},
                             dtype=periods.dtype) for candidate in candidates]
    tolerance = 4 * torch.finfo(periods.dtype).eps  # periods computed elsewhere (in float64, say), then rounded
    for close in (torch.equal, lambda a, b: torch.allclose(a.double(), b.double(), rtol=tolerance, atol=0)):
        for candidate, values in zip(candidates, computed):
            if close(values, periods):
                return {**nones, **candidate}
    return {**nones, **candidates[-1]}


_ARCH_HINT = ("Check the architecture overrides (arch, patch_size, num_register_tokens, ffn_layer; for DINOv3's "
              "released files also mask_k_bias, norm_layer, qkv_bias: docs/BACKBONE.md).")


def load_state_dict_strict(model: torch.nn.Module, state_dict: Mapping[str, Tensor], *,
                           given_name: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with one error that lists every misfit, shapes included."""
    check_state_dict_fits(state_dict, model.state_dict(), given_name=given_name, expected_name="model",
                          hint=_ARCH_HINT)
    model.load_state_dict(state_dict, strict=True)


def save_backbone(model: VisionTransformer, path: str | os.PathLike) -> None:
    """Write ``model``'s weights (official keys) and architecture to a ``.safetensors`` file, atomically:
    a temporary file is renamed over ``path`` only once complete, so a good file is never half-replaced."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(model.arch_kwargs)}))


def load_backbone(source: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> VisionTransformer:
    """Build the backbone a checkpoint describes and load it strictly; returns it in eval mode.

    The architecture comes from embedded metadata when present, otherwise from the tensor shapes;
    ``overrides`` (official keyword names, e.g. ``img_size=518``, ``attn_backend="math"``) win over
    both. A different ``img_size`` resamples ``pos_embed`` with the model's interpolation method.
    """
    state_dict, metadata = read_checkpoint(source)
    arch_kwargs = {**infer_arch_kwargs(state_dict), **metadata, **overrides}
    family = backbone_class(state_dict)
    foreign = sorted(set(arch_kwargs) - set(_FAMILY_DEFAULTS[family]))
    if foreign:
        raise CheckpointMismatchError(f"a {family.__name__} checkpoint given arguments of the other backbone family: "
                                      f"{', '.join(foreign[:8])}")
    model = family(**arch_kwargs)
    named = f"checkpoint {os.fspath(source)}" if isinstance(source, (str, os.PathLike)) else "checkpoint"
    load_state_dict_strict(model, fit_pos_embed(state_dict, model), given_name=named)
    return model.eval()


def load_weights_into(model: VisionTransformer, source: str | os.PathLike | Mapping[str, Any]) -> None:
    """Load a backbone checkpoint (any layout :func:`read_checkpoint` accepts) into ``model`` strictly;
    ``pos_embed`` is resampled to the model's grid with the model's interpolation."""
    model.load_state_dict(fitted_state_dict(model, source), strict=True)


def fitted_state_dict(model: VisionTransformer, source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Tensor]:
    """What :func:`load_weights_into` loads: the checkpoint's state dict, ``pos_embed`` resampled to ``model``'s
    grid, checked to fit ``model`` strictly (which may be on the meta device)."""
    state_dict, _ = read_checkpoint(source)
    state_dict = fit_pos_embed(state_dict, model)
    check_state_dict_fits(state_dict, model.state_dict(), given_name="checkpoint", expected_name="model",
                          hint=_ARCH_HINT)
    return state_dict


def fit_pos_embed(state_dict: dict[str, Tensor], model: VisionTransformer) -> dict[str, Tensor]:
    """``state_dict`` (a backbone's) with ``pos_embed`` resampled to ``model``'s grid by ``model``'s own
    interpolation (antialiased for the registers models), when the grids differ; RoPE backbones have none."""
    if not isinstance(model, DinoVisionTransformer):
        return state_dict
    target = model.pos_embed.shape
    if "pos_embed" not in state_dict or state_dict["pos_embed"].shape[1] == target[1]:
        return state_dict
    grid = math.isqrt(target[1] - 1)
    return {**state_dict, "pos_embed": resample_pos_embed(state_dict["pos_embed"], (grid, grid),
                                                          antialias=model.interpolate_antialias,
                                                          offset=model.interpolate_offset)}
