"""``train(cfg)``: set up, then iterate (the step), with the periodic work (log, evaluate, monitor, checkpoint).

One process (CPU or one GPU), or several under torchrun / srun with FSDP2-sharded student and teacher. Read
top to bottom: :func:`train` -> :func:`set_up` (a :class:`Run`) -> :func:`iterate`, whose every iteration is
:func:`next_batch`, :func:`train_step`, :func:`log_step` and :func:`periodic_work`.

A step never waits for the device: its figures (loss terms, gradient norms) stay there, and every
``train.log_every`` iterations, and before anything reads the model (evaluation, monitor, checkpoint, export),
:func:`flush` averages the pending ones over ranks in one collective, reads them in one host synchronisation,
checks them (a non-finite term stops the run, naming its first iteration, before anything is saved) and logs a
row per iteration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from dinoreg.config import build_backbone_from_config, save_config
from dinoreg.data import DatasetError, Photometric, TrainingBatch, UnfilledBatch, build_dataset
from dinoreg.distributed import (DistributedEnvironment, barrier, broadcast_flag, detect_environment, init_distributed,
                                 mean_over_ranks, process_device, shutdown_distributed)
from dinoreg.errors import InputError
from dinoreg.models.weights import save_backbone
from dinoreg.run_dir import RunDir
from dinoreg.ssl.feature import TrainingFeature
from dinoreg.ssl.meta_arch import SSLMetaArch
from dinoreg.train.build import (build_model_and_optimizer, build_photometric, precision, seed_everything,
                                 training_batches)
from dinoreg.train.checkpoint import (load_checkpoint, remove_incomplete, save_checkpoint,
                                      set_aside_checkpoints_after)
from dinoreg.train.checkpoint_reader import CheckpointReader
from dinoreg.train.evaluation import KnnEvaluator, SegmentationEvaluator
from dinoreg.train.logging import TrainingLogger
from dinoreg.train.monitor import ArtifactMonitor
from dinoreg.train.optim import (BACKBONE_LR_SCALE, DIVERGENCE_HINT, SCHEDULE_NAMES, Schedules, apply_optim_schedule,
                                 clip_grad_norms_on_device, separate_backbone_groups)
from dinoreg.train.resolve import resolve_run_config
from dinoreg.train.run_folder import lock_output_dir, resume_point
from dinoreg.train.signals import EXIT_CODE_SAVED_ON_SIGNAL, SignalWatcher, StoppedOnSignal

__all__ = ["NonFiniteLossError", "Run", "StepFigures", "flush", "iterate", "read_figures", "set_up", "train",
           "train_step"]


UNFILLED_BATCHES_LIMIT = 16  # batches in a row without two readable images: the dataset is unreadable


class NonFiniteLossError(InputError, FloatingPointError):
    """A loss term became NaN or inf; training stops before that state is saved anywhere."""


def train(cfg: DictConfig, *, resume: bool = True, allow_config_change: bool = False,
          after_step: Optional[Callable[[int], None]] = None) -> dict[str, float]:
    """Train ``cfg`` to the end, resuming from the newest checkpoint in ``train.output_dir`` when ``resume``.

    Works as one process, under torchrun and under srun (see :mod:`dinoreg.distributed`). Returns the last
    logged metrics (``knn_top1`` included); raises :class:`StoppedOnSignal` after a save on signal.
    ``after_step(iteration)``: called after each iteration's periodic work, outside the step's own timing (the
    benchmark's device-synchronised clock and profiler).
    """
    env = detect_environment()
    if cfg.train.fsdp == "always":
        env = dataclasses.replace(env, group_of_one=True)
    device = process_device(env)
    init_distributed(env, device)
    lock = None
    try:
        lock = lock_output_dir(cfg, env)
        run = set_up(cfg, env, device, resume=resume, allow_config_change=allow_config_change)
        run.after_step = after_step
        try:
            iterate(run)
        finally:
            run.signals.close()
            run.logger.close()
        return run.logger.latest
    finally:
        if lock is not None:
            lock.release()
        shutdown_distributed()


# --------------------------------------------------------------------------------------------------
# set-up


@dataclass
class Run:
    """Everything one training run holds while it iterates."""

    cfg: DictConfig
    env: DistributedEnvironment
    device: torch.device
    autocast: Any  # bf16 autocast on one GPU, else a no-op context
    output: RunDir
    model: SSLMetaArch
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    batches: Iterator[TrainingBatch | UnfilledBatch]
    photometric: Photometric
    evaluators: dict[str, Callable[..., dict[str, float]]]  # label -> the teacher's periodic evaluation
    monitor: Optional[ArtifactMonitor]
    logger: TrainingLogger
    signals: SignalWatcher
    report: Callable[[str], None]  # a warning from any rank (keeps the progress bar intact on rank 0)
    first_iteration: int  # the first iteration this process runs (0, or the resumed checkpoint's)
    position: int  # global data stream position: images drawn so far by all ranks
    bad_files: int = 0
    pending: list[StepFigures] = field(default_factory=list)  # steps whose figures are not read yet
    after_step: Optional[Callable[[int], None]] = None  # see train()

    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size_per_gpu * self.env.world_size


def set_up(cfg: DictConfig, env: DistributedEnvironment, device: torch.device, *, resume: bool,
           allow_config_change: bool) -> Run:
    """Seeds, schedules, data, model and optimizer (restored from the newest checkpoint when resuming), the run
    directory, and the periodic work's tools. ``cfg`` is left as it is: the run uses its resolved, read-only copy
    (:func:`~dinoreg.train.resolve.resolve_run_config`), ``Run.cfg``."""
    output = RunDir(cfg.train.output_dir)
    seed_everything(cfg.train.seed)
    dataset = build_dataset(cfg.train.dataset_path, split="train")  # a bad path fails here, before any model
    warn = _rank_printer(env, cfg.train.log_all_ranks)
    cfg, checkpoint, phase_source = resolve_run_config(
        cfg, world_size=env.world_size,
        find_checkpoint=lambda scaled: resume_point(scaled, output, env.world_size, allow_config_change, warn)
        if resume else None)
    schedules = Schedules(cfg)
    bf16, autocast = precision(cfg, device, distributed=env.distributed)
    # a resumed run takes every weight from its checkpoint: student.pretrained_weights need not exist any more
    model, optimizer = build_model_and_optimizer(cfg, env, device, bf16=bf16, load_pretrained=checkpoint is None,
                                                 phase_source=phase_source)
    if any(BACKBONE_LR_SCALE in feature.values(0) for feature in model.features):
        separate_backbone_groups(optimizer)  # a feature scales the backbone's lr alone: before the restore
    first_iteration, position = _restore(checkpoint, model, optimizer, warn) if checkpoint else (0, 0)
    if env.is_main:
        output.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output.config)
        remove_incomplete(output.root)
        for damaged in set_aside_checkpoints_after(output.root, first_iteration):
            warn(f"moved the damaged checkpoint aside to {damaged}, so that checkpoint retention never counts it")
    barrier()
    batches = training_batches(cfg, dataset, env, position=position, features=model.features,
                               pin_memory=device.type == "cuda")
    photometric = build_photometric(cfg, device)
    evaluators = {label: build(cfg, device) for label, build, enabled in (
        ("kNN", KnnEvaluator, cfg.evaluation.knn_enabled),
        ("segmentation", SegmentationEvaluator, cfg.evaluation.segmentation_enabled)) if enabled}
    monitor = ArtifactMonitor(cfg, device) if cfg.monitor.period else None  # reads its probe images: may fail
    # last, because train() closes them only once set_up has returned: the logger opens metrics.jsonl and
    # TensorBoard, the watcher takes over the signals
    logger = TrainingLogger(output.root, total_iterations=schedules.total_iterations, start_iteration=first_iteration,
                            enabled=env.is_main, print_every=cfg.train.log_every)
    logger.hparams(OmegaConf.to_container(cfg, resolve=True))
    return Run(cfg=cfg, env=env, device=device, autocast=autocast, output=output, model=model, optimizer=optimizer,
               schedules=schedules, batches=batches, photometric=photometric, evaluators=evaluators, monitor=monitor,
               logger=logger, signals=SignalWatcher(cfg.checkpoint.save_on_signals),
               report=logger.warn if env.is_main else warn, first_iteration=first_iteration, position=position)


def _rank_printer(env: DistributedEnvironment, all_ranks: bool) -> Callable[[str], None]:
    """print on rank 0; on the other ranks only with ``train.log_all_ranks``, prefixed by the rank."""
    def warn(message: str) -> None:
        if env.is_main:
            print(message, flush=True)
        elif all_ranks:
            print(f"[rank {env.rank}] {message}", flush=True)
    return warn


def _restore(reader: CheckpointReader, model: SSLMetaArch, optimizer: torch.optim.Optimizer,
             warn: Callable[[str], None]) -> tuple[int, int]:
    """Load the checkpoint of ``reader`` (verified) into model and optimizer; returns ``(iteration, stream position)``
    to continue from. A feature's frozen model may be absent from it where the feature says so (one turned on in a
    resumed run)."""
    checkpoint, iteration = reader.checkpoint, reader.verify()["iteration"]
    missing_ok = {prefix: why for feature in model.features
                  for prefix, why in feature.missing_on_resume(iteration).items()}
    meta = load_checkpoint(checkpoint, model=model, optimizer=optimizer, missing_ok=missing_ok,
                           verified_meta=reader.verify())
    if not meta["rng_restored"]:
        warn(f"{checkpoint.name}: {meta['rng_unrestored_because']}: the augmentation RNG streams restart (the data "
             "order still continues exactly)")
    warn(f"resumed from {checkpoint} (iteration {meta['iteration']})")
    return meta["iteration"], meta["stream_position"]


# --------------------------------------------------------------------------------------------------
# the iterations


def iterate(run: Run) -> None:
    """Iterations ``run.first_iteration`` to the end, then the teacher backbone file."""
    if run.first_iteration == 0:
        evaluate_and_monitor(run, 0, evaluate=True, monitor=True)
    step_end = time.perf_counter()
    features = run.model.features
    for it in range(run.first_iteration, run.schedules.total_iterations):
        values = {**run.schedules.values(it), **{k: v for feature in features for k, v in feature.values(it).items()}}
        batch = next_batch(run, it)
        data_wait = time.perf_counter() - step_end
        batch = augment_on_device(batch.to(run.device, non_blocking=True), run.photometric, features)
        for feature in features:
            feature.before_step(run.model, it)
        metrics, grad_norms = train_step(run.model, run.optimizer, batch, values, clip_grad=run.cfg.optim.clip_grad,
                                         autocast=run.autocast,
                                         freeze_backbones=not all(feature.trains_backbone(it) for feature in features))
        for feature in features:
            feature.after_step(run.model, it)
        if batch.bad_files:
            run.bad_files += len(batch.bad_files)
            names = list(map(str, batch.bad_files))
            run.report(f"iteration {it}: skipped {len(names)} unreadable images: {', '.join(names[:3])}"
                       + (", ..." if len(names) > 3 else ""))
        log_step(run, it, values, metrics, grad_norms, data_wait=data_wait, seconds=time.perf_counter() - step_end)
        periodic_work(run, it)
        if run.after_step is not None:
            run.after_step(it)
        step_end = time.perf_counter()
    if run.cfg.checkpoint.export_teacher:
        export_teacher(run)  # the last step's log_step flushed (and checked) every figure
    run.logger.finished()


def augment_on_device(batch: TrainingBatch, photometric: Photometric,
                      features: Sequence[TrainingFeature] = ()) -> TrainingBatch:
    """Colour, blur, solarisation and normalisation of the crops on the device, then what the ``features`` change
    (:meth:`~dinoreg.ssl.feature.TrainingFeature.prepare_batch`)."""
    global_crops, local_crops = photometric(batch.global_crops, batch.local_crops)
    batch = batch.replace(global_crops=global_crops, local_crops=local_crops)
    for feature in features:
        batch = feature.prepare_batch(batch)
    return batch


def next_batch(run: Run, iteration: int) -> TrainingBatch:
    """This rank's next batch (CPU, uint8). A batch with every (or all but one) image unreadable on some rank is
    skipped by all ranks together, so the ranks stay in step; after ``UNFILLED_BATCHES_LIMIT`` such batches in a row
    the dataset holds (almost) nothing readable and the run stops, naming some of the files. A signal that comes
    meanwhile is honoured: save, then stop."""
    batch = next(run.batches)
    run.position += run.global_batch
    unreadable: list[str] = []
    in_a_row = 0  # this rank's batches in a row that could not be filled
    while broadcast_flag(batch.batch_size < 2):
        in_a_row = in_a_row + 1 if batch.batch_size < 2 else 0
        unreadable += map(str, batch.bad_files)
        run.bad_files += len(batch.bad_files)
        if run.signals.should_stop():
            _stop_on_signal(run, iteration)
        if broadcast_flag(in_a_row >= UNFILLED_BATCHES_LIMIT):
            raise DatasetError(
                f"{len(unreadable)} images in a row could not be decoded (e.g. {', '.join(unreadable[:3])}): the "
                "dataset holds (almost) no readable images; check its files" if in_a_row >= UNFILLED_BATCHES_LIMIT
                else "another rank's share of the dataset holds (almost) no readable images (see its message)")
        batch = next(run.batches)
        run.position += run.global_batch
    if unreadable:
        run.report(f"iteration {iteration}: skipped batches with {len(unreadable)} unreadable images "
                   f"(e.g. {', '.join(unreadable[:3])})")
    return batch


def train_step(model: SSLMetaArch, optimizer: torch.optim.Optimizer, batch: TrainingBatch,
               values: dict[str, float], *, clip_grad: float, autocast: Any = contextlib.nullcontext(),
               freeze_backbones: bool = False) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One optimisation step on this rank's augmented ``batch`` with the schedule ``values``, without waiting for
    the device. Returns this rank's loss terms and the pre-clip gradient norms per sub-model (over all ranks), as
    0-d tensors on the device: :func:`read_figures` averages and reads them, :func:`flush` checks them.
    ``freeze_backbones`` (a feature's choice, :meth:`~dinoreg.ssl.feature.TrainingFeature.trains_backbone`): only
    the heads learn; both backbones stay as they are."""
    apply_optim_schedule(optimizer, lr=values["lr"], weight_decay=values["weight_decay"],
                         last_layer_lr=values["last_layer_lr"], backbone_lr_scale=values.get(BACKBONE_LR_SCALE, 1.0))
    with autocast:
        loss, metrics = model.forward_loss(batch, teacher_temp=values["teacher_temp"], values=values)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if freeze_backbones:
        # No gradient: AdamW skips these parameters (no update, no weight decay, no moments). Dropping the
        # gradients rather than switching requires_grad keeps FSDP2's unshard/reshard schedule as in any step.
        for parameter in model.student["backbone"].parameters():
            parameter.grad = None
    grad_norms = clip_grad_norms_on_device(model.student, clip_grad)
    optimizer.step()
    model.update_teacher(values["momentum"], backbone=not freeze_backbones)
    return metrics, grad_norms


