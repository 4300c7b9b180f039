"""Start-up cost of a recipe: build the model and optimizer as training does, and report the time and the peak
resident set of each process. Under torchrun (several ranks) the model is built on the meta device, sharded, then
materialised shard by shard; in one process it is built whole on the CPU.

    python launch/bench_startup.py --config vitg14_reg4                                  # one process
    torchrun --nproc_per_node=2 launch/bench_startup.py --config vitg14_reg4 train.sharding=full_shard

Prints one JSON line per rank: seconds, peak RSS (GiB), the parameters this rank holds, and their bytes.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dinoreg.config import load_config
from dinoreg.distributed import detect_environment, init_distributed, shutdown_distributed
from dinoreg.train.build import build_model_and_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="vitg14_reg4", help="recipe name or YAML path (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    env = detect_environment()
    device = torch.device("cpu")
    init_distributed(env, device)
    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(cfg.train.seed)
    start = time.perf_counter()
    model, _ = build_model_and_optimizer(cfg, env, device)
    seconds = time.perf_counter() - start
    local = [(p.to_local() if isinstance(p, DTensor) else p) for p in model.parameters()]
    row = {"rank": env.rank, "world_size": env.world_size, "seconds": round(seconds, 1),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "local_parameters": sum(t.numel() for t in local),
           "local_parameter_gib": round(sum(t.numel() * t.element_size() for t in local) / 2**30, 2)}
    rows = [row]
    if env.distributed:
        rows = [None] * env.world_size
        dist.all_gather_object(rows, row)
    if env.is_main:
        for each in rows:
            print(json.dumps(each))
    shutdown_distributed()


if __name__ == "__main__":
    main()
