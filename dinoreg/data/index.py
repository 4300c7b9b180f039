"""A dataset's entries in memory-mapped numpy arrays: bytes per image, not a Python object per image.

An index is a folder (``dinoreg data index SOURCE --output INDEX`` writes one; ``dinoreg data pack`` writes one
beside its tar shards) holding:

- ``dinoreg-index.json``: the format and version, ``kind`` ("files" or "shards"), the number of entries, the
  ``root`` the names are relative to (relative itself to the index folder when not absolute), the class names,
  and for shards the shard files with their sizes. It is written last: a folder without it is no index.
- ``names.bin`` and ``name_offsets.npy``: entry i's name is ``names.bin[offsets[i]:offsets[i + 1]]`` (UTF-8): a
  path relative to ``root`` (or absolute) for files, the image member's name inside its shard for shards.
- ``labels.npy`` (int32, -1 for none) and, for shards, ``shards.npy`` (int32: which shard), ``offsets.npy``
  (int64: where the member's bytes start) and ``sizes.npy`` (uint32: how many).

Every array is opened with ``numpy.load(mmap_mode="r", allow_pickle=False)``: the pages are the page cache's,
shared by every DataLoader worker and every rank of a node, and an index from someone else is data, never code.
A shard member is read with one ``os.pread`` of its bytes (no tar parsing at training time), so random access is
exact and the global-stream sampler, bitwise resume and resume on another world size work as for a folder.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
from PIL import Image

from dinoreg.data.files import (MAX_IMAGE_BYTES, BadFileLog, DatasetError, PathLike, is_image_file, load_image,
                                read_file)

INDEX_FILE = "dinoreg-index.json"
FORMAT, VERSION = "dinoreg-index", 1
KINDS = ("files", "shards")
_OPEN_SHARDS = 64  # file descriptors a process keeps open at once (least recently used closed first)


def is_index(path: PathLike) -> bool:
    return (Path(path) / INDEX_FILE).is_file()


class DatasetIndex:
    """The arrays of an index folder, memory-mapped and checked for shape and type (not their values: that would
    read every page). ``kind``, ``count``, ``classes``, ``root`` (a Path) and, for shards, ``shard_files`` and
    ``shard_sizes`` come from the JSON."""

    def __init__(self, folder: PathLike):
        self.folder = Path(folder)
        meta = _read_meta(self.folder)
        self.kind, self.count = meta["kind"], meta["count"]
        self.classes: List[str] = meta["classes"]
        root = Path(meta["root"])
        self.root = root if root.is_absolute() else self.folder / root
        self.shard_files: List[str] = [s["name"] for s in meta.get("shards", [])]
        self.shard_sizes: List[int] = [s["size"] for s in meta.get("shards", [])]
        self.meta = meta
        self.names = self._array("names.bin", np.uint8, None)
        self.name_offsets = self._array("name_offsets.npy", np.int64, self.count + 1)
        self.labels = self._array("labels.npy", np.int32, self.count)
        if self.kind == "shards":
            self.shards = self._array("shards.npy", np.int32, self.count)
            self.offsets = self._array("offsets.npy", np.int64, self.count)
            self.sizes = self._array("sizes.npy", np.uint32, self.count)
        if int(self.name_offsets[0]) != 0 or int(self.name_offsets[-1]) != self.names.size:
            raise DatasetError(f"index {self.folder}: name_offsets.npy does not span names.bin; the index is "
                               "damaged: build it again with `dinoreg data index` (or `dinoreg data pack`)")

    def _array(self, name: str, dtype, length: Optional[int]) -> np.ndarray:
        path = self.folder / name
        try:
            if name.endswith(".bin"):
                array = (np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size
                         else np.zeros(0, np.uint8))
            else:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise DatasetError(f"index {self.folder}: cannot read {name} ({error}); the index is incomplete or "
                               "damaged: build it again with `dinoreg data index` (or `dinoreg data pack`)") from None
        array = array.view(np.ndarray)  # still the mapped pages; slicing a plain view is 3-4x faster than a memmap's
        if array.dtype != dtype or array.ndim != 1 or (length is not None and array.shape[0] != length):
            raise DatasetError(f"index {self.folder}: {name} holds {array.dtype}{list(array.shape)}, expected "
                               f"{np.dtype(dtype)}[{length if length is not None else 'n'}]; the index is damaged: "
                               "build it again with `dinoreg data index` (or `dinoreg data pack`)")
        return array

    def name(self, index: int) -> str:
        return bytes(self.names[self.name_offsets[index]:self.name_offsets[index + 1]]).decode("utf-8", "replace")

    @property
    def nbytes(self) -> int:
        """The bytes of the arrays (what the index costs in page cache when every entry is touched)."""
        arrays = [self.names, self.name_offsets, self.labels]
        if self.kind == "shards":
            arrays += [self.shards, self.offsets, self.sizes]
        return int(sum(a.nbytes for a in arrays))


def _read_meta(folder: Path) -> Dict[str, Any]:
    fix = "build it again with `dinoreg data index` (or `dinoreg data pack`)"
    try:
        meta = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"index {folder}: cannot read {INDEX_FILE} ({error}); {fix}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DatasetError(f"index {folder}: {INDEX_FILE} is not a dinoreg index (format {FORMAT!r}); {fix}")
    if meta.get("version") != VERSION:
        raise DatasetError(f"index {folder}: version {meta.get('version')!r}, this dinoreg reads version {VERSION}; "
                           f"{fix}")
    problems = []
    if meta.get("kind") not in KINDS:
        problems.append(f"kind {meta.get('kind')!r} (expected one of {', '.join(KINDS)})")
    if not isinstance(meta.get("count"), int) or meta["count"] <= 0:
        problems.append(f"count {meta.get('count')!r} (expected a positive integer)")
    if not isinstance(meta.get("root"), str):
        problems.append(f"root {meta.get('root')!r} (expected a path)")
    if not isinstance(meta.get("classes"), list) or not all(isinstance(c, str) for c in meta["classes"]):
        problems.append("classes (expected a list of names)")
    shards = meta.get("shards", [])
    if meta.get("kind") == "shards" and not (
            isinstance(shards, list) and shards and all(
                isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("size"), int)
                and "/" not in s["name"] and s["name"] not in ("", ".", "..") for s in shards)):
        problems.append("shards (expected a list of {name: a file name in root, size: bytes})")
    if problems:
        raise DatasetError(f"index {folder}: {INDEX_FILE} has a bad " + "; a bad ".join(problems) + f"; {fix}")
    return meta


class IndexedDataset:
    """The images of an index (``kind`` "files": each entry a file under the index's root) or of packed tar shards
    (``kind`` "shards": each entry a member read by offset), as :class:`~dinoreg.data.datasets.ImageFolder` serves
    them: ``get(i, draft_size)`` -> ``(RGB image, label)`` or None for a bad file, counted in ``bad_files`` under its
    name (``SHARD.tar:MEMBER`` for a shard member). Nothing per image lives in Python objects; pickling (a spawned
    worker) sends the folder's name only, and the arrays are mapped again there.

    Shards shorter than the index says (truncated, or being rewritten) or missing are named in one warning line when
    the dataset is opened; their members past the end are bad files, and training goes on.
    """

    def __init__(self, folder: PathLike, *, warn: bool = True):
        self.folder = Path(folder)
        self.index = DatasetIndex(self.folder)
        self.kind, self.classes = self.index.kind, list(self.index.classes)
        self.bad_files = BadFileLog()
        self.draft_size: Optional[int] = None
        self._fds: "OrderedDict[int, Tuple[int, int]]" = OrderedDict()  # shard -> (descriptor, length)
        self._pid = os.getpid()
        self.damaged_shards = self._check_shards() if self.kind == "shards" else {}
        if warn and self.damaged_shards:
            names = [f"{name} ({problem})" for name, problem in list(self.damaged_shards.items())[:3]]
            print(f"warning: {self.folder}: {len(self.damaged_shards)} of {len(self.index.shard_files)} shards do not "
                  f"match the index: {', '.join(names)}{' ...' if len(self.damaged_shards) > 3 else ''}; their "
                  "unreadable members are counted as bad files (pack or copy them again to get them back)",
                  file=sys.stderr)

    def _check_shards(self) -> Dict[str, str]:
        damaged = {}
        for name, size in zip(self.index.shard_files, self.index.shard_sizes):
            try:
                actual = (self.index.root / name).stat().st_size
            except OSError:
                damaged[name] = "missing"
                continue
            if actual != size:
                damaged[name] = f"{actual} bytes, the index says {size}"
        return damaged

    def __len__(self) -> int:
        return self.index.count

    def __repr__(self) -> str:
        return f"IndexedDataset({str(self.folder)!r}, {self.kind}, {len(self)} images, {len(self.classes)} classes)"

    @property
    def targets(self) -> np.ndarray:
        return self.index.labels

    @property
    def index_bytes_per_image(self) -> float:
        return self.index.nbytes / self.index.count

    def label(self, index: int) -> int:
        return int(self.index.labels[index])

    def path(self, index: int) -> str:
        if self.kind == "files":
            return os.path.join(self.index.root, self.index.name(index))
        shard = int(self.index.shards[index])
        name = self.index.shard_files[shard] if 0 <= shard < len(self.index.shard_files) else f"<shard {shard}>"
        return f"{self.index.root / name}:{self.index.name(index)}"

    def read_bytes(self, index: int) -> Optional[bytes]:
        """The stored bytes of entry ``index`` (a file's, or a shard member's), or None when they cannot be read
        in full."""
        if self.kind == "files":
            return read_file(self.path(index))
        shard, offset, size = int(self.index.shards[index]), int(self.index.offsets[index]), int(self.index.sizes[index])
        try:
            fd, length = self._shard(shard)
        except OSError:
            return None
        if offset < 0 or offset + size > length:  # past the shard's end (truncated, or a damaged index): no read
            return None
        try:
            data = os.pread(fd, size, offset)
        except OSError:
            return None
        return data if len(data) == size else None

    def _shard(self, shard: int) -> Tuple[int, int]:
        """The open descriptor of shard ``shard`` and its length (OSError for a shard the index does not list)."""
        if not 0 <= shard < len(self.index.shard_files):
            raise OSError(f"shard {shard} is not in the index")
        if self._pid != os.getpid():  # a forked worker: the parent's descriptors are not ours to keep or close
            self._fds, self._pid = OrderedDict(), os.getpid()
        opened = self._fds.pop(shard, None)
        if opened is None:
            fd = os.open(self.index.root / self.index.shard_files[shard], os.O_RDONLY)
            opened = (fd, os.fstat(fd).st_size)
            if len(self._fds) >= _OPEN_SHARDS:
                os.close(self._fds.popitem(last=False)[1][0])
        self._fds[shard] = opened
        return opened

    def get(self, index: int, draft_size: Optional[int] = None) -> Optional[Tuple[Image.Image, int]]:
        if self.kind == "files":
            image = load_image(self.path(index), draft_size=draft_size)
        else:
            data = self.read_bytes(index)
            image = None if data is None else load_image(io.BytesIO(data), draft_size=draft_size)
        if image is None:
            self.bad_files.record(self.path(index))
            return None
        return image, self.label(index)

    def __getitem__(self, index: int) -> Optional[Tuple[Image.Image, int]]:
        return self.get(index, self.draft_size)

    def __getstate__(self) -> Dict[str, Any]:
        return {"folder": self.folder, "draft_size": self.draft_size}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(state["folder"], warn=False)
        self.draft_size = state["draft_size"]

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd, _ in getattr(self, "_fds", {}).values():
                try:
                    os.close(fd)
                except OSError:
                    pass


# --- writing ---------------------------------------------------------------------------------------------------

class Part:
    """A slice of an index under construction: names, labels and, for shards, where each member lies. Saved as one
    ``.npz`` (no pickles) so that an interrupted build resumes from the parts it finished."""

    def __init__(self, names: List[bytes], labels: List[int], shards: Optional[List[int]] = None,
                 offsets: Optional[List[int]] = None, sizes: Optional[List[int]] = None, **extra: Any):
        self.names, self.labels = names, labels
        self.shards, self.offsets, self.sizes = shards, offsets, sizes
        self.extra = extra

    def arrays(self) -> Dict[str, np.ndarray]:
        arrays = {"names": np.frombuffer(b"".join(self.names), np.uint8),
                  "lengths": np.array([len(n) for n in self.names], np.int64),
                  "labels": np.array(self.labels, np.int32)}
        if self.shards is not None:
            arrays.update(shards=np.array(self.shards, np.int32), offsets=np.array(self.offsets, np.int64),
                          sizes=np.array(self.sizes, np.uint32))
        arrays.update({f"extra_{k}": np.asarray(v) for k, v in self.extra.items()})
        return arrays

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as file:
            np.savez(file, **self.arrays())
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)


class PartArrays:
    """A saved part, read an array at a time (so assembling an index holds one array of one part in memory, not
    the index), or a part in memory; ``part[key] = array`` replaces an array for the assembly."""

    def __init__(self, source: Union[Path, Dict[str, np.ndarray]]):
        self.source = source
        self.replaced: Dict[str, np.ndarray] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        if key in self.replaced:
            return self.replaced[key]
        if isinstance(self.source, dict):
            return self.source[key]
        with np.load(self.source, allow_pickle=False) as data:
            return data[key]

    def __setitem__(self, key: str, value: np.ndarray) -> None:
        self.replaced[key] = value

    def extra(self, key: str) -> np.ndarray:
        return self[f"extra_{key}"]


def write_index(folder: Path, parts: List[PartArrays], *, kind: str, root: str, classes: List[str], source: str,
                shards: Optional[List[Dict[str, Any]]] = None) -> int:
    """Write the arrays of ``parts`` (in order) and, last, the JSON into ``folder``; returns the number of entries.
    Holds one array of one part in memory at a time."""
    lengths = [len(p["labels"]) for p in parts]
    count = int(sum(lengths))
    if count == 0:
        raise DatasetError(f"{source}: no images to index; {_NO_IMAGES}")
    with open(folder / "names.bin", "wb") as file:
        for part in parts:
            file.write(part["names"].tobytes())
    keys = [("name_offsets", np.int64), ("labels", np.int32)]
    if kind == "shards":
        keys += [("shards", np.int32), ("offsets", np.int64), ("sizes", np.uint32)]
    for key, dtype in keys:
        out = np.lib.format.open_memmap(folder / f"{key}.npy", mode="w+", dtype=dtype,
                                        shape=(count + 1 if key == "name_offsets" else count,))
        start, total = 0, 0
        for part, length in zip(parts, lengths):
            if key == "name_offsets":
                ends = np.cumsum(part["lengths"]) + total
                out[start + 1:start + 1 + length] = ends
                total = int(ends[-1]) if length else total
            else:
                out[start:start + length] = part[key]
            start += length
        if key == "name_offsets":
            out[0] = 0
        out.flush()
        del out
    meta = {"format": FORMAT, "version": VERSION, "kind": kind, "count": count, "root": root,
            "classes": classes, "source": source}
    if shards is not None:
        meta["shards"] = shards
    (folder / INDEX_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return count


_NO_IMAGES = "pass a folder of images, a .txt file list, or a folder of .tar shards"


# --- reading tar shards written by others ----------------------------------------------------------------------

LABEL_EXTENSIONS = ("cls", "cls.txt", "label")


def split_member(name: str) -> Tuple[str, str]:
    """WebDataset's grouping: ``dir/key.ext.more`` -> ``("dir/key", "ext.more")`` (the key stops at the first dot
    of the file name)."""
    folder, _, base = name.rpartition("/")
    key, _, extension = base.partition(".")
    return (f"{folder}/{key}" if folder else key), extension


def scan_tar(path: PathLike) -> Tuple[Part, Optional[str]]:
    """The samples of one tar shard, in order: for each group of consecutive members with the same key
    (WebDataset's grouping), its first image member, with the data offset and size, and its label from a ``cls``
    member (an integer as text), -1 without one. Returns the part and a problem (a truncated or damaged tar: the
    samples before it are kept), or None."""
    part = Part([], [], [], [], [])
    problem = None
    try:
        with tarfile.open(path, "r:") as tar:
            key, group = None, []
            for member in tar:
                if member.isfile():
                    member_key, extension = split_member(member.name)
                    if member_key != key:
                        _add_sample(tar, group, part)
                        key, group = member_key, []
                    group.append((extension.lower(), member))
            _add_sample(tar, group, part)
    except (tarfile.TarError, OSError, EOFError) as error:
        problem = f"{type(error).__name__}: {error}"
    return part, problem


def _add_sample(tar: tarfile.TarFile, group: List[Tuple[str, tarfile.TarInfo]], part: Part) -> None:
    images = [m for _, m in group if is_image_file(m.name) and m.size <= MAX_IMAGE_BYTES]
    if not images:
        return
    label = -1
    for extension, member in group:
        if extension in LABEL_EXTENSIONS:
            try:
                label = int(tar.extractfile(member).read(64).decode("ascii").strip())
            except (ValueError, UnicodeDecodeError, AttributeError, OSError):
                pass
            break
    part.names.append(images[0].name.encode("utf-8"))
    part.labels.append(label)
    part.offsets.append(images[0].offset_data)
    part.sizes.append(images[0].size)
