"""``dinoreg bench data``: what the training data pipeline costs a worker core per image, and how long a training step
waits for it.

Three measurements on a recipe's multi-crop and a dataset (anything :func:`~dinoreg.data.build_dataset` accepts):

- **per-core cost** (:func:`per_image_costs`): in this process, on one core (``torch.set_num_threads(1)``), the time
  per image of each part a loader worker runs, timed separately over ``images`` images after a warm-up: the decode
  (the dataset's ``get`` with the draft size :class:`~dinoreg.data.MultiCropDataset` asks for), the geometric crops
  (:class:`~dinoreg.data.MultiCropGeometric`, seeded as the loader seeds them), the collate
  (:func:`~dinoreg.data.collate_multicrop` with the iBOT masks drawn in it, as :mod:`dinoreg.train.build` makes it);
  and, as extra information, the photometric distortions (:class:`~dinoreg.data.Photometric`), which training runs
  on the device, timed on this CPU;
- **data wait** (:func:`data_wait_share`): the real training loader (:func:`dinoreg.train.build.training_batches`,
  with ``workers`` workers) consumed at the pace of a training step (sleeping ``step_seconds`` after each batch, as a
  main process that waits for its GPU); the time spent in ``next()`` as a share of the total;
- **index bytes per image**: the dataset's ``index_bytes_per_image`` where it has an index.

``compare_official`` runs the official DINOv2 pipeline (``launch/bench_official_augment.py``) on the same files in
another Python (one where torchvision imports) and reports its cost per image beside ours.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import PIL
import torch

from dinoreg.config import load_config
from dinoreg.data import build_dataset, collate_multicrop
from dinoreg.data.loader import base_get
from dinoreg.distributed import DistributedEnvironment
from dinoreg.errors import InputError
from dinoreg.train.build import BatchMasks, build_photometric, multicrop_geometric, training_batches
from dinoreg.train.features import build_features

OFFICIAL_SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "bench_official_augment.py"
PHOTOMETRIC_IMAGES = 128  # images whose photometric distortions are timed on the CPU (extra information)


class DataBenchError(InputError, ValueError):
    """A bad input of ``dinoreg bench data`` (a dataset without files for the official leg, a missing checkout)."""


def per_image_costs(cfg: Any, dataset: Any, *, images: int, warmup: int) -> dict[str, Any]:
    """Seconds per image of decode, geometric crops and collate (with masks), one core, over ``images`` images
    (cycling through the dataset) after ``warmup`` untimed ones; and the photometric distortions on the CPU over
    up to :data:`PHOTOMETRIC_IMAGES` of them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.device("meta"):  # the features' crop sizes only: no model drawn
            features = build_features(cfg)
        geometric = multicrop_geometric(cfg, features)
        draft_size = geometric.min_source_side
        masks = BatchMasks(cfg)
        photometric = build_photometric(cfg, torch.device("cpu"))
        batch_size = cfg.train.batch_size_per_gpu
        seed = cfg.train.seed
        totals = {"decode": 0.0, "crops": 0.0, "collate": 0.0, "photometric": 0.0}
        timed = photometric_images = bad = pixels = 0
        pending: list[dict[str, Any]] = []
        def collate(pending: list[dict[str, Any]]) -> None:
            nonlocal photometric_images
            start = time.perf_counter()
            batch = collate_multicrop(pending, mask_fn=masks)
            collated = time.perf_counter()
            counted = sum(sample["position"] >= warmup for sample in pending)
            totals["collate"] += (collated - start) * counted / len(pending)
            if counted and photometric_images < PHOTOMETRIC_IMAGES:
                with torch.no_grad():
                    start = time.perf_counter()
                    photometric(batch.global_crops, batch.local_crops, n_global_views=batch.n_global_crops)
                    totals["photometric"] += time.perf_counter() - start
                photometric_images += len(pending)

        for position in range(warmup + images):
            index = position % len(dataset)
            start = time.perf_counter()
            item = base_get(dataset, index, draft_size)
            decoded = time.perf_counter()
            if item is None:
                bad += 1
                continue
            image, label = item
            # the loader's seeding (MultiCropDataset): by the stream position
            crops = geometric(image, random.Random(f"dinoreg-crops:{seed}:{position}"))
            cropped = time.perf_counter()
            if position >= warmup:
                totals["decode"] += decoded - start
                totals["crops"] += cropped - decoded
                pixels += image.width * image.height
                timed += 1
            pending.append({**crops, "label": int(label), "index": index, "position": position})
            if len(pending) == batch_size:
                collate(pending)
                pending = []
        if pending:
            collate(pending)
    finally:
        torch.set_num_threads(threads)
    if timed == 0:
        raise DataBenchError(f"no image of the dataset could be decoded ({bad} bad files in {warmup + images} "
                             "tries); check train.dataset_path or --data")
    per_image = {key: totals[key] / timed for key in ("decode", "crops", "collate")}
    total = sum(per_image.values())
    return {
        "draft_size": draft_size,
        "images_timed": timed,
        "bad_files": bad,
        "decoded_pixels_mean": pixels / timed,
        "decode_s_per_image": per_image["decode"],
        "crops_s_per_image": per_image["crops"],
        "collate_s_per_image": per_image["collate"],
        "total_s_per_image": total,
        "images_per_s_per_core": 1.0 / total,
        "photometric_cpu_s_per_image": totals["photometric"] / photometric_images if photometric_images else None,
        "photometric_images_timed": photometric_images,
    }


