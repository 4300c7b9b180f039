"""What makes an export complete beyond its tensors: the preprocessing it expects (Hugging Face's image processor,
timm's ``pretrained_cfg``) and, for a Hugging Face folder, a model card."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from dinoreg import __version__
from dinoreg.data import IMAGENET_MEAN, IMAGENET_STD
from dinoreg.export.source import BackboneSource
from dinoreg.models.rope_vit import is_rope_arch

__all__ = ["hf_preprocessor_config", "hf_resize", "model_card", "timm_pretrained_cfg"]

BICUBIC = 3  # PIL's code for bicubic resampling, as the image processor stores it
# DINOv2's evaluation preprocessing, which is ``dinoreg eval``'s: bicubic resize of the shorter side to
# ``img_size / CROP_FRACTION`` (256 px for 224), centre crop ``img_size``, ImageNet normalisation
CROP_FRACTION = 224 / 256


def hf_resize(img_size: int) -> int:
    """The shorter side Hugging Face's image processor resizes to before its centre crop of ``img_size``.

    ``dinoreg eval`` resizes to ``round(img_size / CROP_FRACTION)`` and crops as torchvision's ``CenterCrop``, at
    ``round(margin / 2)`` rounded half to even; transformers' processors (PIL and torchvision backends alike) crop at
    ``margin // 2``, and no setting of theirs moves the crop. The two agree unless ``margin % 4 == 3`` (the tiny
    recipe's 48 px: 55 - 48 = 7, crop at 4 against 3). There no configuration reproduces our pixels, and the
    nearest is one pixel more: an even margin centres the crop 0.5 px from ours with a 1.8 % scale error, where
    resizing as we do puts every pixel 1 px off. Measured (docs/EXPORT.md): tokens about 30 % closer to ours."""
    resize = round(img_size / CROP_FRACTION)
    return resize + 1 if (resize - img_size) % 4 == 3 else resize


def hf_preprocessor_config(img_size: int) -> dict[str, Any]:
    """``preprocessor_config.json`` for ``AutoImageProcessor`` and ``pipeline("image-feature-extraction")``: the
    evaluation preprocessing (see ``CROP_FRACTION``) at the resolution the model was trained at, as near to
    ``dinoreg eval``'s pixels as transformers' processors can compute (see :func:`hf_resize`)."""
    return {
        "image_processor_type": "BitImageProcessor",  # what the official facebook/dinov2-* folders use
        "do_convert_rgb": True,  # transparency composited on white, as dinoreg's image loading does
        "do_resize": True, "size": {"shortest_edge": hf_resize(img_size)}, "resample": BICUBIC,
        "do_center_crop": True, "crop_size": {"height": img_size, "width": img_size},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
    }


def timm_pretrained_cfg(img_size: int) -> dict[str, Any]:
    """The preprocessing fields of timm's ``pretrained_cfg`` (what ``timm.data.resolve_data_config`` reads to
    build ``create_transform``): the evaluation preprocessing (see ``CROP_FRACTION``) at ``img_size``. timm
    resizes to ``floor(img_size / crop_pct)`` and dinoreg to ``round(img_size / CROP_FRACTION)``: where the two
    differ (48 px: 54 and 55), ``crop_pct`` is chosen so that timm lands on dinoreg's size."""
    resize = round(img_size / CROP_FRACTION)
    crop_pct = CROP_FRACTION if math.floor(img_size / CROP_FRACTION) == resize else img_size / (resize + 0.5)
    return {"input_size": [3, img_size, img_size], "interpolation": "bicubic", "crop_pct": crop_pct,
            "crop_mode": "center", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "num_classes": 0}


