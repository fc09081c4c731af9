"""N-gram hashing for every Engram layer at once (docs/engram.md §1.2-1.4).

For Engram layer ``l`` (0-based, as in the reference demo) and n-gram order
``n = 2..N``, the token at position ``t`` is addressed, in each of the ``K``
heads of that order, by

    mix = x[t]*m0 XOR x[t-1]*m1 XOR ... XOR x[t-n+1]*m_{n-1}      (int64)
    id  = mix mod prime[l][n][head]

where ``x`` are compressed token ids, positions before the sequence start read
the compressed pad id (``engram.pad_id``, raw, compressed like every id), ``m`` are the layer's odd multipliers drawn from
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

Backends (one dispatch point, ``NgramHasher(backend=...)``):
- ``"torch"``: tensor code on the input's device, exact int64 ``%``.  The
  reference: the golden tests pin it to an independent port of the demo, and
  it is the oracle of the kernel.
- ``"cpu_kernel"``: ``engram_train/kernels/ngram_hash.py``, a native kernel for CPU tensors
  (one pass per token, vectorized division-free modulo, threads split tokens).
  CPUs have no SIMD int64 division: torch's ``%`` costs ~2 ns per id and
  thread here (numpy's ~10 ns), most of the torch path's time.
- ``"triton"``: ``engram_train/kernels/triton``, one launch for every layer (compression,
  windows, mix, division-free modulo); compiled for CUDA tensors, Triton's
  interpreter for CPU tensors (slow: tests and small runs).
- ``"auto"`` (default): Triton for CUDA tensors, the native kernel for CPU
  tensors, each when available here, else torch.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from engram_train.config.schema import EngramConfig, require

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


HASH_BACKENDS = ("auto", "torch", "cpu_kernel", "triton")


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
        require(backend in HASH_BACKENDS, "backend", backend,
                "choose 'torch' (exact %, the reference), 'cpu_kernel' (native, CPU tensors), 'triton' or 'auto'")
        lookup_t = torch.as_tensor(np.asarray(lookup) if not torch.is_tensor(lookup) else lookup)
        require(lookup_t.ndim == 1 and lookup_t.numel() > 0 and not lookup_t.is_floating_point(),
                "lookup", f"tensor of shape {tuple(lookup_t.shape)} and dtype {lookup_t.dtype}",
                "must be a non-empty 1-D integer array; build it with engram.compress.build_compression")
        lookup_t = lookup_t.detach().to(device="cpu", dtype=torch.int64).contiguous()
        lo, hi = int(lookup_t.min()), int(lookup_t.max())
        require(lo >= 0, "lookup", f"min {lo}", "canonical ids must be >= 0; rebuild it with build_compression")
        if compressed_vocab_size is None:
            compressed_vocab_size = hi + 1   # canonical ids are exactly 0..V'-1
        require(int(compressed_vocab_size) > hi, "compressed_vocab_size", compressed_vocab_size,
                f"must exceed the largest canonical id in lookup ({hi}); pass the size build_compression returned")

        layer_ids = [int(i) for i in layer_ids]
        require(len(layer_ids) > 0, "layer_ids", layer_ids, "list at least one Engram layer")
        duplicates = sorted({i for i in layer_ids if layer_ids.count(i) > 1})
        require(not duplicates, "layer_ids", layer_ids, f"layer ids must be distinct; remove the duplicates {duplicates}")
        require(min(layer_ids) >= 0, "layer_ids", layer_ids, "layer ids are 0-based and must be >= 0")
        require(isinstance(max_ngram, (int, np.integer)) and max_ngram >= 2, "max_ngram", max_ngram,
                "must be an integer >= 2 (bigrams at least)")
        require(isinstance(heads_per_ngram, (int, np.integer)) and heads_per_ngram >= 1, "heads_per_ngram",
                heads_per_ngram, "must be an integer >= 1")
        table_size_per_ngram = [int(s) for s in table_size_per_ngram]
        require(len(table_size_per_ngram) == max_ngram - 1, "table_size_per_ngram", table_size_per_ngram,
                f"needs one entry per n-gram order n=2..{max_ngram}, i.e. max_ngram-1={max_ngram - 1} entries")
        require(all(s >= 2 for s in table_size_per_ngram), "table_size_per_ngram", table_size_per_ngram,
                "every table size must be >= 2; use a few times the compressed vocabulary size")
        vocab = lookup_t.numel()
        require(isinstance(pad_id, (int, np.integer)) and 0 <= pad_id < vocab, "pad_id", pad_id,
                f"must be a raw tokenizer id in [0, {vocab}); use the tokenizer's pad (or EOS) id")
        require(isinstance(seed, (int, np.integer)) and seed >= 0, "seed", seed, "must be an integer >= 0")
        if reset_at_doc_boundary:
            require(eos_id is not None and 0 <= eos_id < vocab, "eos_id", eos_id,
                    f"reset_at_doc_boundary=True needs the tokenizer's EOS id in [0, {vocab})")
        elif eos_id is not None:
            require(0 <= eos_id < vocab, "eos_id", eos_id, f"must be a raw tokenizer id in [0, {vocab}) or None")

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
        from engram_train.kernels.ngram_hash import MAX_TABLE_SIZE

        self.backend = backend
        self._kernel_exact = max(max(v) for v in self.table_sizes.values()) < MAX_TABLE_SIZE
        if backend == "cpu_kernel":
            from engram_train.kernels import ngram_hash

            ngram_hash._require(ngram_hash.library())   # fail at construction, with the reason
            require(self._kernel_exact, "table_sizes", "a prime >= 2**40",
                    "backend='cpu_kernel' is exact below 2**40 rows per head; use 'torch'")
        elif backend == "triton":
            from engram_train.kernels import triton as triton_kernels

            reason = triton_kernels.unavailable_reason()
            require(reason is None, "backend", backend, f"Triton is unavailable here ({reason}); use 'auto' or 'torch'")
            require(self._kernel_exact, "table_sizes", "a prime >= 2**40",
                    "backend='triton' is exact below 2**40 rows per head; use 'torch'")

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

    def _path(self, device: torch.device) -> str:
        """The implementation that hashes tensors on ``device``: the one dispatch point."""
        if self.backend == "torch":
            return "torch"
        if self.backend == "cpu_kernel":
            if device.type != "cpu":
                raise ValueError(f"raw_ids on {device}: backend='cpu_kernel' hashes CPU tensors; use 'auto' or "
                                 "'torch' for other devices")
            return "cpu_kernel"
        if self.backend == "triton":
            if device.type not in ("cpu", "cuda"):
                raise ValueError(f"raw_ids on {device}: backend='triton' hashes CUDA tensors (CPU ones "
                                 "interpreted); use 'auto' or 'torch' for other devices")
            return "triton"
        if not self._kernel_exact or device.type not in ("cpu", "cuda"):
            return "torch"
        if device.type == "cuda":
            from engram_train.kernels import triton as triton_kernels

            return "triton" if triton_kernels.available() else "torch"
        from engram_train.kernels import ngram_hash

        return "cpu_kernel" if ngram_hash.available() else "torch"   # built (or found unbuildable) once

    def _check_out(self, out, B: int, T: int, device: torch.device) -> Dict[int, torch.Tensor]:
        want = (B, T, self.num_heads)
        if not isinstance(out, dict) or sorted(out) != sorted(self.layer_ids):
            got = sorted(out) if isinstance(out, dict) else type(out).__name__
            raise ValueError(f"out: expected a dict with one tensor per Engram layer {sorted(self.layer_ids)}, "
                             f"got {got}")
        for layer_id, t in out.items():
            if t.dtype != torch.int64 or tuple(t.shape) != want or t.device != device or not t.is_contiguous():
                raise ValueError(f"out[{layer_id}]: expected a contiguous int64 tensor of shape {list(want)} on "
                                 f"{device}, got {t.dtype} {list(t.shape)} on {t.device} "
                                 f"(contiguous={t.is_contiguous()})")
        return out

    def __call__(self, raw_ids, out: Optional[Dict[int, torch.Tensor]] = None) -> Dict[int, torch.Tensor]:
        """Hash ids ``{layer_id: LongTensor[B, T, (N-1)*K]}`` of ``raw_ids [B, T]``, on its device.

        ``out``: optional preallocated outputs (same dict layout, contiguous int64), e.g. reused
        or pinned buffers of a data pipeline; the ids are written there and ``out`` is returned.
        """
        if not torch.is_tensor(raw_ids):
            raw_ids = torch.as_tensor(np.asarray(raw_ids))
        if raw_ids.ndim != 2 or raw_ids.is_floating_point() or raw_ids.is_complex():
            raise ValueError(f"raw_ids: expected integer token ids of shape [B, T], got dtype {raw_ids.dtype} "
                             f"and shape {tuple(raw_ids.shape)}; add a batch dimension with raw_ids[None]")
        raw_ids = raw_ids.to(torch.int64)
        B, T = raw_ids.shape
        N, K = self.max_ngram, self.heads_per_ngram
        path = self._path(raw_ids.device)
        if out is None and path == "triton":
            # One buffer, so the kernel addresses every layer by a stride.
            buf = torch.empty((len(self.layer_ids), B, T, (N - 1) * K), dtype=torch.int64, device=raw_ids.device)
            out = {l: buf[i] for i, l in enumerate(self.layer_ids)}
        elif out is None:
            out = {l: torch.empty((B, T, (N - 1) * K), dtype=torch.int64, device=raw_ids.device)
                   for l in self.layer_ids}
        else:
            out = self._check_out(out, B, T, raw_ids.device)
        if raw_ids.numel() == 0:
            return out
        low, top = (int(v) for v in torch.aminmax(raw_ids))
        if top >= self.vocab_size:
            raise ValueError(f"raw_ids: holds token id {top}, outside the tokenizer vocabulary of {self.vocab_size} "
                             f"ids the compression lookup was built for; rebuild it from this tokenizer")
        if path == "triton":
            from engram_train.kernels import triton as triton_kernels

            lookup, multipliers, primes, inv_primes = self._constants(raw_ids.device)
            L = len(self.layer_ids)
            triton_kernels.hash_ngrams(
                raw_ids.contiguous(), lookup, multipliers.view(L, N), primes.view(L, -1),
                inv_primes.view(L, -1), self.compressed_pad_id,
                self.eos_id if self.reset_at_doc_boundary else None, [out[l] for l in self.layer_ids])
            return out
        x = self.compress(raw_ids, any_negative=low < 0)
        if path == "cpu_kernel":
            from engram_train.kernels import ngram_hash

            _, multipliers, primes, inv_primes = self._constants(raw_ids.device)
            ngram_hash.ngram_hash(
                x.contiguous(), raw_ids.contiguous(), self.eos_id if self.reset_at_doc_boundary else None,
                self.compressed_pad_id, multipliers.view(len(self.layer_ids), N),
                primes.view(len(self.layer_ids), -1), inv_primes.view(len(self.layer_ids), -1),
                [out[l] for l in self.layer_ids])
            return out
        return self._hash_torch(raw_ids, x, out)

    def _hash_torch(self, raw_ids: torch.Tensor, x: torch.Tensor, out: Dict[int, torch.Tensor]):
        """The reference path: exact int64 ``%`` on any device."""
        B, T = x.shape
        N, K = self.max_ngram, self.heads_per_ngram
        _, multipliers, primes, _ = self._constants(x.device)        # [L, N, 1, 1], [L, N-1, K]
        windows = self._windows(raw_ids, x)                          # [N, B, T]
        products = windows.unsqueeze(0) * multipliers                # [L, N, B, T], wraps like int64 in numpy
        for i, layer_id in enumerate(self.layer_ids):
            dst = out[layer_id].view(B, T, N - 1, K)
            mix = products[i, 0]
            for n in range(2, N + 1):                                # order n XORs in one more window token
                mix = torch.bitwise_xor(mix, products[i, n - 1])
                # All heads of this order at once, written straight into their slice of the output.
                torch.remainder(mix.unsqueeze(-1), primes[i, n - 2], out=dst[:, :, n - 2])
        return out


def table_size_per_ngram(cfg: EngramConfig, compressed_vocab_size: int) -> List[int]:
    """``engram.table_size_per_ngram``, or ``table_size_multiplier * V'`` for every order when unset."""
    return [int(s) for s in cfg.table_size_per_ngram] or \
        [int(cfg.table_size_multiplier * compressed_vocab_size)] * (cfg.max_ngram - 1)


