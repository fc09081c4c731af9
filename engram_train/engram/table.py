"""Multi-head Engram embedding table (docs/engram.md §1.5).

All heads of one Engram layer share one weight of ``sum(table_sizes)`` rows;
head ``j`` owns rows ``offsets[j] : offsets[j] + table_sizes[j]`` and its hash
id ``i`` reads row ``offsets[j] + i``.  A lookup returns the heads' rows
concatenated, ``[..., heads * embed_dim]``.

The table is its own module so that ``memory/`` can partition it, or keep it in
host RAM and hand the block ready-made rows (``EngramBlock.fuse``), without the
block knowing.  ``weight.engram_table = True`` marks it for the optimizer's own
parameter group (``engram.params``).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class HashIdOutOfRangeError(ValueError):
    """Hash ids that address no row of their head's table (hashed for other table sizes)."""


def check_hash_ids(hash_ids: torch.Tensor, sizes: torch.Tensor, table_sizes: Sequence[int]) -> None:
    """Raise :class:`HashIdOutOfRangeError` unless ``hash_ids [..., heads]`` address rows of their heads.

    ``sizes`` is ``table_sizes`` as a tensor on the ids' device.  Costs one
    min/max pass over the ids (and a device sync on GPU): training runs it once per micro-batch on
    the CPU, where the loader makes the ids (``data.loader.Collate``).
    """
    heads = len(table_sizes)
    if hash_ids.shape[-1] != heads:
        raise HashIdOutOfRangeError(
            f"hash_ids: last dimension is {hash_ids.shape[-1]} but the table has {heads} heads; "
            f"pass the hasher's ids of this layer, shape [..., (max_ngram-1)*heads_per_ngram]")
    if hash_ids.numel() == 0:
        return
    lo, hi = torch.aminmax(hash_ids.reshape(-1, heads), dim=0)
    bad = (lo < 0) | (hi >= sizes)
    if bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        raise HashIdOutOfRangeError(
            f"hash_ids: head {j} holds ids in [{int(lo[j])}, {int(hi[j])}] but its table has "
            f"{table_sizes[j]} rows (valid ids 0..{table_sizes[j] - 1}); build the table with "
            f"the same hasher's table_sizes[layer_id] that produced the ids")


class MultiHeadEmbeddingTable(nn.Module):
    # The range check costs one min/max pass over the ids (and a device sync on GPU); callers that
    # guarantee their ids may set this to False.  Training reads the table store's tables, whose ids
    # the loader checked on the CPU.
    check_ids: bool = True

    def __init__(self, table_sizes: Sequence[int], embed_dim: int, init_std: float = 1.0):
        super().__init__()
        table_sizes = [int(s) for s in table_sizes]
        # Invariants, not user input: the sizes are the hasher's primes, the width and the std come
        # through EngramBlock and the config, which check them (engram.table_init_std=0: rows start at 0).
        assert table_sizes and all(s >= 2 for s in table_sizes), table_sizes
        assert embed_dim >= 1 and init_std >= 0, (embed_dim, init_std)
        self.table_sizes: List[int] = table_sizes
        self.embed_dim = int(embed_dim)
        self.init_std = float(init_std)
        offsets = [0]
        for s in table_sizes[:-1]:
            offsets.append(offsets[-1] + s)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64), persistent=False)
        self.register_buffer("sizes", torch.tensor(table_sizes, dtype=torch.int64), persistent=False)
        self.weight = nn.Parameter(torch.empty(sum(table_sizes), self.embed_dim))
        self.weight.engram_table = True
        self.reset_parameters()

    @property
    def num_heads(self) -> int:
        return len(self.table_sizes)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)

    def forward(self, hash_ids: torch.Tensor) -> torch.Tensor:
        if self.check_ids:
            check_hash_ids(hash_ids, self.sizes, self.table_sizes)
        rows = F.embedding(hash_ids + self.offsets, self.weight)   # [..., heads, embed_dim]
        return rows.flatten(-2)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, rows={self.weight.shape[0]}, embed_dim={self.embed_dim}"
