"""``dinoreg data pack``: a dataset copied into WebDataset-compatible tar shards, with the index of their members.

Entry i of the source becomes the members ``KEY.EXT`` (the file's bytes as stored: nothing is decoded or
re-encoded, so training from the shards decodes exactly the pixels it decoded from the files) and, when it has a
label, ``KEY.cls`` (the label as text), where KEY is i written with at least 9 digits and EXT the file's
extension. Shards are ``shard-NNNNNN.tar`` (plain ustar, mtime 0: the same source packs to the same bytes) of about
``--shard-size`` each; the ``webdataset`` library reads them as they are. The index (:mod:`dinoreg.data.index`)
is written beside them, so the output folder is a dataset: ``train.dataset_path=DIR``.

The shards are written in ``.DIR.building/``, each finished shard with the part of the index it holds, and the
folder is renamed to ``DIR`` once complete: a killed pack resumes after its last finished shard, and a run never
reads a half-written one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from tqdm import tqdm

from dinoreg.data.datasets import build_dataset
from dinoreg.data.files import MAX_IMAGE_BYTES, DatasetError, PathLike
from dinoreg.data.index import IndexedDataset, Part, PartArrays, is_index, write_index
from dinoreg.data.indexing import build_index, building_folder, progress_options
from dinoreg.run_dir import fsync_directory

SHARD_NAME = "shard-{:06d}.tar"
READ_AHEAD = 256  # entries read by the thread pool ahead of the writer


def _member(name: str, data: bytes) -> Tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    return info, io.BytesIO(data)


def _extension(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    return suffix if suffix and suffix.isalnum() else "bin"


class _ShardWriter:
    """The shard being written (``.partial`` until closed) and the index entries of its members."""

    def __init__(self, work: Path, number: int, start: int):
        self.number, self.start = number, start
        self.path = work / SHARD_NAME.format(number)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.file = open(self.partial, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)
        self.part = Part([], [], [], [], [])

    def add(self, key: str, extension: str, data: bytes, label: int) -> None:
        name = f"{key}.{extension}"
        info, stream = _member(name, data)
        self.tar.addfile(info, stream)
        blocks = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        self.part.names.append(name.encode("ascii"))
        self.part.labels.append(label)
        self.part.shards.append(self.number)
        self.part.offsets.append(self.tar.offset - blocks)  # where the data began: after the 512-byte header
        self.part.sizes.append(len(data))
        if label >= 0:
            self.tar.addfile(*_member(f"{key}.cls", str(label).encode("ascii")))

    @property
    def size(self) -> int:
        return self.tar.offset

    def close(self, end: int, parts: Path) -> None:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.partial, self.path)
        self.part.extra.update(start=self.start, end=end, size=self.path.stat().st_size)
        self.part.save(parts / f"{self.number:06d}.npz")


def pack(source: str, output: PathLike, *, shard_size: int, workers: int = 8, progress: bool = True
         ) -> Dict[str, Any]:
    """Pack the dataset ``source`` (anything ``train.dataset_path`` accepts but the synthetic one) into tar shards
    of about ``shard_size`` bytes in the folder ``output``; resumes an interrupted pack of the same source.
    Returns ``{"entries", "shards", "missing", "resumed_from"}``."""
    if str(source).strip().startswith("synthetic"):
        raise DatasetError("the synthetic dataset lives in memory, there are no files to pack; write it to disk first "
                           "(`dinoreg data export-synthetic DIR`) and pack DIR/images/train")
    output = Path(os.fspath(output))
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise DatasetError(f"--output {output} exists and is not an empty folder; choose a new name (packed shards "
                           "are written complete or not at all)")
    path = Path(os.path.expanduser(str(source)))
    if not path.exists():
        raise DatasetError(f"{source} does not exist; pass a folder of images, a .txt file list, an index or packed "
                           "shards")
    plan = {"source": str(path.resolve()), "shard_size": int(shard_size)}
    work = building_folder(output)
    done = _resume(work, plan, output)
    try:
        dataset = _source_index(path, work, workers, progress)
    except DatasetError:
        if not done:
            shutil.rmtree(work)  # nothing packed yet: leave nothing behind
        raise
    count = len(dataset)
    start = int(done[-1].extra("end")) if done else 0
    if start and progress:
        print(f"resuming the pack in {work}: {len(done)} shards ({start} of {count} images) already written",
              file=sys.stderr)
    digits = max(9, len(str(count - 1)))
    missing = 0
    bar = tqdm(total=count, initial=start, unit="img", unit_scale=True, disable=not progress,
               desc=f"packing {dataset!r}", **progress_options())
    with bar, ThreadPoolExecutor(max(1, workers)) as pool:
        writer: Optional[_ShardWriter] = None
        for position, data in _read_ahead(pool, dataset, start, count):
            if data is None or len(data) > MAX_IMAGE_BYTES:
                missing += 1  # kept as an empty member: a bad file at training time, as it is in the source
                data = b""
            if writer is not None and writer.size + len(data) + 2 * tarfile.BLOCKSIZE > shard_size and writer.part.names:
                writer.close(position, work / "parts")
                writer = None
            if writer is None:
                writer = _ShardWriter(work, len(done), position)
                done.append(None)
            writer.add(f"{position:0{digits}d}", _extension(dataset.path(position)), data, dataset.label(position))
            bar.update(1)
        if writer is not None:
            writer.close(count, work / "parts")
    parts = [PartArrays(work / "parts" / f"{n:06d}.npz") for n in range(len(done))]
    shards = [{"name": SHARD_NAME.format(n), "size": int(p.extra("size"))} for n, p in enumerate(parts)]
    entries = write_index(work, parts, kind="shards", root=".", classes=list(getattr(dataset, "classes", [])),
                          source=str(source), shards=shards)
    for name in os.listdir(work):
        if (work / name).is_file():
            with open(work / name, "rb") as file:
                os.fsync(file.fileno())
    fsync_directory(work)
    os.replace(work, output)  # the index is complete: from here on the folder is a dataset
    fsync_directory(output.parent)
    shutil.rmtree(output / "parts")
    shutil.rmtree(output / "source-index", ignore_errors=True)
    (output / "plan.json").unlink()
    return {"entries": entries, "shards": len(shards), "missing": missing, "resumed_from": start}


def _source_index(path: Path, work: Path, workers: int, progress: bool) -> Any:
    """The source as an index (built first, inside the work folder, when it is a folder or a list: a scan in
    parallel, resumable, and bytes per image instead of the Python list of a folder's or a list's millions of paths
    in the packing process)."""
    folder = path / "train" if path.is_dir() and (path / "train").is_dir() and not is_index(path) else path
    if is_index(folder):
        return build_dataset(str(folder), split="train")
    index = work / "source-index"
    if not is_index(index):
        build_index(path, index, workers=workers, progress=progress)
    return IndexedDataset(index)


def _read_ahead(pool: ThreadPoolExecutor, dataset, start: int, count: int) -> Iterator[Tuple[int, Optional[bytes]]]:
    """``(position, bytes)`` in order, read ``READ_AHEAD`` at a time by the pool (a shared filesystem serves many
    small reads in parallel far faster than one after the other)."""
    for first in range(start, count, READ_AHEAD):
        positions = range(first, min(first + READ_AHEAD, count))
        yield from zip(positions, pool.map(dataset.read_bytes, positions))


def _resume(work: Path, plan: Dict[str, Any], output: Path) -> List[Any]:
    """The finished shards' parts of an interrupted pack of the same plan (a shard being written is dropped), or a
    fresh work folder."""
    plan_file = work / "plan.json"
    text = json.dumps(plan, sort_keys=True)
    if plan_file.is_file():
        if plan_file.read_text(encoding="utf-8") != text:
            raise DatasetError(f"{work} holds an interrupted pack of another source (or with another --shard-size, or "
                               f"the source changed since); remove {work} to start over, or choose another --output "
                               f"than {output}")
        for partial in work.glob("*.partial"):
            partial.unlink()
        done: List[Any] = []
        while (work / "parts" / f"{len(done):06d}.npz").is_file():
            done.append(PartArrays(work / "parts" / f"{len(done):06d}.npz"))
        for stale in work.glob("shard-*.tar"):  # written, but killed before its part was saved
            if int(stale.stem.split("-")[1]) >= len(done):
                stale.unlink()
        return done
    if work.exists():
        shutil.rmtree(work)
    (work / "parts").mkdir(parents=True)
    tmp = work / ".plan.json.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, plan_file)
    return []
