"""Divergence cannot go unnoticed: the non-finite guard and the loss-spike warning.

The one global gradient norm each step computes (over dense and Engram table gradients;
``engram_train.train.optimizers``) also carries the step's loss, as ``0 * loss``: it is NaN/Inf
exactly when the loss or any gradient on any rank is.  That norm is reduced over every rank for the
clip, so every rank reaches the same verdict without a collective or a host sync of its own: the
optimizers container drops the dense and the table update on it, and the guard reads the value the
step's metrics report anyway.

``trainer.nonfinite=stop`` ends the run at the first such step with one line (``Diverged``, a user
error: exit code 2, printed once); ``skip`` lets the step pass without an update and stops after
``trainer.max_skipped_steps`` of them in a row.  The counts live in ``TrainState`` and so in every
checkpoint's ``meta.json``; the checkpointer keeps the newest checkpoint from before the first
non-finite step whatever ``trainer.keep_last`` says (``Checkpointer._prune``).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from typing import Callable, Optional

from engram_train.errors import UserError

log = logging.getLogger(__name__)


class Diverged(UserError, RuntimeError):
    """A non-finite loss or gradient norm under ``trainer.nonfinite=stop``, or too many in a row under ``skip``."""


class NonFiniteGuard:
    """Applies ``trainer.nonfinite`` to each step's loss and global gradient norm (the same on every rank).

    ``latest``: the newest complete checkpoint's directory (or None), named in the stop message.
    """

    def __init__(self, policy: str, max_skipped_steps: int, latest: Callable[[], Optional[str]], report: bool = True):
        self.policy = policy
        self.report = report   # one rank logs the skips (every rank reaches the same verdict)
        self.max_skipped_steps = max_skipped_steps
        self.latest = latest

    def observe(self, state, loss, grad_norm, finite: Optional[bool] = None) -> Optional[Diverged]:
        """Record step ``state.step`` (just taken) in ``state``; returns the error that ends the run, if any
        (raised by the caller once the step's metrics are logged).

        ``finite``: the step's verdict where the caller already holds it on the host (the trainer: the
        one the optimizers' step pulled); ``loss`` and ``grad_norm``, numbers or device tensors, are then
        read only on a non-finite step, for its message.  Without it they are numbers, judged here.
        """
        if finite is None:
            finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            state.nonfinite_streak = 0
            return None
        loss, grad_norm = float(loss), float(grad_norm)
        step = state.step
        if state.first_nonfinite_step is None:
            state.first_nonfinite_step = step
        state.skipped_steps += 1
        state.nonfinite_streak += 1
        what = f"step {step}: non-finite loss {loss} or gradient norm {grad_norm}"
        if self.policy == "skip" and state.nonfinite_streak < self.max_skipped_steps:
            if self.report:
                log.warning("%s: its update was dropped for the dense parameters and the Engram tables on every "
                        "rank (%d in a row, trainer.max_skipped_steps=%d)", what, state.nonfinite_streak,
                            self.max_skipped_steps)
            return None
        if self.policy == "stop":
            why = "trainer.nonfinite=stop"
        else:
            why = (f"{state.nonfinite_streak} in a row, trainer.max_skipped_steps={self.max_skipped_steps}, "
                   f"trainer.nonfinite=skip")
        latest = self.latest()
        where = (f"the newest checkpoint, {latest}, is from before it and a relaunch resumes from it"
                 if latest else "no checkpoint was written before it")
        return Diverged(f"{what} ({why}): the run stopped without saving this state; {where}; lower trainer.lr "
                        "or set trainer.grad_clip>0")


class LossSpikeDetector:
    """Warns when a finite loss exceeds ``factor`` x the median of the last ``window`` finite losses
    (once per run of such steps); never changes the run.

    The trainer feeds it every step's loss, in order, on log steps: the losses of the steps since
    the last log line wait on the device and come to the host with that line's metrics, so a
    spike is reported up to ``trainer.log_interval`` steps late, at the same step as before.
    """

    MIN_HISTORY = 10   # fewer losses say too little about the median

    def __init__(self, factor: float, window: int):
        self.factor = factor
        self.history: deque = deque(maxlen=window)
        self.in_spike = False

    def observe(self, step: int, loss: float) -> bool:
        """True when ``loss`` at ``step`` is a spike (the warning is logged at the first step of each)."""
        if self.factor <= 0 or not math.isfinite(loss):
            return False
        spike = False
        if len(self.history) >= min(self.MIN_HISTORY, self.history.maxlen):
            median = statistics.median(self.history)
            spike = median > 0 and loss > self.factor * median
            if spike and not self.in_spike:
                log.warning("step %d: loss %.4g is above %g x its running median %.4g (last %d steps); "
                            "a spike often precedes divergence: watch grad_norm, or lower trainer.lr",
                            step, loss, self.factor, median, len(self.history))
        self.in_spike = spike
        self.history.append(loss)
        return spike
