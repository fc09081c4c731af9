"""Bytes per rank of a config under every Engram table placement, computed, never allocated.

    python tools/plan_memory.py experiment=debug_cpu world=2 parallel.tensor_parallel=2
    python tools/plan_memory.py experiment=engram_27b world=64 [--json] [--compressed-vocab V]

``world=N`` is the number of ranks; every other argument is a Hydra override. The config is
validated like the trainer validates it (exit 2 with one line on a bad value). No process group,
no model, no table: parameter counts are analytic (checked against the real model in
tests/unit/test_plan_memory.py). Per rank (rank 0, which holds the largest shard):

- Engram tables (fp32, the table store's): weight, table optimizer state (``engram.optimizer``:
  2 fp32 moments, ``sparse_adam`` also an int64 step per row) and the sparse gradient bound
  ``min(shard rows, G) x (4*d + 8)`` bytes per layer, where ``G = global_batch_size x seq_length
  x heads`` is the ids one step can send to a shard (the reduction pools every replica's ids;
  a rank's own tokens reach ``G / dp`` of them). Gradient rows are fp32 plus an int64 id.
- Dense parameters (DeepSpeed's): params and gradients in the training dtype (bf16 or fp32;
  ``trainer.precision=auto`` is taken as bf16, what it means on CUDA), fp32 master + 2 fp32
  moments (12 B/param) partitioned over the data-parallel group from ZeRO-1, gradients
  partitioned from ZeRO-2, params from ZeRO-3. TP-split weights are divided by TP; experts by
  EP x TP (expert tensor parallel = TP, megatron's default) and ZeRO-partitioned over the
  expert data-parallel group (dp / EP); norms, routers and Engram blocks are replicated.
Not counted: activations, DeepSpeed buckets, communication buffers, allocator slack.
"""

import argparse
import json
import sys

PLACEMENTS = ("replicated", "tp", "all")


