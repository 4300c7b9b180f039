"""Checkpoints: layout, retention, strict loading, config checks, exact resume after a signal, kill -9."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from launch_helpers import TINY, latest_checkpoint, subprocess_env, tmpfs, wait_for_training_rows

from dinoreg.config import load_config
from dinoreg.distributed import DistributedEnvironment
from dinoreg.models.weights import CheckpointMismatchError
from dinoreg.train.build import build_model_and_optimizer
from dinoreg.train.checkpoint import (CHECKPOINT_DIR, CheckpointError, checkpoint_dirs, config_differences, file_crc32,
                                      load_checkpoint, read_meta, save_checkpoint, verify_checkpoint)
from dinoreg.train.signals import EXIT_CODE_SAVED_ON_SIGNAL, SignalWatcher

# A run of 2 x 10 iterations that takes about 2 s after start-up.
RUN = [*TINY, "train.batch_size_per_gpu=8", "train.num_workers=0", "optim.epochs=2", "train.epoch_length=10",
       "optim.warmup_epochs=1", "evaluation.knn_enabled=false", "checkpoint.period=5", "train.log_every=1"]


def model_and_optimizer(*overrides):
    cfg = load_config("tiny_cpu", [*RUN, *overrides])
    torch.manual_seed(0)
    model, optimizer = build_model_and_optimizer(cfg, DistributedEnvironment(), torch.device("cpu"))
    return cfg, model, optimizer


def step(model, optimizer):
    """Give the optimizer state and change every parameter, without the data pipeline."""
    loss = sum(p.float().pow(2).sum() for p in model.student.parameters())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.update_teacher(0.9)


def dinoreg_train(run_dir: Path, *overrides: str, flags=(), wait=True):
    command = [sys.executable, "-m", "dinoreg", "train", "--output-dir", str(run_dir), *flags, *RUN, *overrides]
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    if wait:
        out, err = process.communicate(timeout=300)
        return process.returncode, out + err
    return process


def losses_by_iteration(run_dir: Path) -> dict:
    """The last logged row of each iteration (a resumed run logs again what followed its checkpoint)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: {k: v for k, v in r.items() if k.endswith("loss")} for r in rows if "total_loss" in r}


# ------------------------------------------------------------------------------------- in process


def test_save_publishes_atomically_with_latest_and_retention(tmp_path):
    cfg, model, optimizer = model_and_optimizer()
    (tmp_path / CHECKPOINT_DIR).mkdir()
    for iteration in (5, 10, 15, 20, 25, 30):
        step(model, optimizer)
        path = save_checkpoint(tmp_path, iteration=iteration, model=model, optimizer=optimizer,
                               stream_position=iteration * 8, cfg=cfg, keep_last=2, keep_every=10)
        assert path == tmp_path / CHECKPOINT_DIR / str(iteration)
    # keep_last 2 (25, 30) plus every multiple of 10 (10, 20)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["10", "20", "25", "30"]
    assert (tmp_path / CHECKPOINT_DIR / "latest").read_text().strip() == "30"
    assert not list((tmp_path / CHECKPOINT_DIR).glob(".tmp-*"))
    newest = tmp_path / CHECKPOINT_DIR / "30"
    assert {"meta.json", "config.yaml", "rng"} <= {p.name for p in newest.iterdir()}
    meta = json.loads((newest / "meta.json").read_text())
    assert (meta["iteration"], meta["stream_position"], meta["world_size"]) == (30, 240, 1)
    assert "dino_loss.center" in meta["model_keys"] and "teacher.backbone.cls_token" in meta["model_keys"]
    # a stale "latest" (its directory deleted) falls back to the newest published directory
    (tmp_path / CHECKPOINT_DIR / "latest").write_text("35\n")
    assert latest_checkpoint(tmp_path) == newest


