"""Continued pretraining of part of the backbone (dinoreg.train.features.partial_training): optim.freeze,
optim.train_last_blocks and optim.unfreeze_ramp_iterations, alone and with the head warm-up, for both backbone
families; every tensor of student and teacher compared before and after a few steps of the real loop."""

import json
import shutil

import pytest
import torch
from launch_helpers import TINY
from test_checkpoint import losses_by_iteration
from test_continue import dinoreg

from dinoreg import load_backbone
from dinoreg.config import ConfigError, build_backbone_from_config, load_config
from dinoreg.distributed import DistributedEnvironment
from dinoreg.models.weights import save_backbone
from dinoreg.run_dir import CHECKPOINT_DIR
from dinoreg.train.build import build_model_and_optimizer
from dinoreg.train.checkpoint_reader import CheckpointReader
from dinoreg.train.features.partial_training import partial_training
from dinoreg.train.loop import iterate, set_up
from dinoreg.train.optim import apply_optim_schedule, separate_backbone_groups

# 4 iterations of a depth-2 backbone, every parameter decayed or learning (no last-layer freeze)
RUN = [*TINY, "train.batch_size_per_gpu=8", "train.num_workers=0", "optim.epochs=2", "train.epoch_length=2",
       "optim.warmup_epochs=0", "evaluation.knn_enabled=false", "monitor.period=0", "optim.freeze_last_layer_epochs=0",
       "checkpoint.period=0", "checkpoint.save_final=false", "checkpoint.export_teacher=false",
       "student.num_register_tokens=2"]
FAMILIES = {"learned": ("tiny_cpu", []), "rope": ("tiny_rope_cpu", ["student.patch_size=8"])}
EMBEDDINGS = {"learned": {"cls_token", "pos_embed", "register_tokens", "mask_token"},
              "rope": {"cls_token", "storage_tokens", "mask_token"}}
PATCH_EMBED = {"patch_embed.proj.weight", "patch_embed.proj.bias"}


def moved_after_training(tmp_path, family, *overrides):
    """``(backbone names, moved student backbone names, moved teacher backbone names, model, optimizer)`` after the
    run's iterations, by the loop itself; asserts that every head parameter moved in both."""
    config, extra = FAMILIES[family]
    cfg = load_config(config, [*RUN, *extra, f"train.output_dir={tmp_path}", *overrides])
    torch.manual_seed(0)
    run = set_up(cfg, DistributedEnvironment(), torch.device("cpu"), resume=False, allow_config_change=False)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    iterate(run)
    run.logger.close()
    after = run.model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    heads = [k for k in before if k.startswith(("student.dino_head.", "student.ibot_head."))
             and "weight_g" not in k]
    assert heads and all(k in moved and k.replace("student.", "teacher.") in moved for k in heads)
    names = {k.removeprefix("student.backbone.") for k in before if k.startswith("student.backbone.")
             and k.removeprefix("student.backbone.") in dict(run.model.student["backbone"].named_parameters())}
    moved_in = {who: {k.removeprefix(f"{who}.backbone.") for k in moved if k.startswith(f"{who}.backbone.")}
                for who in ("student", "teacher")}
    return names, moved_in["student"], moved_in["teacher"], run.model, run.optimizer


@pytest.mark.parametrize("family, warmup", [("learned", 2), ("rope", 0)])
def test_frozen_parts_never_move_in_student_or_teacher_and_everything_else_does(tmp_path, family, warmup):
    registers = "register_tokens" if family == "learned" else "storage_tokens"
    alias = "storage_tokens" if family == "learned" else "register_tokens"  # either name, either family
    freeze = ["patch_embed", "cls_token", alias, "mask_token"] + (["pos_embed"] if family == "learned" else [])
    names, student, teacher, model, optimizer = moved_after_training(
        tmp_path, family, f"optim.freeze=[{','.join(freeze)}]", f"optim.head_warmup_iterations={warmup}")
    frozen = PATCH_EMBED | EMBEDDINGS[family]
    assert registers in frozen and frozen <= names
    assert student == teacher == names - frozen
    parameters = dict(model.student["backbone"].named_parameters())
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name in frozen:  # no gradient, no optimiser group (no weight decay), no AdamW state
        assert parameters[name].grad is None and id(parameters[name]) not in optimized
        assert parameters[name] not in optimizer.state
        assert torch.equal(parameters[name], dict(model.teacher["backbone"].named_parameters())[name])


