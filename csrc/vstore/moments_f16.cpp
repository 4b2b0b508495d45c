// float16 moments, register-blocked over neurons, in runs of kF16RunRows rows of one group.
//
// Layout: the valid rows of each group are cut, in row order, into runs of at most kF16RunRows rows
// (runs.rows / runs.begin / runs.group). OpenMP splits the columns into tiles; for every run, a tile
// is swept 32 neurons at a time with the run's float32 partials in 12 AVX registers (sum, sum of
// squares, positive count for 4 x 8 neurons), so each value costs one load+convert, one add, one
// FMA and one compare; the run's partials are then widened and added to the block's float64
// partials (one row per present group), which go to the accumulator once at the end.
#include "vstore/moments_f16.hpp"

#include <algorithm>
#include <cmath>
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

template <int V, bool kPrefetch>
VSTORE_F16_TARGET inline __attribute__((always_inline)) void run_block(
    const std::uint16_t* __restrict base, std::int64_t ld, const std::int64_t* __restrict rows, std::int64_t n,
    double* __restrict s, double* __restrict q, std::int64_t* __restrict p, __m256& bad) noexcept {
    __m256 as[V], aq[V];
    __m256i ap[V];
#pragma GCC unroll 4
    for (int i = 0; i < V; ++i) {
        as[i] = _mm256_setzero_ps();
        aq[i] = _mm256_setzero_ps();
        ap[i] = _mm256_setzero_si256();
    }
    const __m256 zero = _mm256_setzero_ps();
    for (std::int64_t k = 0; k < n; ++k) {
        const std::uint16_t* src = base + rows[k] * ld;
        if (kPrefetch) __builtin_prefetch(src + kPrefetchHalves, 0, 0);
#pragma GCC unroll 4
        for (int i = 0; i < V; ++i) {
            const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 8 * i)));
            as[i] = _mm256_add_ps(as[i], x);
            aq[i] = _mm256_fmadd_ps(x, x, aq[i]);  // x * x is exact in float32: same as mul then add
            ap[i] = _mm256_sub_epi32(ap[i], _mm256_castps_si256(_mm256_cmp_ps(x, zero, _CMP_GT_OQ)));
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < V; ++i) {
        bad = _mm256_or_ps(bad, _mm256_sub_ps(as[i], as[i]));  // NaN lanes exactly where non-finite
        double* si = s + 8 * i;
        double* qi = q + 8 * i;
        std::int64_t* pi = p + 8 * i;
        _mm256_storeu_pd(si, _mm256_add_pd(_mm256_loadu_pd(si), _mm256_cvtps_pd(_mm256_castps256_ps128(as[i]))));
        _mm256_storeu_pd(si + 4, _mm256_add_pd(_mm256_loadu_pd(si + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(as[i], 1))));
        _mm256_storeu_pd(qi, _mm256_add_pd(_mm256_loadu_pd(qi), _mm256_cvtps_pd(_mm256_castps256_ps128(aq[i]))));
        _mm256_storeu_pd(qi + 4, _mm256_add_pd(_mm256_loadu_pd(qi + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(aq[i], 1))));
        __m256i* p0 = reinterpret_cast<__m256i*>(pi);
        __m256i* p1 = reinterpret_cast<__m256i*>(pi + 4);
        _mm256_storeu_si256(p0, _mm256_add_epi64(_mm256_loadu_si256(p0), _mm256_cvtepi32_epi64(_mm256_castsi256_si128(ap[i]))));
        _mm256_storeu_si256(p1, _mm256_add_epi64(_mm256_loadu_si256(p1), _mm256_cvtepi32_epi64(_mm256_extracti128_si256(ap[i], 1))));
    }
}

VSTORE_F16_TARGET bool run_simd(const std::uint16_t* base, std::int64_t ld, const std::int64_t* rows, std::int64_t n,
                                std::int64_t w, double* s, double* q, std::int64_t* p) noexcept {
    // The first lines of every row of the run, before the sweep needs them.
    for (std::int64_t k = 0; k < n; ++k)
        for (std::int64_t off = 0; off < std::min<std::int64_t>(w, kPrefetchHalves); off += 32)
            __builtin_prefetch(base + rows[k] * ld + off, 0, 0);
    __m256 bad = _mm256_setzero_ps();
    std::int64_t j = 0;
    for (; j + 32 <= w; j += 32) run_block<4, true>(base + j, ld, rows, n, s + j, q + j, p + j, bad);
    for (; j + 8 <= w; j += 8) run_block<1, false>(base + j, ld, rows, n, s + j, q + j, p + j, bad);
    const bool ok = _mm256_movemask_ps(_mm256_cmp_ps(bad, bad, _CMP_UNORD_Q)) == 0;
    if (j < w) return run_scalar(base + j, ld, rows, n, w - j, s + j, q + j, p + j) && ok;
    return ok;
}
#endif

// Every run over every column tile into the block partials ls/lq/lp (row `slot[g]` per present
// group, N columns); returns false when some run held NaN/Inf.
bool sweep(const BlockRef& b, const Runs& runs, const std::vector<std::int64_t>& slot, std::int64_t n_present,
           double* ls, double* lq, std::int64_t* lp, int nt, bool simd) noexcept {
    const std::int64_t N = b.cols;
    const auto* data = static_cast<const std::uint16_t*>(b.data);
    std::int64_t T = N;
    if (nt > 1) T = std::max<std::int64_t>(256, ((N + 2 * nt - 1) / (2 * nt) + 31) / 32 * 32);
    const std::int64_t n_tiles = (N + T - 1) / T;
    const std::int64_t n_runs = static_cast<std::int64_t>(runs.group.size());
    nt = static_cast<int>(std::min<std::int64_t>(nt, n_tiles));
    bool ok = true;
    (void)simd;
VSTORE_OMP(omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1) reduction(&& : ok))
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
            if (simd) {
                ok = run_simd(data + c0, N, rows, n, w, ls + off, lq + off, lp + off) && ok;
                continue;
            }
#endif
            ok = run_scalar(data + c0, N, rows, n, w, ls + off, lq + off, lp + off) && ok;
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
        std::vector<double> ls(static_cast<std::size_t>(P * N)), lq(static_cast<std::size_t>(P * N));
        std::vector<std::int64_t> lp(static_cast<std::size_t>(P * N));
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
