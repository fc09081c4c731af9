"""Preemption signals, caught from the entry point's first line.

SLURM's time-limit warning (``--signal``: SIGUSR1) and preemption or ``scancel`` (SIGTERM) can
arrive at any time, also while a rank is still importing torch or loading a checkpoint.  Their
default action kills the process; a rank killed before the trainer's loop leaves no checkpoint
and fails the whole launch.  :func:`install` runs as soon as ``engram-train`` starts (after the
interpreter and the entry module's imports, a fraction of a second) and records the signal
instead; the trainer stops after the step in flight (its first step at the latest) with a
checkpoint on every rank (``Trainer._stop_requested``).
"""

from __future__ import annotations

import os
import signal
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Set by the launcher (engram_train.torchrun) when a signal reached it before it had started its
# workers: a worker started later begins with the stop already requested.
STOP_SIGNAL_ENV = "ENGRAM_TRAIN_STOP_SIGNAL"
_received: Optional[int] = None


def _record(signum, _frame) -> None:
    global _received
    _received = signum


def install() -> None:
    """Record SIGTERM/SIGUSR1 from now on (idempotent; the main thread only, as Python requires)."""
    global _received
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record)
    inherited = os.environ.get(STOP_SIGNAL_ENV, "")
    if _received is None and inherited.isdigit():
        _received = int(inherited)


def received() -> Optional[int]:
    """The signal number if one arrived since :func:`install`, else None."""
    return _received
