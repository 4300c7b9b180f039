"""Read one backbone (teacher or student) straight out of a sharded training checkpoint.

No FSDP, no process group, no optimizer state: the backbone is built from the checkpoint's own
``config.yaml`` and only its tensors are requested from DCP, which reads just those byte ranges of the
shard files, whatever the world size that wrote them. Peak memory is about one backbone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from torch import Tensor

from dinoreg.errors import InputError
from dinoreg.models.head import HEAD_NAMES
from dinoreg.models.vit import VisionTransformer
from dinoreg.run_dir import CHECKPOINT_DIR, CONFIG_FILE, IN_PROGRESS_PREFIX, META_FILE

if TYPE_CHECKING:  # imported where used: `dinoreg --help` does not load DCP
    from dinoreg.train.checkpoint_reader import CheckpointReader

__all__ = ["BackboneSource", "ExportError", "PARTS", "read_backbone", "read_backbone_with_heads", "resolve_reader"]

PARTS = ("teacher", "student")


class ExportError(InputError):
    """The input cannot be exported as asked; the message says why and what to pass instead."""


@dataclass
class BackboneSource:
    """Where an exported backbone came from (recorded in the safetensors metadata)."""

    checkpoint: Path
    part: str
    iteration: int
    world_size: int
    config_digest: str  # sha256 of the checkpoint's config.yaml, first 16 hex digits
    img_size: int  # the training global crop size
    dataset: str = ""  # the config's train.dataset_path
    total_iterations: int = 0  # of the training run (optim.epochs * train.epoch_length)

    def as_metadata(self) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), "part": self.part, "iteration": self.iteration,
                "world_size": self.world_size, "config_digest": self.config_digest, "img_size": self.img_size,
                "dataset": self.dataset, "total_iterations": self.total_iterations}


def resolve_reader(path: str | Path, *, warn: Callable[[str], None] = lambda message: None) -> CheckpointReader:
    """A reader of a checkpoint directory (``RUN/checkpoints/<iteration>``) as given, or of the newest intact
    checkpoint of a training output directory (newer damaged ones are reported to ``warn`` and skipped), its files
    verified (once); a damaged or incomplete checkpoint given directly is an error naming the problem."""
    from dinoreg.train.checkpoint import CheckpointError, checkpoint_dirs  # noqa: PLC0415 (start-up: DCP)
    from dinoreg.train.checkpoint_reader import CheckpointReader, newest_intact  # noqa: PLC0415 (start-up: DCP)

    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path} does not exist; give a training output directory or one of its "
                          f"{CHECKPOINT_DIR}/<iteration> directories")
    if (path / META_FILE).is_file():
        reader = CheckpointReader(path)
        try:
            reader.verify()
        except CheckpointError as error:
            raise ExportError(f"damaged checkpoint: {error}; export an older one from {path.parent}") from None
        return reader
    if path.name.startswith(IN_PROGRESS_PREFIX):
        raise ExportError(f"{path} is a checkpoint that was never finished (a run stopped while writing it); "
                          f"export a published one from {path.parent}")
    if not (path / CHECKPOINT_DIR).is_dir():
        raise ExportError(f"{path} is neither a training output directory (no {CHECKPOINT_DIR}/ inside) nor a "
                          f"checkpoint (no {META_FILE}); backbone files (.pth/.safetensors) need no export: "
                          "dinoreg.load_backbone reads them directly")
    skipped: list[str] = []
    newest = newest_intact(path, warn=skipped.append)
    if newest is None:
        found = "damaged: " + "; ".join(skipped) if checkpoint_dirs(path) else "none was ever published"
        raise ExportError(f"{path / CHECKPOINT_DIR} holds no intact checkpoint ({found})")
    for message in skipped:  # the newer ones skipped for the one exported
        warn(message)
    return newest


def read_backbone(checkpoint: Path | CheckpointReader, *, part: str = "teacher"
                  ) -> tuple[VisionTransformer, BackboneSource]:
    """The ``part`` backbone of ``checkpoint`` (a directory, or its reader from :func:`resolve_reader`) in fp32
    and eval mode, loaded strictly, and where it came from."""
    model, source, _ = _read(checkpoint, part=part, with_heads=False)
    return model, source


def read_backbone_with_heads(checkpoint: Path | CheckpointReader, *, part: str = "teacher"
                             ) -> tuple[VisionTransformer, BackboneSource, dict[str, dict[str, Tensor]]]:
    """:func:`read_backbone` and the ``part``'s DINO/iBOT heads (``dino_head`` / ``ibot_head`` state dicts, the ones
    it has), in one read of the checkpoint's tensors."""
    model, source, heads = _read(checkpoint, part=part, with_heads=True)
    return model, source, heads


def _read(checkpoint: Path | CheckpointReader, *, part: str, with_heads: bool
          ) -> tuple[VisionTransformer, BackboneSource, dict[str, dict[str, Tensor]]]:
    from dinoreg.config import build_backbone_from_config  # noqa: PLC0415 (start-up: omegaconf)
    from dinoreg.train.checkpoint_reader import CheckpointReader  # noqa: PLC0415 (start-up: DCP)

    if part not in PARTS:
        raise ExportError(f"unknown part {part!r}; choose one of {', '.join(PARTS)}")
    reader = checkpoint if isinstance(checkpoint, CheckpointReader) else CheckpointReader(checkpoint)
    checkpoint, meta = reader.checkpoint, reader.verify()
    prefix = f"{part}.backbone."
    saved = {key[len(prefix):] for key in meta["model_keys"] if key.startswith(prefix)}
    if not saved:
        parts = sorted({".".join(key.split(".")[:2]) for key in meta["model_keys"]})
        raise ExportError(f"{checkpoint} holds no {part} backbone (it has: {', '.join(parts)})")
    cfg = reader.config
    img_size = cfg.crops.global_crops_size
    backbone = build_backbone_from_config(cfg, stochastic_depth=False)
    own = backbone.state_dict()
    if saved != set(own):
        raise ExportError(f"{checkpoint}'s {part} backbone does not match its config.yaml: missing "
                          f"{sorted(set(own) - saved)[:10]}, unexpected {sorted(saved - set(own))[:10]}")
    request = {f"model.{prefix}{name}": tensor for name, tensor in own.items()}  # read in place: one backbone
    if with_heads:  # their shapes and dtypes from the checkpoint's own metadata
        request.update(reader.empty(*(f"model.{part}.{name}." for name in HEAD_NAMES)))
    reader.read_into(request)
    backbone.load_state_dict({name[len(f"model.{prefix}"):]: tensor for name, tensor in request.items()
                              if name.startswith(f"model.{prefix}")}, strict=True)
    heads = {name: {key[len(f"model.{part}.{name}."):]: tensor for key, tensor in request.items()
                    if key.startswith(f"model.{part}.{name}.")} for name in HEAD_NAMES} if with_heads else {}
    digest = hashlib.sha256((checkpoint / CONFIG_FILE).read_bytes()).hexdigest()[:16]
    source = BackboneSource(checkpoint=checkpoint, part=part, iteration=int(meta["iteration"]),
                            world_size=int(meta["world_size"]), config_digest=digest, img_size=img_size,
                            dataset=str(cfg.train.dataset_path),
                            total_iterations=int(cfg.optim.epochs * cfg.train.epoch_length))
    return backbone.eval(), source, {name: tensors for name, tensors in heads.items() if tensors}
