"""Engram table placements side by side: bytes each rank sends per token, and table step time.

    python tools/bench_lookup.py                       # 2 ranks, defaults below
    python tools/bench_lookup.py --tokens 4096 --steps 5 --optimizer sparse_adam

Spawns ``--ranks`` processes (gloo on CPU, NCCL on CUDA) and, in one run, times every
placement of the same tables on the same token stream:

* ``TP=<ranks>``: the ranks form one tensor-parallel group (same tokens on every rank):
  ``replicated`` (each rank holds the whole table), ``tp`` (rows split, masked lookup +
  all-reduce of the deduplicated rows), ``all`` (rows split, all-to-all);
* ``DP=<ranks>``: the ranks are data-parallel replicas (different tokens):
  ``replicated`` (sparse gradient rows all-gathered over the replicas) and ``all``.

One step = the lookups of every Engram layer, the block's key and value projections of the
looked-up rows (``hc_mult=1``: ``2 * --hidden`` outputs), their backward with a random
output gradient, the gradient reduction and the table optimizer: the table path of a
training step, without the rest of the backbone.  Tokens are Zipf-distributed (like text) and
hashed by the project's ``NgramHasher``, so deduplication sees realistic repeats.

Columns: table MiB held per rank (weight + optimizer state), bytes sent per token per
rank (lookups + gradient traffic; ring all-reduce counted as 2(n-1)/n of its buffer),
median step time over ``--steps`` (slowest rank), and both relative to ``replicated`` of
the same layout.

``tp-by-head (emulated)`` is the alternative TP partition the project does not build:
each rank holds whole heads, projects its heads' rows with its slice of the key and value
weights (row-parallel) and all-reduces the ``(hc_mult + 1) * hidden`` projected values per
token.  The bench runs exactly that (its own heads in a store, real collectives), so the
two TP partitions are compared by measurement.
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


def _hasher(args):
    import torch

    from engram_train.engram.hashing import NgramHasher

    return NgramHasher(torch.arange(args.vocab), layer_ids=list(range(args.layers)), max_ngram=args.max_ngram,
                       heads_per_ngram=args.heads, table_size_per_ngram=[args.rows_per_head] * (args.max_ngram - 1),
                       pad_id=0, backend="torch")


def _hash_ids(args, hasher, rank: int, step: int, same_tokens: bool):
    import torch

    g = torch.Generator().manual_seed(1000 * step + (0 if same_tokens else rank + 1))
    ranks = torch.arange(1, args.vocab + 1, dtype=torch.float64)
    probs = ranks.pow(-args.zipf)
    tokens = torch.multinomial(probs / probs.sum(), args.tokens, replacement=True, generator=g)
    return hasher(tokens.view(1, -1))


def _reduce_from_group(x, group):
    """All-reduce in forward, identity in backward (every rank holds the same output gradient)."""
    import torch
    import torch.distributed as dist

    class _Reduce(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            t = t.clone()
            dist.all_reduce(t, group=group)
            return t

        @staticmethod
        def backward(ctx, g):
            return g

    return _Reduce.apply(x)


def _worker(rank: int, world: int, port: int, args, results) -> None:
    import torch
    import torch.distributed as dist

    from engram_train.memory.exchange import CommCounter

    from engram_train.memory.layout import placement_for, table_specs
    from engram_train.memory.store import StoreGroups, StoreOptions, TableStore
    from engram_train.platform.device import get_device

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = get_device()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    singles = [dist.new_group([r]) for r in range(world)]
    rows = []
    heads = (args.max_ngram - 1) * args.heads
    hasher = _hasher(args)
    for layout, cases in (("TP", ("replicated", "tp", "all", "tp-by-head (emulated)")),
                          ("DP", ("replicated", "all"))):
        tp_size = world if layout == "TP" else 1
        tp_group = dist.group.WORLD if layout == "TP" else singles[rank]
        for partition in cases:
            by_head = partition.startswith("tp-by-head")
            placement = placement_for("replicated" if by_head else partition, world, rank, tp_size,
                                      rank % tp_size)
            # By head: this rank's whole heads (ceil split of the heads, like rows elsewhere).
            h_lo = min(rank * -(-heads // world), heads) if by_head else 0
            h_hi = min(h_lo + -(-heads // world), heads) if by_head else heads
            sizes = {l: s[h_lo:h_hi] for l, s in hasher.table_sizes.items()}
            specs = table_specs(sizes, args.dim * args.heads, args.heads)
            groups = StoreGroups(
                tp_group=tp_group, world_group=dist.group.WORLD, dp_size=1 if layout == "TP" else world, rank=rank,
                replica_group=singles[rank] if layout == "TP" or partition == "all" else dist.group.WORLD)
            store = TableStore(specs, placement, StoreOptions(optimizer=args.optimizer), groups, device=device)
            g = torch.Generator().manual_seed(0)
            proj = {l: (torch.randn(2 * args.hidden, heads * args.dim, generator=g) * 0.02)[:, h_lo * args.dim:
                        h_hi * args.dim].contiguous().to(device).requires_grad_() for l in sizes}
            extra = CommCounter()
            times, sent0 = [], 0
            for step in range(args.warmup + args.steps):
                ids = _hash_ids(args, hasher, rank, step, same_tokens=layout == "TP")
                ids = {l: t[..., h_lo:h_hi].to(device) for l, t in ids.items()}
                if step == args.warmup:
                    sent0 = store.sent_bytes() + extra.sent_bytes
                dist.barrier()
                t0 = time.perf_counter()
                outs = []
                for l in sorted(ids):
                    kv = store.tables[l](ids[l]) @ proj[l].t()          # key and value projections
                    if by_head:
                        kv = _reduce_from_group(kv, tp_group)
                        extra.all_reduce(kv, world)
                    outs.append(kv)
                torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
                store.reduce_gradients()
                store.step(1e-3)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                if step >= args.warmup:
                    times.append(float(dt))
            mem = store.memory_bytes()
            rows.append(dict(layout=f"{layout}={world}", partition=partition,
                             table_mib=(mem["weight"] + mem["optimizer"]) / 2**20,
                             bytes_per_token=(store.sent_bytes() + extra.sent_bytes - sent0) / (args.steps * args.tokens),
                             step_ms=1e3 * statistics.median(times)))
            del store
    if rank == 0:
        results.extend(rows)
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per rank per step (default 8192)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layers", type=int, default=2, help="Engram layers (default 2)")
    p.add_argument("--max-ngram", type=int, default=3)
    p.add_argument("--heads", type=int, default=8, help="heads per n-gram order (default 8)")
    p.add_argument("--dim", type=int, default=32, help="row width per head (default 32)")
    p.add_argument("--rows-per-head", type=int, default=65536, help="prime search start per head (default 65536)")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--zipf", type=float, default=1.0, help="token frequency exponent (default 1.0)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size for the analytic by-head row")
    p.add_argument("--optimizer", choices=("adam", "sparse_adam"), default="adam")
    args = p.parse_args(argv)
    if args.ranks < 2:
        p.error("--ranks must be >= 2: placements differ only across ranks")

    import torch.multiprocessing as mp

    from tests.distributed.utils import free_port

    with mp.Manager() as manager:
        results = manager.list()
        mp.spawn(_worker, args=(args.ranks, free_port(), args, results), nprocs=args.ranks, join=True)
        rows = list(results)
    heads = (args.max_ngram - 1) * args.heads
    print(f"# Engram table placements, {args.ranks} ranks: {args.layers} layers x {heads} heads x ~{args.rows_per_head} "
          f"rows x {args.dim} floats, {args.tokens} tokens/rank/step, optimizer {args.optimizer}\n")
    print("| layout | partition | table MiB/rank | bytes sent/token/rank | step ms | memory vs replicated "
          "| bytes vs replicated | time vs replicated |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        base = next(b for b in rows if b["layout"] == r["layout"] and b["partition"] == "replicated")
        rel = (f"{r['bytes_per_token'] / base['bytes_per_token']:.2f}x" if base["bytes_per_token"]
               else ("-" if not r["bytes_per_token"] else "n/a (replicated sends 0)"))
        print(f"| {r['layout']} | {r['partition']} | {r['table_mib']:.1f} | {r['bytes_per_token']:.0f} | "
              f"{r['step_ms']:.1f} | {r['table_mib'] / base['table_mib']:.2f}x | {rel} | "
              f"{r['step_ms'] / base['step_ms']:.2f}x |")
    print(f"\nPer token and layer, TP by rows all-reduces at most (N-1)*n_embed_per_ngram = {heads * args.dim} values "
          f"(fewer after deduplication); TP by head all-reduces (hc_mult+1)*hidden = {2 * args.hidden}.")


if __name__ == "__main__":
    from engram_train.errors import run_main

    run_main(main, prog="bench_lookup")
