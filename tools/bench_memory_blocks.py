"""Forward + backward time of one Lngram block against one Engram block on the same hidden states.

    python tools/bench_memory_blocks.py                       # lngram_cpu's and debug_cpu's sizes
    python tools/bench_memory_blocks.py --surrogate exact --repeats 5

Both blocks run interleaved in one process on one thread, so a shared machine slows both alike;
the median of the repeats after a warm-up is printed.  Lngram: engram.latent.* of lngram_cpu
(8 routes, 4 bits, orders 2 and 3, rows of 55, tables N(0, 0.02) so the surrogate reads real rows);
Engram: debug_cpu's block (8 heads of ~15k rows, 64 per order) with random hash ids.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--surrogate", default="one_bit", choices=["one_bit", "exact", "none"])
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    import torch

    from engram_train.engram.block import EngramBlock
    from engram_train.lngram.block import LngramBlock

    torch.manual_seed(0)
    torch.set_num_threads(1)
    B, T, H = args.batch, args.seq, 128
    lngram = LngramBlock(H, 8, 4, [2, 3], 55, 4, 2, surrogate=args.surrogate, table_init_std=0.02)
    engram = EngramBlock(H, 1, [15013 + 2 * i for i in range(8)], 64, 4, 3)
    h = torch.randn(B, T, 1, H, requires_grad=True)
    segments = torch.zeros(B, T, 1, dtype=torch.long)
    ids = torch.randint(0, 15000, (B, T, 8))
    runs = {"lngram": (lambda: lngram(h, segments)), "engram": (lambda: engram(h, ids))}
    times = {k: [] for k in runs}
    for _ in range(args.repeats + 1):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn().sum().backward()
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        print(f"{name}: forward+backward {statistics.median(ts[1:]) * 1e3:.1f} ms per block "
              f"({B} x {T} tokens, surrogate={args.surrogate if name == 'lngram' else '-'})")


if __name__ == "__main__":
    main()
