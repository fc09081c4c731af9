"""Dense parameters and their ZeRO optimizer state in global coordinates: save at one layout, load at any.

:class:`DenseState` is the ``dense`` component of the checkpoint (a DCP ``Stateful``,
saved under ``dense.`` by ``engram_train.train.checkpoint``; checkpoints of the earlier
layout hold the same keys in their own ``dense/`` directory).  What it holds, per
DeepSpeed parameter under its *global* name (experts renamed by global expert index,
``parallel.sharding``)::

    model.<name>               fp32 master weight, the full (TP=1, EP=1) shape
    optim.exp_avg.<name>       Adam first moment, same shape
    optim.exp_avg_sq.<name>    Adam second moment, same shape (both zero before the first step)
    optim.step                 Adam step count (one for all groups)
    buffer.<name>              a persistent model buffer: state that training changes outside the
                               optimizer (megatron's MoE ``router.expert_bias``, moved once per step
                               by ``EngramGPTModel.update_expert_bias``); replicated on every rank
                               (one value per layer over *all* experts, whatever the EP size), saved
                               once, read whole by every rank, restored exactly (fp32)

Each tensor is a ``DTensor`` on the ``(data parallel, tensor parallel)`` mesh
whose placement is megatron's split of that parameter (``Shard(partition_dim)``
over TP, ``Replicate()`` over data parallelism, where DCP writes it once).
megatron's SwiGLU ``linear_fc1`` (``partition_stride=2``: a rank holds
``[gate_r; up_r]``) is saved as two tensors, ``<name>.gate`` and ``<name>.up``,
each an ordinary row split, so the format knows nothing of the kernel layout.

Where the values come from: under ZeRO-1/2 every data-parallel rank holds a
flat fragment of each parameter's fp32 state.  Saving assembles one parameter
at a time from its fragments (DeepSpeed's ``safe_get_full_fp32_param`` /
``safe_get_full_optimizer_state``: an all-reduce over the parameter's
data-parallel group); loading reads the parameter's TP-local block and keeps
this rank's fragment, the way DeepSpeed's universal checkpoint loads
(``_hp_mapping.optim_fragment`` + ``map_to_flat_opt_states``).  Known cost:
both hold the TP-local fp32 state (x3) of the dense model on each rank while
they run (expert weights are split by EP already); a later step can slice it
over data parallelism.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Tuple

import torch

log = logging.getLogger(__name__)

MOMENTS = ("exp_avg", "exp_avg_sq")


def _mesh():
    from engram_train.parallel.dims import parallel_dims
    from engram_train.platform.device import get_device

    return parallel_dims().mesh(get_device().type)


def _split(name: str, param):
    """How megatron splits ``param`` over TP: ``(split?, dim, [(global key, global shape)...])``.

    megatron marks its parallel layers' weights at every TP size (TP=1 included), so the keys do
    not depend on the TP size.
    """
    from megatron.core import parallel_state as ps

    from engram_train.parallel.sharding import _EXPERT

    tp = ps.get_tensor_model_parallel_world_size()
    if _EXPERT.match(name) and ps.get_expert_tensor_parallel_world_size() != tp:
        raise NotImplementedError("dense checkpoints assume expert tensor parallelism = TP (megatron's default)")
    split = bool(getattr(param, "tensor_model_parallel", False))
    dim = getattr(param, "partition_dim", 0)
    stride = getattr(param, "partition_stride", 1) if split else 1
    if stride not in (1, 2):
        raise NotImplementedError(f"{name}: partition_stride={stride} is not supported by the checkpoint")
    shape = list(param.shape)
    if split:
        shape[dim] *= tp
    if stride == 2:
        shape[dim] //= 2
        return split, dim, [(f"{name}.gate", tuple(shape)), (f"{name}.up", tuple(shape))]
    return split, dim, [(name, tuple(shape))]


def _pieces(name: str, param, local: torch.Tensor, mesh) -> Dict[str, object]:
    """``{global key: DTensor}`` for a TP-local tensor ``local`` shaped like ``param``."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    split, dim, keys = _split(name, param)
    # The halves of a stride-2 weight are row blocks (dim 0), hence contiguous views: loading fills
    # the caller's buffer in place.
    chunks = torch.chunk(local, len(keys), dim) if len(keys) > 1 else (local,)
    if len(keys) > 1 and not all(c.is_contiguous() for c in chunks):
        raise NotImplementedError(f"{name}: a stride-2 split along dim {dim} is not supported by the checkpoint")
    placements = [Replicate(), Shard(dim) if split else Replicate()]
    out = {}
    for (key, shape), t in zip(keys, chunks):
        strides = tuple(int(torch.Size(shape[i + 1:]).numel()) for i in range(len(shape)))
        out[key] = DTensor.from_local(t, mesh, placements, run_check=False,
                                      shape=torch.Size(shape), stride=strides)
    return out


