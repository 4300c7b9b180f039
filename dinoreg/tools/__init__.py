"""The measuring tools (``dinoreg bench``, and the FLOP counts of ``model-info`` and ``analyze flops``): one module
per tool, above training, whose code they run.

- :mod:`~dinoreg.tools.flops`: FLOP counting: a training step's on the meta device (2 per multiply-add), a
  backbone's per image in fvcore's unit (``model-info``, ``analyze flops``; 1 per multiply-add; fvcore's trace, or
  the same count on the meta device), both families, the RoPE rotation included;
- :mod:`~dinoreg.tools.training`: ``bench train``, the training loop timed (MFU against a measured matmul peak);
- :mod:`~dinoreg.tools.heads`: ``bench heads``, the peak memory of the prototype heads and losses alone;
- :mod:`~dinoreg.tools.checkpoint`: ``bench checkpoint``, save and load times of a full checkpoint;
- :mod:`~dinoreg.tools.planner`: ``bench memory``, the memory a run needs per GPU and the largest batch that fits;
- :mod:`~dinoreg.tools.memory`: reading and releasing this process's memory (resident set, peaks), for the others.

The public names are exported here, and each is imported with its module on first use: importing one module
(``dinoreg.tools.memory``, say) does not import the training loop that ``dinoreg.tools.training`` runs.
"""

from __future__ import annotations

import importlib
from typing import Any

# each public name's module: the one list of what this package exports
_MODULES = {
    "checkpoint": ("benchmark_checkpoint", "format_checkpoint_report"),
    "flops": ("FLOP_KEYS", "FREE_OPS", "HookedWork", "build_counted_backbone", "count_flops", "count_flops_on_meta",
              "count_parameters", "count_step_flops", "flop_analysis", "flops_vs_registers", "format_flops_report",
              "forward_flops", "preset_rows", "sdpa_flop_jit", "training_step_flops"),
    "heads": ("benchmark_heads", "format_heads_report"),
    "memory": ("peak_memory", "release_device_memory", "release_freed_memory", "reset_resident_peak",
               "resident_bytes"),
    "planner": ("GIB", "format_memory_plan", "plan_memory"),
    "training": ("NAIVE", "NOMINAL_PEAKS", "PROFILED_STEPS", "benchmark_training", "format_report", "loss_trend",
                 "matmul_peak"),
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
