"""The paper's backbone options side by side: step time and peak memory of mHC streams and recompute.

    python tools/bench_backbone.py                       # 4 variants of debug_cpu, ~4 minutes on 2 CPU cores
    python tools/bench_backbone.py --steps 12 --json backbone.json
    python tools/bench_backbone.py --variants hc1 hc4_full --extra data.seq_length=1024 model.max_seq_length=1024

Trains the same Engram-MoE (``experiment=debug_cpu`` at ``--seq-length`` tokens per sequence, on
a generated corpus) once per variant, one after another in this one invocation, through the real
entry point:

* ``hc1``: one residual stream, no recompute (the plain model);
* ``hc4``: ``model.hc_mult=4`` (mHC), no recompute;
* ``hc4_selective``: mHC with megatron's selective recompute (core attention);
* ``hc4_full``: mHC with every layer's sublayers recomputed (Engram blocks kept).

Reported per variant (and written with ``--json PATH``): the median step time over the steps after
``--warmup`` (from the trainer's per-step ``tokens_per_s``), the peak resident memory of the
process (``VmHWM``, logged by the trainer when it finishes) and both as ratios to the first
variant.  Timings on a shared machine are noisy: compare ratios from one invocation only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tools.measure_table_memory import _corpus, _run  # noqa: E402

VARIANTS = {
    "hc1": ["model.hc_mult=1", "model.recompute=none"],
    "hc4": ["model.hc_mult=4", "model.recompute=none"],
    "hc4_selective": ["model.hc_mult=4", "model.recompute=selective"],
    "hc4_full": ["model.hc_mult=4", "model.recompute=full"],
}


def _train(name, args, work, data) -> dict:
    run_dir = os.path.join(work, name)
    tokens_per_step = args.micro_batch * args.seq_length
    over = ["experiment=debug_cpu", *data, *VARIANTS[name], f"data.seq_length={args.seq_length}",
            f"model.max_seq_length={args.seq_length}", f"data.micro_batch_size={args.micro_batch}",
            f"data.global_batch_size={args.micro_batch}", f"trainer.max_steps={args.steps}",
            "trainer.log_interval=1", "trainer.eval_interval=100000", "trainer.eval_iters=1",
            "trainer.save_interval=100000", "trainer.progress=false", "run.wandb_mode=disabled",
            f"run.dir={run_dir}", *args.extra]
    peak = _run(1, over, os.path.join(work, f"{name}.log"))[0]
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"tokens_per_s"' in line]
    times = [tokens_per_step / r["tokens_per_s"] for r in rows if r["step"] > args.warmup]
    if not times:
        sys.exit(f"bench_backbone: no step after --warmup={args.warmup} in {run_dir}; raise --steps")
    return {"step_s": statistics.median(times), "peak_rss_mib": peak, "steps_timed": len(times)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--workdir", default=None, help="where runs and logs go (default: a temporary directory)")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = p.parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="engram_backbone_")
    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, "corpus.jsonl")
    _corpus(corpus)
    data = ["data.corpus=files", f"data.files=[{corpus}]", f"data.dir={os.path.join(work, 'prepared')}"]
    results = {}
    for name in args.variants:
        print(f"[bench_backbone] {name} ...", flush=True)
        results[name] = _train(name, args, work, data)
    base = results[args.variants[0]]
    for r in results.values():
        r["step_time_ratio"] = r["step_s"] / base["step_s"]
        r["peak_rss_ratio"] = r["peak_rss_mib"] / base["peak_rss_mib"]
    print(f"\n# {args.micro_batch} x {args.seq_length} tokens per step, median over steps > {args.warmup}; "
          f"ratios to {args.variants[0]}\n")
    print("| variant | step (s) | step ratio | peak RSS (MiB) | peak ratio |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['step_s']:.3f} | {r['step_time_ratio']:.2f} | {r['peak_rss_mib']:.0f} | "
              f"{r['peak_rss_ratio']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens_per_step": args.micro_batch * args.seq_length, "variants": results}, f, indent=2)


if __name__ == "__main__":
    main()
