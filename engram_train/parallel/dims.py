"""The one description of the layout: which ranks are adjacent along which parallel dimension.

megatron-core orders its groups ``tp-cp-ep-dp-pp``: the ranks of one tensor-parallel group are
adjacent, so global rank ``r`` sits at ``(dp_rank, tp_rank) = divmod(r, tp)``; experts spread over
``ep`` of the ``dp = world / tp`` data-parallel ranks (expert tensor parallel = TP).
:class:`ParallelDims` says this once.  ``init_parallel`` builds it at start-up
(:func:`parallel_dims`), and every component takes its coordinates and device meshes from it:
dense checkpoints, table shards, the ``all`` exchange and the table checkpoint.  No other module
builds a ``DeviceMesh`` or derives a rank's TP coordinate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch


@dataclass(frozen=True)
class ParallelDims:
    world: int
    tp: int = 1
    ep: int = 1

    @property
    def dp(self) -> int:
        """Replicas of the dense parameters (the data-parallel size)."""
        return self.world // self.tp

    def coords(self, rank: int) -> Tuple[int, int]:
        """``(dp_rank, tp_rank)`` of global rank ``rank``: TP ranks are adjacent."""
        return divmod(rank, self.tp)

    def tp_rank_of(self, rank: int) -> int:
        return self.coords(rank)[1]

    def mesh(self, device_type: str):
        """The ``("dp", "tp")`` device mesh of this layout on ``device_type`` (built once per type; collective
        the first time)."""
        return _mesh(self, device_type, flat=False)

    def world_mesh(self, device_type: str):
        """Every rank on one ``("world",)`` dimension, in rank order: shards split over all ranks."""
        return _mesh(self, device_type, flat=True)


_MESHES: Dict[Tuple[int, int, str, bool], object] = {}
_DIMS: Optional[ParallelDims] = None


def _mesh(dims: ParallelDims, device_type: str, flat: bool):
    from torch.distributed.device_mesh import DeviceMesh

    key = (dims.world, dims.tp, device_type, flat)
    if key not in _MESHES:
        layout = torch.arange(dims.world).view(dims.dp, dims.tp)   # row = dp rank, column = tp rank
        _MESHES[key] = (DeviceMesh(device_type, layout.flatten(), mesh_dim_names=("world",)) if flat
                        else DeviceMesh(device_type, layout, mesh_dim_names=("dp", "tp")))
    return _MESHES[key]


def set_parallel_dims(dims: Optional[ParallelDims]) -> None:
    """Called by ``init_parallel`` (the dims of this job) and ``destroy_parallel`` (None: its meshes die with
    the process groups)."""
    global _DIMS
    _DIMS = dims
    _MESHES.clear()


def parallel_dims() -> ParallelDims:
    """The layout ``init_parallel`` built."""
    if _DIMS is None:
        raise RuntimeError("parallel_dims() before init_parallel()")
    return _DIMS
