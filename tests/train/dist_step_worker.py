"""Run by tests/train/test_distributed.py under torchrun (or alone): a few training steps on fixed global
batches, each rank taking its share of the images, then rank 0 saves the losses, the full parameters and every
rank's bytes of local parameters, gradients and AdamW state.

usage: python dist_step_worker.py OUT.pt STEPS [key=value ...]
"""

import random
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from dinoreg.config import load_config
from dinoreg.data import TrainingBatch
from dinoreg.distributed import detect_environment, init_distributed, shutdown_distributed
from dinoreg.ssl.masking import sample_masks
from dinoreg.train.build import build_ssl_model
from dinoreg.train.loop import StepFigures, read_figures, train_step
from dinoreg.train.optim import Schedules, build_optimizer, build_param_groups
from dinoreg.train.parallel import shard_ssl_model

GLOBAL_BATCH = 8


def global_batch(step: int, cfg) -> dict:
    """The same images, local crops and masks on every rank: [2B,...] view-major, [nB,...] crop-major."""
    g = torch.Generator().manual_seed(step)
    size, local_size, n_local = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    side = size // cfg.student.patch_size
    # Both halves of the batch get the same masks: the official iBOT centre is a mean over ranks of each
    # rank's mean over its masked patches, which equals the global mean only when ranks mask as many.
    half = sample_masks(GLOBAL_BATCH, (side, side), rng=random.Random(step))["masks"]  # [2 * B/2, N]
    masks = torch.cat([torch.cat([view, view]) for view in half.chunk(2)])  # [2B, N], view-major
    return {"global_crops": torch.randn(2 * GLOBAL_BATCH, 3, size, size, generator=g),
            "local_crops": torch.randn(n_local * GLOBAL_BATCH, 3, local_size, local_size, generator=g),
            "masks": masks, "n_local": n_local}


def rank_share(batch: dict, rank: int, world_size: int) -> TrainingBatch:
    """Images [rank * B/W, (rank + 1) * B/W) of every view and crop, with their masks re-indexed."""
    per = GLOBAL_BATCH // world_size
    pick = lambda x, n_views: torch.cat([v[rank * per:(rank + 1) * per] for v in x.chunk(n_views)])  # noqa: E731
    masks = pick(batch["masks"], 2)  # [2 * per, N]
    counts = masks.sum(1, keepdim=True).clamp(min=1)
    mask_indices = masks.flatten().nonzero().flatten()
    weights = (1.0 / counts).expand_as(masks).flatten()[mask_indices]
    return TrainingBatch(global_crops=pick(batch["global_crops"], 2), n_global_crops=2,
                         local_crops=pick(batch["local_crops"], batch["n_local"]), n_local_crops=batch["n_local"],
                         masks=masks, mask_indices=mask_indices, masks_weight=weights,
                         n_masked_patches=torch.tensor([mask_indices.numel()]))


def local_bytes(model, optimizer) -> dict:
    """Bytes this rank holds of the parameters (student and teacher), the student's gradients and the AdamW
    moments: the local shards of sharded tensors."""
    def size(tensor):
        tensor = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        return tensor.numel() * tensor.element_size()

    return {"parameters": sum(size(p) for p in model.parameters()),
            "gradients": sum(size(p.grad) for p in model.parameters() if p.grad is not None),
            "optimizer": sum(size(v) for state in optimizer.state.values() for v in state.values()
                             if torch.is_tensor(v) and v.dim() > 0)}  # not the 0-d step counters


def main(out: str, steps: int, overrides: list) -> None:
    env = detect_environment()
    device = torch.device("cpu")
    init_distributed(env, device)
    cfg = load_config("tiny_cpu", overrides)
    torch.manual_seed(0)
    model = build_ssl_model(cfg).train()
    if env.distributed:
        shard_ssl_model(model, mode=cfg.train.sharding, device=device, world_size=env.world_size, bf16=False)
    optimizer = build_optimizer(build_param_groups(model.student, layerwise_decay=0.9, patch_embed_lr_mult=0.2))
    schedules = Schedules(cfg)
    losses = []
    for step in range(steps):
        batch = rank_share(global_batch(step, cfg), env.rank, env.world_size)
        values = dict(schedules.values(step), lr=1e-3, last_layer_lr=1e-3)
        metrics, grad_norms = train_step(model, optimizer, batch, values, clip_grad=0.5)
        row = read_figures([StepFigures(step, metrics, grad_norms)])[0]  # averaged over ranks, read
        losses.append({k: v for k, v in row.items() if k.endswith("loss") or k.startswith("grad_norm_")})
    shard_bytes = [local_bytes(model, optimizer)]
    if env.distributed:
        shard_bytes = [None] * env.world_size
        dist.all_gather_object(shard_bytes, local_bytes(model, optimizer))
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.is_main:
        torch.save({"losses": losses, "state": state, "shard_bytes": shard_bytes}, out)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
