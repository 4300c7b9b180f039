import random

import pytest
import torch
import torch.nn.functional as F

from dinoreg.config import apply_scaling_rule, load_config
from dinoreg.data import TrainingBatch
from dinoreg.ssl.masking import sample_masks
from dinoreg.train.build import build_ssl_model
from dinoreg.train.optim import apply_optim_schedule, build_optimizer, build_param_groups

B, N_LOCAL, G, L = 4, 3, 32, 16


def tiny_cfg(*overrides):
    return load_config("tiny_cpu", [
        "student.embed_dim=32", "student.num_heads=2", "student.depth=2", "student.patch_size=8",
        f"crops.global_crops_size={G}", f"crops.local_crops_size={L}", f"crops.local_crops_number={N_LOCAL}",
        "dino.head_n_prototypes=20", "dino.head_hidden_dim=24", "dino.head_bottleneck_dim=8",
        "ibot.head_n_prototypes=12", "ibot.head_hidden_dim=24", "ibot.head_bottleneck_dim=8",
        f"train.batch_size_per_gpu={B}", *overrides])


def make_batch(seed=0):
    torch.manual_seed(seed)
    masks = sample_masks(2 * B, (G // 8, G // 8), (0.1, 0.5), 0.5, rng=random.Random(seed))
    return TrainingBatch(global_crops=torch.randn(2 * B, 3, G, G), local_crops=torch.randn(N_LOCAL * B, 3, L, L),
                         n_global_crops=2, n_local_crops=N_LOCAL).with_masks(masks)


def reference_losses(model, batch, teacher_temp, cfg):
    """The official objective written out term by term (softmax centering, first step: center 0)."""
    t_out = model.teacher["backbone"](batch.global_crops, is_training=True)
    t_cls = model.teacher["dino_head"](t_out["x_norm_clstoken"])
    t_probs = F.softmax(t_cls / teacher_temp, dim=-1).chunk(2)  # [view1, view2]
    s_glob, s_loc = model.student["backbone"]([batch.global_crops, batch.local_crops],
                                              masks=[batch.masks, None], is_training=True)
    s_glob_logits = model.student["dino_head"](s_glob["x_norm_clstoken"]).chunk(2)
    s_loc_logits = model.student["dino_head"](s_loc["x_norm_clstoken"]).chunk(N_LOCAL)

    def ce(t, s):
        return -(t * F.log_softmax(s / 0.1, dim=-1)).sum(-1).mean()

    terms = [ce(t_probs[1], s_glob_logits[0]), ce(t_probs[0], s_glob_logits[1])]  # cross views only
    terms += [ce(t, s) for s in s_loc_logits for t in t_probs]
    assert len(terms) == 2 + 2 * N_LOCAL
    dino = sum(terms) / len(terms)

    def koleo(x):
        x = F.normalize(x, dim=-1)
        d = torch.cdist(x, x) + torch.eye(len(x)) * 1e9
        return -torch.log(d.min(dim=1).values + 1e-8).mean()

    koleo_total = cfg.dino.koleo_loss_weight * sum(koleo(v) for v in s_glob["x_norm_clstoken"].chunk(2))
    # iBOT: per image, mean CE over its masked patches; summed and divided by the number of global crops
    masks = batch.masks
    t_patch = model.teacher["ibot_head"](t_out["x_norm_patchtokens"][masks])
    s_patch = model.student["ibot_head"](s_glob["x_norm_patchtokens"][masks])
    per_patch = -(F.softmax(t_patch / teacher_temp, -1) * F.log_softmax(s_patch / 0.1, -1)).sum(-1)
    image_of_patch = masks.nonzero()[:, 0]
    per_image = torch.zeros(2 * B).index_add(0, image_of_patch, per_patch) / masks.sum(1).clamp(min=1)
    ibot = per_image.sum() / (2 * B)
    return dino, koleo_total, ibot


def test_teacher_starts_as_student_copy_without_gradients():
    model = build_ssl_model(tiny_cfg("ibot.separate_head=true"))
    student, teacher = model.student.state_dict(), model.teacher.state_dict()
    assert set(student) == set(teacher)
    assert all(torch.equal(student[k], teacher[k]) for k in student)
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_losses_match_official_objective_written_out():
    cfg = tiny_cfg("ibot.separate_head=true", "student.drop_path_rate=0.0")
    torch.manual_seed(0)
    model = build_ssl_model(cfg).train()
    with torch.no_grad():  # a student different from the teacher, so no term is trivially symmetric
        for p in model.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = make_batch()
    assert batch.masks.sum() > 0
    total, metrics = model.forward_loss(batch, teacher_temp=0.05)
    with torch.no_grad():
        dino, koleo, ibot = reference_losses(model, batch, 0.05, cfg)
    dino_ours = metrics["dino_local_crops_loss"] + metrics["dino_global_crops_loss"]
    torch.testing.assert_close(dino_ours, dino, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["koleo_loss"], koleo, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["ibot_loss"], ibot, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total.detach(), dino + koleo + ibot, rtol=1e-5, atol=1e-6)
    assert 0 < metrics["teacher_entropy"] <= torch.log(torch.tensor(20.0)) + 1e-5


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_backward_reaches_student_only_and_shared_head_works(centering):
    model = build_ssl_model(tiny_cfg(f"train.centering={centering}"))
    assert "ibot_head" not in model.student
    total, metrics = model.forward_loss(make_batch(), teacher_temp=0.04)
    total.backward()
    assert all(p.grad is not None for p in model.student["backbone"].blocks.parameters())
    assert model.student["dino_head"].last_layer.parametrizations.weight.original1.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())
    assert torch.isfinite(total) and {"ibot_loss", "koleo_loss", "dino_local_crops_loss"} <= set(metrics)


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_one_pass_per_crop_group_and_row_chunks_change_no_value(centering):
    """train.pack_crops=false (the naive way: one backbone pass per crop group) gives the packed pass's loss and
    gradients up to matmul rounding; losses on one-row chunks (train.loss_chunk_elements=1) give them exactly."""
    results = {}
    for name, overrides in (("packed", ()), ("per_group", ("train.pack_crops=false",)),
                            ("chunked", ("train.loss_chunk_elements=1",))):
        torch.manual_seed(0)
        model = build_ssl_model(tiny_cfg(f"train.centering={centering}", "ibot.separate_head=true", *overrides))
        assert model.pack_crops == (name != "per_group")
        total, _ = model.forward_loss(make_batch(), teacher_temp=0.05)
        total.backward()
        results[name] = [total.detach()] + [p.grad for p in model.student.parameters()]
    for ours, packed in zip(results["chunked"], results["packed"]):
        assert torch.equal(ours, packed)
    for ours, packed in zip(results["per_group"], results["packed"]):
        torch.testing.assert_close(ours, packed, rtol=1e-4, atol=1e-6)


def test_ema_update_is_momentum_weighted_average():
    model = build_ssl_model(tiny_cfg())
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    before_t = [p.clone() for p in model.teacher.parameters()]
    student = [p.clone() for p in model.student.parameters()]
    model.update_teacher(0.9)
    for t0, s, t1 in zip(before_t, student, model.teacher.parameters()):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * s)
        # bitwise what the per-parameter loop it replaces computed: t.mul_(m).add_(s, alpha=1 - m)
        assert torch.equal(t1, t0.clone().mul_(0.9).add_(s, alpha=1 - 0.9))


