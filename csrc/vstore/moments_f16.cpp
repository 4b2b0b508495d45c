// float16 moments, register-blocked over neurons, in runs of kF16RunRows rows of one group.
//
// Layout: the valid rows of each group are cut, in row order, into runs of at most kF16RunRows rows
// (runs.rows / runs.begin / runs.group). OpenMP splits the columns into tiles; for every run, a tile
// is swept 32 neurons at a time with the run's float32 partials in 12 AVX registers (sum, sum of
// squares, positive count for 4 x 8 neurons), so each value costs one load+convert, one add, one
// FMA and one compare; the run's partials are then widened and added to the block's float64
// partials (one row per present group), which go to the accumulator once at the end.
#include "vstore/moments_f16.hpp"

// GCC 12 warns inside its own AVX-512 headers (_mm512_undefined_*); nothing of ours is uninitialised.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>
#define VSTORE_F16_SIMD 1
#else
#define VSTORE_F16_SIMD 0
#endif

#ifdef _OPENMP
#include <omp.h>
#define VSTORE_OMP(directive) _Pragma(#directive)
#else
#define VSTORE_OMP(directive)
#endif

namespace vstore {
namespace detail {
namespace {

struct Runs {
    std::vector<std::int64_t> rows;   // row indices, run after run
    std::vector<std::int64_t> begin;  // run i is rows[begin[i] .. begin[i + 1])
    std::vector<std::int32_t> group;  // group of run i
};

// Runs of each group's valid rows (status == nullptr: every row with a group is valid), in row order
// per group; a run is emitted when full, the unfinished ones after the last row.
Runs make_runs(const std::int32_t* groups, const std::uint8_t* valid, std::int64_t n, std::int64_t G) {
    const std::int64_t R = kF16RunRows;
    Runs out;
    out.rows.reserve(static_cast<std::size_t>(n));
    out.begin.reserve(static_cast<std::size_t>(n / R + G + 1));
    std::vector<std::int64_t> pending(static_cast<std::size_t>(G * R));
    std::vector<std::int64_t> fill(static_cast<std::size_t>(G), 0);
    const auto emit = [&](std::int32_t g) {
        out.begin.push_back(static_cast<std::int64_t>(out.rows.size()));
        out.group.push_back(g);
        const std::int64_t* p = pending.data() + g * R;
        out.rows.insert(out.rows.end(), p, p + fill[g]);
        fill[g] = 0;
    };
    for (std::int64_t r = 0; r < n; ++r) {
        const std::int32_t g = groups[r];
        if (g < 0 || (valid != nullptr && !valid[r])) continue;
        pending[g * R + fill[g]++] = r;
        if (fill[g] == R) emit(g);
    }
    for (std::int32_t g = 0; g < G; ++g)
        if (fill[g] > 0) emit(g);
    out.begin.push_back(static_cast<std::int64_t>(out.rows.size()));
    return out;
}

constexpr std::int64_t kTileCols = 2048;

#if VSTORE_F16_SIMD
// AVX-512 (F, BW, VL) unless VSTORE_NO_AVX512 is set to a non-zero value (to test the AVX2 path).
bool avx512_enabled() noexcept {
    const char* off = std::getenv("VSTORE_NO_AVX512");
    if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
}
#endif

float half_bits_to_float(std::uint16_t h) noexcept { return half_to_float(h); }

// One run over `w` neurons from `base` (row r at base + r * ld), any CPU; returns false when a
// partial sum is non-finite (the run holds NaN/Inf).
bool run_scalar(const std::uint16_t* base, std::int64_t ld, const std::int64_t* rows, std::int64_t n,
                std::int64_t w, double* s, double* q, std::int64_t* p) noexcept {
    bool ok = true;
    for (std::int64_t j = 0; j < w; ++j) {
        float a = 0.0f, b = 0.0f;
        std::int64_t c = 0;
        for (std::int64_t k = 0; k < n; ++k) {
            const float x = half_bits_to_float(base[rows[k] * ld + j]);
            a += x;
            b += x * x;  // exact product: a fused multiply-add gives the same sum
            c += x > 0.0f ? 1 : 0;
        }
        ok = ok && std::isfinite(a);
        s[j] += static_cast<double>(a);
        q[j] += static_cast<double>(b);
        p[j] += c;
    }
    return ok;
}

#if VSTORE_F16_SIMD
#define VSTORE_F16_TARGET __attribute__((target("avx2,f16c,fma")))

// Prefetch distance within a row: 4 cache lines (a 32-neuron block reads one 64-byte line per row).
constexpr std::int64_t kPrefetchHalves = 128;

// Rows swept at once: rows a power-of-two stride apart share L1 sets, so a sweep over all 32 rows
// of a run would evict its own lines; 8 rows (plus the lines prefetched ahead) fit the ways. Between
// sub-runs the run's float32 partials wait in a small scratch (the additions happen in the same
// order, so the result is the same as one sweep).
constexpr std::int64_t kSubRunRows = 8;

// Per-thread float32 partials of a run between sub-runs (T columns each).
struct Scratch {
    float* s;
    float* q;
    std::int16_t* c;
};

VSTORE_F16_TARGET inline __attribute__((always_inline)) void add_sums8(double* s, __m256 v) noexcept {
    _mm256_storeu_pd(s, _mm256_add_pd(_mm256_loadu_pd(s), _mm256_cvtps_pd(_mm256_castps256_ps128(v))));
    _mm256_storeu_pd(s + 4, _mm256_add_pd(_mm256_loadu_pd(s + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
}

// Adds 16 int16 counts (neurons p[0..16)) to int64 counts.
VSTORE_F16_TARGET inline __attribute__((always_inline)) void add_counts16(std::int64_t* p, __m256i c16) noexcept {
    const __m256i lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(c16));
    const __m256i hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(c16, 1));
    const __m256i parts[4] = {_mm256_cvtepi32_epi64(_mm256_castsi256_si128(lo)),
                              _mm256_cvtepi32_epi64(_mm256_extracti128_si256(lo, 1)),
                              _mm256_cvtepi32_epi64(_mm256_castsi256_si128(hi)),
                              _mm256_cvtepi32_epi64(_mm256_extracti128_si256(hi, 1))};
    for (int i = 0; i < 4; ++i) {
        __m256i* d = reinterpret_cast<__m256i*>(p + 4 * i);
        _mm256_storeu_si256(d, _mm256_add_epi64(_mm256_loadu_si256(d), parts[i]));
    }
}

// 32 neurons of `n` rows of a run, the partials in 12 registers: from zero (kFirst) or the scratch,
// then back to the scratch or (kLast) widened into the block partials. The positive counts come
// from the raw bits: a finite float16 is > 0 exactly when its bits are > 0 as a signed 16-bit
// integer, so one compare counts 16 neurons (16-bit counters: a run has at most 32 rows).
template <bool kFirst, bool kLast>
VSTORE_F16_TARGET void run_block32(const std::uint16_t* __restrict base, std::int64_t ld,
                                   const std::int64_t* __restrict rows, std::int64_t n, const Scratch& sc,
                                   double* __restrict s, double* __restrict q, std::int64_t* __restrict p,
                                   __m256& bad) noexcept {
    __m256 s0, s1, s2, s3, q0, q1, q2, q3;
    __m256i c0, c1;
    if (kFirst) {
        s0 = s1 = s2 = s3 = q0 = q1 = q2 = q3 = _mm256_setzero_ps();
        c0 = c1 = _mm256_setzero_si256();
    } else {
        s0 = _mm256_loadu_ps(sc.s), s1 = _mm256_loadu_ps(sc.s + 8), s2 = _mm256_loadu_ps(sc.s + 16);
        s3 = _mm256_loadu_ps(sc.s + 24), q0 = _mm256_loadu_ps(sc.q), q1 = _mm256_loadu_ps(sc.q + 8);
        q2 = _mm256_loadu_ps(sc.q + 16), q3 = _mm256_loadu_ps(sc.q + 24);
        c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc.c));
        c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc.c + 16));
    }
    const __m256i zero = _mm256_setzero_si256();
    for (std::int64_t k = 0; k < n; ++k) {
        const std::uint16_t* src = base + rows[k] * ld;
        __builtin_prefetch(src + kPrefetchHalves, 0, 3);
        const __m256i h0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
        const __m256i h1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16));
        const __m256 x0 = _mm256_cvtph_ps(_mm256_castsi256_si128(h0));
        const __m256 x1 = _mm256_cvtph_ps(_mm256_extracti128_si256(h0, 1));
        const __m256 x2 = _mm256_cvtph_ps(_mm256_castsi256_si128(h1));
        const __m256 x3 = _mm256_cvtph_ps(_mm256_extracti128_si256(h1, 1));
        s0 = _mm256_add_ps(s0, x0);
        s1 = _mm256_add_ps(s1, x1);
        s2 = _mm256_add_ps(s2, x2);
        s3 = _mm256_add_ps(s3, x3);
        q0 = _mm256_fmadd_ps(x0, x0, q0);  // x * x is exact in float32: same as mul then add
        q1 = _mm256_fmadd_ps(x1, x1, q1);
        q2 = _mm256_fmadd_ps(x2, x2, q2);
        q3 = _mm256_fmadd_ps(x3, x3, q3);
        c0 = _mm256_sub_epi16(c0, _mm256_cmpgt_epi16(h0, zero));
        c1 = _mm256_sub_epi16(c1, _mm256_cmpgt_epi16(h1, zero));
    }
    if (!kLast) {
        _mm256_storeu_ps(sc.s, s0), _mm256_storeu_ps(sc.s + 8, s1), _mm256_storeu_ps(sc.s + 16, s2);
        _mm256_storeu_ps(sc.s + 24, s3), _mm256_storeu_ps(sc.q, q0), _mm256_storeu_ps(sc.q + 8, q1);
        _mm256_storeu_ps(sc.q + 16, q2), _mm256_storeu_ps(sc.q + 24, q3);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(sc.c), c0);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(sc.c + 16), c1);
        return;
    }
    // NaN lanes exactly where non-finite (finite float16 sums cannot overflow float32).
    const __m256 a = _mm256_add_ps(s0, s1), b = _mm256_add_ps(s2, s3);
    bad = _mm256_or_ps(bad, _mm256_or_ps(_mm256_sub_ps(a, a), _mm256_sub_ps(b, b)));
    add_sums8(s, s0);
    add_sums8(s + 8, s1);
    add_sums8(s + 16, s2);
    add_sums8(s + 24, s3);
    add_sums8(q, q0);
    add_sums8(q + 8, q1);
    add_sums8(q + 16, q2);
    add_sums8(q + 24, q3);
    add_counts16(p, c0);
    add_counts16(p + 16, c1);
}

