"""How a run ends (the final checkpoint and the teacher file are switches), where its first weights are drawn
(``train.initialisation``) and FSDP2 in one process (``train.fsdp=always``): what a benchmark or a one-GPU check
needs, each useful to users too."""

import json

import pytest
import torch
from torch.distributed.tensor import DTensor

from dinoreg.config import load_config
from dinoreg.distributed import DistributedEnvironment
from dinoreg.run_dir import BACKBONE_FILE
from dinoreg.train import build, loop
from dinoreg.train.checkpoint import checkpoint_dirs
from dinoreg.train.loop import train

FAST = ["student.embed_dim=64", "student.num_heads=2", "student.depth=2", "crops.global_crops_size=32",
        "crops.local_crops_size=16", "crops.local_crops_number=2", "train.batch_size_per_gpu=4",
        "train.num_workers=0", "dino.head_n_prototypes=128", "ibot.head_n_prototypes=128",
        "evaluation.knn_enabled=false", "monitor.period=0", "optim.epochs=1", "train.epoch_length=3",
        "optim.warmup_epochs=0", "train.log_every=1"]


def losses(directory):
    rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return [row["total_loss"] for row in rows if "total_loss" in row]


def test_the_final_checkpoint_and_the_teacher_file_are_switches(tmp_path):
    """period 0 saves at the end only (as the schema says); save_final=false and export_teacher=false keep
    nothing at the end, while the periodic checkpoints are still written."""
    train(load_config("tiny_cpu", [*FAST, f"train.output_dir={tmp_path / 'end'}", "checkpoint.period=0"]))
    assert [c.name for c in checkpoint_dirs(tmp_path / "end")] == ["3"]
    assert (tmp_path / "end" / BACKBONE_FILE).is_file()
    train(load_config("tiny_cpu", [*FAST, f"train.output_dir={tmp_path / 'none'}", "checkpoint.period=2",
                                   "checkpoint.save_final=false", "checkpoint.export_teacher=false"]))
    assert [c.name for c in checkpoint_dirs(tmp_path / "none")] == ["2"]
    assert not (tmp_path / "none" / BACKBONE_FILE).exists()
    assert len(losses(tmp_path / "none")) == 3  # the run itself is whole


def test_device_initialisation_builds_on_the_device_without_a_cpu_draw(monkeypatch):
    """train.initialisation=device: every initial draw happens on the training device (here the meta device,
    where nothing is allocated), none on the CPU; the default draws on the CPU."""
    devices = []
    trunc_normal = torch.nn.init.trunc_normal_

    def record(tensor, *args, **kwargs):
        devices.append(tensor.device.type)
        return trunc_normal(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "trunc_normal_", record)
    cfg = load_config("tiny_cpu", [*FAST, "train.initialisation=device"])
    model, _ = build.build_model_and_optimizer(cfg, DistributedEnvironment(), torch.device("meta"))
    assert devices and set(devices) == {"meta"}
    assert {p.device.type for p in model.parameters()} == {"meta"}
    devices.clear()
    build.build_model_and_optimizer(load_config("tiny_cpu", FAST), DistributedEnvironment(), torch.device("cpu"))
    # every build starts on the meta device (issue 26), where the constructors' calls draw nothing: the draws are
    # those on the CPU
    assert "cpu" in devices and set(devices) == {"cpu", "meta"}


def test_fsdp_in_one_process_trains_as_the_unsharded_run(tmp_path, monkeypatch):
    """train.fsdp=always in one process: DTensor parameters under a process group of one, fused AdamW on them,
    the start drawn on the device; the losses are those of the plain one-process run."""
    built = []
    original = loop.build_model_and_optimizer

    def keep(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(loop, "build_model_and_optimizer", keep)
    train(load_config("tiny_cpu", [*FAST, f"train.output_dir={tmp_path / 'plain'}"]))
    plain_model, plain_optimizer = built[-1]
    assert not any(isinstance(p, DTensor) for p in plain_model.parameters())
    train(load_config("tiny_cpu", [*FAST, f"train.output_dir={tmp_path / 'fsdp'}", "train.fsdp=always",
                                   "optim.adamw_implementation=fused", "train.initialisation=device"]))
    model, optimizer = built[-1]
    assert all(isinstance(p, DTensor) and p.device_mesh.size() == 1 for p in model.student.parameters())
    assert all(group["fused"] for group in optimizer.param_groups)
    assert not torch.distributed.is_initialized()  # the group of one is gone with the run
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
