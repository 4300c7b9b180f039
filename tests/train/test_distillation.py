"""Distillation: a frozen teacher (another architecture, read from a file with its heads) gives the DINO and iBOT
targets; the student learns; the EMA of the student is evaluated, checkpointed and exported; resume is exact."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from dist_step_worker import global_batch, rank_share
from launch_helpers import TINY, subprocess_env, torchrun
from test_checkpoint import losses_by_iteration

from dinoreg import load_backbone
from dinoreg.config import load_config
from dinoreg.data import MASK_FIELDS
from dinoreg.distributed import DistributedEnvironment
from dinoreg.models import DINOHead
from dinoreg.models.weights import read_heads
from dinoreg.run_dir import BACKBONE_FILE, CHECKPOINT_DIR
from dinoreg.train.build import build_model_and_optimizer
from dinoreg.train.checkpoint_reader import CheckpointReader

RUN = [*TINY, "train.batch_size_per_gpu=8", "train.num_workers=0", "optim.epochs=2", "train.epoch_length=3",
       "evaluation.knn_enabled=false", "monitor.period=0"]
STUDENT = ["student.embed_dim=16", "student.depth=1", "student.num_register_tokens=2"]  # smaller, with registers


def dinoreg(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "dinoreg", *map(str, args)], env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert not check or result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A trained ViT (width 32, 2 blocks, no registers) exported with its heads."""
    root = tmp_path_factory.mktemp("teacher")
    dinoreg("train", "--output-dir", root / "run", *RUN, "student.num_register_tokens=0")
    dinoreg("export", root / "run", "--format", "safetensors", "--with-heads", "--output", root / "teacher.safetensors")
    return root / "teacher.safetensors"


def distill(teacher_file, *more):
    return [*RUN, *STUDENT, "distillation.enabled=true", f"distillation.teacher={teacher_file}", *more]


def test_targets_come_from_the_frozen_teacher(teacher_file):
    cfg = load_config("tiny_cpu", distill(teacher_file))
    torch.manual_seed(0)
    model, optimizer = build_model_and_optimizer(cfg, DistributedEnvironment(), torch.device("cpu"))
    batch = rank_share(global_batch(0, cfg), 0, 1)
    with torch.no_grad():  # the private _teacher_targets takes the target teacher's outputs
        teacher_out = model.target_teacher["backbone"](batch.global_crops, is_training=True)
    probs, patch_probs, _ = model._teacher_targets(teacher_out, batch.mask_indices, batch.n_masked_patches,
                                                   teacher_temp=0.04)
    # by hand, from the file: the teacher's cls tokens with the views swapped, its DINO head (which scores the masked
    # patches too: it has no separate iBOT head), a softmax at the teacher temperature (the centre starts at 0)
    frozen = load_backbone(teacher_file)
    head = DINOHead(32, 64, hidden_dim=64, bottleneck_dim=32)
    head.load_state_dict(read_heads(teacher_file)["dino_head"], strict=True)
    with torch.no_grad():
        out = frozen(batch.global_crops, is_training=True)
        view1, view2 = out["x_norm_clstoken"].chunk(2)
        expected = torch.softmax(head(torch.cat([view2, view1])) / 0.04, dim=-1)
        patches = out["x_norm_patchtokens"].flatten(0, 1)[batch.mask_indices]
        expected_patches = torch.softmax(head(patches) / 0.04, dim=-1)
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(patch_probs, expected_patches, rtol=0, atol=1e-6)
    # frozen: no gradient, no optimizer state; the student and its EMA have the student's size
    assert not any(p.requires_grad for p in model.distillation_teacher.parameters())
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in model.distillation_teacher.parameters())
    assert model.teacher_backbone.embed_dim == 16 and model.distillation_teacher["backbone"].embed_dim == 32

    with pytest.raises(ValueError, match="dino_head: the teacher scores 64 prototypes, the student 32"):
        build_model_and_optimizer(load_config("tiny_cpu", distill(teacher_file, "dino.head_n_prototypes=32")),
                                  DistributedEnvironment(), torch.device("cpu"))
    dinoreg("export", teacher_file.parent / "run", "--format", "safetensors", "--output",
            teacher_file.with_name("plain.safetensors"))
    with pytest.raises(ValueError, match="holds a backbone but no DINO/iBOT heads"):
        build_model_and_optimizer(load_config("tiny_cpu", distill(teacher_file.with_name("plain.safetensors"))),
                                  DistributedEnvironment(), torch.device("cpu"))


def test_as_in_dinov2_the_student_sees_every_patch_unless_asked_to_mask(teacher_file):
    """distillation.mask_student=false (the default): no iBOT masking; the loss scores every patch, so the
    batch's masks change nothing. With masking they do."""
    for mask_student in (False, True):
        cfg = load_config("tiny_cpu", distill(teacher_file, f"distillation.mask_student={mask_student}",
                                              "train.centering=sinkhorn_knopp"))  # no centre carried between calls
        torch.manual_seed(0)
        model, _ = build_model_and_optimizer(cfg, DistributedEnvironment(), torch.device("cpu"))
        batch, other = rank_share(global_batch(0, cfg), 0, 1), rank_share(global_batch(5, cfg), 0, 1)
        other = batch.replace(**{k: getattr(other, k) for k in MASK_FIELDS})
        assert not torch.equal(batch.masks, other.masks)
        with torch.no_grad():
            losses = [model.forward_loss(b, teacher_temp=0.04)[1]["ibot_loss"] for b in (batch, other)]
        assert torch.equal(*losses) != mask_student, mask_student


def saved_keys(checkpoint):
    return set(dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)