template <bool kFirst, bool kLast>
VSTORE_F16_TARGET void sweep_blocks(const std::uint16_t* base, std::int64_t ld, const std::int64_t* rows,
                                    std::int64_t n, std::int64_t w32, const Scratch& sc, double* s, double* q,
                                    std::int64_t* p, __m256& bad) noexcept {
    for (std::int64_t j = 0; j < w32; j += 32)
        run_block32<kFirst, kLast>(base + j, ld, rows, n, Scratch{sc.s + j, sc.q + j, sc.c + j}, s + j, q + j,
                                   p + j, bad);
}

#define VSTORE_F16_TARGET512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,f16c,fma")))

// Prefetch distance of the AVX-512 sweep within a row (halves; 16 cache lines).
constexpr std::int64_t kPrefetch512 = 512;

VSTORE_F16_TARGET512 inline __attribute__((always_inline)) void add_sums16(double* s, __m512 v) noexcept {
    const __m256 lo = _mm512_castps512_ps256(v);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    _mm512_storeu_pd(s, _mm512_add_pd(_mm512_loadu_pd(s), _mm512_cvtps_pd(lo)));
    _mm512_storeu_pd(s + 8, _mm512_add_pd(_mm512_loadu_pd(s + 8), _mm512_cvtps_pd(hi)));
}

