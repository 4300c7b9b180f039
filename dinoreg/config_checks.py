"""The checks of a configuration's values: every problem a user can make in a key's value, one line each, naming
the key, the value given and what is allowed. :func:`validate` runs them all, in a fixed order, on a config whose
keys and types :mod:`dinoreg.config` has already checked (``load_config`` raises them as one ``ConfigError``).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from dinoreg.config_schema import ARCHITECTURES, CHOICES, StudentConfig
from dinoreg.models import FFN_LAYERS, POS_EMBED_TYPES, ROPE_FFN_LAYERS, ROPE_PRESETS, arch_family

__all__ = ["FREEZE_NAMES", "validate"]


def _nearest_multiples(size: int, patch: int) -> str:
    lower = max(patch, size // patch * patch)
    return f"{lower} or {lower + patch}" if lower != size else str(size)


def validate(cfg: DictConfig) -> list[str]:
    """Every problem of the values in ``cfg``, one line each; the checks below, in this order."""
    total = cfg.optim.epochs * cfg.train.epoch_length  # the run's iterations
    return (_choice_problems(cfg) + _student_problems(cfg) + _crop_size_problems(cfg) + _width_problems(cfg)
            + _train_problems(cfg) + _evaluation_problems(cfg) + _dataset_problems(cfg) + _teacher_problems(cfg)
            + _probability_problems(cfg) + _checkpoint_problems(cfg) + _monitor_problems(cfg)
            + _augmentation_problems(cfg) + _schedule_problems(cfg, total) + _start_problems(cfg)
            + _distillation_problems(cfg) + _gram_problems(cfg, total) + _optimizer_problems(cfg)
            + _partial_training_problems(cfg))


def _failed(cfg: DictConfig, rules: list[tuple[Any, str, str]]) -> list[str]:
    """``key: got <its value>; <what is allowed>`` for each rule ``(ok, key, allowed)`` that does not hold."""
    return [f"{key}: got {OmegaConf.select(cfg, key)!r}; {allowed}" for ok, key, allowed in rules if not ok]


def _choice_problems(cfg: DictConfig) -> list[str]:
    """The keys that take one of a few names (``CHOICES``)."""
    return _failed(cfg, [(OmegaConf.select(cfg, key) in allowed, key, f"allowed: {', '.join(allowed)}")
                         for key, allowed in CHOICES.items()])


def _student_problems(cfg: DictConfig) -> list[str]:
    """The backbone's registers, drop path and patch size; the keys of its family."""
    s = cfg.student
    problems = _failed(cfg, [
        (s.num_register_tokens >= 0, "student.num_register_tokens", "must be >= 0 (4 in our recipes)"),
        (0 <= s.drop_path_rate < 1, "student.drop_path_rate", "must be in [0, 1)"),
        (s.patch_size > 0, "student.patch_size", "must be > 0"),
        (s.ffn_ratio is None or s.ffn_ratio > 0, "student.ffn_ratio", "must be > 0, or null for the arch's"),
        (s.pos_embed_type in (None, *POS_EMBED_TYPES), "student.pos_embed_type",
         f"allowed: {', '.join(POS_EMBED_TYPES)}, or null for the arch's"),
    ])
    if problems or s.arch not in ARCHITECTURES:
        return problems
    try:
        rope = arch_family(s.arch, s.pos_embed_type) == "rope"
    except ValueError as error:
        return [f"student.pos_embed_type: {error}"]
    ffn_layers = tuple(ROPE_FFN_LAYERS) if rope else FFN_LAYERS
    rules = [(s.ffn_layer in ffn_layers, "student.ffn_layer",
              f"a {'RoPE' if rope else 'learned-position'} backbone takes {', '.join(ffn_layers)}")]
    if rope:
        preset_ffn = ROPE_PRESETS.get(s.arch, {}).get("ffn_layer", s.ffn_layer)
        rules += [
            ((s.ffn_layer == "mlp") == (preset_ffn == "mlp"), "student.ffn_layer",
             f"{s.arch} has a {preset_ffn} FFN: set student.ffn_layer={preset_ffn} (or use a vit_* arch with "
             "student.pos_embed_type=rope for another)"),
            ((s.pos_embed_rope_base is None) == (s.pos_embed_rope_min_period is not None
                                                 and s.pos_embed_rope_max_period is not None),
             "student.pos_embed_rope_base", "give it, or null with both pos_embed_rope_min_period and max_period"),
            (not s.interpolate_antialias and s.interpolate_offset == 0.1 and not s.block_chunks,
             "student.interpolate_antialias",
             "a RoPE backbone has no position embedding to resample: leave interpolate_* and block_chunks unset"),
            (s.drop_path_uniform, "student.drop_path_uniform",
             "a RoPE backbone has one stochastic-depth rate for every block (DINOv3's): leave it true"),
        ]
    else:
        dinov3_keys = [key for key, default in _ROPE_ONLY_DEFAULTS.items() if s[key] != default]
        rules.append((not dinov3_keys, f"student.{dinov3_keys[0] if dinov3_keys else 'norm_layer'}",
                      "is a key of the RoPE family: set student.pos_embed_type=rope or a DINOv3 arch (vits16 ...)"))
    return _failed(cfg, rules)