def model_card(arch: Mapping[str, Any], source: Optional[BackboneSource], *, architecture: str, dtype: str) -> str:
    """A short README.md: what the model is, how it was trained and produced, and how to load it."""
    rope = is_rope_arch(arch)  # the DINOv3 family (DINOv3ViTModel)
    registers = arch["n_storage_tokens"] if rope else arch["num_register_tokens"]
    grid = arch["img_size"] // arch["patch_size"]
    trained = ("| trained by | an unknown source (no dinoreg checkpoint) |" if source is None else "\n".join([
        f"| training data | `{source.dataset or 'unknown'}` |",
        f"| iterations | {source.iteration} of {source.total_iterations or 'unknown'} |",
        f"| exported from | `{source.checkpoint}` ({source.part}, saved by {source.world_size} process(es), "
        f"config digest `{source.config_digest}`) |"]))
    family, tokens, positions = (
        ("dinov3", "storage tokens (registers)", f"2-D RoPE (base {arch.get('pos_embed_rope_base')}): any multiple of "
         f"{arch['patch_size']} px runs without resampling anything") if rope else
        ("dinov2", "register tokens", f"learned; other multiples of {arch['patch_size']} px resample the position "
         "embeddings"))
    return f"""---
library_name: transformers
pipeline_tag: image-feature-extraction
tags: [{family}, dinoreg, vision-transformer, self-supervised, registers]
---

# A {family.upper().replace("V", "v")}-style ViT with {registers} {tokens}, trained with dinoreg

Self-supervised (DINO + iBOT + KoLeo) Vision Transformer backbone, exported by `dinoreg export --format hf`
(dinoreg {__version__}) as `{architecture}`.

| | |
| --- | --- |
| architecture | ViT, patch {arch["patch_size"]}, width {arch["embed_dim"]}, {arch["depth"]} blocks, \
{arch["num_heads"]} heads, FFN `{arch["ffn_layer"]}` |
| {tokens} | {registers} |
| training resolution | {arch["img_size"]} px ({grid} x {grid} patches) |
| position encoding | {positions} |
| weights | {dtype} |
{trained}

## Use

```python
from transformers import AutoImageProcessor, AutoModel, pipeline

extractor = pipeline("image-feature-extraction", model="path/to/this/folder")   # [1, 1 + R + patches, D]
processor = AutoImageProcessor.from_pretrained("path/to/this/folder")
model = AutoModel.from_pretrained("path/to/this/folder")
tokens = model(**processor(images, return_tensors="pt")).last_hidden_state     # [cls, registers, patches]
```

{_preprocessing_note(arch["img_size"])} `dinoreg.load_backbone("path/to/this/folder")` reads the folder back \
into dinoreg.
"""


def _preprocessing_note(img_size: int) -> str:
    """What the image processor computes, against ``dinoreg eval``'s pixels (see :func:`hf_resize`)."""
    ours, theirs = round(img_size / CROP_FRACTION), hf_resize(img_size)
    what = (f"The image processor resizes the shorter side to {theirs} px (bicubic), crops {img_size} px and "
            "normalises with the ImageNet mean and std, as DINOv2's evaluations do.")
    if ours == theirs:
        exact = ("With transformers' PIL backend (`use_fast=False`) the pixels are `dinoreg eval`'s exactly, except "
                 "where the longer side's crop margin is 3 more than a multiple of 4 (transformers then crops 1 px "
                 "before torchvision's CenterCrop, which dinoreg follows).")
    else:
        exact = (f"`dinoreg eval` resizes to {ours} px and crops where torchvision's CenterCrop does; transformers' "
                 f"processors round that crop's offset down (its margin, {ours - img_size} px, is odd) and no setting "
                 f"moves it, so this processor resizes to {theirs} px, the nearest to `dinoreg eval`'s pixels that "
                 "transformers computes but not the same: measured on a tiny-recipe model, pixels differ by up to "
                 "0.16 (smooth images) and 3.5 (noise) in normalised units and tokens by 0.03-0.05 (smooth) and "
                 "0.1-0.6 (noise) on average. For exact features give the model the pixels of "
                 "`dinoreg.data.EvalTransform` and `dinoreg.data.normalise_uint8`.")
    return (f"{what} {exact} The torchvision backend, transformers' default where torchvision is installed, also "
            "rounds its resize differently from PIL, by at most one grey level (0.018 after normalisation).")
