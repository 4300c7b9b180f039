import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinoreg import distributed
from dinoreg.ssl.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss, sinkhorn_knopp, soft_cross_entropies


def _log_softmax(row, temp):
    z = [v / temp for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def _official_sinkhorn_plain(logits: np.ndarray, temp: float, n_iterations: int = 3) -> np.ndarray:
    """The official algorithm, literally, in the dtype of ``logits`` (single process)."""
    with np.errstate(all="ignore"):
        q = np.exp(logits / temp).T  # [K, B]
        num_prototypes, batch = q.shape
        q = q / q.sum()
        for _ in range(n_iterations):
            q = q / q.sum(axis=1, keepdims=True) / num_prototypes
            q = q / q.sum(axis=0, keepdims=True) / batch
        return (q * batch).T


# ---------------------------------------------------------------- DINO loss


def test_dino_forward_hand_computed_sum_over_pairs():
    loss_fn = DINOLoss(out_dim=3, student_temp=0.1)
    students = [[[1.0, 0.0, -1.0], [0.5, 0.2, 0.1]], [[0.0, 0.3, 0.0], [-0.2, 0.1, 0.4]]]
    teachers = [[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], [[1 / 3, 1 / 3, 1 / 3], [0.0, 1.0, 0.0]]]
    expected = 0.0
    for s in students:
        for t in teachers:
            rows = [sum(tk * lk for tk, lk in zip(t_b, _log_softmax(s_b, 0.1))) for s_b, t_b in zip(s, t)]
            expected -= sum(rows) / len(rows)
    got = loss_fn([torch.tensor(s) for s in students], [torch.tensor(t) for t in teachers])
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # one pair is one term: the 2x2 loss is the sum of the four 1x1 losses
    pairs = sum(loss_fn([torch.tensor(s)], [torch.tensor(t)]) for s in students for t in teachers)
    assert got.item() == pytest.approx(pairs.item(), rel=1e-6)


def test_dino_forward_bf16_inputs_computed_in_fp32():
    loss_fn = DINOLoss(out_dim=5)
    s, t = torch.randn(4, 5), torch.softmax(torch.randn(4, 5), -1)
    s16, t16 = s.bfloat16(), t.bfloat16()
    got = loss_fn([s16], [t16])
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(loss_fn([s16.float()], [t16.float()]).item(), rel=1e-6)


# ---------------------------------------------------------------- softmax centering


def test_center_ema_is_deferred_to_next_softmax():
    loss_fn = DINOLoss(out_dim=3, center_momentum=0.9)
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, -3.0]])
    loss_fn.update_center(logits)
    # official order: the update waits for the next softmax_center_teacher
    assert torch.equal(loss_fn.center, torch.zeros(1, 3))
    probs = loss_fn.softmax_center_teacher(logits, teacher_temp=0.5)
    expected_center = torch.tensor([[0.1 * 2.0, 0.1 * 1.0, 0.1 * 0.0]])  # 0.9 * 0 + 0.1 * mean
    torch.testing.assert_close(loss_fn.center, expected_center)
    torch.testing.assert_close(probs, torch.softmax((logits - expected_center) / 0.5, dim=-1))
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    # a second update: 0.9 * c + 0.1 * mean(new batch); applying twice does nothing more
    loss_fn.update_center(torch.tensor([[10.0, 0.0, 0.0]]))
    loss_fn.softmax_center_teacher(logits, 0.5)
    loss_fn.softmax_center_teacher(logits, 0.5)
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.9 * 0.2 + 1.0, 0.09, 0.0]]))


def test_softmax_center_stable_at_low_temperature_large_logits():
    loss_fn = DINOLoss(out_dim=16)
    logits = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)) * 1e3
    loss_fn.update_center(logits)
    probs = loss_fn.softmax_center_teacher(logits, teacher_temp=0.04)
    assert torch.isfinite(probs).all()
    center64 = 0.1 * logits.double().mean(0, keepdim=True)
    ref = torch.softmax((logits.double() - center64) / 0.04, dim=-1)
    torch.testing.assert_close(probs.double(), ref, atol=1e-6, rtol=1e-4)


