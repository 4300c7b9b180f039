"""What the layout conversions of both backbone families share (:mod:`dinoreg.models.formats`, DINOv2's learned
positions; :mod:`dinoreg.models.rope_formats`, DINOv3's RoPE): their errors, ``arch_kwargs`` completed with a
constructor's defaults, and one Hugging Face block copied back under our names."""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from torch import Tensor

from dinoreg.errors import InputError


class FormatError(InputError, ValueError):
    """This model cannot be written in that format as it is: the message says why and what to pass instead."""


class TimmNameError(FormatError):
    """No timm model name fits: timm registers none for the architecture and none was given, or the given one
    cannot build it. The message names the reason and a name that works."""


def completed_arch_kwargs(cls: type, arch_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``arch_kwargs`` completed with ``cls``'s constructor defaults; unknown names are an error."""
    params = inspect.signature(cls.__init__).parameters
    defaults = {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}
    unknown = sorted(set(arch_kwargs) - set(defaults))
    if unknown:
        raise ValueError(f"unknown arch_kwargs {unknown}; {cls.__name__} takes {sorted(defaults)}")
    return {**defaults, **arch_kwargs}


def copy_hf_block(out: dict[str, Tensor], sd: Mapping[str, Tensor], *, ours: str, theirs: str,
                  renames: Mapping[str, str], optional_biases: bool = False) -> None:
    """One Hugging Face block's renamed weights and biases (those absent skipped with ``optional_biases``: layers
    without bias) and its layer scales, into ``out`` under our names."""
    for src, dst in renames.items():
        for kind in ("weight", "bias"):
            if kind == "weight" or not optional_biases or f"{theirs}{src}.{kind}" in sd:
                out[f"{ours}{dst}.{kind}"] = sd[f"{theirs}{src}.{kind}"]
    for ls in ("1", "2"):
        out[f"{ours}ls{ls}.gamma"] = sd[f"{theirs}layer_scale{ls}.lambda1"]
