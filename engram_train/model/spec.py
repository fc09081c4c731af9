"""Layer specs of the backbone: megatron-core's GPT pieces, with Engram at the configured layers.

One function, :func:`decoder_block_spec`, picks the implementation of each
sub-module (the only place that does):

===========================  ==============================  ======================
                             norms (layer + final)           core attention
===========================  ==============================  ======================
CUDA with Transformer Engine stock TE spec (``TENorm``)       ``TEDotProductAttention``
CUDA without TE              :class:`cpu_backend.RMSNorm`    ``DotProductAttention``
CPU                          :class:`cpu_backend.RMSNorm`    :class:`cpu_backend.SDPAttention`
===========================  ==============================  ======================

Everything else is megatron's local building blocks: column/row-parallel
linear layers, SwiGLU MLP (``gated_linear_unit`` + silu in the config), RoPE
(built by ``GPTModel``; under ``model.attention=mla`` by the attention
itself), grouped-query attention or the MLA branch of megatron's
``get_gpt_layer_local_spec`` (see :func:`_attention_spec`), MoE with the
top-k router, shared experts when configured, ``SequentialMLP`` experts and
the token dispatcher named in the config.  Without TE, megatron's
torch norm cannot run under sequence parallelism and apex is optional, hence
our RMSNorm on CUDA too.

Where a layer needs more than megatron's ``TransformerLayer`` (an Engram block,
``model.hc_mult > 1`` mHC streams, ``model.recompute=full``) its spec is the same
with the module swapped for :class:`~engram_train.model.layer.BackboneLayer` and
the extra arguments passed as ``ModuleSpec.params``; under mHC the final norm is
:class:`~engram_train.model.hyper_connection.CollapseAndNorm` around the backend's
norm.  With none of these the stock layer is used unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
# megatron's plain replicated linear layer lives in its post-training package (0.16); the MLA test of
# tests/unit/test_deepseek_moe.py fails at import if an upgrade moves it.
from megatron.core.post_training.modelopt.layers import Linear as ReplicatedLinear
from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from engram_train.platform.cpu_backend import RMSNorm, SDPAttention, ensure_te_optional
from engram_train.model.hyper_connection import CollapseAndNorm
from engram_train.model.layer import BackboneLayer, EngramContext
from engram_train.platform.device import is_cpu


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


class LocalRMSNormSpecProvider(LocalSpecProvider):
    """megatron's local modules with an RMSNorm that works under sequence parallelism."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return RMSNorm


class CpuSpecProvider(LocalRMSNormSpecProvider):
    """The local modules plus an SDPA core attention (megatron's builds its mask on CUDA)."""

    def core_attention(self) -> type:
        return SDPAttention


def _attention_spec(backend: LocalSpecProvider, multi_latent: bool, qk_layernorm: bool) -> ModuleSpec:
    """Self-attention as in megatron's ``get_gpt_layer_local_spec``: GQA, or its MLA branch.

    One departure in the MLA branch: the down projections are replicated over TP (megatron's
    ``Linear``, what its TE spec gets from ``TELinear(parallel_mode="duplicated")``), not
    column-parallel as in the local spec.  With column-parallel down projections megatron gathers
    the latent over TP and hands each rank the whole rotary key, which only this rank's heads use;
    the gather's backward keeps this rank's slice of that gradient without summing the other heads'
    part, so ``linear_kv_down_proj`` trains on a wrong gradient under TP (measured once: 0.7% off the
    one-process gradient; tests/distributed/test_model_parallel.py's MLA variant at TP=2 checks the
    replicated version against one process).  Replicated, the rotary key is
    gathered over the sequence-parallel region, whose backward sums the heads' parts.
    """
    if multi_latent:
        latent_norm = backend.layer_norm(rms_norm=True, for_qk=True) if qk_layernorm else IdentityOp
        return ModuleSpec(
            module=MLASelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=MLASelfAttentionSubmodules(
                linear_q_proj=backend.column_parallel_linear(),
                linear_q_down_proj=ReplicatedLinear,
                linear_q_up_proj=backend.column_parallel_linear(),
                linear_kv_down_proj=ReplicatedLinear,
                linear_kv_up_proj=backend.column_parallel_linear(),
                core_attention=backend.core_attention(),
                linear_proj=backend.row_parallel_linear(),
                q_layernorm=latent_norm,
                kv_layernorm=latent_norm,
            ),
        )
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(),
            core_attention=backend.core_attention(),
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )


