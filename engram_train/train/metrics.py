"""Metrics behind a tiny interface: ``log(step, dict)`` and ``close()``.

Backends: ``metrics.jsonl`` (one JSON object per logged step) and Weights &
Biases (offline unless ``WANDB_API_KEY`` is set; imported lazily).  Only rank 0
writes; other ranks get a ``NullLogger``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional

log = logging.getLogger(__name__)


class Logger:
    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class NullLogger(Logger):
    def log(self, step, metrics):
        pass


class JsonlLogger(Logger):
    """Appends; on resume, lines of steps after the checkpoint's step (work that is redone) are dropped first."""

    def __init__(self, path: str, resume_step: Optional[int] = None):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                kept = [ln for ln in f if ln.strip() and json.loads(ln).get("step", -1) <= resume_step]
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)
        elif resume_step is None and os.path.exists(path):
            os.remove(path)
        self._f = open(path, "a", buffering=1)

    def log(self, step, metrics):
        self._f.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self):
        self._f.close()


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

    def log(self, step, metrics):
        self.run.log(metrics, step=step)

    def close(self):
        self.run.finish()


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
