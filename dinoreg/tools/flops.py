"""FLOP counting, in two units: a training step on the meta device, and a backbone's forward pass per image
traced by fvcore.

**A training step** (``dinoreg bench flops``, and the FLOPs that ``dinoreg bench train`` divides by its step
time): real FLOPs, 2 per multiply-add, the unit of MFU and of the devices' peaks. Counted by torch's
``FlopCounterMode`` on the model built on the meta device (nothing allocated), once per crop size and once per
head, with layer norms counted as fvcore counts them (5 multiply-adds per element): twice fvcore's trace below,
which ``tests/test_bench.py`` checks. A step is the student's forward and backward (twice the forward) on every
crop and the target teacher's forward on the global crops, heads included; element-wise work (softmaxes, the
losses) is not counted, nor are the savings of stochastic depth (the FLOPs are the full model's, so MFU is a lower
bound by up to the drop rate).

**A backbone's forward pass per image** (``dinoreg model-info``, ``dinoreg analyze flops``): fvcore's unit, one
multiply-add counts as ONE flop, so these numbers are half of "2 * MACs" counts (the step's above included).
fvcore traces the model with ``torch.jit`` and counts known operators (:func:`count_flops`). It ignores
``aten::scaled_dot_product_attention`` by default, which would drop the whole ``softmax(QK^T)V`` cost (the part
that grows quadratically with the token count, registers included), so a handler for it is registered here.
``model-info`` and ``analyze flops`` count the same number on the meta device instead (:func:`count_flops_on_meta`,
half the step counter's count of the backbone; the suite checks both families against fvcore's trace): nothing is
allocated, so the 6.7 B parameters of ``vit7b16`` take a second.

**The RoPE family** (DINOv3's backbones) adds element-wise work that both counters would otherwise miss or
mis-count, and that dinoreg counts with forward hooks on the modules, in multiply-adds (doubled in the step's unit):

* the RoPE rotation ``x * cos + rotate_half(x) * sin`` of the queries and keys of every patch token, in every head
  and block: 2 multiply-adds per rotated element (the class and storage tokens are not rotated);
* RMSNorm (``norm_layer=rmsnorm``): 4 per element, fvcore's 5 of an affine layer norm less the mean's subtraction.

The rest of a RoPE block is counted by the operators: the split SwiGLU's ``w1``, ``w2``, ``w3`` and the qkv
projection with ``mask_k_bias`` are linear layers (the masked bias is an element-wise product of the bias, free),
untied class / patch norms are layer norms over their tokens. RoPE's sines and cosines, computed once per forward
pass for the whole batch, are free, as is the learned family's resize of its position embedding.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any, Sequence

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from dinoreg.models import ROPE_PRESETS, arch_family, build_backbone
from dinoreg.models.attention import Attention
from dinoreg.models.layers import RMSNorm

# The step counter imports the config and the SSL model (dinoreg.config, dinoreg.train.build and FSDP: about 4 s)
# where it runs: model-info and analyze flops, which count a backbone alone, do not wait for them.
if TYPE_CHECKING:
    from omegaconf import DictConfig

# what training_step_flops returns, and what `bench train --flops` reads
FLOP_KEYS = ("student_forward_flops", "teacher_forward_flops", "step_flops", "masked_patches_expected")


def _layer_norm_flops(input_shape: Sequence[int], *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """fvcore's count of a layer norm (5 multiply-adds per element), in FLOPs: 10 per element."""
    return 10 * math.prod(input_shape)


# multiply-adds per element of the work counted by hooks (see the module docstring)
ROPE_MACS_PER_ELEMENT = 2
RMS_NORM_MACS_PER_ELEMENT = 4


class HookedWork:
    """Multiply-adds of the RoPE rotation and of RMSNorm in the forward passes run while it is entered (``with
    HookedWork(model) as work: model(x)``; then ``work.macs``), read by forward hooks from the shapes alone, so it
    also counts on the meta device."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.macs, self._handles = model, 0, []

    def __enter__(self) -> "HookedWork":
        for module in self.model.modules():
            if isinstance(module, Attention):
                self._handles.append(module.register_forward_hook(self._rotation, with_kwargs=True))
            elif isinstance(module, RMSNorm):
                self._handles.append(module.register_forward_hook(self._rms_norm))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _rotation(self, module: Attention, args: tuple, kwargs: dict, output: Tensor) -> None:
        # Attention.forward(x, shapes, rope): a RoPE per group of the pack, or None
        shapes = args[1] if len(args) > 1 else kwargs["shapes"]
        ropes = args[2] if len(args) > 2 else kwargs.get("rope")
        for (batch, _), rope in zip(shapes, ropes if ropes is not None else []):
            if rope is not None:  # queries and keys of the patches: rope[0] is [HW, head_dim]
                self.macs += ROPE_MACS_PER_ELEMENT * 2 * batch * module.num_heads * rope[0].numel()

    def _rms_norm(self, module: RMSNorm, args: tuple, output: Tensor) -> None:
        self.macs += RMS_NORM_MACS_PER_ELEMENT * args[0].numel()


def forward_flops(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of ``module(*inputs)`` under torch's ``FlopCounterMode``: matmuls, convolutions and
    attention (on the meta device, attention is counted through its matmuls), plus layer norms as fvcore counts
    them and the RoPE family's rotation and RMSNorm (:class:`HookedWork`); other element-wise work is free. Runs on
    the meta device when module and inputs are there: nothing is allocated or computed."""
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.native_layer_norm: _layer_norm_flops}) \
            as counter, HookedWork(module) as hooked, torch.no_grad():
        module(*inputs)
    return counter.get_total_flops() + 2 * hooked.macs


