#!/usr/bin/env python
"""Benchmark: ``NgramHasher`` backends vs a numpy port of the reference demo's hashing.

All hash the same synthetic batch for all Engram layers; the tool first checks
that each agrees bit for bit with the numpy port, then times them interleaved
(one warm-up each, then ``--repeats`` rounds, so machine noise hits all alike)
and prints tokens/s and the speed-up over numpy from the median and best round.

Variants: ``torch`` (the reference path, exact ``%``), ``cpu_kernel`` (the native
kernel, fresh output tensors like numpy's), ``cpu_kernel+out`` (the kernel writing
into buffers reused across calls, as a data pipeline with staging buffers does:
this leaves out the page faults of fresh 16 MB outputs, which on some virtual
machines cost more than the hashing itself).

    python tools/bench_hashing.py                       # B=64, T=2048, layers [1, 15], N=3, K=8, V=32k
    python tools/bench_hashing.py --variants torch --batch 8 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from engram_train.engram.hashing import NgramHasher, prime_table_sizes


# ---- numpy port of engram_demo_v1.py's NgramHashMapping (per-layer loops, as in the demo) ----------------------

class NumpyReferenceHashing:
    def __init__(self, lookup, compressed_vocab_size, layer_ids, max_ngram, heads, table_size_per_ngram, pad_id, seed):
        self.lookup = lookup
        self.layer_ids = layer_ids
        self.max_ngram = max_ngram
        self.heads = heads
        self.pad_id = int(lookup[pad_id])
        half_bound = max(1, int(np.iinfo(np.int64).max // compressed_vocab_size) // 2)
        self.multipliers = {}
        for layer in layer_ids:
            g = np.random.default_rng(int(seed + 10007 * int(layer)))
            self.multipliers[layer] = g.integers(0, half_bound, size=(max_ngram,), dtype=np.int64) * 2 + 1
        # The prime sizes are not timed; tests/unit/test_engram_hashing.py pins them to an independent port.
        sizes = prime_table_sizes(layer_ids, max_ngram, heads, table_size_per_ngram)
        self.primes = {layer: [sizes[layer][i * heads:(i + 1) * heads] for i in range(max_ngram - 1)]
                       for layer in layer_ids}

    def _layer(self, x, layer):
        B, T = x.shape
        mult = self.multipliers[layer]

        def shift_k(k):
            if k == 0:
                return x
            return np.pad(x, ((0, 0), (k, 0)), mode="constant", constant_values=self.pad_id)[:, :T]

        shifts = [shift_k(k) for k in range(self.max_ngram)]
        hashes = []
        for n in range(2, self.max_ngram + 1):
            mix = shifts[0] * mult[0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifts[k] * mult[k])
            for j in range(self.heads):
                hashes.append((mix % int(self.primes[layer][n - 2][j])).astype(np.int64, copy=False))
        return np.stack(hashes, axis=2)

    def __call__(self, raw):
        x = np.asarray(raw, dtype=np.int64).copy()
        valid = x >= 0
        x[valid] = self.lookup[x[valid]]
        return {layer: self._layer(x, layer) for layer in self.layer_ids}


VARIANTS = {"torch": ("torch", False), "cpu_kernel": ("cpu_kernel", False), "cpu_kernel+out": ("cpu_kernel", True)}


# ---- benchmark ---------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layer-ids", type=int, nargs="+", default=[1, 15], help="0-based Engram layer ids")
    ap.add_argument("--max-ngram", type=int, default=3)
    ap.add_argument("--heads", type=int, default=8, help="heads per n-gram order")
    ap.add_argument("--vocab", type=int, default=32000, help="synthetic raw vocabulary size")
    ap.add_argument("--compressed-fraction", type=float, default=0.77,
                    help="V'/V of the synthetic compression (DeepSeek-V3's tokenizer compresses ~23%%)")
    ap.add_argument("--table-multiplier", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="device of the torch path (the numpy port is always CPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: leave torch's default; 1 = a data-loader worker)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                    help="NgramHasher variants to time against the numpy reference")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    rng = np.random.default_rng(args.seed)
    compressed = max(2, int(args.vocab * args.compressed_fraction))
    # Every canonical id is used (as a real compression guarantees), the rest of the vocabulary maps randomly.
    lookup = np.concatenate([np.arange(compressed), rng.integers(0, compressed, args.vocab - compressed)])
    lookup = lookup[rng.permutation(args.vocab)].astype(np.int64)
    sizes = [int(args.table_multiplier * compressed)] * (args.max_ngram - 1)
    pad_id = 2
    raw_np = rng.integers(0, args.vocab, size=(args.batch, args.seq), dtype=np.int64)

    hashers = {v: NgramHasher(lookup, args.layer_ids, args.max_ngram, args.heads, sizes, pad_id=pad_id,
                              seed=args.seed, compressed_vocab_size=compressed, backend=VARIANTS[v][0])
               for v in args.variants}
    reference = NumpyReferenceHashing(lookup, compressed, args.layer_ids, args.max_ngram, args.heads, sizes,
                                      pad_id, args.seed)
    device = torch.device(args.device)
    raw_t = torch.from_numpy(raw_np).to(device)
    heads = (args.max_ngram - 1) * args.heads
    buffers = {l: torch.empty((args.batch, args.seq, heads), dtype=torch.int64, device=device)
               for l in args.layer_ids}

    def run_torch(variant):
        out = hashers[variant](raw_t, out=buffers if VARIANTS[variant][1] else None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    ref = reference(raw_np)
    for variant in args.variants:
        ours = run_torch(variant)      # also the warm-up (and, for the kernel, its one-off build)
        for layer in args.layer_ids:
            if not np.array_equal(ours[layer].cpu().numpy(), ref[layer]):
                raise SystemExit(f"MISMATCH in layer {layer}: {variant} and the numpy reference disagree")
        print(f"check: {variant} is bit-for-bit equal to the numpy reference for layers {args.layer_ids} "
              f"({heads} ids per token and layer)")

    t_ref, t_ours = [], {v: [] for v in args.variants}
    for _ in range(args.repeats):       # interleaved, so that machine noise hits all alike
        t0 = time.perf_counter()
        reference(raw_np)
        t_ref.append(time.perf_counter() - t0)
        for variant in args.variants:
            t0 = time.perf_counter()
            run_torch(variant)
            t_ours[variant].append(time.perf_counter() - t0)

    tokens = args.batch * args.seq
    print(f"B={args.batch} T={args.seq} layers={args.layer_ids} N={args.max_ngram} K={args.heads} "
          f"V={args.vocab} V'={compressed} torch threads={torch.get_num_threads()} device={device} "
          f"repeats={args.repeats}")
    for label, pick in (("median", statistics.median), ("best", min)):
        r = pick(t_ref)
        line = f"{label:>6}: numpy reference {tokens / r / 1e6:7.2f} Mtok/s ({r * 1e3:6.1f} ms)"
        for variant in args.variants:
            o = pick(t_ours[variant])
            line += f" | {variant} {tokens / o / 1e6:7.2f} Mtok/s ({o * 1e3:6.1f} ms) {r / o:5.2f}x"
        print(line)


if __name__ == "__main__":
    from engram_train.errors import run_main

    run_main(main, prog="bench_hashing")
