"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the student/teacher pair.

Each transformer block and each head is its own unit, and the backbone (patch embedding, tokens,
final norm) is wrapped last. Student and teacher are wrapped identically, so a teacher parameter's
local shard lines up with the student's and the EMA update is local (no communication). Sharding
modes, as the official ``sharding_strategy`` values:

- ``full_shard``: parameters resharded after the forward (least memory; all-gathered again for backward);
- ``shard_grad_op``: the student's parameters kept unsharded between forward and backward (more memory,
  fewer all-gathers); gradients and optimizer state stay sharded;
- ``no_shard``: replicated parameters with averaged gradients (DDP semantics), as HSDP over a
  (world, 1) mesh: every rank holds everything.

On GPU the policy computes in bf16 with fp32 reduction; master weights and optimizer state stay fp32.

Under several processes the model is built on the meta device and sharded there; :func:`materialise` then gives
each rank its shards of the values a CPU build would have given, one module at a time, so no rank ever holds the
whole unsharded model and the start is the same for any number of ranks.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

SHARDING_MODES = ("full_shard", "shard_grad_op", "no_shard")

# The backbone's outputs are views (x_norm_clstoken and its siblings are slices of one normed tensor; the
# packed blocks' outputs are split back into crops), so FSDP2 warns at every forward that an in-place op on a
# view would skip its pre-backward hook. Nothing in dinoreg modifies them in place, and
# tests/train/test_distributed.py shows the path is sound: 2 ranks reproduce 1 rank's losses, gradient norms
# and updated weights. Only this module's warning is silenced.
_VIEW_WARNING = r"FSDP2-wrapped module \(FSDP\w*VisionTransformer\) returned a view tensor"

__all__ = ["SHARDING_MODES", "TargetedStep", "copy_into", "copy_state_into", "materialise", "shard_ssl_model"]

# (module of an unsharded meta-device template, what sets its own tensors, the qualified module names in the
# model that receive them; none: the step only draws, as the build does for values it later overwrites)
TargetedStep = tuple[nn.Module, Callable[[nn.Module], None], tuple[str, ...]]


def shard_ssl_model(model: nn.Module, *, mode: str, device: torch.device, world_size: int,
                    bf16: bool) -> None:
    """Wrap ``model.student``, ``model.teacher`` and the training features' frozen models (``model.frozen_names``)
    of an ``SSLMetaArch`` in place. Build the optimizer after."""
    if mode not in SHARDING_MODES:
        raise ValueError(f"unknown sharding mode {mode!r}; choose one of {', '.join(SHARDING_MODES)}")
    warnings.filterwarnings("ignore", message=_VIEW_WARNING, category=UserWarning)
    if mode == "no_shard":
        mesh = init_device_mesh(device.type, (world_size, 1), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    frozen = [(getattr(model, name), True) for name in model.frozen_names]
    for models, reshard in ((model.student, mode == "full_shard"), (model.teacher, True), *frozen):
        # The teachers have no backward to reshard them: they always reshard after their forward, so the EMA
        # teacher's parameters are shards again (lined up with the student's) when the EMA update runs.
        options = dict(mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
        for name, module in models.items():
            if name == "backbone":
                for block in module.blocks:
                    fully_shard(block, **options)
                    # the backbone runs blocks through forward_packed, not __call__; the monitor asks for
                    # attention probabilities
                    register_fsdp_forward_method(block, "forward_packed")
                    register_fsdp_forward_method(block, "attention_probs")
            fully_shard(module, **options)
            if name == "backbone":  # the monitor's and the segmentation probe's entry points
                register_fsdp_forward_method(module, "block_outputs")
                register_fsdp_forward_method(module, "get_intermediate_layers")
                _prefetch_neighbours(list(module.blocks))


def _prefetch_neighbours(blocks: list[nn.Module]) -> None:
    """Explicit prefetch: each block's all-gather of the next block's parameters is issued when it starts, in
    the forward pass (the next block) and in the backward pass (the previous one), so communication overlaps
    with its compute instead of waiting for FSDP2's implicit one-ahead order."""
    for current, following in zip(blocks, blocks[1:]):
        current.set_modules_to_forward_prefetch([following])
        following.set_modules_to_backward_prefetch([current])


@torch.no_grad()
def copy_into(destination: Tensor, value: Tensor) -> None:
    """Copy the whole tensor ``value`` into ``destination``: this rank's shard of it when ``destination`` is a
    sharded (DTensor) parameter, sliced locally, without communication."""
    if isinstance(destination, DTensor):
        value = distribute_tensor(value, destination.device_mesh, destination.placements, src_data_rank=None)
    destination.copy_(value)


@torch.no_grad()
def copy_state_into(module: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Copy ``tensors`` (by ``module``'s state keys) into ``module``: into this rank's shards when sharded."""
    own = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    for name, value in tensors.items():
        copy_into(own[name], value)


@torch.no_grad()
def materialise(model: nn.Module, steps: Iterable[TargetedStep], *, device: torch.device | str = "cpu") -> None:
    """Give ``model`` (built on the meta device, sharded or not, then ``to_empty``) its values: each step's module
    is materialised alone on ``device`` (the CPU, whose generator gives the same values everywhere, unless
    ``train.initialisation=device``; its own tensors only), initialised, and copied to its targets. Every
    parameter and buffer of ``model`` must be set by some step."""
    tensors: Mapping[str, Tensor] = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    written: set[str] = set()
    for module, initialise, targets in steps:
        alone = copy.deepcopy(module).to_empty(device=device, recurse=False)
        own = [*alone.named_parameters(recurse=False), *alone.named_buffers(recurse=False)]
        for _, value in own:
            value.fill_(float("nan"))  # a tensor the step leaves unset shows
        initialise(alone)
        # (on the meta device, a dry run that allocates nothing, there are no values to check)
        unset = [name for name, value in own if not value.is_meta and value.isnan().any()]
        if unset:
            raise RuntimeError(f"meta-device start-up: {getattr(initialise, '__qualname__', initialise)} leaves "
                               f"{unset} of {type(module).__name__} unset; a step must set all its module's tensors")
        for target in targets:
            for name, value in own:
                key = f"{target}.{name}" if target else name
                copy_into(tensors[key], value)
                written.add(key)
    missing = sorted(set(tensors) - written)
    if missing:
        raise RuntimeError(f"meta-device start-up: no initialisation step sets {missing[:8]}"
                           f"{' ...' if len(missing) > 8 else ''}; each module must list its tensors in its steps")
