"""Distillation across patch sizes: a DINOv3-family teacher (RoPE, patch 16) sees its own resize of the student's
crops (patch 14), so that both make the same patch grid and patch (r, c) covers the same part of the crop for both;
the iBOT loss pairs student patch (r, c) with teacher patch (r, c). Checked on planted images."""

import json
import math

import pytest
import torch
from dist_step_worker import global_batch, rank_share
from launch_helpers import TINY

from dinoreg.config import load_config
from dinoreg.distributed import DistributedEnvironment
from dinoreg.models import DINOHead
from dinoreg.models.rope_vit import ROPE_PRESETS, ROPE_RELEASED, RopeVisionTransformer
from dinoreg.models.vit import DinoVisionTransformer
from dinoreg.train.build import build_model_and_optimizer, build_ssl_model
from dinoreg.train.features.distillation import TeacherCrops, TeacherMismatchError, check_distillation_teacher
from dinoreg.train.loop import train

GRID = 4  # patches a side, for the student (patch 14: 56 px) and the teacher (patch 16: 64 px)
WIDTH = 32
STUDENT = [*TINY, "student.patch_size=14", "student.num_register_tokens=4", "student.depth=1",
           f"crops.global_crops_size={14 * GRID}", "crops.local_crops_size=28", "ibot.separate_head=true",
           "train.batch_size_per_gpu=4", "train.num_workers=0", "evaluation.knn_enabled=false", "monitor.period=0"]


