"""The Engram-MoE language model: megatron-core ``GPTModel`` built from our configs.

``build_model`` turns ``ModelConfig`` / ``EngramConfig`` / ``ParallelConfig``
into a megatron ``TransformerConfig`` and a decoder spec
(:mod:`engram_train.model.spec`) and wraps the resulting ``GPTModel`` in
:class:`EngramGPTModel`, whose forward takes the batch as the data loader
yields it (tokens, positions, labels, per-layer Engram hash ids) and returns
the per-token loss.

Call :func:`engram_train.parallel.state.init_parallel` first: megatron needs
its process groups to build layers, and on CPU that call activates the CPU
backend.  The model is not parallelism-aware beyond what megatron's layers
already are: ``engram_train.parallel.parallelize`` builds it with the table
store's tables (``table_provider``) and then applies expert placement and the
sequence-parallel gradient hooks from outside.

The MoE load-balancing loss is not part of the returned loss: megatron's
router attaches it to the graph (``MoEAuxLossAutoScaler``), so it adds its
gradient during ``backward`` of whatever the caller does with the per-token
loss, scaled by :meth:`EngramGPTModel.set_aux_loss_scale` (default 1; set it
to ``1 / gradient_accumulation_steps`` when the main loss is divided so).
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from engram_train.config.schema import ConfigError, EngramConfig, ModelConfig, ParallelConfig
from engram_train.model.layer import EngramContext, layer_id_of
from engram_train.platform.device import get_device, is_cpu

_EXPERT_PARAM = re.compile(r"\.mlp\.experts\.")


def padded_vocab_size(vocab_size: int, multiple: int, tensor_parallel: int) -> int:
    """``vocab_size`` rounded up to ``multiple`` (independent of TP, so checkpoints are too)."""
    padded = -(-vocab_size // multiple) * multiple
    if padded % tensor_parallel:
        raise ConfigError(f"model.make_vocab_size_divisible_by={multiple}: the padded vocabulary "
                          f"{padded} must be divisible by parallel.tensor_parallel={tensor_parallel}; "
                          "choose a multiple of the TP size")
    return padded


def engram_block_kwargs(model_cfg: ModelConfig, engram_cfg: EngramConfig,
                        engram_table_sizes: Optional[Dict[int, List[int]]]) -> Dict[int, dict]:
    """Validated ``EngramBlock`` arguments per 0-based Engram layer id ({} when Engram is off)."""
    if not engram_cfg.enabled:
        return {}
    bad = [i for i in engram_cfg.layer_ids if not 0 <= i < model_cfg.num_layers]
    if bad:
        raise ConfigError(f"engram.layer_ids={engram_cfg.layer_ids}: layer ids are 0-based and must be "
                          f"< model.num_layers={model_cfg.num_layers} (bad: {bad})")
    if engram_cfg.keys == "latent":   # Lngram: tables sized by the config, not by a hasher
        from engram_train.lngram.build import block_kwargs

        return block_kwargs(model_cfg, engram_cfg)
    n_tables = (engram_cfg.max_ngram - 1) * engram_cfg.heads_per_ngram
    out = {}
    for layer_id in engram_cfg.layer_ids:
        sizes = (engram_table_sizes or {}).get(layer_id)
        if sizes is None:
            raise ConfigError(f"engram_table_sizes has no entry for Engram layer {layer_id}: pass the "
                              "prime table sizes computed by the hashing component for every layer")
        if len(sizes) != n_tables:
            raise ConfigError(f"engram_table_sizes[{layer_id}] has {len(sizes)} sizes, expected "
                              f"(max_ngram-1)*heads_per_ngram = {n_tables}")
        out[layer_id] = dict(
            hidden_size=model_cfg.hidden_size, hc_mult=model_cfg.hc_mult, table_sizes=list(sizes),
            n_embed_per_ngram=engram_cfg.n_embed_per_ngram, heads_per_ngram=engram_cfg.heads_per_ngram,
            max_ngram=engram_cfg.max_ngram, kernel_size=engram_cfg.kernel_size,
            table_init_std=engram_cfg.table_init_std)
    return out


def transformer_config(model_cfg: ModelConfig, parallel_cfg: ParallelConfig,
                       params_dtype: torch.dtype = torch.float32):
    """megatron ``TransformerConfig`` of the backbone (``MLATransformerConfig`` under ``model.attention=mla``)."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    kwargs = dict(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        init_method_std=model_cfg.init_method_std,
        layernorm_epsilon=model_cfg.norm_epsilon,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=model_cfg.hidden_dropout,
        attention_dropout=model_cfg.attention_dropout,
        tensor_model_parallel_size=parallel_cfg.tensor_parallel,
        expert_model_parallel_size=parallel_cfg.expert_parallel,
        sequence_parallel=parallel_cfg.use_sequence_parallel and parallel_cfg.tensor_parallel > 1,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
    )
    if model_cfg.is_moe:
        kwargs.update(
            num_moe_experts=model_cfg.num_experts,
            moe_router_topk=model_cfg.moe_router_topk,
            moe_aux_loss_coeff=model_cfg.moe_aux_loss_coeff,
            moe_router_load_balancing_type=model_cfg.moe_router_load_balancing_type,
            moe_token_dispatcher_type=model_cfg.moe_token_dispatcher_type,
            moe_ffn_hidden_size=model_cfg.moe_ffn_hidden_size,
            moe_layer_freq=model_cfg.moe_layer_freq,
            moe_router_dtype="fp32",
            moe_shared_expert_intermediate_size=model_cfg.moe_shared_expert_ffn_hidden_size or None,
            moe_router_score_function=model_cfg.moe_router_score_function,
            moe_router_enable_expert_bias=model_cfg.moe_router_enable_expert_bias,
            moe_router_bias_update_rate=model_cfg.moe_router_bias_update_rate,
            moe_router_topk_scaling_factor=model_cfg.moe_router_topk_scaling_factor,
        )
    config_cls = TransformerConfig
    if model_cfg.attention == "mla":
        # Plain RoPE, as DeepSeek-V3 pretrains (YaRN, megatron's MLA default, only extends the context
        # afterwards; at YaRN's defaults it would rescale frequencies and logits at every length).
        config_cls = MLATransformerConfig
        kwargs.update(
            q_lora_rank=model_cfg.q_lora_rank,
            kv_lora_rank=model_cfg.kv_lora_rank,
            qk_head_dim=model_cfg.qk_head_dim,
            qk_pos_emb_head_dim=model_cfg.qk_pos_emb_head_dim,
            v_head_dim=model_cfg.v_head_dim,
            rotary_base=model_cfg.rotary_base,
            rope_type="rope",
            qk_layernorm=True,          # RMSNorm on the query and key/value latents, as DeepSeek-V2/V3's MLA
        )
    if model_cfg.recompute == "selective":
        # megatron's selective recompute (core attention by default); "full" is per layer in
        # BackboneLayer, which keeps the Engram block out of the recomputed region.
        kwargs.update(recompute_granularity="selective")
    if is_cpu():
        from engram_train.platform import cpu_backend

        cpu_backend.check_supported(model_cfg.moe_token_dispatcher_type if model_cfg.is_moe else "allgather")
        kwargs.update(cpu_backend.CPU_CONFIG_OVERRIDES)
    return config_cls(**kwargs)


