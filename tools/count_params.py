"""Parameter counts of experiments side by side (total, Engram tables, experts, dense, active per token).

    python tools/count_params.py experiment=debug_cpu experiment=moe_baseline_cpu

Used to size iso-parameter baselines: moe_baseline_cpu gives the Engram parameters of
debug_cpu to extra experts. Builds each model on one CPU process (no data needed; the
vocabulary is data.vocab_size padded like the trainer pads it).
"""

import argparse
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def count(overrides):
    import numpy as np

    from engram_train.config.store import compose
    from engram_train.engram.hashing import hasher_from_config
    from engram_train.model.gpt import build_model, padded_vocab_size
    from engram_train.parallel.state import destroy_parallel, init_parallel

    cfg = compose(overrides)
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
            per_expert = counts["experts"] / (m.num_experts * sum(
                1 for i in range(m.num_layers) if i % m.moe_layer_freq == 0))
            inactive = per_expert * (m.num_experts - m.moe_router_topk) * m.num_layers
        else:
            inactive = 0
        # Engram tables are looked up, not multiplied: only (N-1)*K rows per token are touched.
        counts["active_excl_tables"] = counts["total"] - counts["engram_tables"] - inactive
        return counts
    finally:
        destroy_parallel()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiments", nargs="+", help="Hydra overrides, one experiment per argument "
                                                   "(comma-join several overrides for one experiment)")
    args = ap.parse_args()
    rows = [(e, count(e.split(","))) for e in args.experiments]
    keys = ["total", "engram_tables", "experts", "dense", "active_excl_tables"]
    print(f"{'experiment':<40}" + "".join(f"{k:>20}" for k in keys))
    for name, c in rows:
        print(f"{name:<40}" + "".join(f"{c.get(k, 0) / 1e6:>19.3f}M" for k in keys))


if __name__ == "__main__":
    main()