VSTORE_F16_TARGET512 inline __attribute__((always_inline)) void add_counts32(std::int64_t* p, __m512i c16) noexcept {
    const __m128i parts[4] = {_mm512_extracti32x4_epi32(c16, 0), _mm512_extracti32x4_epi32(c16, 1),
                              _mm512_extracti32x4_epi32(c16, 2), _mm512_extracti32x4_epi32(c16, 3)};
    for (int i = 0; i < 4; ++i)
        _mm512_storeu_si512(p + 8 * i, _mm512_add_epi64(_mm512_loadu_si512(p + 8 * i), _mm512_cvtepi16_epi64(parts[i])));
}

// The AVX-512 form of run_block32: 64 neurons (two cache lines per row), partials in 10 registers.
template <bool kFirst, bool kLast>
VSTORE_F16_TARGET512 void run_block64(const std::uint16_t* __restrict base, std::int64_t ld,
                                      const std::int64_t* __restrict rows, std::int64_t n,
                                      const std::int64_t* __restrict next, std::int64_t n_next, const Scratch& sc,
                                      double* __restrict s, double* __restrict q, std::int64_t* __restrict p,
                                      unsigned& bad) noexcept {
    // The same two lines of the rows swept next, a whole sweep ahead.
    for (std::int64_t k = 0; k < n_next; ++k) {
        const std::uint16_t* src = base + next[k] * ld;
        __builtin_prefetch(src, 0, 2);
        __builtin_prefetch(src + 32, 0, 2);
    }
    __m512 s0, s1, s2, s3, q0, q1, q2, q3;
    __m512i c0, c1;
    if (kFirst) {
        s0 = s1 = s2 = s3 = q0 = q1 = q2 = q3 = _mm512_setzero_ps();
        c0 = c1 = _mm512_setzero_si512();
    } else {
        s0 = _mm512_loadu_ps(sc.s), s1 = _mm512_loadu_ps(sc.s + 16), s2 = _mm512_loadu_ps(sc.s + 32);
        s3 = _mm512_loadu_ps(sc.s + 48), q0 = _mm512_loadu_ps(sc.q), q1 = _mm512_loadu_ps(sc.q + 16);
        q2 = _mm512_loadu_ps(sc.q + 32), q3 = _mm512_loadu_ps(sc.q + 48);
        c0 = _mm512_loadu_si512(sc.c), c1 = _mm512_loadu_si512(sc.c + 32);
    }
    const __m512i zero = _mm512_setzero_si512(), one = _mm512_set1_epi16(1);
    for (std::int64_t k = 0; k < n; ++k) {
        const std::uint16_t* src = base + rows[k] * ld;
        __builtin_prefetch(src + kPrefetch512, 0, 3);
        __builtin_prefetch(src + kPrefetch512 + 32, 0, 3);
        const __m512i h0 = _mm512_loadu_si512(src);
        const __m512i h1 = _mm512_loadu_si512(src + 32);
        const __m512 x0 = _mm512_cvtph_ps(_mm512_castsi512_si256(h0));
        const __m512 x1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h0, 1));
        const __m512 x2 = _mm512_cvtph_ps(_mm512_castsi512_si256(h1));
        const __m512 x3 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h1, 1));
        s0 = _mm512_add_ps(s0, x0);
        s1 = _mm512_add_ps(s1, x1);
        s2 = _mm512_add_ps(s2, x2);
        s3 = _mm512_add_ps(s3, x3);
        q0 = _mm512_fmadd_ps(x0, x0, q0);
        q1 = _mm512_fmadd_ps(x1, x1, q1);
        q2 = _mm512_fmadd_ps(x2, x2, q2);
        q3 = _mm512_fmadd_ps(x3, x3, q3);
        c0 = _mm512_mask_add_epi16(c0, _mm512_cmpgt_epi16_mask(h0, zero), c0, one);
        c1 = _mm512_mask_add_epi16(c1, _mm512_cmpgt_epi16_mask(h1, zero), c1, one);
    }
    if (!kLast) {
        _mm512_storeu_ps(sc.s, s0), _mm512_storeu_ps(sc.s + 16, s1), _mm512_storeu_ps(sc.s + 32, s2);
        _mm512_storeu_ps(sc.s + 48, s3), _mm512_storeu_ps(sc.q, q0), _mm512_storeu_ps(sc.q + 16, q1);
        _mm512_storeu_ps(sc.q + 32, q2), _mm512_storeu_ps(sc.q + 48, q3);
        _mm512_storeu_si512(sc.c, c0), _mm512_storeu_si512(sc.c + 32, c1);
        return;
    }
    const __m512 a = _mm512_sub_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s0, s1));
    const __m512 b = _mm512_sub_ps(_mm512_add_ps(s2, s3), _mm512_add_ps(s2, s3));
    bad |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q);
    add_sums16(s, s0);
    add_sums16(s + 16, s1);
    add_sums16(s + 32, s2);
    add_sums16(s + 48, s3);
    add_sums16(q, q0);
    add_sums16(q + 16, q1);
    add_sums16(q + 32, q2);
    add_sums16(q + 48, q3);
    add_counts32(p, c0);
    add_counts32(p + 32, c1);
}

