"""Benchmarks of what users run: the training loop (iteration time, images/s, FLOP/s and MFU, peak memory,
data wait, losses), its prototype heads and losses alone (peak memory) and its checkpoints (save and load time,
size).

The loop is run as ``dinoreg train`` would run it into a temporary directory, with nothing kept: no evaluation, no
artifact monitor (unless asked for), no checkpoint and no teacher file, the model drawn on the device
(``train.initialisation=device``). Steps are timed on a clock synchronised with the device after each step; the
other figures are read back from the run's ``metrics.jsonl``. Checkpoints are written and read with the same
functions the loop uses.

FLOPs are real ones (2 per multiply-add), counted by torch's ``FlopCounterMode`` on the model built on the meta
device (nothing allocated), once per crop size and once per head, with layer norms counted as fvcore counts them
(5 multiply-adds per element): the same total as fvcore's trace (``dinoreg.analysis.flops``), which
``tests/test_bench.py`` checks. A step is the student's forward and backward (twice the forward) on every crop and
the target teacher's forward on the global crops, heads included; element-wise work (softmaxes, the losses) is not
counted, nor are the savings of stochastic depth (the FLOPs are the full model's, so MFU is a lower bound by up to
the drop rate). MFU is given against a matmul peak measured in the same run on the same device, and against the
device's nominal dense peak where it is known (``NOMINAL_PEAKS``).
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode
from omegaconf import DictConfig

from dinoreg.config import load_config
from dinoreg.data import TrainingBatch
from dinoreg.distributed import DistributedEnvironment, detect_environment, process_device
from dinoreg.run_dir import RunDir
from dinoreg.ssl.meta_arch import SSLMetaArch
from dinoreg.train.build import BatchMasks, build_model_and_optimizer, build_ssl_model, precision
from dinoreg.train.checkpoint import load_checkpoint, save_checkpoint
from dinoreg.train.loop import train

# dense bf16 peaks in FLOP/s, by a name torch.cuda.get_device_name() contains (the vendors' data sheets, no sparsity)
NOMINAL_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
# the slow way, for --compare: eager, the plain attention, no activation checkpointing, the single-tensor AdamW
NAIVE = ("train.compile=none", "student.attention_backend=math", "train.activation_checkpointing=none",
         "optim.adamw_implementation=for_loop", "train.pack_crops=false")
# what training_step_flops returns, and what `bench train --flops` reads
FLOP_KEYS = ("student_forward_flops", "teacher_forward_flops", "step_flops", "masked_patches_expected")


def _layer_norm_flops(input_shape: Sequence[int], *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """fvcore's count of a layer norm (5 multiply-adds per element), in FLOPs: 10 per element."""
    return 10 * math.prod(input_shape)


