"""Parameter counts of the model a config describes, computed from the config alone.

Nothing is built, so the paper-scale recipes (``engram_27b``: 27B parameters, an
alltoall dispatcher that needs CUDA) count on any machine.  One home for the
shapes; ``tools/count_params.py`` and ``tools/plan_memory.py`` both read it,
and tests/unit/test_plan_memory.py checks it against built models (GQA and MLA,
dense and MoE layers, shared experts, Engram blocks).

Every count is global (TP = EP = 1).  Each piece is also classified by how the
parallel layout splits it, which is what the memory planner needs:

* ``tp_split``: megatron's column/row-parallel weights and the vocabulary-
  parallel embedding and output layer (divided by TP);
* ``replicated``: norms, routers, MLA's down projections, Engram blocks, residual-stream mixing;
* ``experts``: routed experts (divided by EP x expert-TP).

``dense`` = ``tp_split + replicated`` is what ``EngramGPTModel.num_parameters``
calls dense: shared experts are in it (every token uses them), routed experts
are not.  Persistent buffers that are not parameters (the routers'
``expert_bias``, ``[num_experts]`` fp32 per MoE layer) are listed apart as
``expert_bias``.
"""

from __future__ import annotations

from typing import Dict


def moe_layer_count(model) -> int:
    """MoE layers (megatron's rule for an integer ``moe_layer_freq``: every k-th layer from 0)."""
    if not model.is_moe:
        return 0
    return sum(1 for i in range(model.num_layers) if i % model.moe_layer_freq == 0)


def attention_params(model) -> Dict[str, int]:
    """One layer's attention: ``{"tp_split": ..., "replicated": ...}`` (the layer's input norm excluded)."""
    h, heads = model.hidden_size, model.num_attention_heads
    if model.attention == "mla":
        # Down projections and latent norms are replicated over TP (model/spec.py), the rest split by head.
        q_dim = model.qk_head_dim + model.qk_pos_emb_head_dim
        if model.q_lora_rank is None:
            split, rep = h * heads * q_dim, 0                                    # linear_q_proj
        else:
            split = model.q_lora_rank * heads * q_dim                            # q up
            rep = h * model.q_lora_rank + model.q_lora_rank                      # q down, q latent RMSNorm
        rep += h * (model.kv_lora_rank + model.qk_pos_emb_head_dim) + model.kv_lora_rank   # kv down, kv norm
        split += model.kv_lora_rank * heads * (model.qk_head_dim + model.v_head_dim)   # kv up
        split += heads * model.v_head_dim * h                                   # output projection
        return dict(tp_split=split, replicated=rep)
    kv, groups = h // heads, model.num_query_groups or heads
    return dict(tp_split=h * (heads + 2 * groups) * kv + heads * kv * h, replicated=0)   # linear_qkv + proj


def engram_block_params(model, engram) -> int:
    """One Engram block's dense parameters (its table excluded): per branch a key projection with bias
    and three RMSNorms (key, query, conv), the shared value projection with bias, the depthwise conv."""
    if getattr(engram, "keys", "hashed") == "latent":   # Lngram's block: router, readout, conv
        from engram_train.lngram.build import block_params

        return block_params(model, engram)
    h, g = model.hidden_size, model.hc_mult   # Engram's branches are the residual streams
    e_dim = (engram.max_ngram - 1) * engram.n_embed_per_ngram
    return g * (e_dim * h + h) + (e_dim * h + h) + 3 * g * h + g * h * engram.kernel_size


def hyper_connection_params(model) -> int:
    """Residual-stream mixing of mHC (``model.hc_mult`` streams; 0 for the plain residual stream).

    Per sublayer (attention and MLP of every layer): the fp32 mixing weight ``(2n + n^2) x nH``, its
    scales (3) and biases (2n + n^2); before the final norm the stream collapse: ``n x nH``, one
    scale and ``n`` biases (``model/hyper_connection.py``).
    """
    n, h = model.hc_mult, model.hidden_size
    if n == 1:
        return 0
    mix = 2 * n + n * n
    return 2 * model.num_layers * (mix * n * h + 3 + mix) + (n * n * h + 1 + n)


def param_counts(model, engram, vocab: int) -> Dict[str, object]:
    """Global parameter counts of ``model``/``engram`` with a padded vocabulary of ``vocab`` rows.

    Keys: ``tp_split``, ``replicated``, ``experts``, ``dense``, ``total`` (Engram tables excluded:
    they depend on the prime search, :func:`engram_train.engram.hashing.prime_table_sizes`),
    ``active`` (what one token multiplies with or looks up in the embedding: ``total`` less the
    routed experts it is not sent to), ``expert_bias`` (buffer values) and ``pieces``, the same
    total by component.
    """
    h, L = model.hidden_size, model.num_layers
    moe = moe_layer_count(model)
    experts_n = model.num_experts or 0
    attn = attention_params(model)
    pieces = dict(
        embedding=vocab * h * (2 if model.untie_embeddings_and_output_weights else 1),
        attention=L * (attn["tp_split"] + attn["replicated"]),
        norms=(2 * L + 1) * h,
        dense_mlp=(L - moe) * 3 * h * model.ffn_hidden_size,                    # SwiGLU fc1 (h -> 2f) + fc2
        shared_experts=moe * 3 * h * model.moe_shared_expert_ffn_hidden_size if moe else 0,
        routers=moe * experts_n * h,
        routed_experts=moe * experts_n * 3 * h * model.moe_ffn_hidden_size,
        engram_blocks=len(engram.layer_ids) * engram_block_params(model, engram) if engram.enabled else 0,
        hyper_connections=hyper_connection_params(model),
    )
    tp_split = (pieces["embedding"] + L * attn["tp_split"] + pieces["dense_mlp"] + pieces["shared_experts"])
    experts = pieces["routed_experts"]
    total = sum(pieces.values())
    replicated = total - tp_split - experts
    inactive = moe * (experts_n - model.moe_router_topk) * 3 * h * model.moe_ffn_hidden_size if moe else 0
    return dict(tp_split=tp_split, replicated=replicated, experts=experts, dense=tp_split + replicated,
                total=total, active=total - inactive,
                expert_bias=moe * experts_n if model.moe_router_enable_expert_bias else 0, pieces=pieces)