@dataclass
class StepFigures:
    """One step's figures, on the device until :func:`read_figures`."""

    iteration: int
    losses: dict[str, Tensor]  # this rank's loss terms (0-d)
    grad_norms: dict[str, Tensor]  # per sub-model, over all ranks (0-d)
    host: dict[str, float] = field(default_factory=dict)  # what the host knows already (schedules, throughput)


def read_figures(steps: list[StepFigures]) -> list[dict[str, float]]:
    """A row per step: the loss terms averaged over ranks (one collective for all the steps), the gradient norms
    as ``grad_norm_<sub-model>`` (and ``grad_norm``: the backbone's) and the host figures, read from the device
    in one synchronisation. Means in float64, as the logged figures always were."""
    if not steps:
        return []
    names, parts = list(steps[0].losses), list(steps[0].grad_norms)
    losses = torch.stack([torch.stack([s.losses[n].detach().to(torch.float64).reshape(()) for n in names])
                          for s in steps])  # [steps, terms]
    norms = torch.stack([torch.stack([s.grad_norms[n].detach().to(torch.float64).reshape(()) for n in parts])
                         for s in steps]).to(losses.device)  # [steps, sub-models]
    read = torch.cat([mean_over_ranks(losses), norms], dim=1).tolist()
    rows = []
    for step, numbers in zip(steps, read):
        norm = dict(zip(parts, numbers[len(names):]))
        rows.append({**dict(zip(names, numbers[:len(names)])), **step.host, "grad_norm": norm["backbone"],
                     **{f"grad_norm_{part}": value for part, value in norm.items()}})
    return rows


