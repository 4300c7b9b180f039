"""The protocol of a training feature: what a feature beyond DINO + iBOT + KoLeo adds to a run.

Gram anchoring, distillation and the head warm-up are each one module of :mod:`dinoreg.train.features` implementing
:class:`TrainingFeature`. The model (:class:`~dinoreg.ssl.meta_arch.SSLMetaArch`), the build, the loop and the
checkpoints call these hooks and name no feature. Every hook has a default that does nothing, so a feature
implements only what it changes:

======== ========================================= ========================================================
 when     hook                                      what the feature says or does
======== ========================================= ========================================================
 build    :meth:`~TrainingFeature.frozen_models`    frozen models it adds to the model (saved, sharded)
 build    :attr:`~TrainingFeature.teacher_copies`   which of them start as the EMA teacher's copy
 build    :meth:`~TrainingFeature.frozen_tensors`   the values of the others, read from their files
 build    :attr:`~TrainingFeature.compiled`         which of them are compiled like the backbones
 build    :meth:`~TrainingFeature.attach`           checks against the built model (fit, masking)
 data     :meth:`~TrainingFeature.worker_crops`     the sizes the loader's workers cut
 data     :meth:`~TrainingFeature.prepare_batch`    the batch on the device, after the photometric distortions
 loss     :meth:`~TrainingFeature.target_teacher`   another model to give the DINO and iBOT targets
 loss     :attr:`~TrainingFeature.unmasks_student`  the student sees every patch and iBOT scores them all
 loss     :meth:`~TrainingFeature.loss_terms`       its loss terms, from the step's outputs and targets
 step     :meth:`~TrainingFeature.values`           its schedule values at an iteration (logged)
 step     :meth:`~TrainingFeature.trains_backbone`  whether the student's backbone learns at an iteration
 step     :meth:`~TrainingFeature.before_step`      work on the model before an iteration's step
 step     :meth:`~TrainingFeature.after_step`       work on the model after it (after the EMA update)
 resume   :meth:`~TrainingFeature.missing_on_resume` model keys a checkpoint may lack, or why it may not
======== ========================================= ========================================================

The hooks receive plain arguments (the model, the batch, an iteration); a feature reads its config section once,
when :mod:`dinoreg.train.features` builds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from torch import Tensor, nn

from dinoreg.data.batch import TrainingBatch

# The hooks' ``model`` is the :class:`~dinoreg.ssl.meta_arch.SSLMetaArch` that holds the feature (which imports
# this module): typed as the module it is.
SSLMetaArch = nn.Module

__all__ = ["StepOutputs", "TrainingFeature"]


@dataclass(frozen=True)
class StepOutputs:
    """What the objective computed in one step that a feature's loss terms may use.

    ``batch``: the augmented batch. ``student_masks``: the student's iBOT masks [V*B, N] (None: it saw every patch).
    ``student_global`` and ``teacher_global``: the student's and the target teacher's backbone outputs on the global
    crops (``x_norm_clstoken``, ``x_norm_patchtokens``...). ``cls_targets`` [V*B, K] and ``patch_targets`` [M, K]
    (None without iBOT): the teacher's probabilities, swapped across views for the cls tokens, that another student
    could score against without a second teacher forward. ``values``: this iteration's schedule values, the
    features' own included."""

    batch: TrainingBatch
    student_masks: Optional[Tensor]
    student_global: Mapping[str, Tensor]
    teacher_global: Mapping[str, Tensor]
    cls_targets: Tensor
    patch_targets: Optional[Tensor]
    values: Mapping[str, float]


class TrainingFeature:
    """One training feature (see the module's table). Subclasses set ``name`` and override what they change."""

    name: str = "feature"
    teacher_copies: tuple[str, ...] = ()  # frozen models (by name) that start as the EMA teacher's copy
    compiled: tuple[str, ...] = ()  # frozen models whose backbone is compiled with ``train.compile``
    unmasks_student: bool = False  # no iBOT masking of the student; iBOT scores every patch of the global crops

    # --- build -----------------------------------------------------------------------------------

    def frozen_models(self) -> dict[str, nn.ModuleDict]:
        """Frozen models the feature adds to the model, by attribute name (their state keys ``<name>.*``): each a
        ``ModuleDict`` with a ``backbone``. They are never trained, run in eval mode, are sharded like the teacher
        and are saved in checkpoints."""
        return {}

    def frozen_tensors(self) -> dict[str, dict[str, Tensor]]:
        """Values for frozen models read from files, by model name then state key; set after the initialisation.
        Called once, by the build, which takes them over: the feature keeps no reference to them."""
        return {}

    def attach(self, model: SSLMetaArch) -> None:
        """Called once the model is built (possibly on the meta device), every feature's frozen models in it: check
        that they fit."""

    # --- data ------------------------------------------------------------------------------------

    def worker_crops(self, global_size: int) -> tuple[int, Optional[int]]:
        """``(size, extra)``: the size the loader's workers cut the global crops at, and the size of an undistorted
        copy of the same boxes (``TrainingBatch.gram_crops``; None: none). Default: the configured size, no copy."""
        return global_size, None

    def prepare_batch(self, batch: TrainingBatch) -> TrainingBatch:
        """The batch on the device after the photometric distortions (normalised crops), changed for the feature."""
        return batch

    # --- loss ------------------------------------------------------------------------------------

    def target_teacher(self, model: SSLMetaArch) -> Optional[nn.ModuleDict]:
        """A model whose ``backbone`` and heads give the DINO and iBOT targets instead of the EMA teacher."""
        return None

    def loss_terms(self, model: SSLMetaArch, outputs: StepOutputs) -> tuple[dict[str, Tensor], Optional[Tensor]]:
        """``(terms, addition)``: the loss terms to log (0-d tensors, every step the same names) and what is added
        to the total loss (weighted; None: nothing)."""
        return {}, None

    # --- the step --------------------------------------------------------------------------------

    def values(self, iteration: int) -> dict[str, float]:
        """The feature's schedule values at ``iteration`` (logged with the optimiser's; given to the loss)."""
        return {}

    def trains_backbone(self, iteration: int) -> bool:
        """Whether the student's backbone learns at ``iteration`` (False: only the heads do; both backbones stay)."""
        return True

    def before_step(self, model: SSLMetaArch, iteration: int) -> None:
        """Work on the model before ``iteration``'s step (a collective under FSDP: every rank calls it)."""

    def after_step(self, model: SSLMetaArch, iteration: int) -> None:
        """Work on the model after ``iteration``'s step and EMA update (every rank calls it)."""

    # --- resume ----------------------------------------------------------------------------------

    def missing_on_resume(self, iteration: int) -> dict[str, Optional[str]]:
        """Model key prefixes of the feature's that a checkpoint saved after ``iteration`` iterations might lack:
        None where it may (the feature sets them later), else the sentence a strict load adds when they are
        missing (how the run could have gone without them)."""
        return {}
