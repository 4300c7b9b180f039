"""Configuration: structured defaults <- a YAML recipe <- ``key=value`` overrides.

Key names follow the official DINOv2 ``ssl_default_config.yaml`` and the schema defaults *are* the
official defaults, so a ported official recipe behaves identically. Our recipes (``configs/``) add
register tokens. Everything a user can get wrong is checked here (keys and types; the values in
:mod:`dinoreg.config_checks`), before any work starts, and all problems are reported together in one
:class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import os
import typing
from pathlib import Path
from typing import Any, Iterator, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinoreg.config_checks import validate
from dinoreg.config_schema import (ARCHITECTURES, CHOICES, RENAMED_KEYS, RETIRED_KEYS, UNUSED_KEYS, DinoRegConfig,
                                   StudentConfig)
from dinoreg.errors import InputError
from dinoreg.models import ROPE_PRESETS, RopeVisionTransformer, VisionTransformer, arch_family, build_backbone
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
    problems = problems or validate(cfg)
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
