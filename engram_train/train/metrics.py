"""Metrics behind a tiny interface: ``log(step, dict)`` and ``close()``.

Backends: ``metrics.jsonl`` (one JSON object per logged step, each step once
across resumes; see ``JsonlLogger``) and Weights & Biases (offline unless
``WANDB_API_KEY`` is set; imported lazily).  Only rank 0 writes; other ranks get
a ``NullLogger``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional

log = logging.getLogger(__name__)

SUPERSEDED = "metrics.superseded.jsonl"   # next to metrics.jsonl: lines of steps a resumed run redid


class Logger:
    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _WarnOnce:
    """A metrics backend whose writes fail (a full disk, a quota) warns once and the run goes on:
    metrics are worth less than the training they describe."""

    def __init__(self, what: str):
        self.what = what
        self.warned = False

    def __call__(self, e: BaseException) -> None:
        if not self.warned:
            self.warned = True
            log.warning("%s: a write failed (%s: %s); training goes on, later failures are not reported",
                        self.what, type(e).__name__, e)


class NullLogger(Logger):
    def log(self, step, metrics):
        pass


class JsonlLogger(Logger):
    """Appends to ``metrics.jsonl``; never deletes a line.

    On resume (``resume_step``: the checkpoint's step) the lines of later steps, work the run is
    about to redo, move to ``metrics.superseded.jsonl`` so that each step appears once here; a
    line that does not parse (a write cut short by a crash) goes there too.  A fresh start
    (``resume_step`` None) finding a non-empty ``metrics.jsonl`` moves it to
    ``metrics.<UTC timestamp>.jsonl`` with a warning: it belongs to an earlier run.
    """

    def __init__(self, path: str, resume_step: Optional[int] = None):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path):
            if resume_step is not None:
                self._supersede_after(resume_step)
            elif os.path.getsize(path) > 0:
                aside = _aside_name(path)
                os.rename(path, aside)
                log.warning("fresh start: the earlier %s moved to %s", path, aside)
        self._f = open(path, "a", buffering=1)
        self._failed = _WarnOnce(path)

    def _supersede_after(self, resume_step: int) -> None:
        kept, superseded, unterminated = [], [], False
        with open(self.path) as f:
            for line in f:
                if not line.strip():
                    continue
                if not line.endswith("\n"):
                    line, unterminated = line + "\n", True
                (kept if _step_of(line) <= resume_step else superseded).append(line)
        if not superseded and not unterminated:
            return
        side = os.path.join(os.path.dirname(self.path), SUPERSEDED)
        if superseded:
            # Side file first and durable: a crash in between leaves a line in both files, never in neither.
            with open(side, "a") as f:
                f.writelines(superseded)
                f.flush()
                os.fsync(f.fileno())
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        if superseded:
            log.info("resumed at step %d: %d lines of later steps moved from %s to %s", resume_step,
                     len(superseded), self.path, side)

    def log(self, step, metrics):
        try:
            self._f.write(json.dumps({"step": step, **metrics}) + "\n")
        except OSError as e:
            self._failed(e)

    def close(self):
        try:
            self._f.close()
        except OSError as e:
            self._failed(e)


def _step_of(line: str) -> float:
    """The line's step; +inf for a line that does not parse, so that it is moved aside, not kept."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return math.inf
    return step if isinstance(step, (int, float)) else math.inf


def _aside_name(path: str) -> str:
    root, ext = os.path.splitext(path)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside, n = f"{root}.{stamp}{ext}", 1
    while os.path.exists(aside):   # two fresh starts within a second
        aside, n = f"{root}.{stamp}-{n}{ext}", n + 1
    return aside


class WandbLogger(Logger):
    def __init__(self, run_dir: str, project: str, name: Optional[str], mode: str, config: Dict[str, Any]):
        import wandb  # lazy: importing wandb costs seconds

        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        os.makedirs(run_dir, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(project=project, name=name, dir=run_dir, mode=mode, config=config,
                              resume="allow", settings=wandb.Settings(silent=True, console="off"))
        log.info("W&B run in %s mode under %s", mode, os.path.join(run_dir, "wandb"))
        self._failed = _WarnOnce(f"W&B ({os.path.join(run_dir, 'wandb')})")

    def log(self, step, metrics):
        try:
            self.run.log(metrics, step=step)
        except Exception as e:   # W&B's own errors wrap the OSError of a full disk
            self._failed(e)

    def close(self):
        try:
            self.run.finish()
        except Exception as e:
            self._failed(e)


class MultiLogger(Logger):
    def __init__(self, loggers: List[Logger]):
        self.loggers = loggers

    def log(self, step, metrics):
        for lg in self.loggers:
            lg.log(step, metrics)

    def close(self):
        for lg in self.loggers:
            lg.close()


def build_logger(run_dir: str, rank: int, *, wandb_mode: str, wandb_project: str, name: Optional[str],
                 config: Dict[str, Any], resume_step: Optional[int]) -> Logger:
    if rank != 0:
        return NullLogger()
    loggers: List[Logger] = [JsonlLogger(os.path.join(run_dir, "metrics.jsonl"), resume_step)]
    if wandb_mode != "disabled":
        try:
            loggers.append(WandbLogger(run_dir, wandb_project, name, wandb_mode, config))
        except Exception as e:  # a broken W&B install must not stop training
            log.warning("W&B disabled: %s", e)
    return MultiLogger(loggers)
