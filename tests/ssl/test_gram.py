import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinoreg.ssl.gram import (GramLoss, gram_loss, gram_loss_weight, gram_matrix, resize_patch_features,
                              select_gram_tokens)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: intra-op threads only add wake-up latency (tens of ms per op when
    the cores are busy), so this module runs single-threaded and restores the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference_gram_loss(student, teacher, *, apply_norm, img_level, remove_neg, remove_only_teacher_neg):
    """DINOv3's GramLoss.forward restated step by step: fp32 cast, optional L2 normalisation along D,
    flatten [B, N, D] -> [B * N, D] for the batch-level Gram, Gram = X X^T, masked zeroing of the
    negatives (teacher first, then the student, in DINOv3's order), mean squared error."""
    s, t = student.float(), teacher.float()
    if apply_norm:
        s = s / s.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        t = t / t.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    if not img_level and s.dim() == 3:
        s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    gs = torch.einsum("...id,...jd->...ij", s, s)
    gt = torch.einsum("...id,...jd->...ij", t, t)
    if remove_neg:
        gt = torch.where(gt < 0, torch.zeros_like(gt), gt)
        gs = torch.where(gs < 0, torch.zeros_like(gs), gs)
    elif remove_only_teacher_neg:
        gt = torch.where(gt < 0, torch.zeros_like(gt), gt)
        gs = torch.where((gs < 0) & (gt < 0), torch.zeros_like(gs), gs)  # gt >= 0 by now: never true
    return ((gs - gt) ** 2).mean()


NEG_OPTIONS = [(False, False), (True, False), (False, True)]  # (remove_neg, remove_only_teacher_neg)
NEG_IDS = {(False, False): "keep_neg", (True, False): "remove_neg", (False, True): "remove_teacher_neg"}
OPTIONS = [pytest.param(norm, img, neg, id=f"{'norm' if norm else 'raw'}-{'image' if img else 'batch'}-{NEG_IDS[neg]}")
           for norm, img, neg in itertools.product([True, False], [True, False], NEG_OPTIONS)]


@pytest.mark.parametrize("shape", [(1, 4, 3), (2, 9, 8), (3, 16, 32), (4, 25, 16)])
@pytest.mark.parametrize("apply_norm,img_level,neg", OPTIONS)
def test_matches_reference_random(shape, apply_norm, img_level, neg):
    gen = torch.Generator().manual_seed(100 * shape[1] + shape[2])
    scale = 1.0 if apply_norm else 1 / math.sqrt(shape[-1])  # unnormalised Grams of O(1)
    student = torch.randn(shape, generator=gen) * scale
    teacher = torch.randn(shape, generator=gen) * scale
    options = dict(apply_norm=apply_norm, remove_neg=neg[0], remove_only_teacher_neg=neg[1])
    ours = GramLoss(**options)(student, teacher, img_level=img_level)
    expected = _reference_gram_loss(student, teacher, img_level=img_level, **options)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    assert ours.dtype == torch.float32 and ours.shape == ()


@pytest.mark.parametrize("apply_norm,neg", [pytest.param(norm, neg, id=f"{'norm' if norm else 'raw'}-{NEG_IDS[neg]}")
                                            for norm, neg in itertools.product([True, False], NEG_OPTIONS)])
def test_batch_level_on_selected_tokens_matches_reference(apply_norm, neg):
    """The masked / unmasked paths hand [M, D] tokens to the batch-level Gram."""
    gen = torch.Generator().manual_seed(7)
    student, teacher = torch.randn(2, 16, 8, generator=gen), torch.randn(2, 16, 8, generator=gen)
    masks = torch.rand(2, 16, generator=gen) < 0.4
    options = dict(apply_norm=apply_norm, remove_neg=neg[0], remove_only_teacher_neg=neg[1])
    for tokens_used in ("masked", "unmasked"):
        s, t = select_gram_tokens(student, teacher, masks, tokens_used)
        assert s.dim() == 2 and s.shape == t.shape
        ours = gram_loss(s, t, img_level=False, **options)
        torch.testing.assert_close(ours, _reference_gram_loss(s, t, img_level=False, **options),
                                   rtol=1e-6, atol=1e-6)


