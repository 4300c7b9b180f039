"""Building blocks of the DINOv2 ViT, with the official parameter names and initialisation.

Blocks work on *packed* tokens: the tokens of one or several groups of images (e.g. global and
local crops, each group with its own sequence length) laid end to end as ``[T, D]`` with
``shapes = [(B_0, N_0), (B_1, N_1), ...]``. Every linear layer, norm and LayerScale runs once on
the whole pack; only attention is split per group (or uses one block-diagonal xformers call).
The block's attention is in :mod:`dinoreg.models.attention`, its FFNs in :mod:`dinoreg.models.ffn`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dinoreg.models.attention import Attention, Ropes, Shapes
from dinoreg.models.ffn import FFN_LAYERS, Mlp, SplitSwiGLUFFN, SwiGLUFFN
from dinoreg.models.rope import Rope

# the norms of DINOv3's blocks: LayerNorm with eps 1e-6 (DINOv2's) or 1e-5 (DINOv3's released models), RMSNorm
NORM_LAYERS = ("layernorm", "layernormbf16", "rmsnorm")
# activation checkpointing of a block in training: nothing, "selective" (keep the outputs of the matmuls and
# of attention, recompute the rest: norms, activations, layer scales, residual adds), or "full" (keep the
# block's input only, recompute the whole block in the backward pass)
CHECKPOINTING_MODES = ("none", "selective", "full")
_SAVED_BY_SELECTIVE = tuple(getattr(torch.ops.aten, name).default for name in (
    "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name))


def _selective_policy(context: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_BY_SELECTIVE else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> tuple[object, object]:
    return create_selective_checkpoint_contexts(_selective_policy)


class PatchEmbed(nn.Module):
    """Image ``[B, C, H, W]`` -> patch tokens ``[B, (H/p)*(W/p), D]``."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale ``weight``, computed in fp32 and cast back before the scale (as
    DINOv3's)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(name: str, dim: int) -> nn.Module:
    """A norm of :data:`NORM_LAYERS` by name."""
    if name == "rmsnorm":
        return RMSNorm(dim)
    if name in ("layernorm", "layernormbf16"):
        return nn.LayerNorm(dim, eps=1e-6 if name == "layernorm" else 1e-5)
    raise ValueError(f"unknown norm_layer {name!r}; choose one of {NORM_LAYERS}")


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def reset_parameters(self) -> None:
        """The constructor's values (``init_values * ones``, the same float32 numbers)."""
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def pack(xs: Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
    """``[B_i, N_i, D]`` tensors -> packed ``[sum B_i*N_i, D]`` and their shapes."""
    shapes = [(x.shape[0], x.shape[1]) for x in xs]
    flat = [x.reshape(-1, x.shape[-1]) for x in xs]
    return (flat[0] if len(flat) == 1 else torch.cat(flat)), shapes


def unpack(tokens: Tensor, shapes: Shapes) -> list[Tensor]:
    return [t.view(b, n, -1) for t, (b, n) in zip(tokens.split([b * n for b, n in shapes]), shapes)]


def drop_path(residual: Tensor, shapes: Shapes, rate: float) -> Tensor:
    """Per-sample stochastic depth on a packed residual: whole images are zeroed, others rescaled."""
    keep = 1.0 - rate
    masks = [residual.new_empty(b, 1).bernoulli_(keep).div_(keep).repeat_interleave(n, dim=0) for b, n in shapes]
    return residual * (masks[0] if len(masks) == 1 else torch.cat(masks))


def add_residual_on_batch_subset(
    tokens: Tensor, shapes: Shapes, residual_fn: Callable[[Tensor, Shapes], Tensor], rate: float
) -> Tensor:
    """DINOv2's stochastic depth: compute the residual for a random subset of each group's images
    only (saving that compute) and add it scaled by ``batch / subset``."""
    rows, sub_shapes, alphas = [], [], []
    offset = 0
    for batch, n in shapes:
        keep = max(int(batch * (1 - rate)), 1)
        samples = torch.randperm(batch, device=tokens.device)[:keep]
        token_index = offset + samples[:, None] * n + torch.arange(n, device=tokens.device)  # [keep, n]
        rows.append(token_index.reshape(-1))
        sub_shapes.append((keep, n))
        alphas.append(batch / keep)
        offset += batch * n
    residual = residual_fn(tokens[torch.cat(rows)], sub_shapes).to(tokens.dtype)
    for index, part, alpha in zip(rows, residual.split([len(r) for r in rows]), alphas):
        tokens = torch.index_add(tokens, 0, index, part, alpha=alpha)
    return tokens


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path: float = 0.0,
        init_values: float | None = None,
        ffn_layer: str = "mlp",
        attn_backend: str = "sdpa",
        attn_backend_required: bool = False,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: str = "layernorm",
        mask_k_bias: bool = False,
        swiglu_align: int | None = None,
    ) -> None:
        """``norm_layer``, ``mask_k_bias`` and ``swiglu_align`` are the DINOv3 options (RoPE backbones):
        ``swiglu_align`` set makes ``ffn_layer="swiglu"`` DINOv3's split layout (``w1``, ``w2``, ``w3``) with that
        alignment instead of DINOv2's packed ``w12``."""
        super().__init__()
        if ffn_layer not in FFN_LAYERS:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; choose one of {FFN_LAYERS}")
        self.norm1 = make_norm(norm_layer, dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
                              backend=attn_backend, backend_required=attn_backend_required, mask_k_bias=mask_k_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = make_norm(norm_layer, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp: nn.Module
        if ffn_layer == "mlp":
            self.mlp = Mlp(dim, hidden, bias=ffn_bias, act_layer=act_layer)
        elif swiglu_align is not None:
            self.mlp = SplitSwiGLUFFN(dim, hidden, bias=ffn_bias, align_to=swiglu_align)
        else:
            self.mlp = SwiGLUFFN(dim, hidden, bias=ffn_bias, fused=ffn_layer == "swiglufused")
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path_rate = drop_path
        self.always_batch_subset = False  # DINOv3's blocks (the RoPE family set it): see uses_batch_subset
        self.checkpointing = "none"  # see CHECKPOINTING_MODES and set_checkpointing

    def uses_batch_subset(self, is_list: bool) -> bool:
        """Whether stochastic depth (in training) computes the residuals on a batch subset rather than dropping
        whole samples: DINOv2's blocks do for lists of crops, and for one batch when the rate exceeds 0.1 (below
        that its overhead does not pay off); DINOv3's always (``always_batch_subset``)."""
        return is_list or self.always_batch_subset or self.drop_path_rate > 0.1

    def set_checkpointing(self, mode: str) -> None:
        """Activation checkpointing in training (a forward with gradients); see ``CHECKPOINTING_MODES``.
        Gradients are the same as without: the recomputation replays the forward, random draws included."""
        if mode not in CHECKPOINTING_MODES:
            raise ValueError(f"unknown activation checkpointing {mode!r}; choose one of {', '.join(CHECKPOINTING_MODES)}")
        self.checkpointing = mode

    def compile_residuals(self, **options: Any) -> None:
        """``torch.compile`` the attention and FFN branches (static shapes: one graph per set of crop sizes).
        Stochastic depth's random draws stay eager, so a compiled step draws what an eager one does. ``options``:
        more ``torch.compile`` arguments (the tests' ``fullgraph=True``: each branch is one graph)."""
        options = {"dynamic": False, **options}
        self._attn_residual = torch.compile(self._attn_residual, **options)  # type: ignore[method-assign]
        self._ffn_residual = torch.compile(self._ffn_residual, **options)  # type: ignore[method-assign]

    def _attn_residual(self, tokens: Tensor, shapes: Shapes, rope: Ropes = None) -> Tensor:
        return self.ls1(self.attn(self.norm1(tokens), shapes, rope))

    def _ffn_residual(self, tokens: Tensor, shapes: Shapes) -> Tensor:
        return self.ls2(self.mlp(self.norm2(tokens)))

    def forward_packed(self, tokens: Tensor, shapes: Shapes, *, batch_subset: bool, rope: Ropes = None) -> Tensor:
        """``batch_subset`` selects the batch-subset stochastic depth over per-sample drop path (see
        :meth:`uses_batch_subset` for when the official models use it). ``rope``: each group's RoPE (RoPE
        backbones; the same for every image of a group, so a batch subset needs no indexing)."""
        self.attn.check_backend(tokens)  # eagerly, outside the compiled branches
        if self.checkpointing == "none" or not torch.is_grad_enabled():
            return self._forward_packed(tokens, shapes, batch_subset, rope)
        contexts = _selective_contexts if self.checkpointing == "selective" else None
        return checkpoint(self._forward_packed, tokens, shapes, batch_subset, rope, use_reentrant=False,
                          **({"context_fn": contexts} if contexts else {}))

    def _forward_packed(self, tokens: Tensor, shapes: Shapes, batch_subset: bool, rope: Ropes = None) -> Tensor:
        rate = self.drop_path_rate if self.training else 0.0
        attn_residual = self._attn_residual if rope is None else functools.partial(self._attn_residual, rope=rope)
        for residual_fn in (attn_residual, self._ffn_residual):
            if rate > 0 and batch_subset:
                tokens = add_residual_on_batch_subset(tokens, shapes, residual_fn, rate)
            elif rate > 0:
                tokens = tokens + drop_path(residual_fn(tokens, shapes), shapes, rate)
            else:
                tokens = tokens + residual_fn(tokens, shapes)
        return tokens

    def attention_probs(self, x: Tensor, *, num_queries: int | None = None, rope: Optional[Rope] = None) -> Tensor:
        """This block's attention probabilities ``[B, heads, Q, N]`` for its input ``x`` ``[B, N, D]`` (see
        :meth:`Attention.attention_probs`; for analysis, the forward pass is unchanged)."""
        return self.attn.attention_probs(self.norm1(x), num_queries=num_queries, rope=rope)

    def forward(self, x: Tensor | list[Tensor], rope: Optional[Rope] | Ropes = None) -> Tensor | list[Tensor]:
        """``[B, N, D]`` or a list of such tensors (one per resolution), like the official block; ``rope``: the
        tensor's RoPE, or one per tensor of the list (RoPE backbones)."""
        is_list = isinstance(x, (list, tuple))
        tokens, shapes = pack(list(x) if is_list else [x])
        ropes = None if rope is None else (list(rope) if is_list else [rope])  # type: ignore[list-item]
        tokens = self.forward_packed(tokens, shapes, batch_subset=self.uses_batch_subset(is_list), rope=ropes)
        out = unpack(tokens, shapes)
        return out if is_list else out[0]


def init_weights_vit_timm(module: nn.Module) -> None:
    """The official ViT initialisation of linear layers (timm's)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


__all__ = [
    "NORM_LAYERS", "Block", "LayerScale", "PatchEmbed", "RMSNorm", "make_norm", "CHECKPOINTING_MODES", "pack", "unpack",
    "init_weights_vit_timm",
]
