"""N-gram hashing for every Engram layer at once (DESIGN.md sections 1.2-1.4).

For Engram layer ``l`` (0-based, as in the reference demo) and n-gram order
``n = 2..N``, the token at position ``t`` is addressed, in each of the ``K``
heads of that order, by

    mix = x[t]*m0 XOR x[t-1]*m1 XOR ... XOR x[t-n+1]*m_{n-1}      (int64)
    id  = mix mod prime[l][n][head]

where ``x`` are compressed token ids, positions before the sequence start read
the compressed pad id, ``m`` are the layer's odd multipliers drawn from
``numpy.random.default_rng(seed + 10007*l)`` and the primes are distinct over
all layers (searched in the configured layer order).  Output ids are laid out
n-major then head: ``[B, T, (N-1)*K]``.

Invariants:
- Bit-for-bit equal to the reference numpy hashing when
  ``reset_at_doc_boundary`` is off; with it on, positions before a token's
  document start (the position after the latest EOS) read the pad id.
- Pure tensor code on the input's device, int64 throughout, no Python loop over
  tokens; the object holds only CPU state plus per-device caches that are not
  pickled, so it can live in a data-loader worker.

Cost: one int64 division per id, (N-1)*K per token and layer.  CPUs have no
SIMD int64 division, so numpy and torch both pay ~2 ns per id; this path wins
by skipping the reference's per-head arrays and strided ``np.stack`` and by
using intra-op threads.  A division-free (float-reciprocal) kernel belongs in
``kernels/`` with this module as its oracle.
"""

from __future__ import annotations

import logging

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from engram_train.config.schema import ConfigError, EngramConfig

_LAYER_SEED_STRIDE = 10007            # the reference's PRIME_1
_INT64_MAX = int(np.iinfo(np.int64).max)
# Deterministic Miller-Rabin witnesses: exact for every n < 3.3e24.
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _next_unseen_prime(after: int, seen: set) -> int:
    candidate = after + 1
    while not (is_prime(candidate) and candidate not in seen):
        candidate += 1
    return candidate


