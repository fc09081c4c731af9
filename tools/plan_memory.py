"""Bytes per rank of a config under every Engram table placement, computed, never allocated.

    python tools/plan_memory.py experiment=debug_cpu world=2 parallel.tensor_parallel=2
    python tools/plan_memory.py experiment=engram_27b world=64 [--json] [--compressed-vocab V]
    python tools/plan_memory.py experiment=engram_100b_host_4node world=32 ranks_per_node=8

``world=N`` is the number of ranks, ``ranks_per_node=K`` (default 8) how many of them share a
host (used by ``engram.residency=host`` only); every other argument is a Hydra override. The config is
validated like the trainer validates it (exit 2 with one line on a bad value). No process group,
no model, no table: parameter counts are analytic (``engram_train.model.counts``, checked against the
real model in tests/unit/test_plan_memory.py) and printed by component (embedding, GQA or MLA
attention, norms, dense MLPs, shared experts, routers, routed experts, Engram blocks, mHC stream
mixing) with the MoE routing (score function, scaling, expert-bias values). Per rank (rank 0, which
holds the largest shard):

- Engram tables (fp32, the table store's): weight, table optimizer state (``engram.optimizer``:
  2 fp32 moments, ``sparse_adam`` also an int32 step per row) and the sparse gradient bound
  ``min(shard rows, G) x (4*d + 8)`` bytes per layer, where ``G = global_batch_size x seq_length
  x heads`` is the ids one step can send to a shard (the reduction pools every replica's ids;
  a rank's own tokens reach ``G / dp`` of them). Gradient rows are fp32 plus an int64 id.
- Dense parameters (DeepSpeed's): params and gradients in the training dtype (bf16 or fp32;
  ``trainer.precision=auto`` is taken as bf16, what it means on CUDA), fp32 master + 2 fp32
  moments (12 B/param) partitioned over the data-parallel group from ZeRO-1, gradients
  partitioned from ZeRO-2, params from ZeRO-3. TP-split weights are divided by TP; experts by
  EP x TP (expert tensor parallel = TP, megatron's default) and ZeRO-partitioned over the
  expert data-parallel group (dp / EP); norms, routers, MLA's down projections and latent norms
  and Engram blocks are replicated; shared experts are split over TP like a dense MLP. The routers' expert-bias buffers
  (fp32, one value per expert and MoE layer) are not parameters and are too small to count.
Not counted: activations, DeepSpeed buckets, communication buffers, allocator slack.

``engram.residency=host`` (``memory/host.py``): table weights and ``sparse_adam`` state live in host
RAM, so the tool also prints, per placement:

- device bytes per rank: the dense parameters with their ZeRO state, the sparse gradient bound
  above (gradient rows are reduced on the device) and the prefetched row blocks: per Engram layer
  and micro-batch in flight (``prefetch_depth + 1`` blocks), at most ``min(layer rows, B)`` unique
  rows x ``4*d`` bytes plus the int64 inverse index of ``B = micro_batch_size x seq_length x heads``
  entries. A micro-batch's rows come from every shard, so the bound takes the layer's rows, not
  the shard's (the same under ``replicated``).
- host bytes per node: the table shards (weight + optimizer state) of the ``K`` ranks of node 0
  (ranks ``0..K-1``, which hold the largest shards), plus each rank's pinned staging, the same
  bytes as its device row blocks (CUDA; a CPU run has no staging and its "device" is host RAM).
  Without ``engram.host_dir`` every rank holds its own shard: under ``replicated`` a node holds
  ``K`` copies, under ``tp`` its ranks' TP shards (``K / TP`` copies when TP divides K), under
  ``all`` ``K / world`` of the table. With ``engram.host_dir`` (memory-mapped files, e.g. on
  ``/dev/shm``) the ranks of a node that hold the same shard map one copy: the node's shards
  count once each.
  Not counted on the host: the sorted unique ids of each block (8 bytes per unique row), the
  step's transient host copy of the reduced gradient rows, the data loader, DeepSpeed's
  offloaded state (``parallel.offload_optimizer=cpu`` is counted on the device, as above).

``--json`` prints ``plan()``'s dict. Keys: ``placements`` (per rank and placement: ``weight``,
``optimizer``, ``grad_max``, ``total``, wherever they live), ``totals`` (per rank: tables + dense),
``dense`` (``counts`` with ``pieces`` by component and ``expert_bias``), ``engram``, ``model`` (attention and
MoE routing settings); with ``engram.residency=host`` also ``residency``, ``host_bytes_per_node``
and ``device_bytes_per_rank`` (``{placement: bytes}``) and ``host``: ``ranks_per_node``,
``node_ranks``, ``nodes``, ``prefetch_depth``, ``blocks_in_flight``, ``ids_per_micro_batch`` and
``placements`` (per placement: ``parts``, ``shard_rows``, ``tables_per_rank``, ``tables_per_node``,
``table_copies_per_node``, ``staging_per_rank``, ``staging_per_node``, ``host_bytes_per_node``,
``row_blocks``, ``grad_max``, ``dense``, ``device_bytes_per_rank``).
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


def plan(cfg, world, compressed_vocab=None, ranks_per_node=8):
    from engram_train.config.schema import ConfigError
    from engram_train.memory.layout import placement_for, resolve_partition, shard_bytes, table_specs
    from engram_train.model.counts import param_counts

    cfg.validate(world_size=world)
    m, e, p, d, t = cfg.model, cfg.engram, cfg.parallel, cfg.data, cfg.trainer
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

    counts = param_counts(m, e, vocab)
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
    out["model"] = dict(attention=m.attention, num_experts=m.num_experts or 0, topk=m.moe_router_topk,
                        score_function=m.moe_router_score_function,
                        topk_scaling_factor=m.moe_router_topk_scaling_factor,
                        bias_update_rate=m.moe_router_bias_update_rate)

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
    if e.residency == "host":
        host_plan(out, e, d, specs, world, tp, ranks_per_node)
    return out


def host_plan(out, e, d, specs, world, tp, ranks_per_node):
    """``engram.residency=host``: host bytes per node and device bytes per rank, per placement."""
    from engram_train.config.schema import ConfigError
    from engram_train.memory.layout import placement_for, shard_bytes

    k = ranks_per_node
    if world > k and world % k:
        raise ConfigError(f"ranks_per_node={k}: must divide world={world} (or exceed it: one node)")
    node_ranks = min(k, world)
    heads = (e.max_ngram - 1) * e.heads_per_ngram
    ids_mb = d.micro_batch_size * d.seq_length * heads
    in_flight = e.prefetch_depth + 1
    # Per layer and block: unique rows (fp32) on the device + the int64 inverse index of every id.
    blocks = in_flight * sum(min(s.rows, ids_mb) * s.embed_dim * 4 + 8 * ids_mb for s in specs.values())
    rows = sum(s.rows for s in specs.values())
    host = dict(ranks_per_node=k, node_ranks=node_ranks, nodes=-(-world // k), prefetch_depth=e.prefetch_depth,
                host_dir=e.host_dir,
                blocks_in_flight=in_flight, ids_per_micro_batch=ids_mb, placements={})
    for name, p in out["placements"].items():
        node_tables = node_rows = 0
        mapped = set()   # with engram.host_dir, the node's ranks that hold one shard map one copy of it
        for rank in range(node_ranks):                  # node 0: ranks 0..K-1 hold the largest shards
            pl = placement_for(name, world, rank, tp, rank % tp)
            for layer_id, spec in specs.items():
                lo, hi = pl.rows_of(spec)
                if e.host_dir is not None:
                    if (layer_id, lo, hi) in mapped:
                        continue
                    mapped.add((layer_id, lo, hi))
                b = shard_bytes(spec, pl, e.optimizer)
                node_tables += b["weight"] + b["optimizer"]
                node_rows += hi - lo
        h = dict(parts=p["parts"], shard_rows=p["shard_rows"], tables_per_rank=p["weight"] + p["optimizer"],
                 tables_per_node=node_tables, table_copies_per_node=node_rows / rows,
                 staging_per_rank=blocks, staging_per_node=node_ranks * blocks,
                 row_blocks=blocks, grad_max=p["grad_max"], dense=out["dense"]["total"])
        h["host_bytes_per_node"] = h["tables_per_node"] + h["staging_per_node"]
        h["device_bytes_per_rank"] = h["dense"] + h["row_blocks"] + h["grad_max"]
        host["placements"][name] = h
    out["residency"] = "host"
    out["host"] = host
    out["host_bytes_per_node"] = {n: h["host_bytes_per_node"] for n, h in host["placements"].items()}
    out["device_bytes_per_rank"] = {n: h["device_bytes_per_rank"] for n, h in host["placements"].items()}


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
    m = r["model"]
    attention = "MLA" if m["attention"] == "mla" else "GQA"
    pieces = {"embedding": "embedding + output", "attention": attention + " attention", "norms": "norms",
              "dense_mlp": "dense MLPs", "shared_experts": "shared experts", "routers": "routers",
              "routed_experts": f"routed experts ({m['num_experts']}, top-{m['topk']})",
              "engram_blocks": "Engram blocks", "hyper_connections": "stream mixing (mHC)"}
    print("  by component: " + ", ".join(f"{label} {c['pieces'][k] / 1e6:,.2f}M" for k, label in pieces.items()
                                         if c["pieces"][k]))
    routing = f"{m['score_function']} scores" + (f" x {m['topk_scaling_factor']:g}" if m["topk_scaling_factor"] else "")
    if c["expert_bias"]:
        routing += (f", expert-bias balancing ({c['expert_bias']:,} fp32 bias values, replicated, "
                    f"checkpointed; update rate {m['bias_update_rate']:g})")
    if m["num_experts"]:
        print(f"  MoE routing: {routing}; active per token {c['active'] / 1e6:,.2f}M of the "
              f"{c['total'] / 1e6:,.2f}M above (Engram tables apart)")
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
    if r.get("residency") == "host":
        report_host(r)


def report_host(r):
    h, default = r["host"], r["default_partition"]
    k, n = h["ranks_per_node"], h["node_ranks"]
    node = f"ranks 0-{n - 1}" if n > 1 else "rank 0"
    print(f"\nengram.residency=host: table weights and {r['engram']['optimizer']} state live in host RAM (weight and optimizer "
          f"above: host bytes per rank; total/rank above counts them, device per rank below does not); "
          f"{h['nodes']} node(s) of ranks_per_node={k}, node 0 = {node}")
    print(f"  device row blocks: prefetch_depth {h['prefetch_depth']} -> {h['blocks_in_flight']} per layer in "
          f"flight, each <= min(layer rows, {h['ids_per_micro_batch']:,} ids/micro-batch) unique rows + the int64 "
          "inverse index; pinned host staging = the same bytes (CUDA)")
    cols = ("shard rows", "tables/rank", "copies/node", "tables/node", "staging/node", "host/node")
    print("\n" + f"{'host per node':<22}" + "".join(f"{c:>14}" for c in cols))
    for name, p in h["placements"].items():
        label = name + (" (default)" if name == default else "")
        vals = [f"{p['shard_rows']:,}", fmt(p["tables_per_rank"]), f"{p['table_copies_per_node']:.4g}",
                fmt(p["tables_per_node"]), fmt(p["staging_per_node"]), fmt(p["host_bytes_per_node"])]
        print(f"{label:<22}" + "".join(f"{v:>14}" for v in vals))
    cols = ("dense", "row blocks", "grad<=", "device/rank")
    print("\n" + f"{'device per rank':<22}" + "".join(f"{c:>14}" for c in cols))
    for name, p in h["placements"].items():
        label = name + (" (default)" if name == default else "")
        vals = [fmt(p[c]) for c in ("dense", "row_blocks", "grad_max", "device_bytes_per_rank")]
        print(f"{label:<22}" + "".join(f"{v:>14}" for v in vals))
    if h["host_dir"] is None:
        print(f"\n- without engram.host_dir every rank holds its own shard: replicated tables cost "
              f"ranks_per_node={k} copies per node (engram.host_dir=/dev/shm/... maps one per node).")
    else:
        print(f"\n- engram.host_dir={h['host_dir']}: the ranks of a node that hold the same shard map one copy.")
    print("- a CPU run has no pinned staging, and its device row blocks are host RAM too.")
    print(f"\ndefault placement: engram.partition -> {default}; host RAM per node "
          f"{fmt(h['placements'][default]['host_bytes_per_node'])}, device per rank "
          f"{fmt(h['placements'][default]['device_bytes_per_rank'])} (not counted: activations, buffers, "
          "data loader)")


def fail(message):
    from engram_train.errors import UserError

    raise UserError(message)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, world=N (the number of ranks) and "
                    "ranks_per_node=K (ranks per host, default 8; engram.residency=host)")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    ap.add_argument("--compressed-vocab", type=int, default=None, metavar="V",
                    help="the tokenizer's compressed vocabulary size V' (default: data.vocab_size, an upper bound)")
    args = ap.parse_args()
    worlds = [o for o in args.overrides if o.startswith("world=")]
    per_node = [o for o in args.overrides if o.startswith("ranks_per_node=")]
    overrides = [o for o in args.overrides if not o.startswith(("world=", "ranks_per_node="))]
    if len(worlds) != 1 or not worlds[0][6:].isdigit() or int(worlds[0][6:]) < 1:
        fail(f"world: give the number of ranks once, as world=N (got {worlds or 'none'})")
    if len(per_node) > 1 or (per_node and (not per_node[0][15:].isdigit() or int(per_node[0][15:]) < 1)):
        fail(f"ranks_per_node: give the ranks per node at most once, as ranks_per_node=K >= 1 (got {per_node})")
    ranks_per_node = int(per_node[0][15:]) if per_node else 8
    from engram_train.config.store import compose

    r = plan(compose(overrides), int(worlds[0][6:]), args.compressed_vocab, ranks_per_node)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        report(r)


if __name__ == "__main__":
    from engram_train.errors import run_main

    run_main(main, prog="plan_memory")
