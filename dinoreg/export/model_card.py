"""What makes a Hugging Face export a complete model folder: the image processor's settings and a model card."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from dinoreg import __version__
from dinoreg.data import IMAGENET_MEAN, IMAGENET_STD
from dinoreg.export.source import BackboneSource

__all__ = ["hf_preprocessor_config", "model_card"]

BICUBIC = 3  # PIL's code for bicubic resampling, as the image processor stores it


def hf_preprocessor_config(img_size: int) -> dict[str, Any]:
    """``preprocessor_config.json`` for ``AutoImageProcessor`` and ``pipeline("image-feature-extraction")``: DINOv2's
    evaluation preprocessing (bicubic resize of the shorter side to ``img_size * 256 / 224``, centre crop
    ``img_size``, ImageNet normalisation), which is ``dinoreg eval``'s, for the resolution the model was trained at."""
    return {
        "image_processor_type": "BitImageProcessor",  # what the official facebook/dinov2-* folders use
        "do_convert_rgb": True,
        "do_resize": True, "size": {"shortest_edge": round(img_size * 256 / 224)}, "resample": BICUBIC,
        "do_center_crop": True, "crop_size": {"height": img_size, "width": img_size},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
    }


def model_card(arch: Mapping[str, Any], source: Optional[BackboneSource], *, architecture: str, dtype: str) -> str:
    """A short README.md: what the model is, how it was trained and produced, and how to load it."""
    registers = arch["num_register_tokens"]
    grid = arch["img_size"] // arch["patch_size"]
    trained = ("| trained by | an unknown source (no dinoreg checkpoint) |" if source is None else "\n".join([
        f"| training data | `{source.dataset or 'unknown'}` |",
        f"| iterations | {source.iteration} of {source.total_iterations or 'unknown'} |",
        f"| exported from | `{source.checkpoint}` ({source.part}, saved by {source.world_size} process(es), "
        f"config digest `{source.config_digest}`) |"]))
    return f"""---
library_name: transformers
pipeline_tag: image-feature-extraction
tags: [dinov2, dinoreg, vision-transformer, self-supervised, registers]
---

# A DINOv2-style ViT with {registers} register tokens, trained with dinoreg

Self-supervised (DINO + iBOT + KoLeo) Vision Transformer backbone, exported by `dinoreg export --format hf`
(dinoreg {__version__}) as `{architecture}`.

| | |
| --- | --- |
| architecture | ViT, patch {arch["patch_size"]}, width {arch["embed_dim"]}, {arch["depth"]} blocks, \
{arch["num_heads"]} heads, FFN `{arch["ffn_layer"]}` |
| register tokens | {registers} |
| training resolution | {arch["img_size"]} px ({grid} x {grid} patches); other multiples of {arch["patch_size"]} px \
resample the position embeddings |
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

The image processor resizes the shorter side to {round(arch["img_size"] * 256 / 224)} px (bicubic), crops \
{arch["img_size"]} px and normalises with the ImageNet mean and std, as DINOv2's evaluations and \
`dinoreg eval` do. `dinoreg.load_backbone("path/to/this/folder")` reads the folder back into dinoreg.
"""
