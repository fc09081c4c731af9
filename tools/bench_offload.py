"""Host-resident against device-resident Engram tables: step time, prefetch wait, host bytes per parameter.

    python tools/bench_offload.py                          # defaults below, ~3 minutes on 2 CPU cores
    python tools/bench_offload.py --steps 20 --json out.json
    python tools/bench_offload.py --optimizer sparse_adam_rowwise     # the compact row-wise state
    python tools/bench_offload.py --nproc 2 --extra engram.partition=all data.micro_batch_size=4
    python tools/bench_offload.py --experiment gpu_check --no-memory    # on one GPU (tools/gpu_check.sh)

Trains the same small Engram-MoE on the same generated corpus three times, one after another
in this one invocation, with ``engram.optimizer=sparse_adam`` (``--optimizer sparse_adam_rowwise``
for the row-wise second moment):

1. ``engram.residency=device`` with large tables (``--rows-per-head``),
2. ``engram.residency=host`` with the same tables,
3. ``engram.residency=host`` with small tables (the baseline for memory).

Reported (and written with ``--json PATH`` under these keys):

* ``step_time_ratio``: median step time of run 2 / run 1 over the steps after ``--warmup``
  (step time from the trainer's per-step ``tokens_per_s``);
* ``prefetch_wait_share``: the time the trainer waited for prefetched rows
  (``engram_prefetch/wait_s``), as a share of run 2's step time;
* ``update_wait_share``: the time the next forward waited for the overlapped host table step
  (``engram_prefetch/update_wait_s``), as a share of run 2's step time;
* ``h2d_gb_per_s``: bytes copied host to device by the prefetch (``engram_prefetch/h2d_bytes``) per
  second of run 2's step time: the rate the pipeline sustained (not the link's peak);
* ``host_bytes_per_param``: (peak RSS of run 2 - peak RSS of run 3) / (table parameters of
  run 2 - those of run 3), from the processes' ``VmHWM`` (summed over ranks with ``--nproc``): every host byte the tables cost
  (weights, moments, per-row step counts, staging, gradient rows), measured, not estimated (``--no-memory``
  skips run 3 and this figure);
* ``host_table_step_rows_per_s`` (``{threads: rows/s}``) and ``host_table_step_speedup`` (``{threads:
  rows/s over one thread's}``): the host table step alone (``TableSparseAdam`` as the store sets it up for host
  tables) on ``--step-rows`` unique rows of a ``--step-table-rows`` x 16 table, at each of
  ``--threads`` (``engram.host_threads``; default 1 2 4), rounds interleaved, median of ``--step-repeats``
  rounds; ``host_table_step_ms`` the median milliseconds per step at each count.  ``--step-only`` measures
  just this (seconds, no training).

``--experiment NAME`` trains that recipe (e.g. ``gpu_check``, a GPU-sized model) instead of the small
model of ``tools/measure_table_memory.py``; ``--corpus PATH`` uses that corpus instead of a generated one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tools.measure_table_memory import MODEL, _corpus, _run  # noqa: E402

TABLES = re.compile(r"Engram tables \((\w+), ([\d.]+)M of ([\d.]+)M parameters\)")


def _tokens_per_step(model) -> int:
    from engram_train.config.store import compose

    cfg = compose(model)
    return int(cfg.data.global_batch_size) * int(cfg.data.seq_length)


def _model(args) -> list:
    if args.experiment is None:
        return MODEL
    return [f"experiment={args.experiment}", "trainer.log_interval=1", "trainer.eval_interval=100000",
            "trainer.eval_iters=1", "trainer.save_interval=100000", "trainer.progress=false",
            "run.wandb_mode=disabled", "trainer.resume=false"]


def _train(name, rows, residency, args, work, data) -> dict:
    run_dir = os.path.join(work, name)
    model = _model(args)
    over = model + data + args.extra + [
        f"engram.optimizer={args.optimizer}", f"engram.residency={residency}",
        f"engram.table_size_per_ngram=[{rows},{rows}]", f"trainer.max_steps={args.steps}",
        "trainer.log_interval=1", f"run.dir={run_dir}"]
    tokens_per_step = _tokens_per_step(model + data + args.extra)
    log_path = os.path.join(work, f"{name}.log")
    # Every rank's peak and the whole table: bytes per parameter of the job, whatever the placement.
    peak = sum(_run(args.nproc, over, log_path, cpus=args.cpus).values())
    text = open(log_path).read()
    params = float(TABLES.search(text).group(3)) * 1e6
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"loss"' in line]
    step_s, wait_s, update_s, h2d = [], [], [], []
    for r in lines:
        if r["step"] <= args.warmup:
            continue
        # One line per step (log_interval=1): tokens_per_s = tokens per step / seconds of that step.
        step_s.append(tokens_per_step / r["tokens_per_s"])
        wait_s.append(r.get("engram_prefetch/wait_s", 0.0))
        update_s.append(r.get("engram_prefetch/update_wait_s", 0.0))
        h2d.append(r.get("engram_prefetch/h2d_bytes", 0.0))
    return {"peak_mib": peak, "params": params, "step_s": step_s, "wait_s": wait_s, "update_s": update_s,
            "h2d_bytes": h2d}


def host_step_scaling(threads, table_rows: int, step_rows: int, repeats: int, optimizer: str,
                      width: int = 16) -> dict:
    """The host table step's rows/s at each thread count, on one table, the same rows every round."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from engram_train.memory.optim import build_table_optimizer

    g = torch.Generator().manual_seed(0)
    opt = build_table_optimizer(optimizer, torch.randn(table_rows, width, generator=g) * 0.02)
    opt.host_blocks = True
    ids = torch.randperm(table_rows, generator=g)[:step_rows].sort().values
    grads = torch.randn(step_rows, width, generator=g)
    pools = {t: ThreadPoolExecutor(t, thread_name_prefix="engram-host-step") if t > 1 else None for t in threads}
    times = {t: [] for t in threads}
    for r in range(repeats + 1):   # round 0 warms the pools and the pages up, untimed
        for t in threads:
            opt.pool = pools[t]
            t0 = time.perf_counter()
            opt.step(ids, grads, 1e-3)
            if r:
                times[t].append(time.perf_counter() - t0)
    for p in pools.values():
        if p is not None:
            p.shutdown()
    ms = {t: 1e3 * statistics.median(v) for t, v in times.items()}
    rows_s = {t: step_rows / (m / 1e3) for t, m in ms.items()}
    return {"host_table_step_ms": {str(t): round(m, 3) for t, m in ms.items()},
            "host_table_step_ms_spread": {str(t): [round(1e3 * min(v), 3), round(1e3 * max(v), 3)]
                                    for t, v in times.items()},
            "host_table_step_rows_per_s": {str(t): round(x) for t, x in rows_s.items()},
            "host_table_step_speedup": {str(t): round(x / rows_s[threads[0]], 3) for t, x in rows_s.items()},
            "host_table_step_rows": step_rows, "host_table_step_table_rows": table_rows,
            "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}


def _print_scaling(sc: dict, optimizer: str) -> None:
    print(f"\n# Host table step ({optimizer}), {sc['host_table_step_rows']} unique rows of a "
          f"{sc['host_table_step_table_rows']}-row table, {sc['cpu_cores']} cores\n")
    print("| engram.host_threads | median ms (min-max) | rows/s | speed-up |")
    print("|---:|---:|---:|---:|")
    for t, ms in sc["host_table_step_ms"].items():
        lo, hi = sc["host_table_step_ms_spread"][t]
        print(f"| {t} | {ms:.2f} ({lo:.2f}-{hi:.2f}) | {sc['host_table_step_rows_per_s'][t]:,} | "
              f"{sc['host_table_step_speedup'][t]:.2f}x |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows-per-head", type=int, default=400000,
                   help="prime search start per head for the large tables (default 400000: ~100M parameters)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--optimizer", choices=("sparse_adam", "sparse_adam_rowwise"), default="sparse_adam",
                   help="the table optimizer of all three runs (default sparse_adam)")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing (default 2)")
    p.add_argument("--nproc", type=int, default=1,
                   help="ranks per run (default 1); e.g. --nproc 2 --extra engram.partition=all data.micro_batch_size=4")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", dest="json_path", default=None, help="write the three figures here")
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    p.add_argument("--experiment", default=None,
                   help="train this recipe (e.g. gpu_check) instead of the small model of measure_table_memory")
    p.add_argument("--corpus", default=None, help="a .jsonl/.txt corpus to train on (default: a generated one)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip run 3 (small host tables) and host_bytes_per_param: a shorter run")
    p.add_argument("--cpus", type=int, nargs="+", default=None,
                   help="run the training on these CPUs only (e.g. --cpus 1: the same core as a calibration)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4],
                   help="engram.host_threads counts of the host step scaling (default 1 2 4)")
    p.add_argument("--step-rows", type=int, default=1 << 17, help="unique rows per host step (default 131072)")
    p.add_argument("--step-table-rows", type=int, default=1 << 21, help="rows of its table (default 2097152)")
    p.add_argument("--step-repeats", type=int, default=9, help="timed rounds of the scaling (default 9)")
    p.add_argument("--step-only", action="store_true",
                   help="measure only the host step's rows/s per thread count (no training runs)")
    args = p.parse_args(argv)
    if args.steps <= args.warmup + 2:
        p.error("--steps must exceed --warmup by at least 3")
    if args.cpus and not set(args.cpus) <= os.sched_getaffinity(0):
        p.error(f"--cpus {' '.join(map(str, args.cpus))}: this process may run on CPUs "
                f"{sorted(os.sched_getaffinity(0))}; pick among them")
    if min(args.threads) < 1 or not 0 < args.step_rows <= args.step_table_rows:
        p.error("--threads must be >= 1 and 0 < --step-rows <= --step-table-rows")
    scaling = host_step_scaling(args.threads, args.step_table_rows, args.step_rows, args.step_repeats,
                                args.optimizer)
    if args.step_only:
        _print_scaling(scaling, args.optimizer)
        if args.json_path:
            with open(args.json_path, "w") as f:
                json.dump(scaling, f, indent=1)
        return
    work = args.workdir or tempfile.mkdtemp(prefix="engram_offload_")
    os.makedirs(work, exist_ok=True)
    corpus = args.corpus or os.path.join(work, "corpus.jsonl")
    if args.corpus is None:
        _corpus(corpus)
    data = ["data.corpus=files", f"data.files=[{corpus}]", f"data.dir={os.path.join(work, 'prepared')}"]
    runs = {}
    plan = [("device", args.rows_per_head, "device"), ("host", args.rows_per_head, "host")]
    if not args.no_memory:
        plan.append(("host_small", 64, "host"))
    for name, rows, residency in plan:
        print(f"[bench_offload] {name} ...", flush=True)
        runs[name] = _train(name, rows, residency, args, work, data)
    dev, host, small = runs["device"], runs["host"], runs.get("host_small")
    ratio = statistics.median(host["step_s"]) / statistics.median(dev["step_s"])
    wait_share = sum(host["wait_s"]) / sum(host["step_s"])
    update_share = sum(host["update_s"]) / sum(host["step_s"])
    h2d_gbs = sum(host["h2d_bytes"]) / sum(host["step_s"]) / 1e9
    bytes_per_param = None
    if small is not None:
        bytes_per_param = (host["peak_mib"] - small["peak_mib"]) * 2**20 / (host["params"] - small["params"])
    out = {"step_time_ratio": ratio, "prefetch_wait_share": wait_share, "host_bytes_per_param": bytes_per_param,
           "update_wait_share": update_share, "h2d_gb_per_s": h2d_gbs,
           "table_params": host["params"], "device_step_ms": 1e3 * statistics.median(dev["step_s"]),
           "host_step_ms": 1e3 * statistics.median(host["step_s"])}
    out.update(scaling)
    print(f"\n# Host- vs device-resident tables, {host['params'] / 1e6:.0f}M table parameters, {args.optimizer}, "
          f"{len(host['step_s'])} timed steps\n")
    print("| run | median step ms | peak RSS MiB |")
    print("|---|---:|---:|")
    for name, r in runs.items():
        print(f"| {name} | {1e3 * statistics.median(r['step_s']):.1f} | {r['peak_mib']:.0f} |")
    print(f"\nstep_time_ratio (host / device): {ratio:.3f}")
    print(f"prefetch_wait_share: {wait_share:.4f}")
    print(f"update_wait_share (waiting for the overlapped host table step): {update_share:.4f}")
    print(f"h2d_gb_per_s (prefetch bytes per second of step): {h2d_gbs:.3f}")
    if bytes_per_param is not None:
        print(f"host_bytes_per_param: {bytes_per_param:.2f}")
    _print_scaling(scaling, args.optimizer)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    from engram_train.errors import run_main

    run_main(main, prog="bench_offload")
