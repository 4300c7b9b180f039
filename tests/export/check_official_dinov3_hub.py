"""The official DINOv3 hub loads `--format dinov3` exports strictly and computes load_backbone's features.

Needs the official sources (facebookresearch/dinov3, kept outside this repository: its license is not ours), so it is
a script and not part of the suite (tests/export/test_dinov3_exports.py checks the layout against our class, which
carries the official names):

    PYTHONPATH=/tmp/dinov3_src:. python tests/export/check_official_dinov3_hub.py [PRESET ...]

For each preset (default vits16 vits16plus vitb16 vitl16, at full size: the official hub entries take no depth), a
backbone with DINOv3's initialisation and every tensor moved off it is exported with ``export_backbone(fmt="dinov3")``,
loaded by the official ``dinov3_<preset>(pretrained=True, weights=path)`` (``load_state_dict(strict=True)``
inside) and by ``dinoreg.load_backbone``, and both run on the same images (fp32, eval mode, 64 x 96 pixels).
Prints the largest absolute difference of the class token, the storage tokens and the patch tokens, and
exits 1 when one exceeds 1e-4.
"""

import sys
import tempfile
from pathlib import Path

import torch
from dinov3.hub import backbones as official

from dinoreg import load_backbone
from dinoreg.export.writers import export_backbone
from dinoreg.models import build_rope_backbone

OUTPUTS = ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens")


def moved_off_init(model):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def check(preset: str, folder: Path) -> float:
    model = moved_off_init(build_rope_backbone(preset))
    # the official dinov3_vitl16 reads a hash from a name ending "-XXXXXXXX.pth" and refuses others
    path = export_backbone(model, None, fmt="dinov3", output=folder / f"dinov3_{preset}_export-00000000.pth")
    theirs = getattr(official, f"dinov3_{preset}")(pretrained=True, weights=str(path)).eval()
    ours = load_backbone(path)
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = theirs.forward_features(images), ours.forward_features(images)
    diffs = {key: (got[key] - expected[key]).abs().max().item() for key in OUTPUTS}
    print(f"{preset}: loaded strictly by dinov3_{preset}(weights=...); max |diff| "
          + ", ".join(f"{key} {value:.2e}" for key, value in diffs.items()), flush=True)
    return max(diffs.values())


def main(presets: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        torch.hub.set_dir(str(Path(tmp) / "hub"))  # the official hub copies the file into torch.hub's cache
        worst = max(check(preset, Path(tmp)) for preset in presets)
    print(f"largest difference {worst:.2e} ({'within' if worst <= 1e-4 else 'ABOVE'} 1e-4)")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["vits16", "vits16plus", "vitb16", "vitl16"]))
