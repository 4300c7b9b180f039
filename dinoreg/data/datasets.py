"""Image datasets on disk, robust decoding, bad-file accounting, and ``build_dataset(spec)``.

A dataset item is ``(PIL.Image RGB, label)``, or ``None`` when the file cannot be decoded (zero-byte,
truncated, not an image, ...). A bad file never raises inside a DataLoader worker: it is counted in
the dataset's ``bad_files`` (a :class:`BadFileLog`, one per worker process) and the collate function
drops the sample and reports its path in the batch (``TrainingBatch.bad_files``), which is how the
training loop sees bad files from all workers.

Every odd pixel format is brought to 8-bit RGB: CMYK, palette (with or without transparency), 16- and
32-bit grayscale (scaled, not clipped), L/LA, RGBA (composited on white, so transparent areas are not
black).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from dinoreg.data.synthetic import SyntheticShapes
from dinoreg.errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
class DatasetError(InputError, ValueError):
    """A dataset path or spec that cannot be read (missing, empty, malformed): a bad value of the config's
    ``train.dataset_path`` or of a tool's data option. The message names the path and the fix."""


_FIX = ('use "synthetic", "synthetic:size=N,image_size=S,objects=A-B", a folder of images, '
        'or a .txt file with one image path per line')

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


def load_image(path: PathLike, draft_size: Optional[int] = None) -> Optional[Image.Image]:
    """Decode ``path`` to an RGB PIL image, or return None if it is unreadable, truncated or not an image.

    ``draft_size``: for JPEGs, let libjpeg decode at a reduced scale (1/2, 1/4, 1/8) as long as both sides
    stay >= ``draft_size``; much faster for large photos when the crops do not need full resolution.
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


class _FileDataset:
    """Shared behaviour of ImageFolder and FileList: ``samples`` is a list of ``(path, label)``."""

    samples: List[Tuple[str, int]]
    classes: List[str]

    def __init__(self) -> None:
        self.bad_files = BadFileLog()
        # Set by MultiCropDataset / the eval loader to the smallest source side the crops need.
        self.draft_size: Optional[int] = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> List[int]:
        return [label for _, label in self.samples]

    def path(self, index: int) -> str:
        return self.samples[index][0]

    def get(self, index: int, draft_size: Optional[int] = None) -> Optional[Tuple[Image.Image, int]]:
        path, label = self.samples[index]
        image = load_image(path, draft_size=draft_size)
        if image is None:
            self.bad_files.record(path)
            return None
        return image, label

    def __getitem__(self, index: int) -> Optional[Tuple[Image.Image, int]]:
        return self.get(index, self.draft_size)


def _identity(path: PathLike) -> Tuple[int, int]:
    status = os.stat(path)
    return status.st_dev, status.st_ino


def _first_visits(directory: str, subdirs: List[str], root: str, visited: set, skipped: List[str]) -> List[str]:
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


class ImageFolder(_FileDataset):
    """All images under ``root`` (recursive, sorted). Labels come from the first-level sub-folder names,
    sorted (``classes``); images directly in ``root``, or every image when there are no sub-folders, get -1.
    """

    def __init__(self, root: PathLike):
        super().__init__()
        self.root = Path(root)
        if not self.root.exists():
            raise DatasetError(f"dataset folder {str(self.root)!r} does not exist; {_FIX}")
        if not self.root.is_dir():
            raise DatasetError(f"{str(self.root)!r} is not a folder; {_FIX}")
        per_folder = {}
        root, visited, loops = os.path.realpath(self.root), {_identity(self.root)}, []
        for directory, subdirs, files in os.walk(self.root, followlinks=True):
            subdirs[:] = _first_visits(directory, sorted(subdirs), root, visited, loops)
            relative = Path(directory).relative_to(self.root)
            top = relative.parts[0] if relative.parts else None
            for name in sorted(files):
                if is_image_file(name):
                    per_folder.setdefault(top, []).append(os.path.join(directory, name))
        if loops:  # one line: the scan is not an error, but the user's links are not what they think
            print(f"warning: {self.root}: {len(loops)} links lead to folders the scan lists anyway (e.g. "
                  f"{loops[0]}); they are not followed, so each image is listed once, under its own folder",
                  file=sys.stderr)
        if not per_folder:
            raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {str(self.root)!r}; {_FIX}")
        self.classes = sorted(k for k in per_folder if k is not None)
        label_of = {name: i for i, name in enumerate(self.classes)}
        self.samples = [(p, -1) for p in per_folder.get(None, [])]
        for name in self.classes:
            self.samples += [(p, label_of[name]) for p in per_folder[name]]

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, {len(self)} images, {len(self.classes)} classes)"


class FileList(_FileDataset):
    """Images listed in a text file: one path per line, relative paths are relative to the file's folder.

    Blank lines and lines starting with '#' are skipped. A line may end with a tab and an integer label
    (``path<TAB>label``); otherwise the label is -1. Listed files are not checked here (that would stat
    millions of files): a missing one is a bad file at load time.
    """

    def __init__(self, txt_path: PathLike):
        super().__init__()
        self.txt_path = Path(txt_path)
        if not self.txt_path.is_file():
            raise DatasetError(f"file list {str(self.txt_path)!r} does not exist; {_FIX}")
        base = self.txt_path.resolve().parent
        self.samples = []
        labels = set()
        for line in self.txt_path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            label = -1
            if "\t" in line:
                head, tail = line.rsplit("\t", 1)
                if tail.strip().lstrip("-").isdigit():
                    line, label = head.strip(), int(tail)
            path = Path(os.path.expanduser(line))
            self.samples.append((str(path if path.is_absolute() else base / path), label))
            labels.add(label)
        if not self.samples:
            raise DatasetError(f"file list {str(self.txt_path)!r} lists no images; {_FIX}")
        self.classes = [str(label) for label in sorted(labels - {-1})]

    def __repr__(self) -> str:
        return f"FileList({str(self.txt_path)!r}, {len(self)} images)"


def _parse_synthetic(spec: str, split: str) -> SyntheticShapes:
    allowed = "allowed: synthetic:size=N,image_size=S,seed=K,objects=A-B (or objects=A)"
    kwargs = {}
    _, _, options = spec.partition(":")
    for item in filter(None, (s.strip() for s in options.split(","))):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in ("size", "image_size", "seed", "objects"):
            raise DatasetError(f"bad synthetic dataset option {item!r} in {spec!r}; {allowed}")
        try:
            if key == "objects":
                low, _, high = value.partition("-")
                kwargs[key] = (int(low), int(high or low))
            else:
                kwargs[key] = int(value)
        except ValueError:
            raise DatasetError(f"synthetic dataset option {item!r} in {spec!r} must be an integer "
                             f"(objects: A-B); {allowed}") from None
    if split != "train" and "size" in kwargs:
        # "size" sets the training set; val keeps its default size, scaled in the same proportion.
        kwargs["size"] = max(1, kwargs["size"] // 5)
    return SyntheticShapes(split=split, **kwargs)


def build_dataset(spec: str, split: str = "train"):
    """``"synthetic"`` / ``"synthetic:size=N,image_size=S[,seed=K]"`` / a folder of images / a ``.txt`` list.

    For a folder holding a sub-folder named ``split`` (``root/train``, ``root/val``: the ImageNet layout)
    that sub-folder is used. Raises ``ValueError`` naming the path and the fix when the path is missing or
    holds no images, so a bad ``train.dataset_path`` fails before any model is built.
    """
    spec = str(spec).strip()
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return _parse_synthetic(spec, split)
    path = Path(os.path.expanduser(spec))
    if not path.exists():
        raise DatasetError(f"dataset path {spec!r} does not exist; {_FIX}")
    if path.is_dir():
        return ImageFolder(path / split if (path / split).is_dir() else path)
    if path.suffix.lower() == ".txt":
        return FileList(path)
    raise DatasetError(f"dataset path {spec!r} is neither a folder nor a .txt file list; {_FIX}")


class IndexedView:
    """The items ``indices`` of ``dataset``, each labelled with its index in ``dataset`` instead of its class.

    Carrying the index through the eval loader tells which images a batch holds even when undecodable
    files were dropped from it; the class labels are looked up from ``dataset.targets``.
    """

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, position: int, draft_size: Optional[int] = None):
        index = self.indices[position]
        get = getattr(self.dataset, "get", None)
        item = get(index, draft_size) if get is not None else self.dataset[index]
        return None if item is None else (item[0], index)

    def __getitem__(self, position: int):
        return self.get(position)
