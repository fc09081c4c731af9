/* Engram n-gram hashing on the CPU: the native kernel behind NgramHasher(backend="cpu_kernel").
 *
 * Oracle: the torch path of engram_train/engram/hashing.py (exact int64 `%`), which the golden
 * tests pin to an independent port of DeepSeek's reference.  Semantics (DESIGN.md 1.2-1.4): for a
 * token at position t of its row and n-gram order n = 2..N,
 *     mix_n = x[t]*m[0] ^ x[t-1]*m[1] ^ ... ^ x[t-n+1]*m[n-1]       (wrapping int64)
 *     id    = mix_n mod prime[n][head]                             (floor modulo, result in [0, p))
 * where x are compressed ids, positions before the row start read `pad`, and with `reset` a
 * position at or before the latest EOS preceding t (raw id == eos) reads `pad` too.
 *
 * Why it is fast: CPUs have no vector int64 division.  The modulo uses the float64 reciprocal
 * of p (vectorized: int64<->double conversions, multiplies, compares), in two rounds:
 *   q = trunc(x * inv);  r = x - q*p    three roundings of 2^-53 on |x/p| < 2^62: q is off by
 *                                       < 2^11, so |r| < 2^12 p < 2^53 (exact as a double)
 *   q = trunc(r * inv);  r = r - q*p    error < 2^-41 on |r/p| < 2^12, and p < 2^40: r in [-p, p]
 *   one add or subtract of p puts r in [0, p).
 * Exact for every int64 x when 2 <= p < 2^40 (the caller checks; tables are far smaller).
 * Heads of one order are the innermost loop, so each token writes (N-1)*K contiguous ids.
 *
 * Threads: none here.  The caller splits the flat token range [0, B*T) over its own threads
 * (ctypes releases the GIL), so this library never brings a second OpenMP runtime next to torch's.
 * Plain C, no torch headers: it builds in well under a second.
 */
#include <stdint.h>

typedef uint64_t u64;

static inline int64_t floor_mod(int64_t x, int64_t p, double inv) {
    int64_t q = (int64_t)((double)x * inv);
    int64_t r = (int64_t)((u64)x - (u64)q * (u64)p);
    q = (int64_t)((double)r * inv);
    r = (int64_t)((u64)r - (u64)q * (u64)p);
    r = r < 0 ? r + p : r;
    return r >= p ? r - p : r;
}

/* Every head of one n-gram order for one token: the loop the compiler vectorizes. */
static inline void order_heads(int64_t *restrict out, int64_t mix, const int64_t *restrict p,
                               const double *restrict inv, int64_t K) {
    for (int64_t k = 0; k < K; k++) out[k] = floor_mod(mix, p[k], inv[k]);
}

int64_t engram_ngram_hash_abi_version(void) { return 1; }

/* out[i] = x[i] mod p for i < n: the modulo alone, for exactness tests. */
void engram_floor_mod(const int64_t *x, int64_t n, int64_t p, double inv, int64_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = floor_mod(x[i], p, inv);
}

/* Hash ids of the flat tokens [start, end) of a [B, T] batch, for L layers at once.
 *   x        compressed ids [B*T];  raw: raw ids [B*T] (read only when reset != 0)
 *   mult     [L*N] odd multipliers;  primes, inv: [L*(N-1)*K] table sizes and 1.0/size
 *   outs     L pointers, each to a contiguous [B*T, (N-1)*K] int64 output
 */
void engram_ngram_hash(const int64_t *x, const int64_t *raw, int64_t eos, int32_t reset, int64_t T,
                       int64_t start, int64_t end, int64_t pad, int64_t L, int64_t N, int64_t K,
                       const int64_t *mult, const int64_t *primes, const double *inv,
                       int64_t *const *outs) {
    const int64_t H = (N - 1) * K;
    for (int64_t g = start; g < end; g++) {
        const int64_t t = g % T;
        for (int64_t l = 0; l < L; l++) {
            const int64_t *m = mult + l * N;
            int64_t *o = outs[l] + g * H;
            int64_t mix = (int64_t)((u64)x[g] * (u64)m[0]);
            int blocked = 0;
            for (int64_t n = 1; n < N; n++) {
                int64_t v = pad;
                if (t >= n) {
                    blocked |= reset && raw[g - n] == eos;
                    if (!blocked) v = x[g - n];
                }
                mix ^= (int64_t)((u64)v * (u64)m[n]);
                order_heads(o + (n - 1) * K, mix, primes + l * H + (n - 1) * K, inv + l * H + (n - 1) * K, K);
            }
        }
    }
}
