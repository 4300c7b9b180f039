"""argparse value types: each converts one option's text or fails with a message naming what was expected.

Shared by the subcommands (:mod:`dinoreg.cli`) and the analysis tools, which declare their own options.
"""

from __future__ import annotations

import argparse

__all__ = ["int_at_least", "positive_int", "register_count", "register_list"]


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


positive_int = int_at_least(1, "a positive integer")
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
