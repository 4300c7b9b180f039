import itertools
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from dinoreg.data.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropGeometric
from dinoreg.data.batch import TrainingBatch, UnfilledBatch
from dinoreg.data.datasets import ImageFolder
from dinoreg.data.loader import (
    BadSample,
    InfiniteShardedSampler,
    MultiCropDataset,
    build_eval_loader,
    build_loader,
    collate_multicrop,
)
from dinoreg.data.synthetic import SyntheticShapes


def _take(iterable, n):
    return list(itertools.islice(iter(iterable), n))


# ---------------------------------------------------------------- sampler


def test_each_epoch_is_a_permutation_and_epochs_differ():
    n = 17
    stream = _take(InfiniteShardedSampler(n, seed=0), 3 * n)
    assert [p for _, p in stream] == list(range(3 * n))
    epochs = [[i for i, _ in stream[e * n:(e + 1) * n]] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] != list(range(n))  # shuffled
    other_seed = [i for i, _ in _take(InfiniteShardedSampler(n, seed=1), n)]
    assert other_seed != epochs[0]
    assert [i for i, _ in _take(InfiniteShardedSampler(n, seed=0, shuffle=False), n + 2)] == list(range(n)) + [0, 1]


def test_ranks_partition_the_stream():
    n, world, per_rank = 10, 3, 20
    single = _take(InfiniteShardedSampler(n, seed=4), world * per_rank)
    shards = [_take(InfiniteShardedSampler(n, seed=4, rank=r, world_size=world), per_rank) for r in range(world)]
    union = sorted(itertools.chain(*shards), key=lambda item: item[1])
    assert union == single  # disjoint, and together exactly the single-process stream
    for r, shard in enumerate(shards):
        assert [p for _, p in shard] == list(range(r, world * per_rank, world))


def test_restart_at_start_continues_identically():
    full = _take(InfiniteShardedSampler(13, seed=2), 100)
    assert _take(InfiniteShardedSampler(13, seed=2, start=37), 63) == full[37:]


def test_resume_from_world_size_2_to_1_continues_the_global_stream():
    n, batch_per_rank, iterations = 11, 3, 5
    reference = _take(InfiniteShardedSampler(n, seed=9), 2 * batch_per_rank * (iterations + 4))
    # two ranks run `iterations` steps of batch_per_rank each ...
    ranks = [iter(InfiniteShardedSampler(n, seed=9, rank=r, world_size=2)) for r in range(2)]
    consumed = []
    for _ in range(iterations):
        global_batch = [item for it in ranks for item in _take(it, batch_per_rank)]
        assert sorted(p for _, p in global_batch) == list(range(len(consumed), len(consumed) + 2 * batch_per_rank))
        consumed += global_batch
    # ... then one process resumes at start = iteration * global batch
    start = iterations * 2 * batch_per_rank
    resumed = _take(InfiniteShardedSampler(n, seed=9, start=start), 4 * 2 * batch_per_rank)
    assert sorted(consumed, key=lambda item: item[1]) + resumed == reference


def test_sampler_argument_checks():
    with pytest.raises(ValueError):
        InfiniteShardedSampler(0, seed=0)
    with pytest.raises(ValueError):
        InfiniteShardedSampler(5, seed=0, rank=2, world_size=2)


# ---------------------------------------------------------------- collate


def _fake_sample(sample_id: int, n_local: int = 3):
    crop = lambda value, size: torch.full((3, size, size), value, dtype=torch.uint8)  # noqa: E731
    return {
        "global_crops": [crop(10 * sample_id + v, 4) for v in range(2)],
        "local_crops": [crop(10 * sample_id + 5 + c, 2) for c in range(n_local)],
        "label": sample_id % 2,
        "index": 100 + sample_id,
        "position": 1000 + sample_id,
    }


def test_collate_ordering_and_bad_samples():
    samples = [_fake_sample(1), None, _fake_sample(2), BadSample("/data/broken.jpg", 7, 1003), _fake_sample(3)]
    calls = []

    def mask_fn(*, n_images, seed_position):
        calls.append((n_images, seed_position))
        return {"masks": torch.zeros(n_images, 4, dtype=torch.bool), "mask_indices": torch.zeros(0, dtype=torch.long),
                "masks_weight": torch.zeros(0), "n_masked_patches": torch.zeros(1, dtype=torch.long)}

    batch = collate_multicrop(samples, mask_fn=mask_fn)
    assert batch.batch_size == 3
    assert batch.bad_files == [None, "/data/broken.jpg"]
    g, l = batch.global_crops, batch.local_crops
    assert g.shape == (6, 3, 4, 4) and g.dtype == torch.uint8 and l.shape == (9, 3, 2, 2)
    # [view 0 of samples 1, 2, 3, view 1 of samples 1, 2, 3]: .chunk(2) gives the views
    assert g[:, 0, 0, 0].tolist() == [10, 20, 30, 11, 21, 31]
    assert [v[:, 0, 0, 0].tolist() for v in g.chunk(2)] == [[10, 20, 30], [11, 21, 31]]
    assert l[:, 0, 0, 0].tolist() == [15, 25, 35, 16, 26, 36, 17, 27, 37]
    assert batch.labels.tolist() == [1, 0, 1]
    assert batch.indices.tolist() == [101, 102, 103]
    assert batch.positions.tolist() == [1001, 1002, 1003]
    assert (batch.n_global_crops, batch.n_local_crops) == (2, 3)
    assert calls == [(6, 1001)] and batch.masks.shape == (6, 4)


