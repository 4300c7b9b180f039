"""Parameter groups, AdamW, schedules and gradient clipping against hand-computed official values."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from dinoreg.models import build_backbone
from dinoreg.train.optim import (
    Schedules,
    apply_optim_schedule,
    build_optimizer,
    build_param_groups,
    clip_grad_norms_on_device,
    cosine_schedule,
    zero_first_iterations,
)

DEPTH = 3
DECAY = 0.9
PATCH_MULT = 0.2


class TinyHead(nn.Module):
    """The structure of DINOHead that parameter groups depend on: an MLP and a weight-normed last layer."""

    def __init__(self, in_dim: int = 32, out_dim: int = 7, bottleneck: int = 8) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, 16), nn.GELU(), nn.Linear(16, bottleneck))
        self.last_layer = weight_norm(nn.Linear(bottleneck, out_dim, bias=False))


def clip_grad_norms(student, max_norm):
    """The pre-clip norms read on the host, as floats (the loop keeps them on the device)."""
    return {key: float(norm) for key, norm in clip_grad_norms_on_device(student, max_norm).items()}


def make_student(ibot_head: bool = True) -> nn.ModuleDict:
    backbone = build_backbone("vit_small", embed_dim=32, depth=DEPTH, num_heads=2, patch_size=4, img_size=16,
                              num_register_tokens=2, init_values=1e-5)
    student = nn.ModuleDict({"backbone": backbone, "dino_head": TinyHead()})
    if ibot_head:
        student["ibot_head"] = TinyHead()
    return student


def groups_by_name(groups):
    return {name: group for group in groups for name in group["names"]}


@pytest.fixture(scope="module")
def student():
    return make_student()


@pytest.fixture(scope="module")
def groups(student):
    return build_param_groups(student, layerwise_decay=DECAY, patch_embed_lr_mult=PATCH_MULT)


# --- parameter groups ------------------------------------------------------------------------


def test_every_trainable_parameter_exactly_once(student, groups):
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in student.parameters()}
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in student.named_parameters())
    for g in groups:
        assert len(g["names"]) == len(g["params"])
        assert set(g) == {"params", "lr_multiplier", "wd_multiplier", "is_last_layer", "names"}


def test_groups_are_fused_by_multipliers_and_flag(groups):
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys))
    # tokens (wd 1) + patch embed (wd 0/1) + 3 blocks (wd 0/1) + final norm & heads (wd 0/1)
    # + the last layers (wd 1)
    assert len(groups) == 1 + 2 + 3 * 2 + 2 + 1


def test_weight_decay_multipliers(groups):
    by_name = groups_by_name(groups)
    no_decay = [
        "backbone.patch_embed.proj.bias",
        "backbone.blocks.0.norm1.weight", "backbone.blocks.0.norm1.bias",
        "backbone.blocks.1.norm2.weight", "backbone.blocks.2.attn.qkv.bias",
        "backbone.blocks.0.attn.proj.bias", "backbone.blocks.2.mlp.fc1.bias",
        "backbone.blocks.0.ls1.gamma", "backbone.blocks.2.ls2.gamma",
        "backbone.norm.weight", "backbone.norm.bias",
        "dino_head.mlp.0.bias", "ibot_head.mlp.2.bias",
    ]
    decay = [
        "backbone.patch_embed.proj.weight", "backbone.blocks.0.attn.qkv.weight",
        "backbone.blocks.1.attn.proj.weight", "backbone.blocks.2.mlp.fc2.weight",
        "backbone.cls_token", "backbone.pos_embed", "backbone.register_tokens", "backbone.mask_token",
        "dino_head.mlp.0.weight",
        "dino_head.last_layer.parametrizations.weight.original0",
        "dino_head.last_layer.parametrizations.weight.original1",
        "ibot_head.last_layer.parametrizations.weight.original0",
    ]
    assert {n: by_name[n]["wd_multiplier"] for n in no_decay} == {n: 0.0 for n in no_decay}
    assert {n: by_name[n]["wd_multiplier"] for n in decay} == {n: 1.0 for n in decay}
    # Rule check over everything: wd 0 exactly for biases, norms and gammas.
    for name, group in by_name.items():
        exempt = name.endswith(".bias") or ".norm" in name or name.endswith(".gamma")
        assert group["wd_multiplier"] == (0.0 if exempt else 1.0), name


def test_layerwise_lr_multipliers(groups):
    by_name = groups_by_name(groups)
    d = DECAY
    expected = {
        # embeddings: layer 0 -> d ** (depth + 1) = 0.9 ** 4 = 0.6561
        "backbone.cls_token": 0.6561,
        "backbone.pos_embed": 0.6561,
        "backbone.register_tokens": 0.6561,
        "backbone.mask_token": 0.6561,
        "backbone.patch_embed.proj.weight": 0.2 * 0.6561,
        "backbone.patch_embed.proj.bias": 0.2 * 0.6561,
        # block 0: layer 1 -> 0.9 ** 3; last block (2): layer 3 -> 0.9
        "backbone.blocks.0.attn.qkv.weight": 0.729,
        "backbone.blocks.0.ls1.gamma": 0.729,
        "backbone.blocks.1.mlp.fc1.weight": 0.81,
        "backbone.blocks.2.norm2.bias": 0.9,
        "backbone.blocks.2.attn.qkv.weight": 0.9,
        # final norm: layer depth + 1 -> 1; heads -> 1
        "backbone.norm.weight": 1.0,
        "backbone.norm.bias": 1.0,
        "dino_head.mlp.0.weight": 1.0,
        "dino_head.last_layer.parametrizations.weight.original1": 1.0,
        "ibot_head.mlp.2.bias": 1.0,
    }
    assert d ** 4 == pytest.approx(0.6561)
    for name, value in expected.items():
        assert by_name[name]["lr_multiplier"] == pytest.approx(value, rel=1e-12), name


def test_last_layer_flags(groups):
    flagged = {n for g in groups if g["is_last_layer"] for n in g["names"]}
    assert flagged == {
        f"{head}.last_layer.parametrizations.weight.{t}"
        for head in ("dino_head", "ibot_head") for t in ("original0", "original1")
    }


def test_frozen_parameters_are_skipped():
    student = make_student(ibot_head=False)
    student["backbone"].mask_token.requires_grad_(False)
    for p in student["backbone"].blocks[0].parameters():
        p.requires_grad_(False)
    groups = build_param_groups(student, layerwise_decay=DECAY, patch_embed_lr_mult=PATCH_MULT)
    names = {n for g in groups for n in g["names"]}
    assert "backbone.mask_token" not in names
    assert not any(n.startswith("backbone.blocks.0.") for n in names)
    assert names == {n for n, p in student.named_parameters() if p.requires_grad}
    assert all(0.729 != pytest.approx(g["lr_multiplier"]) for g in groups)  # block 0's group is gone


def test_real_dino_head_if_available():
    from dinoreg.models import DINOHead

    student = nn.ModuleDict({"backbone": make_student()["backbone"],
                             "dino_head": DINOHead(32, 11, nlayers=3, hidden_dim=16, bottleneck_dim=8)})
    by_name = groups_by_name(build_param_groups(student, layerwise_decay=DECAY, patch_embed_lr_mult=PATCH_MULT))
    last = [n for n in by_name if n.startswith("dino_head.last_layer.")]
    assert last and all(by_name[n]["is_last_layer"] and by_name[n]["wd_multiplier"] == 1.0 for n in last)
    assert not by_name["dino_head.mlp.0.weight"]["is_last_layer"]


def test_backbone_must_be_the_vit():
    with pytest.raises(TypeError, match="not a VisionTransformer"):
        build_param_groups({"backbone": nn.Linear(2, 2)}, layerwise_decay=DECAY, patch_embed_lr_mult=PATCH_MULT)


def test_optimizer_and_apply_optim_schedule(groups):
    optimizer = build_optimizer(groups, betas=(0.9, 0.95))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(g["betas"] == (0.9, 0.95) for g in optimizer.param_groups)
    apply_optim_schedule(optimizer, lr=1e-3, weight_decay=0.04, last_layer_lr=0.0)
    for g in optimizer.param_groups:
        base = 0.0 if g["is_last_layer"] else 1e-3
        assert g["lr"] == pytest.approx(base * g["lr_multiplier"], rel=1e-15, abs=0)
        assert g["weight_decay"] == pytest.approx(0.04 * g["wd_multiplier"], rel=1e-15, abs=0)
    by_name = {n: g for g in optimizer.param_groups for n in g["names"]}
    assert by_name["backbone.patch_embed.proj.weight"]["lr"] == pytest.approx(1e-3 * 0.2 * 0.6561)
    assert by_name["backbone.norm.weight"]["weight_decay"] == 0.0
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["weight_decay"] == pytest.approx(0.04)
    assert by_name["dino_head.last_layer.parametrizations.weight.original0"]["lr"] == 0.0
    apply_optim_schedule(optimizer, lr=2e-3, weight_decay=0.1, last_layer_lr=5e-4)
    assert by_name["dino_head.last_layer.parametrizations.weight.original0"]["lr"] == pytest.approx(5e-4)
    assert by_name["dino_head.mlp.0.weight"]["lr"] == pytest.approx(2e-3)
    assert by_name["dino_head.mlp.0.weight"]["weight_decay"] == pytest.approx(0.1)


def test_multi_tensor_adamw_gives_the_single_tensor_loops_values():
    """foreach (the default off CUDA) against the official single-tensor loop: bitwise, over param groups with
    their own lr and weight decay, for several steps."""
    torch.manual_seed(0)
    loop_student = make_student()
    multi_student = copy.deepcopy(loop_student)
    optimizers = {}
    for name, module in (("for_loop", loop_student), ("auto", multi_student)):
        optimizers[name] = build_optimizer(build_param_groups(module, layerwise_decay=DECAY,
                                                              patch_embed_lr_mult=PATCH_MULT), implementation=name)
    assert optimizers["auto"].defaults["foreach"] is True and optimizers["for_loop"].defaults["foreach"] is False
    for step in range(4):
        for name, module in (("for_loop", loop_student), ("auto", multi_student)):
            apply_optim_schedule(optimizers[name], lr=1e-3 * (step + 1), weight_decay=0.04, last_layer_lr=1e-4)
            for p in module.parameters():
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + step))
            optimizers[name].step()
    for (name, a), b in zip(loop_student.named_parameters(), multi_student.parameters()):
        assert torch.equal(a, b), name


def test_adamw_implementation_per_device():
    params = [nn.Parameter(torch.zeros(3))]
    assert build_optimizer([{"params": params}], device=torch.device("cuda")).defaults["fused"] is True
    assert build_optimizer([{"params": params}], implementation="fused").defaults["fused"] is True
    with pytest.raises(ValueError, match="unknown AdamW implementation 'apex'; choose one of auto, fused"):
        build_optimizer([{"params": params}], implementation="apex")


# --- gradient clipping -----------------------------------------------------------------------


def test_multi_tensor_clipping_gives_the_per_tensor_values():
    student, reference = make_student(), make_student()
    for (name, p), q in zip(student.named_parameters(), reference.parameters()):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 3
        q.grad = p.grad.clone()
    norms = clip_grad_norms(student, 3.0)
    for key, module in reference.items():  # torch's per-tensor loop, as the official trainer calls it
        norm = torch.nn.utils.clip_grad_norm_(list(module.parameters()), 3.0, foreach=False)
        assert norms[key] == float(norm)
    for (name, p), q in zip(student.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name


def _set_grads(module: nn.Module, value: float) -> float:
    """Fill every gradient with ``value``; return the resulting global L2 norm."""
    count = 0
    for p in module.parameters():
        p.grad = torch.full_like(p, value)
        count += p.numel()
    return abs(value) * math.sqrt(count)


@pytest.mark.parametrize("max_norm", [3.0, 0.0])
def test_clip_grad_norms_per_submodel(max_norm):
    student = make_student()
    norms = {"backbone": _set_grads(student["backbone"], 0.5),
             "dino_head": _set_grads(student["dino_head"], 0.01),  # below 3: left alone
             "ibot_head": _set_grads(student["ibot_head"], 2.0)}
    assert norms["dino_head"] < 3.0 < min(norms["backbone"], norms["ibot_head"])
    reported = clip_grad_norms(student, max_norm)
    assert reported.keys() == norms.keys()
    for key, norm in norms.items():
        assert reported[key] == pytest.approx(norm, rel=1e-5)
        after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in student[key].parameters()])).item()
        expected = min(norm, max_norm) if max_norm > 0 and norm > max_norm else norm
        assert after == pytest.approx(expected, rel=1e-4), key


def test_clip_grad_norms_without_grads():
    assert clip_grad_norms(make_student(ibot_head=False), 3.0) == {"backbone": 0.0, "dino_head": 0.0}


# --- schedules -------------------------------------------------------------------------------


def official_cosine(base, final, total, warmup=0, start=0.0, freeze=0):
    """A plain numpy transcription of the official CosineScheduler's table."""
    cosine_len = total - warmup - freeze
    steps = np.arange(cosine_len)
    table = np.concatenate([
        np.zeros(freeze),
        np.linspace(start, base, warmup),
        final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(cosine_len, 1))),
    ])
    assert len(table) == total
    return lambda it: final if it >= total else float(table[it])