def training_step_flops(cfg: DictConfig) -> dict[str, float]:
    """FLOPs of one training step of one device at ``cfg``'s per-device batch (see the module docstring): the
    student's forward, the target teacher's forward (the EMA teacher, or the frozen teacher when distilling) and
    the step (student forward x 3 + teacher forward). The masked patches that go through the iBOT head are their
    expected number (every patch of the global crops when a distilled student is not masked). Counted on the
    model built on the meta device, in a second or two for ViT-g: fixed by the config, whatever the device."""
    from dinoreg.train.build import build_ssl_model  # noqa: PLC0415 (start-up: training stack; see above)

    with torch.device("meta"):
        model = build_ssl_model(cfg, load_pretrained=False)
    batch = cfg.train.batch_size_per_gpu
    global_images, local_images = 2 * batch, cfg.crops.local_crops_number * batch
    g, s = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    patches = (g // cfg.student.patch_size) ** 2
    masked = (global_images * patches if model.ibot_all_patches else
              global_images * cfg.ibot.mask_sample_probability * statistics.fmean(cfg.ibot.mask_ratio_min_max) * patches)
    masked = masked if model.do_ibot else 0.0

    def per_image(backbone: torch.nn.Module, size: int) -> int:
        return forward_flops(backbone.eval(), torch.zeros(1, 3, size, size, device="meta"))

    def heads(models: torch.nn.ModuleDict) -> tuple[int, int]:
        tokens = torch.zeros(1, models["backbone"].embed_dim, device="meta")
        dino = forward_flops(models["dino_head"], tokens)
        return dino, forward_flops(models["ibot_head"], tokens) if "ibot_head" in models else dino

    student, target = model.student, model.target_teacher
    dino, ibot = heads(student)
    student_flops = (per_image(student["backbone"], g) * global_images + dino * (global_images + local_images)
                     + ibot * masked + (per_image(student["backbone"], s) * local_images if local_images else 0))
    teacher_dino, teacher_ibot = heads(target)
    teacher_flops = per_image(target["backbone"], g) * global_images + teacher_dino * global_images + teacher_ibot * masked
    return {"student_forward_flops": float(student_flops), "teacher_forward_flops": float(teacher_flops),
            "step_flops": float(3 * student_flops + teacher_flops), "masked_patches_expected": masked}


def count_step_flops(config: str = "tiny_cpu", *, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """``dinoreg bench flops``: :func:`training_step_flops` of a recipe, with the batch it is for."""
    from dinoreg.config import load_config  # noqa: PLC0415 (start-up: omegaconf; see the imports above)

    cfg = load_config(config, list(overrides))
    return {"config": config, "overrides": list(overrides), "batch_size": cfg.train.batch_size_per_gpu,
            **training_step_flops(cfg)}


def format_flops_report(result: dict[str, Any]) -> str:
    return "\n".join([
        f"{result['config']}: one training step at batch {result['batch_size']} per device",
        f"  student forward  {result['student_forward_flops'] / 1e12:.3f} TFLOP",
        f"  teacher forward  {result['teacher_forward_flops'] / 1e12:.3f} TFLOP",
        f"  step             {result['step_flops'] / 1e12:.3f} TFLOP (student forward x 3 + teacher forward; "
        f"{result['masked_patches_expected']:.0f} masked patches expected)",
    ])


# Element-wise ops that fvcore does not count and that we deliberately treat as free, like fvcore
# does for its own ignore list: residual adds, LayerScale multiplies, activations, the register /
# cls / position additions. Anything else left uncounted shows up in ``unsupported_ops()``.
FREE_OPS = (
    "aten::add", "aten::add_", "aten::sub", "aten::mul", "aten::mul_", "aten::div", "aten::div_",
    "aten::neg", "aten::gelu", "aten::silu", "aten::sigmoid", "aten::tanh", "aten::softmax",
    "aten::expand_as", "aten::repeat_interleave", "aten::index_add", "aten::linspace", "aten::rsub",
    # the RoPE family: its sines and cosines (once per forward pass: free), RMSNorm's operators (counted by
    # HookedWork instead)
    "aten::meshgrid", "aten::repeat", "aten::sin", "aten::cos", "aten::pow", "aten::mean", "aten::rsqrt",
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
    batch_heads = math.prod(torch.broadcast_shapes(tuple(lead), tuple(k_shape[:-2]), tuple(v_shape[:-2])))
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


def _images(model: nn.Module, img_size: int | Sequence[int], batch_size: int) -> Tensor:
    """``batch_size`` zero RGB images of ``img_size`` in ``model``'s dtype and device."""
    parameter = next(model.parameters())
    return torch.zeros(batch_size, 3, *_image_hw(img_size), dtype=parameter.dtype, device=parameter.device)


def flop_analysis(model: nn.Module, img_size: int | Sequence[int], batch_size: int = 1,
                  *, count_attention: bool = True) -> FlopCountAnalysis:
    """fvcore analysis of ``model.forward_features`` on ``batch_size`` RGB images of ``img_size``.

    Returns the ``FlopCountAnalysis`` (for ``by_operator()``, ``by_module()``,
    ``unsupported_ops()``); totals are for the whole batch, in multiply-adds.
    ``count_attention=False`` leaves SDPA uncounted (fvcore's default), for comparisons.
    """
    analysis = FlopCountAnalysis(_Features(model), (_images(model, img_size, batch_size),))
    analysis.set_op_handle(**{name: None for name in FREE_OPS})
    if count_attention:
        analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    # Warnings off: the free ops are listed above; the rest is reported by unsupported_ops().
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    return analysis


def count_flops(model: nn.Module, img_size: int | Sequence[int], batch_size: int = 1) -> int:
    """FLOPs per image of ``model.forward_features``, in fvcore's unit (1 multiply-add = 1 flop): fvcore's trace
    (:func:`flop_analysis`) plus the RoPE family's rotation and RMSNorm (:class:`HookedWork`, from a forward pass).

    The model is put in eval mode (no stochastic depth) and traced under ``torch.no_grad``.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            total = flop_analysis(model, img_size, batch_size).total()
            with HookedWork(model) as hooked:
                model.forward_features(_images(model, img_size, batch_size))
    finally:
        model.train(was_training)
    return (int(total) + hooked.macs) // batch_size


def count_flops_on_meta(model: nn.Module, img_size: int | Sequence[int]) -> int:
    """:func:`count_flops` of a backbone built on the meta device, without tracing or allocating anything: half of
    :func:`forward_flops` (the same count; the suite checks both families), for the largest models (``vit7b16``)."""
    was_training = model.training
    model.eval()
    try:
        total = forward_flops(_Features(model), torch.zeros(1, 3, *_image_hw(img_size), device="meta"))
    finally:
        model.train(was_training)
    return total // 2


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_counted_backbone(arch: str, *, registers: int, **kw: Any) -> nn.Module:
    """``arch`` (either family) on the meta device, with ``registers`` register tokens (a RoPE backbone's storage
    tokens) and the keyword arguments ``kw`` of :func:`dinoreg.models.build_backbone`: nothing is allocated, for
    :func:`count_parameters` and :func:`count_flops_on_meta` (``vit7b16`` in a second)."""
    family = arch_family(arch, kw.get("pos_embed_type"))
    with torch.device("meta"):
        return build_backbone(arch, **{"n_storage_tokens" if family == "rope" else "num_register_tokens": registers},
                              **kw)


def flops_vs_registers(arch: str, patch_size: int, img_size: int | Sequence[int],
                       registers: Sequence[int], **kw: Any) -> list[dict[str, int]]:
    """Parameters and FLOPs per image (multiply-adds) of ``arch`` (either family) for each register count.

    ``kw`` goes to ``build_backbone`` (e.g. ``ffn_layer="swiglufused"``). The backbone is built on the meta device
    and counted there (:func:`count_flops_on_meta`, in eval mode, one image). Returns
    ``[{"registers", "params", "flops"}, ...]`` in the order of ``registers``.
    """
    height, width = _image_hw(img_size)
    kw.setdefault("img_size", max(height, width))
    rows = []
    for num_registers in registers:
        model = build_counted_backbone(arch, registers=int(num_registers), patch_size=patch_size, **kw)
        rows.append({"registers": int(num_registers), "params": count_parameters(model),
                     "flops": count_flops_on_meta(model, (height, width))})
    return rows


def preset_rows(sizes: Sequence[int]) -> list[dict[str, Any]]:
    """The DINOv3 presets (:data:`dinoreg.models.ROPE_PRESETS`, the released architectures) as built by
    ``build_backbone``: width, depth, heads, FFN, storage tokens, patch, parameters, and FLOPs per image at each of
    ``sizes`` (square, multiples of the patch), counted on the meta device."""
    rows = []
    for arch in ROPE_PRESETS:
        with torch.device("meta"):
            model = build_backbone(arch)
        rows.append({"arch": arch, "embed_dim": model.embed_dim, "depth": model.n_blocks, "num_heads": model.num_heads,
                     "ffn_layer": model.arch_kwargs["ffn_layer"], "ffn_ratio": model.arch_kwargs["ffn_ratio"],
                     "storage_tokens": model.num_register_tokens, "patch_size": model.patch_size,
                     "params": count_parameters(model),
                     "flops": {int(size): count_flops_on_meta(model, size) for size in sizes}})
    return rows
