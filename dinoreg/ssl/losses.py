"""DINO (cls token), iBOT (masked patches) and KoLeo losses, with the teacher's centering.

Same inputs -> same values as the official DINOv2 code (``dinov2/loss/``). Deliberate differences:

* Everything is computed in fp32, whatever the input dtype (bf16 logits are upcast first).
* Sinkhorn-Knopp runs in the log domain, after subtracting each prototype's globally reduced max
  logit. The official version exponentiates ``logits / teacher_temp`` directly, which overflows to
  inf (then NaN) in fp32 as soon as a logit exceeds ~3.5 at ``teacher_temp=0.04``; subtracting one
  global max alone is not enough either (whole prototypes then underflow to 0 and give 0/0). The
  official scalings (``/ sum(Q)``, ``/ K``, ``/ B``, ``* B``) each cancel in the normalisation that
  follows them, so they are omitted: the result is mathematically identical.
* Softmax centering uses ``F.softmax``, which already subtracts the row max (stable at any scale).
* Collectives go through :mod:`dinoreg.distributed` (no-ops in a single process). A centre
  update reduces the batch sum together with its row count, so ranks may hold different numbers
  of rows; with equal counts this equals the official ``sum / (len * world_size)``. An iBOT rank
  with no masked patch contributes nothing instead of the official NaN mean of an empty batch.
* The centre is updated in place (``copy_``) so the registered buffer keeps its identity (FSDP,
  DCP). A pending (deferred) update is not part of the loss's own state dict, as in the official code;
  :class:`~dinoreg.ssl.meta_arch.SSLMetaArch` folds it in (:meth:`apply_center_update`) whenever its state is
  read, so a checkpoint always holds the settled centres.
* Lean over the 65k-131k prototypes: logits may stay bf16 and are upcast a chunk of rows at a time; the
  student/teacher cross-entropy (:func:`soft_cross_entropies`) and the centred teacher softmax work on row
  chunks of at most ``chunk_elements`` values, and autograd keeps only the logits and the teacher's
  probabilities (the backward pass recomputes each chunk's log-softmax), not an fp32 ``[rows, K]`` log-softmax;
  Sinkhorn-Knopp updates its one ``[K, rows]`` buffer in place. Every row's arithmetic is the plain one, so when
  all rows fit in one chunk (the small recipes) the values are bitwise those of the unchunked expressions.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoreg.distributed import all_reduce_max, all_reduce_sum

__all__ = ["DINOLoss", "iBOTPatchLoss", "KoLeoLoss", "sinkhorn_knopp", "soft_cross_entropies",
           "DEFAULT_CHUNK_ELEMENTS"]

DEFAULT_CHUNK_ELEMENTS = 1 << 24  # values of one [rows, K] chunk: 64 MiB in fp32, 128 rows of 131,072 prototypes


def _row_chunks(rows: int, width: int, chunk_elements: int) -> list[slice]:
    """Slices of at most ``chunk_elements // width`` rows (at least one row each) covering ``range(rows)``."""
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be a positive number of values, got {chunk_elements}")
    step = max(1, chunk_elements // max(width, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)] or [slice(0, 0)]


def _rows_cross_entropies(student_logits: Tensor, teacher_probs: Sequence[Tensor], student_temp: float
                          ) -> list[Tensor]:
    """For each teacher ``t``: ``sum_k t * log_softmax(s / student_temp)`` per row, the plain expression."""
    log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return [torch.sum(t.float() * log_probs, dim=-1) for t in teacher_probs]


class _ChunkedCrossEntropies(torch.autograd.Function):
    """:func:`_rows_cross_entropies` a chunk of rows at a time; the backward pass recomputes each chunk and
    writes its gradient into one buffer shaped like the logits."""

    @staticmethod
    def forward(ctx, student_logits: Tensor, student_temp: float, chunks: list[slice], *teacher_probs: Tensor
                ) -> tuple[Tensor, ...]:
        ctx.save_for_backward(student_logits, *teacher_probs)
        ctx.student_temp, ctx.chunks = student_temp, chunks
        parts = [_rows_cross_entropies(student_logits[rows], [t[rows] for t in teacher_probs], student_temp)
                 for rows in chunks]
        return tuple(torch.cat(per_teacher) for per_teacher in zip(*parts))

    @staticmethod
    def backward(ctx, *grad_rows: Tensor):
        student_logits, *teacher_probs = ctx.saved_tensors
        grad = torch.empty_like(student_logits)
        for rows in ctx.chunks:
            with torch.enable_grad():
                chunk = student_logits[rows].detach().requires_grad_(True)
                outputs = _rows_cross_entropies(chunk, [t[rows] for t in teacher_probs], ctx.student_temp)
                grad[rows] = torch.autograd.grad(outputs, chunk, [g[rows] for g in grad_rows])[0]
        return (grad, None, None, *([None] * len(teacher_probs)))


def soft_cross_entropies(student_logits: Tensor, teacher_probs: Sequence[Tensor], student_temp: float, *,
                         chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> list[Tensor]:
    """student_logits: [N, K] (any float dtype); teacher_probs: each [N, K]. For each teacher, the [N] fp32
    ``sum_k t * log_softmax(s / student_temp)`` (the negative cross-entropy), with at most ``chunk_elements``
    values of any ``[rows, K]`` temporary alive at once, forward and backward."""
    chunks = _row_chunks(student_logits.shape[0], student_logits.shape[-1], chunk_elements)
    return list(_ChunkedCrossEntropies.apply(student_logits, student_temp, chunks, *teacher_probs))


def _global_max_over_samples(x: Tensor) -> Tensor:
    """max over dim 1 (samples) of a [K, n_local] matrix, across all ranks -> [K, 1]; -inf where no
    rank has samples (a rank may hold none, e.g. no masked patches)."""
    if x.shape[1] > 0:
        row_max = x.amax(dim=1, keepdim=True)
    else:
        row_max = x.new_full((x.shape[0], 1), float("-inf"))
    all_reduce_max(row_max)
    return row_max


def _global_logsumexp_over_samples(log_q: Tensor) -> Tensor:
    """logsumexp over dim 1 (samples) of a [K, n_local] matrix, across all ranks -> [K, 1]."""
    row_max = _global_max_over_samples(log_q)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    row_sum = (log_q - row_max).exp_().sum(dim=1, keepdim=True)  # [K, 1]
    all_reduce_sum(row_sum)
    return row_max + torch.log(row_sum)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """Balanced soft assignment of the samples (over all ranks) to the K prototypes.

    teacher_logits: [N, K] (this rank's rows). Returns [N, K] fp32; each row sums to 1 and, over the
    global batch, each prototype receives about N_global / K of the mass.
    """
    if n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp needs n_iterations >= 1, got {n_iterations}")
    # [K, N], K-by-B as in the paper: the one fp32 buffer, updated in place (the teacher's logits are kept)
    log_q = teacher_logits.t().to(torch.float32, copy=True)
    # A per-prototype constant cancels in the first row normalisation; subtracting the global max
    # keeps every exponent <= 0, and working with logs keeps prototypes/samples far below it alive.
    proto_max = _global_max_over_samples(log_q)  # [K, 1]
    log_q.sub_(proto_max).div_(teacher_temp)  # <= 0
    for _ in range(n_iterations):
        # every prototype gets the same total weight (official: 1/K; the constant cancels next)
        log_q.sub_(_global_logsumexp_over_samples(log_q))
        # every sample's weights sum to 1 (official: 1/B, then * B after the last iteration)
        log_q.sub_(torch.logsumexp(log_q, dim=0, keepdim=True))
    return log_q.exp_().t()  # [N, K]


class _CenteredTeacherLoss(nn.Module):
    """Centre buffer with the official deferred EMA: ``update_center`` starts the reduction of the
    batch statistics, the next ``softmax_center_teacher`` waits for it and applies it."""

    center: Tensor

    def __init__(self, center_shape: tuple[int, ...], student_temp: float, center_momentum: float,
                 chunk_elements: int):
        super().__init__()
        _row_chunks(0, 1, chunk_elements)  # a bad value fails here, not in the first step
        self.student_temp, self.chunk_elements = student_temp, chunk_elements
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(center_shape))
        self._pending: tuple[Tensor, object] | None = None  # ([K + 1] sum and count, work handle)

    def reset_parameters(self) -> None:
        """The constructor's centre (zeros), for a model built on the meta device."""
        nn.init.zeros_(self.center)

    @torch.no_grad()
    def _queue_center_update(self, batch_sum: Tensor, count: float) -> None:
        """batch_sum: [K] fp32 sum of this rank's contributions; count: how many they are."""
        packed = torch.cat([batch_sum.reshape(-1), batch_sum.new_tensor([count])])  # [K + 1]
        handle = all_reduce_sum(packed, async_op=True)
        self._pending = (packed, handle)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Fold a pending ``update_center`` into ``center`` (no-op when none is pending)."""
        if self._pending is None:
            return
        packed, handle = self._pending
        self._pending = None
        if handle is not None:
            handle.wait()
        batch_sum, count = packed[:-1], packed[-1]  # [K], []
        batch_center = (batch_sum / count.clamp(min=1.0)).to(self.center.device)
        momentum = self.center_momentum
        updated = self.center * momentum + batch_center.view_as(self.center) * (1 - momentum)
        # no host sync: keep the old centre when no rank contributed anything
        self.center.copy_(torch.where(count.to(self.center.device) > 0, updated, self.center))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Applies any pending centre update first (official order), then
        softmax((logits - center) / teacher_temp) in fp32, a chunk of rows (dim -2) at a time; same shape as
        the input."""
        self.apply_center_update()
        chunks = _row_chunks(teacher_logits.shape[-2], teacher_logits.shape[-1], self.chunk_elements)
        if len(chunks) == 1:
            return F.softmax(torch.sub(teacher_logits, self.center).div_(teacher_temp), dim=-1)
        probs = torch.empty(teacher_logits.shape, dtype=torch.float32, device=teacher_logits.device)
        for rows in chunks:
            centred = torch.sub(teacher_logits[..., rows, :], self.center).div_(teacher_temp)  # fp32 (promoted)
            probs[..., rows, :] = F.softmax(centred, dim=-1)
        return probs


class DINOLoss(_CenteredTeacherLoss):
    """Cross-entropy between the teacher's and the student's cls-token prototype scores."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, *,
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        super().__init__((1, out_dim), student_temp, center_momentum, chunk_elements)  # center: [1, K]

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> Tensor:
        """teacher_logits: [N, K] -> [N, K] probabilities, balanced over the global batch."""
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """teacher_logits: [N, K]. The batch mean (over all ranks) enters the EMA at the next
        ``softmax_center_teacher``."""
        self._queue_center_update(teacher_logits.sum(dim=0, dtype=torch.float32), float(teacher_logits.shape[0]))

    def forward(
        self, student_logits_list: Sequence[Tensor], teacher_probs_list: Sequence[Tensor]
    ) -> Tensor:
        """student_logits_list: each [B, K]; teacher_probs_list: each [B, K].

        -sum over every (student, teacher) pair of mean_b sum_k t * log_softmax(s / student_temp).
        """
        if len(student_logits_list) == 0 or len(teacher_probs_list) == 0:
            raise ValueError("DINOLoss needs at least one student and one teacher tensor")
        total_loss = None
        for student_logits in student_logits_list:
            for rows in soft_cross_entropies(student_logits, teacher_probs_list, self.student_temp,
                                             chunk_elements=self.chunk_elements):  # [B] per teacher
                term = -rows.mean()
                total_loss = term if total_loss is None else total_loss + term
        return total_loss


class iBOTPatchLoss(_CenteredTeacherLoss):  # noqa: N801 (the field's spelling)
    """Cross-entropy between teacher and student prototype scores of the masked patches."""

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, *,
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        super().__init__((1, 1, patch_out_dim), student_temp, center_momentum, chunk_elements)  # [1, 1, K]

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_logits: Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: Tensor | int | None = None,
        n_iterations: int = 3,
    ) -> Tensor:
        """teacher_logits: [M, K] (this rank's masked patches) -> [M, K].

        ``n_masked_patches_tensor`` (the official global B) is accepted for the official signature
        but not needed: B only scales Q by a constant that the next normalisation removes.
        """
        del n_masked_patches_tensor
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations)

    @torch.no_grad()
    def update_center(self, teacher_patch_logits: Tensor) -> None:
        """teacher_patch_logits: [M, K] or [G, M, K] (the official meta-arch passes [1, M, K]).
        The official statistic: sum over G of the mean over M, averaged over ranks."""
        logits = teacher_patch_logits
        if logits.ndim == 2:
            logits = logits.unsqueeze(0)  # [1, M, K]
        if logits.shape[1] == 0:  # no masked patch on this rank: contribute nothing
            self._queue_center_update(logits.new_zeros(logits.shape[-1], dtype=torch.float32), 0.0)
            return
        self._queue_center_update(logits.mean(dim=1, dtype=torch.float32).sum(dim=0), float(logits.shape[0]))

    def forward_masked(
        self,
        student_logits: Tensor,
        teacher_probs: Tensor,
        student_masks_flat: Tensor,
        n_masked_patches: int | None = None,
        masks_weight: Tensor | None = None,
    ) -> Tensor:
        """student_logits, teacher_probs: [M, K] (masked patches, image-major order);
        student_masks_flat: [B, N] bool; masks_weight: [M], default 1 / (masked patches of the
        patch's image). Returns -(sum_m w_m * sum_k t log_softmax(s / T)) / B: every image counts
        in B, masked or not."""
        loss, = soft_cross_entropies(student_logits, [teacher_probs], self.student_temp,
                                     chunk_elements=self.chunk_elements)  # [M]
        if masks_weight is None:
            per_image = 1.0 / student_masks_flat.sum(dim=-1).clamp(min=1.0)  # [B]
            masks_weight = per_image.unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        loss = loss * masks_weight.float()
        return -loss.sum() / student_masks_flat.shape[0]


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator (Sablayrolles et al. 2018): pushes each L2-normalised
    vector away from its nearest neighbour in the batch."""

    def __init__(self):
        super().__init__()
        self.pairwise_distance = nn.PairwiseDistance(p=2, eps=1e-8)

    def forward(self, x: Tensor, eps: float = 1e-8) -> Tensor:
        """x: [B, D] with B >= 2 (the batch on this rank). Returns -mean_b log(||x_b - x_nn(b)|| + eps)."""
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(
                f"KoLeoLoss needs a [B, D] batch with B >= 2 to find nearest neighbours, got shape "
                f"{tuple(x.shape)}; raise train.batch_size_per_gpu to at least 2 or set "
                "dino.koleo_loss_weight=0"
            )
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.normalize(x.float(), p=2, dim=-1, eps=eps)  # [B, D]
            with torch.no_grad():
                dots = x @ x.t()  # [B, B]; max inner product = min distance on the sphere
                dots.fill_diagonal_(-1.0)  # never pick oneself (the official trick)
                nearest = torch.max(dots, dim=1).indices  # [B]
            distances = self.pairwise_distance(x, x[nearest])  # [B]
            return -torch.log(distances + eps).mean()
