"""DINOHead: MLP -> L2 normalisation -> weight-normalised linear layer onto K prototypes (official)."""

from __future__ import annotations

import math

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from dinoreg.models.initialisation import InitStep, constructor_steps
from dinoreg.models.layers import init_weights_vit_timm


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
                 bottleneck_dim: int = 256, mlp_bias: bool = True) -> None:
        super().__init__()
        self.mlp = _build_mlp(max(nlayers, 1), in_dim, bottleneck_dim, hidden_dim, mlp_bias)
        for module, initialise in self._mlp_steps():
            initialise(module)
        # torch's parametrisation replaces the deprecated weight_norm hook the official code uses;
        # original0 is the magnitude g (initialised to 1, trainable as in DINOv2), original1 the direction v.
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        nn.init.ones_(self.last_layer.parametrizations.weight.original0)

    def _mlp_steps(self) -> list[InitStep]:
        return [(m, init_weights_vit_timm) for m in self.mlp.modules() if isinstance(m, nn.Linear)]

    def initialisation_steps(self) -> list[InitStep]:
        """Everything construction sets and draws, as steps (see :mod:`dinoreg.models.initialisation`)."""
        return [*constructor_steps(self.mlp), *self._mlp_steps(), (self.last_layer.parametrizations.weight, _init_prototypes)]

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)  # [N, bottleneck]
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)  # [N, K]


HEAD_NAMES = ("dino_head", "ibot_head")
# Our parametrisation's names for the weight-normalised last layer, and the official (deprecated
# torch.nn.utils.weight_norm) ones: g, the magnitude [K, 1], and v, the direction [K, bottleneck].
_OURS_TO_OFFICIAL = {"last_layer.parametrizations.weight.original0": "last_layer.weight_g",
                     "last_layer.parametrizations.weight.original1": "last_layer.weight_v"}


def head_to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A :class:`DINOHead` state dict in the official layout (``last_layer.weight_g`` / ``weight_v``)."""
    return {_OURS_TO_OFFICIAL.get(key, key): value for key, value in state_dict.items()}


def head_from_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`head_to_official`; a state dict already in our layout passes unchanged."""
    official_to_ours = {official: ours for ours, official in _OURS_TO_OFFICIAL.items()}
    return {official_to_ours.get(key, key): value for key, value in state_dict.items()}


def head_spec_of(state_dict: Mapping[str, Tensor]) -> dict[str, int]:
    """``DINOHead`` sizes from a state dict (either layout): ``n_prototypes``, ``hidden_dim``, ``bottleneck_dim``,
    ``nlayers``, ``in_dim``."""
    ours = head_from_official(state_dict)
    direction = ours["last_layer.parametrizations.weight.original1"]  # [K, bottleneck]
    linear = sorted((key for key in ours if key.startswith("mlp") and key.endswith("weight")),
                    key=lambda key: int(key.split(".")[1]) if key.count(".") > 1 else 0)
    first = ours[linear[0]]  # [hidden or bottleneck, in_dim]
    return {"n_prototypes": direction.shape[0], "bottleneck_dim": direction.shape[1], "nlayers": len(linear),
            "hidden_dim": first.shape[0] if len(linear) > 1 else 0, "in_dim": first.shape[1]}
