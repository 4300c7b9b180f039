"""FLOPs of a backbone forward pass, and how they grow with the number of register tokens.

Units: fvcore's. One multiply-add (MAC) counts as ONE flop, so the numbers here are half of
"2 * MACs" counts quoted elsewhere. Everything in this module, the CLI and the README uses this
unit.

fvcore traces the model with ``torch.jit`` and counts known operators. It ignores
``aten::scaled_dot_product_attention`` by default, which would drop the whole ``softmax(QK^T)V``
cost (the part that grows quadratically with the token count, registers included), so a handler
for it is registered here.
"""

from __future__ import annotations

from math import prod
from typing import Any, Callable, Sequence

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import Tensor, nn

from dinoreg.models import build_backbone

# Element-wise ops that fvcore does not count and that we deliberately treat as free, like fvcore
# does for its own ignore list: residual adds, LayerScale multiplies, activations, the register /
# cls / position additions. Anything else left uncounted shows up in ``unsupported_ops()``.
FREE_OPS = (
    "aten::add", "aten::add_", "aten::sub", "aten::mul", "aten::mul_", "aten::div", "aten::div_",
    "aten::neg", "aten::gelu", "aten::silu", "aten::sigmoid", "aten::tanh", "aten::softmax",
    "aten::expand_as", "aten::repeat_interleave", "aten::index_add", "aten::linspace", "aten::rsub",
)


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """MACs of ``scaled_dot_product_attention(q, k, v)``: ``q @ k^T`` plus ``attn @ v``.

    ``q``: ``[..., Nq, Dh]``, ``k``: ``[..., Nk, Dh]``, ``v``: ``[..., Nk, Dv]`` with the leading
    dims (batch, heads) broadcast. Softmax and scaling are element-wise and not counted.
    """
    q_shape, k_shape, v_shape = (get_shape(v) for v in inputs[:3])
    if q_shape is None or k_shape is None or v_shape is None:
        raise ValueError("scaled_dot_product_attention traced without complete input shapes")
    *lead, n_q, d_qk = q_shape
    n_k, d_v = k_shape[-2], v_shape[-1]
    batch_heads = prod(torch.broadcast_shapes(tuple(lead), tuple(k_shape[:-2]), tuple(v_shape[:-2])))
    return batch_heads * n_q * n_k * d_qk + batch_heads * n_q * n_k * d_v


class _Features(nn.Module):
    """Traceable view of a backbone: ``forward_features`` with only its tensor outputs."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.backbone.forward_features(x)
        return out["x_norm_clstoken"], out["x_norm_regtokens"], out["x_norm_patchtokens"]


def _image_hw(img_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(img_size, int):
        return img_size, img_size
    height, width = img_size
    return int(height), int(width)


def flop_analysis(model: nn.Module, img_size: int | Sequence[int], batch_size: int = 1,
                  *, count_attention: bool = True) -> FlopCountAnalysis:
    """fvcore analysis of ``model.forward_features`` on ``batch_size`` RGB images of ``img_size``.

    Returns the ``FlopCountAnalysis`` (for ``by_operator()``, ``by_module()``,
    ``unsupported_ops()``); totals are for the whole batch, in multiply-adds.
    ``count_attention=False`` leaves SDPA uncounted (fvcore's default), for comparisons.
    """
    height, width = _image_hw(img_size)
    parameter = next(model.parameters())
    images = torch.zeros(batch_size, 3, height, width, dtype=parameter.dtype, device=parameter.device)
    analysis = FlopCountAnalysis(_Features(model), (images,))
    analysis.set_op_handle(**{name: None for name in FREE_OPS})
    if count_attention:
        analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    # Warnings off: the free ops are listed above; the rest is reported by unsupported_ops().
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    return analysis


def count_flops(model: nn.Module, img_size: int | Sequence[int], batch_size: int = 1) -> int:
    """FLOPs per image of ``model.forward_features``, in fvcore's unit (1 multiply-add = 1 flop).

    The model is put in eval mode (no stochastic depth) and traced under ``torch.no_grad``.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            total = flop_analysis(model, img_size, batch_size).total()
    finally:
        model.train(was_training)
    return int(total) // batch_size


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _build_uninitialised(build: Callable[..., nn.Module], *args: Any, **kw: Any) -> nn.Module:
    """``build(*args, **kw)`` as an fp32 CPU module whose weights are a constant: FLOPs do not
    depend on them, and random initialisation dominates the cost for ViT-L/g (~5 s for ViT-L).

    Built on the meta device and materialised with ``to_empty``.
    """
    with torch.device("meta"):
        model = build(*args, **kw)
    model = model.to_empty(device="cpu").float()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(0.01)
    return model


def flops_vs_registers(arch: str, patch_size: int, img_size: int | Sequence[int],
                       registers: Sequence[int], **kw: Any) -> list[dict[str, int]]:
    """Parameters and FLOPs per image (multiply-adds) of ``arch`` for each register count.

    ``kw`` goes to ``build_backbone`` (e.g. ``ffn_layer="swiglufused"``). The backbone is built
    in fp32 on CPU with constant weights (see ``_build_uninitialised``) and traced in eval mode with
    a batch of one image. Returns ``[{"registers", "params", "flops"}, ...]`` in the order of
    ``registers``.
    """
    height, width = _image_hw(img_size)
    kw.setdefault("img_size", max(height, width))
    rows = []
    for num_registers in registers:
        model = _build_uninitialised(build_backbone, arch, patch_size=patch_size,
                                     num_register_tokens=num_registers, **kw)
        rows.append({
            "registers": int(num_registers),
            "params": count_parameters(model),
            "flops": count_flops(model, (height, width)),
        })
        del model
    return rows


__all__ = ["FREE_OPS", "count_flops", "count_parameters", "flop_analysis", "flops_vs_registers", "sdpa_flop_jit"]
