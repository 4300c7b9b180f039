"""Resumable rank-sharded sampling, per-sample multi-crop, collate, and the DataLoaders.

The data order is one infinite *global stream* of positions p = 0, 1, 2, ...; position p shows
``perm_e[p % n]`` where ``e = p // n`` is the epoch and ``perm_e`` a permutation seeded by (seed, e): drawn
whole by ``torch.randperm`` (``order="randperm"``, the default) or computed per position by a seeded bijection
(``order="bijection"``, constant memory; another order).
Global batch k is positions ``[k * W * B, (k + 1) * W * B)`` spread over W ranks (rank r takes every
W-th position from r), and the crops of a sample are seeded by (seed, position). Hence:

- a run resumed at iteration i passes ``start = i * global_batch_size`` and continues exactly where the
  stream stopped, with the same images *and the same crops*, whatever the number of workers;
- a run resumed with a different world size (but the same global batch size) sees exactly the same
  global batches; with a different global batch it still continues the stream at ``start``.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler

from dinoreg.data.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropGeometric, pil_to_uint8_tensor
from dinoreg.data.batch import TrainingBatch, UnfilledBatch


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (SeedSequence hashing: nearby inputs give unrelated seeds)."""
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


SAMPLER_ORDERS = ("randperm", "bijection")  # train.sampler_order: how an epoch's permutation is drawn

_FEISTEL_ROUNDS = 6
SAMPLER_BLOCK = 4096  # positions a rank's sampler draws at once (one epoch at most)


