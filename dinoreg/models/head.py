"""DINOHead: MLP -> L2 normalisation -> a linear layer onto K prototypes, in either official layout.

* DINOv2's (``weight_norm=True``): the last layer is weight-normalised, a magnitude g (initialised to 1 and trained)
  times a direction v; official files name them ``last_layer.weight_g`` / ``weight_v`` (the deprecated hook), ours
  ``last_layer.parametrizations.weight.original0`` / ``original1``.
* DINOv3's (``weight_norm=False``, ``dinov3/layers/dino_head.py``, whose ``head_norm_last_layer`` key is read by
  nothing): a plain ``nn.Linear`` without bias, ``last_layer.weight``, initialised like the MLP's layers (truncated
  normal, std 0.02).
"""

from __future__ import annotations

import math

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm as _weight_norm

from dinoreg.models.initialisation import InitStep, constructor_steps
from dinoreg.models.layers import init_weights_vit_timm
from dinoreg.models.strict import CheckpointMismatchError


def _build_mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, bias: bool) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=bias), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim, bias=bias), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


def _init_prototypes(weight: nn.Module) -> None:
    """The weight-normalised last layer: the direction v is what ``nn.Linear``'s constructor drew for its weight
    (``reset_parameters``: Kaiming uniform with a = sqrt(5)), the magnitude g is 1."""
    nn.init.kaiming_uniform_(weight.original1, a=math.sqrt(5))
    nn.init.ones_(weight.original0)


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, *, nlayers: int = 3, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, mlp_bias: bool = True, weight_norm: bool = True) -> None:
        """``weight_norm``: DINOv2's weight-normalised last layer; False: DINOv3's plain one (see the module)."""
        super().__init__()
        self.out_dim, self.weight_norm = out_dim, weight_norm
        self.mlp = _build_mlp(max(nlayers, 1), in_dim, bottleneck_dim, hidden_dim, mlp_bias)
        for module, initialise in self._mlp_steps():
            initialise(module)
        if weight_norm:
            # torch's parametrisation replaces the deprecated weight_norm hook the official code uses;
            # original0 is the magnitude g (initialised to 1, trainable as in DINOv2), original1 the direction v.
            self.last_layer = _weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
            nn.init.ones_(self.last_layer.parametrizations.weight.original0)
        else:
            self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
            init_weights_vit_timm(self.last_layer)

    def _mlp_steps(self) -> list[InitStep]:
        return [(m, init_weights_vit_timm) for m in self.mlp.modules() if isinstance(m, nn.Linear)]

    def initialisation_steps(self) -> list[InitStep]:
        """Everything construction sets and draws, as steps (see :mod:`dinoreg.models.initialisation`)."""
        if self.weight_norm:
            last: list[InitStep] = [(self.last_layer.parametrizations.weight, _init_prototypes)]
        else:  # the Linear's own draw, then the truncated normal over it
            last = [*constructor_steps(self.last_layer), (self.last_layer, init_weights_vit_timm)]
        return [*constructor_steps(self.mlp), *self._mlp_steps(), *last]

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)  # [N, bottleneck]
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)  # [N, K]


HEAD_NAMES = ("dino_head", "ibot_head")
# Our parametrisation's names for the weight-normalised last layer, and the official (deprecated
# torch.nn.utils.weight_norm) ones: g, the magnitude [K, 1], and v, the direction [K, bottleneck].
_OURS_TO_OFFICIAL = {"last_layer.parametrizations.weight.original0": "last_layer.weight_g",
                     "last_layer.parametrizations.weight.original1": "last_layer.weight_v"}
_PLAIN = "last_layer.weight"  # DINOv3's plain last layer [K, bottleneck]: the same name in its files and ours


class HeadLayoutError(CheckpointMismatchError):
    """A head's state dict has no last layer in any layout :class:`DINOHead` knows, or no MLP."""


def head_to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A :class:`DINOHead` state dict in the official layout: DINOv2's ``last_layer.weight_g`` / ``weight_v`` for a
    weight-normalised head, DINOv3's ``last_layer.weight`` (unchanged) for a plain one."""
    return {_OURS_TO_OFFICIAL.get(key, key): value for key, value in state_dict.items()}


def head_from_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`head_to_official`; a state dict already in our layout passes unchanged."""
    official_to_ours = {official: ours for ours, official in _OURS_TO_OFFICIAL.items()}
    return {official_to_ours.get(key, key): value for key, value in state_dict.items()}


def head_spec_of(state_dict: Mapping[str, Tensor]) -> dict[str, int | bool]:
    """``DINOHead`` arguments from a state dict (any layout): ``n_prototypes``, ``hidden_dim``, ``bottleneck_dim``,
    ``nlayers``, ``weight_norm`` (a weight-normalised last layer, DINOv2's; False: DINOv3's plain one), ``in_dim``.
    Raises :class:`HeadLayoutError` (one line) for a state dict with no last layer or no MLP."""
    ours = head_from_official(state_dict)
    weight_norm = "last_layer.parametrizations.weight.original1" in ours
    direction = ours.get("last_layer.parametrizations.weight.original1", ours.get(_PLAIN))  # [K, bottleneck]
    linear = sorted((key for key in ours if key.startswith("mlp") and key.endswith("weight")),
                    key=lambda key: int(key.split(".")[1]) if key.count(".") > 1 else 0)
    if direction is None or direction.dim() != 2 or not linear:
        raise HeadLayoutError(f"a DINO/iBOT head needs mlp.*.weight and a last layer (last_layer.weight, or "
                              f"last_layer.weight_g and weight_v); it holds {', '.join(sorted(state_dict)) or 'nothing'}")
    first = ours[linear[0]]  # [hidden or bottleneck, in_dim]
    return {"n_prototypes": direction.shape[0], "bottleneck_dim": direction.shape[1], "nlayers": len(linear),
            "hidden_dim": first.shape[0] if len(linear) > 1 else 0, "weight_norm": weight_norm,
            "in_dim": first.shape[1]}
