"""Continued pretraining: heads in exports (our safetensors, the official teacher-checkpoint layout), a start from a
backbone with its heads (train.init_from) checked strictly, and the head warm-up that freezes both backbones."""

import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from dist_step_worker import global_batch, rank_share
from launch_helpers import TINY, subprocess_env
from test_checkpoint import losses_by_iteration
from torch import nn

from dinoreg import load_backbone
from dinoreg.config import load_config
from dinoreg.distributed import DistributedEnvironment
from dinoreg.models.weights import CheckpointMismatchError, read_heads
from dinoreg.run_dir import CHECKPOINT_DIR
from dinoreg.train.build import build_model_and_optimizer
from dinoreg.train.loop import train_step
from dinoreg.train.checkpoint_reader import CheckpointReader

RUN = [*TINY, "train.batch_size_per_gpu=8", "train.num_workers=0", "optim.epochs=2", "train.epoch_length=3",
       "evaluation.knn_enabled=false", "monitor.period=0", "optim.freeze_last_layer_epochs=0"]


class OfficialDINOHead(nn.Module):
    """dinov2/layers/dino_head.py, restated: the deprecated weight_norm hook (weight_g, weight_v)."""

    def __init__(self, in_dim, out_dim, nlayers=3, hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden_dim, bottleneck_dim))
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-12))


def dinoreg(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "dinoreg", *map(str, args)], env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert not check or result.returncode == 0, result.stdout + result.stderr
    return result