template <bool kFirst, bool kLast>
VSTORE_F16_TARGET512 void sweep_blocks512(const std::uint16_t* base, std::int64_t ld, const std::int64_t* rows,
                                          std::int64_t n, const std::int64_t* next, std::int64_t n_next,
                                          std::int64_t w64, const Scratch& sc, double* s, double* q,
                                          std::int64_t* p, unsigned& bad) noexcept {
    for (std::int64_t j = 0; j < w64; j += 64)
        run_block64<kFirst, kLast>(base + j, ld, rows, n, next, n_next, Scratch{sc.s + j, sc.q + j, sc.c + j},
                                   s + j, q + j, p + j, bad);
}

VSTORE_F16_TARGET512 bool run_simd512(const std::uint16_t* base, std::int64_t ld, const std::int64_t* rows,
                                      std::int64_t n, const std::int64_t* next_run, std::int64_t n_next_run,
                                      std::int64_t w, double* s, double* q, std::int64_t* p,
                                      const Scratch& sc) noexcept {
    unsigned bad = 0;
    const std::int64_t w64 = w & ~std::int64_t{63};
    for (std::int64_t k = 0; k < n; k += kSubRunRows) {
        const std::int64_t m = std::min(kSubRunRows, n - k);
        const bool first = k == 0, last = k + m == n;
        const std::int64_t* nx = last ? next_run : rows + k + m;
        const std::int64_t nn = last ? std::min(kSubRunRows, n_next_run) : std::min(kSubRunRows, n - k - m);
        if (first && last)
            sweep_blocks512<true, true>(base, ld, rows + k, m, nx, nn, w64, sc, s, q, p, bad);
        else if (first)
            sweep_blocks512<true, false>(base, ld, rows + k, m, nx, nn, w64, sc, s, q, p, bad);
        else if (last)
            sweep_blocks512<false, true>(base, ld, rows + k, m, nx, nn, w64, sc, s, q, p, bad);
        else
            sweep_blocks512<false, false>(base, ld, rows + k, m, nx, nn, w64, sc, s, q, p, bad);
    }
    if (w64 < w) return run_scalar(base + w64, ld, rows, n, w - w64, s + w64, q + w64, p + w64) && bad == 0;
    return bad == 0;
}

