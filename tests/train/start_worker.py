"""Run by tests/train/test_meta_start.py under torchrun: build the model and optimizer as training does (several
ranks: on the meta device, sharded, materialised shard by shard), then rank 0 saves the full state dict, the next
draws of the random generator, and each rank's bytes of local parameters.

usage: python start_worker.py OUT.pt [key=value ...]
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from dinoreg.config import load_config
from dinoreg.distributed import detect_environment, init_distributed, shutdown_distributed
from dinoreg.train.build import build_model_and_optimizer


def main(out: str, overrides: list) -> None:
    env = detect_environment()
    device = torch.device("cpu")
    init_distributed(env, device)
    cfg = load_config("tiny_cpu", overrides)
    torch.manual_seed(0)
    model, _ = build_model_and_optimizer(cfg, env, device)
    after = torch.rand(4)  # the generator must continue as after a one-process build
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
    locals_ = [local]
    if env.distributed:
        locals_ = [None] * env.world_size
        dist.all_gather_object(locals_, local)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    buffers = {name: value.detach().clone() for name, value in model.named_buffers()}
    if env.is_main:
        torch.save({"state": state, "buffers": buffers, "after": after, "local_numel": locals_}, out)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
