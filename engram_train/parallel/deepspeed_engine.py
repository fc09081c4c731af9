"""DeepSpeed engine wiring for a megatron-core model.

DeepSpeed trains the parameters (ZeRO stage 1-2, optional CPU optimizer offload);
megatron's ``parallel_state`` is handed over as ``mpu`` so data-parallel
reductions use megatron's DP group and the gradient norm counts each
tensor-parallel shard once.

Expert parallelism needs one more thing.  Under EP megatron marks expert
parameters ``allreduce=False``; DeepSpeed must then reduce them over the
*expert* data-parallel group instead of the dense one, which it only does when
(a) the engine believes the model has MoE layers and (b) its expert group
registry knows the group.  Megatron's MoE layers are not DeepSpeed ``MoE``
modules, so we

* register megatron's expert-parallel and expert-data-parallel groups in
  DeepSpeed's group registry under DeepSpeed's group name ``ep_size_<EP>``, and
* attach a parameter-free ``ExpertParallelMarker`` (a ``deepspeed.moe.layer.MoE``
  subclass that never runs) so ``engine.has_moe_layers`` is true.

DeepSpeed divides expert gradients by the dense DP size, which is exactly the
full-batch average (each expert already summed the contributions of every DP
rank's tokens through the token dispatcher).

Engram tables are not DeepSpeed's (the table store owns them, see
``parallel.parallelize.owner``), so DeepSpeed does not clip: it is configured
with ``gradient_clipping: 0`` and :class:`DenseOptimizer` hands the one norm
over dense and table gradients (``engram_train.train.optimizers``) to the
step through torch's public optimizer hooks on DeepSpeed's basic optimizer.
Nothing of DeepSpeed's is replaced (docs/tables.md, "One step").

Checkpoints do not use ``engine.save_checkpoint`` (its MoE path assumes
DeepSpeed's own expert layout): see ``engram_train.train.checkpoint``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from engram_train.config.schema import Config

log = logging.getLogger(__name__)


def _is_expert_param(p: torch.Tensor) -> bool:
    return not getattr(p, "allreduce", True)


def expert_group_name(expert_parallel: int) -> str:
    return f"ep_size_{expert_parallel}"


def register_expert_groups(expert_parallel: int) -> str:
    """Make megatron's expert groups known to DeepSpeed under its naming scheme."""
    import torch.distributed as dist
    from deepspeed.utils import groups as ds_groups
    from megatron.core import parallel_state as ps

    name = expert_group_name(expert_parallel)
    ep_group = ps.get_expert_model_parallel_group()
    edp_group = ps.get_expert_data_parallel_group()
    ds_groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(ep_group)
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = edp_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(edp_group)
    return name


class MegatronMPU:
    """DeepSpeed's ``mpu`` interface over megatron's ``parallel_state``.

    DeepSpeed asks for "model parallel" rank/size/group (megatron calls it tensor x
    pipeline parallel) and for the data-parallel group; megatron's module spells some
    of these differently, so this adapter names each one DeepSpeed calls.
    """

    def __init__(self):
        from megatron.core import parallel_state as ps

        self._ps = ps

    # model parallel = tensor parallel here (no pipeline parallelism)
    def get_model_parallel_rank(self):
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self):
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_group_ranks(self):
        import torch.distributed as dist

        return dist.get_process_group_ranks(self.get_data_parallel_group())

    def get_pipeline_model_parallel_rank(self):
        return 0

    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_group(self):
        return None


def _marker_class():
    from deepspeed.moe.layer import MoE

    class ExpertParallelMarker(MoE):
        """Parameter-free flag telling the DeepSpeed engine the model has expert-parallel params."""

        def __init__(self, num_experts: int, ep_size: int):
            nn.Module.__init__(self)  # deliberately not MoE.__init__: no DeepSpeed experts are built
            self.num_experts = num_experts
            self.ep_size = ep_size
            self.num_local_experts = num_experts // ep_size
            self.expert_group_name = expert_group_name(ep_size)
            self.use_residual = False

        def set_deepspeed_parallelism(self, *args, **kwargs):
            pass  # the groups are megatron's, registered by register_expert_groups

        def forward(self, *args, **kwargs):  # pragma: no cover - never called
            raise RuntimeError("ExpertParallelMarker is a flag for DeepSpeed and is never run")

    return ExpertParallelMarker


