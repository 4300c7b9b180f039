"""Image files: the extensions read, robust decoding to RGB, the bad-file log, and the scan of a dataset folder.

Shared by the datasets that list files (:mod:`dinoreg.data.datasets`), the compact index and the tar shards
(:mod:`dinoreg.data.index`, :mod:`dinoreg.data.shards`), so that all of them decode an image's bytes the same way
and list a folder in the same order.

A bad file never raises inside a DataLoader worker: :func:`load_image` returns None, the dataset counts it in its
``bad_files`` (a :class:`BadFileLog`, one per worker process) and the collate function drops the sample and
reports its path in the batch (``TrainingBatch.bad_files``), which is how the training loop sees bad files from
all workers.

Every odd pixel format is brought to 8-bit RGB: CMYK, palette (with or without transparency), 16- and
32-bit grayscale (scaled, not clipped), L/LA, RGBA (composited on white, so transparent areas are not
black).
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path
from typing import IO, List, Optional, Set, Tuple, Union

import numpy as np
from PIL import Image

from dinoreg.errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


class DatasetError(InputError, ValueError):
    """A dataset path or spec that cannot be read (missing, empty, malformed): a bad value of the config's
    ``train.dataset_path`` or of a tool's data option. The message names the path and the fix."""


_FIX = ('use "synthetic", "synthetic:size=N,image_size=S,objects=A-B", a folder of images, a .txt file with one '
        'image path per line, or an index or packed shards (`dinoreg data index` / `dinoreg data pack`)')

PathLike = Union[str, os.PathLike]


class BadFileLog:
    """Count and paths of files that could not be decoded (per process: each DataLoader worker has its own)."""

    def __init__(self, max_paths: int = 1000):
        self.count = 0
        self.paths: List[str] = []
        self.max_paths = max_paths  # bounded, so a dataset of broken files cannot grow memory without limit

    def record(self, path: PathLike) -> None:
        self.count += 1
        if len(self.paths) < self.max_paths:
            self.paths.append(str(path))

    def __repr__(self) -> str:
        return f"BadFileLog(count={self.count})"


