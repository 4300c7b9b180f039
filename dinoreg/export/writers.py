"""Write an exported backbone in one of the formats, atomically, never replacing a good output by accident."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file
from torch import Tensor

from dinoreg.export.model_card import hf_preprocessor_config, model_card, timm_pretrained_cfg
from dinoreg.export.source import BackboneSource, ExportError
from dinoreg.models import backbone_from_arch_kwargs
from dinoreg.models.formats import resolve_timm_name, to_hf, to_timm
from dinoreg.models.head import head_spec_of, head_to_official
from dinoreg.models.vit import VisionTransformer
from dinoreg.models.weights import LAYOUT_KEY, METADATA_KEY, infer_arch_kwargs, load_weights_into
from dinoreg.run_dir import errno_of, publish

__all__ = ["DTYPES", "FORMATS", "HEADS_METADATA_KEY", "HEAD_FORMATS", "SOURCE_METADATA_KEY", "check_family",
           "check_output", "official_load_overrides", "export_backbone", "resize_backbone"]

FORMATS = {
    "dinov2": "a .pth state dict in the official DINOv2 hub layout (learned position embeddings; torch.hub DINOv2)",
    "dinov3": "a .pth state dict in the official DINOv3 hub layout (RoPE backbones; dinov3_vits16(weights=path))",
    "safetensors": "a .safetensors file with the architecture and provenance as metadata (dinoreg.load_backbone)",
    "hf": "a directory for transformers.AutoModel.from_pretrained and pipeline (Dinov2 / DINOv3ViTModel)",
    "timm": "a .pth holding a timm state dict, the timm model name, its create_model kwargs and pretrained_cfg",
}
SUFFIXES = {"dinov2": (".pth", ".pt"), "dinov3": (".pth", ".pt"), "safetensors": (".safetensors",),
            "timm": (".pth", ".pt")}
# the official layout of each backbone family (RoPE: DINOv3's; learned position embeddings: DINOv2's)
OFFICIAL_FORMATS = {"rope": "dinov3", "learned": "dinov2"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SOURCE_METADATA_KEY = "dinoreg_source"
HEADS_METADATA_KEY = "dinoreg_heads"  # the heads' sizes, JSON: {"dino_head": {"n_prototypes": ...}, ...}
HEAD_FORMATS = ("safetensors", "dinov2", "dinov3")
# what a plain .pth cannot tell load_backbone and changes the features, by family (the rest is in the shapes)
_OUTPUT_ARGUMENTS = {
    "learned": ("num_heads", "interpolate_antialias", "interpolate_offset", "mlp_ratio"),
    # (RoPE periods are a tensor of the file: their base or min/max need not be passed)
    "rope": ("num_heads", "norm_layer", "ffn_layer", "ffn_ratio", "pos_embed_rope_normalize_coords",
             "pos_embed_rope_dtype", "pos_embed_rope_shift_coords", "pos_embed_rope_jitter_coords",
             "pos_embed_rope_rescale_coords"),
}


def check_family(model: VisionTransformer, fmt: str) -> None:
    """Refuse the official layout of the other backbone family (``dinov2`` for a RoPE backbone, ``dinov3`` for a
    learned-position one), naming the format to use."""
    family = model.pos_embed_type
    wanted = OFFICIAL_FORMATS[family]
    if fmt in OFFICIAL_FORMATS.values() and fmt != wanted:
        kind = "a RoPE backbone (DINOv3's family)" if family == "rope" else \
            "a backbone with learned position embeddings (DINOv2's family)"
        raise ExportError(f"--format {fmt} writes the official {fmt.upper()} layout, and this is {kind}; "
                          f"use --format {wanted} (or safetensors, hf, timm)")


def resize_backbone(model: VisionTransformer, img_size: int) -> VisionTransformer:
    """The same backbone built for ``img_size``: ``pos_embed`` resampled with its interpolation; a RoPE backbone
    resamples nothing (``img_size`` only records the size it is meant for)."""
    if img_size % model.patch_size:
        raise ExportError(f"--img-size {img_size} is not a multiple of the patch size {model.patch_size}")
    resized = backbone_from_arch_kwargs({**model.arch_kwargs, "img_size": img_size})
    load_weights_into(resized, model.state_dict())
    return resized.eval()


def official_load_overrides(model: VisionTransformer) -> dict[str, Any]:
    """What a plain ``.pth`` (tensors only, as the official files of both families) cannot tell ``load_backbone``:
    the arguments that change the features and differ from what it infers from the shapes (64-dim heads; the
    registers models' interpolation; a RoPE backbone's norm eps and RoPE settings other than the released ones)."""
    inferred = infer_arch_kwargs(model.state_dict())
    return {key: model.arch_kwargs[key] for key in _OUTPUT_ARGUMENTS[model.pos_embed_type]
            if inferred.get(key) != model.arch_kwargs.get(key)}


def export_backbone(model: VisionTransformer, source: Optional[BackboneSource], *, fmt: str, output: str | Path,
                    dtype: str = "fp32", force: bool = False, allow_interpolation_mismatch: bool = False,
                    timm_name: Optional[str] = None, heads: Optional[dict[str, dict[str, Tensor]]] = None,
                    allow_periods_mismatch: bool = False) -> Path:
    """Write ``model`` as ``fmt`` to ``output``; returns the path written. ``allow_interpolation_mismatch``: see
    :func:`dinoreg.models.formats.to_hf`; ``timm_name``: see :func:`dinoreg.models.formats.to_timm`;
    ``allow_periods_mismatch`` (RoPE backbones, hf and timm): export even though the model's RoPE periods are not the
    ones its base gives, which those libraries recompute. ``heads``
    (``dino_head`` / ``ibot_head`` state dicts) are written beside the backbone, in the official layout
    (``last_layer.weight_g`` / ``weight_v``): safetensors under ``dino_head.*`` keys, dinov2 as the official
    teacher checkpoint ``{"teacher": {"backbone.*", "dino_head.*", ...}}`` (dinov2 and dinov3 alike);
    ``load_backbone`` reads the backbone."""
    output = check_output(fmt, output, force=force)
    check_family(model, fmt)
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if heads and fmt not in HEAD_FORMATS:
        raise ExportError(f"heads are written in {' or '.join(HEAD_FORMATS)} only; --format {fmt} holds a backbone")
    head_tensors = {f"{name}.{key}": value.detach().to("cpu", DTYPES[dtype]).contiguous()
                    for name, head in (heads or {}).items() for key, value in head_to_official(head).items()}
    if fmt == "timm":
        timm_name = resolve_timm_name(model.arch_kwargs, timm_name)  # refused before anything is written
    # the RoPE periods keep their precision: they define the computation (rounded ones would change every output)
    tensors = {name: value.detach().to("cpu", None if name == "rope_embed.periods" else DTYPES[dtype]).contiguous()
               for name, value in model.state_dict().items()}
    arch = {**model.arch_kwargs}
    provenance = {**(source.as_metadata() if source else {}), "dtype": dtype}
    existed = output.exists()
    try:
        with publish(output, directory=fmt == "hf") as tmp:
            _write(fmt, tmp, tensors, head_tensors, arch, source, provenance, dtype=dtype, heads=heads,
                   timm_name=timm_name, allow_interpolation_mismatch=allow_interpolation_mismatch,
                   allow_periods_mismatch=allow_periods_mismatch)
    except Exception as error:  # noqa: BLE001 - only failures of the disk are turned into one line, the rest re-raised
        needed = sum(t.numel() * t.element_size() for t in [*tensors.values(), *head_tensors.values()])
        failure = _write_failure(output, error, needed=needed, existed=existed)
        if failure is None:
            raise
        raise failure from None
    return output


def _write(fmt: str, tmp: Path, tensors: dict[str, Tensor], head_tensors: dict[str, Tensor], arch: dict[str, Any],
           source: Optional[BackboneSource], provenance: dict[str, Any], *, dtype: str,
           heads: Optional[dict[str, dict[str, Tensor]]], timm_name: Optional[str],
           allow_interpolation_mismatch: bool, allow_periods_mismatch: bool) -> None:
    """Write the export into ``tmp`` (a file; a directory for ``hf``), which :func:`publish` then renames."""
    if fmt in OFFICIAL_FORMATS.values() and head_tensors:  # the official training's teacher_checkpoint.pth
        _torch_save({"teacher": {**{f"backbone.{k}": v for k, v in tensors.items()}, **head_tensors}}, tmp)
    elif fmt in OFFICIAL_FORMATS.values():
        _torch_save(tensors, tmp)
    elif fmt == "safetensors":
        metadata = {METADATA_KEY: json.dumps(arch), SOURCE_METADATA_KEY: json.dumps(provenance)}
        if head_tensors:
            metadata[HEADS_METADATA_KEY] = json.dumps({name: head_spec_of(head) for name, head in heads.items()})
        _save_safetensors({**tensors, **head_tensors}, tmp, metadata)
    elif fmt == "hf":
        config, hf_tensors = to_hf(tensors, arch, allow_interpolation_mismatch=allow_interpolation_mismatch,
                                   allow_periods_mismatch=allow_periods_mismatch)
        config["torch_dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        _save_safetensors(hf_tensors, tmp / "model.safetensors", {"format": "pt"})
        # a complete model folder: AutoImageProcessor / pipeline(...) need the processor's settings
        (tmp / "preprocessor_config.json").write_text(
            json.dumps(hf_preprocessor_config(arch["img_size"]), indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(model_card(arch, source, architecture=config["architectures"][0],
                                                  dtype=dtype), encoding="utf-8")
    else:
        timm_tensors, name, kwargs = to_timm(tensors, arch, timm_name=timm_name,
                                             allow_periods_mismatch=allow_periods_mismatch)
        if "untie_global_and_local_cls_norm" in arch:  # local_cls_norm (training only) is not in timm's layout
            arch = {**arch, "untie_global_and_local_cls_norm": False}
        # "state_dict" is the key timm's own load_checkpoint reads (and create_model's pretrained_cfg_overlay
        # file=); the rest is for people, timm's data config and load_backbone
        _torch_save({"state_dict": timm_tensors, "model_name": name, "model_kwargs": kwargs,
                     "pretrained_cfg": timm_pretrained_cfg(arch["img_size"]),
                     LAYOUT_KEY: "timm", METADATA_KEY: arch, SOURCE_METADATA_KEY: provenance}, tmp)


def _torch_save(payload: Any, path: Path) -> None:
    # through a Python file: a failed write then raises OSError (errno kept as the context of torch's RuntimeError)
    # where torch's own file writer only reports "unexpected pos"
    with open(path, "wb") as file:
        torch.save(payload, file)


def _save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata=metadata)


def check_output(fmt: str, output: str | Path, *, force: bool) -> Path:
    """Refuse an output name that does not fit ``fmt``, an existing output without ``force``, or a destination
    that cannot be written; called before anything slow is read."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    output = Path(output)
    if fmt in SUFFIXES and output.is_dir():
        raise ExportError(f"{output} is a directory and --format {fmt} writes one file; name a file, e.g. "
                          f"--output {output / ('backbone' + SUFFIXES[fmt][0])}")
    if fmt not in SUFFIXES and output.exists() and not output.is_dir():
        raise ExportError(f"{output} is a file and --format {fmt} writes a directory; name a new folder for --output")
    if fmt in SUFFIXES and output.suffix not in SUFFIXES[fmt]:
        raise ExportError(f"--format {fmt} writes {'/'.join(SUFFIXES[fmt])} files; name the output e.g. "
                          f"{output.with_suffix(SUFFIXES[fmt][0])}")
    if output.exists() and not force:
        raise ExportError(f"{output} already exists; pass --force to replace it (it is kept until the new export "
                          "is complete)")
    _check_writable(output)
    return output