class EngramGPTModel(nn.Module):
    """megatron ``GPTModel`` + Engram layers, called with one training batch.

    ``forward(tokens[B,T], position_ids[B,T], labels[B,T], engram_hash_ids={layer_id: [B,T,(N-1)*K]})``
    returns the per-token loss ``[B, T]`` (fp32), identical on the TP ranks.  ``engram_rows``: the
    rows of those lookups gathered ahead by the tables' owner, when a data-pipeline stage did
    (``batch[engram_train.data.batch.ENGRAM_ROWS]``); each Engram layer hands its block to its table.  With
    ``labels=None`` it returns megatron's logits ``[B, T, V/TP]`` instead.
    """

    def __init__(self, gpt, config, engram_context: EngramContext, vocab_size: int):
        super().__init__()
        self.gpt = gpt
        self.config = config
        self.engram_context = engram_context
        self.vocab_size = vocab_size
        self._tokens_per_expert: Dict[int, torch.Tensor] = {}
        for layer in self._layers():
            router = getattr(getattr(layer, "mlp", None), "router", None)
            if router is not None:
                router.register_forward_hook(self._count_routed_tokens(layer_id_of(layer.layer_number)))

    def forward(self, tokens, position_ids, labels=None, engram_hash_ids=None, attention_mask=None,
                engram_rows=None):
        with self.engram_context.step(engram_hash_ids, engram_rows):
            return self.gpt(tokens, position_ids, attention_mask, labels=labels)

    # --- introspection for metrics --------------------------------------------------------------

    def _layers(self):
        return list(self.gpt.decoder.layers)

    def engram_blocks(self) -> Dict[int, nn.Module]:
        """``{layer_id (0-based): EngramBlock}``."""
        return {l.engram_layer_id: l.engram for l in self._layers() if getattr(l, "engram", None) is not None}

    def engram_gate_means(self) -> Dict[int, torch.Tensor]:
        """Mean Engram gate of the last forward per layer (detached 0-d tensors; no sync)."""
        return {i: b.last_gate_mean for i, b in self.engram_blocks().items() if b.last_gate_mean is not None}

    def _count_routed_tokens(self, layer_id: int):
        def hook(_module, _inputs, outputs):
            routing_map = outputs[1]
            self._tokens_per_expert[layer_id] = routing_map.detach().sum(dim=0, dtype=torch.float32)
        return hook

    def moe_tokens_per_expert(self) -> Dict[int, torch.Tensor]:
        """Tokens routed to each expert in the last forward, per MoE layer (this rank's tokens, [E])."""
        return dict(self._tokens_per_expert)

    def moe_load_balance(self, group=None) -> Dict[str, float]:
        """Load balance of the last forward's routing, as metrics (one host sync).

        Per MoE layer ``moe_load/layer{id}/max_over_mean`` and ``.../cv`` of the
        tokens per expert (1.0 and 0.0 are perfect balance) and their means over
        layers ``moe_load/max_over_mean``, ``moe_load/cv``.  Counts this rank's
        tokens; pass a process group (e.g. the data-parallel group) to sum the
        counts over it first (one small all-reduce).
        """
        stats = self.moe_load_stats(group)
        if not stats:
            return {}
        return dict(zip(stats, torch.stack(list(stats.values())).tolist()))

    def moe_load_stats(self, group=None) -> Dict[str, torch.Tensor]:
        """:meth:`moe_load_balance` as 0-d tensors on the device (no sync): the trainer pulls them with
        its other metrics, on log steps only."""
        if not self._tokens_per_expert:
            return {}
        layers = sorted(self._tokens_per_expert)
        counts = torch.stack([self._tokens_per_expert[i] for i in layers])
        if group is not None:
            torch.distributed.all_reduce(counts, group=group)
        mean = counts.mean(dim=1).clamp_min(1e-9)
        stats = torch.stack([counts.max(dim=1).values / mean, counts.std(dim=1, unbiased=False) / mean], 1)
        out = {}
        for layer_id, (mom, cv) in zip(layers, stats.unbind(0)):
            out[f"moe_load/layer{layer_id}/max_over_mean"] = mom
            out[f"moe_load/layer{layer_id}/cv"] = cv
        out["moe_load/max_over_mean"], out["moe_load/cv"] = stats.mean(dim=0).unbind(0)
        return out

    def _bias_routers(self) -> List[nn.Module]:
        return [layer.mlp.router for layer in self._layers()
                if getattr(getattr(getattr(layer, "mlp", None), "router", None), "expert_bias", None) is not None]

    @torch.no_grad()
    def update_expert_bias(self, apply: Optional[torch.Tensor] = None) -> None:
        """Auxiliary-loss-free balancing: move every MoE layer's expert bias once per optimizer step.

        Call it after the step's last backward.  megatron's router counts the tokens it routes to each
        expert while gradients are on (``local_tokens_per_expert``; not in evaluation), and megatron
        applies the update in ``finalize_model_grads``, which this project does not use (DeepSpeed owns
        the dense gradients).  So this is megatron's ``_update_router_expert_bias`` step: its
        ``get_updated_expert_bias`` sums the counts over the tensor x data-parallel group (every rank
        routes its own tokens) and sets ``bias += rate * sign(mean load - load)``; then the counts
        restart, as megatron's ``reset_model_temporary_tensors`` does.  A no-op without expert bias.
        ``apply`` (a 0-d bool tensor, no host sync): where false the bias keeps its value (a step whose
        update was dropped as non-finite); the counts restart either way.
        """
        routers = self._bias_routers()
        if not routers:
            return
        from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

        counts = torch.stack([r.local_tokens_per_expert for r in routers])
        biases = get_updated_expert_bias(counts, torch.stack([r.expert_bias for r in routers]),
                                         self.config.moe_router_bias_update_rate)
        for router, bias in zip(routers, biases):
            if apply is not None:
                bias = torch.where(apply.to(bias.device), bias, router.expert_bias)
            router.expert_bias.copy_(bias)
            router.local_tokens_per_expert.zero_()

    def num_parameters(self) -> Dict[str, int]:
        """Parameters held by this rank: ``total``, ``engram_tables``, ``experts``, ``dense`` (the rest)."""
        total = tables = experts = 0
        for name, p in self.named_parameters():
            total += p.numel()
            if getattr(p, "engram_table", False):
                tables += p.numel()
            elif _EXPERT_PARAM.search(name):
                experts += p.numel()
        return dict(total=total, engram_tables=tables, experts=experts, dense=total - tables - experts)

    @staticmethod
    def set_aux_loss_scale(scale: float) -> None:
        """Scale of the MoE aux-loss gradient (megatron's ``MoEAuxLossAutoScaler``; default 1)."""
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(float(scale), device=get_device()))