def check_compatible(engine, meta: Dict[str, object], where: str, prefix: str = "") -> Dict[str, object]:
    """The dense part of DCP metadata ``meta`` (``state_dict_metadata`` of checkpoint ``where``: the keys
    under ``prefix``, ``prefix`` removed), after checking it holds every dense tensor of this model with
    the same global shape (``ConfigError`` naming the first difference otherwise)."""
    from engram_train.config.schema import ConfigError

    from megatron.core import parallel_state as ps

    from engram_train.parallel.sharding import _EXPERT, _global_name

    meta = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
    fix = "resume with the model settings it was saved with, or start a new run.dir"
    # Every key of the whole model (all ranks' experts too), so that a checkpoint of a bigger model
    # (more layers, more experts) is refused rather than partly loaded.
    ep = ps.get_expert_model_parallel_world_size()
    local_experts = (engine.module.config.num_moe_experts or 0) // ep
    expected = set()
    for local_name, p in engine.module.named_parameters():
        ranks = range(ep) if _EXPERT.match(local_name) else [0]
        for e in ranks:
            expected.update(f"model.{k}" for k, _ in _split(_global_name(local_name, e, local_experts), p)[2])
    buffers = _named_buffers(engine)
    expected.update(f"buffer.{name}" for name, _ in buffers)
    extra = sorted(k for k in meta if k.startswith(("model.", "buffer.")) and k not in expected)
    if extra:
        raise ConfigError(f"the checkpoint {where} holds {len(extra)} dense tensors this model "
                          f"lacks (first: {extra[0].split('.', 1)[1]!r}): it was saved from a bigger model or "
                          f"one with other options; {fix}")
    for name, t in buffers:
        saved = meta.get(f"buffer.{name}")
        if saved is None:
            raise ConfigError(f"the checkpoint {where} has no {name!r} that this model has "
                              f"(e.g. saved without model.moe_router_enable_expert_bias): {fix}")
        if tuple(saved.size) != tuple(t.shape):
            raise ConfigError(f"the checkpoint {where} holds {name} as {tuple(saved.size)}, "
                              f"this model as {tuple(t.shape)}: another model configuration; {fix}")
    for name, p in _named_params(engine):
        for key, shape in _split(name, p)[2]:
            saved = meta.get(f"model.{key}")
            if saved is None:
                raise ConfigError(f"the checkpoint {where} has no dense tensor {key!r} that "
                                  f"this model has: it was saved from another model; {fix}")
            if tuple(saved.size) != shape:
                raise ConfigError(f"the checkpoint {where} holds {key} as {tuple(saved.size)}, "
                                  f"this model as {shape}: another model configuration; {fix}")
    return meta


def _named_params(engine) -> List[Tuple[str, torch.nn.Parameter]]:
    """``(global name, parameter)`` of every parameter DeepSpeed trains, in a rank-independent order."""
    from megatron.core import parallel_state as ps

    from engram_train.parallel.sharding import _global_name

    model = engine.module
    local_experts = (model.config.num_moe_experts or 0) // ps.get_expert_model_parallel_world_size()
    ep_rank = ps.get_expert_model_parallel_rank()
    return [(_global_name(n, ep_rank, local_experts), p) for n, p in model.named_parameters() if p.requires_grad]


def _named_buffers(engine) -> List[Tuple[str, torch.Tensor]]:
    """``(global name, tensor)`` of the model's persistent buffers (``named_buffers`` less each owner's
    non-persistent ones), in a rank-independent order.  Not "every ``state_dict`` tensor that is not a
    parameter": Transformer Engine modules put a pickled ``_extra_state`` there, which is no buffer."""
    from megatron.core import parallel_state as ps

    from engram_train.parallel.sharding import _global_name

    model = engine.module
    local_experts = (model.config.num_moe_experts or 0) // ps.get_expert_model_parallel_world_size()
    ep_rank = ps.get_expert_model_parallel_rank()
    owners = dict(model.named_modules())
    out = []
    for name, t in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        if leaf not in owners[owner]._non_persistent_buffers_set:
            out.append((_global_name(name, ep_rank, local_experts), t))
    return out


