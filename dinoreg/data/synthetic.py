"""SyntheticShapes: the embedded procedural dataset, so that training needs no download.

Each image shows one object on a background. The class is the object's *shape*; everything else is a
nuisance factor drawn at random: the object's colour and texture (flat, stripes, checker, noise), its
position, scale (25-70% of the image side) and rotation, and the background (flat, gradient, noise,
stripes). The object's colour is kept far from the background's, so the silhouette is always visible
and a self-supervised model can learn shape; a kNN or linear probe on the labels then measures
whether it did.

Images are generated on the fly and are a pure function of (seed, split, index): the train and val
splits draw from disjoint seed streams, and labels are balanced (``label = index % num_classes``).
A 64 px image takes well under a millisecond (numpy + PIL, no torch).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

CLASSES: List[str] = ["disc", "square", "triangle", "star", "ring", "cross", "hexagon", "ellipse"]
TEXTURES = ("flat", "stripes", "checker", "noise")
BACKGROUNDS = ("flat", "gradient", "noise", "stripes")
_SPLIT_STREAM = {"train": 0, "val": 1}
# The mask is drawn at this multiple of the image size and box-filtered down: anti-aliased edges.
_SUPERSAMPLE = 4
# Minimum RGB distance (0..255 scale) between the object's and the background's base colours.
_MIN_COLOUR_DISTANCE = 170.0


def _regular_polygon(n: int, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    angles = -math.pi / 2 + math.pi * np.arange(2 * points) / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _cross(half_width: float = 0.3) -> np.ndarray:
    a, w = 1.0, half_width
    return np.array([(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w),
                     (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)], dtype=np.float64)


# Outlines in unit coordinates (centred, extent ~1); a second outline, when present, is a hole.
_CIRCLE = _regular_polygon(64)
_OUTLINES: Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]] = {
    "disc": (_CIRCLE, None),
    "square": (np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64), None),
    "triangle": (_regular_polygon(3, -math.pi / 2), None),
    "star": (_star(), None),
    "ring": (_CIRCLE, 0.55 * _CIRCLE),
    "cross": (_cross(), None),
    "hexagon": (_regular_polygon(6), None),
    "ellipse": (_CIRCLE * np.array([1.0, 0.5]), None),
}
assert list(_OUTLINES) == CLASSES


class SyntheticShapes:
    """Procedural object-centric images; ``__getitem__`` returns ``(PIL.Image RGB, label)``.

    Args:
        split: "train" or "val" (disjoint seed streams).
        size: number of images (default 10000 for train, 2000 for val).
        image_size: side of the square images in pixels.
        seed: dataset seed; together with split and index it determines every pixel.
    """

    classes = CLASSES

    def __init__(self, split: str = "train", size: Optional[int] = None, image_size: int = 64, seed: int = 0):
        if split not in _SPLIT_STREAM:
            raise ValueError(f"SyntheticShapes split must be 'train' or 'val', got {split!r}")
        if image_size < 8:
            raise ValueError(f"SyntheticShapes image_size must be >= 8, got {image_size}")
        self.split = split
        self.size = int(size if size is not None else (10000 if split == "train" else 2000))
        if self.size <= 0:
            raise ValueError(f"SyntheticShapes size must be > 0, got {self.size}")
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.classes = list(CLASSES)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return (f"SyntheticShapes(split={self.split!r}, size={self.size}, image_size={self.image_size}, "
                f"seed={self.seed})")

    @property
    def targets(self) -> List[int]:
        return [i % len(CLASSES) for i in range(self.size)]

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        sample = self.sample(index)
        return sample["image"], sample["label"]

    def get(self, index: int, draft_size: Optional[int] = None) -> Tuple[Image.Image, int]:
        """Same as ``dataset[index]``; ``draft_size`` exists for interface parity with the file datasets."""
        return self[index]

    def box(self, index: int) -> Tuple[int, int, int, int]:
        """Object bounding box ``(x0, y0, x1, y1)`` in pixels, x1/y1 exclusive (slice bounds): the tight box
        of the pixels the object covers (anti-aliased edges included)."""
        return _mask_box(self._render_mask(*self._geometry(self._rng(index), self._label(index))))

    def _label(self, index: int) -> int:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self!r}")
        return index % len(CLASSES)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_STREAM[self.split], int(index)])

    def _geometry(self, rng: np.random.Generator, label: int):
        """Outline(s) in pixel coordinates; consumes the first draws of ``rng``."""
        s = self.image_size
        outline, hole = _OUTLINES[CLASSES[label]]
        angle = rng.uniform(0, 2 * math.pi)
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        outline = outline @ rotation.T
        extent = outline.max(axis=0) - outline.min(axis=0)
        scale = rng.uniform(0.25, 0.70) * s / extent.max()  # the longer bbox side is 25-70% of the image
        outline = outline * scale
        low, high = outline.min(axis=0), outline.max(axis=0)
        # Centre drawn so the whole object lies inside the image.
        centre = np.array([rng.uniform(-low[0], s - high[0]), rng.uniform(-low[1], s - high[1])])
        outline = outline + centre
        hole = None if hole is None else (hole @ rotation.T) * scale + centre
        return outline, hole

    def sample(self, index: int) -> dict:
        """Everything about one image: ``image`` (PIL RGB), ``label``, ``box``, ``mask`` (float [S, S] in [0, 1])."""
        label = self._label(index)
        rng = self._rng(index)
        mask = self._render_mask(*self._geometry(rng, label))
        object_colour, background_colour = _colour_pair(rng)
        foreground = _fill(rng, TEXTURES[rng.integers(len(TEXTURES))], object_colour, self.image_size, amplitude=40)
        background = _fill(rng, BACKGROUNDS[rng.integers(len(BACKGROUNDS))], background_colour, self.image_size,
                           amplitude=35)
        alpha = mask[:, :, None]
        pixels = foreground * alpha + background * (1.0 - alpha)
        image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), mode="RGB")
        return {"image": image, "label": label, "box": _mask_box(mask), "mask": mask}

    def _render_mask(self, outline: np.ndarray, hole: Optional[np.ndarray]) -> np.ndarray:
        big = self.image_size * _SUPERSAMPLE
        canvas = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(canvas)
        # Pixel (i, j) of the image covers [j, j+1) x [i, i+1); PIL polygons address pixel centres.
        to_canvas = lambda points: [tuple(p) for p in (points * _SUPERSAMPLE - 0.5).tolist()]  # noqa: E731
        draw.polygon(to_canvas(outline), fill=255)
        if hole is not None:
            draw.polygon(to_canvas(hole), fill=0)
        small = canvas.reduce(_SUPERSAMPLE)
        return np.asarray(small, dtype=np.float32) / 255.0


def _mask_box(mask: np.ndarray) -> Tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _colour_pair(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Object and background base colours at least ``_MIN_COLOUR_DISTANCE`` apart (RGB, 0..255)."""
    obj = rng.uniform(0, 255, size=3)
    for _ in range(20):
        bg = rng.uniform(0, 255, size=3)
        if np.linalg.norm(obj - bg) >= _MIN_COLOUR_DISTANCE:
            return obj, bg
    # Rare: push the background to the far corner of the RGB cube.
    return obj, np.where(obj > 127.5, 20.0, 235.0)


