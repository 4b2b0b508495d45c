// Welch's t from per-group moments (see welch.hpp). OpenMP over (layer, neuron tile).
#include "vstore/welch.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// The NumPy reference rounds every operation on its own: no fused multiply-add here.
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
    double mean, var, n;
};

inline Side side(double n, double s, double q) noexcept {
    const double m = s / n;
    const double v = std::max(q - s * m, 0.0) / (n - 1.0);  // NaN stays NaN (std::max returns its first)
    const double nan = std::numeric_limits<double>::quiet_NaN();
    return {n > 0 ? m : nan, n > 1 ? v : nan, n};
}

inline double nan_to_num(double x) noexcept {
    if (std::isnan(x)) return 0.0;
    if (std::isinf(x)) return x > 0 ? std::numeric_limits<double>::max() : -std::numeric_limits<double>::max();
    return x;
}

}  // namespace

void welch_from_moments(const GroupMomentsRef& m, const std::int64_t* pos, const std::int64_t* neg, std::int64_t T,
                        double* t, double* t_raw, double* df, int threads) noexcept {
    const std::int64_t L = m.layers, G = m.groups, N = m.neurons;
    const std::int64_t tiles = (N + kTile - 1) / kTile;
    const double nan = std::numeric_limits<double>::quiet_NaN();
#ifdef _OPENMP
    const int nt = threads > 0 ? threads : omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && L * tiles > 1)
#else
    (void)threads;
#endif
    for (std::int64_t u = 0; u < L * tiles; ++u) {
        const std::int64_t l = u / tiles, j0 = (u % tiles) * kTile, w = std::min(kTile, N - j0);
        std::vector<double> tn(static_cast<std::size_t>(w)), ts(static_cast<std::size_t>(w)),
            tq(static_cast<std::size_t>(w));
        const auto n_of = [&](std::int64_t g, std::int64_t j) {
            return static_cast<double>(m.count[l * G + g] - m.nonfinite[(l * G + g) * N + j]);
        };
        for (std::int64_t k = 0; k < w; ++k) {  // totals over the groups, in group order
            const std::int64_t j = j0 + k;
            double a = n_of(0, j), b = m.sum[(l * G) * N + j], c = m.sumsq[(l * G) * N + j];
            for (std::int64_t g = 1; g < G; ++g) {
                a += n_of(g, j);
                b += m.sum[(l * G + g) * N + j];
                c += m.sumsq[(l * G + g) * N + j];
            }
            tn[k] = a, ts[k] = b, tq[k] = c;
        }
        for (std::int64_t i = 0; i < T; ++i) {
            const std::int64_t p = pos[i], r = neg[i];
            double* to = t + (l * T + i) * N + j0;
            double* tr = t_raw + (l * T + i) * N + j0;
            double* d = df + (l * T + i) * N + j0;
            for (std::int64_t k = 0; k < w; ++k) {
                const std::int64_t j = j0 + k;
                const double n1 = n_of(p, j), s1 = m.sum[(l * G + p) * N + j], q1 = m.sumsq[(l * G + p) * N + j];
                double n0, s0, q0;
                if (r < 0) {
                    n0 = tn[k] - n1, s0 = ts[k] - s1, q0 = tq[k] - q1;
                } else {
                    n0 = n_of(r, j), s0 = m.sum[(l * G + r) * N + j], q0 = m.sumsq[(l * G + r) * N + j];
                }
                const Side x = side(n1, s1, q1), y = side(n0, s0, q0);
                const double a = x.var / n1, b = y.var / n0, se2 = a + b;
                const double tt = (x.mean - y.mean) / std::sqrt(se2);
                const double dd = se2 * se2 / (a * a / (n1 - 1.0) + b * b / (n0 - 1.0));
                const bool ok = n1 > 1 && n0 > 1;
                tr[k] = tt;
                to[k] = ok ? nan_to_num(tt) : nan;
                d[k] = ok ? dd : nan;
            }
        }
    }
}

}  // namespace vstore