def data_wait_share(cfg: Any, dataset: Any, *, step_seconds: float, steps: int) -> dict[str, Any]:
    """The real training loader with ``cfg.train.num_workers`` workers, read at one batch per ``step_seconds`` (a sleep after each
    batch stands for the step on the GPU) for ``steps`` batches after a warm-up that drains what the workers
    prefetched while starting (``2 * workers + 1`` batches; torch's default prefetch is 2 batches per worker)."""
    batches = training_batches(cfg, dataset, DistributedEnvironment(), position=0)
    workers = cfg.train.num_workers
    warmup = 2 * workers + 1
    waits = []
    try:
        for step in range(warmup + steps):
            start = time.perf_counter()
            next(batches)
            waited = time.perf_counter() - start
            if step >= warmup:
                waits.append(waited)
            time.sleep(step_seconds)
    finally:
        del batches  # shuts the workers down
    total = sum(waits) + step_seconds * len(waits)
    return {"workers": workers, "step_seconds": step_seconds, "steps": len(waits), "warmup_steps": warmup,
            "wait_median_s": statistics.median(waits), "wait_mean_s": statistics.fmean(waits),
            "wait_share": sum(waits) / total if total > 0 else 0.0}


def _image_paths(dataset: Any, count: int) -> list[str]:
    """The files of the first ``count`` items of ``dataset`` (cycled), for the official leg."""
    path = getattr(dataset, "path", None)
    if getattr(dataset, "kind", None) == "shards":
        raise DataBenchError("--compare official reads image files, and the official code cannot read tar shards; pass "
                             "the folder, list or index the shards were packed from")
    if not callable(path):
        raise DataBenchError(f"--compare official needs a dataset of image files (a folder or a file list); "
                             f"{type(dataset).__name__} has no paths")
    return [path(i % len(dataset)) for i in range(count)]


def check_official(official: str, python: str) -> None:
    """Refuse, in one line, a checkout without the official package or a Python that is not an executable."""
    if not (Path(official) / "dinov2" / "data" / "augmentations.py").is_file():
        raise DataBenchError(f"--official {official}: no dinov2/data/augmentations.py there; clone "
                             "https://github.com/facebookresearch/dinov2 and pass the folder that holds dinov2/")
    if not OFFICIAL_SCRIPT.is_file():
        raise DataBenchError(f"--compare official runs {OFFICIAL_SCRIPT.name} from dinoreg's launch/ folder, which this "
                             "installation lacks; run it from a clone of dinoreg (pip install -e .)")
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise DataBenchError(f"--official-python {python}: not an executable file; give a Python where torchvision "
                             "imports, e.g. a venv's bin/python")


