"""Where a run's weights start when it does not start from the initialisation alone.

- ``student.pretrained_weights``: a backbone (any file :func:`dinoreg.load_backbone` reads); the heads start fresh
  (``optim.head_warmup_iterations`` then trains them first, backbones frozen).
- ``train.init_from``: a backbone *with its DINO and iBOT heads*, for continued pretraining: a dinoreg run or
  checkpoint (its teacher), a ``dinoreg export --with-heads`` file, or an official ``teacher_checkpoint.pth``
  (whose deprecated ``weight_norm`` keys ``last_layer.weight_g`` / ``weight_v`` map to ours).
- ``distillation.teacher``: the frozen teacher of a distillation run, read the same way as ``train.init_from``.
- ``phase.start_from``: a new training phase (DINOv2's high-resolution adaptation) continues a run or checkpoint:
  its whole model state (student, teacher, heads, centres, a feature's teacher copy such as a Gram teacher) and, with ``phase.optimizer=carry``,
  its AdamW moments; the position embeddings are resampled once to the new crop size by the model's own
  interpolation (antialiased for the registers models).

Everything is checked strictly against the configured model (which may sit on the meta device) before any work:
a misfit is an error listing what does not fit and the config keys to change.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from dinoreg.models.head import HeadLayoutError, head_spec_of
from dinoreg.models.strict import CheckpointMismatchError, check_state_dict_fits
from dinoreg.models.vit import VisionTransformer
from dinoreg.models.weights import fit_pos_embed, fitted_state_dict, infer_arch_kwargs, read_checkpoint_and_heads
from dinoreg.run_dir import CHECKPOINT_DIR, CONFIG_FILE, META_FILE
from dinoreg.train.checkpoint_reader import CheckpointReader, StartError, Weights, open_checkpoint
from dinoreg.train.parallel import copy_state_into

__all__ = ["StartError", "Weights", "carry_optimizer_state", "check_heads", "copy_initial", "fitted_backbone",
           "initial_tensors", "phase_tensors", "read_weights"]

_HEAD_KEYS = {"dino_head": "dino.head_n_prototypes, dino.head_hidden_dim, dino.head_bottleneck_dim, dino.head_nlayers, "
                           "dino.head_weight_norm",
              "ibot_head": "ibot.separate_head, ibot.head_n_prototypes, ibot.head_hidden_dim, ibot.head_bottleneck_dim, "
                           "ibot.head_weight_norm"}


def read_weights(path: str, *, key: str) -> Weights:
    """The backbone and heads of ``path``: a dinoreg run or checkpoint (its teacher, read from the DCP shards by
    this process alone), or a file. ``key``: the config key that named it, for the errors."""
    if not os.path.exists(path):
        raise StartError(f"{key}: {path} does not exist; give a dinoreg run or checkpoint, a `dinoreg export "
                         "--with-heads` file or an official teacher_checkpoint.pth")
    with torch.device("cpu"):  # real tensors, also when the model around is being built on the meta device
        if os.path.isdir(path) and (Path(path, CHECKPOINT_DIR).is_dir() or Path(path, META_FILE).is_file()):
            return open_checkpoint(path, key=key).weights()
        backbone, metadata, heads = read_checkpoint_and_heads(path)  # one read of a possibly large file
        return Weights(source=path, arch={**infer_arch_kwargs(backbone), **metadata}, backbone=backbone, heads=heads)


def phase_tensors(reader: CheckpointReader, template: nn.Module) -> dict[str, Tensor]:
    """The whole model state a phase continues from (``reader``: ``phase.start_from``'s checkpoint), by model key, checked strictly against
    ``template`` (an SSLMetaArch, possibly on the meta device): the position embeddings resampled to its crop size;
    a feature's teacher copy (a Gram teacher) the source lacks starts as its teacher's copy; the features' other
    frozen models (a distillation teacher) come from their own files, and the source's frozen models that the phase
    does not configure stay behind."""
    source = reader.checkpoint
    from_files = tuple(f"{name}." for name in template.frozen_names if name not in template.teacher_copies)
    parts = {name for name, _ in template.named_children()}
    saved = {k: v for k, v in reader.tensors("model.").items()
             if k.split(".", 1)[0] in parts and not k.startswith(from_files)}
    # the parts with position embeddings
    for part in ("student.backbone", "teacher.backbone", *(f"{name}.backbone" for name in template.teacher_copies)):
        backbone = template.get_submodule(part) if part.split(".")[0] in parts else None
        own = {k[len(part) + 1:]: v for k, v in saved.items() if k.startswith(part + ".")}
        if backbone is not None and own:
            saved.update({f"{part}.{k}": v for k, v in fit_pos_embed(own, backbone).items()})
    for name in template.teacher_copies:
        if not any(k.startswith(f"{name}.") for k in saved):
            saved.update({f"{name}." + k[len("teacher."):]: v for k, v in saved.items() if k.startswith("teacher.backbone.")})
    expected = {k: v for k, v in template.state_dict().items() if not k.startswith(from_files)}
    check_state_dict_fits(saved, expected, given_name=f"phase.start_from ({source})", expected_name="configured model",
                          hint="a phase continues the same model: keep student.*, dino.* and ibot.* as the run had them "
                               f"({source / CONFIG_FILE}); only the crop sizes may change")
    return saved


def carry_optimizer_state(reader: CheckpointReader, model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Load the AdamW moments of a phase's source (``reader``) into ``optimizer`` (``model`` sharded or not); a parameter
    whose shape changed (the position embeddings on a new grid) starts fresh. Returns those parameters' names."""
    shapes = {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}
    state: dict[str, dict[str, Tensor]] = {}
    for key, value in reader.tensors("optimizer.state.").items():
        name, field = key.rsplit(".", 1)
        state.setdefault(name, {})[field] = value
    fresh = sorted(name for name, moments in state.items()
                   if name in shapes and tuple(moments["exp_avg"].shape) != shapes[name])
    state = {name: moments for name, moments in state.items() if name not in fresh}
    options = StateDictOptions(full_state_dict=True)
    groups = get_optimizer_state_dict(model, optimizer, options=options)["param_groups"]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True, strict=False))
    # the call above gives every parameter a state (step 1, zero moments), which is not a fresh one: those the
    # source had none for (a new grid, a parameter that never had a gradient) get none
    for name, parameter in model.named_parameters():
        if name not in state:
            optimizer.state.pop(parameter, None)
    return fresh