def test_train_last_blocks_trains_those_blocks_the_final_norm_and_the_heads(tmp_path):
    names, student, teacher, _, optimizer = moved_after_training(
        tmp_path, "learned", "optim.train_last_blocks=1", "optim.layerwise_decay=0.5")
    trained = {n for n in names if n.startswith(("blocks.1.", "norm."))}
    assert trained and student == teacher == trained
    # the layer-wise decay of what trains is that of a full run: block 1 at 0.5, the final norm at 1
    lr = {name.removeprefix("backbone."): group["lr_multiplier"] for group in optimizer.param_groups
          for name in group["names"] if name.startswith("backbone.")}
    assert set(lr) == trained
    assert {lr[n] for n in trained if n.startswith("blocks.1.")} == {0.5} and lr["norm.weight"] == 1.0


def test_last_blocks_of_a_rope_backbone_with_untied_norms_warm_up_and_ramp(tmp_path):
    """The untied cls norms train with the last block; the ramp's factor per iteration (logged) starts after the
    head warm-up, and each group's lr: the backbone's scaled, the heads' not."""
    names, student, teacher, _, optimizer = moved_after_training(
        tmp_path, "rope", "optim.train_last_blocks=1", "student.untie_cls_and_patch_norms=true",
        "student.untie_global_and_local_cls_norm=true", "optim.head_warmup_iterations=1",
        "optim.unfreeze_ramp_iterations=2")
    trained = {n for n in names if n.startswith(("blocks.1.", "norm.", "cls_norm.", "local_cls_norm."))}
    assert {"cls_norm.weight", "local_cls_norm.weight", "norm.weight"} <= trained
    assert student == teacher == trained
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scale = {row["iteration"]: row["backbone_lr_scale"] for row in rows if "backbone_lr_scale" in row}
    assert scale == {0: 0.0, 1: 0.5, 2: 1.0, 3: 1.0}  # iteration 0: the warm-up; 1, 2: the ramp's 2 iterations
    lr = {row["iteration"]: row["lr"] for row in rows if "lr" in row}
    for group in optimizer.param_groups:  # the last iteration's values, unscaled after the ramp
        assert group["lr"] == lr[3] * group["lr_multiplier"]
        assert {n.startswith("backbone.") for n in group["names"]} in ({True}, {False})
    apply_optim_schedule(optimizer, lr=1e-3, weight_decay=0.04, last_layer_lr=2e-3, backbone_lr_scale=0.25)
    for group in optimizer.param_groups:
        backbone = group["names"][0].startswith("backbone.")
        expected = (2e-3 if group["is_last_layer"] else 1e-3) * group["lr_multiplier"] * (0.25 if backbone else 1)
        assert group["lr"] == expected and group["weight_decay"] == 0.04 * group["wd_multiplier"]


def test_the_ramp_starts_at_the_end_of_the_head_warm_up_and_reaches_the_schedule_after_its_iterations():
    feature = partial_training(load_config("tiny_rope_cpu", ["optim.head_warmup_iterations=3",
                                                             "optim.unfreeze_ramp_iterations=4"]))
    assert [feature.values(it)["backbone_lr_scale"] for it in range(9)] == [0, 0, 0, 0.25, 0.5, 0.75, 1, 1, 1]
    assert partial_training(load_config("tiny_rope_cpu", ["optim.train_last_blocks=2"])).values(5) == {}
    assert partial_training(load_config("tiny_rope_cpu", ["optim.head_warmup_iterations=3"])) is None