def test_ibot_center_from_official_shapes_and_bf16():
    loss_fn = iBOTPatchLoss(patch_out_dim=4, center_momentum=0.9)
    assert loss_fn.center.shape == (1, 1, 4)
    patches = torch.randn(6, 4)
    loss_fn.update_center(patches.unsqueeze(0).bfloat16())  # the official meta-arch passes [1, M, K]
    probs = loss_fn.softmax_center_teacher(patches.unsqueeze(0), 0.07)  # [1, M, K]
    expected_center = 0.1 * patches.bfloat16().float().mean(0)
    torch.testing.assert_close(loss_fn.center, expected_center.view(1, 1, 4))
    assert probs.shape == (1, 6, 4) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 6))
    # [M, K] is read as [1, M, K]; an empty batch leaves the centre alone
    before = loss_fn.center.clone()
    loss_fn.update_center(torch.zeros(0, 4))
    loss_fn.apply_center_update()
    torch.testing.assert_close(loss_fn.center, before)


def test_pending_update_not_in_state_dict_until_applied():
    loss_fn = DINOLoss(out_dim=2)
    loss_fn.update_center(torch.tensor([[1.0, 3.0]]))
    assert torch.equal(loss_fn.state_dict()["center"], torch.zeros(1, 2))
    loss_fn.apply_center_update()
    torch.testing.assert_close(loss_fn.state_dict()["center"], torch.tensor([[0.1, 0.3]]))


# ---------------------------------------------------------------- Sinkhorn-Knopp


def test_sinkhorn_columns_sum_to_one_and_rows_balance_with_iterations():
    batch, protos = 32, 8
    logits = torch.randn(batch, protos, generator=torch.Generator().manual_seed(1)) * 0.5
    logits[:, 0] += 1.0  # a prototype every sample prefers
    spreads = []
    for n_iterations in (1, 3, 10, 100):
        q = DINOLoss(protos).sinkhorn_knopp_teacher(logits, teacher_temp=0.1, n_iterations=n_iterations)
        torch.testing.assert_close(q.sum(dim=1), torch.ones(batch), atol=1e-6, rtol=0)
        spreads.append((q.sum(dim=0) - batch / protos).abs().max().item())
    assert spreads == sorted(spreads, reverse=True)
    assert spreads[0] > 0.1 and spreads[-1] < 1e-4  # -> B / K per prototype


def test_sinkhorn_equals_official_in_float64():
    logits = torch.randn(12, 10, generator=torch.Generator().manual_seed(2)) * 3
    ours = DINOLoss(10).sinkhorn_knopp_teacher(logits, teacher_temp=0.07)
    ref = _official_sinkhorn_plain(logits.double().numpy(), 0.07)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.double().numpy(), ref, atol=1e-6, rtol=1e-4)
    # the iBOT variant is the same algorithm over masked patches
    ours_ibot = iBOTPatchLoss(10).sinkhorn_knopp_teacher(logits, 0.07, torch.tensor([12]))
    torch.testing.assert_close(ours_ibot, ours)


def test_sinkhorn_fp32_no_overflow_where_official_overflows():
    # logits ~20 at T=0.04: exp(500) overflows fp32 (official -> NaN) but not float64
    logits = torch.randn(16, 32, generator=torch.Generator().manual_seed(3)) * 5 + 10
    official_fp32 = _official_sinkhorn_plain(logits.numpy(), 0.04)
    assert not np.isfinite(official_fp32).all()
    ref64 = _official_sinkhorn_plain(logits.double().numpy(), 0.04)
    assert np.isfinite(ref64).all()
    ours = sinkhorn_knopp(logits, 0.04)
    np.testing.assert_allclose(ours.double().numpy(), ref64, atol=1e-5, rtol=1e-3)

    # logits up to 1e3: even a single global max subtraction underflows whole prototypes to 0/0
    big = torch.randn(16, 32, generator=torch.Generator().manual_seed(4)) * 1e3
    shifted = _official_sinkhorn_plain((big - big.max()).numpy(), 0.04)
    assert not np.isfinite(shifted).all()
    ours_big = sinkhorn_knopp(big, 0.04)
    assert torch.isfinite(ours_big).all()
    torch.testing.assert_close(ours_big.sum(dim=1), torch.ones(16), atol=1e-5, rtol=0)


