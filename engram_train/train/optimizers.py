"""One optimizer step over every owner of parameters: one norm, one clip, every optimizer steps.

torchtitan's ``OptimizersContainer`` shape.  DeepSpeed owns the dense parameters
(:class:`engram_train.parallel.deepspeed_engine.DenseOptimizer`), the table store
the Engram table rows (:mod:`engram_train.memory.store`); the trainer sees one
object::

    for each micro-batch:  loss = forward(batch); optimizers.backward(loss)
    optimizers.step(lr, step_loss)  ->  the global gradient norm

``step`` reduces the table gradients, takes DeepSpeed's dense norm, and forms

    norm = sqrt(dense^2 + tables^2 + 0 * loss)

The ``0 * loss`` term is 0 for a finite loss and NaN otherwise, so the one norm
is non-finite exactly when the step's loss or any gradient on any rank is: every
rank reaches the same verdict without a collective of its own.  A non-finite norm
drops the dense and the table update alike (``trainer.nonfinite`` then decides
whether the run goes on: ``engram_train.train.guard``).  With
``trainer.grad_clip = c > 0`` every gradient is scaled by
``1 / max(1, (norm + 1e-6) / c)``: dense gradients in float32 tensor arithmetic
(the operation DeepSpeed's own clip performs, so the dense update is DeepSpeed's
bit for bit), table gradient rows by the same coefficient in float64.
Why DeepSpeed is told nothing but gets its gradients scaled: docs/tables.md, "One step".
"""

from __future__ import annotations

import math

import torch

from engram_train.train.schedule import apply_lr


class OptimizersContainer:
    """The dense optimizer (DeepSpeed) and the table store's optimizer, stepped as one.

    ``tables`` is the table store or None (no Engram); ``max_norm`` is ``trainer.grad_clip`` (0: no clip).
    """

    def __init__(self, dense, tables=None, max_norm: float = 0.0):
        self.dense = dense
        self.tables = tables
        self.max_norm = float(max_norm)
        self.applied = True   # the last step's verdict, on the host: False when its update was dropped

    @property
    def engine(self):
        return self.dense.engine

    def backward(self, loss: torch.Tensor) -> None:
        """One micro-batch's backward: dense gradients to DeepSpeed, table rows to the store (the lookup's
        backward hands them over)."""
        self.dense.backward(loss)

    @torch.no_grad()
    def step(self, lr: float, loss: torch.Tensor) -> torch.Tensor:
        """After the last micro-batch's backward: one norm, one clip, every optimizer steps at ``lr``.

        ``loss`` is the step's loss as every rank reports it (reduced over data parallelism).  Returns the
        global gradient norm (a tensor; ``inf`` when the update was dropped).
        """
        if not self.dense.at_boundary():
            raise RuntimeError("OptimizersContainer.step() before the last micro-batch's backward")
        apply_lr(self.dense, lr)
        dense = self.dense.grad_norm()
        sq = dense.double().square()
        if self.tables is not None:
            sq = sq + self.tables.reduce_gradients().to(device=sq.device, dtype=torch.float64)
        sq = sq + loss.detach().to(device=sq.device, dtype=torch.float64) * 0.0
        # DeepSpeed marks an invalid dense norm -1; squaring must not launder it into a valid one.
        valid = torch.isfinite(dense) & (dense >= 0)
        norm = torch.where(valid, sq.sqrt(), torch.full_like(sq, float("inf"))).to(dense.dtype)
        norm = torch.where(torch.isfinite(norm), norm, torch.full_like(norm, float("inf")))
        host_norm = float(norm)   # the table step decides on the host (its rows may step on a worker thread)
        apply = self.applied = math.isfinite(host_norm)
        inv_clip, table_scale = None, 1.0
        if self.max_norm > 0:
            inv_clip = 1.0 / torch.clamp((norm + 1e-6) / self.max_norm, min=1.0)
            table_scale = 1.0 / max(1.0, (host_norm + 1e-6) / self.max_norm)
        self.dense.step(inv_clip if apply else None, apply)
        if self.tables is not None:
            self.tables.step(lr, grad_scale=table_scale, drop=not apply)
        return norm


def build_optimizers(model, cfg, dp_size: int, use_bf16: bool, tables=None) -> OptimizersContainer:
    """DeepSpeed's engine over ``model`` and the table store ``tables`` (or None), stepped as one."""
    from engram_train.parallel.deepspeed_engine import DenseOptimizer, build_engine

    engine, _ = build_engine(model, cfg, dp_size, use_bf16)
    return OptimizersContainer(DenseOptimizer(engine), tables, cfg.trainer.grad_clip)