@pytest.mark.parametrize("total,warmup,freeze,start", [
    (40, 10, 0, 0.0), (40, 0, 0, 0.0), (40, 1, 0, 0.3), (40, 2, 0, 0.3), (40, 40, 0, 0.04),
    (37, 5, 3, 0.1), (40, 10, 40 - 10, 0.0), (1, 0, 0, 0.0), (1, 1, 0, 0.5), (1250 * 100, 1250 * 10, 0, 0.0),
])
def test_cosine_schedule_matches_official(total, warmup, freeze, start):
    ours = cosine_schedule(4e-3, 1e-6, total, warmup_iters=warmup, start_warmup_value=start, freeze_iters=freeze)
    official = official_cosine(4e-3, 1e-6, total, warmup, start, freeze)
    its = range(total + 3) if total < 1000 else [*range(0, total, 997), warmup - 1, warmup, total - 1, total]
    for it in its:
        assert abs(ours(it) - official(it)) < 1e-12, it


def test_cosine_schedule_boundaries_beyond_a_million_iterations():
    total, warmup = 2_000_003, 700_001
    ours = cosine_schedule(1.0, 0.0, total, warmup_iters=warmup)
    official = official_cosine(1.0, 0.0, total, warmup)
    for it in (0, 1, warmup - 2, warmup - 1, warmup, warmup + 1, total // 2, total - 1, total):
        assert abs(ours(it) - official(it)) < 1e-12, it


def test_empty_and_invalid_schedules():
    assert cosine_schedule(1.0, 0.5, 0)(0) == 0.5
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, 10, warmup_iters=11)
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, 10)(-1)


