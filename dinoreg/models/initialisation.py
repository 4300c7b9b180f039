"""The initialisation as data, for a start on the meta device.

A model built on the meta device has shapes and no values. To give its parameters the values that building it on
the CPU gives them, and to leave the random generator where that build leaves it, its initialisation is written
as *steps*: ``(module, initialise)``, where ``initialise(module)`` sets every one of the module's own parameters
and buffers (not its children's), in the order the build draws random numbers. Replaying them on each module materialised
alone on the CPU (:func:`dinoreg.train.parallel.materialise`) reproduces the build one module at a time, so only
one module's own tensors are ever whole. The tests compare the replay with a CPU build bitwise.
"""

from __future__ import annotations

from typing import Callable, Iterator

from torch import nn

InitStep = tuple[nn.Module, Callable[[nn.Module], None]]

__all__ = ["InitStep", "constructor_steps", "post_order"]


def constructor_steps(module: nn.Module) -> list[InitStep]:
    """What the constructors of ``module``'s submodules (itself included) set and drew: every module that has a
    ``reset_parameters`` (torch's Linear, Conv2d and LayerNorm, which their constructors call; our LayerScale),
    in construction order, which is the order they were registered in."""
    return [(m, type(m).reset_parameters) for m in module.modules() if callable(getattr(m, "reset_parameters", None))]


def post_order(module: nn.Module) -> Iterator[nn.Module]:
    """Children before their parent, the order of ``Module.apply``."""
    for child in module.children():
        yield from post_order(child)
    yield module