def build(*overrides):
    cfg = load_config("tiny_cpu", [*RUN, *overrides])
    torch.manual_seed(0)
    return build_model_and_optimizer(cfg, DistributedEnvironment(), torch.device("cpu"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short run with a separate iBOT head, and its teacher exported with heads in both layouts."""
    root = tmp_path_factory.mktemp("trained")
    dinoreg("train", "--output-dir", root / "run", *RUN, "ibot.separate_head=true")
    for fmt, name in (("safetensors", "heads.safetensors"), ("dinov2", "heads.pth")):
        dinoreg("export", root / "run", "--format", fmt, "--with-heads", "--output", root / name)
    return root


def test_exports_with_heads_hold_the_checkpoints_heads_and_still_load_as_backbones(trained):
    saved = CheckpointReader(sorted((trained / "run" / CHECKPOINT_DIR).glob("[0-9]*"))[-1]).weights()
    assert sorted(saved.heads) == ["dino_head", "ibot_head"]
    official = torch.load(trained / "heads.pth", weights_only=True)["teacher"]  # the official teacher layout
    assert "dino_head.last_layer.weight_g" in official and "backbone.cls_token" in official
    assert "dino_head.last_layer.parametrizations.weight.original0" not in official
    for name in ("heads.safetensors", "heads.pth"):
        heads = read_heads(trained / name)
        for head, state in saved.heads.items():
            assert heads[head].keys() == state.keys()
            assert all(torch.equal(heads[head][k], v) for k, v in state.items()), (name, head)
        backbone = load_backbone(trained / name, **({"num_heads": 2} if name.endswith(".pth") else {}))
        assert all(torch.equal(backbone.state_dict()[k], v) for k, v in saved.backbone.items()), name
    refused = dinoreg("export", trained / "run", "--format", "hf", "--with-heads", "--output", trained / "hf",
                      check=False)
    assert refused.returncode == 1 and "--with-heads writes safetensors or dinov2" in refused.stderr
    assert not (trained / "hf").exists()


@pytest.mark.parametrize("source", ["run", "heads.safetensors", "heads.pth"])
def test_init_from_starts_student_and_teacher_from_backbone_and_heads(trained, source):
    saved = CheckpointReader(sorted((trained / "run" / CHECKPOINT_DIR).glob("[0-9]*"))[-1]).weights()
    model, _ = build("ibot.separate_head=true", f"train.init_from={trained / source}")
    for part in (model.student, model.teacher):
        state = part.state_dict()
        for name, value in saved.backbone.items():
            assert torch.equal(state[f"backbone.{name}"], value), name
        for head, values in saved.heads.items():
            for name, value in values.items():
                assert torch.equal(state[f"{head}.{name}"], value), (head, name)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")  # the official head's hook
def test_official_teacher_checkpoint_heads_load_strictly_and_score_the_same(tmp_path):
    model, _ = build()
    torch.manual_seed(3)
    official = OfficialDINOHead(32, 64, hidden_dim=64, bottleneck_dim=32)
    backbone = {f"backbone.{k}": v + 1 for k, v in model.student["backbone"].state_dict().items()}
    torch.save({"teacher": {**backbone, **{f"dino_head.{k}": v for k, v in official.state_dict().items()}}},
               tmp_path / "teacher_checkpoint.pth")
    started, _ = build(f"train.init_from={tmp_path / 'teacher_checkpoint.pth'}")
    x = torch.randn(5, 32)
    with torch.no_grad():
        for part in (started.student, started.teacher):
            torch.testing.assert_close(part["dino_head"](x), official(x), rtol=0, atol=1e-6)
            assert torch.equal(part["backbone"].cls_token, backbone["backbone.cls_token"])

    wider = OfficialDINOHead(32, 128, hidden_dim=64, bottleneck_dim=32)  # 128 prototypes; the config has 64
    torch.save({"teacher": {**backbone, **{f"dino_head.{k}": v for k, v in wider.state_dict().items()}}},
               tmp_path / "wider.pth")
    with pytest.raises(CheckpointMismatchError) as error:
        build(f"train.init_from={tmp_path / 'wider.pth'}")
    message = str(error.value)
    assert "dino_head.last_layer.parametrizations.weight.original1: train.init_from (128, 32)" in message
    assert "n_prototypes': 128" in message and "dino.head_n_prototypes" in message
    torch.save({"teacher": backbone}, tmp_path / "backbone_only.pth")
    with pytest.raises(ValueError, match="holds a backbone but no DINO/iBOT heads.*student.pretrained_weights"):
        build(f"train.init_from={tmp_path / 'backbone_only.pth'}")
    with pytest.raises(Exception, match="train.init_from.*not both"):
        load_config("tiny_cpu", [f"train.init_from={tmp_path / 'wider.pth'}", "student.pretrained_weights=x.pth"])


def test_head_warm_up_freezes_exactly_the_backbones_for_exactly_its_iterations(trained, tmp_path):
    run = tmp_path / "warm"
    dinoreg("train", "--output-dir", run, *RUN, f"student.pretrained_weights={trained / 'heads.safetensors'}",
            "optim.head_warmup_iterations=3", "checkpoint.period=1", "checkpoint.keep_last=10")
    start = load_backbone(trained / "heads.safetensors").state_dict()
    checkpoints = {int(path.name): CheckpointReader(path).weights() for path in (run / CHECKPOINT_DIR).glob("[0-9]*")}
    students = {it: CheckpointReader(run / CHECKPOINT_DIR / str(it)).weights(part="student") for it in checkpoints}
    assert sorted(checkpoints) == [1, 2, 3, 4, 5, 6]
    for it in (1, 2, 3):  # after 1, 2 and 3 iterations: both backbones as they started
        for weights in (checkpoints[it], students[it]):
            assert all(torch.equal(weights.backbone[k], v) for k, v in start.items()), it
    for weights in (checkpoints, students):  # while the heads learn (the teacher's by EMA)
        assert not torch.equal(weights[3].heads["dino_head"]["mlp.0.weight"], weights[1].heads["dino_head"]["mlp.0.weight"])
    for it in (4, 5, 6):  # then both backbones move
        for weights in (checkpoints[it], students[it]):
            assert not torch.equal(weights.backbone["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])

    # resumed inside the warm-up (the frozen backbones have no AdamW state there): the same losses, bitwise
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    for it in (3, 4, 5, 6):
        shutil.rmtree(resumed / CHECKPOINT_DIR / str(it))
    (resumed / CHECKPOINT_DIR / "latest").write_text("2\n")
    dinoreg("train", "--output-dir", resumed, *RUN, f"student.pretrained_weights={trained / 'heads.safetensors'}",
            "optim.head_warmup_iterations=3", "checkpoint.period=1", "checkpoint.keep_last=10")
    assert losses_by_iteration(resumed) == losses_by_iteration(run)


def test_a_warm_up_step_gives_the_backbones_no_gradient_update_or_optimizer_state():
    cfg = load_config("tiny_cpu", RUN)
    model, optimizer = build()
    values = {"lr": 1e-3, "last_layer_lr": 1e-3, "weight_decay": 0.04, "momentum": 0.9, "teacher_temp": 0.04}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, norms = train_step(model, optimizer, rank_share(global_batch(0, cfg), 0, 1), values, clip_grad=3.0,
                          freeze_backbones=True)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not [k for k in changed if ".backbone." in f".{k}"]
    assert {"student.dino_head.mlp.0.weight", "teacher.dino_head.mlp.0.weight"} <= changed
    backbone = list(model.student["backbone"].parameters())
    assert not any(p in optimizer.state for p in backbone)  # no AdamW moments: later steps start them fresh
    assert all(p in optimizer.state for p in model.student["dino_head"].parameters())
    assert float(norms["backbone"]) == 0 and float(norms["dino_head"]) > 0
    train_step(model, optimizer, rank_share(global_batch(1, cfg), 0, 1), values, clip_grad=3.0)
    assert not torch.equal(model.student["backbone"].cls_token, before["student.backbone.cls_token"])
    assert not torch.equal(model.teacher["backbone"].cls_token, before["teacher.backbone.cls_token"])