VSTORE_F16_TARGET bool run_simd(const std::uint16_t* base, std::int64_t ld, const std::int64_t* rows, std::int64_t n,
                                std::int64_t w, double* s, double* q, std::int64_t* p, const Scratch& sc) noexcept {
    __m256 bad = _mm256_setzero_ps();
    const std::int64_t w32 = w & ~std::int64_t{31};
    for (std::int64_t k = 0; k < n; k += kSubRunRows) {
        const std::int64_t m = std::min(kSubRunRows, n - k);
        const bool first = k == 0, last = k + m == n;
        if (first && last)
            sweep_blocks<true, true>(base, ld, rows + k, m, w32, sc, s, q, p, bad);
        else if (first)
            sweep_blocks<true, false>(base, ld, rows + k, m, w32, sc, s, q, p, bad);
        else if (last)
            sweep_blocks<false, true>(base, ld, rows + k, m, w32, sc, s, q, p, bad);
        else
            sweep_blocks<false, false>(base, ld, rows + k, m, w32, sc, s, q, p, bad);
    }
    const bool ok = _mm256_movemask_ps(_mm256_cmp_ps(bad, bad, _CMP_UNORD_Q)) == 0;
    if (w32 < w) return run_scalar(base + w32, ld, rows, n, w - w32, s + w32, q + w32, p + w32) && ok;
    return ok;
}
#endif