def test_collate_without_locals_and_all_bad():
    batch = collate_multicrop([_fake_sample(1, n_local=0), _fake_sample(2, n_local=0)])
    assert batch.local_crops.shape == (0, 3, 4, 4) and batch.n_local_crops == 0
    empty = collate_multicrop([None, BadSample("x.jpg", 0, 0)], mask_fn=lambda **_: pytest.fail("called"))
    assert empty == UnfilledBatch(bad_files=[None, "x.jpg"]) and empty.batch_size == 0


# ---------------------------------------------------------------- datasets and loaders


def _multicrop(size: int = 40, seed: int = 0) -> MultiCropDataset:
    return MultiCropDataset(SyntheticShapes(size=size, image_size=32), MultiCropGeometric(16, 8, 2), seed=seed)


def test_multicrop_dataset_is_a_function_of_position():
    dataset = _multicrop()
    a, b, c = dataset[(3, 50)], dataset[(3, 50)], dataset[(3, 51)]
    assert (a["index"], a["position"], a["label"]) == (3, 50, 3)
    for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"], strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a["global_crops"][0], c["global_crops"][0])  # same image, new position: new crops
    assert dataset.draft_size == MultiCropGeometric(16, 8, 2).min_source_side


def _first_batches(num_workers: int, n: int = 3, start: int = 0, **kwargs):
    loader = build_loader(_multicrop(), batch_size=4, num_workers=num_workers, seed=5, start=start, **kwargs)
    iterator = iter(loader)
    batches = [next(iterator) for _ in range(n)]
    del iterator
    return batches


def _assert_same_batches(xs, ys):
    for x, y in zip(xs, ys, strict=True):
        for key in ("global_crops", "local_crops", "labels", "indices", "positions"):
            assert torch.equal(getattr(x, key), getattr(y, key)), key


def test_loader_is_independent_of_worker_count_and_resumes_exactly():
    reference = _first_batches(num_workers=0, n=4)
    assert reference[0].global_crops.shape == (8, 3, 16, 16)
    assert reference[0].local_crops.shape == (8, 3, 8, 8)
    assert [b.positions.tolist() for b in reference[:2]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    _assert_same_batches(_first_batches(num_workers=2, n=4), reference)
    _assert_same_batches(_first_batches(num_workers=0, n=2, start=8), reference[2:])
    # two ranks of batch 2 make the same global batches as one rank of batch 4
    shards = [iter(build_loader(_multicrop(), batch_size=2, num_workers=0, seed=5, rank=r, world_size=2))
              for r in range(2)]
    for step in range(2):
        halves = [next(shard) for shard in shards]
        positions = torch.cat([h.positions for h in halves])
        order = positions.argsort()
        assert positions[order].tolist() == reference[step].positions.tolist()
        views = [torch.cat([h.global_crops.chunk(2)[v] for h in halves])[order] for v in range(2)]
        assert torch.equal(torch.cat(views), reference[step].global_crops)


def test_loader_runs_forever():
    loader = build_loader(_multicrop(size=5), batch_size=4, num_workers=0, seed=0)
    batches = _take(loader, 6)  # 24 samples from 5 images: no StopIteration
    assert [b.positions[0].item() for b in batches] == [0, 4, 8, 12, 16, 20]
    assert sorted(torch.cat([b.indices for b in batches])[:5].tolist()) == list(range(5))


def test_eval_loader(tmp_path):
    dataset = SyntheticShapes("val", size=10, image_size=32)
    loader = build_eval_loader(dataset, image_size=28, batch_size=4, num_workers=0)
    batches = list(loader)
    assert [images.shape[0] for images, _ in batches] == [4, 4, 2]
    images, labels = batches[0]
    assert images.shape == (4, 3, 28, 28) and images.dtype == torch.float32
    assert torch.cat([labels for _, labels in batches]).tolist() == dataset.targets
    # resize 32 -> 32 (28 * 256 / 224) and centre crop 28: pixel (0, 0) is source pixel (2, 2)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    source = torch.tensor(list(dataset[0][0].getpixel((2, 2)))) / 255
    torch.testing.assert_close(images[0, :, 0, 0], (source - mean) / std)
    again = next(iter(build_eval_loader(dataset, image_size=28, batch_size=4, num_workers=0)))[0]
    assert torch.equal(again, images)

    # a bad file is dropped from its batch, the others keep their labels
    for name, label_dir in (("a.png", "cat"), ("b.png", "cat"), ("c.jpg", "dog")):
        (tmp_path / label_dir).mkdir(exist_ok=True)
        Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / label_dir / name)
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    images, labels = next(iter(build_eval_loader(ImageFolder(tmp_path), image_size=16, batch_size=8, num_workers=0)))
    assert images.shape == (3, 3, 16, 16) and labels.tolist() == [0, 0, 1]