def _inner(engine):
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if not isinstance(opt, DeepSpeedZeroOptimizer):
        raise NotImplementedError(f"dense checkpoints need DeepSpeed's ZeRO-1/2 optimizer, got {type(opt).__name__}")
    return opt


def _adam_step(opt) -> int:
    for hp in opt.single_partition_of_fp32_groups:
        st = opt.optimizer.state.get(hp, {})
        if "step" in st:
            return int(st["step"])
    return 0


class DenseState:
    """DeepSpeed's dense parameters and their ZeRO optimizer state as a DCP ``Stateful`` (module docstring).

    ``state_dict`` assembles the values (collective over each parameter's data-parallel group, in the
    same order on every rank); ``dcp.load`` fills those tensors in place with the checkpoint's, and
    ``load_state_dict`` hands them to DeepSpeed.  Adam's moments are always included (zeros before the
    first step), so that an engine that never stepped loads a checkpoint's moments too.
    """

    def __init__(self, engine):
        self.engine = engine
        self.opt = _inner(engine)

    def state_dict(self) -> Dict[str, object]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        opt, mesh = self.opt, _mesh()
        step = _adam_step(opt)
        if step:
            # DeepSpeed links each parameter to its optimizer-state fragments once, right after the first
            # group's first step, when later groups have no state yet; link every group now.
            for i, hp in enumerate(opt.single_partition_of_fp32_groups):
                lazy_init_hp_params_optimizer_state(opt.bit16_groups[i], hp, opt.optimizer.state)
        sd: Dict[str, object] = {"optim.step": step}
        for name, p in _named_params(self.engine):
            sd.update({f"model.{k}": v for k, v in _pieces(name, p, safe_get_full_fp32_param(p), mesh).items()})
            for m in MOMENTS:
                moment = safe_get_full_optimizer_state(p, m) if step else \
                    torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                sd.update({f"optim.{m}.{k}": v for k, v in _pieces(name, p, moment, mesh).items()})
        # Views of the live buffers: loading fills them in place.
        sd.update({f"buffer.{name}": t.detach() for name, t in _named_buffers(self.engine)})
        return sd

    @torch.no_grad()
    def load_state_dict(self, sd: Dict[str, object]) -> None:
        """``sd``: this object's ``state_dict`` filled by ``dcp.load`` (the moments may be absent: a
        checkpoint of the earlier layout written before the first step has none)."""
        from deepspeed.utils import safe_set_full_fp32_param
        from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

        opt = self.opt
        step = int(sd.get("optim.step", 0))
        for name, t in _named_buffers(self.engine):
            saved = sd[f"buffer.{name}"]
            if saved.data_ptr() != t.data_ptr():
                t.copy_(saved)
        for name, p in _named_params(self.engine):
            split, dim, keys = _split(name, p)
            value = {k: torch.cat([sd[f"{k}.{key}"].to_local() for key, _ in keys], dim)
                     for k in ["model"] + ([f"optim.{m}" for m in MOMENTS] if step else [])}
            p.data.copy_(value["model"].to(p.dtype))
            safe_set_full_fp32_param(p, value["model"])
            if step and p._hp_mapping is not None:
                lp = p._hp_mapping.lp_fragment_address
                p._hp_mapping.optim_fragment = {
                    m: value[f"optim.{m}"].flatten().narrow(0, lp.start, lp.numel).clone() for m in MOMENTS}
        if step:
            for i, hp in enumerate(opt.single_partition_of_fp32_groups):
                map_to_flat_opt_states(hp, opt.bit16_groups[i], opt.optimizer.state, list(MOMENTS))
                # torch's AdamW keeps its step as a float32 tensor: on the CPU, except for the fused and
                # capturable kernels (CUDA), which need it on the parameters' device.
                group = opt.optimizer.param_groups[i]
                device = hp.device if group.get("fused") or group.get("capturable") else "cpu"
                opt.optimizer.state[hp]["step"] = torch.tensor(float(step), dtype=torch.float32, device=device)
        log.info("dense state loaded (Adam step %d)", step)
