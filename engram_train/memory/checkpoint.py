"""Checkpoints of the table store: each rank writes its own rows, any layout reads them back.

Format: ``torch.distributed.checkpoint`` (DCP) in a directory, plus a
human-readable ``manifest.json``.  Every table tensor is saved with its true
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

Each rank's rows are written as chunks of at most ``BLOCK_BYTES``
(:class:`RowBlockSavePlanner`): DCP reads a saved chunk whole before copying
the part a rank needs, so a chunk as large as a rank's whole shard (4 GB for
one tensor of ``experiment=host_1b_cpu``) would cost that much extra memory at
every resume.  Small blocks also bound what saving holds: DCP's writer
copies each block (a view of a larger tensor) and keeps the last copy of every
key until the rank's file is complete, and the allocator keeps freed blocks of
a few MiB for reuse: about one block per key (measured: +40 MB saving 800 MB in
4 MiB blocks, +330 MB in 64 MiB blocks).  The
chunking is DCP metadata only: keys and global shapes do not change, and a
checkpoint written in any chunking loads at any layout.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict

import torch
import torch.distributed as dist

from engram_train.config.schema import ConfigError
from engram_train.memory.layout import row_range

PREFIX = "engram_tables"
MANIFEST = "manifest.json"
BLOCK_BYTES = 4 << 20


def _save_planner():
    import dataclasses
    import math

    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItemType
    from torch.distributed.tensor import DTensor

    class RowBlockSavePlanner(DefaultSavePlanner):
        """DCP's default save plan with every tensor chunk of more than ``BLOCK_BYTES`` split into
        blocks of whole rows (module docstring)."""

        def create_local_plan(self):
            plan = super().create_local_plan()
            # (fqn, global offsets) of a block -> (its rows, the first global row of the chunk it splits)
            self._blocks: Dict[Any, Any] = {}
            items = []
            for item in plan.items:
                td = item.tensor_data
                if td is None or len(td.chunk.sizes) == 0:
                    items.append(item)
                    continue
                rows = td.chunk.sizes[0]
                row_bytes = math.prod(td.chunk.sizes[1:]) * td.properties.dtype.itemsize
                per_block = max(1, BLOCK_BYTES // max(1, row_bytes))
                if rows <= per_block:
                    items.append(item)
                    continue
                for r0 in range(0, rows, per_block):
                    n = min(per_block, rows - r0)
                    offsets = torch.Size([td.chunk.offsets[0] + r0, *td.chunk.offsets[1:]])
                    sizes = torch.Size([n, *td.chunk.sizes[1:]])
                    index = MetadataIndex(item.index.fqn, offsets)
                    self._blocks[(index.fqn, offsets)] = (n, td.chunk.offsets[0])
                    items.append(dataclasses.replace(
                        item, index=index, type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                                                    properties=td.properties, size=td.size)))
            self.plan = dataclasses.replace(plan, items=items)
            return self.plan

        def lookup_object(self, index):
            block = self._blocks.get((index.fqn, index.offset))
            if block is None:
                return super().lookup_object(index)
            rows, first_row = block
            obj = self.state_dict[index.fqn]
            local = obj.to_local() if isinstance(obj, DTensor) else obj
            return local.narrow(0, index.offset[0] - first_row, rows)

    return RowBlockSavePlanner()


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
        "format": "torch.distributed.checkpoint, DTensor rows; see engram_train/memory/checkpoint.py",
        "partition": p.partition, "parts": p.parts, "world_size": dist.get_world_size(), "tp_size": p.tp_size,
        "optimizer": store.optimizer_name,
        "layers": {str(l): {"table_sizes": list(s.spec.table_sizes), "rows": s.spec.rows,
                            "embed_dim": s.spec.embed_dim,
                            "row_ranges": [list(row_range(s.spec.rows, p.parts, i)) for i in range(p.parts)]}
                   for l, s in store.shards.items()},
    }


def save(store, path: str) -> None:
    """Write the store into directory ``path`` (collective over all ranks)."""
    import torch.distributed.checkpoint as dcp

    # sync_files: every data file and .metadata is fsynced (the checkpoint's commit protocol counts on it)
    dcp.save(store.state_dict(), storage_writer=dcp.FileSystemWriter(path, sync_files=True), planner=_save_planner())
    if dist.get_rank() == 0:
        with open(os.path.join(path, MANIFEST), "w") as f:
            json.dump(manifest(store), f, indent=1)
            f.flush()
            os.fsync(f.fileno())


def check_compatible(store, path: str) -> None:
    """Raise a clear error if the checkpoint's tables cannot load into ``store``."""
    with open(os.path.join(path, MANIFEST)) as f:
        saved = json.load(f)
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


def load(store, path: str) -> None:
    """Read ``path`` into ``store``'s shards, at this run's layout (collective over all ranks)."""
    import torch.distributed.checkpoint as dcp

    check_compatible(store, path)
    sd = store.state_dict()
    dcp.load(sd, checkpoint_id=path)
    store.load_state_dict(sd)


def load_state_dict(store, sd: Dict[str, Any]) -> None:
    """After ``dcp.load`` filled ``sd`` (from ``state_dict(store)``): the optimizer's scalars into the store."""
    for layer_id, shard in store.shards.items():
        key = f"{PREFIX}.layer{layer_id}"
        shard.optimizer.load_scalars({n: sd[f"{key}.{n}"] for n in shard.optimizer.scalars()})
        # DCP fills the DTensors' local tensors, which are the store's own; check it did not copy instead.
        assert sd[f"{key}.weight"].to_local().data_ptr() == shard.weight.data_ptr()
