#!/usr/bin/env python3
"""Two ways of running the same training step, timed in interleaved rounds in one process.

    python launch/bench_step_ab.py --config vits14_reg4 --a train.compile=none --b train.compile=blocks \
        --common train.batch_size_per_gpu=2

Each side is a full model and optimizer built from the recipe plus ``--common`` plus its own overrides (the same
seed, so the same weights) and runs ``dinoreg.train.loop.train_step`` (forward and loss, backward, clipping,
AdamW, EMA) on one fixed batch of the recipe's crops and iBOT masks; the data loader and the photometric
augmentation, the same for both, are left out. After --warmup steps of each, the rounds alternate one step of A
and one of B, so that machine noise falls on both alike; the medians and the ratio A/B are printed (and written
with --json). Where the two compute the same maths, the losses of their first step are checked to agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dinoreg.config import load_config
from dinoreg.data import TrainingBatch
from dinoreg.distributed import DistributedEnvironment
from dinoreg.train.build import BatchMasks, build_model_and_optimizer
from dinoreg.train.loop import train_step


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny_cpu", help="recipe name or YAML file (default: %(default)s)")
    parser.add_argument("--common", nargs="*", default=[], metavar="key=value", help="overrides of both sides")
    parser.add_argument("--a", nargs="*", default=[], metavar="key=value", help="overrides of side A")
    parser.add_argument("--b", nargs="*", default=[], metavar="key=value", help="overrides of side B")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each side first (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds, one step of each (default: %(default)s)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the rounds, profile one more step of each side and print its N most expensive "
                             "operators (self time; default: no profile)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    return parser.parse_args()


def main() -> int:
    args = _arguments()
    sides = {}
    for name, overrides in (("a", args.a), ("b", args.b)):
        cfg = load_config(args.config, [*args.common, *overrides, "train.output_dir=/nonexistent"])
        torch.manual_seed(cfg.train.seed)
        model, optimizer = build_model_and_optimizer(cfg, DistributedEnvironment(), torch.device("cpu"),
                                                     load_pretrained=False)
        sides[name] = (cfg, model, optimizer)
    cfg = sides["a"][0]
    b, g, s = cfg.train.batch_size_per_gpu, cfg.crops.global_crops_size, cfg.crops.local_crops_size
    generator = torch.Generator().manual_seed(0)
    batch = TrainingBatch(global_crops=torch.randn(2 * b, 3, g, g, generator=generator),
                          local_crops=torch.randn(cfg.crops.local_crops_number * b, 3, s, s, generator=generator),
                          n_global_crops=2, n_local_crops=cfg.crops.local_crops_number).with_masks(BatchMasks(cfg)(2 * b, 0))
    values = {"lr": 1e-4, "weight_decay": 0.04, "last_layer_lr": 1e-4, "momentum": 0.996, "teacher_temp": 0.04}

    def step(name: str) -> dict[str, float]:
        _, model, optimizer = sides[name]
        metrics, _ = train_step(model, optimizer, batch, values, clip_grad=cfg.optim.clip_grad)
        return {k: float(v) for k, v in metrics.items()}

    first = {}
    for name in sides:
        torch.manual_seed(1)  # the same stochastic-depth draws in both first steps
        first[name] = step(name)
    agree = all(abs(first["a"][k] - first["b"][k]) <= 1e-4 * max(1.0, abs(first["a"][k])) for k in first["a"])
    for _ in range(args.warmup - 1):
        for name in sides:
            step(name)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name in sides:
            start = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {"config": args.config, "common": args.common, "a": args.a, "b": args.b, "rounds": args.rounds,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "seconds": times, "median_s": medians,
              "a_over_b": medians["a"] / medians["b"], "first_step_losses": first, "first_losses_agree": agree}
    print(f"{args.config} {' '.join(args.common)}: train_step medians of {args.rounds} interleaved rounds on "
          f"{torch.get_num_threads()} threads")
    for name in sides:
        print(f"  {name.upper()} {' '.join(getattr(args, name)) or '(recipe)':40s} {medians[name]:.3f} s  "
              f"({', '.join(f'{t:.3f}' for t in times[name])})")
    print(f"  A / B = {result['a_over_b']:.2f}x; first-step losses {'agree' if agree else 'differ'} (rel. 1e-4)")
    for name in sides if args.profile else ():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            step(name)
        print(f"side {name.upper()}, one step, by self CPU time:")
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile, max_name_column_width=60))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