// Every run over every column tile into the block partials ls/lq/lp (row `slot[g]` per present
// group, N columns); returns false when some run held NaN/Inf.
bool sweep(const BlockRef& b, const Runs& runs, const std::vector<std::int64_t>& slot, std::int64_t n_present,
           double* ls, double* lq, std::int64_t* lp, int nt, bool simd) noexcept {
    const std::int64_t N = b.cols;
    const auto* data = static_cast<const std::uint16_t*>(b.data);
    // Tiles of at most kTileCols columns: a run's sub-run then reads short row segments (one page),
    // and the scratch stays in L1.
    std::int64_t T = std::min(N, kTileCols);
    if (nt > 1) T = std::min(T, std::max<std::int64_t>(256, ((N + 2 * nt - 1) / (2 * nt) + 31) / 32 * 32));
    const std::int64_t n_tiles = (N + T - 1) / T;
    const std::int64_t n_runs = static_cast<std::int64_t>(runs.group.size());
    nt = static_cast<int>(std::min<std::int64_t>(nt, n_tiles));
    bool ok = true;
    (void)simd;
#if VSTORE_F16_SIMD
    static const bool wide = avx512_enabled();
#endif
VSTORE_OMP(omp parallel num_threads(nt) if (nt > 1) reduction(&& : ok))
    {
    std::vector<float> ss(static_cast<std::size_t>(T)), sq(static_cast<std::size_t>(T));
    std::vector<std::int16_t> scc(static_cast<std::size_t>(T));
    const Scratch sc{ss.data(), sq.data(), scc.data()};
    (void)sc;
VSTORE_OMP(omp for schedule(dynamic, 1))
    for (std::int64_t t = 0; t < n_tiles; ++t) {
        const std::int64_t c0 = t * T;
        const std::int64_t w = std::min(T, N - c0);
        for (std::int64_t i = 0; i < n_present; ++i) {
            std::fill(ls + i * N + c0, ls + i * N + c0 + w, 0.0);
            std::fill(lq + i * N + c0, lq + i * N + c0 + w, 0.0);
            std::fill(lp + i * N + c0, lp + i * N + c0 + w, std::int64_t{0});
        }
        for (std::int64_t u = 0; u < n_runs; ++u) {
            const std::int64_t off = slot[static_cast<std::size_t>(runs.group[u])] * N + c0;
            const std::int64_t* rows = runs.rows.data() + runs.begin[u];
            const std::int64_t n = runs.begin[u + 1] - runs.begin[u];
#if VSTORE_F16_SIMD
            if (simd && wide) {
                const std::int64_t* nx = runs.rows.data() + runs.begin[u + 1];
                const std::int64_t nn = u + 1 < n_runs ? runs.begin[u + 2] - runs.begin[u + 1] : 0;
                ok = run_simd512(data + c0, N, rows, n, nx, nn, w, ls + off, lq + off, lp + off, sc) && ok;
                continue;
            }
            if (simd) {
                ok = run_simd(data + c0, N, rows, n, w, ls + off, lq + off, lp + off, sc) && ok;
                continue;
            }
#endif
            ok = run_scalar(data + c0, N, rows, n, w, ls + off, lq + off, lp + off) && ok;
        }
    }
    }
    return ok;
}

