"""Where the rows of each Engram table live: pure arithmetic, no process groups, no tensors.

A layer's table is one array of ``rows = sum(table_sizes)`` rows of width
``embed_dim`` (all heads, head ``j`` at ``offsets[j]``, as in
:class:`engram_train.engram.table.MultiHeadEmbeddingTable`).  A *placement*
cuts it into ``parts`` contiguous row ranges and gives this process range
``index``:

==============  =========  ===================  ==================================================
partition       parts      index                replicas of a shard (they average gradients)
==============  =========  ===================  ==================================================
``replicated``  1          0                    the data-parallel group (every rank of a TP group
                                                holds the same table and sees the same tokens)
``tp``          TP         tensor-parallel rank the data-parallel group
``all``         world      global rank          none: every shard has one owner
==============  =========  ===================  ==================================================

Ranges follow ``torch.chunk``: ``ceil(rows / parts)`` rows each, the last ones
shorter or empty.  Prime table sizes never divide evenly, so uneven shards are
the normal case.  It is also ``DTensor``'s rule for an uneven ``Shard(0)``
(``Shard.local_shard_size_and_offset``, the oracle of
``tests/unit/test_table_store.py``), which lets checkpoints describe a shard by
its placement alone (:mod:`engram_train.memory.checkpoint`).  :func:`row_range`
is the rule's one home; :class:`RowRange` is a shard's rows as everything else
uses them (the shard's ``lo``/``hi``, the exchange's owner bounds, local and
global row ids).  docs/tables.md says why the shards are not DTensors.

This module is imported by the sizing tool (``tools/plan_memory.py``), so it
must never allocate or touch ``torch.distributed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from engram_train.config.schema import PARTITIONS, ConfigError

#: Optimizer state of each table optimizer: (bytes per table parameter, bytes per row).
#: ``adam``: two fp32 moments; ``sparse_adam``: the same and an int32 step per row;
#: ``sparse_adam_rowwise``: an fp32 first moment, one fp32 second moment and an int32 step per row.
OPTIMIZER_STATE_BYTES = {"adam": (8, 0), "sparse_adam": (8, 4), "sparse_adam_rowwise": (4, 8)}


@dataclass(frozen=True)
class TableSpec:
    """One Engram layer's table, globally: head sizes (primes) and row width."""

    layer_id: int
    table_sizes: Tuple[int, ...]
    embed_dim: int

    @property
    def rows(self) -> int:
        return sum(self.table_sizes)

    @property
    def num_heads(self) -> int:
        return len(self.table_sizes)

    @property
    def offsets(self) -> List[int]:
        out = [0]
        for s in self.table_sizes[:-1]:
            out.append(out[-1] + s)
        return out

    @property
    def numel(self) -> int:
        return self.rows * self.embed_dim


def table_specs(table_sizes: Dict[int, Sequence[int]], n_embed_per_ngram: int,
                heads_per_ngram: int) -> Dict[int, TableSpec]:
    """``{layer_id: TableSpec}`` from the hasher's ``table_sizes`` and the Engram config."""
    dim = n_embed_per_ngram // heads_per_ngram
    return {l: TableSpec(int(l), tuple(int(s) for s in sizes), dim) for l, sizes in table_sizes.items()}


def row_range(rows: int, parts: int, index: int) -> Tuple[int, int]:
    """``[lo, hi)`` of shard ``index`` of ``parts`` (``torch.chunk`` sizes; may be empty)."""
    if not 0 <= index < parts:
        raise ValueError(f"shard index {index} out of range for {parts} parts")
    chunk = -(-rows // parts)
    lo = min(index * chunk, rows)
    return lo, min(lo + chunk, rows)


def shard_bounds(rows: int, parts: int) -> List[int]:
    """``[lo_0, lo_1, ..., lo_{parts-1}, rows]``: shard ``i`` is ``[b[i], b[i+1])``."""
    return [row_range(rows, parts, i)[0] for i in range(parts)] + [rows]


@dataclass(frozen=True)
class RowRange:
    """Shard ``index`` of ``parts`` of a table of ``rows`` rows: rows ``[lo, hi)`` (:func:`row_range`)."""

    rows: int
    parts: int
    index: int

    @property
    def lo(self) -> int:
        return row_range(self.rows, self.parts, self.index)[0]

    @property
    def hi(self) -> int:
        return row_range(self.rows, self.parts, self.index)[1]

    @property
    def num_rows(self) -> int:
        return self.hi - self.lo

    def bounds(self) -> List[int]:
        """Every shard's first row and ``rows``: shard ``i`` of the same split is ``[b[i], b[i+1])``."""
        return shard_bounds(self.rows, self.parts)


@dataclass(frozen=True)
class Placement:
    """This process's place in a partition: ``parts`` shards, it holds shard ``index``."""

    partition: str       # "replicated" | "tp" | "all"
    parts: int
    index: int
    tp_size: int
    tp_rank: int
    world_size: int

    def shard_of(self, spec: TableSpec) -> RowRange:
        """This process's rows of ``spec``'s table."""
        return RowRange(spec.rows, self.parts, self.index)

    def rows_of(self, spec: TableSpec) -> Tuple[int, int]:
        """``(lo, hi)`` of :meth:`shard_of` (sizing arithmetic)."""
        r = self.shard_of(spec)
        return r.lo, r.hi

    @property
    def dims(self):
        """The job's layout (which ranks are adjacent): ``engram_train.parallel.dims``."""
        from engram_train.parallel.dims import ParallelDims

        return ParallelDims(self.world_size, self.tp_size)

    def of_rank(self, rank: int) -> "Placement":
        """The placement of another rank of the same job."""
        return placement_for(self.partition, self.world_size, rank, self.tp_size, self.dims.tp_rank_of(rank))


def resolve_partition(partition: str, tensor_parallel: int) -> str:
    """``engram.partition`` with ``auto`` resolved: ``tp`` under tensor parallelism, else ``replicated``."""
    if partition == "auto":
        return "tp" if tensor_parallel > 1 else "replicated"
    if partition not in PARTITIONS:
        raise ConfigError(f"engram.partition={partition!r}: choose 'auto', 'replicated', 'tp' or 'all'")
    return partition


def placement_for(partition: str, world_size: int, rank: int, tp_size: int, tp_rank: int) -> Placement:
    """The placement of global rank ``rank``, whose TP rank is ``tp_rank``."""
    partition = resolve_partition(partition, tp_size)
    if partition == "replicated":
        parts, index = 1, 0
    elif partition == "tp":
        parts, index = tp_size, tp_rank
    else:
        parts, index = world_size, rank
    return Placement(partition, parts, index, tp_size, tp_rank, world_size)


def shard_bytes(spec: TableSpec, placement: Placement, optimizer: str) -> Dict[str, int]:
    """Bytes this placement's shard holds: ``weight``, ``optimizer`` state and the worst-case ``grad`` rows.

    Gradients are sparse: at most every row of the shard is touched in a step.
    """
    lo, hi = placement.rows_of(spec)
    n = (hi - lo) * spec.embed_dim
    per_param, per_row = OPTIMIZER_STATE_BYTES[optimizer]
    state = per_param * n + per_row * (hi - lo)
    return {"weight": 4 * n, "optimizer": state, "grad_max": 4 * n + 8 * (hi - lo)}
