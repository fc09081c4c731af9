"""Convert between a FULL state dict (one process, TP=1, EP=1) and one TP/EP rank's local state dict.

The full layout is what a single-process model holds; it is the layout of
rank-independent checkpoints and the oracle of the distributed tests.  The
mapping is read from the attributes megatron puts on each local parameter,
never from module types:

* ``tensor_model_parallel=True`` with ``partition_dim`` and
  ``partition_stride``: the full tensor is cut along ``partition_dim`` into
  ``size * stride`` equal chunks and rank ``r`` holds chunks ``r, r+size, ...``
  concatenated (megatron's ``_initialize_affine_weight_cpu``).  Stride 1 is a
  plain contiguous split (embedding and output layer by vocabulary rows,
  attention projections by heads, fc2 by input columns).  Stride 2 is the
  SwiGLU ``linear_fc1``: the full weight is ``[gate; up]`` and a rank holds
  ``[gate_r; up_r]``, i.e. each half is split separately.  ``linear_qkv``
  needs nothing special under grouped-query attention: megatron stores it
  query-group-major (``[q heads of group g, k_g, v_g]`` per group), so a
  contiguous split hands each rank whole groups.
* Expert parameters (``...mlp.experts.local_experts.{i}...``): rank ``e`` of
  the expert-parallel group holds global experts ``e*L .. e*L+L-1`` as local
  ``0 .. L-1`` (``L = num_experts / EP``).  Expert weights are additionally
  split over the *expert* tensor-parallel group by the rule above.
* Everything else (norms, router, Engram blocks) is replicated: copied.

``local_to_full`` is collective (all-gathers over the TP, expert-TP and EP
groups) and returns the full dict on every rank; it works on any
``{parameter name: tensor}`` dict shaped like the local parameters, e.g.
gradients.
"""

from __future__ import annotations

import re
from typing import Dict

import torch
import torch.distributed as dist
from torch import nn

_EXPERT = re.compile(r"^(.*\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")


def _groups(model: nn.Module):
    from megatron.core import parallel_state as ps

    cfg = model.config
    ep_size = ps.get_expert_model_parallel_world_size()
    return dict(
        tp=(ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_world_size()),
        etp=(ps.get_expert_tensor_parallel_group(), ps.get_expert_tensor_parallel_rank(),
             ps.get_expert_tensor_parallel_world_size()),
        ep=(ps.get_expert_model_parallel_group(), ps.get_expert_model_parallel_rank(), ep_size),
        local_experts=(cfg.num_moe_experts or 0) // ep_size,
    )


def _global_name(name: str, ep_rank: int, local_experts: int) -> str:
    m = _EXPERT.match(name)
    if not m:
        return name
    return f"{m.group(1)}{ep_rank * local_experts + int(m.group(2))}{m.group(3)}"


