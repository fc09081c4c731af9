"""Preemption signals, caught from the entry point's first line.

SLURM's time-limit warning (``--signal``: SIGUSR1) and preemption or ``scancel`` (SIGTERM) can
arrive at any time, also while a rank is still importing torch or loading a checkpoint.  Their
default action kills the process; a rank killed before the trainer's loop leaves no checkpoint
and fails the whole launch.  :func:`install` runs first in ``engram-train`` and records the signal
instead; the trainer stops after the step in flight (its first step at the latest) with a
checkpoint on every rank (``Trainer._stop_requested``).
"""

from __future__ import annotations

import signal
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: Optional[int] = None


def _record(signum, _frame) -> None:
    global _received
    _received = signum


def install() -> None:
    """Record SIGTERM/SIGUSR1 from now on (idempotent; the main thread only, as Python requires)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)


def received() -> Optional[int]:
    """The signal number if one arrived since :func:`install`, else None."""
    return _received
