"""What rank 0 shows of training progress: a tqdm bar on a terminal, plain lines in a log file.

``trainer.progress``: ``auto`` (default) draws the bar when stdout and stderr are terminals and
otherwise prints one line per ``trainer.log_interval`` step -- a SLURM or ``> train.log`` job's
log then holds no carriage-return redraws; ``true`` always draws the bar, ``false`` shows
neither (metrics still go to metrics.jsonl and W&B).  A line reads::

    step 40/200 | loss 4.1234 | lr 2.85e-03 | 10,240 tokens/s | ETA 0:02:11
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta
from typing import Dict, Optional

log = logging.getLogger(__name__)

MODES = ("auto", "true", "false")


def resolve(mode: str, stream_is_tty: Optional[bool] = None) -> str:
    """``"bar"``, ``"lines"`` or ``"off"`` for a ``trainer.progress`` value."""
    if mode == "false":
        return "off"
    if mode == "true":
        return "bar"
    if stream_is_tty is None:
        stream_is_tty = sys.stdout.isatty() and sys.stderr.isatty()
    return "bar" if stream_is_tty else "lines"


def format_line(step: int, total: int, metrics: Dict[str, float], eta_s: Optional[float]) -> str:
    parts = [f"step {step}/{total}", f"loss {metrics['loss']:.4f}", f"lr {metrics['lr']:.2e}"]
    if "tokens_per_s" in metrics:
        parts.append(f"{metrics['tokens_per_s']:,.0f} tokens/s")
    parts.append("ETA " + (str(timedelta(seconds=round(eta_s))) if eta_s is not None else "?"))
    return " | ".join(parts)


class Progress:
    def __init__(self, mode: str, total: int, initial: int, enabled: bool = True):
        self.kind = resolve(mode) if enabled else "off"
        self.total, self.initial = total, initial
        self.t0 = time.time()
        self.bar = None
        if self.kind == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, step: int, metrics: Dict[str, float], logged: bool) -> None:
        """After each step; ``logged``: a log step, whose metrics are on the host and carry tokens/s (the
        others' stay on the device, so neither the bar nor a line reads them)."""
        if self.bar is not None:
            self.bar.update(1)
            if logged:
                self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}")
        elif self.kind == "lines" and logged:
            done = step - self.initial
            eta = (time.time() - self.t0) / done * (self.total - step) if done > 0 else None
            log.info(format_line(step, self.total, metrics, eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
