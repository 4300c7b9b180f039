"""Decode an image held in memory (a file's bytes, a tar shard's member) to an RGB PIL image, or None.

``decode(data, draft_size)`` is what :func:`dinoreg.data.datasets.load_image` does to a file, on bytes: Pillow opens
them; a JPEG may be decoded at a reduced scale (``Image.draft``: 1/2, 1/4 or 1/8, both sides kept >= ``draft_size``);
every pixel format is brought to 8-bit RGB by :func:`~dinoreg.data.datasets.to_rgb`; anything that cannot be decoded
(truncated, not an image, zero bytes) gives None, never an exception, so a bad file never crashes a worker.

Only Pillow is offered: no other decoder speeds a worker up by the 1.3x that would justify a second code path.
Measured on ImageNet-sized JPEGs (``launch/bench_decoders.py``, ``dinoreg bench data``; docs/BENCHMARKS.md):
simplejpeg and PyTurboJPEG (libjpeg-turbo, as Pillow's wheel) give bit-identical pixels and decode a full-size
image 1.5 to 1.7x faster, but the decode is about a fifth of a worker's cost per image for the DINOv2 multi-crop
(the crops' bicubic resampling is most of it), so the whole gains about 1.1x. pillow-simd, a drop-in replacement
of Pillow built from source, makes that resampling about 3.5x faster (the whole about 2.2x), but its crops are not
bit-identical to Pillow's (about 3% of the values differ, mostly by 1): an environment choice a user can make,
not a dependency.
"""

from __future__ import annotations

import io
import warnings
from typing import Optional

from PIL import Image

from dinoreg.data.datasets import to_rgb

DECODERS = ("pillow",)


def decode(data: bytes, draft_size: Optional[int] = None, decoder: str = "pillow") -> Optional[Image.Image]:
    """``data`` (the bytes of an image file) decoded to an RGB PIL image, or None when it cannot be decoded.

    ``draft_size``: for JPEGs, let libjpeg decode at a reduced scale as long as both sides stay >= ``draft_size``
    (as :func:`~dinoreg.data.datasets.load_image`). ``decoder``: one of :data:`DECODERS` (a ``ValueError`` otherwise:
    a caller's mistake, not a bad file).
    """
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; use one of {', '.join(DECODERS)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Palette images with Transparency", EXIF warnings
            with Image.open(io.BytesIO(data)) as image:
                if draft_size and image.format == "JPEG":
                    image.draft("RGB", (int(draft_size), int(draft_size)))
                image.load()
                rgb = to_rgb(image)
                return image.copy() if rgb is image else rgb  # detached from the buffer closed on exit
    except Exception:  # noqa: BLE001 -- any decoder failure is a bad file, never a crashed worker
        return None
