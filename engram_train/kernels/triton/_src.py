"""Triton kernels of the Engram lookup path.  Loaded twice by ``engram_train.kernels.triton`` (compiled, interpreted).

Do not import this file directly: ``engram_train.kernels.triton.module(device)`` executes it
once with the interpreter knob off (compiled kernels for CUDA tensors) and once
with it on (the interpreter, for CPU tensors), so the choice never depends on
when ``TRITON_INTERPRET`` was set relative to the first ``import triton``.

Exactness of the hash modulo (``_floor_mod``), the argument of the C kernel
(``csrc/ngram_hash.c``) restated for these kernels.  For int64 ``x`` and
``2 <= p < 2**40``, with ``inv = fl(1/p)`` (float64, relative error <= 2^-53):

1. ``q = trunc(fl(fl(x) * inv))``.  Three roundings of relative error 2^-53 on a
   quotient of magnitude ``|x/p| <= 2^62`` leave ``|fl(...) - x/p| < 2^62 * 2^-51
   = 2^11``, so ``|q - x/p| < 2^11 + 1`` and the true ``r = x - q*p`` has
   ``|r| < (2^11 + 1) p < 2^52``.  int64 arithmetic wraps modulo 2^64, so the
   computed ``r`` equals the true one even where ``q*p`` alone overflowed.
2. ``q = trunc(fl(r * inv))``: ``r`` is exact as a double, ``|r/p| < 2^12``, and two
   roundings leave the quotient within ``2^12 * 2^-52 = 2^-40`` of ``r/p``; so
   ``|q - r/p| < 1 + 2^-40`` and ``|r - q*p| < p + p * 2^-40 < p + 1``: the new
   ``r`` is an integer in ``[-p, p]``.
3. Adding ``p`` when ``r < 0``, then subtracting it when ``r >= p``, lands in
   ``[0, p)``: the floor modulo of torch's ``%``.

Float64 conversions round to nearest and float-to-int casts truncate, both on
the GPU (``cvt.rn.f64.s64``, ``cvt.rzi.s64.f64``) and in the interpreter
(numpy), so both compute the same bits; the tests compare them with torch's
exact ``%`` at the edges of int64 and of ``p``.
"""

import triton
import triton.language as tl


@triton.jit
def _floor_mod(x, p, inv):
    q = (x.to(tl.float64) * inv).to(tl.int64)
    r = x - q * p
    q = (r.to(tl.float64) * inv).to(tl.int64)
    r = r - q * p
    r = tl.where(r < 0, r + p, r)
    return tl.where(r >= p, r - p, r)


@triton.jit
def floor_mod_kernel(x_ptr, out_ptr, n, p_ptr, inv_ptr, BLOCK: tl.constexpr):
    # p and 1/p come from tensors: a Python float argument would arrive as fp32.
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    x = tl.load(x_ptr + i, mask=m, other=0)
    tl.store(out_ptr + i, _floor_mod(x, tl.load(p_ptr), tl.load(inv_ptr)), mask=m)


@triton.jit
def _compress(raw, lookup_ptr, m):
    # Negative ids pass through unchanged, as in NgramHasher.compress.
    c = tl.load(lookup_ptr + tl.maximum(raw, 0), mask=m, other=0)
    return tl.where(raw >= 0, c, raw)


@triton.jit
def hash_ngrams_kernel(raw_ptr, lookup_ptr, mult_ptr, primes_ptr, inv_ptr, out_ptr, layer_off_ptr,
                       T, layer_stride, pad, eos,
                       N: tl.constexpr, K: tl.constexpr, HP: tl.constexpr, RESET: tl.constexpr,
                       OUT_TABLE: tl.constexpr, BLOCK: tl.constexpr):
    """Program (token block, row, layer): every hash id of BLOCK tokens of one row and layer.

    Column ``j`` of a token's ``H = (N-1)*K`` ids is head ``j % K`` of order
    ``n = j // K + 2``, whose mix XORs the tokens 0..n-1 positions back.
    """
    H = (N - 1) * K                       # constexpr: N and K are
    l = tl.program_id(2)
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)     # position in the row: no division needed
    valid = t < T
    g = tl.program_id(1).to(tl.int64) * T + t                # flat token index
    j = tl.arange(0, HP)
    jmask = j < H
    back = j // K + 1                     # the farthest position back column j reads

    raw = tl.load(raw_ptr + g, mask=valid, other=0)
    prod = _compress(raw, lookup_ptr, valid) * tl.load(mult_ptr + l * N)
    mix = tl.full([BLOCK, HP], 0, tl.int64) + prod[:, None]
    same_doc = t >= 0                     # all True: no EOS seen yet walking back
    for i in tl.static_range(1, N):
        inside = t >= i
        r = tl.load(raw_ptr + g - i, mask=valid & inside, other=0)
        x = _compress(r, lookup_ptr, valid & inside)
        if RESET:
            # A document starts after an EOS: the EOS and everything before it read pad.
            # Where t < i the masked load read 0, maybe == eos: harmless, t < i for every later i too.
            same_doc = same_doc & (r != eos)
            inside = inside & same_doc
        v = tl.where(inside, x, pad)
        prod = v * tl.load(mult_ptr + l * N + i)
        mix = mix ^ tl.where(back[None, :] >= i, prod[:, None], 0)

    p = tl.load(primes_ptr + l * H + j, mask=jmask, other=2)
    inv = tl.load(inv_ptr + l * H + j, mask=jmask, other=0.5)
    ids = _floor_mod(mix, p[None, :], inv[None, :])
    if OUT_TABLE:
        base = tl.load(layer_off_ptr + l)     # caller's buffers: element offset of layer l from out_ptr
    else:
        base = l.to(tl.int64) * layer_stride
    tl.store(out_ptr + base + g[:, None] * H + j[None, :], ids, mask=valid[:, None] & jmask[None, :])


