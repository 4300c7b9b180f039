"""What a dataset's list of entries costs in memory and start-up time (issue 28): a ``FileList`` (Python objects)
against the memory-mapped index of the same list, a shard index, and ``ImageFolder`` against the index of a folder.

For each size N the driver writes, under ``--work``, an ImageNet-22k-like list (``nXXXXXXXX/nXXXXXXXX_K.JPEG<TAB>
label`` over 21,841 classes; paths only, no image is written), builds its index with ``build_index`` (timed, its
peak memory recorded), and writes a shard index of N entries from synthetic parts (``write_index``: about 100 KB
members in 1 GiB shards, laid out as ``dinoreg data pack`` lays them out) whose shard files are sparse files of the
sizes the index says. Each variant is then measured in a fresh Python process, one at a time:

- start-up: the seconds to construct the dataset (``FileList(list)``, ``IndexedDataset(index)``, ...);
- main: the resident set (RSS) after construction, its growth over the same process after the imports, its peak;
- worker: one forked process (as a DataLoader worker is) reads ``path(i)`` and ``label(i)`` for every entry, then
  reports its RSS, PSS and Private_Dirty from /proc/self/smaps_rollup. Private_Dirty is what the worker copied
  from its parent (the copy-on-access growth of Python objects whose reference counts it touched); the index's
  pages it read are the page cache's, clean and shared by every process that maps the file.

Reading image bytes is not measured here (see ``dinoreg bench data``). The index was just written, so its pages
are in the page cache (a warm start); the list too.

    nice -n 10 python launch/bench_index_memory.py --sizes 1000000 14000000 --json /tmp/indexmem/result.json

``--folder N`` adds ImageFolder on N empty files in 1,000 class folders against ``dinoreg data index`` of it
(start-up only). Generated files are deleted at the end unless ``--keep``. Needs Linux (/proc).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

CLASSES = 21_841  # ImageNet-22k's synsets
SHARD_BYTES = 2**30
BLOCK = 512  # a tar block: each member is a header block and its data padded to blocks
VARIANTS = ("filelist", "index", "shards", "folder", "folder-index")


# --- measuring one variant, in this process ---------------------------------------------------------------------

def _rollup() -> Dict[str, float]:
    """RSS, PSS, Private_Dirty and Private_Clean of this process, MiB."""
    values = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0]) / 1024
    return {"rss": values["Rss"], "pss": values["Pss"], "private_dirty": values["Private_Dirty"],
            "private_clean": values["Private_Clean"]}


def _peak_mib() -> float:
    """This process's peak resident set since its exec (VmHWM; ru_maxrss would carry over its parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _children_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB; the largest child


def _touch(dataset, queue) -> None:
    before = _rollup()
    start = time.perf_counter()
    total = 0
    for i in range(len(dataset)):
        total += len(dataset.path(i)) + dataset.label(i)
    seconds = time.perf_counter() - start
    after = _rollup()
    queue.put({"before": before, "after": after, "touch_s": seconds, "checksum": total})


def _open(variant: str, path: str):
    from dinoreg.data.datasets import FileList, ImageFolder
    from dinoreg.data.index import IndexedDataset
    if variant == "filelist":
        return FileList(path)
    if variant == "folder":
        return ImageFolder(path)
    return IndexedDataset(path)


def measure(variant: str, path: str, touch: bool) -> Dict[str, Any]:
    import dinoreg.data.datasets  # noqa: F401 -- the imports are the baseline, not the dataset's cost
    import dinoreg.data.index  # noqa: F401
    baseline = _rollup()
    start = time.perf_counter()
    dataset = _open(variant, path)
    startup = time.perf_counter() - start
    main = _rollup()
    result = {"variant": variant, "entries": len(dataset), "startup_s": round(startup, 2),
              "baseline_rss_mib": round(baseline["rss"], 1), "main_rss_mib": round(main["rss"], 1),
              "main_growth_mib": round(main["rss"] - baseline["rss"], 1), "main_peak_mib": round(_peak_mib(), 1)}
    if touch:
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        worker = context.Process(target=_touch, args=(dataset, queue))
        worker.start()
        report = queue.get()
        worker.join()
        before, after = report["before"], report["after"]
        result.update(worker_rss_mib=round(after["rss"], 1), worker_pss_mib=round(after["pss"], 1),
                      worker_private_dirty_mib=round(after["private_dirty"], 1),
                      worker_private_dirty_growth_mib=round(after["private_dirty"] - before["private_dirty"], 1),
                      worker_touch_s=round(report["touch_s"], 1),
                      worker_entries_per_s=round(len(dataset) / report["touch_s"]))
    return result


