"""Parameter counts of experiments side by side (total, Engram tables, experts, dense, active per token)
and the forward FLOPs per token of the active parameters.

    python tools/count_params.py experiment=debug_cpu experiment=moe_baseline_cpu
    python tools/count_params.py experiment=debug_cpu experiment=moe_baseline_cpu --json counts.json

active_excl_tables: every parameter a token multiplies with: all but the Engram tables (looked up,
not multiplied) and the experts it is not routed to (top-k of num_experts per MoE layer); the input
embedding (a lookup too) is included, as usual for parameter counts.
flops_per_token: forward FLOPs per token, Kaplan et al. (2020)'s 2 N + 2 n_layer n_ctx d_model with
N the active parameters less the input embedding and n_ctx = data.seq_length (training: about 3x).

Used to size iso-parameter baselines: moe_baseline_cpu gives the Engram parameters of
debug_cpu to extra experts, moe_27b those of engram_27b. Counts come from the configuration
(engram_train.model.counts, checked against built models by tests/unit/test_plan_memory.py), so
paper-scale recipes count on any machine; no data needed (the vocabulary is data.vocab_size padded
like the trainer pads it). "experts" are the routed experts; shared experts are in "dense".
"""

import argparse
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def count(overrides):
    from engram_train.config.store import compose

    cfg = compose(overrides)   # first: a bad override is reported before anything heavy loads

    from engram_train.model.counts import param_counts

    m = cfg.model
    vocab = -(-(m.vocab_size or cfg.data.vocab_size) // m.make_vocab_size_divisible_by) * m.make_vocab_size_divisible_by
    counts = param_counts(m, cfg.engram, vocab)
    tables = 0
    if cfg.engram.enabled and cfg.engram.keys == "latent":   # Lngram: R K^n rows per order, exact
        tables = len(cfg.engram.layer_ids) * cfg.engram.latent.table_rows() * cfg.engram.latent.memory_dim
    elif cfg.engram.enabled:
        from engram_train.engram.hashing import prime_table_sizes

        e = cfg.engram
        sizes = list(e.table_size_per_ngram)
        if not sizes:
            # Table sizes depend on the compressed vocabulary: exact when the data is prepared,
            # else estimated as 75% of the raw vocabulary (what a BPE on English text compresses to).
            tok = os.path.join(cfg.data.dir, "tokenizer.json")
            if os.path.isfile(tok):
                from engram_train.engram.compress import load_or_build_compression

                _, compressed = load_or_build_compression(tok)
            else:
                print(f"(no {tok}: estimating the compressed vocabulary)")
                compressed = int(0.75 * cfg.data.vocab_size)
            sizes = [int(e.table_size_multiplier * compressed)] * (e.max_ngram - 1)   # as hasher_from_config
        primes = prime_table_sizes(e.layer_ids, e.max_ngram, e.heads_per_ngram, sizes)
        tables = sum(map(sum, primes.values())) * (e.n_embed_per_ngram // e.heads_per_ngram)
    out = dict(total=counts["total"] + tables, engram_tables=tables, experts=counts["experts"],
               dense=counts["dense"], active_excl_tables=counts["active"])
    out["flops_per_token"] = 2 * (out["active_excl_tables"] - vocab * m.hidden_size) + \
        2 * m.num_layers * cfg.data.seq_length * m.hidden_size
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiments", nargs="+", help="Hydra overrides, one experiment per argument "
                                                   "(comma-join several overrides for one experiment)")
    ap.add_argument("--json", help="also write the counts to this file")
    args = ap.parse_args()
    rows = [(e, count(e.split(","))) for e in args.experiments]
    keys = ["total", "engram_tables", "experts", "dense", "active_excl_tables", "flops_per_token"]
    print(f"{'experiment':<40}" + "".join(f"{k:>20}" for k in keys))
    for name, c in rows:
        print(f"{name:<40}" + "".join(f"{c.get(k, 0) / 1e6:>19.3f}M" for k in keys))
    if len(rows) >= 2:
        (a, ca), (b, cb) = rows[0], rows[1]
        print(f"{b} / {a}: " + ", ".join(f"{k} {cb[k] / ca[k]:.3f}" for k in keys if ca.get(k)))
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({name: c for name, c in rows}, f, indent=2)


if __name__ == "__main__":
    from engram_train.errors import run_main

    run_main(main, prog="count_params")