def deepspeed_config(cfg: Config, dp_size: int, use_bf16: bool) -> Dict[str, Any]:
    d, t, p = cfg.data, cfg.trainer, cfg.parallel
    micro = d.micro_batch_size
    gas = d.global_batch_size // (micro * dp_size)
    zero: Dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage in (1, 2):
        # Contiguous gradients + reduce-scatter: required by DeepSpeed's expert-parallel path.
        zero.update(contiguous_gradients=True, reduce_scatter=True, overlap_comm=False)
    if p.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    else:
        # The optimizers container computes the one norm (DenseOptimizer.grad_norm); DeepSpeed's own would be
        # a second all-reduce nobody reads.  Under offload DeepSpeed insists on computing it.
        zero["compute_grad_norm"] = False
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * dp_size,
        "gradient_clipping": 0.0,   # the container clips dense and table gradients with one norm
        "optimizer": {"type": "AdamW", "params": adamw_params(cfg)},
        "bf16": {"enabled": use_bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def adamw_params(cfg: Config) -> Dict[str, Any]:
    """DeepSpeed's AdamW, computed by ``torch.optim.AdamW`` (``torch_adam``).

    DeepSpeed's own Adams (``FusedAdam``, and ``DeepSpeedCPUAdam`` under ZeRO-Offload) are C++/CUDA
    extensions compiled on first use into a cache every environment of the user shares; a run
    killed while one builds leaves a lock there that makes every later run wait forever, and on a
    CPU the build costs a minute of the first run.  torch's AdamW needs no build and is the same
    rule; its bias correction comes from the step count alone, so a resumed run continues bit for
    bit (the C++ CPU kernels carry beta^t from step to step in the process).  On CUDA it runs
    fused.  Cost: with ``parallel.offload_optimizer=cpu`` the CPU step is torch's rather than
    DeepSpeed's AVX kernel (docs/configuration.md).
    """
    t, p = cfg.trainer, cfg.parallel
    params: Dict[str, Any] = {
        "lr": t.lr,
        "betas": [t.adam_beta1, t.adam_beta2],
        "eps": t.adam_eps,
        "weight_decay": t.weight_decay,
        "torch_adam": True,
    }
    if torch.cuda.is_available() and p.offload_optimizer == "none":
        params["fused"] = True
    return params


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from compiling its shared-memory collectives on a CPU machine.

    DeepSpeed's communication backend builds the ``deepspeed_shm_comm`` extension when it starts on
    its CPU accelerator (about 80 s on 2 cores, at run time, also for one process).  Only
    ``inference_all_reduce`` uses it; training reduces through the process group (gloo).  Marking
    the op incompatible in DeepSpeed's own table of compatible ops makes it skip the build.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def param_groups(model: nn.Module, cfg: Config) -> List[Dict[str, Any]]:
    """Base policy for dense weights, the paper's policy for Engram tables (own LR multiplier, no decay)."""
    from engram_train.engram.params import engram_param_groups

    groups = engram_param_groups(model, lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay,
                                 table_lr_mult=cfg.engram.table_lr_mult,
                                 table_weight_decay=cfg.engram.table_weight_decay)
    return groups


def build_engine(model: nn.Module, cfg: Config, dp_size: int, use_bf16: bool):
    """Wrap ``model`` in a DeepSpeed engine; returns (engine, optimizer).

    The engine does not clip (``gradient_clipping: 0``): train through
    ``engram_train.train.optimizers.OptimizersContainer``, which does.
    """
    import deepspeed

    from engram_train.parallel.parallelize import deepspeed_parameters

    deepspeed_parameters(model)   # raises if an Engram table weight slipped into the model's parameters

    ep = cfg.parallel.expert_parallel
    if ep > 1:
        name = register_expert_groups(ep)
        for p in model.parameters():
            if _is_expert_param(p):
                p.group_name = name
        model.add_module("ds_expert_parallel_marker", _marker_class()(cfg.model.num_experts, ep))

    groups = param_groups(model, cfg)
    ds_cfg = deepspeed_config(cfg, dp_size, use_bf16)
    skip_shm_comm_build()
    # deepspeed.initialize expects the launcher's env; a process started without torchrun has none.
    os.environ.setdefault("LOCAL_RANK", "0")
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=groups, config=ds_cfg, mpu=MegatronMPU(), dist_init_required=False)
    return engine, optimizer


