"""What Engram costs a training step: the Engram model against the same backbone with ``engram=none``.

    python tools/bench_engram_overhead.py                           # debug_cpu, ~4 minutes on 2 cores
    python tools/bench_engram_overhead.py --windows 12 --window-steps 4 --json overhead.json
    python tools/bench_engram_overhead.py --clock cpu --torch-threads 1   # a CPU shared with other jobs
    python tools/bench_engram_overhead.py --experiment gpu_check --extra engram.residency=device   # one GPU

Both variants are built in this one process (two trainers, each with its own run directory) and
trained through the trainer's own step (``Trainer.train_step``: data and hashing, forward,
backward, the one norm, DeepSpeed's step and the table store's step), in alternating windows of
``--window-steps`` steps, the order swapped from pair to pair (ABBA), after ``--warmup`` untimed
steps of each: drift of a shared machine hits both.  A step is timed in wall time (the device
synchronized on CUDA).  The ratio of a pair of windows is the Engram window's median step over
the backbone window's; reported: the median over the pairs and its spread (min, max), the median
step of each variant over all windows, and the ratio per active FLOP (``tools/count_params.py``:
the Engram projections add active FLOPs the backbone does not have).

Then ``--split-steps`` more Engram steps run with timers at the boundaries of Engram's parts, set
from here (the library carries no timers), summed per step:

``hashing``            the loader's hash ids of the step's micro-batches (in this process when
                       ``data.num_workers=0``, the default)
``gather_exchange``    the table lookup (``StoreTable``: gather, and any exchange of rows between
                       ranks) and its backward (gradient rows handed to the store)
``projections_gate``   the rest of the Engram block: key/value projections, norms, gate, and their
                       backward
``conv``               the short convolution, forward and backward
``table_step``         the table store's gradient reduction and optimizer step

The backward parts are read from gradient hooks on the block's tensors (autograd runs a block's
backward in reverse creation order, so the boundaries are the conv output's, the conv input's and
the embeddings' gradients); on CUDA every timer synchronizes the device, which is why the split is
taken in steps of its own and not in the timed ones.  ``other`` is the Engram step minus the
parts minus the backbone step: what the parts do not explain (the residual add, layout copies,
the dense optimizer over the block's parameters, noise).

On a shared CPU, ``--clock cpu`` (with one torch thread) times the main thread's CPU time instead
of wall time: other processes then stretch neither variant.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PARTS = ("hashing", "gather_exchange", "projections_gate", "conv", "table_step")
VARIANTS = {"engram": [], "no_engram": ["engram=none"]}


def _overrides(args, variant: str, run_dir: str) -> list:
    return [f"experiment={args.experiment}", *VARIANTS[variant], *args.extra,
            "trainer.max_steps=100000", "trainer.eval_interval=100000", "trainer.save_interval=100000",
            "trainer.log_interval=100000", "trainer.progress=false", "trainer.resume=false",
            "run.wandb_mode=disabled", f"run.dir={run_dir}"]


# ---- timers on Engram's parts, set from outside the library -------------------------------------------

class _Split:
    """Per-part seconds of the current step, from timers on Engram's boundaries (only while ``on``)."""

    def __init__(self, cuda: bool, clock: str = "wall"):
        import torch

        self.cuda = cuda
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        # "cpu": the main thread's CPU time, which other processes on a shared machine do not inflate
        # (with one torch thread the whole CPU step runs on the main thread)
        self.clock = time.thread_time if clock == "cpu" else time.perf_counter
        self.on = False
        self.acc = {p: 0.0 for p in PARTS}
        self.marks = {}

    def now(self) -> float:
        self.sync()
        return self.clock()

    def add(self, part: str, seconds: float) -> None:
        if self.on:
            self.acc[part] += seconds

    def timed(self, part: str, fn):
        def wrapper(*a, **kw):
            if not self.on:
                return fn(*a, **kw)
            t0 = self.now()
            out = fn(*a, **kw)
            self.add(part, self.now() - t0)
            return out
        return wrapper

    def pop(self) -> dict:
        out, self.acc = self.acc, {p: 0.0 for p in PARTS}
        return out


