"""Configuration: structured defaults <- a YAML recipe <- ``key=value`` overrides.

Key names follow the official DINOv2 ``ssl_default_config.yaml`` and the schema defaults *are* the
official defaults, so a ported official recipe behaves identically. Our recipes (``configs/``) add
register tokens. Everything a user can get wrong is checked here, before any work starts, and all
problems are reported together in one :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import os
import signal
import typing
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinoreg.config_schema import (ARCHITECTURES, CHOICES, RENAMED_KEYS, RETIRED_KEYS, UNUSED_KEYS, DinoRegConfig,
                                   StudentConfig)
from dinoreg.errors import InputError
from dinoreg.models import (FFN_LAYERS, POS_EMBED_TYPES, ROPE_FFN_LAYERS, ROPE_PRESETS, RopeVisionTransformer,
                            VisionTransformer, arch_family, build_backbone)
from dinoreg.run_dir import write_text

__all__ = [
    "ARCHITECTURES",
    "ConfigError",
    "DinoRegConfig",
    "apply_scaling_rule",
    "available_configs",
    "build_backbone_from_config",
    "load_config",
    "save_config",
]

DEFAULT_CONFIG = "tiny_cpu"

class ConfigError(InputError, ValueError):
    """A configuration problem; the message names the key, the value given and the fix. ``problems``: each
    problem as one line (the message is the only one, or lists them all under a heading)."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems) or [message]


def _schema_leaves(cls: type, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield (dotted key, type annotation) for every leaf of the dataclass schema."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _schema_leaves(hint, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hint


LEAF_TYPES = dict(_schema_leaves(DinoRegConfig))
SECTIONS = {f.name for f in dataclasses.fields(DinoRegConfig)}


def _describe_type(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        inner = [a for a in typing.get_args(hint) if a is not type(None)][0]
        return f"{_describe_type(inner)} or null"
    if typing.get_origin(hint) is list:  # List[float]
        return "a list of numbers"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[hint]


# --- finding and reading config files -------------------------------------------------------


def _configs_dir():
    """The installed ``dinoreg.configs`` package data, else the repository's ``configs/``."""
    try:
        return importlib.resources.files("dinoreg.configs")
    except ImportError:
        return Path(__file__).resolve().parents[1] / "configs"


def available_configs() -> list[str]:
    """Names of the bundled recipes, e.g. ``["tiny_cpu", "vitb14_reg4", ...]``."""
    directory = _configs_dir()
    if not directory.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in directory.iterdir() if p.name.endswith(".yaml"))


def _read_config_source(config: str | os.PathLike) -> tuple[str, str]:
    """Return (text, label) of a recipe name or a YAML path."""
    as_path = Path(config)
    looks_like_path = (
        isinstance(config, os.PathLike) or as_path.suffix in (".yaml", ".yml") or len(as_path.parts) > 1
    )
    names = available_configs()
    if as_path.is_dir() and (looks_like_path or config not in names):
        inside = as_path / "config.yaml"
        example = f"such as {inside} (the run's resolved config)" if inside.is_file() else "such as configs/tiny_cpu.yaml"
        raise ConfigError(f"config {str(config)!r} is a folder, not a YAML file; give a YAML file {example} or one of "
                          f"the bundled names: {', '.join(names)}")
    if looks_like_path:
        if not as_path.is_file():
            raise ConfigError(
                f"config file {str(config)!r} does not exist; give an existing YAML file or one of "
                f"the bundled names: {', '.join(names)}"
            )
        try:
            return as_path.read_text(encoding="utf-8"), str(as_path)
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or "not UTF-8 text"
            raise ConfigError(f"config file {str(config)!r} cannot be read ({reason}); give a readable YAML "
                              "file") from None
    if config not in names:
        close = difflib.get_close_matches(str(config), names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown config name {str(config)!r}; available: {', '.join(names) or '(none found)'}. "
            f"Or pass a path to a YAML file.{hint}"
        )
    return (_configs_dir() / f"{config}.yaml").read_text(), f"configs/{config}.yaml"


def _parse_yaml(text: str, label: str) -> dict:
    try:
        data = OmegaConf.to_container(OmegaConf.create(text), resolve=False) if text.strip() else {}
    except Exception as e:  # yaml.YAMLError or an OmegaConf error, e.g. a bad interpolation
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{label}: could not parse YAML{where}: {' '.join(str(problem or e).split())}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping of sections (student:, train:, ...) at top level")
    return data


def _parse_override(override: str) -> dict:
    key, sep, _ = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"malformed override {override!r}: expected the form key=value, e.g. train.batch_size_per_gpu=32"
        )
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([override]), resolve=False)
    except Exception as e:
        raise ConfigError(f"override {override!r}: could not parse the value: {e}") from e


# --- merging with error collection ----------------------------------------------------------