def _check_finite(iteration: int, row: dict[str, float], names: list[str]) -> None:
    bad = {name: row[name] for name in names if not math.isfinite(row[name])}
    if bad:
        terms = ", ".join(f"{name}={value}" for name, value in bad.items())
        raise NonFiniteLossError(
            f"iteration {iteration}: non-finite loss ({terms}); stopping without saving this state. {DIVERGENCE_HINT}")


def log_step(run: Run, iteration: int, values: dict[str, float], metrics: dict[str, Tensor],
             grad_norms: dict[str, Tensor], *, data_wait: float, seconds: float) -> None:
    """Keep the iteration's figures (loss terms, schedule values, gradient norms, throughput, data wait, bad
    files) for :func:`flush`, due after the first step and every ``train.log_every`` iterations."""
    schedule = {"lr": values["lr"], "wd": values["weight_decay"], "momentum": values["momentum"],
                "teacher_temp": values["teacher_temp"], "last_layer_lr": values["last_layer_lr"],
                **{key: value for key, value in values.items() if key not in SCHEDULE_NAMES}}  # the features'
    run.pending.append(StepFigures(iteration, metrics, grad_norms, {
        **schedule, "images_per_sec": run.global_batch / seconds, "data_wait": data_wait,
        "bad_files": run.bad_files}))
    if iteration == run.first_iteration or _due(iteration, run.cfg.train.log_every, run.schedules.total_iterations):
        flush(run)  # the first step at once (a line to see, a NaN caught early), then every log_every
    else:
        run.logger.advance(iteration)


