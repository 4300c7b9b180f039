"""Write N JPEGs that cost what ImageNet photos cost to decode: ImageNet-like sizes, quality 90, natural-image
statistics from a dead-leaves model, in an ImageNet-like folder layout (``OUT/train/nXXXXXXXX/nXXXXXXXX_K.JPEG``).

How an image is drawn (deterministic from ``--seed`` and the image's number):

- sizes: ImageNet's commonest, 500x375, 375x500, 500x333, 500x400 (and a few 400x300 / 333x500), each image's
  side jittered by up to +-8 px;
- occlusion (dead leaves): ``--leaves`` discs and ellipses painted back to front, radii drawn from the scale-
  invariant power law p(r) ~ 1/r^3 between 2.5 px and 60% of the short side, which gives the 1/f^2 power
  spectrum of natural scenes and their sharp occluding edges;
- colours: each image draws a palette of 6 natural-ish colours (greens, browns, greys, sky, skin, saturated
  accents, with the low saturation of most photo pixels); each leaf takes one with jitter and a linear
  shading gradient;
- texture: each leaf's fill adds its own amplitudes of two 1/f ("pink") noise fields of the image and of a finer
  1/f^0.5 grain (rough surfaces: foliage, fur, gravel), so surfaces are not flat (flat areas compress far better
  than photos);
- optics and sensor: a Gaussian blur of sigma 0.3 to 0.7 px (focus), then Gaussian noise of sigma 2 to 4.5
  grey levels; 8-bit, JPEG quality 90 with 4:2:0 chroma subsampling (libjpeg's default, and the commonest in
  ImageNet).

ImageNet's training JPEGs average about 110 kB (138 GB for 1.28M files) at about 469x387 pixels (about 0.6 bytes
per pixel); the script prints the mean file size and bytes per pixel of what it wrote, to compare.

Example: ``python launch/make_jpegs.py --count 2500 --classes 10 --output /tmp/jpegs``
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

SIZES = ((500, 375), (500, 375), (500, 375), (375, 500), (375, 500), (500, 333), (500, 400), (400, 300),
         (333, 500))
# base colours (RGB) of natural scenes: foliage, bark and soil, stone and concrete, sky and water, skin, accents
PALETTE = np.array([
    (74, 98, 46), (106, 128, 62), (44, 62, 30), (140, 150, 90),          # foliage
    (110, 82, 58), (150, 118, 84), (70, 52, 40), (186, 160, 120),        # wood, soil, sand
    (120, 120, 116), (170, 168, 160), (60, 62, 66), (210, 208, 200),     # stone, concrete, shadows, white
    (120, 160, 205), (80, 110, 150), (190, 210, 230),                    # sky, water
    (200, 150, 120), (160, 110, 86),                                     # skin
    (180, 40, 40), (220, 170, 30), (40, 70, 160),                        # accents
], dtype=np.float32)


def pink_noise(rng: np.random.Generator, height: int, width: int, exponent: float = 1.0) -> np.ndarray:
    """A zero-mean, unit-variance field whose amplitude falls as 1/f^exponent (1: the 1/f^2 power spectrum of
    natural images; 0.5: a finer grain, as of foliage, fur or gravel)."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    spectrum = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / f ** exponent
    spectrum[0, 0] = 0.0
    field = np.fft.irfft2(spectrum, s=(height, width)).astype(np.float32)
    return field / (field.std() + 1e-8)