def test_load_restores_model_optimizer_centres_and_rng_exactly(tmp_path):
    cfg, model, optimizer = model_and_optimizer()
    for _ in range(2):
        step(model, optimizer)
    model.dino_loss.center.normal_()
    torch.manual_seed(123)
    path = save_checkpoint(tmp_path, iteration=7, model=model, optimizer=optimizer, stream_position=56, cfg=cfg)
    expected_draw = torch.rand(3)

    _, fresh, fresh_optimizer = model_and_optimizer()
    torch.manual_seed(999)
    meta = load_checkpoint(path, model=fresh, optimizer=fresh_optimizer)
    assert meta["iteration"] == 7 and meta["rng_restored"]
    torch.testing.assert_close(torch.rand(3), expected_draw, rtol=0, atol=0)  # RNG continues where it was
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(optimizer.state_dict()["state"].values(), fresh_optimizer.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]) and torch.equal(a["step"], b["step"])
    # one more identical step on both stays identical
    step(model, optimizer)
    step(fresh, fresh_optimizer)
    assert torch.equal(model.teacher["backbone"].pos_embed, fresh.teacher["backbone"].pos_embed)


def test_load_is_strict_about_the_model(tmp_path):
    cfg, model, optimizer = model_and_optimizer()
    path = save_checkpoint(tmp_path, iteration=1, model=model, optimizer=optimizer, stream_position=8, cfg=cfg)
    _, deeper, deeper_optimizer = model_and_optimizer("student.depth=3")
    with pytest.raises(CheckpointMismatchError, match=r"missing \[.*blocks\.2\.") as error:
        load_checkpoint(path, model=deeper, optimizer=deeper_optimizer)
    assert "config.yaml" in str(error.value)
    _, separate, separate_optimizer = model_and_optimizer("ibot.separate_head=true")
    with pytest.raises(CheckpointMismatchError, match="ibot_head"):
        load_checkpoint(path, model=separate, optimizer=separate_optimizer)
    # same model, other parameter groups (layer-wise decay 0.9 splits the blocks into groups)
    _, same, regrouped = model_and_optimizer("optim.layerwise_decay=0.9")
    with pytest.raises(CheckpointError, match="optim.layerwise_decay"):
        load_checkpoint(path, model=same, optimizer=regrouped)


def test_config_differences_split_breaking_from_benign():
    saved = load_config("tiny_cpu", RUN)
    current = load_config("tiny_cpu", [*RUN, "train.log_every=50", "evaluation.knn_k=10", "optim.base_lr=0.02",
                                       "train.seed=3"])
    breaking, benign = config_differences(saved, current)
    assert breaking[0] == "optim.base_lr: 0.01 -> 0.02" and breaking[2] == "train.seed: 0 -> 3"
    assert breaking[1].startswith("optim.lr: ") and len(breaking) == 3  # the lr derived from base_lr
    assert benign == ["evaluation.knn_k: 20 -> 10", "train.log_every: 1 -> 50"]


def test_a_checkpoint_older_than_a_key_resumes_when_the_key_keeps_its_default():
    """A run saved before train.fsdp and train.initialisation existed (their default is what it did) resumes; a
    newer key set away from its default is reported like any change."""
    saved = OmegaConf.create(OmegaConf.to_container(load_config("tiny_cpu", RUN)))  # as read back from config.yaml
    for section, key in (("train", "fsdp"), ("train", "initialisation"), ("train", "seed")):
        del saved[section][key]  # as an older dinoreg wrote it (seed: a key that changes what the run computes)
    breaking, benign = config_differences(saved, load_config("tiny_cpu", RUN))
    assert breaking == [] and benign == ["train.fsdp: '<absent>' -> 'auto'",
                                         "train.initialisation: '<absent>' -> 'cpu'", "train.seed: '<absent>' -> 0"]
    breaking, _ = config_differences(saved, load_config("tiny_cpu", [*RUN, "train.seed=3"]))
    assert breaking == ["train.seed: '<absent>' -> 3"]
    saved.train.saveckp_freq = 20  # a key an older dinoreg saved and has retired
    breaking, benign = config_differences(saved, load_config("tiny_cpu", RUN))
    assert breaking == [] and "train.saveckp_freq: 20 -> '<absent>'" in benign