@triton.jit
def gather_rows_kernel(w_ptr, ids_ptr, off_ptr, out_ptr, M, R, w_stride, D, H,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Slot ``i`` (token ``i // H``, head ``i % H``) copies row ``ids[i] + offsets[i % H]`` to ``out[i]``.

    ``[M, D]`` slots are exactly the ``[..., H*D]`` output.  Rows outside ``[0, R)``
    are masked: they read zeros instead of faulting (the caller checks ids).
    """
    i = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mi = i < M
    mc = c < D
    row = tl.load(ids_ptr + i, mask=mi, other=0) + tl.load(off_ptr + i % H, mask=mi, other=0)
    ok = mi & (row >= 0) & (row < R)
    vals = tl.load(w_ptr + row[:, None] * w_stride + c[None, :], mask=ok[:, None] & mc[None, :], other=0)
    tl.store(out_ptr + i[:, None] * D + c[None, :], vals, mask=mi[:, None] & mc[None, :])


@triton.jit
def segment_sum_kernel(g_ptr, perm_ptr, bounds_ptr, out_ptr, D, g_stride,
                       BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program u: ``out[u] = sum of g[perm[s]]`` over its sorted segment ``[bounds[u], bounds[u+1])``.

    Deterministic, no atomics: lane ``k`` of BLOCK_S sums segment entries
    ``k, k + BLOCK_S, ...`` in order in fp32, and one fixed reduction tree adds
    the lanes, so the bits depend only on the inputs and BLOCK_S.
    """
    u = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mc = c < D
    start = tl.load(bounds_ptr + u)
    end = tl.load(bounds_ptr + u + 1)
    acc = tl.full([BLOCK_S, BLOCK_D], 0.0, tl.float32)
    for s in range(start, end, BLOCK_S):
        k = s + tl.arange(0, BLOCK_S)
        mk = k < end
        src = tl.load(perm_ptr + k, mask=mk, other=0)
        g = tl.load(g_ptr + src[:, None] * g_stride + c[None, :], mask=mk[:, None] & mc[None, :], other=0)
        acc += g.to(tl.float32)
    # tl.sum's own combine function: the interpreter recognizes it (numpy) where a custom one runs per element.
    total = tl.reduce(acc, 0, tl.standard._sum_combine)
    tl.store(out_ptr + u * D + c, total.to(out_ptr.dtype.element_ty), mask=mc)


@triton.jit
def row_adam_kernel(w_ptr, m_ptr, v_ptr, ids_ptr, g_ptr, bc1_ptr, bc2_ptr, U, D, lr, beta1, one_minus_beta1,
                    beta2, one_minus_beta2, eps, decay, DECAY: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Lazy Adam on rows ``ids`` (unique): TableSparseAdam.step's arithmetic, one pass over w, m, v, g."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mr = r < U
    mask = mr[:, None] & (c < D)[None, :]
    row = tl.load(ids_ptr + r, mask=mr, other=0)
    bc1 = tl.load(bc1_ptr + r, mask=mr, other=1.0)
    bc2 = tl.load(bc2_ptr + r, mask=mr, other=1.0)
    # IEEE-rounded division and square root (tl.sqrt and / are approximate on the GPU); torch rounds
    # lr / bc1 as a reciprocal and a product, so the two agree to an ulp or so, not bit for bit.
    step = tl.div_rn(bc1 * 0.0 + lr, bc1)      # lr as a [BLOCK_R] vector (bc1 is finite): exactly lr
    off = row[:, None] * D + c[None, :]
    g = tl.load(g_ptr + r[:, None] * D + c[None, :], mask=mask, other=0).to(tl.float32)
    m = tl.load(m_ptr + off, mask=mask, other=0) * beta1 + g * one_minus_beta1
    v = tl.load(v_ptr + off, mask=mask, other=0) * beta2 + (g * g) * one_minus_beta2
    w = tl.load(w_ptr + off, mask=mask, other=0)
    if DECAY:
        w = w * decay
    denom = tl.div_rn(tl.sqrt_rn(v), tl.broadcast_to(bc2[:, None], [BLOCK_R, BLOCK_D])) + eps
    w = w - tl.div_rn(m * step[:, None], denom)
    tl.store(m_ptr + off, m, mask=mask)
    tl.store(v_ptr + off, v, mask=mask)
    tl.store(w_ptr + off, w, mask=mask)