def _existing_ancestor(output: Path) -> Path:
    folder = output.absolute().parent
    while not folder.exists():
        folder = folder.parent
    return folder


def _check_writable(output: Path) -> None:
    """The folder that will hold ``output`` (its nearest existing ancestor: the rest is created) takes new files."""
    folder = _existing_ancestor(output)
    if not folder.is_dir():
        raise ExportError(f"cannot write {output}: {folder} is a file, not a folder; choose another --output")
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        raise ExportError(f"cannot write {output}: {folder} is on a read-only file system; choose an --output on a "
                          "writable disk")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {output}: permission denied in {folder}; choose a folder you can write to")


# errno of a failed write -> (the cause, the fix), as the one line of a failed export says them
WRITE_FAILURES = {
    errno.ENOSPC: ("no space left on device", "free space there or choose an --output on another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota or choose an --output on another disk"),
    errno.EROFS: ("read-only file system", "choose an --output on a writable disk"),
    errno.EACCES: ("permission denied", "choose a folder you can write to"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to"),
    errno.EISDIR: ("a directory is in the way", "choose another --output"),
}


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 2**10:.0f} KiB"


def _write_failure(output: Path, error: BaseException, *, needed: int, existed: bool) -> Optional[ExportError]:
    """One line for a write that the disk refused (``None`` when ``error`` is something else): the file, the cause
    and the fix. :func:`publish` has removed the partial output and left an existing one as it was."""
    code = errno_of(error)
    if code is None:
        return None
    cause, fix = WRITE_FAILURES.get(code, (os.strerror(code).lower(), "choose another --output"))
    if code == errno.ENOSPC:
        folder = _existing_ancestor(output)
        free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
        cause += f" ({_size(free)} free in {folder}; the export needs about {_size(needed)})"
    kept = f"the existing {output} is unchanged" if existed else "no partial file was left"
    return ExportError(f"could not write {output}: {cause}; {fix} ({kept})")
