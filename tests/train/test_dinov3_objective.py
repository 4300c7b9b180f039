"""With a DINOv3 recipe's settings (Sinkhorn-Knopp, a separate iBOT head, plain last layers, global_ignore_diagonal
true, no local-loss reweighting, KoLeo per rank) our objective is DINOv3's: every term of ``SSLMetaArch.forward_loss``
equals ``dinov3/train/ssl_meta_arch.py`` ``compute_losses`` restated plainly below, on the heads' own outputs."""

import pytest
import torch
import torch.nn.functional as F
from dist_step_worker import global_batch, rank_share
from launch_helpers import TINY

from dinoreg.config import load_config
from dinoreg.distributed import DistributedEnvironment
from dinoreg.train.build import build_model_and_optimizer

RECIPE = [*TINY, "student.patch_size=16", "crops.global_crops_size=64", "crops.local_crops_size=32",
          "student.num_register_tokens=4", "train.centering=sinkhorn_knopp", "ibot.separate_head=true",
          "dino.head_weight_norm=false", "ibot.head_weight_norm=false", "ibot.head_n_prototypes=48"]


def sinkhorn_v3(logits, temp, n_samples):
    """DINOv3's SinkhornKnopp (one process): exp, then 3 x (rows to 1/K, columns to 1/B), columns to 1."""
    q = torch.exp(logits.float() / temp).t()
    k = q.shape[0]
    q /= q.sum()
    for _ in range(3):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n_samples
    return (q * n_samples).t()


def dino_loss_v3(student_logits, teacher_probs, ignore_diagonal=False):
    """DINOv3's DINOLoss.forward: [S, B, K] student logits against [T, B, K] teacher probabilities."""
    s, b, _ = student_logits.shape
    t = teacher_probs.shape[0]
    loss = -torch.einsum("sbk,tbk->st", F.log_softmax(student_logits.float() / 0.1, dim=-1), teacher_probs)
    if not ignore_diagonal:
        return loss.sum() / (b * s * t)
    return torch.diagonal_scatter(loss, loss.new_zeros(min(s, t))).sum() / (b * s * t - b * min(s, t))


def koleo_v3(x):
    """DINOv3's KoLeoLoss (non-distributed)."""
    x = F.normalize(x, eps=1e-8, p=2, dim=-1)
    dots = x @ x.t()
    dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
    distances = F.pairwise_distance(x, x[dots.argmax(dim=1)], p=2, eps=1e-8)
    return -torch.log(distances + 1e-8).mean()


def test_every_term_is_dinov3s_compute_losses():
    cfg = load_config("tiny_rope_cpu", RECIPE)
    torch.manual_seed(0)
    model, _ = build_model_and_optimizer(cfg, DistributedEnvironment(), torch.device("cpu"))
    model.train()
    seen = {}
    for part in ("student", "teacher"):
        for head in ("dino_head", "ibot_head"):
            model.get_submodule(f"{part}.{head}").register_forward_hook(
                lambda module, args, out, key=(part, head): seen.__setitem__(key, (args[0].detach(), out.detach())))
    batch = rank_share(global_batch(0, cfg), 0, 1)
    _, metrics = model.forward_loss(batch, teacher_temp=0.06)

    b, n_local = batch.global_crops.shape[0] // 2, batch.n_local_crops
    cls_in, student_cls_logits = seen[("student", "dino_head")]  # [2B + nB, .]: global crops, then local crops
    _, teacher_swapped = seen[("teacher", "dino_head")]  # ours: view 2 then view 1
    teacher_cls = torch.cat(teacher_swapped.chunk(2)[::-1])  # DINOv3's order: view 1 then view 2
    teacher_probs = sinkhorn_v3(teacher_cls, 0.06, 2 * b).unflatten(0, (2, b))  # [2, B, K]
    global_logits = student_cls_logits[:2 * b].unflatten(0, (2, b))
    local_logits = student_cls_logits[2 * b:].unflatten(0, (n_local, b))
    global_terms, local_terms = 2 * (2 - 1), 2 * n_local  # global_ignore_diagonal: true
    local_scale, global_scale = local_terms / (global_terms + local_terms), global_terms / (global_terms + local_terms)
    expected = {
        "dino_local_crops_loss": local_scale * dino_loss_v3(local_logits, teacher_probs),
        "dino_global_crops_loss": global_scale * dino_loss_v3(global_logits, teacher_probs, ignore_diagonal=True),
        # koleo_loss_weight x koleo_scale (2) x the mean over the 2 global views
        "koleo_loss": 0.1 * 2 * sum(koleo_v3(view) for view in cls_in[:2 * b].chunk(2)) / 2,
    }
    _, student_patch_logits = seen[("student", "ibot_head")]
    _, teacher_patch_logits = seen[("teacher", "ibot_head")]
    patch_probs = sinkhorn_v3(teacher_patch_logits, 0.06, batch.mask_indices.numel())
    rows = torch.sum(patch_probs * F.log_softmax(student_patch_logits / 0.1, dim=-1), dim=-1)
    expected["ibot_loss"] = -(rows * batch.masks_weight).sum() / batch.masks.shape[0]  # forward_masked
    for name, value in expected.items():
        assert metrics[name].item() == pytest.approx(value.item(), rel=1e-5), name
    # DINOv3's total: the terms above with loss_weight 1 (dino, ibot)
    assert metrics["total_loss"].item() == pytest.approx(sum(v.item() for v in expected.values()), rel=1e-5)