def test_bf16_inputs_are_upcast_as_reference():
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(2, 9, 8, generator=gen).bfloat16()
    teacher = torch.randn(2, 9, 8, generator=gen).bfloat16()
    ours = gram_loss(student, teacher, img_level=False, remove_neg=False)
    expected = _reference_gram_loss(student, teacher, apply_norm=True, img_level=False, remove_neg=False,
                                    remove_only_teacher_neg=False)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def test_hand_computed_one_image_two_tokens():
    # student tokens s1 = (1, 0), s2 = (-1, 1); teacher t1 = (1, 0), t2 = (-1, 0).
    # Normalised: s2 -> (-1/r2, 1/r2), t2 stays, so (r2 = sqrt(2))
    #   S = [[1, -1/r2], [-1/r2, 1]],   T = [[1, -1], [-1, 1]].
    #   no removal:       the two off-diagonals differ by 1 - 1/r2 -> 2 (1 - 1/r2)^2 / 4 = (1.5 - r2) / 2
    #   remove_neg:       both off-diagonals -> 0, S == T -> 0
    #   teacher neg only: T off-diagonal -> 0, S keeps -1/r2 -> 2 (1/2) / 4 = 0.25
    # Unnormalised: S = [[1, -1], [-1, 2]], T = [[1, -1], [-1, 1]]: one entry differs by 1 -> 1 / 4.
    student = torch.tensor([[[1.0, 0.0], [-1.0, 1.0]]])  # [1, 2, 2]
    teacher = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    r2 = math.sqrt(2.0)
    cases = [
        (dict(remove_neg=False), (1.5 - r2) / 2),
        (dict(remove_neg=True), 0.0),
        (dict(remove_neg=False, remove_only_teacher_neg=True), 0.25),
        (dict(apply_norm=False, remove_neg=False), 0.25),
    ]
    for options, expected in cases:
        for img_level in (True, False):
            loss = gram_loss(student, teacher, img_level=img_level, **options)
            assert loss.item() == pytest.approx(expected, abs=1e-7), (options, img_level)
    # Batch level over 2 images of 1 token each is the image-level Gram of one image of 2 tokens.
    loss = gram_loss(student.transpose(0, 1), teacher.transpose(0, 1), img_level=False, remove_neg=False)
    assert loss.item() == pytest.approx((1.5 - r2) / 2, abs=1e-7)
    assert gram_matrix(student, normalize=False, img_level=True).tolist() == [[[1.0, -1.0], [-1.0, 2.0]]]


@pytest.mark.parametrize("apply_norm,img_level,neg", OPTIONS)
def test_gradient_reaches_the_student_only(apply_norm, img_level, neg):
    gen = torch.Generator().manual_seed(11)
    student = torch.randn(2, 9, 8, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 9, 8, generator=gen, requires_grad=True)
    options = dict(apply_norm=apply_norm, remove_neg=neg[0], remove_only_teacher_neg=neg[1])
    GramLoss(**options)(student, teacher, img_level=img_level).backward()
    assert teacher.grad is None
    reference_student = student.detach().clone().requires_grad_(True)
    _reference_gram_loss(reference_student, teacher.detach(), img_level=img_level, **options).backward()
    assert student.grad.abs().sum() > 0
    torch.testing.assert_close(student.grad, reference_student.grad, rtol=1e-5, atol=1e-7)


def test_invalid_options():
    with pytest.raises(ValueError):
        GramLoss(remove_neg=True, remove_only_teacher_neg=True)
    with pytest.raises(ValueError):
        gram_loss(torch.randn(4, 3), torch.randn(4, 3), img_level=True)
    with pytest.raises(ValueError):
        select_gram_tokens(torch.randn(1, 4, 3), torch.randn(1, 4, 3), torch.zeros(1, 4, dtype=torch.bool), "some")


def test_select_tokens_all_keeps_the_batch_layout():
    student, teacher, masks = torch.randn(2, 4, 3), torch.randn(2, 4, 3), torch.zeros(2, 4, dtype=torch.bool)
    masks[0, 1] = masks[1, 3] = True
    s, t = select_gram_tokens(student, teacher, masks, "all")
    assert s is student and t is teacher
    s, t = select_gram_tokens(student, teacher, masks, "masked")
    assert torch.equal(s, torch.stack([student[0, 1], student[1, 3]])) and torch.equal(t[1], teacher[1, 3])
    assert select_gram_tokens(student, teacher, masks, "unmasked")[0].shape == (6, 3)