def _hash64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic): a bijection whose every output bit depends
    on every input bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    """A seeded pseudo-random permutation of ``range(n)`` evaluated per position, in O(1) memory.

    A balanced Feistel network of :data:`_FEISTEL_ROUNDS` rounds over ``[0, 2**k)`` (``k`` even, the smallest
    with ``2**k >= n``: at most ``4 n``; round function :func:`_hash64` of the right half plus the round key,
    keys from ``_mix(seed, epoch, round)``) is a bijection of that range; cycle-walking (re-encrypting a value until
    it falls below ``n``) restricts it to one of ``range(n)``. ``perm[offsets]`` costs about
    ``2**k / n`` (at most 4) network evaluations per offset on average, vectorised in numpy.
    """

    def __init__(self, n: int, seed: int, epoch: int):
        if n <= 0:
            raise ValueError(f"n must be > 0, got {n}")
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        self.half_bits = (bits + 1) // 2  # 2 * half_bits >= bits: the domain [0, 4**half_bits) holds range(n)
        self.keys = [np.uint64(_mix(seed, epoch, r)) for r in range(_FEISTEL_ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        shift, mask = np.uint64(self.half_bits), np.uint64((1 << self.half_bits) - 1)
        left, right = x >> shift, x & mask
        for key in self.keys:
            left, right = right, left ^ (_hash64(right + key) & mask)
        return (left << shift) | right

    def __getitem__(self, offsets) -> np.ndarray:
        """``perm[offsets]`` (int64, of the shape of ``offsets``) for an offset or an array of them in ``[0, n)``."""
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.size and (offsets.min() < 0 or offsets.max() >= self.n):
            raise IndexError(f"offsets must lie in [0, {self.n})")
        shape = offsets.shape
        out = self._encrypt(offsets.reshape(-1).astype(np.uint64))  # arrays: numpy scalars would warn on overflow
        todo = np.flatnonzero(out >= self.n)
        while todo.size:  # cycle-walking: ends, as the walk from an x < n comes back below n on x's cycle
            walked = self._encrypt(out[todo])
            out[todo] = walked
            todo = todo[walked >= self.n]
        return out.astype(np.int64).reshape(shape)


class InfiniteShardedSampler(Sampler):
    """Yields ``(index, position)`` forever: rank r gets global positions ``start + r + k * world_size``.

    ``start`` is a *global* position (iteration * global batch size), not a per-rank count, so resuming
    with another world size continues the same stream (see the module docstring). ``order`` draws each epoch's
    permutation: ``"randperm"`` (``torch.randperm`` seeded by ``_mix(seed, epoch)``: an int64 array of the
    dataset's length per rank, 8 bytes per image) or ``"bijection"`` (:class:`FeistelPermutation`: constant memory,
    computed a block of positions at a time); they give different orders.
    """

    def __init__(self, dataset_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, start: int = 0, order: str = "randperm"):
        if dataset_size <= 0:
            raise ValueError(f"dataset_size must be > 0, got {dataset_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if order not in SAMPLER_ORDERS:
            raise ValueError(f"order must be one of {', '.join(SAMPLER_ORDERS)}, got {order!r}")
        self.dataset_size = int(dataset_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = shuffle
        self.start = int(start)
        self.order = order

    def permutation(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s whole permutation (position ``epoch * n + i`` shows its item ``i``)."""
        if not self.shuffle:
            return torch.arange(self.dataset_size)
        if self.order == "bijection":  # the whole of it, as randperm's: for a look, not for the iterator
            whole = np.arange(self.dataset_size)
            return torch.from_numpy(FeistelPermutation(self.dataset_size, self.seed, epoch)[whole])
        generator = torch.Generator().manual_seed(_mix(self.seed, epoch))
        return torch.randperm(self.dataset_size, generator=generator)

    def _epoch_order(self, epoch: int) -> Callable[[np.ndarray], np.ndarray]:
        """``offsets -> indices`` in epoch ``epoch``; only ``randperm`` holds the whole permutation."""
        if not self.shuffle:
            return lambda offsets: offsets
        if self.order == "bijection":
            return FeistelPermutation(self.dataset_size, self.seed, epoch).__getitem__
        perm = self.permutation(epoch).numpy()  # int64 array: 8 bytes per image, not a list of ints
        return lambda offsets: perm[offsets]

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        n, step = self.dataset_size, self.world_size
        position = self.start + self.rank
        epoch, order = -1, None
        while True:
            if position // n != epoch:
                epoch = position // n
                order = self._epoch_order(epoch)
            offset = position - epoch * n
            count = min(SAMPLER_BLOCK, (n - offset + step - 1) // step)  # this rank's positions left in the epoch
            indices = order(offset + step * np.arange(count, dtype=np.int64))
            for index in indices.tolist():
                yield index, position
                position += step


class BadSample(NamedTuple):
    """What a dataset item becomes when its file cannot be decoded; the collate drops it."""

    path: Optional[str]
    index: int
    position: int


def base_get(dataset, index: int, draft_size: Optional[int]):
    """``dataset.get(index, draft_size)`` when the dataset supports reduced-size decoding, else ``dataset[index]``."""
    get = getattr(dataset, "get", None)
    return get(index, draft_size) if get is not None else dataset[index]


class MultiCropDataset:
    """Wraps a dataset of ``(PIL image, label)`` (or None for a bad file) with the geometric multi-crop.

    ``dataset[(index, position)]`` -> ``dict(global_crops, local_crops, label, index, position)``, or a
    :class:`BadSample` (its path when the base dataset knows it). Crops are seeded by (seed, position),
    so they do not depend on the worker that made them or on how many workers there are.
    """

    def __init__(self, base_dataset, geometric: MultiCropGeometric, seed: int):
        self.base_dataset = base_dataset
        self.geometric = geometric
        self.seed = int(seed)
        self.draft_size = geometric.min_source_side

    def __len__(self) -> int:
        return len(self.base_dataset)

    def __getitem__(self, key: Tuple[int, int]):
        index, position = int(key[0]), int(key[1])
        item = base_get(self.base_dataset, index, self.draft_size)
        if item is None:
            path = getattr(self.base_dataset, "path", None)
            return BadSample(path(index) if callable(path) else None, index, position)
        image, label = item
        # A string seed is hashed with SHA-512 by random.Random: stable across processes and Python runs.
        rng = random.Random(f"dinoreg-crops:{self.seed}:{position}")
        crops = self.geometric(image, rng)
        return {**crops, "label": int(label), "index": index, "position": position}


def _is_bad(sample) -> bool:
    return sample is None or isinstance(sample, BadSample)


def collate_multicrop(samples: List[Any], mask_fn: Optional[Callable[..., Dict[str, Any]]] = None
                      ) -> TrainingBatch | UnfilledBatch:
    """Stack multi-crop samples in DINOv2's order (:class:`~dinoreg.data.batch.TrainingBatch`: view 1 of all
    samples, then view 2; local crop 1 of all samples, then crop 2, ...); drop bad ones and report their paths.
    When every sample is bad: an :class:`~dinoreg.data.batch.UnfilledBatch`, which the caller skips.
    ``mask_fn(n_images=V*B, seed_position=positions[0])``, when given, draws the iBOT masks of the global crops.
    """
    good = [s for s in samples if not _is_bad(s)]
    bad_files = [s.path if isinstance(s, BadSample) else None for s in samples if _is_bad(s)]
    if not good:
        return UnfilledBatch(bad_files=bad_files)
    n_global, n_local = len(good[0]["global_crops"]), len(good[0]["local_crops"])
    global_crops = torch.stack([s["global_crops"][v] for v in range(n_global) for s in good])
    gram_crops = None
    if "gram_crops" in good[0]:  # a Gram teacher's own crops, in the global crops' order
        gram_crops = torch.stack([s["gram_crops"][v] for v in range(n_global) for s in good])
    if n_local:
        local_crops = torch.stack([s["local_crops"][c] for c in range(n_local) for s in good])
    else:
        local_crops = global_crops.new_zeros((0,) + tuple(global_crops.shape[1:]))
    batch = TrainingBatch(
        global_crops=global_crops, local_crops=local_crops, n_global_crops=n_global, n_local_crops=n_local,
        gram_crops=gram_crops, labels=torch.tensor([s["label"] for s in good], dtype=torch.long),
        indices=torch.tensor([s["index"] for s in good], dtype=torch.long),
        positions=torch.tensor([s["position"] for s in good], dtype=torch.long), bad_files=bad_files)
    if mask_fn is not None:
        batch = batch.with_masks(mask_fn(n_images=n_global * len(good), seed_position=int(batch.positions[0])))
    return batch


# Signals a job sends to every process it runs (SLURM signals every process of a step, loader workers included) and
# that are meant for the main process: it saves, then exits 75 (see dinoreg.train.signals). A worker inherits the
# main process's Python handlers when it forks (submitit's requeue handler for SIGUSR2: each worker would requeue
# the job itself, then die), so it ignores them; the main process shuts its workers down when it exits.
WORKER_IGNORED_SIGNALS = (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def ignore_job_signals(worker_id: int = 0) -> None:
    """In a DataLoader worker: ignore the job's signals, which only the main process acts on.

    SIGINT, SIGUSR1 and SIGUSR2 are ignored. SIGTERM from anyone but the main process (SLURM's cancel, requeue or
    time limit, a ``kill`` of the process group) is ignored too, so that the main process can still save on it
    instead of dying on a dead worker; SIGTERM from the main process itself (how torch and multiprocessing stop a
    worker that did not exit by itself) still ends the worker at once with status 0, as torch's own handler does.
    A SIGKILL (SLURM's, after its kill grace) still ends everything."""
    for number in WORKER_IGNORED_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    # Blocked here (and so in every thread the worker starts later), SIGTERM waits for the thread below, which
    # reads who sent it: a handler cannot.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), daemon=True,
                     name="dinoreg-worker-sigterm").start()


def _exit_on_sigterm_from(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    os._exit(0)  # what torch's worker handler does on its parent's SIGTERM


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in a DataLoader worker from torch's per-worker seed (crops do not depend on it), and
    leave the job's signals to the main process (:func:`ignore_job_signals`)."""
    ignore_job_signals(worker_id)
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def build_loader(dataset, *, batch_size: int, num_workers: int, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0, collate_fn: Optional[Callable] = collate_multicrop, pin_memory: bool = False,
                 shuffle: bool = True, order: str = "randperm") -> DataLoader:
    """An endless DataLoader of per-rank batches of ``batch_size`` over :class:`InfiniteShardedSampler`.

    ``dataset`` is indexed by ``(index, position)`` (a :class:`MultiCropDataset`). ``start`` is the global
    position to resume from: ``iteration * batch_size * world_size``. Iterate it once (``iter(loader)``) and
    call ``next`` forever; there are no epochs and no last batch. ``order``: the sampler's per-epoch permutation
    (``"randperm"`` or ``"bijection"``, see :class:`InfiniteShardedSampler`).
    """
    sampler = InfiniteShardedSampler(len(dataset), seed=seed, rank=rank, world_size=world_size,
                                     shuffle=shuffle, start=start, order=order)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn if collate_fn is not None else collate_multicrop,
        pin_memory=pin_memory,
        drop_last=False,
        persistent_workers=num_workers > 0,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(_mix(seed, rank)),
    )


class EvalTransform:
    """Bicubic resize of the shorter side to ``resize_size``, then a central ``image_size`` crop -> uint8 [3, S, S],
    pixel for pixel what the official evaluation's torchvision ``Resize(resize_size)`` + ``CenterCrop(image_size)``
    give (and timm's transform; Hugging Face's processor too where the margin is even, as for every patch-14 size)."""

    def __init__(self, image_size: int, resize_size: Optional[int] = None):
        self.image_size = int(image_size)
        self.resize_size = int(resize_size if resize_size is not None else round(image_size * 256 / 224))
        if self.resize_size < self.image_size:
            raise ValueError(f"resize_size {self.resize_size} < image_size {self.image_size}")

    def geometry(self, w: int, h: int) -> Tuple[Tuple[int, int], Tuple[int, int, int, int]]:
        """``((resized w, h), crop box)`` for a ``w`` x ``h`` image."""
        # torchvision's Resize(int), which the official evaluation uses (and HF's and timm's processors):
        # the shorter side to resize_size, the longer one scaled and truncated
        short, long = min(w, h), max(w, h)
        scaled = int(self.resize_size * long / short)
        new_w, new_h = (self.resize_size, scaled) if w <= h else (scaled, self.resize_size)
        # torchvision's CenterCrop: offsets rounded half to even (an odd margin of 7 px starts the crop at 4)
        left, top = int(round((new_w - self.image_size) / 2.0)), int(round((new_h - self.image_size) / 2.0))
        return (new_w, new_h), (left, top, left + self.image_size, top + self.image_size)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        size, box = self.geometry(*image.size)
        return pil_to_uint8_tensor(image.convert("RGB").resize(size, Image.BICUBIC).crop(box))


class _EvalDataset:
    def __init__(self, base_dataset, transform: EvalTransform):
        self.base_dataset, self.transform = base_dataset, transform

    def __len__(self) -> int:
        return len(self.base_dataset)

    def __getitem__(self, index: int):
        item = base_get(self.base_dataset, index, self.transform.resize_size)
        if item is None:
            return None
        image, label = item
        return self.transform(image), int(label)


def _collate_eval(samples) -> Tuple[torch.Tensor, torch.Tensor]:
    good = [s for s in samples if s is not None]  # bad files are dropped (and counted by the dataset)
    if not good:
        return torch.zeros((0, 3, 1, 1)), torch.zeros((0,), dtype=torch.long)
    return normalise_uint8(torch.stack([s[0] for s in good])), torch.tensor([s[1] for s in good], dtype=torch.long)


def normalise_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float, ImageNet-normalised (the evaluations' input)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float().div_(255.0) - mean) / std


def build_eval_loader(dataset, *, image_size: int, batch_size: int, num_workers: int,
                      resize_size: Optional[int] = None) -> DataLoader:
    """A finite, ordered loader for kNN / linear evaluation: ``(images float [B, 3, S, S] normalised, labels [B])``.

    Images are resized (bicubic, shorter side to ``resize_size``, default ``image_size * 256 / 224`` as
    DINOv2's evaluation) and centre-cropped to ``image_size``; pass ``resize_size=image_size`` to keep the
    whole (square) image. Undecodable files are dropped from their batch. Iterating it leaves torch's
    global RNG untouched (its own generator seeds the workers), so evaluating mid-run changes nothing in
    the training that follows, and a resumed run matches an uninterrupted one.
    """
    return DataLoader(
        _EvalDataset(dataset, EvalTransform(image_size, resize_size)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate_eval,
        drop_last=False,
        worker_init_fn=ignore_job_signals,
        generator=torch.Generator().manual_seed(0),
    )
