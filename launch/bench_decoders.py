"""JPEG decode throughput on one core, per decoder, and whether each gives Pillow's pixels.

Decoders: Pillow (``Image.open(BytesIO).load()``, with ``draft`` as ``dinoreg.data.datasets.load_image`` does),
simplejpeg (``decode_jpeg``, DCT scaling through ``min_width``/``min_height``) and PyTurboJPEG (``decode`` with a
``scaling_factor``), each where it imports. Every decoder decodes the same bytes, read into memory first (no
file-system time), at full size and at the reduced scale Pillow's ``draft(size)`` picks (1/2, 1/4 or 1/8, both sides
kept >= size; the others are asked for exactly that scale). Depends on Pillow and numpy only (not on dinoreg), so it
runs in a throwaway venv with pillow-simd too; ``--hashes PATH`` writes a digest of every decoded image, and
``--against PATH`` compares with another run's digests (pillow-simd's against Pillow's).

Example:
  python launch/bench_decoders.py /tmp/jpegs/train --images 500 --draft 187 --hashes /tmp/pillow.json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time

import numpy as np
from PIL import Image


def pillow_scale(size, draft_size):
    """The reduction ``Image.draft("RGB", (d, d))`` picks: the largest of 8, 4, 2, 1 not above min(w // d, h // d)."""
    if not draft_size:
        return 1
    scale = min(size[0] // draft_size, size[1] // draft_size)
    return next(s for s in (8, 4, 2, 1) if scale >= s)


def pillow_decode(data, draft_size):
    with Image.open(io.BytesIO(data)) as image:
        if draft_size:
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        return np.asarray(image.convert("RGB"))


def decoders():
    """name -> function(data, draft_size) -> HxWx3 uint8, for each decoder that imports here."""
    found = {"pillow": pillow_decode}
    try:
        import simplejpeg  # noqa: PLC0415
    except ImportError:
        pass
    else:
        def simple(data, draft_size):
            if not draft_size:
                return simplejpeg.decode_jpeg(data, colorspace="RGB")
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            s = pillow_scale((width, height), draft_size)
            return simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=-(-width // s), min_height=-(-height // s))
        found["simplejpeg"] = simple
    try:
        import turbojpeg  # noqa: PLC0415
        jpeg = turbojpeg.TurboJPEG()
    except (ImportError, RuntimeError, OSError) as error:
        print(f"PyTurboJPEG not usable here: {str(error).splitlines()[0]}", file=sys.stderr)
    else:
        def turbo(data, draft_size):
            if not draft_size:
                return jpeg.decode(data, pixel_format=turbojpeg.TJPF_RGB)
            width, height, _, _ = jpeg.decode_header(data)
            s = pillow_scale((width, height), draft_size)
            return jpeg.decode(data, pixel_format=turbojpeg.TJPF_RGB, scaling_factor=(1, s))
        found["turbojpeg"] = turbo
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="JPEG decode throughput on one core per decoder, and pixel "
                                                 "identity with Pillow")
    parser.add_argument("folder", help="a folder of JPEGs (searched recursively)")
    parser.add_argument("--images", type=int, default=500, help="images decoded per measurement (default: %(default)s)")
    parser.add_argument("--draft", type=int, action="append", default=[],
                        help="also measure with Pillow's draft to this size (repeatable); 0 is full size, always "
                             "measured")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the images, best kept (default: %(default)s)")
    parser.add_argument("--hashes", help="write the digest of every decoded image (per decoder and draft) to this JSON")
    parser.add_argument("--against", help="a --hashes JSON of another run: report how many images differ from its "
                                          "pillow digests")
    parser.add_argument("--json", help="write the results to this JSON")
    args = parser.parse_args(argv)
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(args.folder) for f in fs
                   if f.lower().endswith((".jpg", ".jpeg")))[:args.images]
    if not paths:
        parser.error(f"no JPEGs under {args.folder}")
    blobs = [open(p, "rb").read() for p in paths]
    found = decoders()
    import PIL  # noqa: PLC0415
    result = {"pillow_version": PIL.__version__, "images": len(blobs), "rates": {}, "differs_from_pillow": {}}
    hashes = {}
    reference = {}
    for draft in [0, *args.draft]:
        for name, fn in found.items():
            arrays = [fn(b, draft or None) for b in blobs[:50]]  # warm-up, and the pixels compared
            digests = [hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest() for a in arrays]
            if name == "pillow":
                reference[draft] = arrays
            else:
                diffs = [int(np.abs(a.astype(int) - r.astype(int)).max()) if a.shape == r.shape else -1
                         for a, r in zip(arrays, reference[draft])]
                result["differs_from_pillow"][f"{name}@{draft}"] = {
                    "images_differing": sum(d != 0 for d in diffs), "max_abs_diff": max(diffs), "of": len(diffs)}
            hashes[f"{name}@{draft}"] = digests
            best = float("inf")
            for _ in range(args.repeats):
                started = time.perf_counter()
                for b in blobs:
                    fn(b, draft or None)
                best = min(best, time.perf_counter() - started)
            result["rates"][f"{name}@{draft}"] = len(blobs) / best
            print(f"{name:11s} draft {draft or 'none':>4}: {len(blobs) / best:7.1f} images/s, "
                  f"{1e3 * best / len(blobs):.2f} ms/image, output {arrays[0].shape[1]}x{arrays[0].shape[0]} "
                  f"(first image)", flush=True)
    for key, value in result["differs_from_pillow"].items():
        print(f"{key}: {value['images_differing']} of {value['of']} images differ from Pillow's pixels "
              f"(max |diff| {value['max_abs_diff']}; -1: other shape)")
    if args.against:
        theirs = json.load(open(args.against))
        for key in [k for k in hashes if k.startswith("pillow@")]:
            if key in theirs:
                same = sum(a == b for a, b in zip(hashes[key], theirs[key]))
                result.setdefault("same_as_other_run", {})[key] = same
                print(f"{key}: {same} of {len(hashes[key])} images bit-identical to {args.against}'s")
    if args.hashes:
        json.dump(hashes, open(args.hashes, "w"))
    if args.json:
        json.dump(result, open(args.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
