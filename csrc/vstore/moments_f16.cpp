// float16 moments, register-blocked over neurons, in runs of kF16RunRows rows of one group.
//
// Layout: the valid rows of each group are cut, in row order, into runs of at most kF16RunRows rows,
// listed group after group (runs.rows / runs.begin / runs.group). Each OpenMP thread owns one
// contiguous range of columns and takes the groups in the same order: for every run of a group it
// sweeps its columns 64 (AVX2: 32) neurons at a time with the run's float32 partials in registers
// (sum, sum of squares, positive count), so each value costs one load+convert, one add, one FMA and
// one compare; the run's partials are then widened and added to the group's float64 partials (one
// row of the thread's columns, kept hot in L2 while the group lasts). When every thread has swept
// the group, each adds its columns of the partials to the accumulator, unless some run of the group
// held NaN/Inf: that group alone is then redone over its finite rows. Rows are read group by group,
// each row once; the results do not depend on the traversal order (each group's sums are added in
// the order of kernels.hpp).
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
    std::vector<std::int32_t> group;  // group of run i (runs of one group are consecutive)
};

// Runs of each group's rows in row order, group after group (in the order groups first appear);
// a row is taken when its group is >= 0 and, with `take`, take[r] is non-zero.
Runs make_runs(const std::int32_t* groups, const std::uint8_t* take, std::int64_t n, std::int64_t G) {
    const std::int64_t R = kF16RunRows;
    std::vector<std::int64_t> size(static_cast<std::size_t>(G), 0), order;
    for (std::int64_t r = 0; r < n; ++r) {
        const std::int32_t g = groups[r];
        if (g < 0 || (take != nullptr && !take[r])) continue;
        if (size[g]++ == 0) order.push_back(g);
    }
    std::vector<std::int64_t> start(static_cast<std::size_t>(G), 0);
    std::int64_t total = 0, n_runs = 0;
    for (const std::int64_t g : order) {
        start[g] = total;
        total += size[g];
        n_runs += (size[g] + R - 1) / R;
    }
    Runs out;
    out.rows.resize(static_cast<std::size_t>(total));
    for (std::int64_t r = 0; r < n; ++r) {
        const std::int32_t g = groups[r];
        if (g < 0 || (take != nullptr && !take[r])) continue;
        out.rows[static_cast<std::size_t>(start[g]++)] = r;
    }
    out.begin.reserve(static_cast<std::size_t>(n_runs + 1));
    out.group.reserve(static_cast<std::size_t>(n_runs));
    std::int64_t at = 0;
    for (const std::int64_t g : order) {
        for (std::int64_t k = 0; k < size[g]; k += R) {
            out.begin.push_back(at + k);
            out.group.push_back(static_cast<std::int32_t>(g));
        }
        at += size[g];
    }
    out.begin.push_back(total);
    return out;
}

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

// Prefetch distance within a row: 2 cache lines (a 32-neuron block reads one 64-byte line per row);
// on Zen 2 it read slightly faster than 4 lines (docs/performance.md).
constexpr std::int64_t kPrefetchHalves = 64;

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
        // Converted straight from memory: on Zen 2, converting the loaded registers' halves (an
        // extract and a register vcvtph2ps each) took twice as long per row step.
        const __m256 x0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
        const __m256 x1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 8)));
        const __m256 x2 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16)));
        const __m256 x3 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 24)));
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

// Prefetch distance of the AVX-512 sweep within a row (halves; 8 cache lines), into L2 only
// (prefetcht1): the sweep's loads then hit L2, and a run's rows may alias in L1 without losing
// prefetched lines, so all rows of a run are swept at once, with the partials in registers (no
// sub-runs, no scratch). On a Zen 4 VM reading a 67 MB block from DRAM, the median ratio to the
// read probe went from 0.50 - 0.56 (L1 prefetches, sub-runs of 8 rows) to 0.53 - 0.68
// (docs/performance.md).
constexpr std::int64_t kPrefetch512 = 256;

// The rows of the next run are prefetched at their first kNextPrefetchCols columns only: that
// starts their streams early, and the hardware prefetcher follows (prefetching whole rows ahead
// evicts lines still to be read on wide blocks).
constexpr std::int64_t kNextPrefetchCols = 256;

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

