"""Process groups and RNG streams: torch.distributed + megatron ``parallel_state``.

``init_parallel`` is the one entry point.  Under torchrun (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` set) it joins that job; a
plain ``python`` process becomes a one-rank job on a private file store, so
megatron-core (which needs ``torch.distributed``) works in notebooks and unit
tests without torchrun.  On a machine without CUDA it also activates the CPU
backend for megatron-core (:mod:`engram_train.platform.cpu_backend`) before any
model is built.

The group layout is megatron's (order ``tp-cp-ep-dp-pp``), described once by
:class:`engram_train.parallel.dims.ParallelDims`: TP ranks are adjacent, the
dense data-parallel size is ``world / TP``, experts are spread over ``EP`` of
those DP ranks (expert tensor parallel = TP, megatron's default) and
replicated over the rest; megatron's ``parallel_state`` answers for the groups and ranks.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import tempfile
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from engram_train.config.schema import ConfigError, ParallelConfig
from engram_train.parallel.dims import ParallelDims, set_parallel_dims
from engram_train.platform.device import get_device, is_cpu

log = logging.getLogger(__name__)

_OWNS_PROCESS_GROUP = False   # True when init_parallel created the default group (destroy it too)
_STORE_FILE: Optional[str] = None


def _backend(cfg: ParallelConfig) -> str:
    if cfg.backend == "auto":
        return "gloo" if is_cpu() else "nccl"
    if cfg.backend == "nccl" and is_cpu():
        raise ConfigError("parallel.backend='nccl': this machine has no CUDA device; "
                          "use parallel.backend=gloo (or auto)")
    return cfg.backend


def _init_process_group(backend: str) -> None:
    global _OWNS_PROCESS_GROUP, _STORE_FILE
    if backend == "nccl":
        # CPU tensors travel too: host-resident table rows in checkpoints (DCP on a CPU mesh) and
        # their lookup plans. NCCL carries only CUDA tensors; gloo takes the CPU ones.
        backend = "cuda:nccl,cpu:gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, init_method="env://")
    else:
        fd, _STORE_FILE = tempfile.mkstemp(prefix="engram_train_pg_")
        os.close(fd)
        store = dist.FileStore(_STORE_FILE, 1)
        dist.init_process_group(backend=backend, store=store, rank=0, world_size=1)
    _OWNS_PROCESS_GROUP = True


def init_parallel(parallel_cfg: ParallelConfig, seed: int) -> None:
    """Initialize torch.distributed (if needed), megatron's model-parallel groups and RNG streams.

    Validates the world size against ``parallel_cfg`` first.  Seeds Python,
    numpy and torch with ``seed`` (the same on every rank) and megatron's
    named streams with megatron's offsets (per TP rank, per EP rank).
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    cpu = is_cpu()
    if cpu:
        from engram_train.platform.cpu_backend import activate_cpu_backend

        activate_cpu_backend()
    else:
        torch.cuda.set_device(get_device())

    if not dist.is_initialized():
        _init_process_group(_backend(parallel_cfg))
    world = dist.get_world_size()
    tp, ep = parallel_cfg.tensor_parallel, parallel_cfg.expert_parallel
    parallel_cfg.validate_world(world)

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    set_parallel_dims(ParallelDims(world, tp, ep))
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        # On CPU the default backend already is gloo: megatron's extra gloo groups would be copies.
        create_gloo_process_groups=not cpu,
    )

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if cpu:
        from engram_train.platform.cpu_backend import cpu_model_parallel_manual_seed

        cpu_model_parallel_manual_seed(seed)
    else:
        tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    log.info("parallel: world=%d tp=%d ep=%d dp=%d backend=%s device=%s", world, tp, ep,
             world // tp, dist.get_backend(), get_device())


def destroy_parallel(keep_process_group: bool = False) -> None:
    """Tear down megatron's groups, megatron's per-process MoE state and, if ours, the default group.

    ``keep_process_group``: keep the default group for the next job in this process (a sweep under
    torchrun, whose rendezvous store cannot be joined twice); every other group is destroyed all the
    same.  A process must end with the default group destroyed too: gloo groups left to the
    interpreter's finalization can abort the process at exit (SIGABRT, "terminate called without
    an active exception").
    """
    global _OWNS_PROCESS_GROUP, _STORE_FILE
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, get_moe_layer_wise_logging_tracker

    if ps.model_parallel_is_initialized():
        # Dropped, not zeroed: megatron sizes each entry by the first model's layer count.
        get_moe_layer_wise_logging_tracker().clear()
        ps.destroy_model_parallel()
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    set_parallel_dims(None)
    if not (_OWNS_PROCESS_GROUP and dist.is_initialized()):
        return
    if keep_process_group:
        # megatron's destroy_model_parallel drops its groups but leaves them registered (alive) in
        # torch's group map, as are our meshes' and the table store's: destroy them by that map (the
        # one megatron-core reads too), the default group aside.
        world = dist.group.WORLD
        for group in [g for g in list(dist.distributed_c10d._world.pg_map) if g is not world]:
            _destroy_group(group)
        return
    _destroy_group(None)
    _OWNS_PROCESS_GROUP = False
    if _STORE_FILE is not None:
        try:
            os.remove(_STORE_FILE)
        except FileNotFoundError:
            pass
        _STORE_FILE = None


def _destroy_group(group) -> None:
    """``destroy_process_group(group)``, through DeepSpeed when it has initialized: it also drops the groups
    DeepSpeed caches (the expert groups ``register_expert_groups`` names), so that no later job finds a
    destroyed group under a cached name."""
    if "deepspeed" in sys.modules:
        import deepspeed.comm as ds_comm

        if ds_comm.is_initialized():
            ds_comm.destroy_process_group(group)
            return
    dist.destroy_process_group(group)