def build_model(model_cfg: ModelConfig, engram_cfg: EngramConfig, parallel_cfg: ParallelConfig,
                vocab_size: int, engram_table_sizes: Optional[Dict[int, List[int]]],
                params_dtype: torch.dtype = torch.float32, table_provider=None) -> EngramGPTModel:
    """Build this rank's part of the model (needs ``init_parallel`` first).

    ``vocab_size`` is the tokenizer's; ``model.vocab_size`` overrides it.  The
    embedding is padded to a multiple of ``model.make_vocab_size_divisible_by``.
    ``engram_table_sizes``: ``{layer_id: [prime per (n-gram order, head)]}``
    from the hashing component (docs/engram.md §1.3).  ``table_provider(layer_id,
    table_sizes, embed_dim)`` supplies each Engram block's table (the table
    store's); without it every block builds a whole table of its own.  Call
    :func:`engram_train.parallel.parallelize.parallelize` on the result before
    training under TP or EP.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel

    from engram_train.model.spec import decoder_block_spec

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("build_model needs megatron's process groups: call "
                           "engram_train.parallel.state.init_parallel(cfg.parallel, seed) first")
    if (ps.get_tensor_model_parallel_world_size(), ps.get_expert_model_parallel_world_size()) != (
            parallel_cfg.tensor_parallel, parallel_cfg.expert_parallel):
        raise RuntimeError("init_parallel ran with other TP/EP sizes than parallel_cfg")
    if parallel_cfg.expert_parallel > 1 and not model_cfg.is_moe:
        raise ConfigError(f"parallel.expert_parallel={parallel_cfg.expert_parallel}: needs model.num_experts > 0")

    blocks = engram_block_kwargs(model_cfg, engram_cfg, engram_table_sizes)
    config = transformer_config(model_cfg, parallel_cfg, params_dtype)
    vocab = padded_vocab_size(model_cfg.vocab_size or vocab_size, model_cfg.make_vocab_size_divisible_by,
                              parallel_cfg.tensor_parallel)
    context = EngramContext()
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(config, blocks, context, table_provider,
                                                  hc_mult=model_cfg.hc_mult,
                                                  hc_sinkhorn_iters=model_cfg.hc_sinkhorn_iters,
                                                  recompute_full=model_cfg.recompute == "full"),
        vocab_size=vocab,
        max_sequence_length=model_cfg.max_seq_length,
        share_embeddings_and_output_weights=not model_cfg.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=model_cfg.rotary_base,
    )
    init_replicated_linears(gpt, config)
    return EngramGPTModel(gpt, config, context, vocab).to(get_device())


@torch.no_grad()
def init_replicated_linears(gpt, config) -> None:
    """Draw the weights of megatron's replicated ``Linear`` layers (MLA's down projections in our spec,
    :mod:`engram_train.model.spec`) with ``config.init_method``, as every other megatron linear layer
    is drawn: that class keeps torch's default initialization and ignores the init method it is
    given.  The draws come from the default generator, in the same state on every TP/EP rank after
    the build (megatron's CPU initialization draws whole weights), so replicas agree."""
    from megatron.core.post_training.modelopt.layers import Linear

    for module in gpt.modules():
        if type(module) is Linear:
            config.init_method(module.weight)
