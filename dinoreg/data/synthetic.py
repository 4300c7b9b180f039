"""SyntheticShapes: the embedded procedural dataset, so that training needs no download.

Each image shows one to a few objects of one shape on a background. The class is the objects' *shape*;
everything else is a nuisance factor drawn at random: every object's colour and texture (flat, stripes,
checker, noise), position and scale, and the background's colour and pattern (flat, gradient, noise,
stripes). Two choices keep shape learnable by a small model in minutes: shapes are upright, and objects
are brighter than the background. With random rotations, or with both contrast polarities, even
*supervised* training of a ViT-tiny or a 3-layer CNN on 32-48 px images stayed near chance for the first
300 steps of batch 64, where it reaches 0.5-0.8 accuracy without them.
Hues stay random. By default an image holds 2-4 objects of its class, each with its own colour and
texture: the views of an image then share the shape but not all the colours, which steers
self-supervised training towards shape. ``objects=(1, 1)`` gives single-object images (for object
discovery, where a box per image is wanted).

Images are generated on the fly and are a pure function of (seed, split, index, objects): the train and
val splits draw from disjoint seed streams, and labels are balanced (``label = index % num_classes``).
A 64 px image takes about a millisecond (numpy + PIL, no torch).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

CLASSES: List[str] = ["disc", "square", "triangle", "star", "ring", "cross", "hexagon", "ellipse"]
# Semantic segmentation: class 0 is the background, class 1 + label an object of that shape.
SEGMENTATION_CLASSES: List[str] = ["background", *CLASSES]
TEXTURES = ("flat", "stripes", "checker", "noise")
BACKGROUNDS = ("flat", "gradient", "noise", "stripes")
_SPLIT_STREAM = {"train": 0, "val": 1}
# The longer side of an object's box as a fraction of the image side: alone, or one of several.
_SINGLE_SCALE = (0.25, 0.70)
_SEVERAL_SCALE = (0.20, 0.42)
# The mask is drawn at this multiple of the image size and box-filtered down: anti-aliased edges.
_SUPERSAMPLE = 4
# Objects' base colours have every channel in [_BRIGHT, 255], backgrounds' in [0, 255 - _BRIGHT], and the
# object is brighter by at least _MIN_CONTRAST averaged over channels: one contrast polarity everywhere.
_BRIGHT = 128.0
_MIN_CONTRAST = 64.0


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
        objects: ``(min, max)`` objects per image, drawn uniformly per image; ``(1, 1)`` for single-object
            images.
    """

    classes = CLASSES

    def __init__(self, split: str = "train", size: Optional[int] = None, image_size: int = 64, seed: int = 0,
                 objects: Tuple[int, int] = (2, 4)):
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
        self.objects = (int(objects[0]), int(objects[1]))
        if not 1 <= self.objects[0] <= self.objects[1]:
            raise ValueError(f"SyntheticShapes objects must be a range (min, max) with 1 <= min <= max, got {objects}")
        self.classes = list(CLASSES)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return (f"SyntheticShapes(split={self.split!r}, size={self.size}, image_size={self.image_size}, "
                f"seed={self.seed}, objects={self.objects})")

    @property
    def targets(self) -> List[int]:
        return [i % len(CLASSES) for i in range(self.size)]

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        sample = self.sample(index)
        return sample["image"], sample["label"]

    def get(self, index: int, draft_size: Optional[int] = None) -> Tuple[Image.Image, int]:
        """Same as ``dataset[index]``; ``draft_size`` exists for interface parity with the file datasets."""
        return self[index]

    def boxes(self, index: int) -> List[Tuple[int, int, int, int]]:
        """The objects' bounding boxes ``(x0, y0, x1, y1)`` in pixels, x1/y1 exclusive (slice bounds): the tight
        box of the pixels each object covers (anti-aliased edges included)."""
        return self.sample(index)["boxes"]

    def segmentation(self, index: int) -> np.ndarray:
        """The label map ``int64 [S, S]`` of ``SEGMENTATION_CLASSES``: 0 where the background shows, 1 + the
        image's label where an object covers at least half of the pixel (anti-aliased edges split at 0.5)."""
        sample = self.sample(index)
        return np.where(sample["mask"] >= 0.5, 1 + sample["label"], 0).astype(np.int64)

    def _label(self, index: int) -> int:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self!r}")
        return index % len(CLASSES)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _SPLIT_STREAM[self.split], int(index)])

    def _geometry(self, rng: np.random.Generator, label: int, scale_range: Tuple[float, float],
                  placed: Sequence[Tuple[float, float, float, float]] = ()):
        """Outline(s) in pixel coordinates for one upright object whose longer side is ``scale_range`` of the
        image. The centre is drawn so the whole object lies inside the image and, when possible (20 tries),
        its box does not overlap those in ``placed``."""
        s = self.image_size
        outline, hole = _OUTLINES[CLASSES[label]]
        extent = outline.max(axis=0) - outline.min(axis=0)
        scale = rng.uniform(*scale_range) * s / extent.max()
        outline = outline * scale
        low, high = outline.min(axis=0), outline.max(axis=0)
        for _ in range(20):
            centre = np.array([rng.uniform(-low[0], s - high[0]), rng.uniform(-low[1], s - high[1])])
            box = (*(low + centre), *(high + centre))
            if not any(_overlap(box, other) for other in placed):
                break
        hole = None if hole is None else hole * scale + centre
        return outline + centre, hole, box

    def sample(self, index: int) -> dict:
        """Everything about one image: ``image`` (PIL RGB), ``label``, ``boxes`` and ``masks`` (one per object;
        masks are float [S, S] in [0, 1], later objects drawn over earlier ones), ``box`` (the first object's)
        and ``mask`` (the union of the objects)."""
        label = self._label(index)
        rng = self._rng(index)
        count = int(rng.integers(self.objects[0], self.objects[1] + 1))
        scale_range = _SINGLE_SCALE if count == 1 else _SEVERAL_SCALE
        placed, masks = [], []
        for _ in range(count):
            outline, hole, box = self._geometry(rng, label, scale_range, placed)
            placed.append(box)
            masks.append(self._render_mask(outline, hole))
        background = rng.uniform(0, 255 - _BRIGHT, size=3)
        pixels = _fill(rng, BACKGROUNDS[rng.integers(len(BACKGROUNDS))], background, self.image_size, amplitude=35)
        for mask in masks:
            colour = _object_colour(rng, background)
            foreground = _fill(rng, TEXTURES[rng.integers(len(TEXTURES))], colour, self.image_size, amplitude=40)
            alpha = mask[:, :, None]
            pixels = foreground * alpha + pixels * (1.0 - alpha)
        image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), mode="RGB")
        boxes = [_mask_box(mask) for mask in masks]
        return {"image": image, "label": label, "box": boxes[0], "boxes": boxes, "masks": masks,
                "mask": np.max(np.stack(masks), axis=0)}

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


def _object_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A colour brighter than ``background`` in every channel and by ``_MIN_CONTRAST`` on average (20 tries)."""
    for _ in range(20):
        colour = rng.uniform(_BRIGHT, 255, size=3)
        if (colour - background).mean() >= _MIN_CONTRAST:
            return colour
    return np.full(3, 255.0)


def _overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


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
