"""Training from packed tar shards: bitwise the same run as from the folder of the same images, bitwise resume, a
resume on another number of processes that reads the same images as the folder would, and a damaged shard that is
named while training goes on."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from launch_helpers import TINY, latest_checkpoint, subprocess_env, torchrun
from PIL import Image

from dinoreg.data.index import IndexedDataset
from dinoreg.data.shards import pack
from dinoreg.run_dir import BACKBONE_FILE, CHECKPOINT_DIR, LATEST_FILE
from dinoreg.train.checkpoint import read_meta

RUN = [*TINY, "train.batch_size_per_gpu=4", "optim.epochs=1", "train.epoch_length=6", "optim.warmup_epochs=0",
       "evaluation.knn_enabled=false", "monitor.period=0", "checkpoint.period=3", "train.log_every=1"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """24 photos-like JPEGs in 3 classes (smooth gradients plus noise, 40 x 36) and their shards."""
    root = tmp_path_factory.mktemp("shards_training")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:36, 0:40]
    for i in range(24):
        folder = root / "folder" / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        base = (np.stack([x * (i + 1), y * (24 - i), x + y], -1) * 3) % 256
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    pack(str(root / "folder"), root / "shards", shard_size=8000, progress=False)
    return root


def train(run: Path, data: Path, *overrides: str, flags=()) -> str:
    result = subprocess.run([sys.executable, "-m", "dinoreg", "train", "--output-dir", str(run), *flags, *RUN,
                             f"train.dataset_path={data}", *overrides], env=subprocess_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def rows(run: Path) -> dict:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r for r in lines if "total_loss" in r}


def losses(run: Path) -> dict:
    return {i: {k: v for k, v in r.items() if k.endswith("loss")} for i, r in rows(run).items()}


def cut_back(run: Path, copy: Path, checkpoint: int) -> Path:
    """A copy of ``run`` as a preemption after ``checkpoint`` would have left it."""
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(*(str(i) for i in range(checkpoint + 1, 100))))
    (copy / CHECKPOINT_DIR / LATEST_FILE).write_text(f"{checkpoint}\n")
    (copy / BACKBONE_FILE).unlink()
    return copy


def test_a_run_from_shards_is_the_run_from_the_folder_bitwise_and_resumes_bitwise(images, tmp_path):
    from_folder = tmp_path / "folder_run"
    train(from_folder, images / "folder", "train.num_workers=0")
    from_shards = tmp_path / "shards_run"
    train(from_shards, images / "shards", "train.num_workers=2")  # workers open the shards themselves
    reference = losses(from_folder)
    assert sorted(reference) == list(range(6)) and losses(from_shards) == reference
    assert (from_shards / BACKBONE_FILE).read_bytes() == (from_folder / BACKBONE_FILE).read_bytes()

    resumed = cut_back(from_shards, tmp_path / "resumed", 3)
    output = train(resumed, images / "shards", "train.num_workers=2")
    assert "resumed from" in output and losses(resumed) == reference
    assert (resumed / BACKBONE_FILE).read_bytes() == (from_folder / BACKBONE_FILE).read_bytes()


def test_a_damaged_shard_is_named_and_training_goes_on(images, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(images / "shards", damaged)
    dataset = IndexedDataset(damaged)
    first = dataset.index.shard_files[0]
    members = int((dataset.index.shards == 0).sum())
    with open(damaged / first, "r+b") as file:
        file.truncate(600)  # the first member's header and a few of its bytes: every member of the shard unreadable
    output = train(tmp_path / "run", damaged, "train.num_workers=0", "train.epoch_length=4", "checkpoint.period=4")
    assert f"1 of {len(dataset.index.shard_files)} shards do not match the index: {first} (600 bytes" in output
    assert sorted(losses(tmp_path / "run")) == list(range(4))
    bad = max(r["bad_files"] for r in rows(tmp_path / "run").values())
    assert 0 < bad and members >= 2  # 16 images drawn from 24, of which the shard's are dropped and counted
    assert f"{damaged / first}:" in output  # the log names the members it could not read


def test_a_two_process_run_from_shards_resumes_on_one_process_on_the_folders_images(images, tmp_path):
    """Saved by 2 processes from the shards, resumed by 1: the data stream continues at the same position, and on
    exactly the images the folder gives (a resume of the same checkpoint from the folder computes the same losses,
    bitwise; the augmentation streams restart with the world size, as for any source)."""
    straight = tmp_path / "two"
    command = ["-m", "dinoreg", "train", "--output-dir", str(straight), *RUN, "train.batch_size_per_gpu=2",
               "train.num_workers=0", f"train.dataset_path={images / 'shards'}"]
    result = torchrun(2, *command, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = losses(straight)
    on_shards = cut_back(straight, tmp_path / "on_shards", 3)
    on_folder = cut_back(straight, tmp_path / "on_folder", 3)
    output = train(on_shards, images / "shards", "train.batch_size_per_gpu=4", "train.num_workers=0")
    assert "saved by 2 processes" in output
    train(on_folder, images / "folder", "train.batch_size_per_gpu=4", "train.num_workers=0",
          flags=["--allow-config-change"])
    resumed = losses(on_shards)
    assert sorted(resumed) == list(range(6)) and all(resumed[i] == reference[i] for i in range(3))
    assert resumed == losses(on_folder)
    assert read_meta(latest_checkpoint(on_shards))["stream_position"] == 6 * 4  # the stream went on from 3 * 4