def forward_flops(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of ``module(*inputs)`` under torch's ``FlopCounterMode``: matmuls, convolutions and
    attention (on the meta device, attention is counted through its matmuls), plus layer norms as fvcore counts
    them; element-wise work is free. Runs on the meta device when module and inputs are there: nothing is
    allocated or computed."""
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.native_layer_norm: _layer_norm_flops}) \
            as counter, torch.no_grad():
        module(*inputs)
    return counter.get_total_flops()


def training_step_flops(cfg: DictConfig) -> dict[str, float]:
    """FLOPs of one training step of one device at ``cfg``'s per-device batch (see the module docstring): the
    student's forward, the target teacher's forward (the EMA teacher, or the frozen teacher when distilling) and
    the step (student forward x 3 + teacher forward). The masked patches that go through the iBOT head are their
    expected number (every patch of the global crops when a distilled student is not masked). Counted on the
    model built on the meta device, in a second or two for ViT-g: fixed by the config, whatever the device."""
    with torch.device("meta"):
        model = build_ssl_model(cfg, load_pretrained=False)
    batch = cfg.train.batch_size_per_gpu
    global_images, local_images = 2 * batch, cfg.crops.local_crops_number * batch
    g, s = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    patches = (g // cfg.student.patch_size) ** 2
    masked = (global_images * patches if model.ibot_all_patches else
              global_images * cfg.ibot.mask_sample_probability * statistics.fmean(cfg.ibot.mask_ratio_min_max) * patches)
    masked = masked if model.do_ibot else 0.0

    def per_image(backbone: torch.nn.Module, size: int) -> int:
        return forward_flops(backbone.eval(), torch.zeros(1, 3, size, size, device="meta"))

    def heads(models: torch.nn.ModuleDict) -> tuple[int, int]:
        tokens = torch.zeros(1, models["backbone"].embed_dim, device="meta")
        dino = forward_flops(models["dino_head"], tokens)
        return dino, forward_flops(models["ibot_head"], tokens) if "ibot_head" in models else dino

    student, target = model.student, model.target_teacher
    dino, ibot = heads(student)
    student_flops = (per_image(student["backbone"], g) * global_images + dino * (global_images + local_images)
                     + ibot * masked + (per_image(student["backbone"], s) * local_images if local_images else 0))
    teacher_dino, teacher_ibot = heads(target)
    teacher_flops = per_image(target["backbone"], g) * global_images + teacher_dino * global_images + teacher_ibot * masked
    return {"student_forward_flops": float(student_flops), "teacher_forward_flops": float(teacher_flops),
            "step_flops": float(3 * student_flops + teacher_flops), "masked_patches_expected": masked}


def count_step_flops(config: str = "tiny_cpu", *, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """``dinoreg bench flops``: :func:`training_step_flops` of a recipe, with the batch it is for."""
    cfg = load_config(config, list(overrides))
    return {"config": config, "overrides": list(overrides), "batch_size": cfg.train.batch_size_per_gpu,
            **training_step_flops(cfg)}


def format_flops_report(result: dict[str, Any]) -> str:
    return "\n".join([
        f"{result['config']}: one training step at batch {result['batch_size']} per device",
        f"  student forward  {result['student_forward_flops'] / 1e12:.3f} TFLOP",
        f"  teacher forward  {result['teacher_forward_flops'] / 1e12:.3f} TFLOP",
        f"  step             {result['step_flops'] / 1e12:.3f} TFLOP (student forward x 3 + teacher forward; "
        f"{result['masked_patches_expected']:.0f} masked patches expected)",
    ])


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


def _peak_memory(device: torch.device) -> tuple[str, int]:
    if device.type == "cuda":
        return "cuda_max_allocated", torch.cuda.max_memory_allocated(device)
    return "peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


# what a benchmark run is: it measures and keeps nothing (no checkpoint on the way or at the end, no teacher file,
# no evaluation); placed after the user's overrides
_MEASURE_ONLY = ("optim.epochs=1", "optim.warmup_epochs=0", "evaluation.knn_enabled=false",
                 "evaluation.segmentation_enabled=false", "checkpoint.period=0", "checkpoint.save_final=false",
                 "checkpoint.export_teacher=false")
# defaults of a benchmark that the user's overrides may change: no artifact monitor (its own loader and graphs),
# the model drawn on the device (a benchmark needs no reproducible start)
_BENCH_DEFAULTS = ("monitor.period=0", "train.initialisation=device")
PROFILED_STEPS = 2  # after the timed steps, with --profile


def release_device_memory() -> None:
    """Free what a finished measurement left behind before the next one: compiled graphs (which keep their
    modules' parameters alive), reference cycles, and CUDA's cached blocks."""
    torch.compiler.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
            self.profiler = torch.profiler.profile(activities=activities)
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
        memory_kind, memory = _peak_memory(facts["device"])
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


class _TokenStandIn(torch.nn.Module):
    """A backbone's outputs at no cost: fixed random tokens (per crop size) plus one trainable offset, so that the
    heads and losses are measured alone, with gradients flowing through them."""

    def __init__(self, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.embed_dim, self.patch_size = embed_dim, patch_size
        self.offset = torch.nn.Parameter(torch.zeros(embed_dim))

    def _tokens(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        patches = (images.shape[-2] // self.patch_size) * (images.shape[-1] // self.patch_size)
        generator = torch.Generator(device=images.device).manual_seed(images.shape[-1])
        tokens = torch.randn(images.shape[0], 1 + patches, self.embed_dim, generator=generator,
                             device=images.device) + self.offset
        return {"x_norm_clstoken": tokens[:, 0], "x_norm_patchtokens": tokens[:, 1:]}

    def forward(self, x: Any, masks: Any = None, is_training: bool = True) -> Any:
        return [self._tokens(images) for images in x] if isinstance(x, (list, tuple)) else self._tokens(x)


def resident_bytes(key: str = "VmRSS:") -> int:
    """This process's resident set (``VmRSS:``) or its high-water mark (``VmHWM:``), from /proc/self/status."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key))


def release_freed_memory() -> None:
    """Make the resident set follow the live tensors (glibc): blocks of 64 KiB and more are mmapped and returned
    when freed (M_MMAP_THRESHOLD), and the heap's free pages are released now, so reusing them counts again."""
    libc = ctypes.CDLL(None)
    libc.mallopt(-3, 64 * 1024)
    libc.malloc_trim(0)


def _heads_step(model: SSLMetaArch, batch: TrainingBatch, autocast: Any) -> None:
    with autocast:
        loss, _ = model.forward_loss(batch, teacher_temp=0.07)
    loss.backward()
    model.student.zero_grad(set_to_none=True)


def benchmark_heads(config: str = "vitl14_reg4", *, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Peak memory of one forward + backward through the prototype heads and losses alone (student and teacher
    heads, centering or Sinkhorn-Knopp, the DINO and iBOT cross-entropies), at the recipe's per-device batch and
    its iBOT masks; the backbones are replaced by stand-ins that emit fixed tokens of the right shapes.

    On CUDA: max allocated minus allocated before the step. On CPU (Linux): the step's resident-set high-water mark
    (``/proc/self/clear_refs``) minus the resident set before it, with glibc's mmap threshold fixed at 64 KiB so
    that freed tensors leave the resident set at once, and the heap's free pages released before the step (so
    that memory an earlier computation freed counts when reused); a warm-up step runs first."""
    cfg = load_config(config, [*overrides, "student.depth=1"])  # the heads alone: the backbone is replaced
    device = process_device(detect_environment())
    bf16, autocast = precision(cfg, device, distributed=False)
    model = build_ssl_model(cfg, load_pretrained=False)
    embed_dim, patch = model.student["backbone"].embed_dim, cfg.student.patch_size
    model.student["backbone"] = _TokenStandIn(embed_dim, patch)
    model.teacher["backbone"] = _TokenStandIn(embed_dim, patch).requires_grad_(False)
    model = model.to(device).train()
    batch_size, local = cfg.train.batch_size_per_gpu, cfg.crops.local_crops_number
    g, s = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    masks = BatchMasks(cfg)(2 * batch_size, 0)
    batch = TrainingBatch(global_crops=torch.zeros(2 * batch_size, 3, g, g),
                          local_crops=torch.zeros(local * batch_size, 3, s, s), n_global_crops=2,
                          n_local_crops=local).with_masks(masks).to(device)
    _heads_step(model, batch, autocast)  # warm-up: lazy initialisations, allocator state
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        _heads_step(model, batch, autocast)
        torch.cuda.synchronize(device)
        kind, peak = "cuda_max_allocated", torch.cuda.max_memory_allocated(device) - before
    else:
        release_freed_memory()
        _heads_step(model, batch, autocast)
        release_freed_memory()
        before = resident_bytes()
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
        _heads_step(model, batch, autocast)
        kind, peak = "peak_rss", resident_bytes("VmHWM:") - before
    dino_k = cfg.dino.head_n_prototypes
    ibot_k = cfg.ibot.head_n_prototypes if cfg.ibot.separate_head else dino_k
    masked = int(batch.mask_indices.shape[0])
    cls_rows = 2 * batch_size + local * batch_size
    # one fp32 [rows, K] buffer over every head's rows: the unit the peak is easiest to read in
    buffer = 4 * (cls_rows * dino_k + masked * ibot_k)
    return {"config": config, "overrides": list(overrides), "device": str(device), "dtype": "bfloat16" if bf16 else "float32",
            "torch": torch.__version__, "batch_size": batch_size, "cls_rows": cls_rows, "masked_patch_rows": masked,
            "dino_prototypes": dino_k, "ibot_prototypes": ibot_k, "separate_ibot_head": bool(cfg.ibot.separate_head),
            "centering": cfg.train.centering, "peak_memory_kind": kind, "peak_memory_bytes": peak,
            "fp32_logits_bytes": buffer, "peak_in_fp32_logits": peak / buffer}


def format_heads_report(result: dict[str, Any]) -> str:
    return "\n".join([
        f"{result['config']}: heads and losses alone at batch {result['batch_size']} on {result['device']}, "
        f"{result['dtype']}, {result['centering']}",
        f"  rows            {result['cls_rows']} cls tokens x {result['dino_prototypes']} prototypes, "
        f"{result['masked_patch_rows']} masked patches x {result['ibot_prototypes']} prototypes "
        f"({'separate' if result['separate_ibot_head'] else 'shared'} iBOT head)",
        f"  peak memory     {result['peak_memory_bytes'] / 2**20:.0f} MiB ({result['peak_memory_kind']}) = "
        f"{result['peak_in_fp32_logits']:.2f} x the fp32 logits of those rows ({result['fp32_logits_bytes'] / 2**20:.0f} MiB)",
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