def _unknown_key_message(key: str, source: str) -> str:
    if key in RETIRED_KEYS:
        return f"{key} ({source}): no longer a dinoreg key ({RETIRED_KEYS[key]}); delete it"
    for prefix, why in UNUSED_KEYS.items():
        if key == prefix or key.startswith(prefix + "."):
            return f"{key} ({source}): official DINOv2 key not used by dinoreg ({why}); delete it"
    if key in RENAMED_KEYS:
        return f"{key} ({source}): renamed in dinoreg; use {RENAMED_KEYS[key]}"
    return f"{key} ({source}): unknown key{_suggest(key)}"


def _suggest(key: str) -> str:
    """Close matches by full dotted key, then by leaf name (so `arch` finds `student.arch`)."""
    candidates = difflib.get_close_matches(key, LEAF_TYPES, n=3, cutoff=0.8)
    section, _, leaf = key.rpartition(".")
    leaf_names = {k.rpartition(".")[2] for k in LEAF_TYPES}
    for name in difflib.get_close_matches(leaf, leaf_names, n=3, cutoff=0.6 if not candidates else 0.8):
        same_name = [k for k in LEAF_TYPES if k.rpartition(".")[2] == name]
        # Prefer the key in the section the user wrote.
        candidates += sorted(same_name, key=lambda k: not k.startswith(section + "."))
    candidates = list(dict.fromkeys(candidates))[:3]
    return f"; did you mean {' or '.join(candidates)}?" if candidates else ""


def _flatten(tree: dict, source: str, problems: list[str], prefix: str = "") -> list[tuple[str, Any]]:
    """Split a nested mapping into (schema leaf key, value) pairs, recording unknown keys."""
    leaves = []
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if key in LEAF_TYPES:
            leaves.append((key, value))
        elif key in SECTIONS:
            if isinstance(value, dict):
                leaves += _flatten(value, source, problems, prefix=f"{key}.")
            else:
                problems.append(f"{key} ({source}): is a section, got {value!r}; set {key}.<name>=... instead")
        else:
            problems.append(_unknown_key_message(key, source))
    return leaves


def _assign(cfg: DictConfig, leaves: list[tuple[str, Any]], source: str, problems: list[str]) -> None:
    for key, value in leaves:
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException:
            problems.append(f"{key} ({source}): expected {_describe_type(LEAF_TYPES[key])}, got {value!r}")


# --- validation of values -------------------------------------------------------------------


