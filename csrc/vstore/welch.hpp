// Welch's t statistic and its degrees of freedom from per-group moments, in one pass.
//
// The same arithmetic, in the same order, as the NumPy path of vstore/scoring.py (welch_t): per
// (layer, neuron), the rest of a group is the total over groups (added in group order, starting
// from group 0) less the group; mean m = s / n, variance v = max(q - s * m, 0) / (n - 1) (NaN with
// n <= 1, m NaN with n == 0); a = v1 / n1, b = v0 / n0, se2 = a + b, t = (m1 - m0) / sqrt(se2),
// df = se2 * se2 / (a * a / (n1 - 1) + b * b / (n0 - 1)). Compiled without FMA contraction, so the
// results equal NumPy's bit for bit.
#pragma once

#include <cstdint>

namespace vstore {

/// Moments of L layers x G groups x N neurons, C order: `count` (L, G) rows per group, `nonfinite`
/// (L, G, N) rows left out per neuron, `sum` and `sumsq` (L, G, N).
struct GroupMomentsRef {
    std::int64_t layers;
    std::int64_t groups;
    std::int64_t neurons;
    const std::int64_t* count;
    const std::int64_t* nonfinite;
    const double* sum;
    const double* sumsq;
};

/// For T targets (group pos[i] against group neg[i], or against the rest when neg[i] < 0), writes
/// (L, T, N) arrays: `t` (NaN where a side has < 2 rows; otherwise NaN -> 0 and +-Inf -> +-max
/// double, as np.nan_to_num), `t_raw` (before that replacement) and `df` (NaN where a side has < 2
/// rows). Indices must be in [0, G) (neg: or negative). `threads` <= 0: all.
void welch_from_moments(const GroupMomentsRef& m, const std::int64_t* pos, const std::int64_t* neg, std::int64_t T,
                        double* t, double* t_raw, double* df, int threads) noexcept;

}  // namespace vstore
