#!/usr/bin/env python
"""Benchmark: each Triton kernel of the lookup path against PyTorch eager on the same inputs, in one run.

Kernels and the eager code they replace:

  hash_ngrams       NgramHasher's torch path (compression, N windows, products, XOR, % per order)
  gather_rows       index_select of hash_ids + offsets            (+ the same from pinned host memory, UVA)
  reduce_row_grads  torch.unique(return_inverse) + index_add_     (the table store's reduction)
  row_adam          TableSparseAdam.step                          (gather, update, scatter of w, m, v)

Each variant is first checked against eager (int64 bit for bit, floats to 1e-4),
then timed: warm-up calls (Triton compiles on the first), then ``--repeats``
rounds of ``--iters`` calls, interleaved so machine noise hits all variants
alike; the median round is reported.  On a GPU: time per call, bytes the call
must move at least (reads + writes of its inputs and outputs, once), the achieved
bandwidth and its share of the device's peak (from its memory clock and bus
width, or ``--peak-gbs``), and the speed-up over eager.  Targets: hashing >= 10x
eager, gather >= 70% of HBM bandwidth, reduction faster than unique + index_add_.

On a CPU the Triton kernels would run in Triton's interpreter, whose timings
mean nothing: the tool then times the torch paths and the native C hashing
kernel only, and says so.

    python tools/bench_kernels.py                        # CPU: small sizes, a few seconds
    python tools/bench_kernels.py --json out.json        # also write every row as JSON
    python tools/bench_kernels.py --tokens 262144 --dim 64   # on a GPU (the defaults there)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without installing

from engram_train.engram.hashing import NgramHasher  # noqa: E402
from engram_train.kernels import gather_rows, reduce_row_grads, row_adam  # noqa: E402

# Peak memory bandwidth by device name, where the driver does not report clock and bus width (GB/s).
_KNOWN_PEAK_GBS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0,
                   "H100 NVL": 3900.0, "A100-SXM4-80GB": 2039.0, "A100-SXM4-40GB": 1555.0, "A100 80GB PCIe": 1935.0}


def peak_gbs(device: torch.device) -> Optional[float]:
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9    # double data rate
    for name, gbs in _KNOWN_PEAK_GBS.items():
        if name in props.name:
            return gbs
    return None


def timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    """Seconds per call of ``fn`` over ``iters`` calls."""
    def run(fn, iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters
    return run


def measure(variants: Dict[str, Callable[[], object]], device, repeats: int, iters: int) -> Dict[str, float]:
    run = timer(device)
    for fn in variants.values():     # warm-up: compilation, autotuning, caches
        run(fn, 2)
    rounds = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            rounds[name].append(run(fn, iters))
    return {name: statistics.median(v) for name, v in rounds.items()}


def _close(a, b, what):
    if a.dtype in (torch.int64, torch.int32):
        ok = torch.equal(a.cpu(), b.cpu())
    else:
        ok = torch.allclose(a.float().cpu(), b.float().cpu(), atol=1e-4, rtol=1e-4)
    if not ok:
        raise SystemExit(f"{what}: the fused result differs from eager; not timing a wrong kernel")


# ---- the four kernels -----------------------------------------------------------------------------------

def bench_hash(args, device, fused: bool):
    rng = np.random.default_rng(args.seed)
    vocab = args.vocab
    lookup = rng.integers(0, int(vocab * 0.77), size=vocab)
    kw = dict(layer_ids=list(args.layer_ids), max_ngram=args.max_ngram, heads_per_ngram=args.heads,
              table_size_per_ngram=[int(5 * vocab * 0.77)] * (args.max_ngram - 1), pad_id=0, seed=0)
    T = args.seq
    B = max(1, args.tokens // T)
    raw = torch.from_numpy(rng.integers(0, vocab, size=(B, T))).to(device)
    eager = NgramHasher(lookup, backend="torch", **kw)
    variants = {"eager": lambda: eager(raw)}
    impls = ["triton"] if fused else []
    if device.type == "cpu":
        from engram_train.kernels import ngram_hash

        impls += ["cpu_kernel"] if ngram_hash.available() else []
    want = eager(raw)
    for impl in impls:
        other = NgramHasher(lookup, backend=impl, **kw)
        got = other(raw)
        for layer in want:
            _close(got[layer], want[layer], f"hash_ngrams ({impl})")
        variants[impl] = lambda other=other: other(raw)
    L, H = len(args.layer_ids), (args.max_ngram - 1) * args.heads
    bytes_min = B * T * 8 + L * B * T * H * 8          # read raw ids, write the ids of every layer
    return variants, bytes_min, f"B={B} T={T} layers={L} ids/token/layer={H}"


def _table(args, device, dtype, pinned=False):
    g = torch.Generator().manual_seed(args.seed)
    H, rows_per_head, d = args.gather_heads, args.rows_per_head, args.dim
    weight = torch.randn(H * rows_per_head, d, generator=g).to(dtype)
    weight = weight.pin_memory() if pinned else weight.to(device)
    offsets = torch.arange(H, dtype=torch.int64, device=device) * rows_per_head
    ids = torch.randint(0, rows_per_head, (args.tokens, H), generator=g).to(device)
    return weight, ids, offsets


def bench_gather(args, device, fused: bool, dtype=torch.float32, pinned=False):
    weight, ids, offsets = _table(args, device, dtype, pinned)
    eager = lambda: gather_rows(weight, ids, offsets, backend="torch")   # noqa: E731
    variants = {"eager": eager}
    if fused:
        _close(gather_rows(weight, ids, offsets, backend="triton"), eager(), "gather_rows")
        variants["triton"] = lambda: gather_rows(weight, ids, offsets, backend="triton")
    M, d, es = ids.numel(), weight.shape[1], weight.element_size()
    bytes_min = M * 8 + 2 * M * d * es                  # ids, the rows read, the output written
    src = "pinned host (UVA)" if pinned else "device"
    return variants, bytes_min, f"{ids.shape[0]} tokens x {ids.shape[1]} heads, d={d} {str(dtype)[6:]}, {src}"


def bench_reduce(args, device, fused: bool):
    g = torch.Generator().manual_seed(args.seed)
    M, d = args.tokens * args.gather_heads, args.dim
    # Zipf-like ids: a few hot rows (common n-grams), a long tail.
    ranks = torch.from_numpy(np.random.default_rng(args.seed).zipf(1.2, size=M) % (args.rows_per_head * 4))
    ids = ranks.to(torch.int64).to(device)
    grads = torch.randn(M, d, generator=g).to(device)

    def eager():   # what the store did: unique + index_add_ (atomics on CUDA)
        uniq, inv = torch.unique(ids, sorted=True, return_inverse=True)
        return uniq, grads.new_zeros(uniq.numel(), d).index_add_(0, inv, grads)

    variants = {"eager": eager}
    if fused:
        got, want = reduce_row_grads(ids, grads, backend="triton"), eager()
        _close(got[0], want[0], "reduce_row_grads ids")
        _close(got[1], want[1], "reduce_row_grads sums")
        variants["triton"] = lambda: reduce_row_grads(ids, grads, backend="triton")
    U = int(torch.unique(ids).numel())
    bytes_min = M * 8 + M * d * 4 + U * (8 + d * 4)
    return variants, bytes_min, f"M={M} ids ({U} unique, Zipf), d={d}"


def bench_adam(args, device, fused: bool):
    g = torch.Generator().manual_seed(args.seed)
    R, d = args.gather_heads * args.rows_per_head, args.dim
    U = min(R, args.tokens * args.gather_heads // 4)
    w0 = torch.randn(R, d, generator=g).to(device)
    state = {b: [w0.clone(), torch.zeros(R, d, device=device), torch.zeros(R, d, device=device),
                 torch.zeros(R, dtype=torch.int32, device=device)]
             for b in (["torch", "triton"] if fused else ["torch"])}
    ids = torch.randperm(R, generator=g)[:U].to(device)
    grads = torch.randn(U, d, generator=g).to(device)
    variants = {"eager": lambda: row_adam(*state["torch"], ids, grads, 1e-3, backend="torch")}
    if fused:
        variants["eager"]()
        row_adam(*state["triton"], ids, grads, 1e-3, backend="triton")
        _close(state["triton"][0], state["torch"][0], "row_adam")
        variants["triton"] = lambda: row_adam(*state["triton"], ids, grads, 1e-3, backend="triton")
    bytes_min = U * 8 + U * d * 4 + 6 * U * d * 4 + 2 * U * 4    # ids, grads, w/m/v read+write, steps
    return variants, bytes_min, f"{U} rows of {R}, d={d}"


def main(argv=None) -> List[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per call (GPU 262144, CPU 8192)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layer-ids", type=int, nargs="+", default=[1, 15])
    ap.add_argument("--max-ngram", type=int, default=3)
    ap.add_argument("--heads", type=int, default=8, help="heads per n-gram order (hashing)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--gather-heads", type=int, default=None, help="heads of the gather ((N-1) x heads)")
    ap.add_argument("--rows-per-head", type=int, default=None, help="GPU 500000, CPU 20000")
    ap.add_argument("--dim", type=int, default=64, help="floats per row (n_embed_per_ngram / heads)")
    ap.add_argument("--repeats", type=int, default=None, help="GPU 10, CPU 3")
    ap.add_argument("--iters", type=int, default=None, help="calls per round (GPU 20, CPU 2)")
    ap.add_argument("--peak-gbs", type=float, default=None, help="device memory bandwidth, GB/s (default: queried)")
    ap.add_argument("--kernels", nargs="+", default=["hash_ngrams", "gather_rows", "reduce_row_grads", "row_adam"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON")
    ap.add_argument("--interpret", action="store_true",
                    help="CPU: also run the Triton variants, interpreted (checks the tool; timings meaningless)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.tokens = args.tokens or (262144 if gpu else 8192)
    args.seq = min(args.seq, args.tokens)
    args.gather_heads = args.gather_heads or (args.max_ngram - 1) * args.heads
    args.rows_per_head = args.rows_per_head or (500_000 if gpu else 20_000)
    args.repeats = args.repeats or (10 if gpu else 3)
    args.iters = args.iters or (20 if gpu else 2)
    from engram_train.kernels import triton as triton_kernels

    fused = (gpu or args.interpret) and triton_kernels.available()
    peak = (args.peak_gbs or peak_gbs(device)) if gpu else None
    if gpu:
        print(f"device: {torch.cuda.get_device_name(device)}; peak memory bandwidth "
              f"{f'{peak:.0f} GB/s' if peak else 'unknown (pass --peak-gbs)'}")
        if not fused:
            print(f"Triton unavailable ({triton_kernels.unavailable_reason()}): eager only")
    elif args.interpret:
        print("device: CPU, Triton variants INTERPRETED: checks the tool and the kernels' agreement; the "
              "timings of the triton rows mean nothing")
    else:
        print("device: CPU. The Triton kernels would run in Triton's interpreter, whose timings mean nothing: "
              "timing the torch paths and the native C hashing kernel only (run on a GPU for the fused kernels).")

    cases = []
    if "hash_ngrams" in args.kernels:
        cases.append(("hash_ngrams", lambda: bench_hash(args, device, fused)))
    if "gather_rows" in args.kernels:
        cases.append(("gather_rows", lambda: bench_gather(args, device, fused)))
        if gpu:
            cases.append(("gather_rows", lambda: bench_gather(args, device, fused, torch.bfloat16)))
            cases.append(("gather_rows", lambda: bench_gather(args, device, fused, pinned=True)))
    if "reduce_row_grads" in args.kernels:
        cases.append(("reduce_row_grads", lambda: bench_reduce(args, device, fused)))
    if "row_adam" in args.kernels:
        cases.append(("row_adam", lambda: bench_adam(args, device, fused)))

    rows = []
    header = f"{'kernel':<17} {'impl':<11} {'ms/call':>9} {'GB/s':>8} {'of peak':>8} {'vs eager':>9}  inputs"
    print(header)
    print("-" * len(header))
    for kernel, build in cases:
        variants, nbytes, what = build()
        times = measure(variants, device, args.repeats, args.iters)
        pinned = "pinned" in what
        for impl, sec in times.items():
            gbs = nbytes / sec / 1e9
            # Pinned-host gathers cross PCIe/NVLink-C2C: a share of HBM peak would mislead.
            share = gbs / peak if peak and not pinned else None
            row = {"kernel": kernel, "impl": impl, "device": str(device), "inputs": what, "ms_per_call": sec * 1e3,
                   "min_bytes": nbytes, "gb_per_s": gbs, "share_of_peak": share,
                   "speedup_vs_eager": times["eager"] / sec}
            rows.append(row)
            print(f"{kernel:<17} {impl:<11} {sec * 1e3:>9.3f} {gbs:>8.1f} "
                  f"{(f'{share:.0%}' if share is not None else '-'):>8} {row['speedup_vs_eager']:>8.2f}x  {what}")
        del variants
        if gpu:
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "peak_gb_per_s": peak, "fused": fused,
                                               "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