// The AVX-512 form of run_block32 over a whole run (at most kF16RunRows rows): 64 neurons (two
// cache lines per row), partials in 10 registers from zero, then widened into the block partials.
VSTORE_F16_TARGET512 void run_block64(const std::uint16_t* __restrict base, std::int64_t ld,
                                      const std::int64_t* __restrict rows, std::int64_t n,
                                      const std::int64_t* __restrict next, std::int64_t n_next,
                                      double* __restrict s, double* __restrict q, std::int64_t* __restrict p,
                                      unsigned& bad) noexcept {
    // The same two lines of the next run's rows, a whole run ahead (n_next is 0 past the first
    // kNextPrefetchCols columns).
    for (std::int64_t k = 0; k < n_next; ++k) {
        const std::uint16_t* src = base + next[k] * ld;
        __builtin_prefetch(src, 0, 2);
        __builtin_prefetch(src + 32, 0, 2);
    }
    __m512 s0, s1, s2, s3, q0, q1, q2, q3;
    __m512i c0, c1;
    s0 = s1 = s2 = s3 = q0 = q1 = q2 = q3 = _mm512_setzero_ps();
    c0 = c1 = _mm512_setzero_si512();
    const __m512i zero = _mm512_setzero_si512(), one = _mm512_set1_epi16(1);
    for (std::int64_t k = 0; k < n; ++k) {
        const std::uint16_t* src = base + rows[k] * ld;
        __builtin_prefetch(src + kPrefetch512, 0, 2);
        __builtin_prefetch(src + kPrefetch512 + 32, 0, 2);
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

VSTORE_F16_TARGET512 bool run_simd512(const std::uint16_t* base, std::int64_t ld, const std::int64_t* rows,
                                      std::int64_t n, const std::int64_t* next_run, std::int64_t n_next_run,
                                      std::int64_t w, double* s, double* q, std::int64_t* p) noexcept {
    unsigned bad = 0;
    const std::int64_t w64 = w & ~std::int64_t{63};
    const std::int64_t nn = std::min(kF16RunRows, n_next_run);
    for (std::int64_t j = 0; j < w64; j += 64)
        run_block64(base + j, ld, rows, n, next_run, j < kNextPrefetchCols ? nn : 0, s + j, q + j, p + j, bad);
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

// One run over the columns [0, w) of `base` (row r at base + r * ld), added to the float64 partials
// s/q/p; false when the run held NaN/Inf.
bool sweep_run(const std::uint16_t* base, std::int64_t ld, const Runs& runs, std::int64_t u, std::int64_t w,
               double* s, double* q, std::int64_t* p, const Scratch* sc, bool simd) noexcept {
    const std::int64_t* rows = runs.rows.data() + runs.begin[u];
    const std::int64_t n = runs.begin[u + 1] - runs.begin[u];
#if VSTORE_F16_SIMD
    static const bool wide = avx512_enabled();
    if (simd && wide) {
        const auto n_runs = static_cast<std::int64_t>(runs.group.size());
        const std::int64_t* nx = runs.rows.data() + runs.begin[u + 1];
        const std::int64_t nn = u + 1 < n_runs ? runs.begin[u + 2] - runs.begin[u + 1] : 0;
        return run_simd512(base, ld, rows, n, nx, nn, w, s, q, p);
    }
    if (simd) return run_simd(base, ld, rows, n, w, s, q, p, *sc);
#else
    (void)sc, (void)simd;
#endif
    return run_scalar(base, ld, rows, n, w, s, q, p);
}

// Every run into the accumulator, group by group; a group with a run that held NaN/Inf is not added
// and gets bad[g] = 1. Each of nt threads owns a contiguous range of columns (a multiple of 64 wide).
void sweep_commit(const BlockRef& b, const Runs& runs, const MomentsRef& acc, int nt, bool simd,
                  std::vector<std::uint8_t>& bad) noexcept {
    const std::int64_t N = b.cols;
    const auto* data = static_cast<const std::uint16_t*>(b.data);
    const auto n_runs = static_cast<std::int64_t>(runs.group.size());
    // Where each group's runs start (groups in the order of the runs), and the end.
    std::vector<std::int64_t> first;
    for (std::int64_t u = 0; u < n_runs; ++u)
        if (u == 0 || runs.group[u] != runs.group[u - 1]) first.push_back(u);
    first.push_back(n_runs);
    const auto n_groups = static_cast<std::int64_t>(first.size()) - 1;
    nt = static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(nt, (N + 63) / 64)));
    std::vector<std::uint8_t> group_bad(static_cast<std::size_t>(n_groups), 0);
VSTORE_OMP(omp parallel num_threads(nt) if (nt > 1))
    {
#ifdef _OPENMP
    // the team OpenMP gave (it may be smaller than asked): every column belongs to one of its threads
    const std::int64_t tid = omp_get_thread_num(), team = omp_get_num_threads();
#else
    const std::int64_t tid = 0, team = 1;
#endif
    const std::int64_t width = ((N + team - 1) / team + 63) / 64 * 64;
    const std::int64_t c0 = std::min(N, tid * width);
    const std::int64_t w = std::min(N, c0 + width) - c0;
    // The group's float64 partials over this thread's columns, and the float32 run scratch.
    std::vector<double> ls(static_cast<std::size_t>(w)), lq(static_cast<std::size_t>(w));
    std::vector<std::int64_t> lp(static_cast<std::size_t>(w));
    std::vector<float> ss(static_cast<std::size_t>(w)), sq(static_cast<std::size_t>(w));
    std::vector<std::int16_t> scc(static_cast<std::size_t>(w));
    const Scratch sc{ss.data(), sq.data(), scc.data()};
    for (std::int64_t i = 0; i < n_groups; ++i) {
        bool ok = true;
        if (w > 0) {
            std::fill(ls.begin(), ls.end(), 0.0);
            std::fill(lq.begin(), lq.end(), 0.0);
            std::fill(lp.begin(), lp.end(), std::int64_t{0});
            for (std::int64_t u = first[i]; u < first[i + 1]; ++u)
                ok = sweep_run(data + c0, N, runs, u, w, ls.data(), lq.data(), lp.data(), &sc, simd) && ok;
        }
        if (!ok) {
VSTORE_OMP(omp atomic write)
            group_bad[i] = 1;
        }
VSTORE_OMP(omp barrier)
        std::uint8_t skip;
VSTORE_OMP(omp atomic read)
        skip = group_bad[i];
        if (skip || w == 0) continue;
        const std::int64_t g = runs.group[first[i]];
        double* sum = acc.sum + g * N + c0;
        double* sumsq = acc.sumsq + g * N + c0;
        std::int64_t* npos = acc.npos + g * N + c0;
        for (std::int64_t j = 0; j < w; ++j) {
            sum[j] += ls[j];
            sumsq[j] += lq[j];
            npos[j] += lp[j];
        }
    }
    }
    for (std::int64_t i = 0; i < n_groups; ++i)
        if (group_bad[i]) bad[runs.group[first[i]]] = 1;
}

// take[r] = 1 for the rows of the groups with bad[g] that hold no NaN/Inf.
std::vector<std::uint8_t> finite_rows_of(const BlockRef& b, const std::vector<std::uint8_t>& bad) {
    std::vector<std::uint8_t> take(static_cast<std::size_t>(b.rows), 0);
    const auto* data = static_cast<const std::uint16_t*>(b.data);
    for (std::int64_t r = 0; r < b.rows; ++r) {
        if (b.groups[r] < 0 || !bad[b.groups[r]]) continue;
        std::int16_t m = 0;
        for (std::int64_t j = 0; j < b.cols; ++j) m = std::max<std::int16_t>(m, static_cast<std::int16_t>(data[r * b.cols + j] & 0x7FFF));
        take[r] = m < 0x7C00;
    }
    return take;
}

}  // namespace

