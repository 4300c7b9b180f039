"""Benchmarks of what users run: the training loop (iteration time, images/s, data wait) and its
checkpoints (save and load time, size).

The loop is run as ``dinoreg train`` would run it (kNN evaluation off) into a temporary directory,
and the figures are read back from its ``metrics.jsonl``; checkpoints are written and read with the
same functions the loop uses.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from dinoreg.config import load_config
from dinoreg.distributed import DistributedEnvironment
from dinoreg.run_dir import RunDir
from dinoreg.ssl.meta_arch import SSLMetaArch
from dinoreg.train.build import build_model_and_optimizer
from dinoreg.train.checkpoint import load_checkpoint, save_checkpoint
from dinoreg.train.loop import train


def benchmark_training(config: str = "tiny_cpu", *, iterations: int = 50, warmup: int = 10,
                       overrides: Sequence[str] = ()) -> dict[str, float]:
    """Train ``warmup + iterations`` steps; summarise the last ``iterations``.

    Returns seconds per iteration (median and mean), images/s (source images, each giving 2 global
    and n local crops), and data wait per iteration (median, mean, and as a fraction of step time).
    """
    with tempfile.TemporaryDirectory() as output_dir:
        cfg = load_config(config, [*overrides, "optim.epochs=1", "optim.warmup_epochs=0",
                                   f"train.epoch_length={warmup + iterations}", "evaluation.knn_enabled=false",
                                   f"train.output_dir={output_dir}"])
        train(cfg)
        rows = [json.loads(line) for line in RunDir(output_dir).metrics.read_text().splitlines()]
    measured = [row for row in rows if "total_loss" in row][warmup:]
    batch = cfg.train.batch_size_per_gpu
    step_times = [batch / row["images_per_sec"] for row in measured]
    waits = [row["data_wait"] for row in measured]
    # the artifact monitor runs outside the timed steps: its cost per period, as a share of that period
    monitor = [row["monitor/seconds"] for row in rows if "monitor/seconds" in row][1:]  # the first one warms up
    monitor_s = statistics.median(monitor) if monitor else None
    return {
        "config": config,
        "batch_size": batch,
        "iterations": len(measured),
        "iteration_time_median_s": statistics.median(step_times),
        "iteration_time_mean_s": statistics.fmean(step_times),
        "images_per_sec": batch * len(step_times) / sum(step_times),
        "data_wait_median_s": statistics.median(waits),
        "data_wait_mean_s": statistics.fmean(waits),
        "data_wait_fraction": sum(waits) / sum(step_times),
        "monitor_period": cfg.monitor.period,
        "monitor_seconds_median": monitor_s,
        "monitor_overhead": monitor_s / (cfg.monitor.period * statistics.median(step_times)) if monitor_s else None,
    }


def format_report(result: dict[str, float]) -> str:
    return "\n".join([
        f"{result['config']}: {result['iterations']} iterations of batch {result['batch_size']} (after warmup)",
        f"  iteration time  median {result['iteration_time_median_s']:.3f} s, mean {result['iteration_time_mean_s']:.3f} s",
        f"  throughput      {result['images_per_sec']:.1f} images/s",
        f"  data wait       median {result['data_wait_median_s'] * 1e3:.1f} ms, mean "
        f"{result['data_wait_mean_s'] * 1e3:.1f} ms ({100 * result['data_wait_fraction']:.1f}% of step time)",
        f"  artifact monitor {result['monitor_seconds_median']:.3f} s per measurement, every "
        f"{result['monitor_period']} iterations: {100 * result['monitor_overhead']:.2f}% of training time"
        if result["monitor_overhead"] is not None else "  artifact monitor off or measured only once",
    ])


def _model_and_optimizer(cfg) -> tuple[SSLMetaArch, torch.optim.Optimizer]:
    model, optimizer = build_model_and_optimizer(cfg, DistributedEnvironment(), torch.device("cpu"))
    for p in model.student.parameters():  # one step with made-up gradients: the optimizer state exists
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    return model, optimizer


def benchmark_checkpoint(config: str = "tiny_cpu", *, repeats: int = 3, overrides: Sequence[str] = (),
                         directory: str | None = None) -> dict[str, float]:
    """Save and load a full training state (student, teacher, AdamW state) ``repeats`` times each, in one
    process; returns the median seconds and the checkpoint's size on disk. ``directory``: where to write
    (default a temporary directory; the figures depend on its filesystem)."""
    cfg = load_config(config, list(overrides))
    model, optimizer = _model_and_optimizer(cfg)
    fresh, fresh_optimizer = _model_and_optimizer(cfg)
    saves, loads = [], []
    with tempfile.TemporaryDirectory(dir=directory) as run_dir:
        for i in range(repeats):
            start = time.perf_counter()
            path = save_checkpoint(run_dir, iteration=i + 1, model=model, optimizer=optimizer, stream_position=0,
                                   cfg=cfg, keep_last=1)
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            load_checkpoint(path, model=fresh, optimizer=fresh_optimizer)
            loads.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    parameters = sum(p.numel() for p in model.parameters())
    return {"config": config, "parameters": parameters, "checkpoint_bytes": size,
            "save_median_s": statistics.median(saves), "load_median_s": statistics.median(loads),
            "repeats": repeats}


def format_checkpoint_report(result: dict[str, float]) -> str:
    return "\n".join([
        f"{result['config']}: student + teacher {result['parameters'] / 1e6:.1f} M parameters, with AdamW state",
        f"  checkpoint size {result['checkpoint_bytes'] / 2**20:.1f} MiB",
        f"  save            median {result['save_median_s']:.2f} s of {result['repeats']}",
        f"  load            median {result['load_median_s']:.2f} s of {result['repeats']}",
    ])