def test_a_distillation_run_keeps_its_teacher_exports_the_student_ema_and_resumes_bitwise(teacher_file, tmp_path):
    run = tmp_path / "run"
    dinoreg("train", "--output-dir", run, *distill(teacher_file, "checkpoint.period=3"))
    final = run / CHECKPOINT_DIR / "6"
    frozen = CheckpointReader(final).weights(part="distillation_teacher")
    file_backbone, file_heads = load_backbone(teacher_file).state_dict(), read_heads(teacher_file)
    assert all(torch.equal(frozen.backbone[k], v) for k, v in file_backbone.items())  # unchanged by 6 iterations
    assert all(torch.equal(frozen.heads["dino_head"][k], v) for k, v in file_heads["dino_head"].items())
    keys = saved_keys(final)
    assert any(k.startswith("optimizer.state.student.") for k in keys)
    assert not any(k.startswith("optimizer.") and "distillation_teacher" in k for k in keys)

    # the export (and the run's own teacher file) is the student EMA; --part student the raw student
    ema, student = CheckpointReader(final).weights(), CheckpointReader(final).weights(part="student")
    dinoreg("export", run, "--format", "safetensors", "--output", tmp_path / "ema.safetensors")
    dinoreg("export", run, "--format", "safetensors", "--part", "student", "--output", tmp_path / "raw.safetensors")
    for path, expected in ((tmp_path / "ema.safetensors", ema), (run / BACKBONE_FILE, ema),
                           (tmp_path / "raw.safetensors", student)):
        exported = load_backbone(path)
        assert exported.embed_dim == 16 and exported.num_register_tokens == 2
        assert all(torch.equal(exported.state_dict()[k], v) for k, v in expected.backbone.items()), path
    assert not torch.equal(ema.backbone["cls_token"], student.backbone["cls_token"])

    # resumed from iteration 3: the same losses, bitwise
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / CHECKPOINT_DIR / "6")
    (resumed / CHECKPOINT_DIR / "latest").write_text("3\n")
    result = dinoreg("train", "--output-dir", resumed, *distill(teacher_file, "checkpoint.period=3"))
    assert "resumed from" in result.stdout + result.stderr
    assert losses_by_iteration(resumed) == losses_by_iteration(run)


def test_two_ranks_start_from_the_one_process_values_with_the_teacher_sharded(teacher_file, tmp_path):
    overrides = distill(teacher_file, "train.sharding=full_shard")
    torch.manual_seed(0)
    model, _ = build_model_and_optimizer(load_config("tiny_cpu", overrides), DistributedEnvironment(),
                                         torch.device("cpu"))
    reference = model.state_dict()
    out = tmp_path / "start.pt"
    result = torchrun(2, str(Path(__file__).parent / "start_worker.py"), str(out), *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    started = torch.load(out, weights_only=False)
    assert any(k.startswith("distillation_teacher.") for k in started["state"])
    assert [k for k in reference if not torch.equal(started["state"][k], reference[k])] == []
    # and a 2-rank distillation run trains, its teacher intact
    run = tmp_path / "run2"
    result = torchrun(2, "-m", "dinoreg", "train", "--output-dir", str(run), *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    frozen = CheckpointReader(run / CHECKPOINT_DIR / "6").weights(part="distillation_teacher")
    assert all(torch.equal(frozen.backbone[k], v) for k, v in load_backbone(teacher_file).state_dict().items())


def test_the_distillation_recipe_is_dinov2s_setting_and_fits_a_vitg14_reg4_teacher():
    from dinoreg.train.features.distillation import check_distillation_teacher
    from dinoreg.train.build import build_ssl_model

    cfg = load_config("vits14_reg4_distill_from_vitg14", ["distillation.teacher=runs/vitg14_reg4"])
    assert cfg.distillation.enabled and not cfg.distillation.mask_student  # no masking: iBOT on every patch
    assert (cfg.student.arch, cfg.student.patch_size, cfg.student.num_register_tokens) == ("vit_small", 14, 4)
    assert cfg.student.drop_path_rate == 0  # no stochastic depth
    with torch.device("meta"):  # the real sizes, no memory: the teacher's heads against the student's
        teacher = build_ssl_model(load_config("vitg14_reg4", ["student.depth=1"]), load_pretrained=False).teacher
        student = build_ssl_model(load_config("vits14_reg4_distill_from_vitg14", ["distillation.enabled=false"]),
                                  load_pretrained=False).student
    check_distillation_teacher(teacher, student, patch_size=14)
    with pytest.raises(Exception, match="distillation.teacher"):
        load_config("vits14_reg4_distill_from_vitg14")  # the teacher must be named


def test_a_bf16_distillation_step_keeps_the_frozen_teacher_in_fp32_and_unchanged(teacher_file, tmp_path):
    # bf16 autocast on this CPU is slow: two tiny iterations
    run = tmp_path / "bf16"
    dinoreg("train", "--output-dir", run, *distill(teacher_file, "train.precision=bf16", "optim.epochs=1",
                                                     "train.epoch_length=2"))
    rows = losses_by_iteration(run)
    assert sorted(rows) == [0, 1] and all(0 < row["total_loss"] < 100 for row in rows.values())
    frozen = CheckpointReader(run / CHECKPOINT_DIR / "2").weights(part="distillation_teacher")
    file_backbone = load_backbone(teacher_file).state_dict()
    assert all(frozen.backbone[k].dtype == torch.float32 and torch.equal(frozen.backbone[k], v)
               for k, v in file_backbone.items())
    # the student's master weights stay fp32 too, and moved
    student = CheckpointReader(run / CHECKPOINT_DIR / "2").weights(part="student")
    assert student.backbone["cls_token"].dtype == torch.float32
