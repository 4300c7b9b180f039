#!/usr/bin/env python3
"""dinoreg's DINOv3 backbone against the official DINOv3 code: same weights, same inputs, same outputs.

    git clone https://github.com/facebookresearch/dinov3 /tmp/dinov3_src   # the official code, not ours to ship
    python launch/parity_dinov3.py --official /tmp/dinov3_src

For each preset (vits16 ... vit7b16) at each --depths, and the --full presets at their full depth:

1. the official hub builder's keyword arguments (``dinov3.hub.backbones.dinov3_<preset>(pretrained=False)``, caught
   at the model's constructor before anything is built) must equal dinoreg's preset (``ROPE_PRESETS`` with
   ``ROPE_RELEASED``), every argument, the official class's defaults for those the hub leaves out;
2. the official model is built with those arguments (depth overridden) and ``init_weights()`` (random weights; the
   same seed builds dinoreg's preset with the same values, which is reported too), saved as an official hub file
   (``torch.save(state_dict)``) and as a training ``teacher_checkpoint.pth`` (``{"teacher": {"backbone.*",
   "dino_head.*", "ibot_head.*"}}``, heads from the official ``DINOHead``); each file is loaded with
   ``dinoreg.load_backbone`` (strict, architecture inferred from the tensors, which must be the preset's);
3. in fp32 and eval mode, on a 224 x 224 batch and a non-square 160 x 224 batch: ``forward_features`` (class
   token, storage tokens, normalised patches, x_prenorm; with iBOT masks; a list of both batches in one call) and
   ``get_intermediate_layers`` of every block (norm=True; norm=False; reshape with return_class_token and
   return_extra_tokens, n as a count and as a list of indices) are compared with the official model's: the max
   relative difference ``max|ours - official| / max|official|`` over both files and both batches;
4. the reverse: a dinoreg model's state dict (its own random weights) loads into the official class with
   ``strict=True`` and the same outputs are compared again (column ``reverse``: the max over all of them).

It prints a table and exits non-zero when a difference exceeds --tolerance or any check above fails.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import dinoreg
from dinoreg.models.rope_vit import ROPE_PRESETS, ROPE_RELEASED, RopeVisionTransformer, build_rope_backbone

COLUMNS = ("cls", "storage", "patch", "prenorm", "masked", "list", "gil_norm", "gil_raw", "gil_extra", "reverse")
FEATURES = {"cls": "x_norm_clstoken", "storage": "x_storage_tokens", "patch": "x_norm_patchtokens",
            "prenorm": "x_prenorm"}


class _Captured(Exception):
    def __init__(self, kwargs: dict[str, Any]) -> None:
        super().__init__("captured")
        self.kwargs = kwargs


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, metavar="DIR",
                        help="a checkout of facebookresearch/dinov3 (the folder that holds dinov3/)")
    parser.add_argument("--presets", nargs="+", default=list(ROPE_PRESETS), choices=list(ROPE_PRESETS),
                        help="presets to compare at --depths (default: all)")
    parser.add_argument("--depths", nargs="+", type=int, default=[1, 2], help="reduced depths (default: 1 2)")
    parser.add_argument("--full", nargs="*", default=["vits16", "vitb16"], choices=list(ROPE_PRESETS),
                        help="presets also compared at their full depth (default: vits16 vitb16)")
    parser.add_argument("--batch", type=int, default=2, help="images per batch (default: %(default)s)")
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="largest max relative difference accepted (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the official weights (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the rows as JSON to PATH")
    return parser.parse_args()


def _official_modules(checkout: Path):
    if not (checkout / "dinov3" / "models" / "vision_transformer.py").is_file():
        sys.exit(f"--official {checkout}: no dinov3/models/vision_transformer.py there; clone "
                 "https://github.com/facebookresearch/dinov3 and pass the clone's folder")
    sys.path.insert(0, str(checkout))
    from dinov3.hub import backbones as hub  # noqa: PLC0415 (the user's checkout)
    from dinov3.layers.dino_head import DINOHead  # noqa: PLC0415
    from dinov3.models import vision_transformer  # noqa: PLC0415

    logging.getLogger("dinov3").setLevel(logging.WARNING)
    return hub, vision_transformer, DINOHead


def hub_kwargs(hub, vision_transformer, preset: str) -> dict[str, Any]:
    """The keyword arguments the official hub builder gives the model class (nothing is built)."""
    real = vision_transformer.DinoVisionTransformer

    def capture(**kwargs: Any) -> None:
        raise _Captured(kwargs)

    vision_transformer.DinoVisionTransformer = capture
    try:
        getattr(hub, f"dinov3_{preset}")(pretrained=False)
    except _Captured as captured:
        return captured.kwargs
    finally:
        vision_transformer.DinoVisionTransformer = real
    raise RuntimeError(f"dinov3_{preset} built no DinoVisionTransformer")


def preset_differences(official_class: type, kwargs: dict[str, Any], preset: str) -> list[str]:
    """Every architecture argument where dinoreg's preset differs from the hub's (the official class's default
    where the hub passes none); drop_path_rate is a training setting, not the architecture's."""
    official_defaults = {k: p.default for k, p in inspect.signature(official_class).parameters.items()
                         if p.default is not inspect.Parameter.empty}
    ours = {**ROPE_RELEASED, **ROPE_PRESETS[preset]}
    our_defaults = {k: p.default for k, p in inspect.signature(RopeVisionTransformer).parameters.items()}
    names = (set(kwargs) | set(ours) | set(official_defaults)) & set(our_defaults) - {"drop_path_rate"}
    theirs_of = {**official_defaults, **kwargs}
    ours_of = {**our_defaults, **ours}
    return [f"{name}: ours {ours_of[name]!r}, official {theirs_of.get(name)!r}" for name in sorted(names)
            if ours_of[name] != theirs_of.get(name) and not (name == "device")]


