"""How a lookup reaches rows that live elsewhere, one class per partition.

Each exchange has three parts, called by the lookup's autograd function:

``plan(shard, ids) -> (local, plan)``
    ``ids`` are global row ids (``hash id + head offset``) of this rank's
    tokens.  Returns the sorted unique local row ids this rank must read from
    its shard to serve the lookup (its own and, for ``all``, other ranks'
    requests) and the exchange's :class:`Plan` of the rest (a dataclass per
    exchange).  Collective for ``all``.
``finish(shard, plan, rows) -> (looked-up rows [N, d], plan)``
    From the rows read (``shard.read_rows(local)``) to the rows of ``ids``.
    Collective for ``tp`` and ``all``: every rank of the group calls it for the
    same layer in the same order (each Engram layer's forward).
    ``gather(shard, ids)`` is plan, read, finish in one go; host tables plan
    and read a micro-batch ahead on a worker thread (``memory/host.py``).
``scatter_grad(shard, plan, grad [N, d])``
    Turns the gradient of the looked-up rows into gradient rows of the
    *owning* shard, ``(local row ids, rows)``, and hands them to
    ``shard.accumulate``.  Duplicates are summed by ``index_add_`` in a fixed
    order (deterministic on CPU; on CUDA with
    ``torch.use_deterministic_algorithms``); nothing table-sized is built.

Exchanges, with the bytes they move per looked-up id (``d`` floats per row):

``ReplicatedExchange``  local ``index_select``; nothing moves.
``TPExchange``          rows partitioned over the TP group (vocab-parallel): the
                        ids of a TP group are the same on its ranks (the Engram
                        block runs on the full sequence, also under sequence
                        parallelism), so they are deduplicated, each rank fills
                        the rows it owns and one all-reduce of ``[U, d]``
                        completes them.  Backward needs no communication: every
                        TP rank holds the same output gradient.
``AllExchange``         rows partitioned over every rank: unique ids are sent to
                        their owners with a variable all-to-all, rows come back
                        the same way; in backward, the gradient rows travel the
                        reverse path, sent by TP rank 0 only (its TP peers hold
                        the same gradient, and sending it TP times would count
                        it TP times).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator, List, Tuple

import torch
import torch.distributed as dist

from engram_train.kernels.rows import sum_rows, unique_rows


class CommCounter:
    """Bytes this rank sends through collectives (ring all-reduce: ``2 (n-1)/n`` of the buffer;
    all-to-all: what goes to other ranks), for ``tools/bench_lookup.py``.  Plain integers, no sync."""

    def __init__(self):
        self.sent_bytes = 0

    def all_reduce(self, t: torch.Tensor, n: int) -> None:
        self.sent_bytes += int(2 * (n - 1) * t.numel() * t.element_size() // max(n, 1))

    def all_to_all(self, t: torch.Tensor, splits: List[int], rank: int) -> None:
        row = t.element_size() * torch.Size(t.shape[1:]).numel()
        self.sent_bytes += row * (sum(splits) - splits[rank])

    def all_gather(self, tensors: List[torch.Tensor], n: int) -> None:
        self.sent_bytes += (n - 1) * sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Plan:
    """What ``finish`` and ``scatter_grad`` need of one lookup: ``inv`` maps each looked-up id to its
    unique id (``num_unique`` of them).  Host tables move a plan to pinned memory and to the device
    (``map``) on the prefetch thread."""

    inv: torch.Tensor
    num_unique: int

    def tensors(self) -> Iterator[torch.Tensor]:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                yield v

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Plan":
        """The same plan with ``fn`` applied to each tensor."""
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


@dataclass
class ReplicatedPlan(Plan):
    local: torch.Tensor          # this shard's row of each unique id


@dataclass
class TPPlan(Plan):
    local_own: torch.Tensor      # local rows of the unique ids this TP rank owns
    own: torch.Tensor            # which unique ids this TP rank owns (bool)


@dataclass
class AllPlan(Plan):
    send: List[int]              # unique ids sent to each rank (its rows come back the same way)
    recv: List[int]              # ids received from each rank (rows served to it)
    recv_counts: torch.Tensor    # ``recv`` as a tensor
    local: torch.Tensor          # local row of each received request, in arrival order
    served_inv: torch.Tensor     # each request's row among the unique rows read


class Exchange:
    """A lookup in two halves, so that host tables can read their rows ahead (memory/host.py):

    ``plan(shard, ids) -> (local, plan)``: the sorted unique local row ids this rank must read
    from its shard for ``ids`` (collective for ``all``: requests go to their owners), and
    the :class:`Plan` of the rest; ``finish(shard, plan, rows)``: the looked-up rows from the
    rows read (collective for ``tp`` and ``all``) and the plan :meth:`scatter_grad` takes.
    """

    def __init__(self):
        self.comm = CommCounter()

    def gather(self, shard, ids):
        local, plan = self.plan(shard, ids)
        return self.finish(shard, plan, shard.read_rows(local))


class ReplicatedExchange(Exchange):
    def plan(self, shard, ids):
        uniq, inv = unique_rows(ids)
        local = uniq - shard.lo
        return local, ReplicatedPlan(inv, uniq.numel(), local)

    def finish(self, shard, plan: ReplicatedPlan, rows):
        return rows.index_select(0, plan.inv), plan

    def scatter_grad(self, shard, plan: ReplicatedPlan, grad):
        shard.accumulate(plan.local, sum_rows(plan.inv, grad, plan.num_unique))


class TPExchange(Exchange):
    def __init__(self, tp_group):
        super().__init__()
        self.group = tp_group
        self.size = dist.get_world_size(tp_group)

    def plan(self, shard, ids):
        uniq, inv = unique_rows(ids)
        local = uniq - shard.lo
        own = (local >= 0) & (local < shard.num_rows)
        local_own = local[own]
        return local_own, TPPlan(inv, uniq.numel(), local_own, own)

    def finish(self, shard, plan: TPPlan, rows_own):
        rows = torch.zeros(plan.num_unique, shard.embed_dim, dtype=shard.weight.dtype, device=shard.compute_device)
        rows[plan.own] = rows_own
        dist.all_reduce(rows, group=self.group)
        self.comm.all_reduce(rows, self.size)
        return rows.index_select(0, plan.inv), plan

    def scatter_grad(self, shard, plan: TPPlan, grad):
        shard.accumulate(plan.local_own, sum_rows(plan.inv, grad, plan.num_unique)[plan.own])


class AllExchange(Exchange):
    """``plan_group`` carries the id requests: the world group, or, for host tables whose requests
    are planned on the prefetch thread with CPU ids, a gloo group of its own (a group must not be
    driven from two threads, and NCCL does not carry CPU tensors)."""

    def __init__(self, world_group, bounds, dims, device=None, plan_group=None):
        super().__init__()
        self.group = world_group
        self.plan_group = plan_group if plan_group is not None else world_group
        self.world = dist.get_world_size(world_group)
        self.rank = dist.get_rank(world_group)
        # bounds[i] = first row of shard i (shard i of `world` is owned by global rank i).
        self._consts = {}
        self.upper_cpu = torch.tensor(bounds[1:-1], dtype=torch.int64)
        self.tp_rank = dims.tp_rank_of(self.rank)
        # Ranks whose gradient rows count: TP rank 0 of every TP group (``dims``: the job's layout).
        self.grad_senders = [dims.tp_rank_of(r) == 0 for r in range(self.world)]
        self.grad_senders_cpu = torch.tensor(self.grad_senders)

    def _on(self, t: torch.Tensor, device) -> torch.Tensor:
        """A constant of the exchange on ``device``, copied there once."""
        key = (id(t), str(device))
        if key not in self._consts:
            self._consts[key] = t.to(device)
        return self._consts[key]

    def plan(self, shard, ids):
        uniq, inv = unique_rows(ids)
        owner = torch.searchsorted(self._on(self.upper_cpu, uniq.device), uniq, right=True)
        send_counts = torch.bincount(owner, minlength=self.world)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.plan_group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        requested = uniq.new_empty(sum(recv))
        dist.all_to_all_single(requested, uniq, recv, send, group=self.plan_group)
        self.comm.all_to_all(uniq, send, self.rank)
        local = requested - shard.lo
        # Ranks often ask for the same rows: the owner reads each once.
        local_uniq, served_inv = unique_rows(local)
        return local_uniq, AllPlan(inv, uniq.numel(), send, recv, recv_counts, local, served_inv)

    def finish(self, shard, plan: AllPlan, rows_read):
        served = rows_read.index_select(0, plan.served_inv)
        rows = torch.empty(plan.num_unique, shard.embed_dim, dtype=shard.weight.dtype, device=shard.compute_device)
        dist.all_to_all_single(rows, served, plan.send, plan.recv, group=self.group)
        self.comm.all_to_all(served, plan.recv, self.rank)
        return rows.index_select(0, plan.inv), plan

    def scatter_grad(self, shard, plan: AllPlan, grad):
        send, recv_counts, local = plan.send, plan.recv_counts, plan.local
        if self.tp_rank == 0:
            rows = sum_rows(plan.inv, grad, plan.num_unique)
        else:
            rows = grad.new_empty(0, shard.embed_dim)
            send = [0] * self.world
        recv = [c if sender else 0 for c, sender in zip(plan.recv, self.grad_senders)]
        received = grad.new_empty(sum(recv), shard.embed_dim)
        dist.all_to_all_single(received, rows.contiguous(), recv, send, group=self.group)
        self.comm.all_to_all(rows, send, self.rank)
        from_senders = torch.repeat_interleave(self._on(self.grad_senders_cpu, recv_counts.device), recv_counts)
        shard.accumulate(local[from_senders], received)