def power_law_radii(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    """``n`` radii with density ~ 1/r^3 on [low, high] (inverse-CDF sampling)."""
    u = rng.random(n)
    return (low ** -2 - u * (low ** -2 - high ** -2)) ** -0.5


def draw_image(seed: int, index: int, leaves: int) -> Image.Image:
    rng = np.random.default_rng([seed, index])
    width, height = SIZES[rng.integers(len(SIZES))]
    width, height = int(width + rng.integers(-8, 9)), int(height + rng.integers(-8, 9))
    palette = PALETTE[rng.choice(len(PALETTE), size=6, replace=False)]
    palette = palette * rng.uniform(0.7, 1.2)  # the scene's exposure

    radii = power_law_radii(rng, leaves, 2.5, 0.6 * min(width, height))
    centres_x, centres_y = rng.uniform(-0.1, 1.1, leaves) * width, rng.uniform(-0.1, 1.1, leaves) * height
    aspect = np.exp(rng.uniform(-0.6, 0.6, leaves))  # ellipses, axis-aligned
    labels = np.zeros((height, width), dtype=np.int32)  # leaf 0: the background, covering everything
    for i in range(1, leaves):  # back to front: a later leaf occludes the earlier ones
        rx, ry = radii[i] * aspect[i], radii[i] / aspect[i]
        cx, cy = centres_x[i], centres_y[i]
        x0, x1 = max(int(cx - rx), 0), min(int(cx + rx) + 1, width)
        y0, y1 = max(int(cy - ry), 0), min(int(cy + ry) + 1, height)
        if x0 >= x1 or y0 >= y1:
            continue
        yy = ((np.arange(y0, y1, dtype=np.float32) - cy) / ry) ** 2
        xx = ((np.arange(x0, x1, dtype=np.float32) - cx) / rx) ** 2
        inside = yy[:, None] + xx[None, :] <= 1.0
        labels[y0:y1, x0:x1][inside] = i

    colours = palette[rng.integers(len(palette), size=leaves)] + rng.normal(0, 14, (leaves, 3))
    texture_a, texture_b = pink_noise(rng, height, width), pink_noise(rng, height, width)
    grain = pink_noise(rng, height, width, exponent=0.5)
    amp_a, amp_b = rng.uniform(6, 40, leaves).astype(np.float32), rng.uniform(0, 16, leaves).astype(np.float32)
    amp_grain = (rng.uniform(0, 1, leaves) ** 2 * 60).astype(np.float32)  # most surfaces smooth, some rough
    grad = rng.normal(0, 0.15, (leaves, 2)).astype(np.float32)  # shading, grey levels per pixel
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    shade = grad[labels, 0] * (xs - centres_x[labels].astype(np.float32)) \
        + grad[labels, 1] * (ys - centres_y[labels].astype(np.float32))
    luminance = amp_a[labels] * texture_a + amp_b[labels] * texture_b + amp_grain[labels] * grain \
        + np.clip(shade, -40, 40)
    chroma = rng.uniform(0.85, 1.15, (leaves, 3)).astype(np.float32)  # texture slightly coloured per leaf
    image = colours[labels].astype(np.float32) + luminance[..., None] * chroma[labels]

    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")
    pil = pil.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.7))))
    noisy = np.asarray(pil, dtype=np.float32) + rng.normal(0, rng.uniform(2.0, 4.5), (height, width, 1)) \
        + rng.normal(0, 1.0, (height, width, 3))
    return Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8), "RGB")


def class_name(seed: int, label: int) -> str:
    return f"n{(seed * 7919 + label * 104729) % 10 ** 8:08d}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write N ImageNet-sized JPEGs (about 500x375, quality 90) with natural-image statistics "
                    "(dead leaves with power-law sizes, 1/f textures, blur and sensor noise) in an ImageNet-like "
                    "layout: OUTPUT/train/<class>/<class>_<k>.JPEG. Deterministic from --seed.",
        epilog="example: python launch/make_jpegs.py --count 2500 --classes 10 --output /tmp/jpegs")
    parser.add_argument("--output", required=True, help="folder to write into (created; existing files with the "
                                                        "same names are overwritten)")
    parser.add_argument("--count", type=int, default=2500, help="number of images (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=10,
                        help="class sub-folders, images dealt round-robin (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every image's drawing (default: %(default)s)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default: %(default)s)")
    parser.add_argument("--leaves", type=int, default=2500,
                        help="dead leaves (occluding shapes) per image (default: %(default)s)")
    parser.add_argument("--split", default="train", help="sub-folder of OUTPUT holding the classes, as ImageNet's "
                                                         "train/val (default: %(default)s)")
    args = parser.parse_args(argv)
    for name in ("count", "classes", "leaves"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 1 <= args.quality <= 100:
        parser.error(f"--quality must be in 1..100, got {args.quality}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    root = os.path.join(args.output, args.split)
    total_bytes = total_pixels = 0
    for index in tqdm(range(args.count), desc="jpegs", unit="img"):
        label = index % args.classes
        name = class_name(args.seed, label)
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        image = draw_image(args.seed, index, args.leaves)
        path = os.path.join(folder, f"{name}_{index}.JPEG")
        image.save(path, "JPEG", quality=args.quality)
        total_bytes += os.path.getsize(path)
        total_pixels += image.width * image.height
    mean_kb = total_bytes / args.count / 1000
    print(f"wrote {args.count} JPEGs under {root}: mean {mean_kb:.1f} kB, {total_bytes / total_pixels:.2f} bytes "
          f"per pixel, mean {total_pixels / args.count / 1000:.0f} kpixels (ImageNet train: about 110 kB, "
          f"about 0.6 bytes per pixel at about 469x387)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