def _instrument(trainer, split: _Split) -> None:
    store = trainer.table_store
    if store is not None:
        store.reduce_gradients = split.timed("table_step", store.reduce_gradients)
        store.step = split.timed("table_step", store.step)
        for shard in store.shards.values():   # the lookup's backward: gradient rows to the owning shard
            shard.exchange.scatter_grad = split.timed("gather_exchange", shard.exchange.scatter_grad)
    loader = trainer.train_iter
    while not hasattr(loader, "_loader") and hasattr(loader, "batches"):   # under pipeline stages
        loader = loader.batches
    collate = loader._loader.collate_fn
    if collate.hasher is not None:
        collate.hasher = split.timed("hashing", collate.hasher)
    for block in trainer.model.engram_blocks().values():
        _instrument_block(block, split)


def _instrument_block(block, split: _Split) -> None:
    table, fuse, short_conv = block.table, block.fuse, block.short_conv
    state = {}

    def conv(value):
        if not split.on:
            return short_conv(value)
        t0 = split.now()
        y = short_conv(value)
        state["conv_fwd"] = split.now() - t0
        split.add("conv", state["conv_fwd"])
        # Backward: y's gradient arrives when the conv's backward starts; value's is complete once it
        # has passed through the conv (and the residual add, which is free).
        y.register_hook(lambda g: state.__setitem__("conv_bwd_start", split.now()))
        value.register_hook(lambda g: state.__setitem__("conv_bwd_end", split.now()))
        return y

    def lookup(hash_ids, rows):   # EngramBlock.forward's lookup (rows: gathered ahead by host tables)
        return table(hash_ids) if rows is None else table(hash_ids, rows)

    def forward(hidden, hash_ids, rows=None):
        if not split.on:
            return fuse(hidden, lookup(hash_ids, rows))
        t0 = split.now()
        e = lookup(hash_ids, rows)
        t1 = split.now()
        split.add("gather_exchange", t1 - t0)
        state["conv_fwd"] = 0.0
        out = fuse(hidden, e)
        split.add("projections_gate", split.now() - t1 - state["conv_fwd"])

        def conv_done(g):
            if "conv_bwd_start" in state:
                split.add("conv", state["conv_bwd_end"] - state["conv_bwd_start"])

        def embeddings_grad(g):   # the projections' backward ends here; the lookup's backward follows
            end = state.get("conv_bwd_end")
            if end is not None:
                split.add("projections_gate", split.now() - end)
                conv_done(g)
            state.clear()

        if e.requires_grad:
            e.register_hook(embeddings_grad)
        return out

    block.forward = forward
    block.short_conv = conv


def _build(args, variant: str, run_dir: str):
    from engram_train.config.store import compose
    from engram_train.train.trainer import Trainer, seed_everything

    cfg = compose(_overrides(args, variant, run_dir))
    seed_everything(cfg.trainer.seed)
    return Trainer(cfg), cfg.data.global_batch_size * cfg.data.seq_length


def measure(args, work: str) -> dict:
    """Both variants in this process, alternating windows; per variant its step times per window, and
    the Engram parts of the instrumented steps."""
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    trainers, tokens = {}, {}
    for v in VARIANTS:
        trainers[v], tokens[v] = _build(args, v, os.path.join(work, f"run_{v}"))
    split = _Split(trainers["engram"].device.type == "cuda", args.clock)
    _instrument(trainers["engram"], split)

    def step(v: str) -> float:
        t0 = split.now()
        trainers[v].train_step()
        return split.now() - t0

    for v in VARIANTS:
        for _ in range(args.warmup):
            step(v)
    windows = {v: [] for v in VARIANTS}
    for i in range(args.windows):
        order = list(VARIANTS) if i % 2 == 0 else list(VARIANTS)[::-1]
        for v in order:
            windows[v].append([step(v) for _ in range(args.window_steps)])
        print(f"[bench_engram_overhead] window pair {i + 1}/{args.windows}: engram "
              f"{1e3 * statistics.median(windows['engram'][-1]):.1f} ms, no_engram "
              f"{1e3 * statistics.median(windows['no_engram'][-1]):.1f} ms", flush=True)
    parts = []
    split.on = True
    for _ in range(args.split_steps):
        step("engram")
        parts.append(split.pop())
    split.on = False
    for t in trainers.values():
        t.release()
    return {"windows": windows, "parts": parts, "device": str(trainers["engram"].device), "clock": args.clock,
            "torch_threads": torch.get_num_threads(), "tokens_per_step": tokens["engram"]}


def _flops(args) -> dict:
    from tools.count_params import count

    return {v: count([f"experiment={args.experiment}", *extra, *args.extra])["flops_per_token"]
            for v, extra in VARIANTS.items()}


