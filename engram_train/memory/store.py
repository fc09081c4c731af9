"""The table store: owner of every Engram table's rows, their gradients and their optimizer.

One :class:`~engram_train.memory.shard.TableShard` per Engram layer holds this
rank's contiguous row range (:mod:`engram_train.memory.layout`) as a plain fp32
tensor: not an ``nn.Parameter``, so DeepSpeed never sees, broadcasts, reduces or
checkpoints it.  The model gets a :class:`~engram_train.memory.shard.StoreTable`
per layer through its layer spec (``build_model(table_provider=store.table)``);
the Engram block calls it like its own table: ``table(hash_ids [..., heads]) ->
[..., heads * embed_dim]``.  The store is built from :class:`StoreOptions` (how
tables are kept and trained) and :class:`StoreGroups` (the process groups).

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
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from engram_train.config.schema import ConfigError
from engram_train.kernels import reduce_row_grads
from engram_train.memory.exchange import AllExchange, CommCounter, ReplicatedExchange, TPExchange
from engram_train.memory.layout import Placement, RowRange, TableSpec, placement_for, table_specs
from engram_train.memory.optim import TableSparseAdam, build_table_optimizer
from engram_train.memory.shard import StoreTable, TableShard, init_rows

__all__ = ["StoreGroups", "StoreOptions", "StoreTable", "TableShard", "TableStore", "build_table_store", "init_rows"]

log = logging.getLogger(__name__)

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


def cores_left_to_rank(local_world_size: int) -> int:
    """``engram.host_threads=null``: the cores this process may run on, shared by the ranks of its node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:   # no affinity on this platform
        cores = os.cpu_count() or 1
    return max(1, cores // max(int(local_world_size), 1))


@dataclass(frozen=True)
class StoreOptions:
    """How the store keeps and trains its tables: the validated ``engram`` / ``trainer`` settings
    (``engram_train.config.schema`` checks them where they enter; :meth:`from_config`).

    ``lr_mult`` and ``weight_decay`` are the paper's table policy (5x, 0); ``residency`` says where
    rows live (``device`` or ``host``; ``host_dir``: memory-mapped files), ``staleness`` whether host
    rows may be read one step stale (docs/tables.md).
    """

    optimizer: str = "adam"
    lr_mult: float = 5.0
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    init_std: float = 0.02
    seed: int = 0
    residency: str = "device"
    staleness: int = 0
    host_dir: Optional[str] = None
    kernel_backend: str = "auto"
    host_threads: Optional[int] = None   # host table step threads; None: cores_left_to_rank

    @classmethod
    def from_config(cls, engram_cfg, trainer_cfg, seed: int) -> "StoreOptions":
        return cls(optimizer=engram_cfg.optimizer, lr_mult=float(engram_cfg.table_lr_mult),
                   weight_decay=engram_cfg.table_weight_decay,
                   betas=(trainer_cfg.adam_beta1, trainer_cfg.adam_beta2), eps=trainer_cfg.adam_eps,
                   init_std=engram_cfg.table_init_std, seed=seed, residency=engram_cfg.residency,
                   staleness=engram_cfg.staleness, host_dir=engram_cfg.host_dir,
                   kernel_backend=engram_cfg.kernel_backend, host_threads=engram_cfg.host_threads)


@dataclass(frozen=True)
class StoreGroups:
    """Where this rank stands: the process groups the exchanges and reductions use, the data-parallel
    size gradients are averaged over, and its rank and node size (replicas of one node may share
    one copy of host tables).  One process: the defaults.  :meth:`from_parallel_state` takes megatron's."""

    tp_group: Any = None
    replica_group: Any = None
    world_group: Any = None
    dp_size: int = 1
    rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_parallel_state(cls, placement: Placement) -> "StoreGroups":
        from megatron.core import parallel_state as ps

        return cls(tp_group=ps.get_tensor_model_parallel_group(),
                   replica_group=None if placement.partition == "all" else ps.get_data_parallel_group(),
                   world_group=dist.group.WORLD, dp_size=ps.get_data_parallel_world_size(), rank=dist.get_rank(),
                   local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


class TableStore:
    """Every Engram layer's shard on this rank, and the collective steps that train them.

    ``placement`` says which rows this rank holds (:mod:`engram_train.memory.layout`), ``options``
    how they are kept and trained, ``groups`` the process groups the exchanges and reductions use.
    """

    def __init__(self, specs: Dict[int, TableSpec], placement: Placement, options: StoreOptions = StoreOptions(),
                 groups: StoreGroups = StoreGroups(), device=None):
        o, g = options, groups
        self.specs = dict(sorted(specs.items()))
        self.placement = placement
        self.options = options
        self.optimizer_name = o.optimizer
        self.lr_mult = float(o.lr_mult)
        self.dp_size = int(g.dp_size)
        self.replica_group = g.replica_group
        self.tp_group = g.tp_group
        self.world_group = g.world_group
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.residency = o.residency
        # Where rows and optimizer state live: the compute device, or host RAM.
        self.rows_device = torch.device("cpu") if o.residency == "host" else self.device
        self.host_dir = o.host_dir
        self.rank = g.rank
        self.node = g.rank // max(g.local_world_size, 1)
        # Ranks of one node that hold the same shard (replicas) map one set of files: one copy per node.
        # The lowest of them initializes and updates it; a barrier orders the others after it.
        sharers = _node_replicas(placement, g.rank, g.local_world_size) if o.host_dir is not None else [g.rank]
        self.shared = len(sharers) > 1
        self.owner = g.rank == min(sharers)
        self._sync = o.host_dir is not None and _any_node_replicas(placement, g.local_world_size)
        if o.host_dir is not None:
            os.makedirs(o.host_dir, exist_ok=True)
        if self._sync and not self.owner:
            dist.barrier()                  # the owner has created and initialized the files
        # Host tables under `all` plan their requests on the prefetch thread, over a gloo group of their own.
        self.plan_group = None
        if o.residency == "host" and placement.partition == "all" and placement.parts > 1:
            self.plan_group = dist.new_group(dist.get_process_group_ranks(g.world_group), backend="gloo")
        self.shards: Dict[int, TableShard] = {}
        self.tables: Dict[int, StoreTable] = {}
        self._grad_sq_norm: Optional[torch.Tensor] = None
        self.comm = CommCounter()   # bytes sent by the gradient reduction (lookups count in each exchange)
        for layer_id, spec in self.specs.items():
            rows = placement.shard_of(spec)
            alloc = self._allocator(layer_id, rows.lo, rows.hi)
            weight = alloc("weight", (rows.num_rows, spec.embed_dim), torch.float32)
            if self.owner:
                init_rows(spec, rows.lo, rows.hi, o.init_std, o.seed, out=weight)
            shard = TableShard(spec, rows.lo, rows.hi, weight, self._exchange(rows), compute_device=self.device)
            shard.optimizer = build_table_optimizer(o.optimizer, weight, betas=o.betas, eps=o.eps,
                                                    weight_decay=o.weight_decay, alloc=alloc)
            shard.kernel_backend = shard.optimizer.kernel_backend = o.kernel_backend
            self.shards[layer_id] = shard
            self.tables[layer_id] = StoreTable(shard)
        if self._sync and self.owner:
            dist.barrier()
        self.prefetcher = None
        if o.residency == "host":
            from engram_train.memory.host import HostPrefetcher

            threads = o.host_threads if o.host_threads is not None else cores_left_to_rank(g.local_world_size)
            self.prefetcher = HostPrefetcher(self, staleness=o.staleness, host_threads=threads)
            for table in self.tables.values():
                table.prefetcher = self.prefetcher
            for shard in self.shards.values():
                if isinstance(shard.optimizer, TableSparseAdam):
                    shard.optimizer.host_blocks, shard.optimizer.pool = True, self.prefetcher.step_pool

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

    def _exchange(self, rows: RowRange):
        p = self.placement.partition
        if p == "replicated":
            return ReplicatedExchange()
        if p == "tp":
            return TPExchange(self.tp_group)
        return AllExchange(self.world_group, rows.bounds(), self.placement.dims, plan_group=self.plan_group)

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
    store = TableStore(specs, placement, StoreOptions.from_config(engram_cfg, trainer_cfg, seed),
                       StoreGroups.from_parallel_state(placement), device=get_device())
    return store