def test_zero_first_iterations_overwrites_without_shifting():
    lr = cosine_schedule(1.0, 0.1, 30, warmup_iters=10)
    for zeros in (0, 4, 10, 17, 30, 45):
        frozen = zero_first_iterations(lr, zeros)
        for it in range(33):
            assert frozen(it) == (0.0 if it < min(zeros, 30) else lr(it)), (zeros, it)


def small_cfg(**optim):
    return OmegaConf.create({
        "train": {"epoch_length": 10},
        "optim": {"epochs": 4, "lr": 2e-3, "min_lr": 1e-6, "warmup_epochs": 1, "weight_decay": 0.04,
                  "weight_decay_end": 0.4, "freeze_last_layer_epochs": 1, **optim},
        "teacher": {"momentum_teacher": 0.992, "final_momentum_teacher": 1.0, "warmup_teacher_temp": 0.04,
                    "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 2},
    })


def test_schedules_match_official_build_schedulers():
    schedules = Schedules(small_cfg())
    assert schedules.total_iterations == 40
    lr = official_cosine(2e-3, 1e-6, 40, warmup=10)
    wd = official_cosine(0.04, 0.4, 40)
    momentum = official_cosine(0.992, 1.0, 40)
    temp = official_cosine(0.07, 0.07, 20, warmup=20, start=0.04)
    for it in range(45):
        v = schedules.values(it)
        assert set(v) == {"lr", "weight_decay", "momentum", "teacher_temp", "last_layer_lr"}
        assert abs(v["lr"] - lr(it)) < 1e-12, it
        assert abs(v["weight_decay"] - wd(it)) < 1e-12, it
        assert abs(v["momentum"] - momentum(it)) < 1e-12, it
        assert abs(v["teacher_temp"] - temp(it)) < 1e-12, it
        assert abs(v["last_layer_lr"] - (0.0 if it < 10 else lr(it))) < 1e-12, it


def test_schedule_edge_values_by_hand():
    s = Schedules(small_cfg())
    v0, v9, v10, v25, v39, v40 = (s.values(it) for it in (0, 9, 10, 25, 39, 40))
    assert v0["lr"] == 0.0 and v0["last_layer_lr"] == 0.0
    assert v9["lr"] == pytest.approx(2e-3, rel=1e-12)  # warmup end: linspace includes base
    assert v9["last_layer_lr"] == 0.0  # last layer frozen for exactly the first epoch
    assert v10["lr"] == pytest.approx(2e-3, rel=1e-12) and v10["last_layer_lr"] == v10["lr"]  # cosine i=0
    assert v25["lr"] == pytest.approx(1e-6 + 0.5 * (2e-3 - 1e-6), rel=1e-12)  # cosine middle: i = 15 of 30
    assert v39["lr"] == pytest.approx(1e-6 + 0.5 * (2e-3 - 1e-6) * (1 + math.cos(math.pi * 29 / 30)), rel=1e-12)
    assert v40["lr"] == 1e-6 and v40["last_layer_lr"] == 1e-6 and s.values(10_000)["lr"] == 1e-6
    assert v0["weight_decay"] == pytest.approx(0.04) and v40["weight_decay"] == 0.4
    assert s.values(20)["weight_decay"] == pytest.approx(0.22, rel=1e-12)  # (0.04 + 0.4) / 2
    assert v0["momentum"] == pytest.approx(0.992) and v40["momentum"] == 1.0
    # teacher temp: linspace(0.04, 0.07, 20), then constant 0.07
    assert v0["teacher_temp"] == pytest.approx(0.04, rel=1e-12)
    assert s.values(1)["teacher_temp"] == pytest.approx(0.04 + 0.03 / 19, rel=1e-12)
    assert s.values(19)["teacher_temp"] == pytest.approx(0.07, rel=1e-12)
    assert s.values(20)["teacher_temp"] == 0.07 and v39["teacher_temp"] == 0.07


def test_schedules_from_the_default_recipe():
    from dinoreg.config import apply_scaling_rule, load_config

    cfg = load_config()
    apply_scaling_rule(cfg, world_size=1)
    s = Schedules(cfg)
    length = cfg.train.epoch_length
    assert s.total_iterations == cfg.optim.epochs * length
    assert s.values(cfg.optim.warmup_epochs * length - 1)["lr"] == pytest.approx(cfg.optim.lr, rel=1e-12)
    assert s.values(cfg.optim.freeze_last_layer_epochs * length - 1)["last_layer_lr"] == 0.0


def test_schedules_need_a_scaled_lr():
    with pytest.raises(ValueError, match="apply_scaling_rule"):
        Schedules(small_cfg(lr=0.0))
