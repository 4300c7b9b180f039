"""How far the Hugging Face and timm exports of a DINOv3-family backbone are from dinoreg.load_backbone's features.

    python tests/export/measure_dinov3_exports.py                     # transformers (the suite's environment)
    /tmp/tvenv/bin/python tests/export/measure_dinov3_exports.py      # timm (where it imports; see docs/EXPORT.md)

The released ViT-S/16 architecture (DINOv3's initialisation, every tensor then moved off it) is exported with
``export_backbone`` and read back through each library's front door: ``AutoModel.from_pretrained`` and
``pipeline("image-feature-extraction")`` (transformers), ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay={"file": ...})`` (timm), on random images of 224 x 224 and 160 x 288 pixels (fp32, eval mode).
Prints the largest absolute difference to ``load_backbone(export)`` of all tokens (class, storage, patches) and of
the class token (the tokens' largest entries are about 4); the libraries that do not import are skipped, saying so.
One more transformers line: the model with its RoPE periods rounded to bf16, against the model itself.
"""

import copy
import tempfile
from pathlib import Path

import torch

from dinoreg import load_backbone
from dinoreg.export.writers import export_backbone
from dinoreg.models import build_rope_backbone

SIZES = ((224, 224), (160, 288))


def tokens(model, images):
    with torch.no_grad():
        out = model.forward_features(images)
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]], 1)


def report(name, theirs, ours):
    print(f"{name}: all tokens {(theirs - ours).abs().max().item():.2e}, "
          f"class token {(theirs[:, 0] - ours[:, 0]).abs().max().item():.2e}", flush=True)


def measure_hf(model, folder):
    try:
        import transformers
    except ImportError as error:
        print(f"transformers skipped: {error}")
        return
    path = export_backbone(model, None, fmt="hf", output=folder / "hf")
    ours, theirs = load_backbone(path), transformers.AutoModel.from_pretrained(path).eval()
    for height, width in SIZES:
        images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height))
        with torch.no_grad():
            report(f"transformers {transformers.__version__} AutoModel {height}x{width}",
                   theirs(pixel_values=images).last_hidden_state, tokens(ours, images))
    from PIL import Image

    picture = Image.fromarray(torch.randint(0, 256, (300, 400, 3), generator=torch.Generator().manual_seed(0),
                                            dtype=torch.uint8).numpy())
    extractor = transformers.pipeline("image-feature-extraction", model=str(path))
    pixels = transformers.AutoImageProcessor.from_pretrained(path)(picture, return_tensors="pt")["pixel_values"]
    report("transformers pipeline 300x400 picture", extractor(picture, return_tensors=True), tokens(ours, pixels))
    # the RoPE periods rounded to bf16 (as the released files hold them): transformers recomputes exact ones
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        rounded.rope_embed.periods.copy_(rounded.rope_embed.periods.bfloat16().float())
    path = export_backbone(rounded, None, fmt="hf", output=folder / "hf_rounded", allow_periods_mismatch=True)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(224))
    with torch.no_grad():
        report("transformers AutoModel 224x224, the model's periods rounded to bf16 (--allow-rope-periods-mismatch)",
               transformers.AutoModel.from_pretrained(path).eval()(pixel_values=images).last_hidden_state,
               tokens(rounded, images))


def measure_timm(model, folder):
    try:
        import timm
    except Exception as error:  # noqa: BLE001 (an ImportError, or torchvision failing to register its operators)
        print(f"timm skipped: {type(error).__name__}: {str(error).splitlines()[0][:100]}")
        return
    path = export_backbone(model, None, fmt="timm", output=folder / "timm.pth")
    saved = torch.load(path, weights_only=True)
    theirs = timm.create_model(saved["model_name"], pretrained=True, **saved["model_kwargs"],
                               pretrained_cfg_overlay={**saved["pretrained_cfg"], "file": str(path)}).eval()
    ours = load_backbone(path)
    for height, width in SIZES:
        images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height))
        with torch.no_grad():
            report(f"timm {timm.__version__} {saved['model_name']} {height}x{width}", theirs.forward_features(images),
                   tokens(ours, images))
    official = export_backbone(model, None, fmt="dinov3", output=folder / "official.pth")
    theirs = timm.create_model(saved["model_name"], pretrained=True, num_classes=0,
                               pretrained_cfg_overlay={"file": str(official)}).eval()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        report("timm's own DINOv3 filter on the --format dinov3 file 224x224", theirs.forward_features(images),
               tokens(load_backbone(official), images))


def main():
    torch.manual_seed(0)  # DINOv3's initialisation draws from the global generator
    model = build_rope_backbone("vits16")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    with tempfile.TemporaryDirectory() as tmp:
        measure_hf(model.eval(), Path(tmp))
        measure_timm(model.eval(), Path(tmp))


if __name__ == "__main__":
    main()