def is_image_file(path: PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image).astype(np.float64)
        if mode == "F" and array.size and array.max() <= 1.0:
            array = array * 255.0
        elif mode != "F":
            # 16-bit samples (PNG/TIFF) span 0..65535; PIL's own convert would clip them at 255 (all white).
            array = array / 257.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else array
        gray = np.clip(array + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(path: Union[PathLike, IO[bytes]], draft_size: Optional[int] = None) -> Optional[Image.Image]:
    """Decode ``path`` (a file name or a binary file object) to an RGB PIL image, or return None if it is unreadable, truncated or not an image.

    ``draft_size``: for JPEGs, let libjpeg decode at a reduced scale (1/2, 1/4, 1/8) as long as both sides
    stay >= ``draft_size``; much faster for large photos when the crops do not need full resolution.

    Pillow is the only decoder: simplejpeg and PyTurboJPEG give bit-identical pixels and decode 1.5-1.7x faster, but
    the decode is about a fifth of a worker's cost per image for the DINOv2 multi-crop, so a worker gains about
    1.1x (docs/BENCHMARKS.md, "Data pipeline").
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Palette images with Transparency", EXIF warnings
            with Image.open(path) as image:
                if draft_size and image.format == "JPEG":
                    image.draft("RGB", (int(draft_size), int(draft_size)))
                image.load()
                rgb = to_rgb(image)
                if rgb is image:
                    rgb = image.copy()  # detach from the file handle closed on exit
                return rgb
    except Exception:  # noqa: BLE001 -- any decoder failure is a bad file, never a crashed worker
        return None


MAX_IMAGE_BYTES = 2**32 - 1  # the largest member a shard's index records (uint32 sizes)


def read_file(path: PathLike) -> Optional[bytes]:
    """A regular file's bytes (what ``dinoreg data pack`` copies), or None when it cannot be read, is not a regular
    file (a FIFO, ``/dev/zero``: a listed path is data, never a way to hang the reader) or is over 4 GiB."""
    try:
        with open(path, "rb") as file:
            status = os.fstat(file.fileno())
            if not stat.S_ISREG(status.st_mode) or status.st_size > MAX_IMAGE_BYTES:
                return None
            return file.read()
    except OSError:
        return None


def _identity(path: PathLike) -> Tuple[int, int]:
    status = os.stat(path)
    return status.st_dev, status.st_ino


def _first_visits(directory: str, subdirs: List[str], root: str, visited: Set[Tuple[int, int]],
                  skipped: List[str]) -> List[str]:
    """The sub-folders of ``directory`` to descend into: each real folder once. A link to a folder inside the
    dataset (``root``, resolved) is never followed: that folder is listed under its own name (a link back to a
    parent repeated the tree until the path was too long, every image dozens of times, and two such links made
    the scan endless; a link to a sibling class listed its images again under another label). A link that leads
    out of the dataset is followed once. The links left out are added to ``skipped``."""
    kept = []
    for name in subdirs:
        path = os.path.join(directory, name)
        real = os.path.realpath(path)
        try:
            identity = _identity(path)
        except OSError:  # a dangling link
            continue
        inside = os.path.islink(path) and (real == root or real.startswith(root + os.sep))
        if inside or identity in visited:
            skipped.append(f"{path} -> {real}")
        else:
            visited.add(identity)
            kept.append(name)
    return kept


def scan_top(root: PathLike) -> Tuple[List[str], List[str], Set[Tuple[int, int]], List[str]]:
    """The first level of a dataset folder: ``(images directly in root, class folder names, the identities of
    the folders visited so far, the links left out)``, each list in the order the scan lists them (sorted)."""
    root = os.fspath(root)
    visited, skipped = {_identity(root)}, []
    try:
        entries = sorted(os.scandir(root), key=lambda entry: entry.name)
    except OSError:
        return [], [], visited, skipped
    subdirs = [e.name for e in entries if _is_dir(e)]
    files = [os.path.join(root, e.name) for e in entries if not _is_dir(e) and is_image_file(e.name)]
    return files, _first_visits(root, subdirs, os.path.realpath(root), visited, skipped), visited, skipped


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links, as os.walk(followlinks=True) does
    except OSError:
        return False


def scan_class(root: PathLike, top: str, visited: Set[Tuple[int, int]], skipped: List[str]) -> List[str]:
    """The images under ``root/top`` (recursive, each folder's files sorted, sub-folders in sorted order), as
    ``os.walk`` from ``root`` lists them. ``visited`` (the identities of the folders listed so far, extended
    here) makes a folder reached twice through links listed once; the links left out go to ``skipped``."""
    root = os.fspath(root)
    real, images = os.path.realpath(root), []
    for directory, subdirs, files in os.walk(os.path.join(root, top), followlinks=True):
        subdirs[:] = _first_visits(directory, sorted(subdirs), real, visited, skipped)
        images += [os.path.join(directory, name) for name in sorted(files) if is_image_file(name)]
    return images


def loop_warning(root: PathLike, skipped: List[str]) -> Optional[str]:
    """The one line telling that some links were not followed (the scan is not an error, but the user's links
    are not what they think), or None."""
    if not skipped:
        return None
    return (f"warning: {root}: {len(skipped)} links lead to folders the scan lists anyway (e.g. {skipped[0]}); "
            "they are not followed, so each image is listed once, under its own folder")


def parse_list_line(line: str) -> Optional[Tuple[str, int]]:
    """One line of a file list: ``(path as written, normalised, label)``, or None for a blank line or a comment.
    A line may end with a tab and an integer label (``path<TAB>label``); otherwise the label is -1."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    label = -1
    if "\t" in line:
        head, tail = line.rsplit("\t", 1)
        if tail.strip().lstrip("-").isdigit():
            line, label = head.strip(), int(tail)
    if line.startswith(("~", "./")) or line == "." or "//" in line or "/./" in line or line.endswith(("/", "/.")):
        line = str(Path(os.path.expanduser(line)))  # what pathlib normalises; most lines need nothing (5x faster)
    return line, label
