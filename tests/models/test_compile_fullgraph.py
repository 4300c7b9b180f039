"""Each recipe's block compiles to one graph per branch (``torch.compile(fullgraph=True)``), with xformers importable
and not (issue 25: the xformers import check inside the compiled FFN branch broke vitg14_reg4's graph into three on
the GPU image, and ``fullgraph=True`` raised).

Whether xformers can be used is decided once, when a layer is built, and kept as a plain attribute; a forward pass,
eager or compiled, never calls ``xformers_ops()``. On a CPU the CUDA branch itself is never traced (``x.is_cuda``
is a constant False to Dynamo), so these tests hold the decision to the build (the attribute is set, and
``xformers_ops`` raises if anything calls it afterwards) and trace everything a CPU can reach with
``fullgraph=True``; ``test_fused_swiglu_decides_by_its_attribute_on_cuda_tensors`` runs the CUDA branch eagerly
with a tensor that says it is on CUDA, and ``test_vitg14_block_compiles_to_one_graph_on_cuda`` traces it where there
is a GPU.
"""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dinoreg.config import available_configs, build_backbone_from_config, load_config
from dinoreg.models import attention, kernels, layers
from dinoreg.models.ffn import SwiGLUFFN
from dinoreg.models.kernels import XformersKernels

# a tiny width and depth (the branches' code is the same at any size); the keys some recipes require are given
# placeholders: the block never reads them
TINY = ("student.embed_dim=64", "student.num_heads=2", "student.depth=1")
PLACEHOLDERS = ("phase.start_from=unused", "distillation.teacher=unused")
GROUPS = ((2, 16), (3, 4))  # (images, patches) of a global and a local crop group, packed as in training


SWIGLU_CALLS: list[int] = []  # one entry per call of the fake fused kernel


def _no_kernel_on_the_cpu(*args: object, **kwargs: object) -> None:
    raise AssertionError("an xformers kernel was called for CPU tensors")


def _fake_swiglu(x, w1, b1, w2, b2, w3, b3):
    """xformers' fused SwiGLU as plain PyTorch, for tensors that say they are on CUDA."""
    if not x.is_cuda:
        _no_kernel_on_the_cpu()
    SWIGLU_CALLS.append(1)
    return F.linear(F.silu(F.linear(x, w1, b1)) * F.linear(x, w2, b2), w3, b3)


FAKE_OPS = SimpleNamespace(memory_efficient_attention=_no_kernel_on_the_cpu, swiglu=_fake_swiglu,
                           fmha=SimpleNamespace(BlockDiagonalMask=SimpleNamespace(from_seqlens=_no_kernel_on_the_cpu)))
FAKE_KERNELS = XformersKernels(_no_kernel_on_the_cpu, _no_kernel_on_the_cpu, _fake_swiglu)


class _CudaLooking(torch.Tensor):
    """A CPU tensor that says it is on CUDA: the layers' CUDA branch runs eagerly on a CPU (Dynamo reads the
    device itself, so no compiled trace on a CPU reaches that branch)."""

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True


def _import_attempted() -> None:
    raise AssertionError("xformers_ops() was called after the layers were built (in a forward pass)")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # each test's compiled code, not a cache of an earlier block's
    yield
    torch._dynamo.reset()


@pytest.fixture(params=["importable", "missing"])
def xformers(request, monkeypatch) -> bool:
    """xformers importable (a fake ``xformers.ops``) or not, whatever this machine has; True when importable."""
    importable = request.param == "importable"
    missing = ImportError("xformers is not importable (simulated)")
    monkeypatch.setattr(kernels, "xformers_ops", lambda: FAKE_OPS if importable else missing)
    monkeypatch.setattr(attention, "_warned_backend_fallback", False)
    SWIGLU_CALLS.clear()
    return importable


def _recipe_block(recipe: str, *overrides: str) -> layers.Block:
    cfg = load_config(recipe, [*PLACEHOLDERS, *TINY, *overrides])
    torch.manual_seed(0)
    block = build_backbone_from_config(cfg, stochastic_depth=False).blocks[0]
    for scale in (block.ls1, block.ls2):  # LayerScale's 1e-5 would hide the branches in the block's sum
        if isinstance(scale, layers.LayerScale):
            torch.nn.init.ones_(scale.gamma)
    return block


def _packed_tokens(block: layers.Block, registers: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    shapes = [(images, 1 + registers + patches) for images, patches in GROUPS]
    width = block.norm1.normalized_shape[0]
    tokens = torch.randn(sum(b * n for b, n in shapes), width, generator=torch.Generator().manual_seed(1))
    return tokens, shapes


def _forward_backward(block: layers.Block, tokens: torch.Tensor, shapes) -> tuple[torch.Tensor, dict]:
    """The block's output, and the gradients of its input and parameters for a weighted sum of the output."""
    tokens = tokens.clone().requires_grad_(True)
    out = block.forward_packed(tokens, shapes, batch_subset=False)
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    grads = {name: p.grad for name, p in block.named_parameters()}
    return out.detach(), {"tokens": tokens.grad, **grads}


def _compiled_matches_eager(block: layers.Block, registers: int) -> None:
    """Both branches compiled with fullgraph=True (a graph break raises) give the eager block's outputs and
    gradients; no forward pass tries the xformers import."""
    eager = copy.deepcopy(block)
    block.compile_residuals(fullgraph=True, backend="aot_eager")  # Dynamo and AOTAutograd, no code generation
    tokens, shapes = _packed_tokens(block, registers)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "xformers_ops", _import_attempted)
        out, grads = _forward_backward(block, tokens, shapes)
        expected_out, expected_grads = _forward_backward(eager, tokens, shapes)
    torch.testing.assert_close(out, expected_out)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], msg=lambda m, name=name: f"{name}: {m}")