# ------------------------------------------------------------------------------------- the CLI


def test_signal_at_a_random_step_then_resume_gives_the_same_losses_bitwise(tmp_path):
    code, output = dinoreg_train(tmp_path / "straight")
    assert code == 0, output
    straight = losses_by_iteration(tmp_path / "straight")
    assert sorted(straight) == list(range(20))

    stop_after = random.Random(os.getpid()).randrange(2, 17)  # any step, including between checkpoints
    run = tmp_path / "stopped"
    process = dinoreg_train(run, wait=False)
    wait_for_training_rows(run, stop_after, process=process)
    process.send_signal(signal.SIGUSR1)
    process.send_signal(signal.SIGTERM)  # a second signal, during the step or the save, changes nothing
    out, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_CODE_SAVED_ON_SIGNAL, err
    saved_at = int(latest_checkpoint(run).name)
    assert stop_after <= saved_at < 20 and "SIGUSR1: saved" in out + err
    # the data stream resumes right after the last image used (tests/data/test_loader.py: exact continuation)
    assert read_meta(latest_checkpoint(run))["stream_position"] == saved_at * 8

    code, output = dinoreg_train(run)
    assert code == 0, output
    assert f"resumed from {run / CHECKPOINT_DIR / str(saved_at)}" in output
    resumed = losses_by_iteration(run)
    assert resumed == straight  # bitwise: every loss of every iteration


def test_no_resume_refuses_an_existing_run_unless_forced_and_config_changes_are_checked(tmp_path):
    code, _ = dinoreg_train(tmp_path, "optim.epochs=1", "optim.warmup_epochs=0")
    assert code == 0 and latest_checkpoint(tmp_path).name == "10"
    code, output = dinoreg_train(tmp_path, "optim.epochs=1", "optim.warmup_epochs=0", flags=["--no-resume"])
    assert code == 1 and "--force" in output
    # resuming with a changed recipe lists the difference and refuses
    code, output = dinoreg_train(tmp_path, "optim.warmup_epochs=0", "optim.base_lr=0.02")
    assert code == 1 and "optim.base_lr: 0.01 -> 0.02" in output and "--allow-config-change" in output
    # benign changes are logged and allowed; the finished run has nothing left to do
    code, output = dinoreg_train(tmp_path, "optim.epochs=1", "optim.warmup_epochs=0", "train.log_every=7")
    assert code == 0 and "train.log_every: 1 -> 7" in output
    code, output = dinoreg_train(tmp_path, "optim.epochs=1", "optim.warmup_epochs=0", flags=["--no-resume", "--force"])
    assert code == 0 and "resumed" not in output
    assert sorted(losses_by_iteration(tmp_path)) == list(range(10))


def kill_during_a_save(run_dir: Path, overrides, *, let_through: int) -> bool:
    """Start the run, let ``let_through`` checkpoint saves finish, and kill -9 the process as the next one is
    being written: once its ``.tmp-N`` directory appears (or it is already published). Every wait is for an
    event of the run (a line it prints, a file it writes), none for a guessed time. Returns whether the kill
    landed inside the write."""
    command = [sys.executable, "-m", "dinoreg", "train", "--output-dir", str(run_dir), *RUN, *overrides]
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    starts = (line for line in process.stdout if line.startswith("saving checkpoint") and line.endswith("...\n"))
    for _ in range(let_through + 1):  # saves run one after the other: a save starting means the last is done
        line = next(starts, None)
        assert line is not None, f"the run ended before its save number {let_through + 1}"
    iteration = int(line.split()[2].rstrip("."))
    in_progress, published = run_dir / CHECKPOINT_DIR / f".tmp-{iteration}", run_dir / CHECKPOINT_DIR / str(iteration)
    while not (in_progress.exists() or published.exists()) and process.poll() is None:
        time.sleep(0.001)
    process.kill()
    process.communicate()
    return bool(list((run_dir / CHECKPOINT_DIR).glob(".tmp-*")))