# ---------------------------------------------------------------- signals in the workers


class _WorkerPids:
    """Each item is the pid of the worker that made it."""

    def __len__(self):
        return 1000

    def __getitem__(self, key):
        return os.getpid()


def _process_state(pid):
    """'Z' (exited, not reaped yet), 'gone', or the running process's state letter."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_loader_workers_leave_the_job_signals_to_the_main_process(tmp_path):
    """SLURM signals every process of a job step. A worker forked while the main process held a handler (submitit's
    requeue handler for SIGUSR2, the save-on-signal watcher) ran it too: each worker requeued the job and died, and
    SLURM's SIGTERM killed the workers under a main process that was saving. Now the workers ignore SIGINT, SIGUSR1,
    SIGUSR2 and a SIGTERM from anyone but their parent, and keep serving batches; their parent's SIGTERM (how torch
    stops a stuck worker) still ends them at once with status 0."""
    marker = tmp_path / "handler-ran"
    job_signals = (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)

    def inherited(number, frame):  # what a worker must never run
        with open(marker, "a") as file:
            file.write(f"{os.getpid()} {signal.Signals(number).name}\n")

    previous = {number: signal.signal(number, inherited) for number in job_signals}
    try:
        batches = iter(build_loader(_WorkerPids(), batch_size=2, num_workers=2, seed=0, collate_fn=list))
        workers = {pid for _ in range(4) for pid in next(batches)}
        assert len(workers) == 2 and os.getpid() not in workers
        for pid in workers:
            for number in job_signals:  # sent by `kill`, not by the parent: as SLURM's slurmstepd does
                subprocess.run(["kill", f"-{signal.Signals(number).name[3:]}", str(pid)], check=True, timeout=30)
        time.sleep(1.0)
        assert {pid for _ in range(4) for pid in next(batches)} == workers  # alive, and still serving batches
        assert not marker.exists(), marker.read_text()
        assert all(_process_state(pid) not in ("Z", "gone") for pid in workers)
        stopped = workers.pop()
        os.kill(stopped, signal.SIGTERM)  # from the parent
        deadline = time.monotonic() + 10
        while _process_state(stopped) not in ("Z", "gone") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _process_state(stopped) in ("Z", "gone")
        assert _process_state(workers.pop()) not in ("Z", "gone")
        del batches
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    assert not marker.exists()


class _SignalDispositions:
    """Labels each image 1 when the process that loads it ignores SIGINT, SIGUSR1 and SIGUSR2, else 0."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        ignored = all(signal.getsignal(n) == signal.SIG_IGN for n in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2))
        return Image.new("RGB", (8, 8)), int(ignored)


def test_evaluation_loader_workers_ignore_the_job_signals_too():
    """kNN evaluation runs inside training, where a signal can come at any time: its workers leave it to the main
    process as the training loader's do (and the main process keeps its own handlers)."""
    before = signal.getsignal(signal.SIGINT)  # Python's, or SIG_IGN when the suite was started in the background
    _, labels = next(iter(build_eval_loader(_SignalDispositions(), image_size=8, batch_size=4, num_workers=1)))
    assert labels.tolist() == [1, 1, 1, 1]
    assert signal.getsignal(signal.SIGINT) is before


def test_the_batch_is_typed_and_moves_as_one():
    """A collated batch is a TrainingBatch: its views and counts come from it, every tensor moves with .to(), and
    the augmentation's changes make a new batch."""
    masks = {"masks": torch.ones(6, 4, dtype=torch.bool), "mask_indices": torch.arange(24),
             "masks_weight": torch.full((24,), 0.25), "n_masked_patches": torch.tensor([24]), "upperbound": 24}
    batch = collate_multicrop([_fake_sample(1), _fake_sample(2), _fake_sample(3)], mask_fn=lambda **_: masks)
    assert isinstance(batch, TrainingBatch) and batch.batch_size == 3 and len(batch.views()) == 2
    assert [view[:, 0, 0, 0].tolist() for view in batch.views()] == [[10, 20, 30], [11, 21, 31]]
    moved = batch.to("meta")
    tensors = [name for name in ("global_crops", "local_crops", "masks", "mask_indices", "masks_weight",
                                 "n_masked_patches", "labels", "indices", "positions")]
    assert all(getattr(moved, name).is_meta for name in tensors) and moved.gram_crops is None
    assert moved.bad_files == batch.bad_files and not batch.global_crops.is_meta  # a copy: the original stays
    brighter = batch.replace(global_crops=batch.global_crops + 1)
    assert torch.equal(brighter.global_crops, batch.global_crops + 1) and brighter.masks is batch.masks