# --- generating the sources -------------------------------------------------------------------------------------

def _wnid(label: int) -> str:
    return f"n{1_440_764 + label * 4_567:08d}"  # 21,841 distinct ids of ImageNet's form, sorted like the labels


def write_list(path: Path, count: int) -> None:
    """``count`` lines in class order, about count / 21,841 images per class (as a sorted ImageNet-22k list)."""
    with open(path, "w", encoding="utf-8") as file:
        chunk = []
        for i in range(count):
            label = i * CLASSES // count
            wnid = _wnid(label)
            chunk.append(f"{wnid}/{wnid}_{i}.JPEG\t{label}\n")
            if len(chunk) == 100_000:
                file.write("".join(chunk))
                chunk = []
        file.write("".join(chunk))


def write_shard_index(folder: Path, count: int, seed: int = 0) -> Dict[str, Any]:
    """A shard index of ``count`` members named ``000012345.jpg`` with a label member each (what ``dinoreg data
    pack`` writes), sizes drawn around 100 KB, cut into 1 GiB shards; the shard files are sparse files of the
    sizes the index records, so the index opens as a packed folder does without writing the bytes."""
    import numpy as np

    from dinoreg.data.index import PartArrays, write_index

    rng = np.random.default_rng(seed)
    sizes = np.clip(rng.lognormal(np.log(100_000), 0.4, count), 2_000, 2_000_000).astype(np.uint32)
    # header + data padded to blocks, then the label member: header + one block
    footprint = BLOCK + (sizes.astype(np.int64) + BLOCK - 1) // BLOCK * BLOCK + 2 * BLOCK
    starts = np.cumsum(footprint) - footprint
    shards = (starts // SHARD_BYTES).astype(np.int32)
    firsts = np.searchsorted(shards, np.arange(int(shards[-1]) + 1))
    offsets = starts - starts[firsts][shards] + BLOCK
    ends = np.append(firsts[1:], count) - 1
    shard_sizes = (starts[ends] + footprint[ends] - starts[firsts] + 2 * BLOCK).tolist()  # + the end-of-archive
    digits = max(9, len(str(count - 1)))
    powers = 10 ** np.arange(digits - 1, -1, -1, dtype=np.int64)
    names = np.empty((count, digits + 4), np.uint8)
    names[:, :digits] = (np.arange(count, dtype=np.int64)[:, None] // powers) % 10 + ord("0")
    names[:, digits:] = np.frombuffer(b".jpg", np.uint8)
    labels = (np.arange(count, dtype=np.int64) * CLASSES // count).astype(np.int32)
    part = PartArrays({"names": names.reshape(-1), "lengths": np.full(count, digits + 4, np.int64), "labels": labels,
                       "shards": shards, "offsets": offsets.astype(np.int64), "sizes": sizes})
    folder.mkdir(parents=True)
    shard_list = [{"name": f"shard-{n:06d}.tar", "size": int(size)} for n, size in enumerate(shard_sizes)]
    write_index(folder, [part], kind="shards", root=".", classes=[str(c) for c in range(CLASSES)],
                source="synthetic shard layout (launch/bench_index_memory.py)", shards=shard_list)
    for shard in shard_list:
        with open(folder / shard["name"], "wb") as file:
            os.truncate(file.fileno(), shard["size"])  # sparse: no block is written
    for name in os.listdir(folder):
        # as pack does: written back, so the page cache's copy is clean (/proc's Private_Dirty counts the dirty
        # pages of a file that one process maps: unsynced, the index's pages would look like a worker's copies)
        with open(folder / name, "rb") as file:
            os.fsync(file.fileno())
    return {"shards": len(shard_list), "mean_member_bytes": round(float(sizes.mean()))}


def write_folder(root: Path, count: int, classes: int = 1000) -> None:
    for label in range(classes):
        folder = root / _wnid(label)
        folder.mkdir(parents=True)
        for i in range(label * count // classes, (label + 1) * count // classes):
            open(folder / f"{_wnid(label)}_{i}.JPEG", "wb").close()


# --- the driver -------------------------------------------------------------------------------------------------

def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def _disk_bytes(folder: Path) -> int:
    """Bytes the index's arrays and JSON hold (shard files excluded)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and not p.name.endswith(".tar"))


def _child(args: List[str]) -> Dict[str, Any]:
    """Run this script in a fresh process and return its JSON line."""
    command = [sys.executable, os.path.abspath(__file__), *args]
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed with exit status {done.returncode}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - start, 1)
    return result


def build(source: str, output: str, workers: int) -> Dict[str, Any]:
    from dinoreg.data.indexing import build_index
    start = time.perf_counter()
    info = build_index(source, output, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    return {"variant": "build", "entries": info["entries"], "units": info["units"], "build_s": round(seconds, 1),
            "workers": workers, "build_peak_main_mib": round(_peak_mib(), 1),
            "build_peak_worker_mib": round(_children_peak_mib(), 1)}


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []

    def record(result: Dict[str, Any], size: int) -> None:
        result.update(n=size, load=_load())
        results.append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)

    for size in args.sizes:
        base = work / f"n{size}"
        base.mkdir(exist_ok=True)
        listing, index, shards = base / "list.txt", base / "index", base / "shards"
        if "filelist" in args.variants or "index" in args.variants:
            if not listing.exists():
                start = time.perf_counter()
                write_list(listing, size)
                print(f"wrote {listing} ({listing.stat().st_size / 2**20:.0f} MiB) in "
                      f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        if "filelist" in args.variants:
            record(_child(["--measure", "filelist", str(listing)]), size)
        if "index" in args.variants:
            if index.exists():
                shutil.rmtree(index)
            result = _child(["--build", str(listing), str(index), "--workers", str(args.workers)])
            result.update(variant="build list index", index_bytes=_disk_bytes(index),
                          list_bytes=listing.stat().st_size, index_bytes_per_image=round(_disk_bytes(index) / size, 1))
            record(result, size)
            record(_child(["--measure", "index", str(index)]), size)
        if "shards" in args.variants:
            if shards.exists():
                shutil.rmtree(shards)
            layout = _child(["--write-shards", str(shards), str(size)])
            result = _child(["--measure", "shards", str(shards)])
            del layout["process_s"]
            result.update(layout, index_bytes=_disk_bytes(shards),
                          index_bytes_per_image=round(_disk_bytes(shards) / size, 1))
            record(result, size)
        if not args.keep:
            shutil.rmtree(base)
    if args.folder:
        base = work / f"folder{args.folder}"
        if base.exists():
            shutil.rmtree(base)
        start = time.perf_counter()
        write_folder(base / "images", args.folder)
        print(f"wrote {args.folder} empty files in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        record(_child(["--measure", "folder", str(base / "images"), "--no-touch"]), args.folder)
        result = _child(["--build", str(base / "images"), str(base / "index"), "--workers", str(args.workers)])
        result.update(variant="build folder index", index_bytes=_disk_bytes(base / "index"),
                      index_bytes_per_image=round(_disk_bytes(base / "index") / args.folder, 1))
        record(result, args.folder)
        record(_child(["--measure", "folder-index", str(base / "index"), "--no-touch"]), args.folder)
        if not args.keep:
            shutil.rmtree(base)
    return results


def table(results: List[Dict[str, Any]]) -> str:
    columns = [("n", "N"), ("variant", "variant"), ("build_s", "build s"), ("startup_s", "start-up s"),
               ("main_rss_mib", "main RSS MiB"), ("main_growth_mib", "main +MiB"), ("main_peak_mib", "main peak MiB"),
               ("worker_rss_mib", "worker RSS MiB"), ("worker_private_dirty_mib", "worker private MiB"),
               ("worker_private_dirty_growth_mib", "worker private +MiB"),
               ("worker_pss_mib", "worker PSS MiB"), ("worker_touch_s", "touch s"),
               ("index_bytes_per_image", "index B/img"), ("load", "load (1/5/15 min)")]
    rows = [[label for _, label in columns]]
    for result in results:
        rows.append(["" if result.get(key) is None else f"{result[key]:,}" if isinstance(result[key], int)
                     else str(result[key]) for key, _ in columns])
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("---" for _ in columns) + "|")
    return "\n".join(lines)


def _line(rows: List[Dict[str, Any]], key: str, size: int) -> float:
    """``key`` at ``size``: measured when ``size`` is a row's, else linear through the two ``rows`` (never below the
    larger measured value)."""
    a, b = rows
    for row in rows:
        if row["n"] == size:
            return row[key]
    return max(a[key], b[key], a[key] + (b[key] - a[key]) * (size - a["n"]) / (b["n"] - a["n"]))


def per_node(results: List[Dict[str, Any]], variant: str, size: int, ranks: int, workers: int
             ) -> Optional[Dict[str, float]]:
    """A variant's costs at ``size`` entries, linear through its two largest measured sizes (measured values when
    ``size`` is one of them), and what a node of ``ranks`` x (1 + ``workers``) processes holds, MiB: every process's
    private copy for a FileList; one page-cache copy of the index file plus each process's growth for an index."""
    rows = sorted((r for r in results if r["variant"] == variant and "worker_private_dirty_growth_mib" in r),
                  key=lambda r: r["n"])[-2:]
    if len(rows) < 2:
        return None
    costs = {"main": _line(rows, "main_growth_mib", size), "worker": _line(rows, "worker_private_dirty_growth_mib", size),
             "startup": _line(rows, "startup_s", size), "shared": 0.0}
    if "index_bytes" in rows[0]:
        costs["shared"] = _line(rows, "index_bytes", size) / 2**20
    builds = sorted((r for r in results if r["variant"] == "build list index"), key=lambda r: r["n"])[-2:]
    if variant == "index" and len(builds) == 2:
        costs["shared"] = _line(builds, "index_bytes", size) / 2**20
        costs["build"] = _line(builds, "build_s", size)
        costs["build_workers"] = builds[1]["workers"]
    costs["node"] = ranks * (costs["main"] + workers * costs["worker"]) + costs["shared"]
    return costs


def extrapolate(results: List[Dict[str, Any]], size: int, ranks: int, workers: int) -> str:
    """Linear in N through the two largest measured sizes of each variant (an extrapolation, not a measurement;
    never below the largest measured value, so noise in a flat figure does not extrapolate below zero), per node
    (:func:`per_node`)."""
    lines = [f"Extrapolated (linear in N through the two largest sizes measured, never below the largest measured "
             f"value) to N = {size:,}; a node of {ranks} ranks x (1 + {workers} workers):"]
    for variant in ("filelist", "index", "shards"):
        costs = per_node(results, variant, size, ranks, workers)
        if costs is None:
            continue
        shared = costs["shared"]
        if "build" in costs:
            lines.append(f"  build list index: {costs['build']:,.0f} s with {costs['build_workers']} workers, "
                         f"{shared:,.0f} MiB on disk")
        lines.append(f"  {variant}: start-up {costs['startup']:,.1f} s, main +{costs['main']:,.0f} MiB, each worker "
                     f"+{costs['worker']:,.0f} MiB private"
                     + (f", index file {shared:,.0f} MiB (page cache, shared)" if shared else "")
                     + f"; per node {costs['node'] / 1024:,.1f} GiB")
    return "\n".join(lines)


def plot(results: List[Dict[str, Any]], path: str, size: int, ranks: int, workers: int) -> None:
    """The memory a node holds for the dataset's entries, per variant, at the measured sizes and ``size``
    (extrapolated, drawn dashed), on log axes: a PNG at ``path``."""
    import matplotlib  # noqa: PLC0415 (only for --plot)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axis = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    labels = {"filelist": "a .txt list (FileList)", "index": "its index", "shards": "a shard index"}
    for variant, label in labels.items():
        measured = sorted({r["n"] for r in results if r["variant"] == variant and "worker_private_dirty_growth_mib" in r})
        if len(measured) < 2:
            continue
        sizes = [*measured, size]
        gib = [per_node(results, variant, n, ranks, workers)["node"] / 1024 for n in sizes]
        line, = axis.plot(measured, gib[:-1], marker="o", label=label)
        axis.plot(sizes[-2:], gib[-2:], linestyle="--", marker="o", markerfacecolor="none", color=line.get_color())
        below = variant == "shards"  # the two indexes nearly coincide: one label above, one below
        axis.annotate(f"{gib[-1]:,.1f} GiB", (sizes[-1], gib[-1]), textcoords="offset points",
                      xytext=(-10, -12 if below else 6), ha="right", fontsize=8, color=line.get_color())
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("images in the dataset (dashed: extrapolated)")
    axis.set_ylabel(f"GiB per node ({ranks} ranks x (1 + {workers} workers))")
    axis.set_title("Memory a node holds for the dataset's entries", fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000],
                        help="entries to generate, one measurement per size (default: %(default)s)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS[:3], default=list(VARIANTS[:3]),
                        help="what to measure at each size (default: all three)")
    parser.add_argument("--folder", type=int, default=0, metavar="N",
                        help="also ImageFolder on N empty files in 1,000 class folders against the index of that "
                             "folder, start-up only (default: 0, not measured)")
    parser.add_argument("--workers", type=int, default=2, help="processes of the index build (default: %(default)s)")
    parser.add_argument("--work", default="/tmp/indexmem", help="folder for the generated files (default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files (they take GBs at 14M)")
    parser.add_argument("--json", help="write the results (a list of objects) to this file")
    parser.add_argument("--extrapolate", type=int, default=142_000_000, metavar="N",
                        help="extrapolate the two largest sizes to N entries (default: %(default)s)")
    parser.add_argument("--ranks", type=int, default=8, help="ranks per node, for the per-node cost (default: 8)")
    parser.add_argument("--loader-workers", type=int, default=10,
                        help="DataLoader workers per rank, for the per-node cost (default: %(default)s)")
    parser.add_argument("--table", metavar="JSON",
                        help="print the table and the extrapolation of a saved --json, and measure nothing")
    parser.add_argument("--plot", metavar="PNG",
                        help="also draw the memory per node against the dataset's size (measured and extrapolated) "
                             "as a PNG")
    parser.add_argument("--measure", nargs=2, metavar=("VARIANT", "PATH"),
                        help="internal: measure one variant on PATH in this process and print one JSON line (the "
                             "driver runs each variant so, in a fresh process)")
    parser.add_argument("--write-shards", nargs=2, metavar=("INDEX", "N"),
                        help="internal: write the synthetic shard index of N entries in this process and print one "
                             "JSON line")
    parser.add_argument("--no-touch", action="store_true", help="with --measure: start-up and main process only")
    parser.add_argument("--build", nargs=2, metavar=("SOURCE", "INDEX"),
                        help="internal: build the index of SOURCE in this process and print one JSON line")
    args = parser.parse_args()
    if not Path("/proc/self/smaps_rollup").exists():
        parser.error("needs Linux's /proc/self/smaps_rollup")
    if args.measure:
        if args.measure[0] not in VARIANTS:
            parser.error(f"--measure VARIANT: one of {', '.join(VARIANTS)}")
        print(json.dumps(measure(args.measure[0], args.measure[1], touch=not args.no_touch)))
        return
    if args.write_shards:
        start = time.perf_counter()
        layout = write_shard_index(Path(args.write_shards[0]), int(args.write_shards[1]))
        layout.update(write_s=round(time.perf_counter() - start, 1), write_peak_mib=round(_peak_mib(), 1))
        print(json.dumps(layout))
        return
    if args.build:
        print(json.dumps(build(args.build[0], args.build[1], args.workers)))
        return
    if args.table:
        results = json.loads(Path(args.table).read_text())
        print(table(results) + "\n\n" + extrapolate(results, args.extrapolate, args.ranks, args.loader_workers))
        if args.plot:
            plot(results, args.plot, args.extrapolate, args.ranks, args.loader_workers)
        return
    if any(size <= 0 for size in args.sizes) or args.folder < 0 or args.workers <= 0:
        parser.error("--sizes and --workers must be > 0, --folder >= 0")
    results = run(args)
    print(table(results) + "\n\n" + extrapolate(results, args.extrapolate, args.ranks, args.loader_workers))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if args.plot:
        plot(results, args.plot, args.extrapolate, args.ranks, args.loader_workers)


if __name__ == "__main__":
    main()