def shard(full: torch.Tensor, rank: int, size: int, dim: int, stride: int = 1) -> torch.Tensor:
    """Rank ``rank``'s part of ``full`` under megatron's strided partitioning."""
    if size == 1:
        return full
    if full.shape[dim] % (size * stride):
        raise ValueError(f"dim {dim} of shape {tuple(full.shape)} does not split into {size}x{stride} chunks")
    chunks = torch.split(full, full.shape[dim] // (size * stride), dim=dim)
    return torch.cat(chunks[rank::size], dim=dim)


def unshard(parts, dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard` given every rank's part, in rank order."""
    if len(parts) == 1:
        return parts[0]
    pieces = [torch.chunk(p, stride, dim=dim) for p in parts]
    return torch.cat([pieces[r][s] for s in range(stride) for r in range(len(parts))], dim=dim)


def _param_meta(model: nn.Module) -> Dict[str, nn.Parameter]:
    return dict(model.named_parameters())


def full_to_local(full_sd: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """The entries of ``model.state_dict()`` for this rank, cut from a full (TP=1, EP=1) state dict."""
    g = _groups(model)
    params = _param_meta(model)
    local = {}
    for name, current in model.state_dict().items():
        full_name = _global_name(name, g["ep"][1], g["local_experts"])
        if not isinstance(current, torch.Tensor):   # megatron's `_extra_state` entries (None)
            local[name] = full_sd.get(full_name, current)
            continue
        if full_name not in full_sd:
            raise KeyError(f"full state dict has no {full_name!r} (local {name!r})")
        t = full_sd[full_name]
        p = params.get(name)
        if p is not None and getattr(p, "tensor_model_parallel", False):
            _, r, size = g["etp"] if _EXPERT.match(name) else g["tp"]
            t = shard(t, r, size, p.partition_dim, getattr(p, "partition_stride", 1))
        if tuple(t.shape) != tuple(current.shape):
            raise ValueError(f"{name}: cut {tuple(t.shape)} from full {full_name} but the local "
                             f"tensor is {tuple(current.shape)}")
        local[name] = t.to(dtype=current.dtype, device=current.device).clone()
    return local


def _all_gather(t: torch.Tensor, group, size: int):
    if size == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def local_to_full(local_sd: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Gather a local ``{name: tensor}`` dict into the full layout (collective; same result on all ranks).

    Every rank must pass the same names (the same model); tensors of names
    that are not parameters (buffers) and non-tensor entries (megatron's
    ``_extra_state``) are taken as they are.
    """
    g = _groups(model)
    params = _param_meta(model)
    ep_group, _, ep_size = g["ep"]
    full = {}
    for name, t in local_sd.items():
        expert = _EXPERT.match(name)
        if not isinstance(t, torch.Tensor):   # megatron's `_extra_state` entries (None): same everywhere
            for e in range(ep_size if expert else 1):
                full[_global_name(name, e, g["local_experts"]) if expert else name] = t
            continue
        p = params.get(name)
        if p is not None and getattr(p, "tensor_model_parallel", False):
            group, _, size = g["etp"] if expert else g["tp"]
            t = unshard(_all_gather(t, group, size), p.partition_dim, getattr(p, "partition_stride", 1))
        if expert:
            for e, te in enumerate(_all_gather(t, ep_group, ep_size)):
                full[_global_name(name, e, g["local_experts"])] = te
        else:
            full[name] = t
    return full


def init_experts_by_global_index(model: nn.Module, seed: int) -> None:
    """Re-draw expert weights from generators keyed by (seed, global parameter name).

    megatron draws each rank's local experts from that rank's generator, so expert
    ``e`` starts with different values at EP=1 and EP=2, and runs at different EP
    sizes are different experiments.  Keyed by the global name (which holds the
    global expert index), an expert's initial weights are the same wherever it
    lives; under expert tensor parallelism the full weight is drawn and this rank
    keeps its shard.  Same distributions as megatron: N(0, std) for ``linear_fc1``,
    N(0, std / sqrt(2 * num_layers)) for ``linear_fc2`` (megatron's scaled init).
    """
    import math
    import zlib

    cfg = model.config
    if not cfg.num_moe_experts:
        return
    g = _groups(model)
    _, etp_rank, etp_size = g["etp"]
    for name, p in model.named_parameters():
        if not _EXPERT.match(name):
            continue
        full_name = _global_name(name, g["ep"][1], g["local_experts"])
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(full_name.encode())) % 2**63)
        shape = list(p.shape)
        tp_split = getattr(p, "tensor_model_parallel", False)
        if tp_split:
            shape[p.partition_dim] *= etp_size
        std = cfg.init_method_std
        if ".linear_fc2." in name:
            std = std / math.sqrt(2.0 * cfg.num_layers)
        full = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
        if tp_split:
            full = shard(full, etp_rank, etp_size, p.partition_dim, getattr(p, "partition_stride", 1))
        with torch.no_grad():
            p.copy_(full.to(p.dtype))
