"""Building blocks of the DINOv2 ViT, with the official parameter names and initialisation.

Blocks work on *packed* tokens: the tokens of one or several groups of images (e.g. global and
local crops, each group with its own sequence length) laid end to end as ``[T, D]`` with
``shapes = [(B_0, N_0), (B_1, N_1), ...]``. Every linear layer, norm and LayerScale runs once on
the whole pack; only attention is split per group (or uses one block-diagonal xformers call).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dinoreg.models.rope import Rope, rope_rotate

Shapes = Sequence[tuple[int, int]]  # [(batch, tokens per image)] for each group in a pack
Ropes = Optional[Sequence[Optional[Rope]]]  # per group of a pack: its (sin, cos), or None (no RoPE)

ATTENTION_BACKENDS = ("sdpa", "xformers", "math")
FFN_LAYERS = ("mlp", "swiglu", "swiglufused")
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


@functools.lru_cache(maxsize=1)
def xformers_ops():
    """Return ``xformers.ops`` or an ImportError explaining why it cannot be used."""
    try:
        import xformers.ops as ops  # noqa: PLC0415 (optional dependency)
    except Exception as error:  # a broken xformers build raises more than ImportError
        return ImportError(f"xformers is not importable ({type(error).__name__}: {error})")
    return ops


class XformersKernels(NamedTuple):
    """The xformers functions the layers call. A layer that may use xformers looks them up once, when it is built
    (``xformers_kernels``), and keeps them as a plain attribute: its forward pass then branches on that attribute
    and on the input's device only, which ``torch.compile`` traces without a graph break (the import attempt
    inside a compiled branch broke the graph, issue 25). Functions, not the module: a layer stays deep-copyable."""

    memory_efficient_attention: Callable[..., Tensor]
    block_diagonal_mask: Callable[..., object]  # fmha.BlockDiagonalMask.from_seqlens
    swiglu: Callable[..., Tensor]


def xformers_kernels() -> XformersKernels | str:
    """The kernels of an importable xformers, else the reason it cannot be used (for the fallback's warning)."""
    ops = xformers_ops()
    if isinstance(ops, ImportError):
        return str(ops)
    try:
        return XformersKernels(ops.memory_efficient_attention, ops.fmha.BlockDiagonalMask.from_seqlens, ops.swiglu)
    except AttributeError as error:  # an xformers too old for these layers
        return f"xformers is not usable ({error})"


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


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, *, bias: bool = True,
                 act_layer: Callable[[], nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden_features(hidden_features: int) -> int:
    """The official fused SwiGLU keeps 2/3 of the MLP width, rounded up to a multiple of 8."""
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """SwiGLU with the official packed layout: ``w12`` holds [w1; w2], ``w3`` projects back.

    With ``fused=True`` xformers' fused kernel is used on CUDA when importable; the math is the same.
    """

    def __init__(self, in_features: int, hidden_features: int, *, bias: bool = True, fused: bool = False) -> None:
        super().__init__()
        hidden = swiglu_hidden_features(hidden_features)
        self.w12 = nn.Linear(in_features, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, in_features, bias=bias)
        self.fused = fused  # see the setter: xformers' availability is decided there

    @property
    def fused(self) -> bool:
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        """Decides once whether xformers is importable (``xformers``: its kernels, or None), so that no forward
        pass, compiled or not, tries the import."""
        self._fused = value
        kernels = xformers_kernels() if value else None
        self.xformers = kernels if isinstance(kernels, XformersKernels) else None

    def forward(self, x: Tensor) -> Tensor:
        if self.xformers is not None and x.is_cuda:
            w1, w2 = self.w12.weight.chunk(2, dim=0)
            b1, b2 = self.w12.bias.chunk(2) if self.w12.bias is not None else (None, None)
            return self.xformers.swiglu(x, w1, b1, w2, b2, self.w3.weight, self.w3.bias)
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


def aligned_swiglu_hidden(hidden_features: int, align_to: int) -> int:
    """DINOv3's SwiGLU width: 2/3 of the MLP width, rounded up to a multiple of ``align_to`` (8 for ``swiglu``,
    32/64/128 for ``swiglu32/64/128``)."""
    hidden = int(hidden_features * 2 / 3)
    return hidden + (-hidden % align_to)


class SplitSwiGLUFFN(nn.Module):
    """DINOv3's SwiGLU layout: separate ``w1`` (gate) and ``w2`` (value) projections, ``w3`` back."""

    def __init__(self, in_features: int, hidden_features: int, *, bias: bool = True, align_to: int = 8) -> None:
        super().__init__()
        hidden = aligned_swiglu_hidden(hidden_features, align_to)
        self.w1 = nn.Linear(in_features, hidden, bias=bias)
        self.w2 = nn.Linear(in_features, hidden, bias=bias)
        self.w3 = nn.Linear(hidden, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


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
    "ATTENTION_BACKENDS", "FFN_LAYERS", "NORM_LAYERS", "Attention", "Block", "LayerScale", "MaskedKeyBiasLinear", "Mlp",
    "PatchEmbed", "RMSNorm", "SplitSwiGLUFFN", "SwiGLUFFN", "aligned_swiglu_hidden", "make_norm", "CHECKPOINTING_MODES", "pack", "unpack", "swiglu_hidden_features", "init_weights_vit_timm",
]