def relative(ours: torch.Tensor, official: torch.Tensor) -> float:
    if ours.shape != official.shape:
        return float("inf")
    if official.numel() == 0:
        return 0.0
    scale = official.abs().max().item()
    return (ours - official).abs().max().item() / (scale or 1.0)


def outputs(model: torch.nn.Module, batches: list[torch.Tensor], masks: torch.Tensor, depth: int
            ) -> dict[str, list[torch.Tensor]]:
    """Every compared output of ``model`` (the official class or ours: the same calls), by column."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in COLUMNS[:-1]}
    with torch.no_grad():
        for x in batches:
            features = model.forward_features(x)
            for column, key in FEATURES.items():
                out[column].append(features[key])
            out["gil_norm"] += list(model.get_intermediate_layers(x, n=depth, norm=True))
            out["gil_raw"] += list(model.get_intermediate_layers(x, n=depth, norm=False))
            # n as the number of last blocks, and (on the first batch) as a list of block indices
            for n in (depth, list(range(depth))) if x is batches[0] else (depth,):
                for patches, cls, extra in model.get_intermediate_layers(x, n=n, norm=True, reshape=True,
                                                                         return_class_token=True,
                                                                         return_extra_tokens=True):
                    out["gil_extra"] += [patches, cls, extra]
        masked = model.forward_features(batches[0], masks=masks)
        out["masked"] += [masked[key] for key in FEATURES.values()]
        for group in model.forward_features(batches, [None, None]):
            out["list"] += [group[key] for key in FEATURES.values()]
    return out


def differences(ours: dict[str, list[torch.Tensor]], official: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    return {column: max(relative(a, b) for a, b in zip(ours[column], official[column], strict=True))
            for column in official}


def official_model(vision_transformer, kwargs: dict[str, Any], depth: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = vision_transformer.DinoVisionTransformer(**{**kwargs, "depth": depth})
    model.init_weights()
    return model.eval()


def write_files(folder: Path, model: torch.nn.Module, head_class: Callable[..., torch.nn.Module]) -> list[Path]:
    """The official hub file and an official teacher_checkpoint.pth with DINO and iBOT heads."""
    state = model.state_dict()
    hub_file, teacher_file = folder / "hub.pth", folder / "teacher_checkpoint.pth"
    torch.save(state, hub_file)
    teacher = {f"backbone.{key}": value for key, value in state.items()}
    for name in ("dino_head", "ibot_head"):
        head = head_class(model.embed_dim, 256, hidden_dim=512, bottleneck_dim=64)
        head.init_weights()
        teacher.update({f"{name}.{key}": value for key, value in head.state_dict().items()})
    torch.save({"teacher": teacher}, teacher_file)
    return [hub_file, teacher_file]


def compare(preset: str, depth: int, args: argparse.Namespace, modules, batches, masks) -> dict[str, Any]:
    hub, vision_transformer, head_class = modules
    kwargs = hub_kwargs(hub, vision_transformer, preset)
    row: dict[str, Any] = {"preset": preset, "depth": depth, "problems": [
        f"preset {d}" for d in preset_differences(vision_transformer.DinoVisionTransformer, kwargs, preset)]}
    official = official_model(vision_transformer, kwargs, depth, args.seed)
    torch.manual_seed(args.seed)
    ours_built = build_rope_backbone(preset, depth=depth)
    expected_arch = ours_built.arch_kwargs
    row["same_init"] = all(torch.equal(value, official.state_dict()[key])
                           for key, value in ours_built.state_dict().items())
    del ours_built
    reference = outputs(official, batches, masks, depth)
    found: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="parity_dinov3_") as folder:
        for path in write_files(Path(folder), official, head_class):
            loaded = dinoreg.load_backbone(path)  # strict
            if not isinstance(loaded, RopeVisionTransformer) or loaded.arch_kwargs != expected_arch:
                row["problems"].append(f"{path.name}: inferred {getattr(loaded, 'arch_kwargs', None)}")
            for column, value in differences(outputs(loaded, batches, masks, depth), reference).items():
                found[column] = max(found.get(column, 0.0), value)
            del loaded
            gc.collect()
    del official, reference
    gc.collect()
    torch.manual_seed(args.seed + 1)  # the reverse: our own weights into the official class
    ours = build_rope_backbone(preset, depth=depth).eval()
    theirs = vision_transformer.DinoVisionTransformer(**{**kwargs, "depth": depth}).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    found["reverse"] = max(differences(outputs(ours, batches, masks, depth),
                                       outputs(theirs, batches, masks, depth)).values())
    row.update(found)
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| preset | depth | same init | " + " | ".join(COLUMNS) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in COLUMNS) + " |"]
    for row in rows:
        cells = [f"{row[c]:.1e}" if c in row else "-" for c in COLUMNS]
        lines.append(f"| {row['preset']} | {row['depth']} | {'yes' if row.get('same_init') else 'no'} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    args = _arguments()
    if args.threads:
        torch.set_num_threads(args.threads)
    modules = _official_modules(args.official)
    torch.manual_seed(1234)
    batches = [torch.randn(args.batch, 3, 224, 224), torch.randn(args.batch, 3, 160, 224)]
    masks = torch.rand(args.batch, 14 * 14) < 0.4
    runs = [(preset, depth) for preset in args.presets for depth in args.depths]
    runs += [(preset, ROPE_PRESETS[preset]["depth"]) for preset in args.full]
    rows, failed = [], False
    for preset, depth in runs:
        start = time.perf_counter()
        row = compare(preset, depth, args, modules, batches, masks)
        row["seconds"] = round(time.perf_counter() - start, 1)
        worst = max(row[c] for c in COLUMNS)
        bad = worst > args.tolerance or row["problems"]
        failed |= bool(bad)
        print(f"{preset} depth {depth}: max relative difference {worst:.1e}, same init {row['same_init']}, "
              f"{row['seconds']} s{'; ' + '; '.join(row['problems']) if row['problems'] else ''}"
              f"{'  FAIL' if bad else ''}", flush=True)
        rows.append(row)
    print(_table(rows))
    print(f"tolerance {args.tolerance:g}: {'FAILED' if failed else 'all within'}; torch {torch.__version__}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
