// Welch's t from per-group moments (see welch.hpp). OpenMP over (layer, neuron tile).
#include "vstore/welch.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// The NumPy reference rounds every operation on its own: no fused multiply-add here. The loops
// vectorise because setup.py compiles with -fno-math-errno -fno-trapping-math (neither changes a value).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#if defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace vstore {
namespace {

constexpr std::int64_t kTile = 512;

struct Side {
    double mean, var;
};

// Mean and variance of one side, as the NumPy path: NaN mean with n == 0, NaN variance with n <= 1.
// As std::max(q - s * m, 0), a NaN q - s * m stays NaN (std::max is not inlined under the pragma).
__attribute__((always_inline)) inline Side side(double n, double s, double q, double nan) noexcept {
    const double m = s / n;
    const double dev = q - s * m;
    const double v = (dev < 0.0 ? 0.0 : dev) / (n - 1.0);
    return {n > 0 ? m : nan, n > 1 ? v : nan};
}

// One target over `w` neurons of a tile: side 1 is (n1, s1, q1), side 0 (n0, s0, q0). Branch-free
// over k, so the compiler vectorises it (division and square root are correctly rounded in every
// lane width, so each width gives the same bits).
__attribute__((always_inline)) inline void welch_row(std::int64_t w, const double* __restrict n1v,
                                                     const double* __restrict s1v, const double* __restrict q1v,
                                                     const double* __restrict n0v, const double* __restrict s0v,
                                                     const double* __restrict q0v, double* __restrict to,
                                                     double* __restrict tr, double* __restrict d) noexcept {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const double big = std::numeric_limits<double>::max();
    for (std::int64_t k = 0; k < w; ++k) {
        const double n1 = n1v[k], s1 = s1v[k], q1 = q1v[k], n0 = n0v[k], s0 = s0v[k], q0 = q0v[k];
        const Side x = side(n1, s1, q1, nan), y = side(n0, s0, q0, nan);
        const double a = x.var / n1, b = y.var / n0, se2 = a + b;
        const double tt = (x.mean - y.mean) / std::sqrt(se2);
        const double dd = se2 * se2 / (a * a / (n1 - 1.0) + b * b / (n0 - 1.0));
        const bool ok = n1 > 1 && n0 > 1;
        // np.nan_to_num: NaN -> 0, +-Inf -> +-max double
        const double clean = tt != tt ? 0.0 : (tt > big ? big : (tt < -big ? -big : tt));
        tr[k] = tt;
        to[k] = ok ? clean : nan;
        d[k] = ok ? dd : nan;
    }
}

// Every target of one (layer, tile); `scratch` holds 7 * kTile doubles.
__attribute__((always_inline)) inline void welch_tile(const GroupMomentsRef& m, const std::int64_t* pos,
                                                      const std::int64_t* neg, std::int64_t T, std::int64_t l,
                                                      std::int64_t j0, std::int64_t w, double* t, double* t_raw,
                                                      double* df, double* scratch) noexcept {
    const std::int64_t G = m.groups, N = m.neurons;
    double *tn = scratch, *ts = scratch + kTile, *tq = scratch + 2 * kTile;
    double *n1 = scratch + 3 * kTile, *n0 = scratch + 4 * kTile;
    const auto valid = [&](std::int64_t g, double* out) {  // rows with a finite value, per neuron
        const std::int64_t c = m.count[l * G + g];
        const std::int64_t* nf = m.nonfinite + (l * G + g) * N + j0;
        for (std::int64_t k = 0; k < w; ++k) out[k] = static_cast<double>(c - nf[k]);
    };
    // totals over the groups, in group order
    valid(0, tn);
    std::copy(m.sum + (l * G) * N + j0, m.sum + (l * G) * N + j0 + w, ts);
    std::copy(m.sumsq + (l * G) * N + j0, m.sumsq + (l * G) * N + j0 + w, tq);
    for (std::int64_t g = 1; g < G; ++g) {
        valid(g, n1);
        const double* sg = m.sum + (l * G + g) * N + j0;
        const double* qg = m.sumsq + (l * G + g) * N + j0;
        for (std::int64_t k = 0; k < w; ++k) {
            tn[k] += n1[k];
            ts[k] += sg[k];
            tq[k] += qg[k];
        }
    }
    double *s0 = scratch + 5 * kTile, *q0 = scratch + 6 * kTile;
    for (std::int64_t i = 0; i < T; ++i) {
        const std::int64_t p = pos[i], r = neg[i];
        const double* s1 = m.sum + (l * G + p) * N + j0;
        const double* q1 = m.sumsq + (l * G + p) * N + j0;
        valid(p, n1);
        if (r < 0) {
            for (std::int64_t k = 0; k < w; ++k) {
                n0[k] = tn[k] - n1[k];
                s0[k] = ts[k] - s1[k];
                q0[k] = tq[k] - q1[k];
            }
            welch_row(w, n1, s1, q1, n0, s0, q0, t + (l * T + i) * N + j0, t_raw + (l * T + i) * N + j0,
                      df + (l * T + i) * N + j0);
        } else {
            valid(r, n0);
            welch_row(w, n1, s1, q1, n0, m.sum + (l * G + r) * N + j0, m.sumsq + (l * G + r) * N + j0,
                      t + (l * T + i) * N + j0, t_raw + (l * T + i) * N + j0, df + (l * T + i) * N + j0);
        }
    }
}

using TileFn = void (*)(const GroupMomentsRef&, const std::int64_t*, const std::int64_t*, std::int64_t, std::int64_t,
                        std::int64_t, std::int64_t, double*, double*, double*, double*);

void tile_generic(const GroupMomentsRef& m, const std::int64_t* pos, const std::int64_t* neg, std::int64_t T,
                  std::int64_t l, std::int64_t j0, std::int64_t w, double* t, double* t_raw, double* df,
                  double* scratch) noexcept {
    welch_tile(m, pos, neg, T, l, j0, w, t, t_raw, df, scratch);
}

__attribute__((target("avx2"))) void tile_avx2(const GroupMomentsRef& m, const std::int64_t* pos,
                                               const std::int64_t* neg, std::int64_t T, std::int64_t l,
                                               std::int64_t j0, std::int64_t w, double* t, double* t_raw,
                                               double* df, double* scratch) noexcept {
    welch_tile(m, pos, neg, T, l, j0, w, t, t_raw, df, scratch);
}

__attribute__((target("avx512f,avx512dq"))) void tile_avx512(const GroupMomentsRef& m, const std::int64_t* pos,
                                                             const std::int64_t* neg, std::int64_t T,
                                                             std::int64_t l, std::int64_t j0, std::int64_t w,
                                                             double* t, double* t_raw, double* df,
                                                             double* scratch) noexcept {
    welch_tile(m, pos, neg, T, l, j0, w, t, t_raw, df, scratch);
}

bool switched_off(const char* name) noexcept {
    const char* v = std::getenv(name);
    return v != nullptr && v[0] != '\0' && v[0] != '0';
}

// The widest path this CPU has; VSTORE_NO_AVX512 / VSTORE_NO_F16C (as the moments kernels) force
// the AVX2 / portable one, so tests can compare them on any x86 CPU.
TileFn pick_tile() noexcept {
    if (switched_off("VSTORE_NO_F16C")) return tile_generic;
    __builtin_cpu_init();
    if (switched_off("VSTORE_NO_AVX512")) return __builtin_cpu_supports("avx2") ? tile_avx2 : tile_generic;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) return tile_avx512;
    if (__builtin_cpu_supports("avx2")) return tile_avx2;
    return tile_generic;
}

}  // namespace

void welch_from_moments(const GroupMomentsRef& m, const std::int64_t* pos, const std::int64_t* neg, std::int64_t T,
                        double* t, double* t_raw, double* df, int threads) noexcept {
    static const TileFn tile = pick_tile();
    const std::int64_t L = m.layers, N = m.neurons;
    const std::int64_t tiles = (N + kTile - 1) / kTile;
#ifdef _OPENMP
    const int nt = threads > 0 ? threads : omp_get_max_threads();
#pragma omp parallel num_threads(nt) if (nt > 1 && L * tiles > 1)
#else
    (void)threads;
#endif
    {
        std::vector<double> scratch(static_cast<std::size_t>(7 * kTile));
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (std::int64_t u = 0; u < L * tiles; ++u) {
            const std::int64_t l = u / tiles, j0 = (u % tiles) * kTile;
            tile(m, pos, neg, T, l, j0, std::min(kTile, N - j0), t, t_raw, df, scratch.data());
        }
    }
}

}  // namespace vstore
