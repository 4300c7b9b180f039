"""The learning algorithm: DINO / iBOT / KoLeo losses, teacher centering, block masking.

Independent of how training is distributed: every collective goes through
:mod:`dinoreg.distributed`, whose helpers are no-ops in a single process.
"""