def flush(run: Run) -> None:
    """Read, check and log the pending steps' figures (a collective: every rank calls it at the same
    iterations). Raises :class:`NonFiniteLossError` at the first step with a non-finite loss term, after logging
    the steps before it."""
    steps, run.pending = run.pending, []
    for step, row in zip(steps, read_figures(steps)):
        _check_finite(step.iteration, row, list(step.losses))
        run.logger.log(step.iteration, row)


# --------------------------------------------------------------------------------------------------
# periodic work


def _due(iteration: int, period: int, total: int) -> bool:
    """After ``iteration``: every ``period`` iterations (0: never) and at the end."""
    return iteration + 1 == total or bool(period and (iteration + 1) % period == 0)


def periodic_work(run: Run, iteration: int) -> None:
    """After ``iteration``: kNN evaluation and artifact monitor when due, then save and stop when a signal came,
    else a checkpoint when due. The pending figures are read and checked before any of them."""
    cfg, total = run.cfg, run.schedules.total_iterations
    evaluate = _due(iteration, cfg.evaluation.eval_period_iterations, total)
    monitor = _due(iteration, cfg.monitor.period, total)
    period = cfg.checkpoint.period
    stop = run.signals.should_stop()
    checkpoint = bool(period and (iteration + 1) % period == 0) or (iteration + 1 == total and cfg.checkpoint.save_final)
    if evaluate or monitor or stop or checkpoint:
        flush(run)  # never evaluate or save a state whose losses were not checked
    evaluate_and_monitor(run, iteration, evaluate=evaluate, monitor=monitor)
    if stop:
        _stop_on_signal(run, iteration + 1)
    if checkpoint:
        save(run, iteration + 1)


