"""The home of Engram tables: where their rows live, how lookups reach them, how they train.

- ``layout``: placements (``engram.partition``: replicated, tp, all) as row ranges; sizing arithmetic.
- ``shard``: one layer's :class:`TableShard` (its rows and pending sparse gradients) and
  :class:`StoreTable`, the table module the store supplies to each Engram block.
- ``store``: :class:`TableStore`, the owner of every table shard, its sparse gradients and its
  optimizer, built from ``StoreOptions`` and ``StoreGroups``.
- ``exchange``: how a lookup reaches rows of other ranks (all-reduce under TP, all-to-all over all ranks).
- ``host``: host-resident rows: the prefetch stage of the data pipeline (rows travel with their
  batch) and the worker thread that gathers them and runs the host table step.
- ``optim``: the table optimizers ``adam`` and ``sparse_adam``.
- ``checkpoint``: sharded, reshardable table checkpoints (torch.distributed.checkpoint).

The model never imports this package: ``engram_train.parallel.parallelize`` builds the store and
passes ``store.table`` to the model's layer spec.  docs/tables.md explains the design.
"""
