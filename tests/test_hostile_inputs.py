"""The reliability campaign's hostile inputs against every entry point, in one table.

Each row is (input kind, entry point) -> the one line the command must answer with: exit code 1 or 2, exactly one
line on stderr, no traceback, the line naming what is wrong; for crafted pickles, proof that nothing ran (the
marker file the pickle would create is absent). A new entry point that reads checkpoints or weights files gets a
column here and so every hostile input at once.
"""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from launch_helpers import TINY, subprocess_env

from dinoreg.config import load_config
from dinoreg.distributed import DistributedEnvironment
from dinoreg.train.build import build_model_and_optimizer
from dinoreg.train.checkpoint import CHECKPOINT_DIR, file_crc32, save_checkpoint
from dinoreg.train.checkpoint import _model_and_optimizer_state  # the state a save writes, to craft one value of it

# A tiny run that fails or starts within seconds.
RUN = [*TINY, "train.batch_size_per_gpu=4", "train.num_workers=0", "optim.epochs=1", "train.epoch_length=2",
       "optim.warmup_epochs=0", "evaluation.knn_enabled=false", "checkpoint.period=1", "train.log_every=1",
       "train.dataset_path=synthetic:size=32"]


class RunsCode:
    """Unpickling this runs a shell command that creates ``marker``: what a crafted file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ------------------------------------------------------------------------------------------ the inputs


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A run folder with one intact checkpoint at iteration 1 (written in this process: no training needed)."""
    run = tmp_path_factory.mktemp("good") / "run"
    cfg = load_config("tiny_cpu", [*RUN, f"train.output_dir={run}"])
    torch.manual_seed(0)
    model, optimizer = build_model_and_optimizer(cfg, DistributedEnvironment(), torch.device("cpu"))
    save_checkpoint(run, iteration=1, model=model, optimizer=optimizer, stream_position=4, cfg=cfg)
    return run, model, optimizer


def _rechecksum(checkpoint: Path) -> None:
    """What whoever crafts a folder does: the checksums in meta.json are recomputed, so they cannot help."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["files"] = {name: {"bytes": (checkpoint / name).stat().st_size, "crc32": file_crc32(checkpoint / name)}
                     for name in meta["files"]}
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def crafted_metadata(checkpoint: Path, marker: Path, model, optimizer) -> str:
    with open(checkpoint / ".metadata", "wb") as f:
        pickle.dump(RunsCode(marker), f)
    return r"\.metadata holds a reference to posix\.system.*nothing in it was run"


def crafted_rng(checkpoint: Path, marker: Path, model, optimizer) -> str:
    torch.save({"python": RunsCode(marker)}, checkpoint / "rng" / "rank0.pt")
    return r"rng/rank0\.pt holds objects other than RNG states.*nothing in it was run"


def crafted_value(checkpoint: Path, marker: Path, model, optimizer) -> str:
    """A shard whose optimizer hyper-parameter unpickles to a command (DCP reads such values with pickle)."""
    state = _model_and_optimizer_state(model, optimizer)
    state["optimizer"]["param_groups"][0]["lr"] = RunsCode(marker)
    dcp.save(state, checkpoint_id=checkpoint, no_dist=True)
    return r"holds a value for optimizer\.param_groups\.0\.lr that is not plain data.*nothing in it was run"


def meta_of_shape(payload):
    def damage(checkpoint: Path, marker: Path, model, optimizer) -> str:
        (checkpoint / "meta.json").write_text(json.dumps(payload))
        return r"meta\.json is damaged"
    return damage


# entry point -> the command line, given the hostile run folder and a scratch folder
FOLDER_ENTRY_POINTS = {
    "resume": lambda run, tmp: ["train", "--output-dir", str(run), *RUN],
    "export": lambda run, tmp: ["export", str(run), "--format", "safetensors", "--output", str(tmp / "out.safetensors")],
    "train.init_from": lambda run, tmp: ["train", "--output-dir", str(tmp / "new"), *RUN, f"train.init_from={run}"],
    "phase.start_from": lambda run, tmp: ["train", "--output-dir", str(tmp / "new"), *RUN,
                                          f"phase.start_from={run}"],
    "distillation.teacher": lambda run, tmp: ["train", "--output-dir", str(tmp / "new"), *RUN,
                                              "distillation.enabled=true", f"distillation.teacher={run}"],
}
# input kind -> (how the folder is made hostile, the entry points that read that part of a checkpoint)
FOLDER_INPUTS = {
    "crafted .metadata": (crafted_metadata, list(FOLDER_ENTRY_POINTS)),
    "crafted rng state": (crafted_rng, ["resume"]),  # only a resume restores RNG states
    "crafted optimizer value": (crafted_value, ["resume"]),  # only a resume reads the optimizer
}
TABLE = [(kind, entry) for kind, (_, entries) in FOLDER_INPUTS.items() for entry in entries]


def dinoreg(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dinoreg", *args], env=subprocess_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def assert_one_line(result: subprocess.CompletedProcess, pattern: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode in (1, 2), (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


@pytest.mark.parametrize("kind, entry", TABLE, ids=[f"{kind}->{entry}" for kind, entry in TABLE])
def test_a_crafted_checkpoint_folder_runs_nothing_and_is_named_in_one_line(good_run, tmp_path, kind, entry):
    source, model, optimizer = good_run
    run = tmp_path / "shared_run"
    shutil.copytree(source, run)
    marker = tmp_path / "code_ran"
    pattern = FOLDER_INPUTS[kind][0](run / CHECKPOINT_DIR / "1", marker, model, optimizer)
    _rechecksum(run / CHECKPOINT_DIR / "1")
    result = dinoreg(*FOLDER_ENTRY_POINTS[entry](run, tmp_path), cwd=tmp_path)
    assert not marker.exists(), "the crafted pickle ran"
    line = assert_one_line(result, pattern)
    assert str(run / CHECKPOINT_DIR / "1") in line