BLOCK_KEYS = ("ffn_layer", "attention_backend", "attention_backend_required", "num_register_tokens", "qkv_bias",
              "proj_bias", "ffn_bias")


def _recipes_by_block() -> dict[tuple, list[str]]:
    """Every recipe, grouped by the student keys its blocks are built from (recipes that share them share the
    compiled code: one case each keeps the test fast)."""
    groups: dict[tuple, list[str]] = {}
    for recipe in available_configs():
        student = load_config(recipe, [*PLACEHOLDERS, *TINY]).student
        key = tuple(student[k] for k in BLOCK_KEYS) + (bool(student.layerscale),)
        groups.setdefault(key, []).append(recipe)
    return groups


RECIPES_BY_BLOCK = _recipes_by_block()


@pytest.mark.parametrize("recipes", RECIPES_BY_BLOCK.values(), ids=[",".join(r) for r in RECIPES_BY_BLOCK.values()])
def test_recipe_block_branches_compile_to_one_graph_each(recipes, xformers):
    block = _recipe_block(recipes[0])
    student = load_config(recipes[0], [*PLACEHOLDERS, *TINY]).student
    # the decision is made when the layer is built: a plain attribute the compiled forward reads as a constant
    fused = isinstance(block.mlp, SwiGLUFFN) and block.mlp.fused
    assert fused == (student.ffn_layer == "swiglufused")
    if isinstance(block.mlp, SwiGLUFFN):
        assert block.mlp.xformers == (FAKE_KERNELS if fused and xformers else None)
    assert block.attn.xformers == (FAKE_KERNELS if xformers and student.attention_backend == "xformers" else None)
    _compiled_matches_eager(block, student.num_register_tokens)


def test_the_recipes_blocks_are_the_ones_checked():
    """A recipe with a block of its own (an ffn_layer, attention backend, ...) gets a case of its own above."""
    assert sorted(r for group in RECIPES_BY_BLOCK.values() for r in group) == sorted(available_configs())
    assert {key[0] for key in RECIPES_BY_BLOCK} >= {"mlp", "swiglufused"}


def test_fused_swiglu_decides_by_its_attribute_on_cuda_tensors(xformers, monkeypatch):
    """On a tensor that says it is on CUDA, vitg14's fused SwiGLU uses the kernel decided at build (xformers
    importable) or the plain SwiGLU (not), with the same result, and does not call ``xformers_ops()``."""
    ffn = _recipe_block("vitg14_reg4").mlp
    assert ffn.xformers == (FAKE_KERNELS if xformers else None)
    monkeypatch.setattr(kernels, "xformers_ops", _import_attempted)
    x = torch.randn(6, 64)
    plain = ffn(x)
    on_cuda = ffn(x.as_subclass(_CudaLooking)).as_subclass(torch.Tensor)
    assert len(SWIGLU_CALLS) == int(xformers)
    torch.testing.assert_close(on_cuda, plain)


@pytest.mark.parametrize("required", [False, True])
def test_xformers_attention_falls_back_outside_the_compiled_graph(xformers, required):
    """attention_backend=xformers on a CPU: the fallback to SDPA (and its one warning) or, when required, the error,
    decided eagerly before the compiled branch runs; the compiled attention is one graph and equals SDPA's."""
    overrides = ("student.attention_backend=xformers", f"student.attention_backend_required={required}")
    block = _recipe_block("vitg14_reg4", *overrides)
    assert block.attn.xformers == (FAKE_KERNELS if xformers else None)
    if required:
        block.compile_residuals(fullgraph=True, backend="aot_eager")
        tokens, shapes = _packed_tokens(block, 4)
        reason = "is not importable" if not xformers else "has no kernels for device cpu"
        with pytest.raises(RuntimeError, match=f"required but xformers {reason}"):
            block.forward_packed(tokens, shapes, batch_subset=False)
        return
    sdpa = copy.deepcopy(block)
    sdpa.attn.backend = "sdpa"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _compiled_matches_eager(block, 4)
        _compiled_matches_eager(sdpa, 4)
    fallbacks = [w for w in caught if "attention_backend='xformers' cannot run here" in str(w.message)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    reason = "xformers has no kernels for device cpu" if xformers else "xformers is not importable (simulated)"
    assert reason in str(fallbacks[0].message)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_vitg14_block_compiles_to_one_graph_on_cuda():
    """The CUDA branch of the fused SwiGLU with this machine's xformers, installed or not (issue 25's case)."""
    block = _recipe_block("vitg14_reg4").cuda()
    eager = copy.deepcopy(block)
    block.compile_residuals(fullgraph=True)
    tokens, shapes = _packed_tokens(block, 4)
    out, grads = _forward_backward(block, tokens.cuda(), shapes)
    expected_out, expected_grads = _forward_backward(eager, tokens.cuda(), shapes)
    torch.testing.assert_close(out, expected_out, atol=1e-4, rtol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-4, rtol=1e-4)
