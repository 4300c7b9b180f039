"""Checks only a GPU can make (marked gpu; skipped without CUDA): run by launch/gpu_check.sh on the device.

- bf16 autocast against fp32: the same step's losses within a stated tolerance;
- every SDPA kernel CUDA offers (flash, memory-efficient, cuDNN) and xformers when installed, against the
  math backend;
- train.compile against eager on the GPU;
- the chunked prototype cross-entropy on bf16 logits against the plain fp32 expression;
- flags agreed on over an nccl process group without waiting for the GPU.
"""

import random
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dinoreg import distributed
from dinoreg.config import load_config
from dinoreg.data import TrainingBatch
from dinoreg.distributed import DistributedEnvironment
from dinoreg.models.vit import DinoVisionTransformer
from dinoreg.ssl.losses import soft_cross_entropies
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
    batch = TrainingBatch(global_crops=torch.randn(2 * b, 3, g, g), local_crops=torch.randn(n * b, 3, l, l),
                          n_global_crops=2, n_local_crops=n).with_masks(masks)
    return batch.to(device)


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


def test_chunked_cross_entropy_of_bf16_logits_matches_fp32():
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(300, 65536, device="cuda", generator=g).bfloat16()
    teacher = F.softmax(torch.randn(300, 65536, device="cuda", generator=g), dim=-1)
    leaf = logits.clone().requires_grad_(True)
    rows, = soft_cross_entropies(leaf, [teacher], 0.1, chunk_elements=1 << 22)  # 64-row chunks
    rows.sum().backward()
    plain = logits.float().requires_grad_(True)
    reference = torch.sum(teacher * F.log_softmax(plain / 0.1, dim=-1), dim=-1)
    reference.sum().backward()
    torch.testing.assert_close(rows, reference, rtol=1e-5, atol=1e-4)
    assert leaf.grad.dtype == torch.bfloat16
    torch.testing.assert_close(leaf.grad.float(), plain.grad, rtol=1e-2, atol=1e-3)


def test_host_flags_never_wait_for_the_gpu():
    """broadcast_flag (every step: the unreadable-batch check, the signal check) goes over a gloo group beside the
    nccl one, so it never synchronises with the device's queued work."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    try:
        x = torch.randn(8192, 8192, device="cuda")
        _ = x @ x  # queued work a device synchronisation would wait for
        torch.cuda.set_sync_debug_mode("error")
        try:
            assert distributed.broadcast_flag(True) and not distributed.broadcast_flag(False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        distributed.shutdown_distributed()