void accumulate_moments_f16(const BlockRef& b, const MomentsRef& acc, int threads, bool simd) noexcept {
    const std::int64_t G = acc.n_groups;
    int nt = threads;
    if (b.rows * b.cols < (std::int64_t{1} << 16)) nt = 1;
    // Optimistic: every row with a group; a sum that is not finite marks its group, which is then
    // redone over its finite rows (a finite float16 run cannot overflow its float32 sums).
    std::vector<std::uint8_t> bad(static_cast<std::size_t>(G), 0);
    if (b.cols > 0) sweep_commit(b, make_runs(b.groups, nullptr, b.rows, G), acc, nt, simd, bad);
    const bool any_bad = std::find(bad.begin(), bad.end(), std::uint8_t{1}) != bad.end();
    std::vector<std::uint8_t> take;
    if (any_bad) {
        take = finite_rows_of(b, bad);
        std::vector<std::uint8_t> again(static_cast<std::size_t>(G), 0);
        sweep_commit(b, make_runs(b.groups, take.data(), b.rows, G), acc, nt, simd, again);
    }
    for (std::int64_t r = 0; r < b.rows; ++r) {
        const std::int32_t g = b.groups[r];
        if (g < 0) continue;
        if (!bad[g] || take[r])
            ++acc.count[g];
        else
            ++acc.nonfinite[g];
    }
}

}  // namespace detail
}  // namespace vstore
