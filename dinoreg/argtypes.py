"""argparse value types: each converts one option's text or fails with a message naming what was expected.

Shared by the subcommands (:mod:`dinoreg.cli`) and the analysis tools, which declare their own options.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

__all__ = ["byte_size", "float_at_least", "int_at_least", "non_negative_float", "output_file", "output_folder", "positive_float",
           "positive_int", "register_count", "register_list"]


def int_at_least(minimum: int, what: str):
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return convert


def float_at_least(minimum: float, what: str, *, inclusive: bool = True):
    """A finite number ``>= minimum`` (``> minimum`` unless ``inclusive``)."""
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return convert


positive_int = int_at_least(1, "a positive integer")
positive_float = float_at_least(0.0, "a positive number", inclusive=False)
non_negative_float = float_at_least(0.0, "a number >= 0")
register_count = int_at_least(0, "a number of register tokens >= 0")


def register_list(text: str) -> list[int]:
    items = [item.strip() for item in text.split(",")]
    try:
        values = [int(item) for item in items]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers >= 0 such as 0,1,2,4,8,16; got {text!r}") from None
    if any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(f"register counts must be >= 0; got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"register counts must not repeat; got {text!r}")
    return values


def _blocked_by_a_file(path: Path) -> None:
    """Refuse ``path`` when a file stands where one of its folders would have to be."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{parent} is a file, so {path} cannot be created in it; give a path "
                                                 "in a folder")
            return


def output_file(text: str) -> Path:
    """A file to write (created with its folders): neither an existing folder nor inside a file."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file path, e.g. {path / 'results.json'}")
    _blocked_by_a_file(path)
    return path


def output_folder(text: str) -> Path:
    """A folder to write into (created if missing): neither an existing file nor inside a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder; give a folder (it is created if missing)")
    _blocked_by_a_file(path)
    return path


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def byte_size(text: str) -> int:
    """A size such as 1GiB, 500MB, 512MiB or 1000000 (bytes): a positive whole number of bytes."""
    stripped = text.strip().replace(" ", "")
    number = stripped.rstrip("bBkKmMgGtTiI")
    unit = stripped[len(number):].lower()
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size such as 1GiB, 500MB or 1000000 (bytes), got {text!r}") from None
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(f"expected a size of at least 1 byte, got {text!r}")
    return int(value)
