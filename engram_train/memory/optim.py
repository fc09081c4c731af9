"""Table optimizers: they update one shard from its gradient rows ``(unique local row ids, rows)``.

They apply decoupled weight decay like ``torch.optim.AdamW`` (the paper's
default for tables is 0).  ``adam`` and ``sparse_adam`` keep fp32 first and
second moments of the shard's shape (12 bytes per table parameter with the
fp32 weight; ``sparse_adam`` adds a 4-byte step count per row).

``adam``
    ``torch.optim.AdamW`` over the whole shard, as if the gradient were dense
    with zeros at the untouched rows: every row's moments decay every step and
    every row with a non-zero first moment keeps moving.  One global step
    count.  This is what the paper trains with on device; it never builds a
    dense gradient (moments decay in place, touched rows are added).
``sparse_adam``
    Lazy row-wise Adam: only the rows a step touched change, weight and
    moments alike, and each row counts its own steps for bias correction (a
    row seen for the first time at step 1000 gets the bias correction of a
    first step).  Untouched rows cost nothing, which is the only affordable
    rule when tables live in host RAM.  It is a different optimizer, not an
    approximation of ``adam``: on rows touched every step the two agree.
``sparse_adam_rowwise``
    ``sparse_adam`` with one second moment per row, the mean over the row of
    the squared gradient (the row-wise state of TorchRec's and public
    speed-runs' embedding optimizers): 8 bytes per table parameter plus 8 per
    row instead of 12 plus 4, for host tables that must fit in less RAM.  All
    coordinates of a row share one adaptive step size, so it is a different
    optimizer again, not a compressed ``sparse_adam``.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Executor
from typing import Dict, List, Optional, Tuple

import numpy
import torch

from engram_train.kernels.rows import row_adam, sparse_adam_rows

# The dense update's blocks: about 2^22 parameters (16 MiB of denominators, one reused buffer instead of
# table-sized temporaries; few blocks, as every op is a fork-join of torch's threads), in a multiple of
# 64 rows so that every block starts on a whole SIMD vector.
_DENSE_BLOCK_PARAMS = 1 << 22
_TINY = torch.finfo(torch.float32).tiny   # the smallest normal float32
# The host table step's row blocks hold at most this many parameters: torch's intra-op grain
# (at::internal::GRAIN_SIZE), so no op on a block forks torch's own threads and the step uses exactly
# engram.host_threads cores.  Blocks depend on the row width only, never on the thread count.
_HOST_BLOCK_PARAMS = 1 << 15


def host_row_blocks(num_rows: int, row_width: int) -> List[Tuple[int, int]]:
    """``[lo, hi)`` slices of a step's unique rows, one host-step task each (disjoint rows)."""
    step = max(1, _HOST_BLOCK_PARAMS // max(int(row_width), 1))
    return [(lo, min(lo + step, num_rows)) for lo in range(0, num_rows, step)]


class TableOptimizer:
    name = ""
    rowwise = False   # one second moment per row (``[rows, 1]``) instead of one per parameter
    kernel_backend = "auto"   # engram_train.kernels.row_adam's backend (engram.kernel_backend); the store sets it

    def __init__(self, weight: torch.Tensor, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 alloc=None):
        self.weight = weight
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        # alloc(name, shape, dtype) -> a zeroed tensor: the store's allocator (e.g. memory-mapped files).
        self.alloc = alloc or (lambda name, shape, dtype: torch.zeros(shape, dtype=dtype, device=weight.device))
        self.exp_avg = self.alloc("exp_avg", tuple(weight.shape), torch.float32)
        sq_shape = (weight.shape[0], 1) if self.rowwise else tuple(weight.shape)
        self.exp_avg_sq = self.alloc("exp_avg_sq", sq_shape, torch.float32)

    @torch.no_grad()
    def step(self, ids: torch.Tensor, grads: torch.Tensor, lr: float) -> None:
        raise NotImplementedError

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        """Row-shaped state (``[shard rows, ...]``), checkpointed with the weight's row range."""
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def scalars(self) -> Dict[str, int]:
        return {}

    def load_scalars(self, scalars: Dict[str, int]) -> None:
        pass

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())


