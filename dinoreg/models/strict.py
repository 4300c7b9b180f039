"""Strict loading: the one report of how a state dict misfits a model (missing, unexpected, mis-shaped keys)."""

from __future__ import annotations

from typing import Mapping

from torch import Tensor

from dinoreg.errors import InputError

__all__ = ["CheckpointMismatchError", "check_state_dict_fits"]


class CheckpointMismatchError(InputError, RuntimeError):
    """A checkpoint does not fit the model: lists missing, unexpected and mis-shaped keys."""


def check_state_dict_fits(given: Mapping[str, Tensor], expected: Mapping[str, Tensor], *, given_name: str,
                          expected_name: str, hint: str) -> None:
    """Raise :class:`CheckpointMismatchError`, one line listing every key of ``given`` that does not fit ``expected``
    (by name and shape; the first 20 of each kind), followed by ``hint``, the fix to try."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mis_shaped = sorted(
        f"{k}: {given_name} {tuple(given[k].shape)} vs {expected_name} {tuple(expected[k].shape)}"
        for k in set(expected) & set(given) if given[k].shape != expected[k].shape
    )
    if not (missing or unexpected or mis_shaped):
        return
    misfits = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped))
    kinds = [f"{title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else "")
             for title, items in misfits if items]
    raise CheckpointMismatchError(f"{given_name} does not fit the {expected_name}: {'; '.join(kinds)}. {hint}")
