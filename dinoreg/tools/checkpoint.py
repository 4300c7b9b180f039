"""Save and load times and size of a full training checkpoint (``dinoreg bench checkpoint``), written and read with
the functions the training loop uses."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from dinoreg.config import load_config
from dinoreg.distributed import DistributedEnvironment
from dinoreg.ssl.meta_arch import SSLMetaArch
from dinoreg.train.build import build_model_and_optimizer
from dinoreg.train.checkpoint import load_checkpoint, save_checkpoint


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
