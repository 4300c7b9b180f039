"""Benchmarks of the real training loop: iteration time, images/s and data wait.

The loop is run as ``dinoreg train`` would run it (kNN evaluation off) into a temporary directory,
and the figures are read back from its ``metrics.jsonl``, so what is measured is what users run.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Sequence

from dinoreg.config import load_config
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
        rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    measured = [row for row in rows if "total_loss" in row][warmup:]
    batch = cfg.train.batch_size_per_gpu
    step_times = [batch / row["images_per_sec"] for row in measured]
    waits = [row["data_wait"] for row in measured]
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
    }


def format_report(result: dict[str, float]) -> str:
    return "\n".join([
        f"{result['config']}: {result['iterations']} iterations of batch {result['batch_size']} (after warmup)",
        f"  iteration time  median {result['iteration_time_median_s']:.3f} s, mean {result['iteration_time_mean_s']:.3f} s",
        f"  throughput      {result['images_per_sec']:.1f} images/s",
        f"  data wait       median {result['data_wait_median_s'] * 1e3:.1f} ms, mean "
        f"{result['data_wait_mean_s'] * 1e3:.1f} ms ({100 * result['data_wait_fraction']:.1f}% of step time)",
    ])
