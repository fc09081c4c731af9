"""The table store: owner of every Engram table's rows, their gradients and their optimizer.

One :class:`TableShard` per Engram layer holds this rank's contiguous row range
(:mod:`engram_train.memory.layout`) as a plain fp32 tensor: not an
``nn.Parameter``, so DeepSpeed never sees, broadcasts, reduces or checkpoints
it.  The model gets a :class:`StoreTable` per layer through its layer spec
(``build_model(table_provider=store.table)``); the Engram block calls it like
its own table: ``table(hash_ids [..., heads]) -> [..., heads * embed_dim]``.

A training step, seen from the store::

    forward      StoreTable -> exchange.gather          rows of this rank's tokens
    backward     exchange.scatter_grad -> accumulate    (local ids, rows) per micro-batch, sparse
    reduce_gradients()                                  sum duplicates, average over replicas, norm^2
    step(lr, grad_scale)                                table optimizer on the clipped rows, drop the gradients

The optimizers container (``engram_train.train.optimizers``) calls both: the
squared norm joins DeepSpeed's dense norm in the one global norm, whose clip
coefficient comes back as ``grad_scale``.

Where rows live (``residency``): on the compute device, or in host RAM
(optionally memory-mapped files, one copy per node for replicas), where
:mod:`engram_train.memory.host` gathers the next micro-batch's rows ahead and
runs the table step on its worker thread.

Invariants:
- no rank ever holds more rows than its shard, not even at start: rows are
  initialized per block of rows from generators keyed by (seed, layer, block),
  so a row's initial value does not depend on the layout and the global RNG
  is not touched;
- gradients are reduced only across replicas of the same shard, in rank order
  (deterministic), and divided by the data-parallel size like DeepSpeed does
  for dense gradients;
- the squared gradient norm counts each row once over all shards.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from engram_train.config.schema import ConfigError
from engram_train.engram.table import check_hash_ids
from engram_train.memory.exchange import AllExchange, CommCounter, ReplicatedExchange, TPExchange
from engram_train.memory.layout import Placement, TableSpec, placement_for, shard_bounds, table_specs
from engram_train.memory.optim import TableOptimizer, build_table_optimizer
from engram_train.kernels import gather_rows, reduce_row_grads

log = logging.getLogger(__name__)

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


def _all_gather_rows(ids: torch.Tensor, rows: torch.Tensor, group,
                     comm: CommCounter) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every rank's ``(ids, rows)`` of ``group``, concatenated in rank order (variable sizes)."""
    size = dist.get_world_size(group)
    n = torch.tensor([ids.numel()], dtype=torch.int64, device=ids.device)
    counts = [torch.empty_like(n) for _ in range(size)]
    dist.all_gather(counts, n, group=group)
    counts = [int(c) for c in counts]
    m = max(counts)
    pad_ids = torch.cat([ids, ids.new_zeros(m - ids.numel())])
    pad_rows = torch.cat([rows, rows.new_zeros(m - rows.shape[0], rows.shape[1])])
    all_ids = [torch.empty_like(pad_ids) for _ in range(size)]
    all_rows = [torch.empty_like(pad_rows) for _ in range(size)]
    dist.all_gather(all_ids, pad_ids, group=group)
    dist.all_gather(all_rows, pad_rows, group=group)
    comm.all_gather([pad_ids, pad_rows], size)
    return (torch.cat([t[:c] for t, c in zip(all_ids, counts)]),
            torch.cat([t[:c] for t, c in zip(all_rows, counts)]))


def _shard_index_of_every_rank(p: Placement) -> List[int]:
    return [p.of_rank(r).index for r in range(p.world_size)]


