"""The compact index and the tar shards: the same items as the folder or list they come from, WebDataset's reading of
the shards, resumable builds that never leave a half-written dataset, damaged shards named, and the memory a loader
worker keeps when it touches every entry."""

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinoreg.data.datasets import DatasetError, FileList, ImageFolder, build_dataset
from dinoreg.data.index import INDEX_FILE, DatasetIndex, IndexedDataset
from dinoreg.data.indexing import FolderBuilder, build_index, building_folder
from dinoreg.data.shards import _ShardWriter, pack


def _image(rng, path: Path, size=(24, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).save(path, quality=90) if path.suffix == ".jpg" else Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Classes b, a, c (listed sorted) with nested sub-folders, an empty class, an image in the root, a bad file,
    a PNG, and a link out of the dataset reached from two classes (listed once, in the first)."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("data") / "src"
    for name in ("b", "a", "c"):
        for i in range(3):
            _image(rng, root / name / f"{i}.jpg")
        _image(rng, root / name / "deep" / "x.png")
    (root / "empty").mkdir()
    _image(rng, root / "in_root.jpg")
    (root / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    outside = root.parent / "outside"
    _image(rng, outside / "o.jpg")
    os.symlink(outside, root / "a" / "link")
    os.symlink(outside, root / "c" / "link_again")
    return root


def _broken(source: Path) -> int:
    return [p for p, _ in ImageFolder(source).samples].index(str(source / "a" / "broken.jpg"))


def _items(dataset):
    out = []
    for i in range(len(dataset)):
        item = dataset[i]
        out.append(None if item is None else (np.asarray(item[0]).tobytes(), item[0].size, item[1]))
    return out


def test_index_and_shards_give_the_folders_items(source, tmp_path):
    folder = ImageFolder(source)
    build_index(source, tmp_path / "index", workers=2, progress=False)
    result = pack(str(source), tmp_path / "shards", shard_size=3000, workers=3, progress=False)
    index, shards = build_dataset(str(tmp_path / "index")), build_dataset(str(tmp_path / "shards"))
    assert isinstance(index, IndexedDataset) and index.kind == "files" and shards.kind == "shards"
    assert result["shards"] > 3 and result["entries"] == len(folder) == 15  # 12 + root + broken + outside once
    expected = _items(folder)
    assert _items(index) == expected and _items(shards) == expected
    assert index.classes == shards.classes == folder.classes == ["a", "b", "c"]
    assert list(index.targets) == list(shards.targets) == folder.targets
    assert [index.path(i) for i in range(len(index))] == [os.path.join(source.resolve(), os.path.relpath(p, source))
                                                         for p, _ in folder.samples]
    broken = _broken(source)
    assert shards.bad_files.paths == [shards.path(broken)] and shards.path(broken).endswith(f"{broken:09d}.jpg")
    # bytes per image: names and offsets, not objects
    assert index.index_bytes_per_image < 40 and shards.index_bytes_per_image < 50


def test_a_spawned_worker_gets_the_folders_name_not_the_arrays(source, tmp_path):
    """A DataLoader started with spawn or forkserver (Python 3.14's default) pickles its dataset: an index sends its
    folder's name, and maps the arrays again on the other side."""
    pack(str(source), tmp_path / "shards", shard_size=3000, progress=False)
    dataset = IndexedDataset(tmp_path / "shards")
    dataset.draft_size = 12
    sent = pickle.dumps(dataset)
    assert len(sent) < 1000
    received = pickle.loads(sent)
    assert received.draft_size == 12 and _items(received) == _items(dataset)


def test_a_file_list_index_keeps_its_order_labels_and_relative_paths(source, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\n{source}/b/1.jpg\t7\n\n../{source.name}/a/0.jpg\nmissing.jpg\t3\n"
                       f"{source}/c/deep/x.png\t-2\n", encoding="utf-8")
    os.symlink(source, tmp_path.parent / source.name) if not (tmp_path.parent / source.name).exists() else None
    files = FileList(listing)
    build_index(listing, tmp_path / "index", progress=False)
    index = build_dataset(str(tmp_path / "index"))
    assert [index.path(i) for i in range(len(index))] == [p for p, _ in files.samples]
    assert list(index.targets) == [7, -1, 3, -2] and index.classes == files.classes == ["-2", "3", "7"]
    assert _items(index) == _items(files)
    result = pack(str(listing), tmp_path / "shards", shard_size=2**20, progress=False)
    shards = build_dataset(str(tmp_path / "shards"))
    assert result["missing"] == 1 and shards[2] is None and _items(shards) == _items(files)  # missing: a bad file


def test_webdataset_reads_the_packed_shards(source, tmp_path):
    webdataset = pytest.importorskip("webdataset")
    pack(str(source), tmp_path / "shards", shard_size=3000, progress=False)
    folder = ImageFolder(source)
    urls = sorted(str(p) for p in (tmp_path / "shards").glob("shard-*.tar"))
    samples = list(webdataset.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(len(folder))]
    for sample, (path, label) in zip(samples, folder.samples):
        extension = Path(path).suffix[1:]
        assert sample[extension] == Path(path).read_bytes()
        assert (int(sample["cls"]) if "cls" in sample else -1) == label


def test_an_index_of_foreign_shards_reads_their_members(tmp_path):
    """Shards written by someone else: keys with folders, the label before or after the image, a sample without an
    image, a truncated last shard (the members before the damage are kept)."""
    rng = np.random.default_rng(1)
    images = []
    for i in range(5):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "JPEG")
        images.append(buffer.getvalue())
    (tmp_path / "shards").mkdir()

    def write(name, members):
        with tarfile.open(tmp_path / "shards" / name, "w") as tar:
            for member, data in members:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    write("part-0.tar", [("x/k0.cls", b"4"), ("x/k0.jpg", images[0]), ("x/k1.jpg", images[1]), ("x/k1.json", b"{}"),
                         ("x/k2.txt", b"caption only"), ("x/k3.JPEG", images[2]), ("x/k3.cls", b"1")])
    write("part-1.tar", [("k4.jpg", images[3]), ("k5.jpg", images[4])])
    whole = (tmp_path / "shards" / "part-1.tar").read_bytes()
    (tmp_path / "shards" / "part-1.tar").write_bytes(whole[:512 + len(images[3]) + 1100])  # into k5's header/data
    build_index(tmp_path / "shards", tmp_path / "index", workers=2, progress=False)
    dataset = IndexedDataset(tmp_path / "index")
    names = [dataset.index.name(i) for i in range(len(dataset))]
    assert names == ["x/k0.jpg", "x/k1.jpg", "x/k3.JPEG", "k4.jpg"]
    assert list(dataset.targets) == [4, -1, 1, -1] and dataset.classes == ["1", "4"]
    assert [dataset.read_bytes(i) for i in range(4)] == images[:4]


def test_a_killed_index_build_resumes_and_never_leaves_a_half_index(source, tmp_path, monkeypatch):
    output = tmp_path / "index"
    scan, calls = FolderBuilder.scan, []

    def dies_at_the_third(self, number, unit):
        calls.append(unit)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return scan(self, number, unit)

    monkeypatch.setattr(FolderBuilder, "scan", dies_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        build_index(source, output, workers=1, progress=False)
    assert not output.exists() and len(list((building_folder(output) / "parts").glob("*.npz"))) == 2
    with pytest.raises(DatasetError, match="does not exist"):
        build_dataset(str(output))
    monkeypatch.setattr(FolderBuilder, "scan", scan)
    result = build_index(source, output, workers=1, progress=False)
    assert result["resumed_units"] == 2 and not building_folder(output).exists()
    build_index(source, tmp_path / "fresh", progress=False)
    for name in ("names.bin", "name_offsets.npy", "labels.npy"):
        assert (output / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    with pytest.raises(DatasetError, match="interrupted build of another source"):
        (building_folder(tmp_path / "other") / "parts").mkdir(parents=True)
        (building_folder(tmp_path / "other") / "plan.json").write_text("{}")
        build_index(source, tmp_path / "other", progress=False)


KILL_PACK = """
import os, signal, sys
from dinoreg.data import shards
added = []
original = shards._ShardWriter.add
def add(self, *args):
    added.append(1)
    if len(added) == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args)
shards._ShardWriter.add = add
shards.pack(sys.argv[1], sys.argv[2], shard_size=3000, workers=2, progress=False)
"""


def test_a_pack_killed_with_sigkill_resumes_to_the_same_bytes(source, tmp_path):
    output = tmp_path / "shards"
    killed = subprocess.run([sys.executable, "-c", KILL_PACK, str(source), str(output), "9"], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert not output.exists()  # nothing a run would read
    work = building_folder(output)
    assert list(work.glob("*.partial")) and list(work.glob("shard-*.tar"))
    result = pack(str(source), output, shard_size=3000, progress=False)
    assert result["resumed_from"] > 0 and not work.exists()
    pack(str(source), tmp_path / "fresh", shard_size=3000, progress=False)
    written = sorted(p.name for p in output.iterdir())
    assert written == sorted(p.name for p in (tmp_path / "fresh").iterdir())
    for name in written:  # deterministic: mtime 0, ustar, the same cut into shards
        if name != INDEX_FILE:
            assert (output / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
    with pytest.raises(DatasetError, match="synthetic dataset lives in memory"):
        pack("synthetic", tmp_path / "s", shard_size=2**20, progress=False)


def test_a_damaged_shard_is_named_and_its_members_are_bad_files(source, tmp_path, capsys):
    pack(str(source), tmp_path / "shards", shard_size=3000, progress=False)
    capsys.readouterr()
    dataset = IndexedDataset(tmp_path / "shards")
    last = dataset.index.shard_files[-1]
    members = [i for i in range(len(dataset)) if dataset.index.shard_files[int(dataset.index.shards[i])] == last]
    size = (tmp_path / "shards" / last).stat().st_size
    with open(tmp_path / "shards" / last, "r+b") as file:
        file.truncate(int(dataset.index.offsets[members[-1]]) + 10)  # the last member cut short
    first = dataset.index.shard_files[0]
    with open(tmp_path / "shards" / first, "r+b") as file:  # the first member's bytes overwritten in place
        file.seek(int(dataset.index.offsets[0]))
        file.write(b"\0" * int(dataset.index.sizes[0]))
    damaged = IndexedDataset(tmp_path / "shards")
    warning = capsys.readouterr().err.strip()
    assert warning.count("\n") == 0 and last in warning and f"the index says {size}" in warning
    assert damaged[members[-1]] is None and damaged[0] is None
    assert all(damaged[i] is not None for i in range(1, len(damaged)) if i not in (members[-1], _broken(source)))
    assert damaged.bad_files.paths[:2] == [damaged.path(members[-1]), damaged.path(0)]


def test_crafted_member_locations_are_bad_files_not_crashes(source, tmp_path):
    """A shard index whose arrays point outside the shards (another shard number, a size past the end, a negative
    offset) reads nothing there: bad files, no exception and no giant read."""
    pack(str(source), tmp_path / "shards", shard_size=3000, progress=False)
    folder = tmp_path / "shards"
    shards, sizes, offsets = (np.load(folder / f"{key}.npy").copy() for key in ("shards", "sizes", "offsets"))
    shards[0], sizes[1], offsets[2] = 10_000, 2**32 - 1, -5
    for key, value in (("shards", shards), ("sizes", sizes), ("offsets", offsets)):
        np.save(folder / f"{key}.npy", value)
    dataset = IndexedDataset(folder)
    assert [dataset[i] for i in range(3)] == [None, None, None] and dataset[3] is not None
    assert dataset.bad_files.count == 3 and "<shard 10000>" in dataset.bad_files.paths[0]


def test_a_listed_path_that_is_no_regular_file_is_not_read(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("/dev/zero\n")
    assert FileList(listing).read_bytes(0) is None  # /dev/zero would never end


@pytest.mark.parametrize("damage, says", [
    (lambda f: (f / INDEX_FILE).write_text("{not json"), "cannot read dinoreg-index.json"),
    (lambda f: (f / INDEX_FILE).write_text(json.dumps({"format": "dinoreg-index", "version": 9})), "version 9"),
    (lambda f: np.save(f / "labels.npy", np.zeros(3, np.int64)), r"labels.npy holds int64\[3\]"),
    (lambda f: np.save(f / "labels.npy", np.array([object()]), allow_pickle=True), "cannot read labels.npy"),
    (lambda f: (f / "name_offsets.npy").unlink(), "cannot read name_offsets.npy"),
])
def test_a_damaged_or_crafted_index_is_refused_in_one_line(source, tmp_path, damage, says):
    build_index(source, tmp_path / "index", progress=False)
    damage(tmp_path / "index")
    with pytest.raises(DatasetError, match=says) as error:
        DatasetIndex(tmp_path / "index")
    assert "\n" not in str(error.value) and "dinoreg data index" in str(error.value)


def _private_kib() -> int:
    """The pages this process wrote and holds alone (a forked worker's copies of its parent's pages). The index's
    pages it reads are the page cache's (file-backed, clean): every process mapping the file shares them."""
    rollup = Path("/proc/self/smaps_rollup").read_text().splitlines()
    return sum(int(line.split()[1]) for line in rollup if line.startswith("Private_Dirty"))


def _worker_growth(dataset) -> int:
    """A forked child (a DataLoader worker is one) touches every entry's path and label, then reports how many KiB
    of its parent's pages it copied. A bare fork writing to a pipe and leaving with ``os._exit``: no thread is
    started in the child, so nothing can wait on a lock another thread of the parent held at the fork."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            before = _private_kib()
            total = sum(len(dataset.path(i)) + dataset.label(i) for i in range(len(dataset)))
            os.write(write, f"{_private_kib() - before} {total}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as reply:
        growth = int(reply.read().split()[0])
    os.waitpid(pid, 0)
    return growth


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux's /proc/self/smaps_rollup")
def test_a_workers_memory_does_not_grow_with_the_entries_it_touches(tmp_path):
    """200,000 entries: a forked worker touching every entry of a FileList copies the pages of its Python objects
    (tens of MiB: the copy-on-access growth); through the index it writes no page of it (loose bound: 4 MiB, for
    the loop's own objects)."""
    lines = "".join(f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG\t{i % 1000}\n" for i in range(200_000))
    (tmp_path / "list.txt").write_text(lines)
    build_index(tmp_path / "list.txt", tmp_path / "index", workers=2, progress=False)
    indexed = IndexedDataset(tmp_path / "index")
    assert _worker_growth(indexed) < 4 * 1024
    listed = FileList(tmp_path / "list.txt")
    assert _worker_growth(listed) > 8 * 1024  # the failure this guards against, measured the same way
