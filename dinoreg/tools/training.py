"""The training loop's benchmark (``dinoreg bench train``): iteration time, images/s, FLOP/s and MFU, peak memory,
data wait, losses; optionally the same the naive way, and a profile of further steps.

The loop is run as ``dinoreg train`` would run it into a temporary directory, with nothing kept: no evaluation, no
artifact monitor (unless asked for), no checkpoint and no teacher file, the model drawn on the device
(``train.initialisation=device``). Steps are timed on a clock synchronised with the device after each step; the
other figures are read back from the run's ``metrics.jsonl``. The FLOPs of a step are counted on the meta device
(:mod:`dinoreg.tools.flops`); MFU is given against a matmul peak measured in the same run on the same device, and
against the device's nominal dense peak where it is known (``NOMINAL_PEAKS``).
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import DictConfig

from dinoreg.config import load_config
from dinoreg.distributed import detect_environment, process_device
from dinoreg.run_dir import RunDir
from dinoreg.tools.flops import FLOP_KEYS, training_step_flops
from dinoreg.tools.memory import peak_memory, release_device_memory
from dinoreg.train.build import precision
from dinoreg.train.loop import train

# dense bf16 peaks in FLOP/s, by a name torch.cuda.get_device_name() contains (the vendors' data sheets, no sparsity)
NOMINAL_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
# the slow way, for --compare: eager, the plain attention, no activation checkpointing, the single-tensor AdamW
NAIVE = ("train.compile=none", "student.attention_backend=math", "train.activation_checkpointing=none",
         "optim.adamw_implementation=for_loop", "train.pack_crops=false")


def matmul_peak(device: torch.device, dtype: torch.dtype, *, size: Optional[int] = None, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul on ``device`` in ``dtype`` (8192 on CUDA, 2048 elsewhere): the
    attainable peak that MFU is also measured against."""
    size = size or (8192 if device.type == "cuda" else 2048)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    for _ in range(2):
        a @ b
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _synchronize(device)
    return 2.0 * size ** 3 * repeats / (time.perf_counter() - started)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_facts(cfg: DictConfig) -> dict[str, Any]:
    """The device this process trains on, its compute dtype, its nominal peak (None when unknown)."""
    device = process_device(detect_environment())
    bf16, _ = precision(cfg, device, distributed=False)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    nominal = next((peak for key, peak in NOMINAL_PEAKS.items() if key in name), None) if bf16 else None
    return {"device": device, "device_name": name, "dtype": torch.bfloat16 if bf16 else torch.float32,
            "nominal_peak_flops": nominal}


# what a benchmark run is: it measures and keeps nothing (no checkpoint on the way or at the end, no teacher file,
# no evaluation); placed after the user's overrides
_MEASURE_ONLY = ("optim.epochs=1", "optim.warmup_epochs=0", "evaluation.knn_enabled=false",
                 "evaluation.segmentation_enabled=false", "checkpoint.period=0", "checkpoint.save_final=false",
                 "checkpoint.export_teacher=false")
# defaults of a benchmark that the user's overrides may change: no artifact monitor (its own loader and graphs),
# the model drawn on the device (a benchmark needs no reproducible start)
_BENCH_DEFAULTS = ("monitor.period=0", "train.initialisation=device")
PROFILED_STEPS = 2  # after the timed steps, with --profile


def benchmark_training(config: str = "tiny_cpu", *, iterations: int = 50, warmup: int = 10,
                       overrides: Sequence[str] = (), compare: bool = False,
                       flops: Optional[dict[str, float]] = None, profile: Optional[str] = None) -> dict[str, Any]:
    """Train ``warmup + iterations`` steps; summarise the last ``iterations``: step time (median, mean, p90) on a
    clock synchronised with the device after every step, images/s (source images, each giving 2 global and n local
    crops), FLOPs, TFLOP/s and MFU, peak memory, data wait (median, mean, share of the step time), the losses
    (finite, falling). Nothing is saved or exported; the model is drawn on the device (``train.initialisation``).

    ``flops``: the FLOPs of a step (:func:`training_step_flops`' keys), when counted already. ``profile``: a file for
    the table of the top operators and kernels of :data:`PROFILED_STEPS` further steps (not timed).
    ``compare``: the same again the naive way (``NAIVE``), after freeing the first run's memory, and the ratio of
    throughputs; a naive run that does not fit in memory is reported so (``naive.fits``) and the fast result kept."""
    if warmup < 1:
        raise ValueError("--warmup must be at least 1: the first timed step starts where a warm-up step ended")
    result = _measure_training(config, iterations=iterations, warmup=warmup, overrides=overrides, flops=flops,
                               profile=profile)
    if compare:
        release_device_memory()
        try:  # the same maths the slow way: the FLOPs of a step are the same, counted once
            naive = _measure_training(config, iterations=iterations, warmup=warmup, overrides=[*overrides, *NAIVE],
                                      flops={k: result[k] for k in FLOP_KEYS})
        except torch.OutOfMemoryError as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else "out of memory"
            naive = {"fits": False, "batch_size": result["batch_size"], "overrides": [*overrides, *NAIVE],
                     "error": first_line}
        release_device_memory()
        result["naive"] = naive
        result["speedup_over_naive"] = result["images_per_sec"] / naive["images_per_sec"] if naive["fits"] else None
    return result


