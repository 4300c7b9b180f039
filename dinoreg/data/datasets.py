"""Image datasets on disk and ``build_dataset(spec)``: a folder, a file list, a compact index, packed tar shards.

A dataset item is ``(PIL.Image RGB, label)``, or ``None`` when the file cannot be decoded (zero-byte,
truncated, not an image, ...), counted in the dataset's ``bad_files`` (see :mod:`dinoreg.data.files`, which
decodes, and :mod:`dinoreg.data.index`, which reads an index or shards).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from PIL import Image

from dinoreg.data.files import (
    _FIX,
    IMAGE_EXTENSIONS,
    BadFileLog,
    DatasetError,
    PathLike,
    is_image_file,
    load_image,
    loop_warning,
    parse_list_line,
    read_file,
    scan_class,
    scan_top,
    to_rgb,
)
from dinoreg.data.index import IndexedDataset, is_index
from dinoreg.data.synthetic import SyntheticShapes

__all__ = ["IMAGE_EXTENSIONS", "BadFileLog", "DatasetError", "FileList", "ImageFolder", "IndexedDataset",
           "IndexedView", "build_dataset", "is_image_file", "load_image", "to_rgb"]


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

    def label(self, index: int) -> int:
        return self.samples[index][1]

    def read_bytes(self, index: int) -> Optional[bytes]:
        """The file's bytes as stored (what ``dinoreg data pack`` copies), or None when it cannot be read."""
        return read_file(self.samples[index][0])

    def get(self, index: int, draft_size: Optional[int] = None) -> Optional[Tuple[Image.Image, int]]:
        path, label = self.samples[index]
        image = load_image(path, draft_size=draft_size)
        if image is None:
            self.bad_files.record(path)
            return None
        return image, label

    def __getitem__(self, index: int) -> Optional[Tuple[Image.Image, int]]:
        return self.get(index, self.draft_size)


class ImageFolder(_FileDataset):
    """All images under ``root`` (recursive, sorted). Labels come from the first-level sub-folder names,
    sorted (``classes``); images directly in ``root``, or every image when there are no sub-folders, get -1.
    A link to a folder inside the dataset is never followed; one leading out of it is followed once.
    """

    def __init__(self, root: PathLike):
        super().__init__()
        self.root = Path(root)
        if not self.root.exists():
            raise DatasetError(f"dataset folder {str(self.root)!r} does not exist; {_FIX}")
        if not self.root.is_dir():
            raise DatasetError(f"{str(self.root)!r} is not a folder; {_FIX}")
        in_root, tops, visited, skipped = scan_top(self.root)
        per_folder = {top: scan_class(self.root, top, visited, skipped) for top in tops}
        warning = loop_warning(self.root, skipped)
        if warning:
            print(warning, file=sys.stderr)
        self.classes = sorted(top for top, images in per_folder.items() if images)
        if not in_root and not self.classes:
            raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {str(self.root)!r}; {_FIX}")
        self.samples = [(p, -1) for p in in_root]
        for label, name in enumerate(self.classes):
            self.samples += [(p, label) for p in per_folder[name]]

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
            entry = parse_list_line(line)
            if entry is not None:
                self.samples.append((os.path.join(base, entry[0]), entry[1]))
                labels.add(entry[1])
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
    """``"synthetic"`` / ``"synthetic:size=N,image_size=S[,seed=K]"`` / a folder of images / a ``.txt`` list /
    an index or packed shards (a folder holding ``dinoreg-index.json``, from ``dinoreg data index|pack``).

    For a folder holding a sub-folder named ``split`` (``root/train``, ``root/val``: the ImageNet layout)
    that sub-folder is used (an index in it too). Raises ``ValueError`` naming the path and the fix when the
    path is missing or holds no images, so a bad ``train.dataset_path`` fails before any model is built.
    """
    spec = str(spec).strip()
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return _parse_synthetic(spec, split)
    path = Path(os.path.expanduser(spec))
    if not path.exists():
        raise DatasetError(f"dataset path {spec!r} does not exist; {_FIX}")
    if path.is_dir():
        folder = path / split if (path / split).is_dir() else path
        if is_index(folder) or is_index(path):
            return IndexedDataset(folder if is_index(folder) else path)
        return ImageFolder(folder)
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
