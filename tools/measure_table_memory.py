"""How much of each rank's peak resident memory the Engram tables take, per placement.

    python tools/measure_table_memory.py                       # 1 process vs TP=2 (engram.partition=tp)
    python tools/measure_table_memory.py --rows-per-head 800000 --extra engram.optimizer=sparse_adam

Runs ``engram-train`` four times on a small generated corpus: one process and
``torchrun`` with TP=2, each with large tables (``--rows-per-head``) and with
small ones, a few steps each.  Every rank logs its peak resident memory
(``VmHWM``) when it finishes; a rank's *table share* is its peak with large
tables minus its peak with small tables, so everything else (Python,
megatron, DeepSpeed, the backbone) cancels.  Printed: each run's per-rank
peak, the table shares, and the ratio of the TP=2 share to the single
process's (ideal 0.5: each rank holds half the rows and half the optimizer
state).  Memory is measured from the processes, never estimated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PEAK = re.compile(r"rank (\d+) finished at step \d+: peak RSS ([\d.]+) MiB")

MODEL = ["experiment=debug_cpu", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
         "model.ffn_hidden_size=128", "model.moe_ffn_hidden_size=64", "model.max_seq_length=64",
         "engram.layer_ids=[0,1]", "engram.n_embed_per_ngram=64", "engram.heads_per_ngram=4",
         "data.seq_length=64", "data.micro_batch_size=4", "data.global_batch_size=8", "data.vocab_size=512",
         "data.valid_fraction=0.05", "trainer.warmup_steps=1", "trainer.log_interval=1",
         "trainer.eval_interval=1000", "trainer.eval_iters=2", "trainer.save_interval=1000",
         "trainer.progress=false", "run.wandb_mode=disabled", "trainer.resume=false"]


def _corpus(path: str) -> None:
    rng = random.Random(0)
    words = "the king queen lord lady sword crown night day love death fair foul speak hear thou art".split()
    with open(path, "w") as f:
        for _ in range(300):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(120))}) + "\n")


@contextlib.contextmanager
def pinned(cpus):
    """The calling thread (and the processes it starts) on ``cpus`` for the block; None or empty: unchanged."""
    mask = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, mask)


def _run(nproc: int, overrides, log_path: str, cpus=None) -> dict:
    """Train once (``nproc`` ranks); ``cpus``: the CPUs the run may use (default: this process's)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    if "DS_ACCELERATOR" not in env:
        import torch

        if not torch.cuda.is_available():   # DeepSpeed would look for CUDA; on a GPU machine it finds it
            env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "engram_train.train.main", *overrides]
    # The children inherit this thread's CPUs: set around the launch (a preexec_fn can deadlock in a
    # process with threads).
    with open(log_path, "w") as log, pinned(cpus):
        rc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    text = open(log_path).read()
    if rc != 0:
        sys.exit(f"measure_table_memory: a run failed (rc={rc}); see {log_path}")
    peaks = {int(r): float(m) for r, m in PEAK.findall(text)}
    if len(peaks) != nproc:
        sys.exit(f"measure_table_memory: found {len(peaks)} peak RSS lines for {nproc} ranks in {log_path}")
    return peaks


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows-per-head", type=int, default=400000,
                   help="prime search start per head for the large tables (default 400000: ~100M parameters)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--workdir", default=None, help="where runs and logs go (default: a temporary directory)")
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = p.parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="engram_mem_")
    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, "corpus.jsonl")
    _corpus(corpus)
    data = [f"data.corpus=files", f"data.files=[{corpus}]", f"data.dir={os.path.join(work, 'prepared')}"]
    sizes = {"large": args.rows_per_head, "small": 64}
    peaks = {}
    for layout, nproc, extra in (("1 process", 1, []), ("TP=2", 2, ["parallel.tensor_parallel=2"])):
        for size, rows in sizes.items():
            name = f"{layout}, {size} tables"
            print(f"[measure] {name} ...", flush=True)
            over = MODEL + data + extra + args.extra + [
                f"engram.table_size_per_ngram=[{rows},{rows}]", f"trainer.max_steps={args.steps}",
                f"run.dir={os.path.join(work, name.replace(' ', '_').replace(',', '').replace('=', ''))}"]
            peaks[(layout, size)] = _run(nproc, over, os.path.join(work, f"{layout}_{size}.log".replace(" ", "_")))
    print(f"\n# Peak resident memory (VmHWM, MiB) per rank; large tables start their prime search at "
          f"{args.rows_per_head} rows per head\n")
    print("| layout | rank | large tables | small tables | table share |")
    print("|---|---:|---:|---:|---:|")
    shares = {}
    for layout in ("1 process", "TP=2"):
        for rank in sorted(peaks[(layout, "large")]):
            large, small = peaks[(layout, "large")][rank], peaks[(layout, "small")][rank]
            shares[(layout, rank)] = large - small
            print(f"| {layout} | {rank} | {large:.0f} | {small:.0f} | {large - small:.0f} |")
    single = shares[("1 process", 0)]
    worst = max(v for (layout, _), v in shares.items() if layout == "TP=2")
    print(f"\nTP=2 table share of the worst rank / single process: {worst / single:.2f} (ideal 0.50)")


if __name__ == "__main__":
    from engram_train.errors import run_main

    run_main(main, prog="measure_table_memory")