def summarize(m: dict, flops: dict) -> dict:
    """``m``: :func:`measure`'s output; the figures of the module docstring."""
    w = m["windows"]
    ratios = [statistics.median(a) / statistics.median(b) for a, b in zip(w["engram"], w["no_engram"])]
    med = {v: statistics.median([s for win in w[v] for s in win]) for v in VARIANTS}
    parts = m["parts"]
    split_ms = {p: 1e3 * statistics.median([x[p] for x in parts]) for p in PARTS} if parts else {}
    extra_ms = 1e3 * (med["engram"] - med["no_engram"])
    if split_ms:
        split_ms["other"] = extra_ms - sum(split_ms.values())
    active = flops["engram"] / flops["no_engram"]
    ratio = statistics.median(ratios)
    tokens = m["tokens_per_step"]
    return {"step_time_ratio": ratio, "step_time_ratio_windows": ratios,
            "step_time_ratio_spread": [min(ratios), max(ratios)],
            "step_ms": {v: 1e3 * x for v, x in med.items()},
            "tokens_per_s": {v: tokens / x for v, x in med.items()},
            "engram_extra_ms": extra_ms, "split_ms": split_ms,
            "split_share_of_extra": {p: ms / extra_ms for p, ms in split_ms.items()} if extra_ms > 0 else {},
            "flops_per_token": flops, "active_flops_ratio": active, "ratio_per_active_flop": ratio / active,
            "window_pairs": len(ratios), "timed_steps": {v: sum(len(x) for x in w[v]) for v in VARIANTS},
            "split_steps": len(parts), "device": m["device"], "clock": m["clock"],
            "torch_threads": m["torch_threads"]}


def _print(s: dict, args) -> None:
    print(f"\n# Engram vs engram=none: {args.experiment} on {s['device']} ({s['clock']} clock, "
          f"{s['torch_threads']} torch threads), {s['window_pairs']} window pairs, {s['timed_steps']['engram']} "
          "timed steps each\n")
    print("| variant | median step ms | tokens/s | forward FLOPs/token |")
    print("|---|---:|---:|---:|")
    for v in VARIANTS:
        print(f"| {v} | {s['step_ms'][v]:.1f} | {s['tokens_per_s'][v]:,.0f} | {s['flops_per_token'][v] / 1e6:.2f}M |")
    lo, hi = s["step_time_ratio_spread"]
    print(f"\nstep_time_ratio: {s['step_time_ratio']:.3f} (window pairs {lo:.3f}-{hi:.3f}); active FLOPs ratio "
          f"{s['active_flops_ratio']:.3f}; per active FLOP {s['ratio_per_active_flop']:.3f}")
    if s["split_ms"]:
        print(f"\nEngram's {s['engram_extra_ms']:.1f} ms a step ({s['split_steps']} instrumented steps, medians):\n")
        print("| part | ms per step | share of the extra |")
        print("|---|---:|---:|")
        for p, ms in s["split_ms"].items():
            share = s["split_share_of_extra"].get(p)
            print(f"| {p} | {ms:.1f} | {'' if share is None else f'{100 * share:.0f}%'} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="debug_cpu")
    p.add_argument("--windows", type=int, default=8, help="pairs of windows, one of each variant (default 8)")
    p.add_argument("--window-steps", type=int, default=4, help="timed steps per window (default 4)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each variant first (default 3)")
    p.add_argument("--split-steps", type=int, default=8, help="instrumented Engram steps at the end (default 8)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time (default), or the main thread's CPU time: robust to other processes on a "
                        "shared machine, meaningful with --torch-threads 1 on a CPU (it sets that)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch's intra-op threads in both variants (default 0: torch's default)")
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--workdir", default=None)
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for both variants")
    args = p.parse_args(argv)
    if args.clock == "cpu" and not args.torch_threads:
        args.torch_threads = 1
    if args.windows < 1 or args.window_steps < 1 or args.warmup < 0 or args.split_steps < 0 or args.torch_threads < 0:
        p.error("--windows and --window-steps must be >= 1, --warmup, --split-steps and --torch-threads >= 0")
    if args.clock == "cpu" and args.torch_threads != 1:
        p.error("--clock cpu reads the main thread's CPU time: use it with --torch-threads 1")
    flops = _flops(args)   # composes the config first: a bad override is reported before anything loads
    work = args.workdir or tempfile.mkdtemp(prefix="engram_overhead_")
    os.makedirs(work, exist_ok=True)
    s = summarize(measure(args, work), flops)
    _print(s, args)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(s, f, indent=1)


if __name__ == "__main__":
    from engram_train.errors import run_main

    run_main(main, prog="bench_engram_overhead")