# ---------------------------------------------------------------- Gram teacher resize


def _reference_resize(features, n_teacher, n_student, mode, antialias):
    """DINOv3's down-resize of the Gram teacher's patch tokens [B, P_T, D] to the student's square grid."""
    maps = features.transpose(-2, -1).unflatten(-1, (n_teacher, n_teacher))  # [B, D, N, N]
    maps = F.interpolate(maps, size=(n_student, n_student), mode=mode, align_corners=False, antialias=antialias)
    return maps.flatten(-2, -1).transpose(-2, -1)


@pytest.mark.parametrize("mode,antialias", [("bicubic", False), ("bicubic", True), ("bilinear", False),
                                            ("bilinear", True)])
@pytest.mark.parametrize("grids", [(8, 4), (6, 4), (7, 3)])
def test_resize_matches_reference(mode, antialias, grids):
    gen = torch.Generator().manual_seed(5)
    features = torch.randn(3, grids[0] ** 2, 8, generator=gen)
    ours = resize_patch_features(features, grids[0], grids[1], mode=mode, antialias=antialias)
    assert ours.shape == (3, grids[1] ** 2, 8)
    torch.testing.assert_close(ours, _reference_resize(features, *grids, mode, antialias), rtol=0, atol=0)


def test_resize_is_row_major_on_the_grid():
    # a 4x4 map of value 10 * row + col, area-averaged to 2x2: each 2x2 block's mean, e.g. top-left
    # (0 + 1 + 10 + 11) / 4 = 5.5, top-right 7.5, bottom-left 25.5, bottom-right 27.5.
    grid = torch.tensor([[10.0 * r + c for c in range(4)] for r in range(4)])
    features = grid.flatten().reshape(1, 16, 1).repeat(1, 1, 2)  # [1, 16, 2], token = r * 4 + c
    out = resize_patch_features(features, 4, 2, mode="area")
    assert out[0, :, 0].tolist() == [5.5, 7.5, 25.5, 27.5] and torch.equal(out[..., 0], out[..., 1])
    wide = resize_patch_features(torch.ones(2, 4 * 6, 3), (4, 6), (2, 3), mode="bicubic", antialias=True)
    torch.testing.assert_close(wide, torch.ones(2, 6, 3))


def test_resize_same_grid_is_identity_and_bad_grid_fails():
    features = torch.randn(2, 16, 4)
    assert resize_patch_features(features, 4, 4) is features
    with pytest.raises(ValueError):
        resize_patch_features(features, 5, 4)


# ---------------------------------------------------------------- loss-weight schedule


def _reference_schedule(start, peak, end, warmup_iterations, total_iterations, cosine_iterations=None):
    """DINOv3's linear_warmup_cosine_decay, restated with numpy."""
    linear = np.linspace(start, peak, warmup_iterations, endpoint=False)
    if cosine_iterations is None:
        cosine_iterations = total_iterations - warmup_iterations
    cosine = (peak - end) * (np.cos(np.linspace(0, np.pi, cosine_iterations)) + 1) / 2 + end
    constant = np.full((total_iterations - cosine_iterations - warmup_iterations,), fill_value=end)
    return np.concatenate([linear, cosine, constant])


@pytest.mark.parametrize("args", [
    dict(start=0.0, peak=0.0, end=2.0, warmup_iterations=10, total_iterations=15, cosine_iterations=1),  # 7B anchor
    dict(start=0.1, peak=1.0, end=0.5, warmup_iterations=7, total_iterations=40),
    dict(start=1.0, peak=1.0, end=0.5, warmup_iterations=0, total_iterations=20, cosine_iterations=12),
    dict(start=0.0, peak=2.0, end=2.0, warmup_iterations=5, total_iterations=9, cosine_iterations=2),
    dict(start=1.5, peak=1.5, end=1.5, warmup_iterations=0, total_iterations=6, cosine_iterations=0),  # high-res adapt
])
def test_loss_weight_schedule_matches_reference(args):
    expected = _reference_schedule(**args)
    ours = [gram_loss_weight(it, **args) for it in range(args["total_iterations"])]
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
    with pytest.raises(IndexError):
        gram_loss_weight(args["total_iterations"], **args)
