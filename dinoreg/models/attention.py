"""Multi-head self-attention on packed tokens (see :mod:`dinoreg.models.layers`), split per group of a pack or
one block-diagonal xformers call; its backends (SDPA, xformers, math), the one warning of xformers' fallback to SDPA,
and DINOv3's qkv projection with masked key bias."""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoreg.models.kernels import XformersKernels, xformers_kernels
from dinoreg.models.rope import Rope, rope_rotate

Shapes = Sequence[tuple[int, int]]  # [(batch, tokens per image)] for each group in a pack
Ropes = Optional[Sequence[Optional[Rope]]]  # per group of a pack: its (sin, cos), or None (no RoPE)

ATTENTION_BACKENDS = ("sdpa", "xformers", "math")

_warned_backend_fallback = False


def _warn_fallback_once(reason: str) -> None:
    global _warned_backend_fallback
    if not _warned_backend_fallback:
        _warned_backend_fallback = True
        warnings.warn(
            f"attention_backend='xformers' cannot run here ({reason}); using PyTorch SDPA instead. "
            "Set student.attention_backend=sdpa to silence this, or "
            "student.attention_backend_required=true to make it an error.",
            RuntimeWarning,
            stacklevel=3,
        )


class MaskedKeyBiasLinear(nn.Linear):
    """The qkv projection with DINOv3's ``mask_k_bias``: the keys' third of the bias is multiplied by zero (a
    persistent buffer ``bias_mask``, ones elsewhere), so keys carry no bias whatever the bias parameter holds."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        if out_features % 3:
            raise ValueError(f"mask_k_bias needs a qkv projection (out_features divisible by 3), got {out_features}")
        super().__init__(in_features, out_features, bias=bias)
        if bias:
            self.register_buffer("bias_mask", torch.ones(out_features))
            self.reset_bias_mask()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "bias_mask", None) is not None:
            self.reset_bias_mask()

    def reset_bias_mask(self) -> None:
        with torch.no_grad():
            self.bias_mask.fill_(1)
            self.bias_mask[self.out_features // 3: 2 * self.out_features // 3] = 0

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias * self.bias_mask.to(self.bias.dtype) if self.bias is not None else None
        return F.linear(x, self.weight, bias)


class Attention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        backend: str = "sdpa",
        backend_required: bool = False,
        mask_k_bias: bool = False,
    ) -> None:
        super().__init__()
        self.backend = backend  # see the setter: xformers' availability is decided there
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.backend_required = backend_required
        self.qkv = (MaskedKeyBiasLinear if mask_k_bias else nn.Linear)(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self._block_diagonal_masks: dict[tuple, object] = {}

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        """Setting the backend (at construction, or later) decides once whether xformers is importable, so that no
        forward pass, compiled or not, tries the import: ``xformers`` holds its kernels, or None."""
        if value not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {value!r}; choose one of {ATTENTION_BACKENDS}")
        self._backend = value
        kernels = xformers_kernels() if value == "xformers" else None
        self.xformers = kernels if isinstance(kernels, XformersKernels) else None
        self._xformers_missing = kernels if isinstance(kernels, str) else ""

    def _backend_for(self, x: Tensor) -> str:
        """The kernel for ``x``, from attributes and the device alone (what Dynamo traces without a break)."""
        if self.backend != "xformers":
            return self.backend
        return "xformers" if self.xformers is not None and x.is_cuda else "sdpa"

    def check_backend(self, x: Tensor) -> None:
        """When ``attention_backend='xformers'`` cannot run on ``x``: the error if it is required, else the one
        warning of the fallback to SDPA. Run eagerly: ``Block.forward_packed`` calls it before its (perhaps compiled)
        branches, and ``forward`` when it is not being compiled (a warning is not traced into a graph)."""
        if self.backend != "xformers" or self._backend_for(x) == "xformers":
            return
        reason = self._xformers_missing or "xformers has no kernels for device " + x.device.type
        if self.backend_required:
            raise RuntimeError(f"attention_backend='xformers' is required but {reason}")
        if not torch.compiler.is_compiling():
            _warn_fallback_once(reason)

    def _split_heads(self, qkv: Tensor, batch: int, tokens: int, rope: Optional[Rope] = None
                     ) -> tuple[Tensor, Tensor, Tensor]:
        # [B*N, 3*C] -> 3 x [B, heads, N, head_dim], queries and keys rotated by the rope when given
        q, k, v = qkv.view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = rope_rotate(q, rope), rope_rotate(k, rope)
        return q, k, v

    def attention_probs(self, x: Tensor, *, num_queries: int | None = None, rope: Optional[Rope] = None) -> Tensor:
        """Softmax attention of ``x`` ``[B, N, C]`` as ``[B, heads, Q, N]`` in fp32, for the first ``num_queries``
        tokens as queries (all N when None; 1 + R for the cls and registers spares the N x N map). For analysis:
        computed explicitly whatever the backend."""
        batch, tokens, _ = x.shape
        q, k, _ = self._split_heads(self.qkv(x).reshape(batch * tokens, -1), batch, tokens, rope)
        q = q[:, :, :num_queries] if num_queries is not None else q  # [B, heads, Q, head_dim]
        return ((q.float() * self.scale) @ k.float().transpose(-2, -1)).softmax(dim=-1)

    def forward(self, x: Tensor, shapes: Shapes, rope: Ropes = None) -> Tensor:
        """``x``: packed tokens ``[T, C]``; ``rope``: each group's (sin, cos) for RoPE backbones; returns ``[T, C]``."""
        self.check_backend(x)
        backend = self._backend_for(x)
        qkv = self.qkv(x)  # [T, 3C]
        ropes = list(rope) if rope is not None else [None] * len(shapes)
        if backend == "xformers" and all(r is None for r in ropes):
            out = self._xformers(qkv, shapes)
        else:
            outs = []
            for group, (batch, tokens), group_rope in zip(qkv.split([b * n for b, n in shapes]), shapes, ropes):
                q, k, v = self._split_heads(group, batch, tokens, group_rope)
                if backend == "xformers":  # rotated queries and keys: one call per group
                    assert self.xformers is not None
                    o = self.xformers.memory_efficient_attention(*(t.transpose(1, 2) for t in (q, k, v)))
                    outs.append(o.reshape(batch * tokens, -1))
                    continue
                if backend == "sdpa":
                    o = F.scaled_dot_product_attention(q, k, v)
                else:
                    o = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
                outs.append(o.transpose(1, 2).reshape(batch * tokens, -1))  # [B*N, C]
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.proj(out)

    def _xformers(self, qkv: Tensor, shapes: Shapes) -> Tensor:
        kernels = self.xformers
        assert kernels is not None  # _backend_for chose xformers
        total = qkv.shape[0]
        if len(shapes) == 1:
            batch, tokens = shapes[0]
            q, k, v = qkv.view(batch, tokens, 3, self.num_heads, self.head_dim).unbind(2)
            return kernels.memory_efficient_attention(q, k, v).reshape(total, -1)
        key = tuple(shapes)
        if key not in self._block_diagonal_masks:
            seqlens = [n for b, n in shapes for _ in range(b)]
            self._block_diagonal_masks[key] = kernels.block_diagonal_mask(seqlens)
        q, k, v = qkv.view(1, total, 3, self.num_heads, self.head_dim).unbind(2)
        out = kernels.memory_efficient_attention(q, k, v, attn_bias=self._block_diagonal_masks[key])
        return out.reshape(total, -1)


__all__ = ["ATTENTION_BACKENDS", "Attention", "MaskedKeyBiasLinear"]