# the keys only RoPE backbones read, with their schema defaults
_ROPE_ONLY_DEFAULTS = {key: getattr(StudentConfig, key) for key in (
    "norm_layer", "mask_k_bias", "untie_cls_and_patch_norms", "untie_global_and_local_cls_norm",
    "pos_embed_rope_base", "pos_embed_rope_min_period", "pos_embed_rope_max_period", "pos_embed_rope_normalize_coords",
    "pos_embed_rope_shift_coords", "pos_embed_rope_jitter_coords", "pos_embed_rope_rescale_coords",
    "pos_embed_rope_dtype")}


def _crop_size_problems(cfg: DictConfig) -> list[str]:
    """Crop sizes the patches do not tile (once the patch size itself is valid), with the nearest that they do."""
    patch = cfg.student.patch_size
    sizes = {f"crops.{name}": cfg.crops[name] for name in ("global_crops_size", "local_crops_size")}
    return _failed(cfg, [(False, key, f"must be a positive multiple of student.patch_size={patch}; "
                                      f"nearest valid: {_nearest_multiples(size, patch)}")
                         for key, size in sizes.items() if patch > 0 and (size <= 0 or size % patch != 0)])


def _width_problems(cfg: DictConfig) -> list[str]:
    """``student.embed_dim``, ``depth`` and ``num_heads``: positive (or the arch's), the heads dividing the width."""
    s = cfg.student
    problems = _failed(cfg, [(s[name] is None or s[name] > 0, f"student.{name}", "must be > 0, or null for the arch's "
                              "value") for name in ("embed_dim", "depth", "num_heads")])
    if s.arch in ARCHITECTURES:
        arch_dim, _, arch_heads = ARCHITECTURES[s.arch]
        dim, heads = s.embed_dim or arch_dim, s.num_heads or arch_heads
        if heads > 0 and dim % heads != 0:
            problems.append(
                f"student.embed_dim: {dim} is not divisible by student.num_heads={heads} "
                f"({s.arch} defaults: embed_dim {arch_dim}, num_heads {arch_heads}); pick a multiple of {heads}"
            )
    return problems


def _train_problems(cfg: DictConfig) -> list[str]:
    """The batch, the epoch, the loader workers, the loss chunks and the logging period (``train.*``)."""
    train = cfg.train
    return _failed(cfg, [
        (train.batch_size_per_gpu >= 2, "train.batch_size_per_gpu", "must be >= 2 (KoLeo needs 2+ per view)"),
        (train.epoch_length > 0, "train.epoch_length", "must be > 0"),
        (train.num_workers >= 0, "train.num_workers", "must be >= 0"),
        (train.loss_chunk_elements > 0, "train.loss_chunk_elements",
         "must be > 0 values per chunk (the default 16777216 is 64 MiB in fp32)"),
        (train.log_every > 0, "train.log_every", "must be > 0"),
    ])


_EVALUATION_COUNTS = ("evaluation.knn_train_images", "evaluation.knn_eval_images", "evaluation.knn_k",
                      "evaluation.eval_period_iterations", "evaluation.segmentation_train_images",
                      "evaluation.segmentation_eval_images", "evaluation.segmentation_iterations")


def _evaluation_problems(cfg: DictConfig) -> list[str]:
    """The evaluations' image counts, k and periods."""
    return _failed(cfg, [(OmegaConf.select(cfg, key) > 0, key, "must be > 0") for key in _EVALUATION_COUNTS])


def _dataset_problems(cfg: DictConfig) -> list[str]:
    """An official dataset string (``ImageNet:split=TRAIN``), which would otherwise fail late, in the data loader."""
    dataset = cfg.train.dataset_path
    official_form = (":" in dataset and "=" in dataset and not dataset.startswith("synthetic")
                     and not Path(dataset).exists())
    return _failed(cfg, [(not official_form, "train.dataset_path",
                          'use "synthetic", a folder of images, or a .txt file of paths')])