def test_kill_minus_9_during_checkpoint_writes_never_loses_the_newest_checkpoint(tmp_path):
    """12 times: kill -9 while a checkpoint is being written (every other time after one more save has
    finished, so the run makes progress); the newest published one must load, and the run still finishes."""
    overrides = ("optim.epochs=3", "checkpoint.period=1", "checkpoint.keep_last=2")  # 30 iterations: at most 24 saved
    _, model, optimizer = model_and_optimizer()
    seen, torn_writes = [], 0
    for trial in range(12):
        torn_writes += kill_during_a_save(tmp_path, overrides, let_through=1 - trial % 2)  # the first: one to load
        newest = latest_checkpoint(tmp_path)
        assert newest is not None
        meta = load_checkpoint(newest, model=model, optimizer=optimizer)  # strict: loads whole, or raises
        assert meta["iteration"] == int(newest.name)
        seen.append(meta["iteration"])
    assert seen == sorted(seen) and seen[-1] >= seen[0] + 5  # progress across kills, never a step back
    print(f"{torn_writes} of 12 kills landed inside a checkpoint write")
    assert torn_writes >= 6
    code, output = dinoreg_train(tmp_path, *overrides)  # and the run still finishes
    assert code == 0, output
    assert sorted(losses_by_iteration(tmp_path)) == list(range(30))


@pytest.mark.parametrize("damage", ["delete", "truncate", "overwrite"])
def test_damaged_checkpoint_is_named_and_resume_falls_back_to_the_previous_one(tmp_path, damage):
    code, output = dinoreg_train(tmp_path, "optim.epochs=1", "optim.warmup_epochs=0")
    assert code == 0, output
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["5", "10"]
    newest = tmp_path / CHECKPOINT_DIR / "10"
    victim = sorted(newest.glob("*.distcp"))[0]
    if damage == "delete":
        victim.unlink()
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:100])
    else:  # bytes overwritten in the middle, the size unchanged: only the content checksum tells
        data = bytearray(victim.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 4096] = bytes(byte ^ 0xFF for byte in data[middle:middle + 4096])
        victim.write_bytes(bytes(data))
    _, model, optimizer = model_and_optimizer()
    with pytest.raises(CheckpointError, match=f"{victim.name} (is missing|has 100 bytes|has the saved size but not "
                                              "the saved content)"):
        load_checkpoint(newest, model=model, optimizer=optimizer)
    # the run resumes from iteration 5 and redoes 5..9, re-publishing an intact checkpoint 10
    code, output = dinoreg_train(tmp_path, "optim.epochs=1", "optim.warmup_epochs=0")
    assert code == 0, output
    assert f"skipping checkpoint {newest} is damaged" in output and "(iteration 5)" in output
    assert load_checkpoint(newest, model=model, optimizer=optimizer)["iteration"] == 10


def test_signal_watcher_records_the_first_signal_and_restores_handlers():
    previous = signal.getsignal(signal.SIGUSR2)
    quiet = SignalWatcher(["SIGUSR2"])
    assert not quiet.should_stop()
    quiet.close()
    assert signal.getsignal(signal.SIGUSR2) is previous  # nothing received: the old handler is back

    watcher = SignalWatcher(["SIGUSR1", "SIGUSR2"])
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert watcher.received == "SIGUSR1" and watcher.should_stop()
    finally:
        watcher.close()
    # after a stop on signal the process keeps ignoring them until it exits
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.signal(signal.SIGUSR2, previous)
    with pytest.raises(ValueError, match="SIGFOO"):
        SignalWatcher(["SIGFOO"])


@pytest.fixture
def small_filesystem(tmp_path):
    """A 2 MiB tmpfs: room for one checkpoint of RUN's model (about 1.2 MiB) and the logs, not for two."""
    with tmpfs(tmp_path / "small", "size=2m") as mount_point:
        yield mount_point


