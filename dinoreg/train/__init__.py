"""Training: the loop, optimiser and schedules, distribution, parallelism, checkpoints and logging.

This is the only sub-package that knows about processes, FSDP, DCP and signals; it composes
:mod:`dinoreg.ssl`, :mod:`dinoreg.data` and :mod:`dinoreg.models`.
"""