def _nearest_multiples(size: int, patch: int) -> str:
    lower = max(patch, size // patch * patch)
    return f"{lower} or {lower + patch}" if lower != size else str(size)


def _validate(cfg: DictConfig) -> list[str]:
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


# --- public API -----------------------------------------------------------------------------


def load_config(config: str | os.PathLike | None = None, overrides: Sequence[str] = (), *,
                saved: bool = False) -> DictConfig:
    """Schema defaults <- the recipe ``config`` (a name from configs/ or a YAML path) <- overrides.

    Returns a validated, structured (unknown keys rejected), resolved config. If ``optim.lr`` is
    unset (0), it is derived for a single process; the trainer re-derives it for its world size
    with :func:`apply_scaling_rule`. ``saved``: ``config`` is a config dinoreg saved (in a checkpoint, perhaps
    someone else's), which holds resolved values only: an interpolation in it is refused, since resolving one
    from a crafted file could read this machine's environment variables into what is exported.
    """
    if isinstance(overrides, str):  # a lone "a=b" would otherwise be iterated character by character
        overrides = [overrides]
    text, label = _read_config_source(DEFAULT_CONFIG if config is None else config)
    if saved and "${" in text:
        line = next(number for number, content in enumerate(text.splitlines(), 1) if "${" in content)
        raise ConfigError(f"{label}: line {line} holds an interpolation ${{...}}, which a config dinoreg saved never "
                          "holds (it saves resolved values): the file was edited or crafted; it is not resolved")
    tree = _parse_yaml(text, label)
    if saved:  # what an older dinoreg wrote of the keys it has since retired (never with an effect)
        tree = _without(tree, RETIRED_KEYS)
    sources = [(tree, label)]
    sources += [(_parse_override(o), f"override {o!r}") for o in overrides]

    cfg = OmegaConf.structured(DinoRegConfig)
    problems: list[str] = []
    for tree, source in sources:
        _assign(cfg, _flatten(tree, source, problems), source, problems)
    if not problems:
        # a recipe marks what the command line must give with ??? (the highres phases' phase.start_from)
        problems += [f"{key}: the recipe requires a value; give it as {key}=..." for key in _missing_keys(cfg)]
    if not problems:
        try:
            OmegaConf.resolve(cfg)  # interpolations; downstream code and saved files see plain values
        except OmegaConfBaseException as e:
            problems.append(f"{getattr(e, 'full_key', '') or 'interpolation'}: {e}".splitlines()[0])
    # Checking values now would report defaults standing in for the rejected entries.
    note = ["(values are checked once the keys and types above are fixed)"] if problems else []
    problems = problems or _validate(cfg)
    if problems:
        raise ConfigError("problems in the configuration:\n  " + "\n  ".join(problems + note), problems)

    if cfg.optim.lr == 0.0:
        apply_scaling_rule(cfg, world_size=1)
    return cfg


def _without(tree: Any, keys: Sequence[str], prefix: str = "") -> Any:
    """``tree`` without the dotted ``keys``."""
    if not isinstance(tree, dict):
        return tree
    return {name: _without(value, keys, f"{prefix}{name}.") for name, value in tree.items()
            if f"{prefix}{name}" not in keys}


def _missing_keys(cfg: DictConfig) -> list[str]:
    """The keys a recipe marks ``???``; none while an interpolation is broken (resolving then names it)."""
    try:
        return sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException:
        return []


def apply_scaling_rule(cfg: DictConfig, world_size: int) -> float:
    """Set ``cfg.optim.lr`` from ``base_lr`` (given for a total batch of 1024) and return it."""
    total_batch = cfg.train.batch_size_per_gpu * world_size
    rule = cfg.optim.scaling_rule
    if rule == "sqrt_wrt_1024":
        lr = cfg.optim.base_lr * math.sqrt(total_batch / 1024.0)
    elif rule == "linear_wrt_1024":
        lr = cfg.optim.base_lr * total_batch / 1024.0
    elif rule == "none":
        lr = cfg.optim.base_lr
    else:
        allowed = ", ".join(CHOICES["optim.scaling_rule"])
        raise ConfigError(f"optim.scaling_rule: got {rule!r}; allowed: {allowed}")
    cfg.optim.lr = lr
    return lr


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Write ``cfg`` as resolved YAML; atomic, so a crash never leaves a half-written file."""
    write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


def build_backbone_from_config(cfg: DictConfig, *, stochastic_depth: bool) -> VisionTransformer:
    """The ``cfg.student`` backbone for the global crop size; ``stochastic_depth``: with the student's drop path
    (the teacher, and every backbone read back from a checkpoint, has none)."""
    student = cfg.student
    if arch_family(student.arch, student.pos_embed_type) == "rope":
        return _rope_backbone_from_config(cfg, stochastic_depth=stochastic_depth)
    kwargs = dict(
        img_size=cfg.crops.global_crops_size,
        patch_size=student.patch_size,
        init_values=student.layerscale,
        ffn_layer=student.ffn_layer,
        block_chunks=student.block_chunks,
        qkv_bias=student.qkv_bias,
        proj_bias=student.proj_bias,
        ffn_bias=student.ffn_bias,
        num_register_tokens=student.num_register_tokens,
        interpolate_antialias=student.interpolate_antialias,
        interpolate_offset=student.interpolate_offset,
        attn_backend=student.attention_backend,
        attn_backend_required=student.attention_backend_required,
        embed_dim=student.embed_dim,
        depth=student.depth,
        num_heads=student.num_heads,
        mlp_ratio=student.ffn_ratio,  # None: the arch's 4
    )
    if stochastic_depth:
        kwargs.update(drop_path_rate=student.drop_path_rate, drop_path_uniform=student.drop_path_uniform)
    return build_backbone(student.arch, **kwargs)


def _rope_backbone_from_config(cfg: DictConfig, *, stochastic_depth: bool) -> VisionTransformer:
    """Every argument from the config (a null RoPE augmentation is off); the arch supplies only what the config
    leaves null: the width, depth and heads, and the FFN ratio (a preset's, else 4)."""
    student = cfg.student
    embed_dim, depth, num_heads = ARCHITECTURES[student.arch]
    rope_keys = {key: student[key] for key in StudentConfig.__dataclass_fields__ if key.startswith("pos_embed_rope_")}
    return RopeVisionTransformer(
        img_size=cfg.crops.global_crops_size, patch_size=student.patch_size, layerscale_init=student.layerscale,
        ffn_layer=student.ffn_layer, ffn_ratio=student.ffn_ratio or ROPE_PRESETS.get(student.arch, {}).get("ffn_ratio", 4.0),
        qkv_bias=student.qkv_bias, proj_bias=student.proj_bias, ffn_bias=student.ffn_bias,
        n_storage_tokens=student.num_register_tokens, norm_layer=student.norm_layer, mask_k_bias=student.mask_k_bias,
        untie_cls_and_patch_norms=student.untie_cls_and_patch_norms,
        untie_global_and_local_cls_norm=student.untie_global_and_local_cls_norm,
        attn_backend=student.attention_backend, attn_backend_required=student.attention_backend_required,
        embed_dim=student.embed_dim or embed_dim, depth=student.depth or depth, num_heads=student.num_heads or num_heads,
        drop_path_rate=student.drop_path_rate if stochastic_depth else 0.0, **rope_keys,
    )