def patch_means(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> the mean of each patch over its pixels and channels, [B, H/patch, W/patch]."""
    return torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True), patch).squeeze(1)


@pytest.mark.parametrize(("student_patch", "teacher_patch"), [(14, 16), (16, 14)])
@pytest.mark.parametrize("method", ["bicubic", "bilinear", "area"])
def test_the_teachers_resize_puts_each_student_patch_on_the_teacher_patch_of_the_same_row_and_column(
        student_patch, teacher_patch, method):
    """Each student patch carries its own number (patch (r, c) of the crop is filled with r * GRID + c + 1): on the
    teacher's resize, teacher patch (r, c) carries the same number, and every plant of one patch lands on the
    teacher patch of the same row and column."""
    crops = TeacherCrops(student_patch, teacher_patch, method, antialias=method != "area")
    numbers = torch.arange(1, GRID * GRID + 1, dtype=torch.float32).reshape(GRID, GRID)
    image = numbers.repeat_interleave(student_patch, 0).repeat_interleave(student_patch, 1).expand(1, 3, -1, -1)
    resized = crops(image)
    assert resized.shape == (1, 3, GRID * teacher_patch, GRID * teacher_patch)
    assert torch.equal(patch_means(resized, teacher_patch)[0].round(), numbers)
    for row in range(GRID):
        for column in range(GRID):  # one planted patch on a blank crop: most of its mass on the same teacher patch
            plant = torch.zeros(1, 3, GRID * student_patch, GRID * student_patch)
            plant[..., row * student_patch:(row + 1) * student_patch,
                  column * student_patch:(column + 1) * student_patch] = 1.0
            means = patch_means(crops(plant), teacher_patch)[0]
            assert divmod(int(means.argmax()), GRID) == (row, column)
            assert means[row, column] > 0.9 and (means.abs().sum() - means[row, column].abs()) < 0.2


def test_a_crop_the_student_patches_do_not_tile_is_refused_in_one_line():
    crops = TeacherCrops(14, 16)
    assert crops.size(224) == 256 and crops.size(98) == 112 and TeacherCrops(16, 14).size(256) == 224
    with pytest.raises(TeacherMismatchError) as error:
        crops.size(100, "crops.global_crops_size")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("crops.global_crops_size=100 is not a whole number of the student's 14-px patches")
    assert "set crops.global_crops_size to a multiple of 14, e.g. 98 or 112" in message
    assert torch.equal(TeacherCrops(14, 14)(x := torch.randn(1, 3, 28, 28)), x)  # equal patches: as it is


def save_teacher(path, backbone: dict) -> None:
    """An official ``teacher_checkpoint.pth``: ``backbone`` (a state dict) and random DINO and iBOT heads."""
    heads = {name: DINOHead(WIDTH, 64, hidden_dim=64, bottleneck_dim=32).state_dict()
             for name in ("dino_head", "ibot_head")}
    teacher = {f"backbone.{k}": v for k, v in backbone.items()}
    teacher.update({f"{name}.{k}": v for name, head in heads.items() for k, v in head.items()})
    torch.save({"teacher": teacher}, path)


def rope16_teacher(path, *, content: bool):
    """A DINOv3-layout ``teacher_checkpoint.pth`` of a 1-block RoPE ViT with patch 16 and 4 storage tokens (the
    released models' settings), and its DINO and iBOT heads. ``content``: its patch tokens reflect their pixels
    (the block adds nothing; the patch embedding's first channel is the patch's mean, the others constants)."""
    torch.manual_seed(0)
    backbone = RopeVisionTransformer(**dict(ROPE_RELEASED, embed_dim=WIDTH, depth=1, num_heads=2))
    state = backbone.state_dict()
    if content:
        make_content_reflecting(state)
    save_teacher(path, state)
    return path


def make_content_reflecting(state: dict) -> None:
    """Zero every block (each adds nothing to the residual stream) and the position embedding, and let the patch
    embedding write the patch's mean pixel into channel 0 and fixed +-1 into the others: after the final norm, a
    patch token's channel 0 grows with its patch's mean."""
    for key, value in state.items():
        if key.startswith("blocks.") or key == "pos_embed":
            value.zero_()
    weight, bias = state["patch_embed.proj.weight"], state["patch_embed.proj.bias"]
    weight.zero_()
    weight[0] = 1.0 / weight[0].numel()
    bias.copy_(torch.tensor([0.0] + [(-1.0) ** k for k in range(1, bias.numel())]))


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rope16")
    return {content: rope16_teacher(root / f"teacher_{content}.pth", content=content) for content in (False, True)}


def distilled(teacher, *more):
    cfg = load_config("tiny_cpu", [*STUDENT, "distillation.enabled=true", f"distillation.teacher={teacher}", *more])
    torch.manual_seed(0)
    return cfg, build_model_and_optimizer(cfg, DistributedEnvironment(), torch.device("cpu"))[0]


def test_the_ibot_loss_pairs_student_patch_r_c_with_teacher_patch_r_c(teacher_files):
    """Teacher (RoPE/16, 64 px) and student (learned positions, registers, patch 14, 56 px) both with patch tokens
    that reflect their pixels; each image has one bright patch of the student's grid, in its own place. Both
    models find it at the same (r, c), and the iBOT loss scores the student's patch i against the teacher's patch
    i: lower than against the teacher's targets moved by any number of patches."""
    cfg, model = distilled(teacher_files[True], "train.centering=sinkhorn_knopp")  # no centre: recomputed below
    student = model.student["backbone"]
    with torch.no_grad():
        make_content_reflecting(student.state_dict(keep_vars=True))
        model.student["ibot_head"].load_state_dict(model.distillation_teacher["ibot_head"].state_dict())
    batch = rank_share(global_batch(0, cfg), 0, 1)
    planted = torch.zeros_like(batch.global_crops)  # [2B, 3, 56, 56]
    places = torch.randperm(GRID * GRID)[:planted.shape[0]]
    for image, place in enumerate(places.tolist()):
        row, column = divmod(place, GRID)
        planted[image, :, row * 14:(row + 1) * 14, column * 14:(column + 1) * 14] = 3.0
    batch = batch.replace(global_crops=planted)

    seen = {}

    def keep(name, pick):  # a forward hook that records (and returns None: the output stays)
        return lambda module, args, out: seen.setdefault(name, pick(args, out)) and None

    teacher = model.distillation_teacher["backbone"]
    hooks = [teacher.patch_embed.register_forward_hook(keep("teacher_input", lambda args, out: args[0].shape)),
             teacher.register_forward_hook(keep("teacher", lambda args, out: out)),
             student.register_forward_hook(keep("student", lambda args, out: out[0]))]
    model.train()
    with torch.no_grad():
        _, metrics = model.forward_loss(batch, teacher_temp=0.04)
    for hook in hooks:
        hook.remove()
    assert seen["teacher_input"] == (planted.shape[0], 3, 64, 64)  # the teacher's resize of the 56-px crops
    teacher_patches, student_patches = seen["teacher"]["x_norm_patchtokens"], seen["student"]["x_norm_patchtokens"]
    assert teacher_patches.shape[:2] == student_patches.shape[:2] == (planted.shape[0], GRID * GRID)
    assert torch.equal(teacher_patches[..., 0].argmax(1), places)
    assert torch.equal(student_patches[..., 0].argmax(1), places)

    # the loss as the model computes it (unmasked student: every patch), and with the targets moved by one patch
    every = torch.arange(teacher_patches.shape[0] * GRID * GRID)
    n_patches = torch.tensor([every.numel()])
    _, targets, _ = model._teacher_targets(seen["teacher"], every, n_patches, teacher_temp=0.04)
    logits = model.student["ibot_head"](student_patches.flatten(0, 1))
    weights = torch.full((every.numel(),), 1.0 / GRID ** 2)
    ones = torch.ones(teacher_patches.shape[:2], dtype=torch.bool)

    def ibot(teacher_probs):
        return model.ibot_patch_loss.forward_masked(logits, teacher_probs, student_masks_flat=ones,
                                                    n_masked_patches=every.numel(), masks_weight=weights)

    torch.testing.assert_close(metrics["ibot_loss"], ibot(targets), rtol=1e-5, atol=1e-6)
    for shift in range(1, GRID * GRID):  # each image's targets moved by `shift` patches: every pairing scores worse
        assert ibot(targets) < ibot(targets.unflatten(0, (-1, GRID * GRID)).roll(shift, dims=1).flatten(0, 1))


def test_a_rope16_teacher_file_distils_into_a_patch14_student_with_registers(teacher_files, tmp_path):
    """Two iterations of the training loop: finite losses; the teacher's patch embedding ran on 64-px crops (the
    student's 56 px resized), the student's on 56 and 28 px."""
    cfg = load_config("tiny_cpu", [*STUDENT, "distillation.enabled=true",
                                   f"distillation.teacher={teacher_files[False]}", "optim.epochs=1",
                                   "train.epoch_length=2", f"train.output_dir={tmp_path / 'run'}",
                                   "checkpoint.period=0"])
    sizes = []

    def record(module, args):
        if isinstance(module, torch.nn.Conv2d) and module.in_channels == 3:  # a patch embedding
            sizes.append((module.kernel_size[0], args[0].shape[-1]))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        train(cfg)
    finally:
        hook.remove()
    rows = [row for row in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
            if "total_loss" in row]
    assert len(rows) == 2 and all(math.isfinite(row["total_loss"]) for row in rows), rows
    assert all(row["ibot_loss"] > 0 and row["dino_global_crops_loss"] > 0 for row in rows)
    assert sorted(set(sizes)) == [(14, 28), (14, 56), (16, 64)]


def test_the_config_refuses_an_antialiased_resize_that_cannot_antialias():
    with pytest.raises(ValueError) as error:
        load_config("tiny_cpu", ["distillation.teacher_resize_method=area"])
    assert ("distillation.teacher_resize_antialias: got True; antialiasing works with bicubic or bilinear resizing "
            "only") in str(error.value)
    load_config("tiny_cpu", ["distillation.teacher_resize_method=area", "distillation.teacher_resize_antialias=false"])


def test_a_learned_position_patch14_teacher_distils_into_a_rope_patch16_student(tmp_path):
    """The other way round: a DINOv2-family teacher (patch 14, registers, positions for 37 x 37 patches) and a RoPE
    student of patch 16 on 64-px crops. The teacher sees 56-px crops, its positions resampled once to 4 x 4."""
    torch.manual_seed(0)
    teacher = DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=WIDTH, depth=1, num_heads=2,
                                    num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
    save_teacher(tmp_path / "dinov2.pth", teacher.state_dict())
    cfg = load_config("tiny_rope_cpu", [*TINY, "student.depth=1", "student.patch_size=16", "crops.global_crops_size=64",
                                        "crops.local_crops_size=32", "distillation.enabled=true",
                                        f"distillation.teacher={tmp_path / 'dinov2.pth'}"])
    torch.manual_seed(0)
    model = build_model_and_optimizer(cfg, DistributedEnvironment(), torch.device("cpu"))[0]
    frozen = model.distillation_teacher["backbone"]
    assert frozen.pos_embed.shape == (1, 1 + GRID * GRID, WIDTH)
    # its position embeddings are the file's, resampled as the model resamples them for a 56-px image
    torch.testing.assert_close(frozen.pos_embed, teacher.interpolate_pos_encoding(
        torch.zeros(1, 1 + GRID * GRID, WIDTH), 56, 56), rtol=0, atol=1e-6)
    seen = []
    hook = frozen.patch_embed.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-1]))
    model.train()
    with torch.no_grad():
        _, metrics = model.forward_loss(rank_share(global_batch(0, cfg), 0, 1), teacher_temp=0.04)
    hook.remove()
    assert seen == [56] and math.isfinite(metrics["total_loss"]) and metrics["ibot_loss"] > 0


