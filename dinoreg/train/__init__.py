"""Training: the loop, what it builds from the config, optimiser and schedules, parallelism (FSDP2),
checkpoints (DCP), signals, the live monitor and logging.

The only sub-package that knows FSDP, DCP and signals; it composes :mod:`dinoreg.ssl`, :mod:`dinoreg.data`,
:mod:`dinoreg.models` and :mod:`dinoreg.metrics`, and reaches the processes through :mod:`dinoreg.distributed`.
"""