def test_separating_the_backbone_groups_keeps_every_setting_and_a_mixed_group_refuses_a_scale():
    torch.manual_seed(0)
    model, optimizer = build_model_and_optimizer(load_config("tiny_cpu", RUN), DistributedEnvironment(),
                                                 torch.device("cpu"))
    mixed = [g for g in optimizer.param_groups if len({n.startswith("backbone.") for n in g["names"]}) == 2]
    assert mixed  # the final norm and the heads' biases share one group by default
    with pytest.raises(ValueError, match="separate_backbone_groups"):
        apply_optim_schedule(optimizer, lr=1.0, weight_decay=0.0, last_layer_lr=1.0, backbone_lr_scale=0.5)
    apply_optim_schedule(optimizer, lr=1.0, weight_decay=0.0, last_layer_lr=1.0)  # a scale of 1 needs no split
    before = {n: (p, {k: v for k, v in g.items() if k not in ("params", "names")})
              for g in optimizer.param_groups for n, p in zip(g["names"], g["params"])}
    separate_backbone_groups(optimizer)
    after = {n: (p, {k: v for k, v in g.items() if k not in ("params", "names")})
             for g in optimizer.param_groups for n, p in zip(g["names"], g["params"])}
    assert after.keys() == before.keys() and all(after[n][0] is before[n][0] for n in before)
    assert all(after[n][1] == before[n][1] for n in before)
    assert all(len({n.startswith("backbone.") for n in g["names"]}) == 1 for g in optimizer.param_groups)


def test_a_resume_inside_the_ramp_is_bitwise_and_frozen_parts_stay_the_started_backbones(tmp_path):
    """The CLI's run of a RoPE backbone from a backbone file (fresh heads), checkpoints every iteration, resumed
    after 2 (the head warm-up is 1, the ramp 2): the same losses and the same final state, bitwise."""
    config, extra = FAMILIES["rope"]
    start = tmp_path / "start.safetensors"
    torch.manual_seed(1)
    save_backbone(build_backbone_from_config(load_config(config, [*RUN, *extra]), stochastic_depth=False), start)
    args = ["--config", config, *RUN, *extra, f"student.pretrained_weights={start}", "optim.head_warmup_iterations=1",
            "optim.unfreeze_ramp_iterations=2", "optim.train_last_blocks=1", "optim.freeze=[patch_embed]",
            "checkpoint.period=1", "checkpoint.keep_last=10"]
    run = tmp_path / "run"
    dinoreg("train", "--output-dir", run, *args)
    first = load_backbone(start).state_dict()
    last, last_student = (CheckpointReader(run / CHECKPOINT_DIR / "4").weights(part=part)
                          for part in ("teacher", "student"))
    for name, value in first.items():  # block 0 and the embeddings: as loaded, in student and teacher
        if not name.startswith(("blocks.1.", "norm.")):
            assert torch.equal(last.backbone[name], value) and torch.equal(last_student.backbone[name], value), name
    assert not torch.equal(last.backbone["blocks.1.attn.qkv.weight"], first["blocks.1.attn.qkv.weight"])

    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    for it in (3, 4):
        shutil.rmtree(resumed / CHECKPOINT_DIR / str(it))
    (resumed / CHECKPOINT_DIR / "latest").write_text("2\n")
    dinoreg("train", "--output-dir", resumed, *args)
    assert losses_by_iteration(resumed) == losses_by_iteration(run)
    again = CheckpointReader(resumed / CHECKPOINT_DIR / "4").weights(part="student")
    assert all(torch.equal(again.backbone[k], v) for k, v in last_student.backbone.items())
    assert all(torch.equal(again.heads[h][k], v) for h in last_student.heads for k, v in last_student.heads[h].items())


@pytest.mark.parametrize("override, message", [
    ("optim.freeze=[patch_embed,blocks]", "optim.freeze: .*unknown blocks; allowed: patch_embed"),
    ("optim.freeze=[pos_embed]", "optim.freeze: .*RoPE backbone learns no position embedding: remove pos_embed"),
    ("optim.train_last_blocks=7", r"optim.train_last_blocks: got 7; must be in \[1, 6\]"),
    ("optim.train_last_blocks=0", r"optim.train_last_blocks: got 0; must be in \[1, 6\]"),
    ("optim.unfreeze_ramp_iterations=-1", "optim.unfreeze_ramp_iterations: got -1; must be >= 0"),
    ("student.num_register_tokens=0 optim.freeze=[register_tokens]", "no registers.*remove register_tokens"),
])
def test_bad_partial_training_keys_are_one_line_naming_the_fix(override, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config("tiny_rope_cpu", override.split())
    assert len(str(error.value).splitlines()) == 2  # the heading and the one problem