def layer_multipliers(layer_id: int, max_ngram: int, compressed_vocab_size: int, seed: int) -> List[int]:
    """The reference's odd hash multipliers of one layer, one per n-gram position."""
    # Bounded so that token * multiplier never overflows int64.
    half_bound = max(1, (_INT64_MAX // compressed_vocab_size) // 2)
    rng = np.random.default_rng(int(seed + _LAYER_SEED_STRIDE * int(layer_id)))
    r = rng.integers(low=0, high=half_bound, size=(max_ngram,), dtype=np.int64)
    return [int(v) for v in (r * 2 + 1)]


def prime_table_sizes(layer_ids: Sequence[int], max_ngram: int, heads_per_ngram: int,
                      table_size_per_ngram: Sequence[int]) -> Dict[int, List[int]]:
    """Distinct primes for every (layer, order, head), searched in layer order; n-major then head per layer."""
    seen: set = set()
    sizes: Dict[int, List[int]] = {}
    for layer_id in layer_ids:
        layer_sizes: List[int] = []
        for n in range(2, max_ngram + 1):
            previous = int(table_size_per_ngram[n - 2]) - 1
            for _ in range(heads_per_ngram):
                previous = _next_unseen_prime(previous, seen)
                seen.add(previous)
                layer_sizes.append(previous)
        sizes[int(layer_id)] = layer_sizes
    return sizes


def _ngram_mixes(windows: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """``[L, B, T, N-1]``: for each layer and order n=2..N, XOR of window[k] * m[k] over k < n (int64)."""
    products = windows.unsqueeze(0) * multipliers        # [L, N, B, T], wraps like the reference's int64
    mix = products[:, 0]
    mixes = []
    for n in range(1, products.shape[1]):
        mix = torch.bitwise_xor(mix, products[:, n])
        mixes.append(mix)
    return torch.stack(mixes, dim=-1)


def floor_mod_by_reciprocal(x: torch.Tensor, p: torch.Tensor, inv_p: torch.Tensor) -> torch.Tensor:
    """``x mod p`` (floor semantics, like ``%``) for int64 ``x`` and 2 <= p < 2**40, without division.

    CPUs have no vector int64 division; a multiply by the float64 reciprocal is
    vectorizable.  Exactness: the float quotient of ``x`` (|x| < 2**63) is off by
    at most ~2**12 / p + 2**9 / p < 2**11, so ``r = x - q*p`` (exact in wrapping
    int64) has |r| < 2**11 * p < 2**53: exactly representable, and the second
    quotient is off by at most one, which the two final selects fix.  Worth it
    only fused (``torch.compile``): eager, the extra passes cost more than ``%``.
    """
    q = torch.floor(x.to(torch.float64) * inv_p).to(torch.int64)
    r = x - q * p
    q = torch.floor(r.to(torch.float64) * inv_p).to(torch.int64)
    r = r - q * p
    r = torch.where(r < 0, r + p, r)
    return torch.where(r >= p, r - p, r)


def _hash_fused(windows: torch.Tensor, multipliers: torch.Tensor, primes: torch.Tensor,
                inv_primes: torch.Tensor) -> torch.Tensor:
    """``[L, B, T, N-1, K]`` hash ids of every layer, order and head in one fusable expression."""
    mix = _ngram_mixes(windows, multipliers).unsqueeze(-1)           # [L, B, T, N-1, 1]
    return floor_mod_by_reciprocal(mix, primes[:, None, None], inv_primes[:, None, None])


_COMPILED: Dict[str, object] = {}


def _compiled_hash_fused():
    """``_hash_fused`` compiled by TorchInductor (C++/OpenMP on CPU, Triton on CUDA); None if unavailable."""
    if "fn" not in _COMPILED:
        try:
            _COMPILED["fn"] = torch.compile(_hash_fused, dynamic=False, fullgraph=True)
        except Exception as e:  # pragma: no cover - depends on the installation
            logging.getLogger(__name__).warning("n-gram hashing: torch.compile unavailable (%s); using eager", e)
            _COMPILED["fn"] = None
    return _COMPILED["fn"]


HASH_BACKENDS = ("auto", "eager", "compiled")
# "auto" compiles only for batches this large: below it the one-off compile (seconds) never pays back.
AUTO_COMPILE_MIN_TOKENS = 1 << 16


def _check(cond: bool, key: str, value, why: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r}: {why}")


class NgramHasher:
    """Raw token ids ``[B, T]`` -> ``{layer_id: hash ids [B, T, (N-1)*K]}`` for all Engram layers.

    ``lookup`` is the compression array from ``engram.compress``; ``pad_id`` and
    ``eos_id`` are raw tokenizer ids.  ``table_sizes[layer_id]`` lists the prime
    table size of every head of that layer (n-major, then head), which is what
    ``EngramBlock`` needs.
    """

    def __init__(self, lookup, layer_ids: Sequence[int], max_ngram: int, heads_per_ngram: int,
                 table_size_per_ngram: Sequence[int], pad_id: int, seed: int = 0, *,
                 reset_at_doc_boundary: bool = False, eos_id: Optional[int] = None,
                 compressed_vocab_size: Optional[int] = None, backend: str = "auto"):
        _check(backend in HASH_BACKENDS, "backend", backend,
               "choose 'eager' (torch %, the reference path), 'compiled' (fused, division-free) or 'auto'")
        lookup_t = torch.as_tensor(np.asarray(lookup) if not torch.is_tensor(lookup) else lookup)
        _check(lookup_t.ndim == 1 and lookup_t.numel() > 0 and not lookup_t.is_floating_point(),
               "lookup", f"tensor of shape {tuple(lookup_t.shape)} and dtype {lookup_t.dtype}",
               "must be a non-empty 1-D integer array; build it with engram.compress.build_compression")
        lookup_t = lookup_t.detach().to(device="cpu", dtype=torch.int64).contiguous()
        lo, hi = int(lookup_t.min()), int(lookup_t.max())
        _check(lo >= 0, "lookup", f"min {lo}", "canonical ids must be >= 0; rebuild it with build_compression")
        if compressed_vocab_size is None:
            compressed_vocab_size = hi + 1   # canonical ids are exactly 0..V'-1
        _check(int(compressed_vocab_size) > hi, "compressed_vocab_size", compressed_vocab_size,
               f"must exceed the largest canonical id in lookup ({hi}); pass the size build_compression returned")

        layer_ids = [int(i) for i in layer_ids]
        _check(len(layer_ids) > 0, "layer_ids", layer_ids, "list at least one Engram layer")
        duplicates = sorted({i for i in layer_ids if layer_ids.count(i) > 1})
        _check(not duplicates, "layer_ids", layer_ids, f"layer ids must be distinct; remove the duplicates {duplicates}")
        _check(min(layer_ids) >= 0, "layer_ids", layer_ids, "layer ids are 0-based and must be >= 0")
        _check(isinstance(max_ngram, (int, np.integer)) and max_ngram >= 2, "max_ngram", max_ngram,
               "must be an integer >= 2 (bigrams at least)")
        _check(isinstance(heads_per_ngram, (int, np.integer)) and heads_per_ngram >= 1, "heads_per_ngram",
               heads_per_ngram, "must be an integer >= 1")
        table_size_per_ngram = [int(s) for s in table_size_per_ngram]
        _check(len(table_size_per_ngram) == max_ngram - 1, "table_size_per_ngram", table_size_per_ngram,
               f"needs one entry per n-gram order n=2..{max_ngram}, i.e. max_ngram-1={max_ngram - 1} entries")
        _check(all(s >= 2 for s in table_size_per_ngram), "table_size_per_ngram", table_size_per_ngram,
               "every table size must be >= 2; use a few times the compressed vocabulary size")
        vocab = lookup_t.numel()
        _check(isinstance(pad_id, (int, np.integer)) and 0 <= pad_id < vocab, "pad_id", pad_id,
               f"must be a raw tokenizer id in [0, {vocab}); use the tokenizer's pad (or EOS) id")
        _check(isinstance(seed, (int, np.integer)) and seed >= 0, "seed", seed, "must be an integer >= 0")
        if reset_at_doc_boundary:
            _check(eos_id is not None and 0 <= eos_id < vocab, "eos_id", eos_id,
                   f"reset_at_doc_boundary=True needs the tokenizer's EOS id in [0, {vocab})")
        elif eos_id is not None:
            _check(0 <= eos_id < vocab, "eos_id", eos_id, f"must be a raw tokenizer id in [0, {vocab}) or None")

        self.layer_ids: List[int] = layer_ids
        self.max_ngram = int(max_ngram)
        self.heads_per_ngram = int(heads_per_ngram)
        self.table_size_per_ngram = table_size_per_ngram
        self.vocab_size = vocab
        self.compressed_vocab_size = int(compressed_vocab_size)
        self.pad_id = int(pad_id)
        self.compressed_pad_id = int(lookup_t[self.pad_id])
        self.eos_id = None if eos_id is None else int(eos_id)
        self.reset_at_doc_boundary = bool(reset_at_doc_boundary)
        self.seed = int(seed)
        self.multipliers: Dict[int, List[int]] = {
            l: layer_multipliers(l, self.max_ngram, self.compressed_vocab_size, self.seed) for l in layer_ids}
        self.table_sizes: Dict[int, List[int]] = prime_table_sizes(
            layer_ids, self.max_ngram, self.heads_per_ngram, table_size_per_ngram)

        L, N, K = len(layer_ids), self.max_ngram, self.heads_per_ngram
        self._lookup = lookup_t
        self._multipliers = torch.tensor([self.multipliers[l] for l in layer_ids], dtype=torch.int64).view(L, N, 1, 1)
        self._primes = torch.tensor([self.table_sizes[l] for l in layer_ids], dtype=torch.int64).view(L, N - 1, K)
        self._inv_primes = 1.0 / self._primes.to(torch.float64)
        self._device_cache: Dict[torch.device, tuple] = {}
        # One dispatch point: "eager" is exact torch `%` (and the oracle of "compiled"); "compiled" fuses
        # all layers, orders and heads into one division-free kernel; "auto" uses compiled for large
        # batches (AUTO_COMPILE_MIN_TOKENS) and falls back to eager if compilation is unavailable.
        self.backend = backend
        self._compile_failed = False

    @property
    def num_heads(self) -> int:
        """Hash ids per token and layer: (max_ngram - 1) * heads_per_ngram."""
        return (self.max_ngram - 1) * self.heads_per_ngram

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_device_cache"] = {}   # device copies (maybe CUDA) never travel to workers
        return state

    def _constants(self, device: torch.device):
        consts = self._device_cache.get(device)
        if consts is None:
            consts = tuple(t.to(device) for t in (self._lookup, self._multipliers, self._primes,
                                                   self._inv_primes))
            self._device_cache[device] = consts
        return consts

    def compress(self, raw_ids: torch.Tensor, any_negative: bool = True) -> torch.Tensor:
        """Canonical ids of ``raw_ids`` (negative ids pass through unchanged, as in the reference)."""
        lookup = self._constants(raw_ids.device)[0]
        if not any_negative:
            return lookup[raw_ids]
        return torch.where(raw_ids >= 0, lookup[raw_ids.clamp_min(0)], raw_ids)

    def _windows(self, raw_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[N, B, T]``: window k holds the token k positions back, pad where that is out of range."""
        B, T = x.shape
        N = self.max_ngram
        windows = torch.empty((N, B, T), dtype=torch.int64, device=x.device)
        windows[0] = x
        for k in range(1, N):
            windows[k, :, :k] = self.compressed_pad_id
            windows[k, :, k:] = x[:, : T - k]
        if self.reset_at_doc_boundary and T > 1:
            pos = torch.arange(T, device=x.device)
            # A document starts right after an EOS; each position's start is the latest such start.
            starts = torch.zeros((B, T), dtype=torch.int64, device=x.device)
            starts[:, 1:] = torch.where(raw_ids[:, :-1] == self.eos_id, pos[1:], 0)
            offset_in_doc = pos - torch.cummax(starts, dim=1).values
            k = torch.arange(N, device=x.device).view(N, 1, 1)
            windows = torch.where(offset_in_doc.unsqueeze(0) >= k, windows, self.compressed_pad_id)
        return windows

    def __call__(self, raw_ids) -> Dict[int, torch.Tensor]:
        if not torch.is_tensor(raw_ids):
            raw_ids = torch.as_tensor(np.asarray(raw_ids))
        if raw_ids.ndim != 2 or raw_ids.is_floating_point() or raw_ids.is_complex():
            raise ValueError(f"raw_ids: expected integer token ids of shape [B, T], got dtype {raw_ids.dtype} "
                             f"and shape {tuple(raw_ids.shape)}; add a batch dimension with raw_ids[None]")
        raw_ids = raw_ids.to(torch.int64)
        B, T = raw_ids.shape
        N, K = self.max_ngram, self.heads_per_ngram
        if raw_ids.numel() == 0:
            empty = torch.empty((B, T, (N - 1) * K), dtype=torch.int64, device=raw_ids.device)
            return {l: empty.clone() for l in self.layer_ids}
        low, top = (int(v) for v in torch.aminmax(raw_ids))
        if top >= self.vocab_size:
            raise ValueError(f"raw_ids: holds token id {top}, outside the tokenizer vocabulary of {self.vocab_size} "
                             f"ids the compression lookup was built for; rebuild it from this tokenizer")
        _, multipliers, primes, inv_primes = self._constants(raw_ids.device)   # [L, N, 1, 1], [L, N-1, K] x2
        x = self.compress(raw_ids, any_negative=low < 0)
        windows = self._windows(raw_ids, x)                        # [N, B, T]
        use_compiled = self.backend == "compiled" or (self.backend == "auto" and B * T >= AUTO_COMPILE_MIN_TOKENS)
        if use_compiled and not self._compile_failed:
            fused = _compiled_hash_fused()
            if fused is not None:
                try:
                    ids = fused(windows, multipliers, primes, inv_primes)        # [L, B, T, N-1, K]
                    return {l: ids[i].reshape(B, T, (N - 1) * K) for i, l in enumerate(self.layer_ids)}
                except Exception as e:
                    if self.backend == "compiled":
                        raise
                    logging.getLogger(__name__).warning(
                        "n-gram hashing: compiled path failed (%s: %s); using eager", type(e).__name__, e)
            self._compile_failed = True
            if self.backend == "compiled":
                raise RuntimeError("n-gram hashing: backend='compiled' but torch.compile is unavailable")
        products = windows.unsqueeze(0) * multipliers              # [L, N, B, T]
        result = {}
        for i, layer_id in enumerate(self.layer_ids):
            out = torch.empty((B, T, N - 1, K), dtype=torch.int64, device=x.device)
            mix = products[i, 0]
            for n in range(2, N + 1):                              # order n XORs in one more window token
                mix = torch.bitwise_xor(mix, products[i, n - 1])
                # All heads of this order at once, written straight into their slice of the output:
                # no transposing copy, and few enough ops that intra-op threads rarely wait on each other.
                torch.remainder(mix.unsqueeze(-1), primes[i, n - 2], out=out[:, :, n - 2])
            result[layer_id] = out.view(B, T, (N - 1) * K)
        return result


def hasher_from_config(cfg: EngramConfig, lookup, compressed_vocab_size: int, pad_id: int,
                       eos_id: Optional[int]) -> NgramHasher:
    """The hasher an ``EngramConfig`` describes; unset table sizes are ``table_size_multiplier * V'``."""
    sizes = list(cfg.table_size_per_ngram) or \
        [int(cfg.table_size_multiplier * compressed_vocab_size)] * (cfg.max_ngram - 1)
    return NgramHasher(lookup, layer_ids=list(cfg.layer_ids), max_ngram=cfg.max_ngram,
                       heads_per_ngram=cfg.heads_per_ngram, table_size_per_ngram=sizes, pad_id=pad_id,
                       seed=cfg.seed, reset_at_doc_boundary=cfg.reset_at_doc_boundary, eos_id=eos_id,
                       compressed_vocab_size=compressed_vocab_size)
