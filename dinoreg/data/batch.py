"""The training batch, typed, from the collate to the loss.

The loader's collate (:func:`dinoreg.data.loader.collate_multicrop`) makes a :class:`TrainingBatch` (uint8 crops
on the CPU) or, when fewer than one sample could be read, an :class:`UnfilledBatch`; the loop moves it to the device
and augments it there (:meth:`TrainingBatch.replace`), and :meth:`dinoreg.ssl.meta_arch.SSLMetaArch.forward_loss`
reads it. The numbers of views and crops are the batch's, never literals.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor


MASK_FIELDS = ("masks", "mask_indices", "masks_weight", "n_masked_patches")


@dataclass(frozen=True)
class TrainingBatch:
    """One rank's multi-crop batch of ``batch_size`` images.

    Crops are laid out view by view: ``global_crops`` [V*B, 3, G, G] holds view 1 of every image, then view 2, ...
    (``views()`` splits them); ``local_crops`` [n*B, 3, L, L] crop 1 of every image, then crop 2, ... (shape
    [0, ...] without local crops). uint8 from the loader; normalised floats after the device's augmentation.
    ``gram_crops`` [V*B, 3, T, T]: a Gram teacher's own crops of the global views, when it has them.
    The iBOT masks of the global crops (``dinoreg.ssl.masking.sample_masks``): ``masks`` [V*B, N] bool,
    ``mask_indices`` [M] flat indices into the V*B*N patches, ``masks_weight`` [M] (1 / masked patches of that
    patch's image), ``n_masked_patches`` [1] (M). ``labels``, ``indices`` (into the dataset) and ``positions``
    (in the data stream) [B], and ``bad_files``: the paths of the samples dropped as unreadable (None when unknown).
    """

    global_crops: Tensor
    local_crops: Tensor
    n_global_crops: int
    n_local_crops: int
    masks: Optional[Tensor] = None
    mask_indices: Optional[Tensor] = None
    masks_weight: Optional[Tensor] = None
    n_masked_patches: Optional[Tensor] = None
    gram_crops: Optional[Tensor] = None
    labels: Optional[Tensor] = None
    indices: Optional[Tensor] = None
    positions: Optional[Tensor] = None
    bad_files: list[Optional[str]] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        """Images in the batch (each gives ``n_global_crops`` global and ``n_local_crops`` local crops)."""
        return self.global_crops.shape[0] // self.n_global_crops

    def views(self) -> tuple[Tensor, ...]:
        """The global crops view by view: ``n_global_crops`` tensors [B, 3, G, G]."""
        return self.global_crops.chunk(self.n_global_crops)

    def replace(self, **changes: Any) -> "TrainingBatch":
        """A copy with ``changes`` (the device's augmentation, the masks drawn in the collate)."""
        return dataclasses.replace(self, **changes)

    def with_masks(self, masks: Mapping[str, Any]) -> "TrainingBatch":
        """A copy with the iBOT masks of ``sample_masks`` (``MASK_FIELDS`` of its keys)."""
        return self.replace(**{name: masks[name] for name in MASK_FIELDS})

    def to(self, device: Union[torch.device, str], *, non_blocking: bool = False) -> "TrainingBatch":
        """A copy with every tensor on ``device``."""
        return self.replace(**{name: tensor.to(device, non_blocking=non_blocking)
                               for name, tensor in self._tensors().items()})

    def pin_memory(self) -> "TrainingBatch":
        """A copy in page-locked memory: what the DataLoader's ``pin_memory=True`` calls, so that the copies to a
        GPU overlap with its work."""
        return self.replace(**{name: tensor.pin_memory() for name, tensor in self._tensors().items()})

    def _tensors(self) -> dict[str, Tensor]:
        return {f.name: value for f in dataclasses.fields(self) if torch.is_tensor(value := getattr(self, f.name))}


@dataclass(frozen=True)
class UnfilledBatch:
    """A batch in which no sample could be read: nothing to train on, only the paths to report."""

    bad_files: list[Optional[str]]
    batch_size: int = 0

    def pin_memory(self) -> "UnfilledBatch":
        return self


__all__ = ["MASK_FIELDS", "TrainingBatch", "UnfilledBatch"]