def test_the_vitl16_recipe_fits_dinov3s_vitl16_with_its_heads_on_a_matching_grid():
    """vits14_reg4_distill_from_vitl16: a vits14_reg4 student (DINOv2 family, 4 registers, patch 14) whose heads
    score the prototypes of DINOv3's ViT-L/16 training (262,144 DINO, 98,304 iBOT), masked as DINOv3 distils; its
    224-px global crops reach the teacher at 256 px, 16 x 16 patches for both."""
    cfg = load_config("vits14_reg4_distill_from_vitl16", ["distillation.teacher=teacher_checkpoint.pth"])
    assert cfg.distillation.enabled and cfg.distillation.mask_student and cfg.train.centering == "sinkhorn_knopp"
    assert (cfg.student.arch, cfg.student.patch_size, cfg.student.num_register_tokens) == ("vit_small", 14, 4)
    assert TeacherCrops(14, 16).size(cfg.crops.global_crops_size) == 256 and cfg.crops.local_crops_size % 14 == 0
    with torch.device("meta"):  # the real sizes, no memory
        backbone = RopeVisionTransformer(**ROPE_RELEASED, **ROPE_PRESETS["vitl16"])
        # DINOv3's heads: plain last layers (dino.head_weight_norm=false in its layout)
        teacher = torch.nn.ModuleDict({
            "backbone": backbone,
            "dino_head": DINOHead(1024, 262144, hidden_dim=8192, bottleneck_dim=512, weight_norm=False),
            "ibot_head": DINOHead(1024, 98304, hidden_dim=4096, bottleneck_dim=384, weight_norm=False)})
        student = build_ssl_model(load_config("vits14_reg4_distill_from_vitl16", ["distillation.enabled=false"]),
                                  load_pretrained=False).student
    check_distillation_teacher(teacher, student, patch_size=14,
                               crop_sizes={"crops.global_crops_size": cfg.crops.global_crops_size})
    assert student["backbone"].pos_embed_type == "learned" and backbone.patch_size == 16
    with pytest.raises(ValueError, match="distillation.teacher"):
        load_config("vits14_reg4_distill_from_vitl16")  # the teacher must be named
