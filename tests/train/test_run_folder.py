"""One run per output folder, each iteration logged once, damaged checkpoints that never outlive good ones, and
bad run folders or datasets answered in one line."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_helpers import TINY, subprocess_env, tmpfs, wait_for_training_rows

from dinoreg.train.checkpoint import CHECKPOINT_DIR, checkpoint_dirs, verify_checkpoint

# 10 iterations, a checkpoint every 5, about 2 s after start-up
RUN = [*TINY, "train.batch_size_per_gpu=8", "train.num_workers=0", "optim.epochs=1", "train.epoch_length=10",
       "optim.warmup_epochs=0", "evaluation.knn_enabled=false", "checkpoint.period=5", "train.log_every=1"]


def start(run_dir: Path, *overrides: str, flags=()) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dinoreg", "train", "--output-dir", str(run_dir), *flags, *RUN,
                             *overrides], env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def train(run_dir: Path, *overrides: str, flags=()) -> tuple[int, str, str]:
    process = start(run_dir, *overrides, flags=flags)
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def one_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code in (1, 2) and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


def training_iterations(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["iteration"] for row in rows if "total_loss" in row]


def tensorboard_steps(run_dir: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: PLC0415

    events = EventAccumulator(str(run_dir / "tensorboard" / run_dir.name))
    events.Reload()
    return [event.step for event in events.Scalars("loss/total")]


def test_a_second_run_into_the_same_folder_is_refused_naming_the_holder_and_kill_9_leaves_no_stale_lock(tmp_path):
    # 200 iterations: still running while the second one starts; its loader workers must not keep the lock
    first = start(tmp_path, "optim.epochs=20", "train.num_workers=2")
    wait_for_training_rows(tmp_path, 1, process=first)
    code, _, err = train(tmp_path)
    line = one_line(code, err)
    assert f"{tmp_path} is in use by dinoreg train on host {socket.gethostname()}, pid {first.pid}" in line
    assert "--output-dir" in line
    code, _, err = train(tmp_path, flags=["--no-resume", "--force"])  # nor may a forced restart move it aside
    assert "is in use by" in one_line(code, err) and (tmp_path / "metrics.jsonl").exists()
    first.send_signal(signal.SIGKILL)
    first.communicate()
    code, out, err = train(tmp_path, flags=["--no-resume", "--force"])  # the kernel dropped the lock with the process
    assert code == 0, err
    assert training_iterations(tmp_path) == list(range(10))


def test_a_run_killed_before_its_first_checkpoint_logs_each_iteration_once_when_started_again(tmp_path):
    first = start(tmp_path, "checkpoint.period=0", "optim.epochs=20")  # no checkpoint before the end
    wait_for_training_rows(tmp_path, 3, process=first)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert not checkpoint_dirs(tmp_path) and len(training_iterations(tmp_path)) >= 3
    code, _, err = train(tmp_path)
    assert code == 0, err
    assert training_iterations(tmp_path) == list(range(10))  # not 0, 1, 2, 0, 1, 2, ...
    assert tensorboard_steps(tmp_path) == list(range(10))


def damage(checkpoint: Path) -> None:
    (checkpoint / "meta.json").write_text("[1, 2, 3]")  # valid JSON of the wrong shape


def test_damaged_checkpoints_are_set_aside_so_retention_never_keeps_them_over_good_ones(tmp_path):
    code, _, err = train(tmp_path, "checkpoint.period=2", "checkpoint.keep_last=2")
    assert code == 0, err
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["8", "10"]
    damage(tmp_path / CHECKPOINT_DIR / "10")
    code, out, err = train(tmp_path, "checkpoint.period=2", "checkpoint.keep_last=2")
    assert code == 0, err
    assert f"skipping {tmp_path / CHECKPOINT_DIR / '10' / 'meta.json'} is damaged" in out
    assert "(iteration 8)" in out and "moved the damaged checkpoint aside" in out
    # the two kept are good ones; the damaged 10 is kept aside for inspection, where retention never counts it
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["8", "10"]
    assert all(verify_checkpoint(p) for p in checkpoint_dirs(tmp_path))
    assert json.loads((tmp_path / CHECKPOINT_DIR / "damaged-10" / "meta.json").read_text()) == [1, 2, 3]
    assert training_iterations(tmp_path) == list(range(10))


def test_a_run_whose_every_checkpoint_is_damaged_refuses_and_force_moves_it_aside(tmp_path):
    code, _, err = train(tmp_path)
    assert code == 0, err
    for checkpoint in checkpoint_dirs(tmp_path):
        damage(checkpoint)
    code, _, err = train(tmp_path)
    line = one_line(code, err)
    assert f"every checkpoint of {tmp_path} is damaged" in line and "--no-resume --force" in line
    assert training_iterations(tmp_path) == list(range(10))  # nothing appended, nothing deleted
    code, out, err = train(tmp_path, flags=["--no-resume", "--force"])
    assert code == 0, err
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1 and f"aside to {aside[0]}" in out
    assert sorted(p.name for p in (aside[0] / CHECKPOINT_DIR).iterdir()) == ["10", "5", "latest"]
    assert training_iterations(aside[0]) == list(range(10)) == training_iterations(tmp_path)


def test_a_file_where_a_checkpoint_would_go_is_named_before_training(tmp_path):
    (tmp_path / CHECKPOINT_DIR).mkdir()
    (tmp_path / CHECKPOINT_DIR / "5").write_text("not a checkpoint")
    code, _, err = train(tmp_path)
    line = one_line(code, err)
    assert f"{tmp_path / CHECKPOINT_DIR / '5'} is not a checkpoint directory but a file" in line
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.fixture
def read_only_folder(tmp_path):
    with tmpfs(tmp_path / "read_only", "size=1m,ro") as mount_point:
        yield mount_point


def test_an_output_folder_that_cannot_be_written_is_one_line(read_only_folder):
    for output in (read_only_folder, read_only_folder / "run"):
        code, _, err = train(output)
        line = one_line(code, err)
        assert f"cannot write to the output folder {output} (Read-only file system)" in line


def test_a_dataset_of_only_unreadable_files_stops_in_one_line_instead_of_looping(tmp_path):
    data = tmp_path / "data" / "class0"
    data.mkdir(parents=True)
    for i in range(40):
        (data / f"{i}.jpg").write_bytes(b"not an image")
    code, _, err = train(tmp_path / "monitored", f"train.dataset_path={data.parent}")
    assert "(the artifact monitor's probe batch) could be decoded" in one_line(code, err)
    began = time.monotonic()
    code, out, err = train(tmp_path / "run", f"train.dataset_path={data.parent}", "monitor.period=0")
    line = one_line(code, err)
    assert code == 2 and "images in a row could not be decoded" in line and str(data) in line
    assert time.monotonic() - began < 120 and len(out.splitlines()) < 40  # no flood of warnings


def test_symlink_loops_in_a_dataset_folder_are_followed_once(tmp_path, capsys):
    from PIL import Image  # noqa: PLC0415

    from dinoreg.data import ImageFolder  # noqa: PLC0415

    data, outside = tmp_path / "data", tmp_path / "elsewhere"
    for folder in (data / "c0", data / "c1", outside):
        folder.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8)).save(folder / f"{i}.png")
    os.symlink("..", data / "c0" / "loop")  # two loops: the scan used to grow exponentially
    (data / "c1" / "sub").mkdir()
    os.symlink("../..", data / "c1" / "sub" / "deeper")
    os.symlink("../c0", data / "c1" / "sibling")  # c0's images are c0's, not c1's too
    os.symlink(str(outside), data / "c1" / "extra")  # a folder outside the dataset: followed once
    os.symlink(str(outside), data / "c0" / "extra_again")
    dataset = ImageFolder(data)
    listed = sorted((Path(path).relative_to(data).as_posix(), label) for path, label in dataset.samples)
    assert listed == [("c0/0.png", 0), ("c0/1.png", 0), ("c0/extra_again/0.png", 0), ("c0/extra_again/1.png", 0),
                      ("c1/0.png", 1), ("c1/1.png", 1)]
    warning = capsys.readouterr().err.strip()
    assert warning.startswith(f"warning: {data}: 4 links lead to folders the scan lists anyway")