def _teacher_problems(cfg: DictConfig) -> list[str]:
    """The EMA teacher's momentum, and the temperatures (the teacher's and the kNN evaluation's)."""
    rules = [(0 <= OmegaConf.select(cfg, key) <= 1, key, "must be in [0, 1]")
             for key in ("teacher.momentum_teacher", "teacher.final_momentum_teacher")]
    rules += [(OmegaConf.select(cfg, key) > 0, key, "temperatures must be > 0")
              for key in ("teacher.warmup_teacher_temp", "teacher.teacher_temp", "evaluation.knn_temperature")]
    rules.append((cfg.teacher.warmup_teacher_temp_epochs >= 0, "teacher.warmup_teacher_temp_epochs", "must be >= 0"))
    return _failed(cfg, rules)


_PROBABILITIES = ("ibot.mask_sample_probability", "crops.blur_prob_global1", "crops.blur_prob_global2",
                  "crops.blur_prob_local", "crops.solarization_prob_global2")


def _probability_problems(cfg: DictConfig) -> list[str]:
    """iBOT's masking and the augmentations' probabilities."""
    return _failed(cfg, [(0 <= OmegaConf.select(cfg, key) <= 1, key, "probabilities must be in [0, 1]")
                         for key in _PROBABILITIES])


def _checkpoint_problems(cfg: DictConfig) -> list[str]:
    """The checkpoints' period and retention, and the signals they are saved on."""
    ck = cfg.checkpoint
    return _failed(cfg, [
        (ck.period >= 0, "checkpoint.period",
         "iterations between checkpoints, >= 0 (0: only at the end, see checkpoint.save_final)"),
        (ck.keep_last >= 1, "checkpoint.keep_last", "must be >= 1"),
        (ck.keep_every >= 0, "checkpoint.keep_every", "must be >= 0 (0: keep no extra checkpoints)"),
        (_catchable(ck.save_on_signals), "checkpoint.save_on_signals",
         "catchable signal names such as SIGUSR1, SIGUSR2, SIGTERM"),
    ])


def _catchable(names: Sequence[str]) -> bool:
    """Whether every name is a signal of this platform that a process can handle."""
    return (all(isinstance(getattr(signal, str(n), None), signal.Signals) for n in names)
            and not {"SIGKILL", "SIGSTOP"} & set(names))


def _monitor_problems(cfg: DictConfig) -> list[str]:
    """The artifact monitor's period, probe images and thresholds."""
    mon = cfg.monitor
    return _failed(cfg, [
        (mon.period >= 0, "monitor.period", "iterations between artifact measurements, >= 0 (0: off)"),
        (mon.images >= 1, "monitor.images", "probe images, >= 1"),
        (mon.relative_threshold > 1, "monitor.relative_threshold", "a multiple of the median norm, > 1 (e.g. 10)"),
        (mon.absolute_threshold > 0, "monitor.absolute_threshold", "a norm, > 0 (the paper's 150)"),
    ])


def _augmentation_problems(cfg: DictConfig) -> list[str]:
    """Colour jitter, crop scales, iBOT's mask ratios and the number of local crops."""
    jitter = list(cfg.crops.color_jitter)
    rules = [(len(jitter) == 4 and min(jitter) >= 0 and jitter[3] <= 0.5, "crops.color_jitter",
              "4 strengths [brightness, contrast, saturation, hue], each >= 0, hue <= 0.5 "
              "(official [0.4, 0.4, 0.2, 0.1])")]
    rules += [(_is_range(cfg, key, lambda lo: lo > 0), key, "must be [lo, hi] with 0 < lo <= hi <= 1")
              for key in ("crops.global_crops_scale", "crops.local_crops_scale")]
    rules.append((_is_range(cfg, "ibot.mask_ratio_min_max", lambda lo: lo >= 0), "ibot.mask_ratio_min_max",
                  "must be [lo, hi] with 0 <= lo <= hi <= 1"))
    rules.append((cfg.crops.local_crops_number >= 0, "crops.local_crops_number",
                  "must be >= 0 (0 disables local crops)"))
    return _failed(cfg, rules)


