"""Shared by the tests that start training processes: a tiny recipe, free ports, a clean environment."""

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TINY = ["student.embed_dim=32", "student.num_heads=2", "student.depth=2", "crops.global_crops_size=32",
        "crops.local_crops_size=16", "crops.local_crops_number=2", "dino.head_n_prototypes=64",
        "ibot.head_n_prototypes=64", "dino.head_hidden_dim=64", "ibot.head_hidden_dim=64",
        "dino.head_bottleneck_dim=32", "ibot.head_bottleneck_dim=32"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    """This environment without launcher variables (a test under srun must not look distributed)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def torchrun(nproc: int, *args: str, timeout: int = 300, warnings: str = "ignore") -> subprocess.CompletedProcess:
    """``warnings``: the workers' PYTHONWARNINGS ("default" to see them in stderr)."""
    command = [*TORCHRUN, f"--nproc_per_node={nproc}", f"--master_port={free_port()}", *args]
    return subprocess.run(command, env={**subprocess_env(), "PYTHONWARNINGS": warnings}, capture_output=True,
                          text=True, timeout=timeout)


def wait_for_training_rows(run_dir, count: int, *, timeout: float = 120, process=None) -> None:
    """Wait until ``run_dir/metrics.jsonl`` holds ``count`` training rows (evaluation and monitor rows do not
    count); fail if ``process`` exits first or ``timeout`` passes."""
    metrics, deadline = Path(run_dir) / "metrics.jsonl", time.monotonic() + timeout
    while time.monotonic() < deadline and (process is None or process.poll() is None):
        if metrics.exists() and sum('"total_loss"' in line for line in metrics.read_text().splitlines()) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"{count} training rows never appeared in {metrics}"
                         + (f" (exit code {process.poll()})" if process is not None else ""))


@contextlib.contextmanager
def tmpfs(mount_point: Path, options: str):
    """A real tmpfs mounted at ``mount_point`` with ``options`` (e.g. ``size=2m`` for a tiny disk that fills up,
    ``size=1m,ro`` for a read-only one) for the duration; skips the test where mounting is not allowed."""
    import pytest  # noqa: PLC0415 -- this module is also imported by worker scripts without pytest

    mount_point.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def latest_checkpoint(run_dir):
    """The published checkpoint a run's ``checkpoints/latest`` names (the pointer the saver writes last), else its
    newest published one: what the tests expect a save to have left."""
    from dinoreg.run_dir import CHECKPOINT_DIR, LATEST_FILE, META_FILE  # noqa: PLC0415
    from dinoreg.train.checkpoint import checkpoint_dirs  # noqa: PLC0415

    pointer = Path(run_dir) / CHECKPOINT_DIR / LATEST_FILE
    named = pointer.parent / pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and (named / META_FILE).is_file():
        return named
    published = checkpoint_dirs(run_dir)
    return published[-1] if published else None