def _node_replicas(placement: Placement, rank: int, local_world_size: int) -> List[int]:
    """The ranks of ``rank``'s node (``local_world_size`` consecutive ranks) holding its shard."""
    n, index = max(local_world_size, 1), _shard_index_of_every_rank(placement)
    node = range((rank // n) * n, min((rank // n + 1) * n, placement.world_size))
    return [r for r in node if index[r] == placement.index]


def _any_node_replicas(placement: Placement, local_world_size: int) -> bool:
    """Whether any node of the job has two ranks holding the same shard (the same on every rank)."""
    n, index = max(local_world_size, 1), _shard_index_of_every_rank(placement)
    return any(len(set(index[f:f + n])) < len(index[f:f + n]) for f in range(0, placement.world_size, n))


class TableStore:
    """Every Engram layer's shard on this rank, and the collective steps that train them.

    ``placement`` says which rows this rank holds; ``tp_group`` / ``replica_group``
    / ``world_group`` are the process groups the exchanges and reductions use
    (``from_parallel_state`` takes megatron's).  ``lr_mult`` and
    ``weight_decay`` are the paper's table policy (5x, 0).
    """

    def __init__(self, specs: Dict[int, TableSpec], placement: Placement, *, optimizer: str = "adam",
                 lr_mult: float = 5.0, weight_decay: float = 0.0, betas=(0.9, 0.95), eps: float = 1e-8,
                 init_std: float = 0.02, seed: int = 0, device=None, tp_group=None, replica_group=None,
                 world_group=None, dp_size: int = 1, residency: str = "device", staleness: int = 0,
                 host_dir: Optional[str] = None, rank: int = 0, local_world_size: int = 1,
                 kernel_backend: str = "auto"):
        self.specs = dict(sorted(specs.items()))
        self.placement = placement
        self.optimizer_name = optimizer
        self.lr_mult = float(lr_mult)
        self.dp_size = int(dp_size)
        self.replica_group = replica_group
        self.tp_group = tp_group
        self.world_group = world_group
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.residency = residency
        # Where rows and optimizer state live: the compute device, or host RAM.
        self.rows_device = torch.device("cpu") if residency == "host" else self.device
        self.host_dir = host_dir
        self.rank = rank
        self.node = rank // max(local_world_size, 1)
        # Ranks of one node that hold the same shard (replicas) map one set of files: one copy per node.
        # The lowest of them initializes and updates it; a barrier orders the others after it.
        sharers = _node_replicas(placement, rank, local_world_size) if host_dir is not None else [rank]
        self.shared = len(sharers) > 1
        self.owner = rank == min(sharers)
        self._sync = host_dir is not None and _any_node_replicas(placement, local_world_size)
        if host_dir is not None:
            os.makedirs(host_dir, exist_ok=True)
        if self._sync and not self.owner:
            dist.barrier()                  # the owner has created and initialized the files
        # Host tables under `all` plan their requests on the prefetch thread, over a gloo group of their own.
        self.plan_group = None
        if residency == "host" and placement.partition == "all" and placement.parts > 1:
            self.plan_group = dist.new_group(dist.get_process_group_ranks(world_group), backend="gloo")
        self.shards: Dict[int, TableShard] = {}
        self.tables: Dict[int, StoreTable] = {}
        self._grad_sq_norm: Optional[torch.Tensor] = None
        self.comm = CommCounter()   # bytes sent by the gradient reduction (lookups count in each exchange)
        for layer_id, spec in self.specs.items():
            lo, hi = placement.rows_of(spec)
            alloc = self._allocator(layer_id, lo, hi)
            weight = alloc("weight", (hi - lo, spec.embed_dim), torch.float32)
            if self.owner:
                init_rows(spec, lo, hi, init_std, seed, out=weight)
            shard = TableShard(spec, lo, hi, weight, self._exchange(spec), compute_device=self.device)
            shard.optimizer = build_table_optimizer(optimizer, weight, betas=betas, eps=eps,
                                                    weight_decay=weight_decay, alloc=alloc)
            shard.kernel_backend = shard.optimizer.kernel_backend = kernel_backend
            self.shards[layer_id] = shard
            self.tables[layer_id] = StoreTable(shard)
        if self._sync and self.owner:
            dist.barrier()
        self.prefetcher = None
        if residency == "host":
            from engram_train.memory.host import HostPrefetcher

            self.prefetcher = HostPrefetcher(self, staleness=staleness)
            for table in self.tables.values():
                table.prefetcher = self.prefetcher

    def _allocator(self, layer_id: int, lo: int, hi: int):
        """``alloc(name, shape, dtype)`` of one shard's tensors: zeroed, where the rows live.

        With ``host_dir`` each tensor is a memory-mapped file (``torch.from_file``, shared: writes go
        to the file), named by rank (or by node, for replicas of one node that share it), layer and
        row range, so the OS pages tables larger than RAM.
        """
        who = f"node{self.node:05d}" if self.shared else f"rank{self.rank:05d}"

        def alloc(name, shape, dtype):
            if self.host_dir is None or torch.Size(shape).numel() == 0:
                return torch.zeros(shape, dtype=dtype, device=self.rows_device)
            path = os.path.join(self.host_dir, f"{who}_layer{layer_id}_rows{lo}-{hi}_{name}.bin")
            if self.owner and os.path.exists(path):
                os.remove(path)    # a previous run's file: start from a fresh (sparse, zero) one
            numel = int(torch.Size(shape).numel())
            return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)
        return alloc

    def _exchange(self, spec: TableSpec):
        p = self.placement.partition
        if p == "replicated":
            return ReplicatedExchange()
        if p == "tp":
            return TPExchange(self.tp_group)
        return AllExchange(self.world_group, shard_bounds(spec.rows, self.placement.parts), self.placement.dims,
                           plan_group=self.plan_group)

    # -- the model's side -------------------------------------------------------------------------
    def table(self, layer_id: int, table_sizes: Sequence[int], embed_dim: int) -> StoreTable:
        """The table module of Engram layer ``layer_id`` (the layer spec's ``table_provider``)."""
        spec = self.specs.get(layer_id)
        if spec is None:
            raise ConfigError(f"engram.layer_ids: layer {layer_id} has no table in the store "
                              f"(it holds layers {sorted(self.specs)}); build both from the same config")
        if tuple(table_sizes) != spec.table_sizes or embed_dim != spec.embed_dim:
            raise ConfigError(f"Engram layer {layer_id}: the block wants table sizes {list(table_sizes)} x "
                              f"{embed_dim} but the store holds {list(spec.table_sizes)} x {spec.embed_dim}; "
                              "build both from the same hasher and engram config")
        return self.tables[layer_id]

    # -- the trainer's side -----------------------------------------------------------------------
    @torch.no_grad()
    def reduce_gradients(self) -> torch.Tensor:
        """Finish this step's table gradients (collective); returns and keeps the global squared norm."""
        sq = []
        for shard in self.shards.values():
            ids, rows = shard.take_pending()
            if self.replica_group is not None and dist.get_world_size(self.replica_group) > 1:
                ids, rows = _all_gather_rows(ids, rows, self.replica_group, self.comm)
            # The reduction's one dispatch point: Triton's deterministic segment sum (no float atomics) for
            # CUDA rows under "auto"; unique_rows + sum_rows (index_add_) on the CPU.
            uniq, rows = reduce_row_grads(ids, rows, backend=shard.kernel_backend)
            if self.dp_size > 1:
                rows.div_(self.dp_size)
            shard.grad = (uniq, rows)
            sq.append(rows.double().pow(2).sum())
        total = torch.stack(sq).sum() if sq else torch.zeros((), dtype=torch.float64)
        total = total.to(self.device)
        group = {"tp": self.tp_group, "all": self.world_group}.get(self.placement.partition)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(total, group=group)
        self._grad_sq_norm = total
        return total

    @torch.no_grad()
    def step(self, lr: float, grad_scale: float = 1.0, drop: bool = False) -> None:
        """Apply the table optimizer at ``lr * lr_mult`` to the reduced gradients times ``grad_scale``
        (the global norm's clip coefficient), or, with ``drop``, discard them: a step whose global norm is
        non-finite updates neither the dense parameters nor the tables (``engram_train.train.optimizers``).
        """
        if self._grad_sq_norm is None:
            raise RuntimeError("TableStore.step() before reduce_gradients()")
        if drop:
            self.zero_grad()
            return
        work, updated = [], {}
        for layer_id, shard in self.shards.items():
            ids, rows = shard.grad
            if grad_scale != 1.0:
                rows = rows * grad_scale
            ids, rows = ids.to(shard.weight.device), rows.to(shard.weight.device)
            work.append((shard.optimizer, ids, rows))
            updated[layer_id] = ids
        self.zero_grad()

        def apply():
            for optimizer, ids, rows in work:
                optimizer.step(ids, rows, lr * self.lr_mult)

        if self.prefetcher is not None and not self._sync:
            # Host tables: the step runs on the prefetch worker, overlapped with the trainer (host.py).
            self.prefetcher.wait_updates()
            self.prefetcher.submit_update(apply, updated)
            return
        if self.owner:   # replicas sharing the node's copy hold the same reduced rows: one update
            apply()
        if self._sync:
            dist.barrier()   # every shared copy is updated before anyone re-reads rows from it
        if self.prefetcher is not None:
            self.prefetcher.refresh(updated)

    def wait_updates(self) -> None:
        """Block until every table step has been applied (host tables step on a worker thread)."""
        if self.prefetcher is not None:
            self.prefetcher.wait_updates()

    def zero_grad(self) -> None:
        for shard in self.shards.values():
            shard._pending = []
            shard.grad = None
        self._grad_sq_norm = None

    # -- checkpoints (a DCP ``Stateful``) ---------------------------------------------------------
    def state_dict(self) -> Dict[str, object]:
        """Every table tensor as a ``DTensor`` of its global shape over this rank's rows (the store's own
        memory, so ``dcp.load`` fills it in place), and the optimizers' scalars; the format:
        :mod:`engram_train.memory.checkpoint`."""
        from engram_train.memory import checkpoint

        return checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: Dict[str, object]) -> None:
        from engram_train.memory import checkpoint

        checkpoint.load_state_dict(self, state_dict)

    # -- introspection ----------------------------------------------------------------------------
    def num_parameters(self) -> Dict[str, int]:
        """Table parameters held here and in the whole table (``local``, ``global``)."""
        return {"local": sum(s.weight.numel() for s in self.shards.values()),
                "global": sum(s.spec.numel for s in self.shards.values())}

    def sent_bytes(self) -> int:
        """Bytes this rank has sent for the tables so far: lookups, gradient returns and reductions."""
        return self.comm.sent_bytes + sum(s.exchange.comm.sent_bytes for s in self.shards.values())

    def memory_bytes(self) -> Dict[str, int]:
        """Bytes this rank holds: table ``weight``, ``optimizer`` state, last step's sparse ``grad`` rows."""
        w = sum(s.weight.numel() * s.weight.element_size() for s in self.shards.values())
        o = sum(s.optimizer.nbytes() for s in self.shards.values())
        g = 0
        for s in self.shards.values():
            for ids, rows in ([s.grad] if s.grad is not None else []) + s._pending:
                g += ids.numel() * ids.element_size() + rows.numel() * rows.element_size()
        return {"weight": w, "optimizer": o, "grad": g}


