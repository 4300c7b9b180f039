"""The reliability campaign's hostile inputs against every entry point, in one table.

Each row is (input kind, entry point) -> the one line the command must answer with: exit code 1 or 2, exactly one
line on stderr, no traceback, the line naming the file and what is wrong; for crafted pickles, proof that nothing
ran (the marker file the pickle would create is absent). Two tables: checkpoint folders (a run someone shares) at
every command that reads one, and single weights files at every option or key that names one. A new entry point
gets a column here, and so every hostile input at once. docs/RELIABILITY.md lists the campaign.
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
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from launch_helpers import TINY, subprocess_env
from safetensors.torch import save_file

from dinoreg.cli import main
from dinoreg.config import load_config
from dinoreg.distributed import DistributedEnvironment
from dinoreg.models import build_backbone
from dinoreg.train.build import build_model_and_optimizer
from dinoreg.train.checkpoint import CHECKPOINT_DIR, file_crc32, save_checkpoint

# A tiny run that fails or starts within a second or two.
RUN = [*TINY, "train.batch_size_per_gpu=4", "train.num_workers=0", "optim.epochs=1", "train.epoch_length=2",
       "optim.warmup_epochs=0", "evaluation.knn_enabled=false", "checkpoint.period=1", "train.log_every=1",
       "monitor.period=0", "train.dataset_path=synthetic:size=32"]


class RunsCode:
    """Unpickling this runs a shell command that creates ``marker``: what a crafted file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def answer(argv: list[str], capsys) -> tuple[int, str]:
    """Run one dinoreg command line in this process: ``(exit code, its one stderr line)``, after checking it is one
    line, exit code 1 or 2, no traceback."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's refusals
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code in (1, 2), (code, err)
    assert "Traceback" not in err and len(lines) == 1, err
    return code, lines[0]


# ------------------------------------------------------------------------------------------ checkpoint folders


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
    if isinstance(meta, dict):
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
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}  # as saved
    state["optimizer"]["param_groups"][0]["lr"] = RunsCode(marker)
    with pytest.warns(UserWarning):  # DCP: no process group, and an existing checkpoint overwritten
        dcp.save(state, checkpoint_id=checkpoint, no_dist=True)
    return r"holds a value for optimizer\.param_groups\.0\.lr that is not plain data.*nothing in it was run"


def meta_of_the_wrong_shape(checkpoint: Path, marker: Path, model, optimizer) -> str:
    (checkpoint / "meta.json").write_text("[1, 2, 3]")  # valid JSON, not a checkpoint's
    return r"meta\.json is damaged: a JSON list instead of an object"


def interpolation_in_config(checkpoint: Path, marker: Path, model, optimizer) -> str:
    config = checkpoint / "config.yaml"
    config.write_text(config.read_text().replace("dataset_path: synthetic:size=32",
                                                 "dataset_path: ${oc.env:HOME}"))
    return r"config\.yaml: line \d+ holds an interpolation \$\{\.\.\.\}.*edited or crafted"


def config_that_is_no_config(checkpoint: Path, marker: Path, model, optimizer) -> str:
    (checkpoint / "config.yaml").write_text(f"- !!python/object/apply:os.system ['touch {marker}']\n- 2\n")
    return r"config\.yaml(: could not parse YAML| is not the config a dinoreg checkpoint holds)"


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
EVERY_FOLDER_ENTRY = list(FOLDER_ENTRY_POINTS)
# input kind -> (how the folder is made hostile, the entry points that read that part of a checkpoint)
FOLDER_INPUTS = {
    "crafted .metadata": (crafted_metadata, EVERY_FOLDER_ENTRY),
    "crafted rng state": (crafted_rng, ["resume"]),  # only a resume restores RNG states
    "crafted optimizer value": (crafted_value, ["resume"]),  # only a resume reads the optimizer
    "meta.json of the wrong shape": (meta_of_the_wrong_shape, EVERY_FOLDER_ENTRY),
    "interpolation in config.yaml": (interpolation_in_config, ["export", "train.init_from", "distillation.teacher"]),
    "config.yaml that is no config": (config_that_is_no_config,
                                      ["resume", "export", "train.init_from", "distillation.teacher"]),
}
FOLDER_TABLE = [(kind, entry) for kind, (_, entries) in FOLDER_INPUTS.items() for entry in entries]


@pytest.mark.parametrize("kind, entry", FOLDER_TABLE, ids=[f"{kind}->{entry}" for kind, entry in FOLDER_TABLE])
def test_a_hostile_checkpoint_folder_runs_nothing_and_is_named_in_one_line(good_run, tmp_path, capsys, kind, entry):
    source, model, optimizer = good_run
    run = tmp_path / "shared_run"
    shutil.copytree(source, run)
    marker = tmp_path / "code_ran"
    pattern = FOLDER_INPUTS[kind][0](run / CHECKPOINT_DIR / "1", marker, model, optimizer)
    _rechecksum(run / CHECKPOINT_DIR / "1")
    capsys.readouterr()
    _, line = answer(FOLDER_ENTRY_POINTS[entry](run, tmp_path), capsys)
    assert not marker.exists(), "the crafted pickle ran"
    assert re.search(pattern, line), line
    assert str(run / CHECKPOINT_DIR / "1") in line
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "new" / CHECKPOINT_DIR).exists()


# ------------------------------------------------------------------------------------------ weights files


def _backbone_state():
    model = build_backbone("vit_small", embed_dim=32, depth=2, num_heads=2, patch_size=16, img_size=32)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def text_pth(path, marker):
    path.write_text("not weights\n")


def empty_safetensors(path, marker):
    path.write_bytes(b"")


def truncated_pth(path, marker):
    torch.save(_backbone_state(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def truncated_safetensors(path, marker):
    save_file(_backbone_state(), str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def mistyped_architecture(path, marker):
    save_file(_backbone_state(), str(path), metadata={"dinoreg_arch": json.dumps({"depth": "2"})})


def crafted_torch_file(path, marker):
    torch.save({"model": _backbone_state(), "extra": RunsCode(marker)}, path)


def crafted_pickle(path, marker):
    path.write_bytes(pickle.dumps({"model": RunsCode(marker)}))


# input kind -> (how the file is made, its suffix, what the line says is wrong, and more it must say)
REFUSED = ("holds pickled objects other than tensors and plain values (", "refused unread, nothing in it was run")
WEIGHTS_FILES = {
    "text": (text_pth, ".pth", ("is neither a torch nor a safetensors file: it starts with b'not weights",)),
    "empty": (empty_safetensors, ".safetensors", ("is empty (0 bytes)",)),
    "truncated .pth": (truncated_pth, ".pth", ("is a truncated or damaged torch file",)),
    "truncated .safetensors": (truncated_safetensors, ".safetensors", ("is not a complete safetensors file",)),
    "mistyped architecture": (mistyped_architecture, ".safetensors",
                              ("has dinoreg_arch entries of the wrong type: depth='2'",)),
    "crafted torch file": (crafted_torch_file, ".pth", (*REFUSED, "GLOBAL posix.system")),
    "crafted pickle": (crafted_pickle, ".pth", REFUSED),
}
# entry point -> (the command line given the file and a scratch folder, how the line starts before the file)
WEIGHTS_ENTRY_POINTS = {
    key: (lambda path, tmp, key=key, extra=extra: ["train", "--output-dir", str(tmp / "run"), *RUN, f"{key}={path}",
                                                   *extra], f"dinoreg train: {key}: ")
    for key, extra in (("train.init_from", []), ("student.pretrained_weights", []),
                       ("distillation.teacher", ["distillation.enabled=true"]))
}
WEIGHTS_ENTRY_POINTS["eval knn --weights"] = (
    lambda path, tmp: ["eval", "knn", "--weights", str(path), "--data", "synthetic:size=16,image_size=16",
                       "--output-dir", str(tmp / "eval")], "dinoreg eval knn: error: --weights ")
WEIGHTS_TABLE = [(kind, entry) for kind in WEIGHTS_FILES for entry in WEIGHTS_ENTRY_POINTS]


@pytest.mark.parametrize("kind, entry", WEIGHTS_TABLE, ids=[f"{kind}->{entry}" for kind, entry in WEIGHTS_TABLE])
def test_a_bad_weights_file_is_one_line_naming_where_it_was_given_and_the_file(kind, entry, tmp_path, capsys):
    make, suffix, (problem, *more) = WEIGHTS_FILES[kind]
    path, marker = tmp_path / f"weights{suffix}", tmp_path / "code_ran"
    make(path, marker)
    command, named = WEIGHTS_ENTRY_POINTS[entry]
    code, line = answer(command(path, tmp_path), capsys)
    assert not marker.exists(), "the crafted pickle ran"
    assert code == 2 and line.startswith(f"{named}{path} {problem}"), line
    assert all(text in line for text in more) and "; give " in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_real_entry_point_answers_a_crafted_file_in_one_line_and_runs_nothing(good_run, tmp_path):
    """The table runs commands in this process; once through ``python -m dinoreg`` as users do."""
    run, marker = tmp_path / "shared_run", tmp_path / "code_ran"
    shutil.copytree(good_run[0], run)
    crafted_metadata(run / CHECKPOINT_DIR / "1", marker, None, None)
    _rechecksum(run / CHECKPOINT_DIR / "1")
    result = subprocess.run([sys.executable, "-m", "dinoreg", "train", "--output-dir", str(tmp_path / "new"), *RUN,
                             f"train.init_from={run}"], env=subprocess_env(), capture_output=True, text=True,
                            timeout=300)
    assert not marker.exists(), "the crafted pickle ran"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode in (1, 2) and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert ".metadata holds a reference to posix.system" in lines[0], lines[0]
