"""Save on signal: the configured signals stop training at the next iteration on every rank, after a checkpoint.

Light on purpose (no DCP, no data): the CLI and the SLURM job wrapper import it to tell a stop on signal
from a failure.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Iterable, Optional

from dinoreg.distributed import max_over_ranks

__all__ = ["EXIT_CODE_SAVED_ON_SIGNAL", "SignalWatcher", "StoppedOnSignal"]

# Exit code of a run that stopped on a signal after saving: "temporary failure, try again" (sysexits
# EX_TEMPFAIL), so a scheduler or wrapper script can requeue it and tell it from a crash (1) or success (0).
EXIT_CODE_SAVED_ON_SIGNAL = 75


class StoppedOnSignal(Exception):
    """``signal_name`` arrived (on this rank or another); every rank saved ``checkpoint`` and stopped. Exit
    with ``exit_code``."""

    exit_code = EXIT_CODE_SAVED_ON_SIGNAL

    def __init__(self, signal_name: str, checkpoint: Path) -> None:
        super().__init__(f"stopped on {signal_name} after saving {checkpoint}; run the same command to resume")
        self.signal_name = signal_name
        self.checkpoint = checkpoint


class SignalWatcher:
    """Records the configured signals instead of dying; ``should_stop()`` is a collective that is True on
    every rank when any rank got one, and then names the signal on every rank (the highest-numbered one if
    ranks got different signals, so SIGTERM wins over SIGUSR1/2). A second signal while saving changes
    nothing."""

    def __init__(self, names: Iterable[str]):
        self.received: Optional[str] = None
        self._previous: dict[int, Any] = {}
        for name in names:
            number = getattr(signal, name, None)
            if not isinstance(number, signal.Signals):
                raise ValueError(f"unknown signal {name!r} in checkpoint.save_on_signals; use e.g. SIGUSR1, SIGTERM")
            self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number: int, frame: Any) -> None:
        if self.received is None:  # the first one names the stop; later ones (during the save) change nothing
            self.received = signal.Signals(number).name

    def should_stop(self) -> bool:
        number = int(max_over_ranks(signal.Signals[self.received].value if self.received else 0))
        if number:
            self.received = signal.Signals(number).name
        return number > 0

    def close(self) -> None:
        """Restore the previous handlers; after a stop on signal, keep ignoring these signals instead, so a
        late second one cannot turn the documented exit code into a kill while the process exits."""
        for number, handler in self._previous.items():
            signal.signal(number, signal.SIG_IGN if self.received else handler)
        self._previous.clear()
