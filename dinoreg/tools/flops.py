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
fvcore traces the model with ``torch.jit`` and counts known operators. It ignores
``aten::scaled_dot_product_attention`` by default, which would drop the whole ``softmax(QK^T)V`` cost (the part
that grows quadratically with the token count, registers included), so a handler for it is registered here.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from dinoreg.models import build_backbone

# The step counter imports the config and the SSL model (dinoreg.config, dinoreg.train.build and FSDP: about 4 s)
# where it runs: model-info and analyze flops, which count a backbone alone, do not wait for them.
if TYPE_CHECKING:
    from omegaconf import DictConfig

# what training_step_flops returns, and what `bench train --flops` reads
FLOP_KEYS = ("student_forward_flops", "teacher_forward_flops", "step_flops", "masked_patches_expected")


def _layer_norm_flops(input_shape: Sequence[int], *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """fvcore's count of a layer norm (5 multiply-adds per element), in FLOPs: 10 per element."""
    return 10 * math.prod(input_shape)


def forward_flops(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of ``module(*inputs)`` under torch's ``FlopCounterMode``: matmuls, convolutions and
    attention (on the meta device, attention is counted through its matmuls), plus layer norms as fvcore counts
    them; element-wise work is free. Runs on the meta device when module and inputs are there: nothing is
    allocated or computed."""
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.native_layer_norm: _layer_norm_flops}) \
            as counter, torch.no_grad():
        module(*inputs)
    return counter.get_total_flops()


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

