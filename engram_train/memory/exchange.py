"""How a lookup reaches rows that live elsewhere, one class per partition.

Each exchange has two halves, called by the lookup's autograd function:

``gather(shard, ids) -> (rows [N, d], ctx)``
    ``ids`` are global row ids (``hash id + head offset``) of this rank's
    tokens.  Collective for ``tp`` and ``all``: every rank of the group calls
    it for the same layer in the same order (each Engram layer's forward).
``scatter_grad(shard, ctx, grad [N, d])``
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

from typing import List, Tuple

import torch
import torch.distributed as dist


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


def unique_rows(ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique ids and the inverse index (``ids == uniq[inv]``)."""
    return torch.unique(ids, sorted=True, return_inverse=True)


def sum_rows(inv: torch.Tensor, grad: torch.Tensor, num_unique: int) -> torch.Tensor:
    """``out[u] = sum of grad[i] with inv[i] == u`` (fixed order: deterministic)."""
    out = grad.new_zeros(num_unique, grad.shape[-1])
    return out.index_add_(0, inv, grad)


class ReplicatedExchange:
    def __init__(self):
        self.comm = CommCounter()

    def gather(self, shard, ids):
        return shard.read_rows(ids - shard.lo), ids

    def scatter_grad(self, shard, ids, grad):
        uniq, inv = unique_rows(ids)
        shard.accumulate(uniq - shard.lo, sum_rows(inv, grad, uniq.numel()))


class TPExchange:
    def __init__(self, tp_group):
        self.group = tp_group
        self.size = dist.get_world_size(tp_group)
        self.comm = CommCounter()

    def gather(self, shard, ids):
        uniq, inv = unique_rows(ids)
        local = uniq - shard.lo
        own = (local >= 0) & (local < shard.num_rows)
        rows = torch.zeros(uniq.numel(), shard.embed_dim, dtype=shard.weight.dtype, device=shard.compute_device)
        local_own = local[own]
        rows[own] = shard.read_rows(local_own)
        dist.all_reduce(rows, group=self.group)
        self.comm.all_reduce(rows, self.size)
        return rows.index_select(0, inv), (inv, uniq.numel(), local_own, own)

    def scatter_grad(self, shard, ctx, grad):
        inv, num_unique, local_own, own = ctx
        shard.accumulate(local_own, sum_rows(inv, grad, num_unique)[own])


class AllExchange:
    def __init__(self, world_group, bounds, tp_size: int, tp_rank: int, device=None):
        self.group = world_group
        self.world = dist.get_world_size(world_group)
        self.rank = dist.get_rank(world_group)
        self.comm = CommCounter()
        # bounds[i] = first row of shard i (shard i of `world` is owned by global rank i).
        self.upper = torch.tensor(bounds[1:-1], dtype=torch.int64, device=device)
        self.tp_rank = tp_rank
        # Ranks whose gradient rows count: TP rank 0 of every TP group (megatron: TP ranks adjacent).
        self.grad_senders = [r % tp_size == 0 for r in range(self.world)]
        self.grad_senders_t = torch.tensor(self.grad_senders, device=device)

    def _counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        recv = torch.empty_like(send_counts)
        dist.all_to_all_single(recv, send_counts, group=self.group)
        return recv

    def gather(self, shard, ids):
        uniq, inv = unique_rows(ids)
        owner = torch.searchsorted(self.upper, uniq, right=True)
        send_counts = torch.bincount(owner, minlength=self.world)
        recv_counts = self._counts(send_counts)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        requested = uniq.new_empty(sum(recv))
        dist.all_to_all_single(requested, uniq, recv, send, group=self.group)
        local = requested - shard.lo
        rows = torch.empty(uniq.numel(), shard.embed_dim, dtype=shard.weight.dtype, device=shard.compute_device)
        served = shard.read_rows(local)
        dist.all_to_all_single(rows, served, send, recv, group=self.group)
        self.comm.all_to_all(uniq, send, self.rank)
        self.comm.all_to_all(served, recv, self.rank)
        return rows.index_select(0, inv), (inv, uniq.numel(), send, recv, recv_counts, local)

    def scatter_grad(self, shard, ctx, grad):
        inv, num_unique, send, recv_fwd, recv_counts, local = ctx
        if self.tp_rank == 0:
            rows = sum_rows(inv, grad, num_unique)
        else:
            rows = grad.new_empty(0, shard.embed_dim)
            send = [0] * self.world
        recv = [c if sender else 0 for c, sender in zip(recv_fwd, self.grad_senders)]
        received = grad.new_empty(sum(recv), shard.embed_dim)
        dist.all_to_all_single(received, rows.contiguous(), recv, send, group=self.group)
        self.comm.all_to_all(rows, send, self.rank)
        from_senders = torch.repeat_interleave(self.grad_senders_t, recv_counts)
        shard.accumulate(local[from_senders], received)
