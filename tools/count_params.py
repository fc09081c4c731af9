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
debug_cpu to extra experts. Builds each model on one CPU process (no data needed; the
vocabulary is data.vocab_size padded like the trainer pads it).
"""

import argparse
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def count(overrides):
    from engram_train.config.store import compose

    cfg = compose(overrides)   # first: a bad override is reported before torch and megatron load

    import numpy as np

    from engram_train.engram.hashing import hasher_from_config
    from engram_train.model.gpt import build_model, padded_vocab_size
    from engram_train.parallel.state import destroy_parallel, init_parallel

    cfg.parallel.tensor_parallel = cfg.parallel.expert_parallel = 1
    cfg.parallel.sequence_parallel = None
    init_parallel(cfg.parallel, seed=0)
    try:
        vocab = padded_vocab_size(cfg.data.vocab_size, cfg.model.make_vocab_size_divisible_by, 1)
        tables = None
        if cfg.engram.enabled:
            # Table sizes depend on the compressed vocabulary: exact when the data is prepared,
            # else estimated as 75% of the raw vocabulary (what a BPE on English text compresses to).
            tok = os.path.join(cfg.data.dir, "tokenizer.json")
            if os.path.isfile(tok):
                from engram_train.engram.compress import load_or_build_compression

                lookup, compressed = load_or_build_compression(tok)
            else:
                print(f"(no {tok}: estimating the compressed vocabulary)")
                compressed = int(0.75 * cfg.data.vocab_size)
                lookup = np.minimum(np.arange(cfg.data.vocab_size), compressed - 1).astype(np.int64)
            tables = hasher_from_config(cfg.engram, lookup, compressed, pad_id=1, eos_id=0).table_sizes
        model = build_model(cfg.model, cfg.engram, cfg.parallel, vocab, tables)
        counts = model.num_parameters()
        m = cfg.model
        if m.is_moe:
            moe_layers = sum(1 for i in range(m.num_layers) if i % m.moe_layer_freq == 0)
            per_expert = counts["experts"] // (m.num_experts * moe_layers)
            inactive = per_expert * (m.num_experts - m.moe_router_topk) * moe_layers
        else:
            inactive = 0
        # Engram tables are looked up, not multiplied: only (N-1)*K rows per token are touched.
        counts["active_excl_tables"] = counts["total"] - counts["engram_tables"] - inactive
        embedding = vocab * m.hidden_size
        counts["flops_per_token"] = 2 * (counts["active_excl_tables"] - embedding) + \
            2 * m.num_layers * cfg.data.seq_length * m.hidden_size
        return counts
    finally:
        destroy_parallel()


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
