"""megatron-core 0.16 on a CPU: the whole adaptation, in one place.

megatron-core is written for CUDA.  Its GPT + MoE stack computes correctly on
CPU tensors with gloo once a short list of CUDA assumptions is covered
(docs/platform.md).  This module covers them and nothing else.  Of its
contents, CUDA runs use only the device-agnostic :class:`RMSNorm`, and only
when Transformer Engine is absent (see :mod:`engram_train.model.spec`).

Nothing happens on import.  :func:`activate_cpu_backend` applies the
process-wide parts and is called by
:func:`engram_train.parallel.state.init_parallel` when the process has no
CUDA device; it refuses to run where CUDA is available and is idempotent.

What is adapted, and how (module supplied through the spec > config value >
patch, in that order of preference):

Supplied through the layer spec (``spec.py`` picks them when on CPU)
  * :class:`SDPAttention` replaces ``DotProductAttention``: the stock core
    attention builds its causal mask with ``device="cuda"``
    (``transformer/utils.py``) and its softmax fusion is CUDA-only.  It
    also serves multi-latent attention (``MLASelfAttention`` hands the core
    attention query/key heads wider than its value heads, ``k_channels`` /
    ``v_channels``, and YaRN's softmax scale); nothing else of MLA needs
    adapting: its projections are megatron's column/row-parallel layers,
    its latent norms are :class:`RMSNorm`, and its RoPE (``RotaryEmbedding``
    or ``YarnRotaryEmbedding``) computes on CPU once patch 1 below
    supplies ``torch.cuda.current_device``.
  * :class:`RMSNorm` replaces ``WrappedTorchNorm`` (layer norms *and* the
    block's final norm): the torch wrapper asserts ``not sequence_parallel``,
    and apex/TE norms are not available.  Its weight carries
    ``sequence_parallel`` like megatron's own SP-capable norms, so
    :mod:`engram_train.parallel.sp_grads` can find it.

TransformerConfig values (:data:`CPU_CONFIG_OVERRIDES`)
  * ``use_cpu_initialization=True``: the GPU path allocates every weight with
    ``device=torch.cuda.current_device()`` and initializes it from the CUDA
    RNG tracker.
  * every CUDA fusion off (bias-activation, softmax, RoPE, cross-entropy,
    router, permute, gradient-accumulation).
  * ``add_bias_linear=False`` (also our model's choice): with biases the
    local linear layers hit an in-place-on-view autograd error on CPU
    (measured, docs/platform.md).
  The alltoall token dispatcher creates a ``torch.cuda.Stream`` in its
  constructor, so :func:`check_supported` rejects it (allgather works).

Patches (:func:`activate_cpu_backend`; each listed in :data:`PATCHES`)
  1. ``torch.cuda.current_device`` returns ``torch.device("cpu")`` while no
     CUDA device exists.  megatron evaluates it as a *device argument* in
     about a dozen places on our path: the MoE router moves its weight to it
     on every call, the global memory buffer allocates from it (sequence-
     parallel linear layers), the sequence-parallel gather/scatter mappings,
     the all-to-all-v mapping, RoPE moves ``inv_freq`` to it.  On a machine
     without CUDA the original can only raise, so redirecting it changes no
     working behaviour, and one redirection is smaller and less brittle than
     rewriting each of those functions.
  2. ``megatron.core.transformer.moe.moe_utils.te_general_gemm = None`` when
     the name is missing: it is bound only when Transformer Engine imports,
     yet ``router_gating_linear`` tests it against ``None`` (NameError
     without TE).  Also applied on CUDA without TE by
     :func:`ensure_te_optional`, because it is a TE gap, not a CPU one.
     Same function, same reason: ``multi_latent_attention.HAVE_TE = False``
     when TE does not import.  megatron's TE extension module imports
     without TE by building its classes on a ``MagicMock``, so MLA's own
     import succeeds and sets ``HAVE_TE = True``; its constructor then
     calls ``isinstance(linear_proj, TELinear)`` with that mock and raises
     ``TypeError``.  With the flag false the check is skipped (it only
     concerns TE's fp8/fp4 linear layers) and nothing else reads it.
  3. megatron's CUDA RNG tracker (``tensor_parallel.random``'s module state)
     is replaced by :class:`CpuRNGStatesTracker`, which forks the CPU
     generator instead of the CUDA one; seeded by
     :func:`cpu_model_parallel_manual_seed` with megatron's seed offsets.
  4. ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``
     return an empty state / do nothing while no CUDA device exists.  megatron's
     activation checkpointing (``tensor_parallel.checkpoint``: selective and
     full recompute) saves and restores the CPU generator, the CUDA generator
     and the tracker's states; there is no CUDA generator here, and the other
     two (the tracker's are CPU states, patch 3) are all a CPU replay needs.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

#: TransformerConfig fields a CPU run needs (the reasons are in the module docstring).
CPU_CONFIG_OVERRIDES: Dict[str, object] = dict(
    use_cpu_initialization=True,        # GPU init allocates on torch.cuda.current_device() via the CUDA RNG
    add_bias_linear=False,              # biases hit an in-place-on-view autograd error on CPU (docs/platform.md)
    # CUDA kernels (most are off by default; pinned so a changed megatron default cannot reach CPU):
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    apply_rope_fusion=False,
    cross_entropy_loss_fusion=False,
    gradient_accumulation_fusion=False,
    persist_layer_norm=False,
    moe_router_fusion=False,
    moe_permute_fusion=False,
    moe_grouped_gemm=False,             # GroupedMLP needs the grouped_gemm CUDA package
)

#: Names of the patches applied by :func:`activate_cpu_backend`, in order.
PATCHES: List[str] = [
    "torch.cuda.current_device -> cpu device (no CUDA device in this process)",
    "megatron.core.transformer.moe.moe_utils.te_general_gemm = None (unbound without TE); "
    "megatron.core.transformer.multi_latent_attention.HAVE_TE = False (mocked TE classes without TE)",
    "megatron.core.tensor_parallel.random tracker -> CpuRNGStatesTracker",
    "megatron.core.tensor_parallel.random CUDA generator state get/set -> empty/no-op (no CUDA device)",
]

_ACTIVE = False
_ORIGINAL_CURRENT_DEVICE = None


def is_active() -> bool:
    return _ACTIVE


def check_supported(moe_token_dispatcher_type: str) -> None:
    """Fail fast on megatron features that cannot run on CPU."""
    if moe_token_dispatcher_type != "allgather":
        from engram_train.config.schema import ConfigError

        raise ConfigError(
            f"model.moe_token_dispatcher_type={moe_token_dispatcher_type!r}: megatron's "
            "alltoall dispatcher creates a torch.cuda.Stream and cannot run on CPU; "
            "use model.moe_token_dispatcher_type=allgather")


def activate_cpu_backend() -> None:
    """Apply the process-wide CPU adaptations (idempotent; never on a CUDA machine)."""
    global _ACTIVE, _ORIGINAL_CURRENT_DEVICE
    if torch.cuda.is_available():
        raise RuntimeError("activate_cpu_backend() called in a process that has CUDA; "
                           "CUDA runs use the stock megatron-core paths")
    if _ACTIVE:
        return

    # Patch 1.
    _ORIGINAL_CURRENT_DEVICE = torch.cuda.current_device

    def current_device():
        if torch.cuda.is_available():  # defensive: never shadow a real device
            return _ORIGINAL_CURRENT_DEVICE()
        return torch.device("cpu")

    torch.cuda.current_device = current_device

    # Patch 2.
    ensure_te_optional()

    # Patch 3.
    install_cpu_rng_tracker()

    # Patch 4.
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None
    _ACTIVE = True


def ensure_te_optional() -> None:
    """Cover megatron's two Transformer Engine gaps where TE is absent (idempotent): bind
    ``moe_utils.te_general_gemm = None`` and set ``multi_latent_attention.HAVE_TE = False``."""
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        multi_latent_attention.HAVE_TE = False


# ----------------------------------------------------------------------------------------------
# RNG


class CpuRNGStatesTracker(CudaRNGStatesTracker):
    """megatron's named RNG streams, kept as CPU generator states.

    ``fork(name)`` swaps the process's CPU generator state for the named one
    and back, exactly like the CUDA tracker does with the CUDA generator, so
    dropout inside tensor-parallel regions and expert initialization draw
    from the same streams megatron would use.
    """

    def __init__(self):
        super().__init__(use_cudagraphable_rng=False, is_inference_rng_tracker=False)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        outer_name = self._current_state_name
        if outer_name != "default-rng":
            self.states_[outer_name] = outer
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            if outer_name != "default-rng":
                outer = self.states_[outer_name]
            torch.set_rng_state(outer)
            self._current_state_name = outer_name


def install_cpu_rng_tracker() -> None:
    """Make megatron's ``get_cuda_rng_tracker()`` return a :class:`CpuRNGStatesTracker`."""
    from megatron.core.tensor_parallel import random as mrandom

    if not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
        mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def cpu_model_parallel_manual_seed(seed: int) -> None:
    """megatron's ``model_parallel_cuda_manual_seed`` for the CPU generator (same stream seeds)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    install_cpu_rng_tracker()
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    torch.manual_seed(seed)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME,
                seed + 2718 + ps.get_tensor_model_parallel_rank())
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME,
                seed + 1024 + 100 * ps.get_expert_model_parallel_rank()
                + ps.get_expert_tensor_parallel_rank())


# ----------------------------------------------------------------------------------------------
# Modules supplied through the spec


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last dimension, computed in fp32, usable under sequence parallelism.

    Under sequence parallelism each tensor-parallel rank normalizes its own
    tokens; the weight is replicated and marked ``sequence_parallel=True`` so
    its gradient (a sum over this rank's tokens only) is all-reduced over the
    TP group (:mod:`engram_train.parallel.sp_grads`).  Signature of megatron's
    norm modules, so a spec can name it wherever a norm goes.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        if getattr(config, "normalization", "RMSNorm") != "RMSNorm":
            raise ValueError(f"RMSNorm supplied for normalization={config.normalization!r}")
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype,
                       device="cpu" if config.use_cpu_initialization else None))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class SDPAttention(torch.nn.Module):
    """Core attention by ``F.scaled_dot_product_attention`` (causal), megatron's interface.

    Takes ``query [sq, b, np, hn]``, ``key/value [sk, b, ng, hn]`` (this TP
    rank's heads; grouped-query heads are repeated) and returns
    ``[sq, b, np*hn]``; under multi-latent attention the value width
    (``v_channels``) may differ from the query/key width (``k_channels``).  ``attention_mask`` follows megatron's convention
    (``True`` = masked out); without one the attention is causal.
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 k_channels: Optional[int] = None, v_channels: Optional[int] = None,
                 cp_comm_type=None, pg_collection=None):
        super().__init__()
        from megatron.core.transformer.enums import AttnMaskType

        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"SDPAttention is causal-only, got attn_mask_type={attn_mask_type}")
        tp = pg_collection.tp.size() if pg_collection is not None else 1
        self.config = config
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        # Multi-latent attention passes its own widths: query/key heads of qk_head_dim + qk_pos_emb_head_dim,
        # value heads of v_head_dim, and a softmax scale for that query width.
        k_dim = k_channels if k_channels is not None else config.kv_channels
        self.head_dim = v_channels if v_channels is not None else config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(k_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor attention bias")
        rep = self.heads // self.groups
        if rep > 1:
            key = key.repeat_interleave(rep, dim=2)
            value = value.repeat_interleave(rep, dim=2)
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None if attention_mask is None else ~attention_mask
        dropout = self.dropout if self.training else 0.0
        rng = contextlib.nullcontext()
        if dropout > 0.0 and not self.config.sequence_parallel:
            from megatron.core import tensor_parallel

            rng = tensor_parallel.get_cuda_rng_tracker().fork()
        with rng:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=mask is None, scale=self.softmax_scale)
        sq, b = out.shape[2], out.shape[0]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads * self.head_dim)