class DenseOptimizer:
    """The dense half of one step: DeepSpeed's ZeRO-1/2 engine, told the step's clip and verdict.

    DeepSpeed has no public way to be given a gradient norm, and its own would leave out the table
    gradients.  So DeepSpeed runs with ``gradient_clipping: 0`` and

    * :meth:`grad_norm` reads the dense norm from the ZeRO optimizer's ``scaled_global_norm()`` (the
      method its own step calls: ZeRO partitions, TP duplicates and expert groups counted as DeepSpeed
      counts them) once the accumulation boundary's backward has reduced the gradients;
    * :meth:`step` runs ``engine.step()``; a step pre-hook on the basic optimizer (torch's AdamW, via
      ``torch.optim.Optimizer.register_step_pre_hook``) multiplies the fp32 gradient partition by
      ``1 / clip``, the operation DeepSpeed's ``unscale_and_clip_grads`` would apply, or withholds the
      gradients for a dropped step (AdamW leaves a parameter without a gradient untouched: weights,
      moments and step count), and the post-hook gives them back to DeepSpeed's buffers.
    """

    def __init__(self, engine):
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        self.engine = engine
        self.zero = engine.optimizer
        if not isinstance(self.zero, DeepSpeedZeroOptimizer):
            # The config validator admits ZeRO-1/2 only (parallel.zero_stage); anything else is a bug here.
            raise RuntimeError(f"DenseOptimizer needs DeepSpeed's ZeRO-1/2 optimizer, not {type(self.zero).__name__}")
        self._inv_clip: Optional[torch.Tensor] = None
        self._apply = True
        self._withheld: List = []
        basic = engine.basic_optimizer
        basic.register_step_pre_hook(self._before_step)
        basic.register_step_post_hook(self._after_step)

    @property
    def param_groups(self):
        return self.zero.param_groups

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()   # DeepSpeed counts micro-batches in step(); only the boundary's updates

    def at_boundary(self) -> bool:
        return self.engine.is_gradient_accumulation_boundary()

    def grad_norm(self) -> torch.Tensor:
        """DeepSpeed's norm of the dense gradients of this step (after the boundary's backward); negative
        or non-finite when DeepSpeed found it invalid."""
        return self.zero.scaled_global_norm()

    def step(self, inv_clip: Optional[torch.Tensor], apply: bool) -> None:
        """The boundary's ``engine.step()``: gradients times ``inv_clip`` (None: unclipped), or no update."""
        self._inv_clip, self._apply = inv_clip, apply
        try:
            self.engine.step()
        finally:
            self._inv_clip, self._apply = None, True

    def _before_step(self, optimizer, args, kwargs) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not self._apply:
            self._withheld = [(p, p.grad) for p in params]
            for p in params:
                p.grad = None
        elif self._inv_clip is not None:
            for p in params:
                p.grad.data.mul_(self._inv_clip.to(p.grad.device))

    def _after_step(self, optimizer, args, kwargs) -> None:
        for p, grad in self._withheld:
            p.grad = grad
        self._withheld = []