def _local_layer_spec(backend: LocalSpecProvider, num_experts: Optional[int], multi_latent: bool = False,
                      qk_layernorm: bool = False) -> ModuleSpec:
    """megatron's ``get_gpt_layer_local_spec`` (both attention branches) over an injectable backend."""
    norm = backend.layer_norm(rms_norm=True)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=_attention_spec(backend, multi_latent, qk_layernorm),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=get_mlp_module_spec_for_backend(backend=backend, num_experts=num_experts,
                                                moe_grouped_gemm=False),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _rng_neutral(cls: type) -> type:
    """``cls`` whose construction leaves the default RNG stream untouched.

    Expert weights are drawn afterwards by global expert index
    (``parallel.sharding.init_experts_by_global_index``); constructing a rank's
    *local* experts must not consume random numbers either, or every parameter
    built after the first MoE layer would depend on the EP size.
    """
    def __init__(self, *args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            cls.__init__(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def with_rng_neutral_experts(layer_spec: ModuleSpec) -> ModuleSpec:
    """``layer_spec`` with its MoE experts module made RNG-neutral (see :func:`_rng_neutral`)."""
    mlp = getattr(layer_spec.submodules, "mlp", None)
    experts = getattr(getattr(mlp, "submodules", None), "experts", None)
    if isinstance(experts, ModuleSpec) and isinstance(experts.module, type):
        experts = dataclasses.replace(experts, module=_rng_neutral(experts.module))
        mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules, experts=experts))
        layer_spec = dataclasses.replace(
            layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=mlp))
    return layer_spec


def moe_layer_pattern(config: TransformerConfig) -> List[bool]:
    """Which layers are MoE (megatron's rule for an integer ``moe_layer_freq``: every k-th from 0)."""
    if not config.num_moe_experts:
        return [False] * config.num_layers
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(config.num_layers)]
    return [bool(x) for x in freq]


def backbone_layer_spec(base: ModuleSpec, **params) -> ModuleSpec:
    """``base`` built as a :class:`BackboneLayer` with ``params`` (Engram slot, mHC, recompute)."""
    return ModuleSpec(
        module=BackboneLayer,
        submodules=base.submodules,
        params=dict(base.params or {}, **params),
        metainfo=dict(base.metainfo or {}),
    )


def decoder_block_spec(config: TransformerConfig, engram_blocks: Dict[int, dict],
                       context: EngramContext, table_provider=None, hc_mult: int = 1,
                       hc_sinkhorn_iters: int = 20, recompute_full: bool = False) -> TransformerBlockSubmodules:
    """The decoder's spec: one layer spec per layer (MoE or dense, Engram or not) and the final norm.

    ``engram_blocks`` maps 0-based layer ids to :class:`EngramBlock` keyword arguments;
    ``table_provider`` (see :class:`BackboneLayer`) supplies their tables.  ``hc_mult > 1``
    gives every layer mHC streams; ``recompute_full`` recomputes every layer's sublayers.
    """
    if is_cpu() or not have_transformer_engine():
        ensure_te_optional()   # megatron's router reads a name that only a TE import binds
        backend = CpuSpecProvider() if is_cpu() else LocalRMSNormSpecProvider()
        mla = dict(multi_latent=config.multi_latent_attention, qk_layernorm=config.qk_layernorm)
        dense = _local_layer_spec(backend, None, **mla)
        moe = _local_layer_spec(backend, config.num_moe_experts, **mla) if config.num_moe_experts else None
        final_norm = RMSNorm
    else:
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        mla = dict(multi_latent_attention=config.multi_latent_attention, qk_layernorm=config.qk_layernorm)
        dense = get_gpt_layer_with_transformer_engine_spec(num_experts=None, **mla)
        moe = (get_gpt_layer_with_transformer_engine_spec(num_experts=config.num_moe_experts,
                                                          moe_grouped_gemm=config.moe_grouped_gemm, **mla)
               if config.num_moe_experts else None)
        final_norm = TENorm

    if moe is not None:
        moe = with_rng_neutral_experts(moe)
    specs = [moe if is_moe else dense for is_moe in moe_layer_pattern(config)]
    for i, spec in enumerate(specs):
        params = {}
        if hc_mult > 1 or recompute_full:
            params.update(hc_mult=hc_mult, hc_sinkhorn_iters=hc_sinkhorn_iters, recompute=recompute_full)
        if i in engram_blocks:
            params.update(engram_layer_id=i, engram_block_kwargs=engram_blocks[i], engram_context=context,
                          engram_table_provider=table_provider)
        if params:
            specs[i] = backbone_layer_spec(spec, **params)
    if hc_mult > 1:
        final_norm = ModuleSpec(module=CollapseAndNorm, params=dict(norm=final_norm, hc_mult=hc_mult))
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=final_norm)
