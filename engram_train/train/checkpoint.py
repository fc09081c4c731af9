"""Atomic, resumable checkpoints.

Layout of ``<run.dir>/checkpoints``::

    latest                      text file naming the newest complete checkpoint
    step_00000100/
        meta.json               written last: its presence marks the checkpoint complete
        model.pt                FULL (single-rank layout) model state: independent of TP/EP/DP sizes
        optim/rank_00000.pt     each rank's optimizer shard (ZeRO partition) - same world layout to resume
        rng/rank_00000.pt       each rank's RNG states (torch, numpy, python, megatron's tracker)
        tables/                 the Engram table store: each rank's rows and their optimizer state
                                (torch.distributed.checkpoint, global shapes; loads at any layout,
                                see engram_train.memory.checkpoint)

Invariants:
* a checkpoint is written into ``step_N.partial`` and renamed only when every
  rank has finished, then ``latest`` is replaced atomically (``os.replace``):
  a crash at any point leaves the previous ``latest`` intact;
* the model file is the gathered full state dict (``parallel.sharding``), so
  model weights load at any parallel layout; optimizer state is per rank and
  needs the same layout (a resharding tool is a later step);
* the learning rate is a function of the step and the data position is
  ``step * global_batch_size``, so neither needs state of its own.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

LATEST = "latest"


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps completed
    consumed_samples: int = 0     # global samples consumed by those steps


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> Dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _is_zero_optimizer(opt) -> bool:
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return isinstance(opt, DeepSpeedZeroOptimizer)


class Checkpointer:
    def __init__(self, root: str, keep_last: int = 2):
        self.root = root
        self.keep_last = keep_last
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    # -- discovery ------------------------------------------------------------------------------
    def _complete(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.root, name, "meta.json"))

    def latest_dir(self) -> Optional[str]:
        """The newest complete checkpoint: the one ``latest`` names, else the newest complete step dir."""
        path = os.path.join(self.root, LATEST)
        if os.path.isfile(path):
            name = open(path).read().strip()
            if self._complete(name):
                return os.path.join(self.root, name)
            log.warning("%s names %r, which is incomplete or missing; looking for another", path, name)
        if not os.path.isdir(self.root):
            return None
        names = sorted(n for n in os.listdir(self.root) if n.startswith("step_") and "." not in n
                       and self._complete(n))
        return os.path.join(self.root, names[-1]) if names else None

    # -- save -----------------------------------------------------------------------------------
    def save(self, engine, state: TrainState, extra: Optional[Dict[str, Any]] = None, table_store=None) -> str:
        from engram_train.parallel.sharding import local_to_full

        t0 = time.time()
        name = f"step_{state.step:08d}"
        final, partial = os.path.join(self.root, name), os.path.join(self.root, name + ".partial")
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(os.path.join(partial, "optim"))
            os.makedirs(os.path.join(partial, "rng"))
        _barrier()

        model = engine.module
        full = local_to_full(model.state_dict(), model)  # collective: every rank takes part
        if self.rank == 0:
            _torch_save(full, os.path.join(partial, "model.pt"))
        _torch_save(engine.optimizer.state_dict(), os.path.join(partial, "optim", f"rank_{self.rank:05d}.pt"))
        _torch_save(_rng_state(), os.path.join(partial, "rng", f"rank_{self.rank:05d}.pt"))
        if table_store is not None:
            from engram_train.memory import checkpoint as table_checkpoint

            table_checkpoint.save(table_store, os.path.join(partial, "tables"))
        _barrier()

        if self.rank == 0:
            meta = {"step": state.step, "consumed_samples": state.consumed_samples,
                    "world_size": self.world, "time": time.time(), **(extra or {})}
            _atomic_write_text(os.path.join(partial, "meta.json"), json.dumps(meta, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            _atomic_write_text(os.path.join(self.root, LATEST), name)
            self._prune(keep=name)
        _barrier()
        log.info("saved checkpoint %s in %.1fs", final, time.time() - t0)
        return final

    def _prune(self, keep: str) -> None:
        names = sorted(n for n in os.listdir(self.root) if n.startswith("step_") and "." not in n)
        for n in names[:-self.keep_last]:
            if n != keep:
                shutil.rmtree(os.path.join(self.root, n), ignore_errors=True)

    # -- load -----------------------------------------------------------------------------------
    def load(self, engine, path: Optional[str] = None, dp_size: int = 1,
             expect: Optional[Dict[str, Any]] = None, table_store=None) -> Optional[TrainState]:
        """Restore model, optimizer and RNG from ``path`` (default: latest). Returns None if there is none.

        ``expect``: metadata that must match (e.g. the prepared data's fingerprint: a checkpoint
        trained on another tokenization cannot be resumed meaningfully).
        """
        from engram_train.parallel.sharding import full_to_local

        path = path or self.latest_dir()
        if path is None:
            return None
        meta = json.load(open(os.path.join(path, "meta.json")))
        if meta["world_size"] != self.world:
            raise RuntimeError(
                f"checkpoint {path} was written by {meta['world_size']} ranks, this run has {self.world}: "
                "optimizer state is per rank; resume with the same launch layout")
        for key, want in (expect or {}).items():
            if key in meta and meta[key] != want:
                raise RuntimeError(f"checkpoint {path} has {key}={meta[key]!r} but this run has {want!r}; "
                                   "use the same data settings, or a new run.dir (or trainer.resume=false)")
        model = engine.module
        full = torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=False)
        local = full_to_local(full, model)
        missing, unexpected = model.load_state_dict(local, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {path} does not fit the model: missing={missing[:8]} "
                               f"unexpected={unexpected[:8]}")
        opt_sd = torch.load(os.path.join(path, "optim", f"rank_{self.rank:05d}.pt"), map_location="cpu",
                            weights_only=False)
        if _is_zero_optimizer(engine.optimizer):
            engine.optimizer.load_state_dict([opt_sd] * dp_size, load_optimizer_states=True,
                                             load_from_fp32_weights=True)
        else:
            engine.optimizer.load_state_dict(opt_sd)
        if table_store is not None:
            from engram_train.memory import checkpoint as table_checkpoint

            table_checkpoint.load(table_store, os.path.join(path, "tables"))
        _set_rng_state(torch.load(os.path.join(path, "rng", f"rank_{self.rank:05d}.pt"), weights_only=False))
        log.info("resumed from %s (step %d)", path, meta["step"])
        return TrainState(step=meta["step"], consumed_samples=meta["consumed_samples"])