def hasher_from_config(cfg: EngramConfig, lookup, compressed_vocab_size: int, pad_id: int,
                       eos_id: Optional[int]) -> NgramHasher:
    """The hasher an ``EngramConfig`` describes; unset table sizes are ``table_size_multiplier * V'``.

    ``pad_id`` is the tokenizer's default (its pad token, else EOS); ``engram.pad_id`` overrides it.
    """
    sizes = table_size_per_ngram(cfg, compressed_vocab_size)
    if getattr(cfg, "pad_id", None) is not None:
        vocab = len(lookup)
        require(0 <= int(cfg.pad_id) < vocab, "engram.pad_id", cfg.pad_id,
                f"must be a raw id of the tokenizer's {vocab} ids; set it in [0, {vocab}) or null for the "
               f"tokenizer's pad token")
        pad_id = int(cfg.pad_id)
    return NgramHasher(lookup, layer_ids=list(cfg.layer_ids), max_ngram=cfg.max_ngram,
                       heads_per_ngram=cfg.heads_per_ngram, table_size_per_ngram=sizes, pad_id=pad_id,
                       seed=cfg.seed, reset_at_doc_boundary=cfg.reset_at_doc_boundary, eos_id=eos_id,
                       compressed_vocab_size=compressed_vocab_size, backend=cfg.hash_backend)
