"""One layer's shard of a table and the module the Engram block calls as its table.

:class:`TableShard` holds this rank's contiguous row range of one layer's table
(:class:`engram_train.memory.layout.RowRange`) as a plain fp32 tensor, not an ``nn.Parameter``,
so DeepSpeed never sees, broadcasts, reduces or checkpoints it, and collects the sparse
gradient rows the lookups hand it.  :class:`StoreTable` is the table module of one Engram
layer: ``table(hash_ids [..., heads], rows=None) -> [..., heads * embed_dim]``, where ``rows``
are the lookup's rows gathered ahead by the host prefetch stage (they travel with the batch).

Invariant: a row's initial value does not depend on the layout (:func:`init_rows`).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from engram_train.engram.table import check_hash_ids
from engram_train.kernels import gather_rows
from engram_train.memory.layout import TableSpec
from engram_train.memory.optim import TableOptimizer

_INIT_BLOCK_ROWS = 4096


def init_rows(spec: TableSpec, lo: int, hi: int, std: float, seed: int, device=None,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows ``[lo, hi)`` of the table's initial value, N(0, std), identical for every layout.

    Block ``b`` (rows ``b*4096 ..``) is drawn from its own generator keyed by
    ``(seed, layer_id, b)`` on the CPU and copied into place, so a shard draws
    only the blocks it overlaps and the host never holds more than one block.
    """
    if out is None:
        out = torch.empty(hi - lo, spec.embed_dim, dtype=torch.float32, device=device)
    if hi <= lo:
        return out
    gen = torch.Generator()
    for b in range(lo // _INIT_BLOCK_ROWS, (hi - 1) // _INIT_BLOCK_ROWS + 1):
        start = b * _INIT_BLOCK_ROWS
        n = min(_INIT_BLOCK_ROWS, spec.rows - start)
        gen.manual_seed((seed * 0x9E3779B97F4A7C15 + spec.layer_id * 0xBF58476D1CE4E5B9 + b) % (1 << 63))
        block = torch.randn(n, spec.embed_dim, generator=gen).mul_(std)
        a, z = max(lo, start), min(hi, start + n)
        out[a - lo:z - lo] = block[a - start:z - start]
    return out


class TableShard:
    """Rows ``[lo, hi)`` of one layer's table, their pending gradient rows and their optimizer."""

    # engram.kernel_backend: the backend of engram_train.kernels.gather_rows and reduce_row_grads here, and of
    # engram_train.kernels.row_adam in the shard's optimizer (TableStore sets both).
    kernel_backend: str = "auto"

    def __init__(self, spec: TableSpec, lo: int, hi: int, weight: torch.Tensor, exchange, compute_device=None):
        self.spec = spec
        self.lo, self.hi = lo, hi
        self.weight = weight
        self.compute_device = torch.device(compute_device) if compute_device is not None else weight.device
        self.exchange = exchange
        self.optimizer: Optional[TableOptimizer] = None
        self._pending: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self.grad: Optional[Tuple[torch.Tensor, torch.Tensor]] = None   # (unique local ids, rows) after reduce

    @property
    def num_rows(self) -> int:
        return self.hi - self.lo

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    def read_rows(self, local_ids: torch.Tensor) -> torch.Tensor:
        """Rows ``local_ids`` of this shard on the compute device (from host RAM for host tables)."""
        if self.weight.device == self.compute_device:
            # The gather's one dispatch point (engram.kernel_backend): Triton on CUDA under "auto".
            return gather_rows(self.weight, local_ids.unsqueeze(1), local_ids.new_zeros(1),
                               backend=self.kernel_backend)
        rows = self.weight.index_select(0, local_ids.to(self.weight.device))
        return rows.to(self.compute_device, non_blocking=True)

    def accumulate(self, local_ids: torch.Tensor, rows: torch.Tensor) -> None:
        self._pending.append((local_ids.to(rows.device), rows.to(torch.float32)))

    def take_pending(self) -> Tuple[torch.Tensor, torch.Tensor]:
        pending, self._pending = self._pending, []
        if not pending:
            dev = self.compute_device
            return torch.empty(0, dtype=torch.int64, device=dev), torch.empty(0, self.embed_dim, device=dev)
        return torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending])


class _Lookup(torch.autograd.Function):
    """Rows of global ids (or of a block planned and read ahead); backward hands sparse gradient
    rows to the owning shard, not to autograd."""

    @staticmethod
    def forward(ctx, anchor, shard, ids, block):
        if block is None:
            rows, ctx.saved = shard.exchange.gather(shard, ids)
        else:
            rows, ctx.saved = shard.exchange.finish(shard, block.plan, block.rows)
        ctx.shard = shard
        return rows

    @staticmethod
    def backward(ctx, grad):
        ctx.shard.exchange.scatter_grad(ctx.shard, ctx.saved, grad.contiguous())
        return None, None, None, None


class StoreTable(nn.Module):
    """What the Engram block calls as its table: a view of one layer's shard in the store.

    ``forward(hash_ids [..., heads]) -> [..., heads * embed_dim]`` (fp32), the
    lookup contract of ``MultiHeadEmbeddingTable``.  Holds no parameters: the
    ``_anchor`` only makes autograd call the lookup's backward.
    """

    # The loader checks the ids where it makes them, on the CPU (data.loader.Collate); checking here
    # again would sync the device in every Engram layer of every micro-batch.  Tools feeding ids of
    # their own may set it.
    check_ids: bool = False

    def __init__(self, shard: TableShard):
        super().__init__()
        self.shard = shard
        self.table_sizes = list(shard.spec.table_sizes)
        self.embed_dim = shard.spec.embed_dim
        self.register_buffer("offsets", torch.tensor(shard.spec.offsets, dtype=torch.int64), persistent=False)
        self.register_buffer("sizes", torch.tensor(self.table_sizes, dtype=torch.int64), persistent=False)
        self._anchor = torch.empty(0, requires_grad=True)
        # Host-resident tables: lookups that come without rows gathered ahead (evaluation) run on the
        # prefetcher's worker, behind what it has queued, so every rank plans its collectives in one order.
        self.prefetcher = None

    @property
    def num_heads(self) -> int:
        return len(self.table_sizes)

    def forward(self, hash_ids: torch.Tensor, rows=None) -> torch.Tensor:
        """``rows``: this lookup's :class:`~engram_train.memory.host.RowBlock`, gathered ahead by the host
        prefetch stage and carried by the batch (``batch[ENGRAM_ROWS].get(layer_id)``)."""
        if self.check_ids:
            check_hash_ids(hash_ids, self.sizes, self.table_sizes)
        if rows is None and self.prefetcher is not None:   # not gathered ahead (evaluation): the same path, now
            rows = self.prefetcher.lookup_now(self.shard.spec.layer_id, hash_ids)
        if rows is None:
            ids = (hash_ids + self.offsets).reshape(-1)
            out = _Lookup.apply(self._anchor, self.shard, ids, None)
        else:
            if rows.num_ids != hash_ids.numel():
                raise RuntimeError(f"Engram layer {self.shard.spec.layer_id}: the rows gathered ahead belong to "
                                   "another micro-batch; pass each batch's own batch[ENGRAM_ROWS] with it")
            out = _Lookup.apply(self._anchor, self.shard, None, rows)
        return out.reshape(*hash_ids.shape[:-1], self.num_heads * self.embed_dim)

    def extra_repr(self) -> str:
        s = self.shard
        return (f"layer={s.spec.layer_id}, heads={self.num_heads}, rows={s.spec.rows}, shard=[{s.lo}, {s.hi}), "
                f"embed_dim={self.embed_dim}")