def padded_vocab(cfg):
    """The embedding rows ``build_model`` makes (``model.gpt.padded_vocab_size``); the tokenizer's
    vocabulary is ``data.vocab_size`` here (the size of the BPE the trainer trains)."""
    from engram_train.config.schema import ConfigError

    m, tp = cfg.model, cfg.parallel.tensor_parallel
    v = -(-(m.vocab_size or cfg.data.vocab_size) // m.make_vocab_size_divisible_by) * m.make_vocab_size_divisible_by
    if v % tp:
        raise ConfigError(f"model.make_vocab_size_divisible_by={m.make_vocab_size_divisible_by}: the padded "
                          f"vocabulary {v} must be divisible by parallel.tensor_parallel={tp}")
    return v


def dense_param_counts(model, engram, vocab):
    """Model parameters other than Engram tables (global, TP=EP=1), by how they are split:
    ``tp_split`` (column/row-parallel weights, embeddings), ``replicated`` (norms, routers, Engram
    blocks), ``experts``; ``dense`` = tp_split + replicated (what ``num_parameters()`` calls dense)."""
    h, L, heads = model.hidden_size, model.num_layers, model.num_attention_heads
    kv, groups = h // heads, model.num_query_groups or heads
    moe = sum(1 for i in range(L) if model.is_moe and i % model.moe_layer_freq == 0)
    attn = h * (heads + 2 * groups) * kv + heads * kv * h              # linear_qkv (GQA) + linear_proj
    tp_split = L * attn + (L - moe) * 3 * h * model.ffn_hidden_size   # SwiGLU fc1 (h -> 2f) + fc2
    tp_split += vocab * h * (2 if model.untie_embeddings_and_output_weights else 1)
    replicated = (2 * L + 1) * h + moe * (model.num_experts or 0) * h   # 2 norms/layer, final, routers
    if engram.enabled:
        e_dim = (engram.max_ngram - 1) * engram.n_embed_per_ngram
        block = 2 * (e_dim * h + h) + 3 * h + h * engram.kernel_size  # key/value proj + bias, 3 norms, conv
        replicated += len(engram.layer_ids) * block
    experts = moe * (model.num_experts or 0) * 3 * h * model.moe_ffn_hidden_size
    return dict(tp_split=tp_split, replicated=replicated, experts=experts, dense=tp_split + replicated,
                total=tp_split + replicated + experts)


def table_sizes(engram, compressed_vocab, data_vocab):
    """``{layer: primes}`` as the hasher makes them; sizes from V' scale with it (``hasher_from_config``)."""
    from engram_train.engram.hashing import prime_table_sizes

    if engram.table_size_per_ngram:
        start, note = list(engram.table_size_per_ngram), "engram.table_size_per_ngram"
    else:
        v = compressed_vocab or data_vocab
        start = [int(engram.table_size_multiplier * v)] * (engram.max_ngram - 1)
        note = (f"{engram.table_size_multiplier:g} x V'={v} (--compressed-vocab)" if compressed_vocab else
                f"{engram.table_size_multiplier:g} x data.vocab_size={v}: an upper bound, the compressed "
                "vocabulary V' is smaller; pass --compressed-vocab V' for exact sizes")
    return prime_table_sizes(engram.layer_ids, engram.max_ngram, engram.heads_per_ngram, start), note


def plan(cfg, world, compressed_vocab=None):
    from engram_train.config.schema import ConfigError
    from engram_train.memory.layout import placement_for, resolve_partition, shard_bytes, table_specs

    cfg.validate(world_size=world)
    m, e, p, d, t = cfg.model, cfg.engram, cfg.parallel, cfg.data, cfg.trainer
    if e.enabled and e.hc_mult != 1:
        raise ConfigError(f"engram.hc_mult={e.hc_mult}: the megatron backbone has one residual stream; set 1")
    if (m.num_query_groups or m.num_attention_heads) % p.tensor_parallel:
        raise ConfigError(f"model.num_query_groups={m.num_query_groups}: must be divisible by "
                          f"parallel.tensor_parallel={p.tensor_parallel}")
    tp, ep = p.tensor_parallel, p.expert_parallel
    dp = world // tp
    edp = dp // ep
    vocab = padded_vocab(cfg)
    out = dict(world=world, tensor_parallel=tp, data_parallel=dp, expert_parallel=ep, expert_data_parallel=edp,
               zero_stage=p.zero_stage, offload_optimizer=p.offload_optimizer, padded_vocab=vocab,
               precision="fp32" if t.precision == "fp32" else "bf16", precision_assumed=t.precision == "auto",
               default_partition=resolve_partition(e.partition, tp), placements={})

    counts = dense_param_counts(m, e, vocab)
    ceil = lambda a, b: -(-a // b)   # noqa: E731
    dense_rank = ceil(counts["tp_split"], tp) + counts["replicated"]
    expert_rank = ceil(counts["experts"], ep * tp)
    pb = 2 if out["precision"] == "bf16" else 4
    zero = p.zero_stage
    part = lambda n, g, stage: ceil(n, g) if zero >= stage else n   # noqa: E731
    dense = dict(counts=counts, params_per_rank=dense_rank + expert_rank,
                 params=pb * (part(dense_rank, dp, 3) + part(expert_rank, edp, 3)),
                 grads=pb * (part(dense_rank, dp, 2) + part(expert_rank, edp, 2)),
                 optimizer=(12 if zero or pb == 2 else 8) * (part(dense_rank, dp, 1) + part(expert_rank, edp, 1)))
    dense["total"] = dense["params"] + dense["grads"] + dense["optimizer"]
    out["dense"] = dense

    if not e.enabled:
        out["engram"] = None
        out["totals"] = {k: dense["total"] for k in PLACEMENTS}
        return out
    sizes, note = table_sizes(e, compressed_vocab, d.vocab_size)
    specs = table_specs(sizes, e.n_embed_per_ngram, e.heads_per_ngram)
    heads = (e.max_ngram - 1) * e.heads_per_ngram
    ids_step = d.global_batch_size * d.seq_length * heads
    out["engram"] = dict(optimizer=e.optimizer, table_sizes={str(k): v for k, v in sizes.items()}, sizes_from=note,
                         embed_dim=specs[e.layer_ids[0]].embed_dim, rows=sum(s.rows for s in specs.values()),
                         params=sum(s.numel for s in specs.values()), ids_per_step=ids_step,
                         ids_per_step_per_rank=ids_step // dp)
    for name in PLACEMENTS:
        pl = placement_for(name, world, 0, tp, 0)
        row = dict(parts=pl.parts, shard_rows=0, weight=0, optimizer=0, grad_max=0)
        for spec in specs.values():
            lo, hi = pl.rows_of(spec)
            b = shard_bytes(spec, pl, e.optimizer)
            row["shard_rows"] += hi - lo
            row["weight"] += b["weight"]
            row["optimizer"] += b["optimizer"]
            row["grad_max"] += min(hi - lo, ids_step) * (4 * spec.embed_dim + 8)
        row["total"] = row["weight"] + row["optimizer"] + row["grad_max"]
        out["placements"][name] = row
    out["totals"] = {k: v["total"] + dense["total"] for k, v in out["placements"].items()}
    return out


def fmt(b):
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def report(r):
    c, dn = r["dense"]["counts"], r["dense"]
    prec = r["precision"] + (" (trainer.precision=auto, assumed bf16 as on CUDA)" if r["precision_assumed"] else "")
    print(f"world {r['world']} = TP {r['tensor_parallel']} x DP {r['data_parallel']}; EP {r['expert_parallel']} "
          f"(expert DP {r['expert_data_parallel']}); ZeRO-{r['zero_stage']}; {prec}; padded vocab {r['padded_vocab']}")
    print(f"dense parameters: {c['total'] / 1e6:,.2f}M = TP-split {c['tp_split'] / 1e6:,.2f}M + replicated "
          f"{c['replicated'] / 1e6:,.2f}M + experts {c['experts'] / 1e6:,.2f}M; "
          f"per rank {dn['params_per_rank'] / 1e6:,.2f}M")
    print(f"  per rank: params {fmt(dn['params'])}, grads {fmt(dn['grads'])}, optimizer {fmt(dn['optimizer'])} "
          f"(fp32 master + 2 moments){' in host RAM (offload)' if r['offload_optimizer'] == 'cpu' else ''}, "
          f"total {fmt(dn['total'])}")
    e = r["engram"]
    if e is None:
        print("Engram: disabled")
        return
    print(f"Engram tables: {len(e['table_sizes'])} layers, {e['rows']:,} rows x {e['embed_dim']} = "
          f"{e['params']:,} params ({e['params'] / 1e9:.3f}B, fp32); sizes from {e['sizes_from']}")
    print(f"  table optimizer: {e['optimizer']}; gradient bound per layer: min(shard rows, "
          f"{e['ids_per_step']:,} ids/step) rows (this rank's own tokens: {e['ids_per_step_per_rank']:,})")
    cols = ("parts", "shard rows", "weight", "optimizer", "grad<=", "tables", "total/rank")
    print("\n" + f"{'placement':<16}" + "".join(f"{h:>13}" for h in cols))
    for name, p in r["placements"].items():
        label = name + (" (default)" if name == r["default_partition"] else "")
        vals = [str(p["parts"]), f"{p['shard_rows']:,}"] + [fmt(p[k]) for k in ("weight", "optimizer", "grad_max",
                                                                                 "total")]
        print(f"{label:<16}" + "".join(f"{v:>13}" for v in vals + [fmt(r["totals"][name])]))
    print(f"\ndefault placement: engram.partition -> {r['default_partition']}; per-rank total "
          f"{fmt(r['totals'][r['default_partition']])} (not counted: activations, buffers)")


def fail(message):
    print(f"plan_memory: {message}", file=sys.stderr)
    sys.exit(2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides and world=N (the number of ranks)")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    ap.add_argument("--compressed-vocab", type=int, default=None, metavar="V",
                    help="the tokenizer's compressed vocabulary size V' (default: data.vocab_size, an upper bound)")
    args = ap.parse_args()
    worlds = [o for o in args.overrides if o.startswith("world=")]
    overrides = [o for o in args.overrides if not o.startswith("world=")]
    if len(worlds) != 1 or not worlds[0][6:].isdigit() or int(worlds[0][6:]) < 1:
        fail(f"world: give the number of ranks once, as world=N (got {worlds or 'none'})")
    from hydra.errors import HydraException

    from engram_train.config.schema import ConfigError
    from engram_train.config.store import compose
    try:
        r = plan(compose(overrides), int(worlds[0][6:]), args.compressed_vocab)
    except (ConfigError, HydraException) as err:
        fail(str(err).strip().splitlines()[0])
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        report(r)


if __name__ == "__main__":
    main()