def test_sinkhorn_bf16_input_and_empty_ibot_batch():
    logits = torch.randn(6, 5)
    out = sinkhorn_knopp(logits.bfloat16(), 0.1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sinkhorn_knopp(logits.bfloat16().float(), 0.1))
    assert iBOTPatchLoss(5).sinkhorn_knopp_teacher(torch.zeros(0, 5), 0.1, torch.tensor([0])).shape == (0, 5)


def test_sinkhorn_leaves_the_logits_alone():
    logits = torch.randn(7, 5)
    kept = logits.clone()
    out = sinkhorn_knopp(logits, 0.1)
    assert torch.equal(logits, kept) and out.data_ptr() != logits.data_ptr()


# ---------------------------------------------------------------- the lean prototype losses


def _plain_cross_entropies(student, teachers, temp):
    """The unchunked expression the losses compute, written plainly."""
    log_probs = F.log_softmax(student.float() / temp, dim=-1)
    return [torch.sum(t * log_probs, dim=-1) for t in teachers]


@pytest.mark.parametrize("chunk_elements", [1 << 24, 3 * 64, 64, 1])  # one chunk, 3 rows, 1 row, 1 row (< K)
def test_soft_cross_entropies_are_the_plain_expression_forward_and_backward(chunk_elements):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(10, 64, generator=g) * 3
    teachers = [F.softmax(torch.randn(10, 64, generator=g), dim=-1) for _ in range(2)]
    weights = [torch.randn(10, generator=g) for _ in range(2)]  # any downstream use of the rows

    def grad_of(function):
        leaf = student.clone().requires_grad_(True)
        rows = function(leaf, teachers, 0.1)
        sum((r * w).sum() for r, w in zip(rows, weights)).backward()
        return rows, leaf.grad

    ours, our_grad = grad_of(lambda s, t, temp: soft_cross_entropies(s, t, temp, chunk_elements=chunk_elements))
    plain, plain_grad = grad_of(_plain_cross_entropies)
    # every row is computed by the same kernels as the unchunked expression: equal on this CPU
    for a, b in zip(ours, plain):
        assert torch.equal(a, b)
    assert torch.equal(our_grad, plain_grad)


def test_soft_cross_entropies_keep_no_fp32_copy_of_bf16_logits():
    """Autograd keeps the inputs themselves (the bf16 logits, the teacher's probabilities), not an fp32
    [rows, K] log-softmax; the gradient comes back in the logits' dtype."""
    student = torch.randn(6, 32).bfloat16().requires_grad_(True)
    teacher = F.softmax(torch.randn(6, 32), dim=-1)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rows, = soft_cross_entropies(student, [teacher], 0.1, chunk_elements=2 * 32)
    assert {(str(t.dtype), t.data_ptr()) for t in saved} == {
        ("torch.bfloat16", student.data_ptr()), ("torch.float32", teacher.data_ptr())}
    rows.sum().backward()
    assert student.grad.dtype == torch.bfloat16
    plain, = _plain_cross_entropies(student.detach().requires_grad_(True), [teacher], 0.1)
    assert torch.equal(rows.detach(), plain.detach())