def test_a_full_disk_during_a_save_stops_with_one_message_and_keeps_the_previous_checkpoint(small_filesystem):
    run = small_filesystem / "run"
    code, output = dinoreg_train(run, "checkpoint.period=5")
    assert code == 1, output
    errors = [line for line in output.splitlines() if line.startswith("dinoreg train:")]
    assert len(errors) == 1 and "Traceback" not in output, output
    assert f"could not save checkpoint {run / CHECKPOINT_DIR / '10'}" in errors[0]
    assert f"the previous checkpoint {run / CHECKPOINT_DIR / '5'} is intact" in errors[0]
    assert "MiB free" in errors[0]
    assert sorted(p.name for p in (run / CHECKPOINT_DIR).iterdir()) == ["5", "latest"]  # no partial .tmp-10
    assert verify_checkpoint(run / CHECKPOINT_DIR / "5")["iteration"] == 5


def test_a_resumed_run_logs_every_iteration_once_and_a_bad_latest_is_reported(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: PLC0415

    code, output = dinoreg_train(tmp_path, "optim.epochs=1", "optim.warmup_epochs=0")  # checkpoints 5 and 10
    assert code == 0, output
    # as if killed after logging iterations 5..9 but before checkpoint 10 was published, then `latest` damaged
    subprocess.run(["rm", "-r", str(tmp_path / CHECKPOINT_DIR / "10")], check=True)
    (tmp_path / CHECKPOINT_DIR / "latest").write_text("\x00garbage\n")
    code, output = dinoreg_train(tmp_path, "optim.epochs=1", "optim.warmup_epochs=0")
    assert code == 0, output
    assert "latest holds '\\x00garbage', which names no published checkpoint" in output
    assert "resumed from" in output and "(iteration 5)" in output
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows if "total_loss" in row] == list(range(10))  # 5..9 once, not twice
    events = EventAccumulator(str(tmp_path / "tensorboard" / tmp_path.name))
    events.Reload()
    assert [event.step for event in events.Scalars("loss/total")] == list(range(10))


def test_rng_states_are_saved_as_data_and_the_older_pickled_layout_is_not_unpickled(tmp_path):
    import numpy as np  # noqa: PLC0415

    cfg, model, optimizer = model_and_optimizer()
    path = save_checkpoint(tmp_path, iteration=1, model=model, optimizer=optimizer, stream_position=8, cfg=cfg)
    rng_file = path / "rng" / "rank0.pt"
    torch.load(rng_file, weights_only=True)  # tensors and numbers only: loads without unpickling any object
    # dinoreg's earlier layout pickled numpy's state with its array: loading it would need numpy's globals
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(old, rng_file)
    meta = json.loads((path / "meta.json").read_text())
    meta["files"]["rng/rank0.pt"] = {"bytes": rng_file.stat().st_size, "crc32": file_crc32(rng_file)}
    (path / "meta.json").write_text(json.dumps(meta))
    assert load_checkpoint(path, model=model, optimizer=optimizer)["rng_restored"] is False


@pytest.mark.parametrize("failure, says, advice", [
    (RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. "),
     "a data loader worker process died during the save (RuntimeError: DataLoader worker (pid 4242)",
     "a process that died or was killed, a rank that stopped) and fix it first."),
    (OSError(28, "No space left on device"), "OSError: [Errno 28] No space left on device (", "Free space first."),
])
def test_a_failed_save_names_its_real_cause_and_blames_the_disk_only_when_it_is_full(tmp_path, failure, says, advice):
    """A second signal or a dead worker interrupting a save was reported with the free space and 'free space first'."""
    from dinoreg.train.checkpoint import _save_failure_message  # noqa: PLC0415 -- what every rank raises on failure

    (tmp_path / CHECKPOINT_DIR / "5").mkdir(parents=True)
    (tmp_path / CHECKPOINT_DIR / "5" / "meta.json").write_text("{}")
    message = _save_failure_message(tmp_path / CHECKPOINT_DIR / "10", tmp_path / CHECKPOINT_DIR / ".tmp-10", failure)
    assert says in message and message.endswith(advice), message
    assert ("MiB free" in message) == isinstance(failure, OSError), message
    assert f"the previous checkpoint {tmp_path / CHECKPOINT_DIR / '5'} is intact" in message