def _fill(rng: np.random.Generator, kind: str, colour: np.ndarray, size: int, amplitude: float) -> np.ndarray:
    """A [size, size, 3] float texture around ``colour``; variations stay within +-``amplitude``."""
    base = np.broadcast_to(colour.astype(np.float32), (size, size, 3))
    if kind == "flat":
        return base.copy()
    if kind == "noise":
        noise = rng.normal(0.0, amplitude / 2.5, size=(size, size, 1)).clip(-amplitude, amplitude)
        return base + noise.astype(np.float32)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    second = colour + rng.uniform(-amplitude, amplitude, size=3)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (xs * math.cos(angle) + ys * math.sin(angle)) / (size * math.sqrt(2)) + 0.5
        ramp = ramp[:, :, None].clip(0, 1)
        return (base * (1 - ramp) + second.astype(np.float32) * ramp).astype(np.float32)
    period = rng.uniform(4, max(size / 4, 6))
    if kind == "stripes":
        angle = rng.uniform(0, math.pi)
        phase = (xs * math.cos(angle) + ys * math.sin(angle)) / period
        on = (np.floor(phase) % 2 == 0)[:, :, None]
    elif kind == "checker":
        offset = rng.uniform(0, period, size=2)
        on = ((np.floor((xs + offset[0]) / period) + np.floor((ys + offset[1]) / period)) % 2 == 0)[:, :, None]
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return np.where(on, base, second.astype(np.float32)).astype(np.float32)