class _StepClock:
    """``train``'s ``after_step``: the time at the end of every iteration, after waiting for the device; and the
    profiler over the :data:`PROFILED_STEPS` iterations after the timed ones."""

    def __init__(self, device: torch.device, timed_end: int, profile: Optional[str]) -> None:
        self.device, self.timed_end, self.profile = device, timed_end, profile
        self.stamps: list[float] = []
        self.profiler: Optional[torch.profiler.profile] = None

    def __call__(self, iteration: int) -> None:
        _synchronize(self.device)
        self.stamps.append(time.perf_counter())
        if self.profile is None:
            return
        if iteration + 1 == self.timed_end:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, acc_events=True)
            self.profiler.start()
        elif iteration + 1 == self.timed_end + PROFILED_STEPS and self.profiler is not None:
            self.profiler.stop()
            key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            table = self.profiler.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=90)
            Path(self.profile).write_text(f"top operators and kernels of {PROFILED_STEPS} training steps, by "
                                          f"{key.replace('_', ' ')}\n{table}\n")


def loss_trend(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Whether every logged loss is finite, and the DINO KL (cross-entropy less the teacher's entropy) plus the
    iBOT loss over the first and the last fifth of the steps: the part of the objective that training lowers."""
    steps = [row for row in rows if "total_loss" in row]
    kl = [row["dino_local_crops_loss"] + row["dino_global_crops_loss"] - row["teacher_entropy"] + row["ibot_loss"]
          for row in steps if all(key in row for key in ("dino_local_crops_loss", "dino_global_crops_loss",
                                                         "teacher_entropy", "ibot_loss"))]
    fifth = max(len(kl) // 5, 1)
    first, last = (statistics.fmean(kl[:fifth]), statistics.fmean(kl[-fifth:])) if kl else (None, None)
    return {"losses_finite": all(math.isfinite(row["total_loss"]) for row in steps),
            "total_loss": [row["total_loss"] for row in steps],
            "dino_kl_plus_ibot_first_fifth": first, "dino_kl_plus_ibot_last_fifth": last,
            "dino_kl_plus_ibot_falls": None if first is None else last < first}


def _measure_training(config: str, *, iterations: int, warmup: int, overrides: Sequence[str],
                      flops: Optional[dict[str, float]] = None, profile: Optional[str] = None) -> dict[str, Any]:
    timed_end = warmup + iterations
    with tempfile.TemporaryDirectory() as output_dir:
        cfg = load_config(config, [*_BENCH_DEFAULTS, *overrides, *_MEASURE_ONLY,
                                   f"train.epoch_length={timed_end + (PROFILED_STEPS if profile else 0)}",
                                   f"train.output_dir={output_dir}"])
        flops = flops or training_step_flops(cfg)  # on the meta device, before the run: a misfit shows at once
        facts = _device_facts(cfg)
        if facts["device"].type == "cuda":
            torch.cuda.reset_peak_memory_stats(facts["device"])
        clock = _StepClock(facts["device"], timed_end, profile)
        train(cfg, after_step=clock)
        memory_kind, memory = peak_memory(facts["device"])
        rows = [json.loads(line) for line in RunDir(output_dir).metrics.read_text().splitlines()]
    peak = matmul_peak(facts["device"], facts["dtype"])
    measured = [row for row in rows if "total_loss" in row][warmup:timed_end]
    batch = cfg.train.batch_size_per_gpu
    step_times = [end - start for start, end in zip(clock.stamps[warmup - 1:timed_end - 1], clock.stamps[warmup:timed_end])]
    waits = [row["data_wait"] for row in measured]
    # the artifact monitor runs outside the timed steps: its cost per period, as a share of that period
    monitor = [row["monitor/seconds"] for row in rows if "monitor/seconds" in row][1:]  # the first one warms up
    monitor_s = statistics.median(monitor) if monitor else None
    median = statistics.median(step_times)
    achieved = flops["step_flops"] / median
    nominal = facts["nominal_peak_flops"]
    return {
        "config": config,
        "overrides": list(overrides),
        "fits": True,
        "device": facts["device_name"],
        "dtype": str(facts["dtype"]).removeprefix("torch."),
        "torch": torch.__version__,
        "compile": cfg.train.compile,
        "activation_checkpointing": cfg.train.activation_checkpointing,
        "attention_backend": cfg.student.attention_backend,
        "fsdp": cfg.train.fsdp,
        "adamw_implementation": cfg.optim.adamw_implementation,
        "batch_size": batch,
        "iterations": len(step_times),
        "iteration_time_median_s": median,
        "iteration_time_mean_s": statistics.fmean(step_times),
        "iteration_time_p90_s": statistics.quantiles(step_times, n=10)[-1] if len(step_times) > 1 else median,
        **{key: flops.get(key) for key in FLOP_KEYS},
        "achieved_flops_per_s": achieved,
        "matmul_peak_flops_per_s": peak,
        "mfu_of_matmul_peak": achieved / peak,
        "nominal_peak_flops_per_s": nominal,
        "mfu_of_nominal_peak": achieved / nominal if nominal else None,
        "stochastic_depth_savings_counted": False,
        "peak_memory_kind": memory_kind,
        "peak_memory_bytes": memory,
        "images_per_sec": batch * len(step_times) / sum(step_times),
        "data_wait_median_s": statistics.median(waits),
        "data_wait_mean_s": statistics.fmean(waits),
        "data_wait_fraction": sum(waits) / sum(step_times),
        "monitor_period": cfg.monitor.period,
        "monitor_seconds_median": monitor_s,
        "monitor_overhead": monitor_s / (cfg.monitor.period * statistics.median(step_times)) if monitor_s else None,
        **loss_trend(rows),
    }


def format_report(result: dict[str, Any]) -> str:
    nominal = (f", {100 * result['mfu_of_nominal_peak']:.1f}% of the nominal {result['nominal_peak_flops_per_s'] / 1e12:.0f} TFLOP/s"
               if result["nominal_peak_flops_per_s"] else ", no nominal peak known for this device")
    lines = [
        f"{result['config']}: {result['iterations']} iterations of batch {result['batch_size']} (after warmup) on "
        f"{result['device']}, {result['dtype']}, compile {result['compile']}, activation checkpointing "
        f"{result['activation_checkpointing']}, attention {result['attention_backend']}",
        f"  iteration time  median {result['iteration_time_median_s']:.3f} s, mean {result['iteration_time_mean_s']:.3f} s, "
        f"p90 {result['iteration_time_p90_s']:.3f} s",
        f"  throughput      {result['images_per_sec']:.1f} images/s",
        f"  compute         {result['step_flops'] / 1e12:.3f} TFLOP per step (stochastic-depth savings not counted), "
        f"{result['achieved_flops_per_s'] / 1e12:.3f} TFLOP/s",
        f"  MFU             {100 * result['mfu_of_matmul_peak']:.1f}% of the measured matmul peak "
        f"{result['matmul_peak_flops_per_s'] / 1e12:.3f} TFLOP/s{nominal}",
        f"  peak memory     {result['peak_memory_bytes'] / 2**30:.2f} GiB ({result['peak_memory_kind']})",
        f"  data wait       median {result['data_wait_median_s'] * 1e3:.1f} ms, mean "
        f"{result['data_wait_mean_s'] * 1e3:.1f} ms ({100 * result['data_wait_fraction']:.1f}% of step time)",
        f"  artifact monitor {result['monitor_seconds_median']:.3f} s per measurement, every "
        f"{result['monitor_period']} iterations: {100 * result['monitor_overhead']:.2f}% of training time"
        if result["monitor_overhead"] is not None else "  artifact monitor off or measured only once",
    ]
    falls = {True: "falls", False: "does not fall", None: "not logged"}[result["dino_kl_plus_ibot_falls"]]
    lines.append(f"  losses          {'all finite' if result['losses_finite'] else 'NOT all finite'}; DINO KL + iBOT "
                 f"{falls} from the first to the last fifth of the steps")
    naive = result.get("naive")
    if naive and naive["fits"]:
        lines.append(f"  naive way       {naive['images_per_sec']:.1f} images/s (eager, math attention, no "
                     f"checkpointing, single-tensor AdamW): {result['speedup_over_naive']:.2f}x faster")
    elif naive:
        lines.append(f"  naive way       does not fit at batch {naive['batch_size']} ({naive['error']})")
    return "\n".join(lines)
