"""Checks only a GPU can make (marked gpu; skipped without CUDA): run by launch/gpu_check.sh on the device.

- bf16 autocast against fp32: the same step's losses within a stated tolerance;
- every SDPA kernel CUDA offers (flash, memory-efficient, cuDNN) and xformers when installed, against the
  math backend;
- train.compile against eager on the GPU.
"""

import random

import pytest
import torch

from dinoreg.config import load_config
from dinoreg.distributed import DistributedEnvironment
from dinoreg.models.vit import DinoVisionTransformer
from dinoreg.ssl.masking import sample_masks
from dinoreg.train.build import build_model_and_optimizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SMALL = ["student.arch=vit_small", "student.patch_size=14", "crops.global_crops_size=98", "crops.local_crops_size=42",
         "crops.local_crops_number=2", "train.batch_size_per_gpu=8", "dino.head_n_prototypes=4096",
         "ibot.head_n_prototypes=4096", "student.num_register_tokens=4", "student.drop_path_rate=0.0"]


def _batch(cfg, device):
    torch.manual_seed(0)
    b, n = cfg.train.batch_size_per_gpu, cfg.crops.local_crops_number
    g, l, grid = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.global_crops_size // 14
    masks = sample_masks(2 * b, (grid, grid), (0.1, 0.5), 0.5, rng=random.Random(0))
    batch = {"global_crops": torch.randn(2 * b, 3, g, g), "local_crops": torch.randn(n * b, 3, l, l), **masks}
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _losses(overrides, *, bf16):
    cfg = load_config("vits14_reg4", [*SMALL, *overrides])
    torch.manual_seed(0)
    model, _ = build_model_and_optimizer(cfg, DistributedEnvironment(), torch.device("cuda"), bf16=bf16)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        _, metrics = model.forward_loss(_batch(cfg, "cuda"), teacher_temp=0.04)
    return {k: float(v) for k, v in metrics.items() if k.endswith("_loss")}


def test_bf16_losses_within_two_percent_of_fp32():
    fp32, bf16 = _losses(["train.compile=none"], bf16=False), _losses(["train.compile=none"], bf16=True)
    for key, value in fp32.items():
        assert bf16[key] == pytest.approx(value, rel=2e-2, abs=2e-3), key


def test_compiled_blocks_match_eager_on_the_gpu():
    eager, compiled = _losses(["train.compile=none"], bf16=False), _losses(["train.compile=blocks"], bf16=False)
    for key, value in eager.items():
        assert compiled[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("backend", ["flash", "efficient", "cudnn", "xformers"])
def test_attention_kernels_match_math(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=98, patch_size=14, embed_dim=384, depth=2, num_heads=6,
                                  num_register_tokens=4, init_values=1e-5).cuda().eval()
    crops = [torch.randn(4, 3, 98, 98, device="cuda"), torch.randn(8, 3, 42, 42, device="cuda")]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for block in model.blocks:
            block.attn.backend = "math"
        reference = [o["x_norm_patchtokens"].float() for o in model.forward_features(crops)]
        if backend == "xformers":
            pytest.importorskip("xformers.ops")
            for block in model.blocks:
                block.attn.backend = "xformers"
            outputs = model.forward_features(crops)
        else:
            for block in model.blocks:
                block.attn.backend = "sdpa"
            kernel = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                      "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
            with sdpa_kernel(kernel):
                outputs = model.forward_features(crops)
    for ours, theirs in zip(outputs, reference):
        torch.testing.assert_close(ours["x_norm_patchtokens"].float(), theirs, atol=5e-2, rtol=5e-2)