def _add_rows(t: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, alpha: float) -> None:
    """``t.index_add_(0, ids, rows, alpha=alpha)`` for unique ``ids``, bit for bit."""
    if t.device.type != "cpu":
        t.index_add_(0, ids, rows, alpha=alpha)
        return
    touched = t.index_select(0, ids)
    touched.add_(rows, alpha=alpha)
    t.index_copy_(0, ids, touched)


class TableAdam(TableOptimizer):
    name = "adam"

    def __init__(self, weight, **kw):
        super().__init__(weight, **kw)
        self.num_steps = 0
        self._denom: Optional[torch.Tensor] = None   # one block's denominators, reused every step

    @torch.no_grad()
    def step(self, ids, grads, lr):
        """AdamW's arithmetic, operation for operation, on every row: ``m = b1 m (+ (1-b1) g)``, ``v = b2 v
        (+ (1-b2) g^2)``, ``w -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)``.

        Memory-bound on a CPU: the moments decay in place over the whole shard, the touched rows add
        their gradient, then the update runs block by block through one reused block of denominators, so
        no table-sized temporary is allocated (and page-faulted) each step.  Each element sees the same
        operations in the same order as a single pass over the shard, so the bits do not depend on the
        blocks.

        On the CPU, torch's float ``sqrt`` (MKL's vector math) takes a slow path on zero and subnormal
        inputs, ~14x slower on a block of zeros, and untouched rows have ``v == 0``.  Where any ``v``
        below the smallest normal float gives the denominator ``eps`` exactly (``sqrt(v)/sqrt(bc2)`` is
        then far below half an ulp of ``eps``; checked each step, see :meth:`_floor_is_exact`), ``v``
        is raised to that normal float before the ``sqrt``: the same bits, without the slow path.
        """
        self.num_steps += 1
        b1, b2 = self.beta1, self.beta2
        bc1 = 1.0 - b1 ** self.num_steps
        bc2_sqrt = math.sqrt(1.0 - b2 ** self.num_steps)
        w, m, v = self.weight, self.exp_avg, self.exp_avg_sq
        g = grads.to(torch.float32)
        m.mul_(b1)
        v.mul_(b2)
        # Untouched rows: the zero gradient adds nothing.  The ids are unique, so on the CPU the touched
        # rows are gathered, added to in one vectorized op and written back: index_add_'s result (the
        # same add kernel), ~3x faster than its row-by-row adds.  CUDA keeps index_add_ (its kernel
        # rounds alpha * g before adding).
        _add_rows(m, ids, g, 1.0 - b1)
        _add_rows(v, ids, g * g, 1.0 - b2)
        if self.weight_decay:
            w.mul_(1.0 - lr * self.weight_decay)
        rows = w.shape[0]
        block = min(rows, max(64, _DENSE_BLOCK_PARAMS // max(w[0].numel(), 1) // 64 * 64))
        if self._denom is None or self._denom.shape[0] < block:
            self._denom = torch.empty(block, *w.shape[1:], dtype=torch.float32, device=w.device)
        floor = _TINY if w.device.type == "cpu" and self._floor_is_exact(bc2_sqrt) else None
        for lo in range(0, rows, block):
            hi = min(lo + block, rows)
            denom = self._denom[:hi - lo]
            if floor is None:
                torch.sqrt(v[lo:hi], out=denom)
            else:
                torch.clamp_min(v[lo:hi], floor, out=denom).sqrt_()
            denom.div_(bc2_sqrt).add_(self.eps)
            w[lo:hi].addcdiv_(m[lo:hi], denom, value=-lr / bc1)

    def _floor_is_exact(self, bc2_sqrt: float) -> bool:
        """Whether every ``v`` in ``[0, tiny]`` gives the denominator ``eps`` bit for bit, floored or not.

        The original's ``sqrt(v)/bc2_sqrt`` lies in ``[0, sqrt(tiny)/bc2_sqrt]``, the floored one at the
        top of it; float rounding is monotone, so if the top plus ``eps`` (with a 2x margin for a
        vector sqrt's last-ulp error) rounds to ``eps``, the whole range does.  False for a tiny ``eps``.
        """
        f32 = numpy.float32   # float32 arithmetic on the host: no tensor, nothing to synchronize
        top = f32(numpy.sqrt(f32(2 * _TINY))) / f32(bc2_sqrt) + f32(self.eps)
        return bool(top == f32(self.eps))

    def scalars(self):
        return {"num_steps": self.num_steps}

    def load_scalars(self, scalars):
        self.num_steps = int(scalars["num_steps"])


class TableSparseAdam(TableOptimizer):
    name = "sparse_adam"
    # Host tables: the step runs over disjoint blocks of its unique rows (host_row_blocks), on this pool
    # (engram.host_threads; None: one after another on the calling thread).  The store sets both.
    host_blocks = False
    pool: Optional[Executor] = None
    pool_cpu_s = 0.0   # CPU seconds the pool's threads spent in steps (engram_prefetch/update_cpu_s counts them)

    def __init__(self, weight, **kw):
        super().__init__(weight, **kw)
        # int32: 2^31 steps are plenty, and the counter is host bytes per row that every table pays.
        self.row_steps = self.alloc("row_steps", (weight.shape[0],), torch.int32)

    @torch.no_grad()
    def step(self, ids, grads, lr):
        if not self.host_blocks:
            self._step_rows(ids, grads, lr)
            return
        # Each row's update reads and writes that row's state only, and the ids are unique: the blocks
        # touch disjoint rows, so any number of threads gives the single-thread result bit for bit.
        blocks = host_row_blocks(ids.numel(), self.weight.shape[1])
        if self.pool is None or len(blocks) < 2:
            for lo, hi in blocks:
                self._step_rows(ids[lo:hi], grads[lo:hi], lr)
            return
        for f in [self.pool.submit(self._timed_rows, ids[lo:hi], grads[lo:hi], lr) for lo, hi in blocks]:
            self.pool_cpu_s += f.result()

    def _timed_rows(self, ids, grads, lr) -> float:
        t0 = time.thread_time()
        self._step_rows(ids, grads, lr)
        return time.thread_time() - t0

    def _step_rows(self, ids, grads, lr):
        if self.rowwise:   # no kernel of its own: the torch rule below
            sparse_adam_rows(self.weight, self.exp_avg, self.exp_avg_sq, self.row_steps, ids, grads, lr,
                             (self.beta1, self.beta2), self.eps, self.weight_decay, rowwise=True)
            return
        # The one dispatch point: Triton's row_adam for CUDA rows under "auto", sparse_adam_rows elsewhere.
        row_adam(self.weight, self.exp_avg, self.exp_avg_sq, self.row_steps, ids, grads, lr,
                 betas=(self.beta1, self.beta2), eps=self.eps, weight_decay=self.weight_decay,
                 backend=self.kernel_backend)

    def state_tensors(self):
        return {**super().state_tensors(), "row_steps": self.row_steps}


class TableSparseAdamRowwise(TableSparseAdam):
    name = "sparse_adam_rowwise"
    rowwise = True


TABLE_OPTIMIZERS = {"adam": TableAdam, "sparse_adam": TableSparseAdam,
                    "sparse_adam_rowwise": TableSparseAdamRowwise}


def build_table_optimizer(name: str, weight: torch.Tensor, **kw) -> TableOptimizer:
    return TABLE_OPTIMIZERS[name](weight, **kw)