def build_table_store(engram_cfg, trainer_cfg, table_sizes: Dict[int, Sequence[int]], partition: str,
                      seed: int) -> TableStore:
    """The store of a training run, on megatron's process groups (needs ``init_parallel`` first)."""
    from megatron.core import parallel_state as ps

    from engram_train.platform.device import get_device

    specs = table_specs(table_sizes, engram_cfg.n_embed_per_ngram, engram_cfg.heads_per_ngram)
    world, rank = dist.get_world_size(), dist.get_rank()
    tp_size, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    placement = placement_for(partition, world, rank, tp_size, tp_rank)
    if engram_cfg.keys == "latent":   # Lngram: row width from its config; shards checked against the rank
        from engram_train.lngram import build as lngram

        specs = lngram.table_specs(engram_cfg)
        lngram.check_shards_fit(specs, placement, engram_cfg, get_device())
    store = TableStore(
        specs, placement, optimizer=engram_cfg.optimizer, lr_mult=engram_cfg.table_lr_mult,
        weight_decay=engram_cfg.table_weight_decay, betas=(trainer_cfg.adam_beta1, trainer_cfg.adam_beta2),
        eps=trainer_cfg.adam_eps, init_std=engram_cfg.table_init_std, seed=seed, device=get_device(),
        residency=engram_cfg.residency, staleness=engram_cfg.staleness, host_dir=engram_cfg.host_dir, rank=rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        tp_group=ps.get_tensor_model_parallel_group(),
        replica_group=None if placement.partition == "all" else ps.get_data_parallel_group(),
        world_group=dist.group.WORLD, dp_size=ps.get_data_parallel_world_size(),
        kernel_backend=engram_cfg.kernel_backend)
    return store