def test_chunked_teacher_softmax_equals_one_chunk():
    logits = torch.randn(1, 9, 16) * 4
    whole, chunked = iBOTPatchLoss(16), iBOTPatchLoss(16, chunk_elements=2 * 16)  # 5 chunks of <= 2 rows
    for loss in (whole, chunked):
        loss.center.copy_(torch.linspace(-1, 1, 16))
    assert torch.equal(chunked.softmax_center_teacher(logits, 0.07), whole.softmax_center_teacher(logits, 0.07))
    # bf16 logits are promoted against the fp32 centre chunk by chunk, never copied whole
    assert torch.equal(chunked.softmax_center_teacher(logits.bfloat16(), 0.07),
                       whole.softmax_center_teacher(logits.bfloat16().float(), 0.07))
    with pytest.raises(ValueError, match="chunk_elements must be a positive"):
        DINOLoss(16, chunk_elements=0)


# ---------------------------------------------------------------- iBOT


def test_ibot_forward_masked_hand_computed():
    loss_fn = iBOTPatchLoss(patch_out_dim=3, student_temp=0.1)
    # 3 images of 4 patches: image 0 has 1 masked patch, image 1 has 2, image 2 none (still counts)
    masks = torch.tensor(
        [[False, True, False, False], [True, False, False, True], [False, False, False, False]]
    )
    student = [[0.2, -0.1, 0.4], [1.0, 0.0, 0.5], [-0.3, 0.3, 0.0]]  # [M=3, K]
    teacher = [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.0, 0.5, 0.5]]
    ce = [sum(t * l for t, l in zip(t_m, _log_softmax(s_m, 0.1))) for s_m, t_m in zip(student, teacher)]
    expected = -(ce[0] / 1 + ce[1] / 2 + ce[2] / 2) / 3
    s, t = torch.tensor(student), torch.tensor(teacher)
    got = loss_fn.forward_masked(s, t, masks)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # the collate's weights and a padded buffer trimmed to n_masked_patches give the same value
    weights = torch.tensor([1.0, 0.5, 0.5])
    s_pad, t_pad = torch.cat([s, torch.randn(2, 3)]), torch.cat([t, torch.rand(2, 3)])
    padded = loss_fn.forward_masked(s_pad, t_pad, masks, n_masked_patches=3, masks_weight=weights)
    assert padded.item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- KoLeo


def test_koleo_hand_computed_three_points():
    # unit vectors at 0, 90 and 180+45 degrees (scaled: normalisation must undo it)
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, -1.0]])
    # nearest by angle: 0 -> 1 (90 deg), 1 -> 0 (90 deg), 2 -> 0 or 1 (135 deg tie; both sqrt(2+sqrt2))
    d90 = math.sqrt(2.0)
    d135 = math.sqrt(2.0 + math.sqrt(2.0))
    expected = -(2 * math.log(d90 + 1e-8) + math.log(d135 + 1e-8)) / 3
    assert KoLeoLoss()(x).item() == pytest.approx(expected, rel=1e-5)


def test_koleo_needs_two_samples_and_handles_duplicates():
    with pytest.raises(ValueError, match="batch_size_per_gpu"):
        KoLeoLoss()(torch.randn(1, 8))
    x = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    loss = KoLeoLoss()(x)
    # duplicates: distance sqrt(3) * 1e-8 (PairwiseDistance eps), so log(d + eps) ~ -17.4
    expected = -(2 * math.log(math.sqrt(3) * 1e-8 + 1e-8) + math.log(math.sqrt(2) + 1e-8)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_koleo_bf16_input_is_fp32():
    x = torch.randn(5, 7)
    got = KoLeoLoss()(x.bfloat16())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(KoLeoLoss()(x.bfloat16().float()).item(), rel=1e-6)


# ---------------------------------------------------------------- distributed helpers


def test_distributed_helpers_are_noops_in_one_process():
    assert not distributed.is_distributed()
    assert distributed.world_size() == 1
    t = torch.tensor([1.0, -2.0])
    assert distributed.all_reduce_sum(t) is t and distributed.all_reduce_max(t) is t
    assert distributed.all_reduce_sum(t, async_op=True) is None
    torch.testing.assert_close(t, torch.tensor([1.0, -2.0]))
