"""``dinoreg data index``: build the compact index of a folder, a file list or a set of tar shards, once.

The work is cut in units (a class folder, a slice of the list, a shard), scanned in parallel processes; each
finished unit is saved as a part in ``.INDEX.building/`` beside the output, so a build that is killed resumes from
the units it finished. The index appears at ``INDEX`` complete or not at all (written aside, then renamed).

The entries are in the order the training would list them without an index: a folder's as
:class:`~dinoreg.data.datasets.ImageFolder` (links included: a folder reached twice through links is listed once,
in the first class that reaches it), a list's as :class:`~dinoreg.data.datasets.FileList`, shards' in the order of
their names and of their members.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from dinoreg.data.files import DatasetError, PathLike, loop_warning, parse_list_line, scan_class, scan_top
from dinoreg.data.index import Part, PartArrays, is_index, scan_tar, write_index
from dinoreg.run_dir import publish

LIST_CHUNK_BYTES = 8 * 2**20  # 69 slices for a list of 14M paths: enough to keep many workers busy


def progress_options() -> Dict[str, Any]:
    """A progress bar with an ETA, redrawn on a terminal; in a log (SLURM) one line a minute. Shown after a second
    only, so a command that fails at once prints its one line and nothing else."""
    if sys.stderr.isatty():
        return {"dynamic_ncols": True, "delay": 1.0}
    return {"mininterval": 60.0, "delay": 1.0, "ncols": 100}


def building_folder(output: Path) -> Path:
    return output.with_name(f".{output.name}.building")


def source_kind(source: Path) -> str:
    """"folder", "list" or "shards" (a folder whose top level holds ``.tar`` files and no class folders)."""
    if source.is_file():
        if source.suffix.lower() != ".txt":
            raise DatasetError(f"{source} is neither a folder nor a .txt file list; pass a folder of images, a .txt "
                               "file list, or a folder of .tar shards")
        return "list"
    if not source.is_dir():
        raise DatasetError(f"{source} does not exist; pass a folder of images, a .txt file list, or a folder of .tar "
                           "shards")
    if is_index(source):
        raise DatasetError(f"{source} is an index already (it holds dinoreg-index.json); train from it as it is")
    tars = [e for e in os.scandir(source) if e.name.endswith(".tar") and e.is_file()]
    return "shards" if tars and not any(e.is_dir() for e in os.scandir(source)) else "folder"


class Builder:
    """One kind of source: its units of work, how a unit is scanned (in a worker process), and how the parts
    become an index."""

    unit_name = "unit"

    def __init__(self, source: Path):
        self.source = source

    def plan(self) -> Dict[str, Any]:
        return {"source": str(self.source.resolve()), "kind": type(self).__name__, "units": self.units()}

    def units(self) -> List[Any]:
        raise NotImplementedError

    def scan(self, number: int, unit: Any) -> Part:
        raise NotImplementedError

    def assemble(self, folder: Path, parts: List[PartArrays]) -> int:
        raise NotImplementedError


class FolderBuilder(Builder):
    unit_name = "folders"

    def __init__(self, source: Path):
        super().__init__(source)
        self.in_root, self.tops, self.visited, self.skipped = scan_top(source)

    def units(self) -> List[Any]:
        return [None] + self.tops  # None: the images directly in the root

    def scan(self, number: int, unit: Any) -> Part:
        visited, skipped = set(self.visited), []
        paths = self.in_root if unit is None else scan_class(self.source, unit, visited, skipped)
        return self._part(paths, visited - self.visited, skipped)

    def _part(self, paths: List[str], identities: set, skipped: List[str]) -> Part:
        prefix = len(os.fspath(self.source)) + 1
        return Part([p[prefix:].encode("utf-8") for p in paths], [0] * len(paths),
                    identities=np.array(sorted(identities), np.int64).reshape(-1, 2),
                    skipped=np.array(skipped, dtype=str))

    def assemble(self, folder: Path, parts: List[PartArrays]) -> int:
        # A folder that two classes reach through links belongs to the first: a class whose scan met a folder an
        # earlier class listed is scanned again, in order, with what those listed (exactly ImageFolder's scan).
        seen, skipped, classes = set(self.visited), [], []
        for number, (unit, part) in enumerate(zip(self.units(), parts)):
            identities = {tuple(i) for i in part.extra("identities").tolist()}
            if identities & seen:
                rescanned = []
                paths = scan_class(self.source, unit, seen, rescanned)
                parts[number] = part = PartArrays(self._part(paths, set(), rescanned).arrays())
            else:
                seen |= identities
            skipped += part.extra("skipped").tolist()
            if unit is not None and len(part["labels"]):
                part["labels"] = np.full(len(part["labels"]), len(classes), np.int32)
                classes.append(unit)
            elif unit is None:
                part["labels"] = np.full(len(part["labels"]), -1, np.int32)
        warning = loop_warning(self.source, skipped)
        if warning:
            print(warning, file=sys.stderr)
        return write_index(folder, parts, kind="files", root=str(self.source.resolve()), classes=classes,
                           source=str(self.source))


class ListBuilder(Builder):
    unit_name = "slices"

    def units(self) -> List[Any]:
        """Byte ranges of about LIST_CHUNK_BYTES, each ending after a newline (or at the end of the file)."""
        size, ranges, start = self.source.stat().st_size, [], 0
        with open(self.source, "rb") as file:
            while start < size:
                file.seek(min(start + LIST_CHUNK_BYTES, size))
                file.readline()
                end = min(file.tell(), size)
                ranges.append([start, end])
                start = end
        return ranges

    def scan(self, number: int, unit: Any) -> Part:
        with open(self.source, "rb") as file:
            file.seek(unit[0])
            text = file.read(unit[1] - unit[0]).decode("utf-8")
        names, labels = [], []
        for line in text.splitlines():
            entry = parse_list_line(line)
            if entry is not None:
                names.append(entry[0].encode("utf-8"))
                labels.append(entry[1])
        return Part(names, labels)

    def assemble(self, folder: Path, parts: List[PartArrays]) -> int:
        labels = _labels_present(parts)
        return write_index(folder, parts, kind="files", root=str(self.source.resolve().parent),
                           classes=[str(int(label)) for label in labels if label != -1], source=str(self.source))


class ShardBuilder(Builder):
    unit_name = "shards"

    def units(self) -> List[Any]:
        return sorted(e.name for e in os.scandir(self.source) if e.name.endswith(".tar") and e.is_file())

    def scan(self, number: int, unit: Any) -> Part:
        part, problem = scan_tar(self.source / unit)
        part.shards = [number] * len(part.names)
        part.extra.update(problem=np.array(problem or ""), size=np.array((self.source / unit).stat().st_size))
        return part

    def assemble(self, folder: Path, parts: List[PartArrays]) -> int:
        problems = [(name, str(p.extra("problem"))) for name, p in zip(self.units(), parts) if str(p.extra("problem"))]
        for name, problem in problems[:5]:
            print(f"warning: {self.source / name}: {problem}; the members before the damage are indexed",
                  file=sys.stderr)
        if len(problems) > 5:
            print(f"warning: {len(problems) - 5} more damaged shards", file=sys.stderr)
        labels = _labels_present(parts)
        shards = [{"name": name, "size": int(p.extra("size"))} for name, p in zip(self.units(), parts)]
        return write_index(folder, parts, kind="shards", root=str(self.source.resolve()), shards=shards,
                           classes=[str(int(label)) for label in labels if label != -1], source=str(self.source))


def _labels_present(parts: List[PartArrays]) -> List[int]:
    present: set = set()
    for part in parts:
        present.update(np.unique(part["labels"]).tolist())
    return sorted(present)


BUILDERS: Dict[str, Callable[[Path], Builder]] = {"folder": FolderBuilder, "list": ListBuilder,
                                                  "shards": ShardBuilder}


_BUILDER: Optional[Builder] = None  # the build's: set once in each worker process, not sent with every job


def _set_builder(builder: Builder) -> None:
    global _BUILDER
    _BUILDER = builder


def _scan(job: Tuple[int, Any, Path]) -> int:
    number, unit, path = job
    part = _BUILDER.scan(number, unit)
    part.save(path)
    return len(part.names)


def build_index(source: PathLike, output: PathLike, *, workers: int = 1, progress: bool = True) -> Dict[str, Any]:
    """Index ``source`` into the folder ``output`` with ``workers`` processes; resumes an interrupted build of the
    same source. Returns ``{"entries", "kind", "resumed_units", "units"}``."""
    source, output = Path(os.path.expanduser(os.fspath(source))), Path(os.fspath(output))
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise DatasetError(f"--output {output} exists and is not an empty folder; choose a new name (an index is "
                           "written complete or not at all)")
    if source.is_dir() and (source / "train").is_dir() and not is_index(source):
        source = source / "train"  # the ImageNet layout, read as train.dataset_path reads it
        if progress:
            print(f"indexing {source} (the train/ split of the folder given, as training reads it)", file=sys.stderr)
    kind = source_kind(source)
    builder = BUILDERS[kind](source)
    plan = builder.plan()
    work = building_folder(output)
    resumed = _open_work(work, plan, output)
    todo = [(number, unit) for number, unit in enumerate(plan["units"])
            if not (work / "parts" / f"{number:06d}.npz").is_file()]
    done = len(plan["units"]) - len(todo)
    if done and progress:
        print(f"resuming the build in {work}: {done} of {len(plan['units'])} {builder.unit_name} already scanned",
              file=sys.stderr)
    _set_builder(builder)
    jobs = [(number, unit, work / "parts" / f"{number:06d}.npz") for number, unit in todo]
    bar = tqdm(total=len(plan["units"]), initial=done, unit=builder.unit_name[:-1], disable=not progress,
               desc=f"indexing {source}", **progress_options())
    images = 0
    with bar:
        for count in _run(jobs, workers):
            images += count
            bar.update(1)
            bar.set_postfix(images=images, refresh=False)
    parts = [PartArrays(work / "parts" / f"{number:06d}.npz") for number in range(len(plan["units"]))]
    try:
        with publish(output, directory=True) as tmp:
            entries = builder.assemble(tmp, parts)
    except DatasetError:  # no images at all: nothing to resume either
        shutil.rmtree(work)
        raise
    shutil.rmtree(work)
    return {"entries": entries, "kind": kind, "units": len(plan["units"]), "resumed_units": done if resumed else 0}


def _run(jobs: List[Tuple[int, Any, Path]], workers: int) -> Iterator[int]:
    if workers <= 1 or len(jobs) <= 1:
        yield from map(_scan, jobs)
        return
    # forkserver, not fork: a process with threads (torch's, a DataLoader's) can deadlock a forked child on a lock
    # another thread held at the fork (it did, in the test suite); the server is single-threaded and has this
    # module imported once, so each worker starts in milliseconds
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with context.Pool(min(workers, len(jobs)), initializer=_set_builder, initargs=(_BUILDER,)) as pool:
        yield from pool.imap_unordered(_scan, jobs)


def _open_work(work: Path, plan: Dict[str, Any], output: Path) -> bool:
    """Create the work folder, or check that the one there is an interrupted build of the same plan."""
    plan_file = work / "plan.json"
    text = json.dumps(plan, sort_keys=True)
    if plan_file.is_file():
        if plan_file.read_text(encoding="utf-8") == text:
            return True
        raise DatasetError(f"{work} holds an interrupted build of another source (or the source changed since); "
                           f"remove {work} to start over, or choose another --output than {output}")
    if work.exists():
        shutil.rmtree(work)  # killed before its plan was written: nothing in it to keep
    (work / "parts").mkdir(parents=True)
    tmp = work / ".plan.json.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, plan_file)
    return False