def check_heads(weights: Weights, expected: Mapping[str, nn.Module], *, key: str) -> None:
    """The heads of ``weights`` fit ``expected`` (name -> DINOHead, possibly on the meta device) exactly."""
    if not weights.heads:
        raise StartError(f"{key}: {weights.source} holds a backbone but no DINO/iBOT heads. Start from the backbone "
                         "alone with student.pretrained_weights (the heads start fresh; optim.head_warmup_iterations "
                         "trains them first, backbones frozen), or export a run with `dinoreg export --with-heads`")
    given = {f"{name}.{k}": v for name, head in weights.heads.items() for k, v in head.items()}
    wanted = {f"{name}.{k}": v for name, head in expected.items() for k, v in head.state_dict().items()}
    other_layout = {name: head_spec["weight_norm"] for name, head_spec in _specs(weights.heads).items()
                    if name in expected and head_spec and head_spec["weight_norm"] != expected[name].weight_norm}
    hint = (f"the file's {' and '.join(other_layout)} last layer is in the other layout: set "
            + " ".join(f"{name[:4]}.head_weight_norm={str(norm).lower()}" for name, norm in other_layout.items())
            + " (false: DINOv3's plain last_layer.weight, true: DINOv2's weight_g / weight_v)" if other_layout else
            f"{weights.source} has {_head_sizes(weights.heads)}; set "
            + "; ".join(_HEAD_KEYS[name] for name in sorted(set(weights.heads) | set(expected))) + " to match")
    try:
        check_state_dict_fits(given, wanted, given_name=key, expected_name="configured heads", hint=hint)
    except CheckpointMismatchError as error:  # one line, whatever the number of misfits
        first, *rest = (line.strip() for line in str(error).splitlines())
        raise CheckpointMismatchError(f"{first} {'; '.join(rest)}") from None


def _specs(heads: Mapping[str, Mapping[str, Tensor]]) -> dict[str, dict]:
    """Each head's :func:`head_spec_of`, empty where it has no layout a DINOHead knows."""
    def spec(head: Mapping[str, Tensor]) -> dict:
        try:
            return head_spec_of(head)
        except HeadLayoutError:
            return {}
    return {name: spec(head) for name, head in heads.items()}


def _head_sizes(heads: Mapping[str, Mapping[str, Tensor]]) -> str:
    """Each head's arguments, or its keys where it has no layout a DINOHead knows."""
    return ", ".join(f"{name}: {spec or 'keys ' + ', '.join(sorted(heads[name]))}" for name, spec in _specs(heads).items())


def initial_tensors(cfg: DictConfig, template: nn.Module) -> dict[str, Tensor]:
    """What the student (and, as its copy, the teacher) start from instead of the initialisation, by student key
    (``backbone.*``, ``dino_head.*``...), checked against ``template`` (an SSLMetaArch, possibly on the meta
    device); empty when the config asks for neither ``student.pretrained_weights`` nor ``train.init_from``."""
    backbone: VisionTransformer = template.student["backbone"]
    if cfg.student.pretrained_weights:
        path = cfg.student.pretrained_weights
        if not os.path.exists(path):
            raise StartError(f"student.pretrained_weights: {path} does not exist; give an official or exported "
                             "backbone (.pth, .safetensors, or a `dinoreg export` output), or leave it empty")
        return {f"backbone.{k}": v for k, v in fitted_backbone(backbone, path, key="student.pretrained_weights").items()}
    if not cfg.train.init_from:
        return {}
    weights = read_weights(cfg.train.init_from, key="train.init_from")
    heads = {name: module for name, module in template.student.items() if name != "backbone"}
    check_heads(weights, heads, key="train.init_from")
    tensors = {f"backbone.{k}": v for k, v in fitted_backbone(backbone, weights.backbone, key="train.init_from").items()}
    return {**tensors, **{f"{name}.{k}": v for name, head in weights.heads.items() for k, v in head.items()}}


def fitted_backbone(backbone: VisionTransformer, source: str | Mapping[str, Tensor], *, key: str) -> dict[str, Tensor]:
    try:
        return fitted_state_dict(backbone, source)
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(
            f"{key} does not fit the configured student (student.arch, patch_size, num_register_tokens, "
            f"ffn_layer...):\n{error}") from None


@torch.no_grad()
def copy_initial(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Copy ``tensors`` (by student key) into the student and the teacher of ``model``; into this rank's shards
    when they are sharded."""
    for part in (model.student, model.teacher):
        copy_state_into(part, tensors)
