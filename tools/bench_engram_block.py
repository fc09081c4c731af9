"""The Engram block alone: forward and backward of ``EngramBlock.fuse`` at an experiment's shape.

    python tools/bench_engram_block.py                                  # debug_cpu, eager
    python tools/bench_engram_block.py --compile                        # eager and torch.compile, interleaved
    python tools/bench_engram_block.py --extra model.hc_mult=4

What the block costs without the rest of the step (``tools/bench_engram_overhead.py`` times it inside
a training step): one micro-batch (``data.micro_batch_size`` x ``data.seq_length`` tokens), hidden
states in the model's layout (a ``[B, T, G, H]`` view of ``[T, B, G*H]``), the layer's looked-up rows
as input (the lookup is not timed), the conv weight drawn at random (a fresh block's is zero).  The
block is built with the model's own arguments (``model.gpt.engram_block_kwargs``).  Each call is timed
in the calling thread's CPU seconds (``--threads``, default 1: other processes do not count); with
``--compile`` the eager and compiled block alternate call by call, so drift hits both.  Reported:
median and min ms a call, and the compiled block's first calls (compilation).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def build(experiment: str, extra):
    import torch

    from engram_train.config.store import compose
    from engram_train.engram.block import EngramBlock
    from engram_train.model.gpt import engram_block_kwargs

    cfg = compose([f"experiment={experiment}", *extra])
    e = cfg.engram
    heads = (e.max_ngram - 1) * e.heads_per_ngram
    layer = e.layer_ids[0]
    # The table is not read (fuse takes its rows): its sizes only need to be valid.
    kwargs = engram_block_kwargs(cfg.model, e, {i: [2] * heads for i in e.layer_ids})[layer]
    block = EngramBlock(**kwargs)
    with torch.no_grad():
        block.conv.weight.normal_(0, 0.1)
    B, T, G, H = cfg.data.micro_batch_size, cfg.data.seq_length, block.hc_mult, block.hidden_size
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, B, G * H, generator=g).transpose(0, 1).unflatten(-1, (G, H)).requires_grad_(True)
    rows = torch.randn(B, T, (e.max_ngram - 1) * e.n_embed_per_ngram, generator=g).requires_grad_(True)
    cot = torch.randn(B, T, G, H, generator=g)
    return block, (hidden, rows, cot), f"B={B} T={T} hc_mult={G} hidden={H} d_e={rows.shape[-1]}"


def call(fuse, inputs) -> float:
    hidden, rows, cot = inputs
    t0 = time.thread_time()
    fuse(hidden, rows).backward(cot)
    return time.thread_time() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="debug_cpu")
    p.add_argument("--extra", nargs="*", default=[], help="config overrides, e.g. model.hc_mult=4")
    p.add_argument("--calls", type=int, default=40, help="timed calls of each variant (default 40)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the block")
    args = p.parse_args(argv)
    if args.calls < 1 or args.threads < 1:
        p.error("--calls and --threads must be >= 1")
    import torch

    torch.set_num_threads(args.threads)
    block, inputs, shape = build(args.experiment, args.extra)
    variants = {"eager": block.fuse}
    first = {}
    if args.compile:
        compiled = torch.compile(block.fuse)
        t0 = time.perf_counter()
        call(compiled, inputs)
        call(compiled, inputs)
        first["compiled"] = time.perf_counter() - t0
        variants["compiled"] = compiled
    for fuse in variants.values():   # warm-up
        call(fuse, inputs)
    times = {name: [] for name in variants}
    for _ in range(args.calls):
        for name, fuse in variants.items():
            times[name].append(call(fuse, inputs))
    print(f"Engram block, forward and backward, {args.experiment} ({shape}), {args.threads} thread(s), "
          f"CPU seconds of the calling thread, {args.calls} calls each:")
    for name, ts in times.items():
        extra = f"; compilation and first two calls {first[name]:.1f} s" if name in first else ""
        print(f"  {name:9s} median {statistics.median(ts) * 1e3:7.2f} ms, min {min(ts) * 1e3:7.2f} ms{extra}")


if __name__ == "__main__":
    main()
