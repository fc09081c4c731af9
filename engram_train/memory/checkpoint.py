"""The table store's part of a checkpoint: each rank writes its own rows, any layout reads them back.

``TableStore.state_dict`` / ``load_state_dict`` (a DCP ``Stateful``, the ``tables``
component of ``engram_train.train.checkpoint``; keys under ``tables.``, and in the
``tables/`` directory of checkpoints of the earlier layout) and a human-readable
manifest (:func:`manifest`, in the checkpoint's ``meta.json``; ``tables/manifest.json``
in the earlier layout), which is checked before anything loads.  Every table tensor is saved with its true
global shape as a ``DTensor`` whose placement describes the writer's row range
(``Shard(0)`` over the ranks that split the rows, ``Replicate()`` over
replicas, which DCP writes once)::

    engram_tables.layer{l}.weight        [rows, embed_dim]   fp32
    engram_tables.layer{l}.exp_avg       [rows, embed_dim]   fp32
    engram_tables.layer{l}.exp_avg_sq    [rows, embed_dim]   fp32    ([rows, 1]: sparse_adam_rowwise)
    engram_tables.layer{l}.row_steps     [rows]              int32   (sparse_adam, sparse_adam_rowwise)
    engram_tables.layer{l}.num_steps     int                          (adam only)

Loading builds the same keys over the *current* store's shards and lets DCP
read the overlapping chunks of whatever ranks wrote them, so a checkpoint
saved with ``partition=all`` on 4 ranks loads with ``partition=tp`` at TP=2,
or into one process.  Row ranges follow ``torch.chunk`` (see ``layout``),
which is also ``DTensor``'s rule for uneven ``Shard(0)``.

The checkpoint writes every tensor in chunks of at most 4 MiB of whole rows
(``engram_train.train.checkpoint.BLOCK_BYTES``): a table shard is the reason, see there.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
import torch.distributed as dist

from engram_train.config.schema import ConfigError
from engram_train.memory.layout import row_range

PREFIX = "engram_tables"
MANIFEST = "manifest.json"


def _mesh(store):
    """The device mesh and placements that describe this rank's shards (the layout's: ``store.placement.dims``)."""
    from torch.distributed.tensor import Replicate, Shard

    device = store.rows_device.type   # host-resident rows are CPU tensors even on a CUDA machine
    p = store.placement
    if p.partition == "tp":
        return p.dims.mesh(device), [Replicate(), Shard(0)]
    if p.partition == "all":
        return p.dims.world_mesh(device), [Shard(0)]
    return p.dims.mesh(device), [Replicate(), Replicate()]


def _global(local: torch.Tensor, rows: int, mesh, placements):
    from torch.distributed.tensor import DTensor

    shape = (rows,) + tuple(local.shape[1:])
    stride = (local.shape[1], 1) if local.ndim == 2 else (1,)
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)


def state_dict(store) -> Dict[str, Any]:
    """DCP state dict of ``store``: global-shaped DTensors over its own tensors (no copies)."""
    store.wait_updates()   # host tables: the last table step may still be running on its worker
    mesh, placements = _mesh(store)
    sd: Dict[str, Any] = {}
    for layer_id, shard in store.shards.items():
        key = f"{PREFIX}.layer{layer_id}"
        sd[f"{key}.weight"] = _global(shard.weight, shard.spec.rows, mesh, placements)
        for name, t in shard.optimizer.state_tensors().items():
            sd[f"{key}.{name}"] = _global(t, shard.spec.rows, mesh, placements)
        for name, v in shard.optimizer.scalars().items():
            sd[f"{key}.{name}"] = v
    return sd


def manifest(store) -> Dict[str, Any]:
    p = store.placement
    return {
        "format": "DTensor rows under tables. in the checkpoint; see engram_train/memory/checkpoint.py",
        "partition": p.partition, "parts": p.parts, "world_size": dist.get_world_size(), "tp_size": p.tp_size,
        "optimizer": store.optimizer_name,
        "layers": {str(l): {"table_sizes": list(s.spec.table_sizes), "rows": s.spec.rows,
                            "embed_dim": s.spec.embed_dim,
                            "row_ranges": [list(row_range(s.spec.rows, p.parts, i)) for i in range(p.parts)]}
                   for l, s in store.shards.items()},
    }


def check_compatible(store, saved: Dict[str, Any], path: str) -> None:
    """Raise a clear error if the tables of checkpoint ``path`` (its :func:`manifest` ``saved``) cannot
    load into ``store``."""
    if saved["optimizer"] != store.optimizer_name:
        raise ConfigError(f"engram.optimizer={store.optimizer_name!r}: the checkpoint {path} holds "
                          f"{saved['optimizer']!r} table optimizer state; resume with "
                          f"engram.optimizer={saved['optimizer']}")
    for layer_id, shard in store.shards.items():
        got = saved["layers"].get(str(layer_id))
        if got is None or got["table_sizes"] != list(shard.spec.table_sizes) or \
                got["embed_dim"] != shard.spec.embed_dim:
            raise ConfigError(f"engram: the checkpoint {path} has other tables for layer {layer_id} "
                              f"({got and got['table_sizes']} x {got and got['embed_dim']}, this run "
                              f"{list(shard.spec.table_sizes)} x {shard.spec.embed_dim}); the Engram settings "
                              "(layer_ids, max_ngram, heads_per_ngram, n_embed_per_ngram, table sizes, seed) "
                              "and the tokenizer must match the checkpoint's")


def load_state_dict(store, sd: Dict[str, Any]) -> None:
    """After ``dcp.load`` filled ``sd`` (from ``state_dict(store)``): the optimizer's scalars into the store."""
    for layer_id, shard in store.shards.items():
        key = f"{PREFIX}.layer{layer_id}"
        shard.optimizer.load_scalars({n: sd[f"{key}.{n}"] for n in shard.optimizer.scalars()})
        # DCP fills the DTensors' local tensors, which are the store's own; check it did not copy instead.
        assert sd[f"{key}.weight"].to_local().data_ptr() == shard.weight.data_ptr()