def official_costs(cfg: Any, dataset: Any, *, official: str, python: str, images: int, warmup: int,
                   timeout: float = 3600.0) -> dict[str, Any]:
    """The official pipeline's seconds per image on the same files (``launch/bench_official_augment.py`` in
    ``python``, importing the official code from ``official``)."""
    check_official(official, python)
    crops = cfg.crops
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as listing:
        listing.write("\n".join(_image_paths(dataset, warmup + images)) + "\n")
    command = [python, str(OFFICIAL_SCRIPT), "--official", str(official), "--files", listing.name,
               "--warmup", str(warmup), "--batch", str(cfg.train.batch_size_per_gpu),
               "--global-size", str(crops.global_crops_size), "--local-size", str(crops.local_crops_size),
               "--local-number", str(crops.local_crops_number),
               "--global-scale", *map(str, crops.global_crops_scale), "--local-scale", *map(str, crops.local_crops_scale),
               "--patch-size", str(cfg.student.patch_size), "--mask-ratio", *map(str, cfg.ibot.mask_ratio_min_max),
               "--mask-probability", str(cfg.ibot.mask_sample_probability), "--seed", str(cfg.train.seed)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        os.unlink(listing.name)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataBenchError(f"the official leg failed (exit {done.returncode}): {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def benchmark_data(config: str = "tiny_cpu", *, overrides: Sequence[str] = (), data: Optional[str] = None,
                   images: int = 200, warmup: int = 10, workers: Optional[int] = None,
                   step_seconds: Optional[float] = None, gpu_images_per_s: Optional[float] = None, steps: int = 20,
                   official: Optional[str] = None, official_python: Optional[str] = None) -> dict[str, Any]:
    """All of ``dinoreg bench data``: see the module docstring. ``data`` replaces ``train.dataset_path``; the step
    time is ``step_seconds``, or ``batch_size_per_gpu / gpu_images_per_s``, or none (no data-wait leg);
    ``workers`` defaults to ``train.num_workers``; ``official`` (with ``official_python``) adds the official leg."""
    if official is not None:  # before anything is measured
        check_official(official, official_python or sys.executable)
    cfg = load_config(config, [*overrides, *([f"train.dataset_path={data}"] if data is not None else []),
                               *([f"train.num_workers={workers}"] if workers is not None else [])])
    dataset = build_dataset(cfg.train.dataset_path, "train")
    if official is not None:
        _image_paths(dataset, 1)  # files the official code can read: refused before anything is measured
    batch = cfg.train.batch_size_per_gpu
    if step_seconds is None and gpu_images_per_s is not None:
        step_seconds = batch / gpu_images_per_s
    result: dict[str, Any] = {
        "config": config, "overrides": list(overrides), "dataset": str(cfg.train.dataset_path), "dataset_size": len(dataset),
        "batch_size_per_gpu": batch, "global_crops_size": cfg.crops.global_crops_size,
        "local_crops_size": cfg.crops.local_crops_size, "local_crops_number": cfg.crops.local_crops_number,
        "torch": torch.__version__, "pillow": PIL.__version__, "cpu_count": os.cpu_count(), "load_before": os.getloadavg()[0],
    }
    result.update(per_image_costs(cfg, dataset, images=images, warmup=warmup))
    if gpu_images_per_s is not None:
        result["gpu_images_per_s"] = gpu_images_per_s
        result["cores_per_gpu"] = gpu_images_per_s / result["images_per_s_per_core"]
    for target in (200.0, 400.0):
        result[f"cores_per_gpu_at_{target:.0f}_img_s"] = target / result["images_per_s_per_core"]
    index_bytes = getattr(dataset, "index_bytes_per_image", None)
    result["index_bytes_per_image"] = index_bytes
    if step_seconds is not None:
        result["data_wait"] = data_wait_share(cfg, dataset, step_seconds=step_seconds, steps=steps)
    if official is not None:
        theirs = official_costs(cfg, dataset, official=official, python=official_python or sys.executable,
                                images=images, warmup=warmup)
        photometric = result["photometric_cpu_s_per_image"]
        result["official"] = {
            **theirs,
            "ours_total_s_per_image": result["total_s_per_image"],
            "speedup_of_ours": theirs["total_s_per_image"] / result["total_s_per_image"],
            # the official workers also run the photometric distortions, which ours run on the device
            "ours_with_cpu_photometric_s_per_image": result["total_s_per_image"] + photometric if photometric else None,
        }
    result["load_after"] = os.getloadavg()[0]
    return result


def _ms(seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else f"{1e3 * seconds:.2f} ms"


def format_data_report(result: dict[str, Any]) -> str:
    lines = [
        f"{result['config']}: {result['global_crops_size']} px x2 + {result['local_crops_size']} px "
        f"x{result['local_crops_number']} crops, batch {result['batch_size_per_gpu']}, dataset {result['dataset']} "
        f"({result['dataset_size']} images), Pillow {result['pillow']}; load average {result['load_before']:.2f} before, "
        f"{result['load_after']:.2f} after, {result['cpu_count']} CPUs",
        f"  per image, one core ({result['images_timed']} images, draft size {result['draft_size']}, "
        f"{result['decoded_pixels_mean'] / 1e3:.0f} kpixels decoded on average):",
        f"    decode   {_ms(result['decode_s_per_image'])}",
        f"    crops    {_ms(result['crops_s_per_image'])}",
        f"    collate  {_ms(result['collate_s_per_image'])} (iBOT masks included)",
        f"    total    {_ms(result['total_s_per_image'])}: {result['images_per_s_per_core']:.1f} images/s per core",
        f"  cores per GPU: {result['cores_per_gpu_at_200_img_s']:.1f} at 200 img/s, "
        f"{result['cores_per_gpu_at_400_img_s']:.1f} at 400 img/s"
        + (f", {result['cores_per_gpu']:.1f} at {result['gpu_images_per_s']:g} img/s"
           if result.get("gpu_images_per_s") not in (None, 200.0, 400.0) else ""),
        f"  photometric on this CPU (training runs it on the device): "
        f"{_ms(result['photometric_cpu_s_per_image'])} per image",
        "  index: " + (f"{result['index_bytes_per_image']:.1f} bytes per image" if result["index_bytes_per_image"]
                       is not None else "no index"),
    ]
    wait = result.get("data_wait")
    if wait:
        lines.append(f"  data wait: {100 * wait['wait_share']:.1f}% of the step time with {wait['workers']} workers at "
                     f"{wait['step_seconds']:.3f} s per step (median wait {_ms(wait['wait_median_s'])}, "
                     f"{wait['steps']} steps)")
    official = result.get("official")
    if official:
        lines += [
            f"  official DINOv2 pipeline, same files, one core (torchvision {official['torchvision']}):",
            f"    decode   {_ms(official['decode_s_per_image'])}",
            f"    augment  {_ms(official['augment_s_per_image'])} (crops + colour jitter, grayscale, blur, "
            "solarisation, normalisation, on the CPU), of which the geometric crops "
            f"{_ms(official['augment_geometric_s_per_image'])} (timed in a separate pass)",
            f"    collate  {_ms(official['collate_s_per_image'])}",
            f"    total    {_ms(official['total_s_per_image'])}: {official['images_per_s']:.1f} images/s per core; "
            f"ours {official['speedup_of_ours']:.2f}x faster per core",
            "  not like for like: the official workers also run the photometric distortions, which ours run on the "
            f"device ({_ms(official['augment_s_per_image'] - official['augment_geometric_s_per_image'])} of the "
            "official augment per image)" + (f"; ours with them on this CPU would be {_ms(official['ours_with_cpu_photometric_s_per_image'])}"
                        " per image" if official["ours_with_cpu_photometric_s_per_image"] else ""),
        ]
    return "\n".join(lines)