def _stop_on_signal(run: Run, iterations_done: int) -> None:
    flush(run)
    path = save(run, iterations_done)
    run.logger.write(f"{run.signals.received}: saved {path}; exiting with code {EXIT_CODE_SAVED_ON_SIGNAL} so the "
                     "job can be requeued")
    raise StoppedOnSignal(run.signals.received, path)


def evaluate_and_monitor(run: Run, iteration: int, *, evaluate: bool, monitor: bool) -> None:
    """Log the teacher's evaluations (kNN, segmentation) and the artifact monitor's figures (each when asked and
    enabled)."""
    for label, evaluator in run.evaluators.items() if evaluate else ():
        with run.logger.activity(f"{label} evaluation of the teacher at iteration {iteration}", label=label):
            metrics = evaluator(run.model.teacher_backbone, run.autocast, progress=run.logger.progress)
        run.logger.log(iteration, metrics, step_done=False)
    if monitor and run.monitor:
        with run.logger.activity("artifact monitor", label="monitor", log=False):  # a fraction of a second
            reading = run.monitor(run.model.teacher_backbone, run.autocast)
        run.logger.log(iteration, reading.metrics, step_done=False)
        run.logger.image("monitor/maps", reading.picture, iteration)
        run.logger.distribution("monitor/patch_norms", reading.norms, iteration)


def save(run: Run, iterations_done: int) -> Path:
    """A checkpoint of the state after ``iterations_done`` iterations (a collective); returns its directory."""
    checkpoint = run.cfg.checkpoint
    with run.logger.activity(f"saving checkpoint {iterations_done}", label="checkpoint"):
        return save_checkpoint(run.output.root, iteration=iterations_done, model=run.model, optimizer=run.optimizer,
                               stream_position=run.position, cfg=run.cfg, keep_last=checkpoint.keep_last,
                               keep_every=checkpoint.keep_every)


def export_teacher(run: Run) -> None:
    """``teacher_backbone.safetensors``, with whole tensors, written by the main process (a collective under
    FSDP, which gathers the shards first)."""
    backbone = run.model.teacher_backbone
    if any(isinstance(p, DTensor) for p in backbone.parameters()):
        state = get_model_state_dict(backbone, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not run.env.is_main:
            return
        backbone = build_backbone_from_config(run.cfg, stochastic_depth=False)
        backbone.load_state_dict(state, strict=True)
    save_backbone(backbone, run.output.backbone)