def _is_range(cfg: DictConfig, key: str, low_ok: Callable[[Any], bool]) -> bool:
    """Whether ``key`` is a pair ``[lo, hi]`` with ``low_ok(lo)`` and ``lo <= hi <= 1``."""
    pair = list(OmegaConf.select(cfg, key))
    return len(pair) == 2 and low_ok(pair[0]) and pair[0] <= pair[1] <= 1


def _schedule_problems(cfg: DictConfig, total: int) -> list[str]:
    """The epochs, the warm-ups and the base learning rate; ``total``: the run's iterations."""
    optim = cfg.optim
    return _failed(cfg, [
        (optim.epochs > 0, "optim.epochs", "must be > 0"),
        (0 <= optim.warmup_epochs <= optim.epochs, "optim.warmup_epochs", f"must be in [0, optim.epochs={optim.epochs}]"),
        (optim.base_lr > 0, "optim.base_lr", "must be > 0"),
        (0 <= optim.head_warmup_iterations < total, "optim.head_warmup_iterations",
         f"must be in [0, {total}) (the run has optim.epochs x train.epoch_length = {total} iterations)"),
    ])


_STARTS = ("phase.start_from", "train.init_from", "student.pretrained_weights")


def _start_problems(cfg: DictConfig) -> list[str]:
    """At most one start: a phase continues a run, ``train.init_from`` and ``student.pretrained_weights`` start fresh."""
    starts = [key for key in _STARTS if OmegaConf.select(cfg, key)]
    return _failed(cfg, [
        (not (cfg.train.init_from and cfg.student.pretrained_weights), "train.init_from",
         "give train.init_from (backbone and heads) or student.pretrained_weights (backbone only), not both"),
        (len(starts) <= 1, starts[-1] if starts else "phase.start_from",
         f"give one start, not {' and '.join(starts)}: phase.start_from continues a run (all of its state), "
         "train.init_from starts from a backbone with heads, student.pretrained_weights from a backbone"),
    ])


def _distillation_problems(cfg: DictConfig) -> list[str]:
    """A distillation run names its frozen teacher; the resize for a teacher of another patch size can antialias.
    (Whether the teacher's grid matches the student's is known once its file is read: the feature checks it.)"""
    distill = cfg.distillation
    return _failed(cfg, [
        (not distill.enabled or bool(distill.teacher), "distillation.teacher",
         "distillation.enabled needs the frozen teacher: a dinoreg run, a `dinoreg export --with-heads` file or an "
         "official teacher_checkpoint.pth"),
        (not distill.teacher_resize_antialias or distill.teacher_resize_method in ("bicubic", "bilinear"),
         "distillation.teacher_resize_antialias", "antialiasing works with bicubic or bilinear resizing only: set "
         "it to false or distillation.teacher_resize_method to bicubic or bilinear"),
    ])


def _optimizer_problems(cfg: DictConfig) -> list[str]:
    """The layer-wise learning-rate decay and AdamW's betas."""
    rules = [(0 < cfg.optim.layerwise_decay <= 1, "optim.layerwise_decay", "must be in (0, 1]")]
    rules += [(0 <= OmegaConf.select(cfg, key) < 1, key, "must be in [0, 1)")
              for key in ("optim.adamw_beta1", "optim.adamw_beta2")]
    return _failed(cfg, rules)


# The parts of the student backbone optim.freeze names (register_tokens and storage_tokens: either family's
# registers); dinoreg.train.features.partial_training maps them to parameters.
FREEZE_NAMES = ("patch_embed", "cls_token", "pos_embed", "register_tokens", "storage_tokens", "mask_token")


def _partial_training_problems(cfg: DictConfig) -> list[str]:
    """``optim.freeze``, ``optim.train_last_blocks`` and ``optim.unfreeze_ramp_iterations`` fit the backbone."""
    optim, student = cfg.optim, cfg.student
    unknown = [name for name in optim.freeze if name not in FREEZE_NAMES]
    rules = [
        (not unknown, "optim.freeze", f"unknown {', '.join(map(str, unknown))}; allowed: "
         f"{', '.join(FREEZE_NAMES)}"),
        (optim.unfreeze_ramp_iterations >= 0, "optim.unfreeze_ramp_iterations", "must be >= 0 (0: no ramp)"),
    ]
    if student.arch not in ARCHITECTURES or _student_problems(cfg):
        return _failed(cfg, rules)  # the backbone is not known: its problems are reported
    depth = student.depth or ARCHITECTURES[student.arch][1]
    rope = arch_family(student.arch, student.pos_embed_type) == "rope"
    registers = {"register_tokens", "storage_tokens"} & set(optim.freeze)
    rules += [
        (optim.train_last_blocks is None or 1 <= optim.train_last_blocks <= depth, "optim.train_last_blocks",
         f"must be in [1, {depth}] (the backbone's depth), or null to train every block"),
        (not (rope and "pos_embed" in optim.freeze), "optim.freeze",
         "a RoPE backbone learns no position embedding: remove pos_embed"),
        (not registers or student.num_register_tokens > 0, "optim.freeze",
         f"the backbone has no registers (student.num_register_tokens=0): remove {' and '.join(sorted(registers))}"),
    ]
    return _failed(cfg, rules)