def test_last_layer_is_frozen_while_its_lr_is_zero():
    cfg = tiny_cfg()
    apply_scaling_rule(cfg, world_size=1)
    model = build_ssl_model(cfg)
    optimizer = build_optimizer(build_param_groups(model.student, layerwise_decay=0.9, patch_embed_lr_mult=0.2))
    apply_optim_schedule(optimizer, lr=1e-2, weight_decay=0.04, last_layer_lr=0.0)  # first epoch
    last = [p.clone() for p in model.student["dino_head"].last_layer.parameters()]
    qkv = model.student["backbone"].blocks[0].attn.qkv.weight.clone()
    model.forward_loss(make_batch(), teacher_temp=0.04)[0].backward()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(last, model.student["dino_head"].last_layer.parameters()))
    assert not torch.equal(qkv, model.student["backbone"].blocks[0].attn.qkv.weight)


def test_the_loss_takes_its_views_from_the_batch_and_refuses_what_it_cannot_pair():
    cfg = load_config("tiny_cpu", ["student.depth=1"])
    model = build_ssl_model(cfg, load_pretrained=False)
    batch = make_batch()
    three_views = batch.replace(n_global_crops=3, global_crops=torch.randn(3 * B, 3, G, G))
    with pytest.raises(ValueError, match="2 global crops per image .* got 3 global crops"):
        model.forward_loss(three_views, teacher_temp=0.04)
    with pytest.raises(ValueError, match="masks absent"):
        model.forward_loss(batch.replace(masks=None), teacher_temp=0.04)


def test_a_state_read_holds_the_centres_with_the_last_update_folded_in():
    """The step's centre update is deferred (an all-reduce in flight under several processes); reading the model's
    state (a checkpoint save) folds it in, so no saver has to remember it."""
    model = build_ssl_model(tiny_cfg("train.centering=centering"))
    with torch.no_grad():
        model.forward_loss(make_batch(), teacher_temp=0.04)
    assert not model.dino_loss.center.any()  # still pending
    state = model.state_dict()
    assert state["dino_loss.center"].any() and state["ibot_patch_loss.center"].any()
    assert torch.equal(state["dino_loss.center"], model.dino_loss.center)