std::vector<std::uint8_t> finite_rows(const BlockRef& b) {
    std::vector<std::uint8_t> valid(static_cast<std::size_t>(b.rows));
    const auto* data = static_cast<const std::uint16_t*>(b.data);
    for (std::int64_t r = 0; r < b.rows; ++r) {
        std::int16_t m = 0;
        for (std::int64_t j = 0; j < b.cols; ++j) m = std::max<std::int16_t>(m, static_cast<std::int16_t>(data[r * b.cols + j] & 0x7FFF));
        valid[r] = b.groups[r] >= 0 && m < 0x7C00;
    }
    return valid;
}

}  // namespace

void accumulate_moments_f16(const BlockRef& b, const MomentsRef& acc, int threads, bool simd) noexcept {
    const std::int64_t G = acc.n_groups;
    const std::int64_t N = b.cols;
    int nt = threads;
    if (b.rows * N < (std::int64_t{1} << 16)) nt = 1;
    std::vector<std::uint8_t> valid;  // empty: every row with a group (the optimistic first sweep)
    for (int attempt = 0; attempt < 2; ++attempt) {
        const Runs runs = make_runs(b.groups, valid.empty() ? nullptr : valid.data(), b.rows, G);
        std::vector<std::int64_t> slot(static_cast<std::size_t>(G), -1);
        std::vector<std::int32_t> present;
        for (const std::int32_t g : runs.group)
            if (slot[g] < 0) {
                slot[g] = static_cast<std::int64_t>(present.size());
                present.push_back(g);
            }
        const auto P = static_cast<std::int64_t>(present.size());
        // The block partials, kept per calling thread between calls (no page faults per block).
        thread_local std::vector<double> ls, lq;
        thread_local std::vector<std::int64_t> lp;
        if (ls.size() < static_cast<std::size_t>(P * N)) {
            ls.resize(static_cast<std::size_t>(P * N));
            lq.resize(static_cast<std::size_t>(P * N));
            lp.resize(static_cast<std::size_t>(P * N));
        }
        if (N > 0 && !sweep(b, runs, slot, P, ls.data(), lq.data(), lp.data(), nt, simd) && valid.empty()) {
            valid = finite_rows(b);
            continue;  // some row holds NaN/Inf: again, over the finite rows only
        }
        for (std::int64_t r = 0; r < b.rows; ++r) {
            const std::int32_t g = b.groups[r];
            if (g < 0) continue;
            if (valid.empty() || valid[r])
                ++acc.count[g];
            else
                ++acc.nonfinite[g];
        }
        for (std::int64_t i = 0; i < P; ++i) {
            const std::int64_t g = present[static_cast<std::size_t>(i)];
            double* sum = acc.sum + g * N;
            double* sumsq = acc.sumsq + g * N;
            std::int64_t* npos = acc.npos + g * N;
            for (std::int64_t j = 0; j < N; ++j) {
                sum[j] += ls[i * N + j];
                sumsq[j] += lq[i * N + j];
                npos[j] += lp[i * N + j];
            }
        }
        return;
    }
}

}  // namespace detail
}  // namespace vstore