_GRAM_SCHEDULE_KEYS = {"start", "peak", "end", "warmup_epochs", "cosine_epochs"}


def _gram_problems(cfg: DictConfig, total: int) -> list[str]:
    """What does not fit together in ``gram.*`` (DINOv3's own checks, and ours for what it leaves implicit)."""
    gram, crops = cfg.gram, cfg.crops
    if not gram.use_loss:
        return []
    rules = [
        (gram.ema_teacher and (gram.ckpt or gram.rep_update or crops.gram_teacher_crops_size or
                               gram.it_load_ema_teacher >= 0), "gram.ema_teacher",
         "the EMA teacher is then the Gram teacher: set gram.ckpt=null, gram.rep_update=false, "
         "gram.it_load_ema_teacher=-1 and crops.gram_teacher_crops_size=null"),
        (not gram.ema_teacher and not gram.ckpt and gram.it_load_ema_teacher < 0, "gram.it_load_ema_teacher",
         "a Gram teacher needs a start: gram.ckpt=FILE, gram.it_load_ema_teacher=ITERATION (a copy of the EMA "
         "teacher then) or gram.ema_teacher=true"),
        (gram.it_load_ema_teacher >= total, "gram.it_load_ema_teacher", f"must be < the run's {total} iterations"),
        (gram.update_frequency <= 0, "gram.update_frequency", "must be > 0"),
        (gram.max_updates is not None and gram.max_updates < 0, "gram.max_updates", "must be >= 0 or null"),
        (gram.remove_neg and gram.remove_only_teacher_neg, "gram.remove_only_teacher_neg",
         "excludes gram.remove_neg: set one of them"),
        (gram.tokens_used != "all" and gram.img_level, "gram.tokens_used",
         "masked/unmasked tokens need the batch-level Gram matrix: set gram.img_level=false"),
        (gram.tokens_used != "all" and cfg.distillation.enabled and not cfg.distillation.mask_student,
         "gram.tokens_used", "an unmasked (distilled) student has no masked tokens: use gram.tokens_used=all"),
        (cfg.distillation.enabled, "gram.use_loss", "Gram anchoring of a distillation run is not supported (as in "
                                                    "DINOv3's multi-distillation): turn one of them off"),
        (gram.global_teacher_resize_antialias and gram.global_teacher_resize_method in ("nearest", "area"),
         "gram.global_teacher_resize_antialias", "antialiasing works with bicubic or bilinear resizing only"),
        (bool(gram.ckpt) and bool(cfg.phase.start_from), "gram.ckpt",
         "a phase carries its source's Gram teacher (or its teacher's copy): drop gram.ckpt or phase.start_from"),
        (crops.gram_teacher_crops_size is not None and (crops.gram_teacher_crops_size < crops.global_crops_size or
                                                        crops.gram_teacher_crops_size % cfg.student.patch_size),
         "crops.gram_teacher_crops_size", f"must be a multiple of student.patch_size={cfg.student.patch_size}, "
                                          f"at least crops.global_crops_size={crops.global_crops_size}"),
    ]
    problems = [f"{key}: {message}" for broken, key, message in rules if broken]
    schedule = gram.loss_weight_schedule
    if schedule is not None:
        keys = set(schedule)
        epochs = schedule.get("warmup_epochs", 0) + (schedule.get("cosine_epochs") or 0)
        if not {"start", "peak", "end", "warmup_epochs"} <= keys <= _GRAM_SCHEDULE_KEYS:
            problems.append(f"gram.loss_weight_schedule: has {sorted(keys)}; give start, peak, end, warmup_epochs "
                            "and optionally cosine_epochs")
        elif epochs * cfg.train.epoch_length > total:
            problems.append(f"gram.loss_weight_schedule: warmup_epochs + cosine_epochs = {epochs} epochs, longer than "
                            f"the run's optim.epochs={cfg.optim.epochs}")
    return problems
