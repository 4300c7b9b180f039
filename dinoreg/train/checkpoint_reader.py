"""The one reader of a dinoreg checkpoint directory (``RUN/checkpoints/<iteration>``: DCP shards, ``meta.json``,
``config.yaml``), by this process alone: no FSDP, no process group.

Resume, ``train.init_from``, ``phase.start_from``, a distillation teacher, ``gram.ckpt`` and ``dinoreg export`` find
a run's checkpoint here (:func:`newest_intact`, the newest one whose files pass their checks) and read it through a
:class:`CheckpointReader`, which

- verifies every file once against ``meta.json`` (its size and checksum:
  :func:`~dinoreg.train.checkpoint.verify_checkpoint`) before anything is read from it; a checkpoint found by
  :func:`newest_intact` was verified there;
- unpickles DCP's ``.metadata`` once, as data (:mod:`dinoreg.train.safe_load`);
- reads only the tensors asked for: DCP reads just their byte ranges of the shard files, whatever the world size
  that wrote them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.distributed.checkpoint.metadata import Metadata

from dinoreg.config import build_backbone_from_config, load_config
from dinoreg.errors import InputError
from dinoreg.models.head import HEAD_NAMES
from dinoreg.run_dir import CHECKPOINT_DIR, CONFIG_FILE, LATEST_FILE, META_FILE
from dinoreg.train.checkpoint import CheckpointError, checkpoint_dirs, single_process_is_intended, verify_checkpoint
from dinoreg.train.safe_load import read_dcp_metadata, safe_dcp_load

__all__ = ["CheckpointReader", "StartError", "Weights", "newest_intact", "open_checkpoint"]


class StartError(InputError, ValueError):
    """The weights a run starts from cannot be used (a missing path, a run without an intact checkpoint, a file
    without the heads asked for): the message names the config key and the fix."""


@dataclass
class Weights:
    """A backbone and the heads beside it, as read from one source."""

    source: str
    arch: dict  # the backbone's keyword arguments (either family: see dinoreg.models.backbone_from_arch_kwargs)
    backbone: dict[str, Tensor]
    heads: dict[str, dict[str, Tensor]]  # "dino_head" / "ibot_head" -> DINOHead state dict (our layout)


class CheckpointReader:
    """One checkpoint directory, each file verified once, its tensors read as asked (see the module's text)."""

    def __init__(self, checkpoint: str | Path) -> None:
        self.checkpoint = Path(checkpoint)
        self._meta: Optional[dict[str, Any]] = None
        self._dcp_metadata: Optional[Metadata] = None
        self._config: Optional[DictConfig] = None

    def verify(self) -> dict[str, Any]:
        """``meta.json``, once every file it lists has been checked (the first call checks; later ones do not
        read the files again). Raises :class:`~dinoreg.train.checkpoint.CheckpointError` naming the damage."""
        if self._meta is None:
            self._meta = verify_checkpoint(self.checkpoint)
        return self._meta

    @property
    def config(self) -> DictConfig:
        """The config the checkpoint was saved with."""
        if self._config is None:
            self._config = load_config(str(self.checkpoint / CONFIG_FILE), saved=True)
        return self._config

    def _saved(self) -> Metadata:
        """DCP's index of the saved tensors (their shapes, dtypes and places in the shard files)."""
        if self._dcp_metadata is None:
            self.verify()
            self._dcp_metadata = read_dcp_metadata(self.checkpoint)
        return self._dcp_metadata

    def empty(self, *prefixes: str) -> dict[str, Tensor]:
        """An uninitialised CPU tensor of the saved shape and dtype for every saved tensor whose key (``model.*``,
        ``optimizer.state.*``) starts with one of ``prefixes``, by that key."""
        return {name: torch.empty(tuple(entry.size), dtype=entry.properties.dtype, device="cpu")
                for name, entry in self._saved().state_dict_metadata.items()
                if name.startswith(prefixes) and hasattr(entry, "size")}

    def read_into(self, wanted: dict[str, Tensor]) -> None:
        """Fill ``wanted`` (saved keys, e.g. ``model.teacher.dino_head.mlp.0.weight``, to tensors of their shapes)
        in place, in one read."""
        with single_process_is_intended():
            safe_dcp_load(wanted, self.checkpoint, no_dist=True, metadata=self._saved())

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        """Every tensor whose key starts with ``prefix`` (``model.teacher.``, ``optimizer.state.``), by its key
        without the first part (``model.`` / ``optimizer.state.``)."""
        group = "model." if prefix.startswith("model.") else "optimizer.state."
        wanted = self.empty(prefix)
        self.read_into(wanted)
        return {name[len(group):]: value for name, value in wanted.items()}

    def weights(self, part: str = "teacher") -> Weights:
        """The ``part`` (teacher, student, gram_teacher, distillation_teacher) backbone and heads, its architecture
        from the saved config."""
        saved = {name[len(part) + 1:]: value for name, value in self.tensors(f"model.{part}.").items()}
        parts = {name: {k[len(name) + 1:]: v for k, v in saved.items() if k.startswith(name + ".")}
                 for name in ("backbone", *HEAD_NAMES)}
        with torch.device("meta"):
            arch = build_backbone_from_config(self.config, stochastic_depth=False).arch_kwargs
        return Weights(source=str(self.checkpoint), arch=dict(arch), backbone=parts["backbone"],
                       heads={name: parts[name] for name in HEAD_NAMES if parts[name]})


# --------------------------------------------------------------------------------------------------
# finding a run's checkpoint


def _read_latest(root: Path) -> tuple[Optional[str], Optional[Path]]:
    """``(what checkpoints/latest holds, the published checkpoint it names)``; ``(None, None)`` without the file,
    ``(text, None)`` when it names no published checkpoint."""
    try:
        text = (root / LATEST_FILE).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None, None
    named = root / text
    return text, named if text.isdigit() and (named / META_FILE).is_file() else None


def _check_latest(root: Path, warn: Callable[[str], None]) -> None:
    text, named = _read_latest(root)
    if text is not None and named is None:
        warn(f"{root / LATEST_FILE} holds {text[:40]!r}, which names no published checkpoint (damaged or edited "
             "by hand); it is ignored: resuming uses the newest intact checkpoint")


def newest_intact(run_dir: str | Path, *, warn: Callable[[str], None] = print) -> Optional[CheckpointReader]:
    """The newest published checkpoint of ``run_dir`` that passes its checks, as a reader that has verified it;
    damaged newer ones are reported by ``warn`` and skipped (left on disk for inspection). Published directories
    are complete by construction, so one published just before a crash counts even if ``latest`` was not yet
    updated; a ``latest`` that names no published checkpoint at all is reported. A resume starts here too."""
    _check_latest(Path(run_dir) / CHECKPOINT_DIR, warn)
    for path in reversed(checkpoint_dirs(run_dir)):
        reader = CheckpointReader(path)
        try:
            reader.verify()
            return reader
        except CheckpointError as error:
            warn(f"skipping {error}")
    return None


def open_checkpoint(path: str | Path, *, key: str) -> CheckpointReader:
    """A reader of ``path`` itself when it is a checkpoint directory (verified before its first read), else of the
    newest intact checkpoint of the run ``path``. ``key``: the config key that named it, for the error."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return CheckpointReader(path)
    skipped: list[str] = []
    reader = newest_intact(path, warn=skipped.append)
    if reader is None:
        found = f" (damaged: {'; '.join(skipped)})" if skipped else ""
        raise StartError(f"{key}: {path} holds no intact checkpoint{found}; give a dinoreg run or one of its "
                         f"{CHECKPOINT_DIR}/<iteration> directories")
    return reader
