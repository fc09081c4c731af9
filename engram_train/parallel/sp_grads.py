"""Complete the gradients of sequence-parallel replicated parameters (DeepSpeed has no such step).

Under sequence parallelism each tensor-parallel rank runs the norms and the
MoE router on its own ``S/tp`` tokens, with a replicated weight.  The weight's
gradient on a rank is therefore only the sum over that rank's tokens; the true
gradient is the sum over the TP group.  megatron marks these parameters
``sequence_parallel=True`` and all-reduces them in ``finalize_model_grads``,
which DeepSpeed never calls.

We all-reduce them in a tensor hook (``param.register_hook``).  A tensor hook
on a leaf runs on the incoming gradient *before* it is accumulated into
``.grad`` — hence before DeepSpeed's ZeRO hooks, which fire after
accumulation — so DeepSpeed (and gradient accumulation over micro-batches)
only ever sees complete gradients.  Each TP rank runs the same backward graph,
so the hooks fire in the same order on every rank and the collectives pair
up.  Parameters are identical across the TP group, so no other parameter needs
this (TP-partitioned weights are complete per shard; Engram blocks recompute
the full sequence on every TP rank, see ``model/layer.py``).  mHC mixing weights are
replicated and per token like the norms, and carry the same flag.
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from torch import nn


def sequence_parallel_params(model: nn.Module) -> List[nn.Parameter]:
    """Parameters megatron marks ``sequence_parallel=True`` (norm weights, the router weight)."""
    return [p for p in model.parameters() if p.requires_grad and getattr(p, "sequence_parallel", False)]


def install_sequence_parallel_grad_hooks(model: nn.Module, group=None) -> int:
    """All-reduce every sequence-parallel parameter's gradient over the TP group; returns the count.

    Idempotent; a no-op (returning 0) when the TP group has a single rank.
    """
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1 or getattr(model, "sequence_parallel_grad_hooks", False):
        return 0

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=group)
        return grad

    params = sequence_parallel_params(model)
    for p in params:
        p.register_hook(all_reduce)
    model.sequence_parallel_grad_hooks = True
    return len(params)
