// Streaming per-column top-k (see topk.hpp). OpenMP over tiles of the selected columns: each thread
// owns the state of its columns, so no two threads write the same slot.
#include "vstore/topk.hpp"

#include <cmath>
#include <cstring>
#include <limits>

#ifdef _OPENMP
#include <omp.h>
#define VSTORE_TOPK_OMP(directive) _Pragma(#directive)
#else
#define VSTORE_TOPK_OMP(directive)
#endif

namespace vstore {
namespace {

constexpr std::int64_t kTile = 64;  // columns per task

inline double decode_one(const void* data, RawDtype dtype, std::int64_t index) noexcept {
    switch (dtype) {
        case RawDtype::float16:
            return static_cast<double>(half_to_float(static_cast<const std::uint16_t*>(data)[index]));
        case RawDtype::bfloat16: {
            const std::uint32_t u = static_cast<std::uint32_t>(static_cast<const std::uint16_t*>(data)[index]) << 16;
            float f;
            std::memcpy(&f, &u, sizeof f);
            return static_cast<double>(f);
        }
        case RawDtype::float32:
        default:
            return static_cast<double>(static_cast<const float*>(data)[index]);
    }
}

// True when (v, r) comes before slot (w, s) in the selection order (an empty slot has s < 0).
inline bool before(double v, std::int64_t r, double w, std::int64_t s) noexcept {
    return s < 0 || v > w || (v == w && r < s);
}

// Inserts (v, r) into the k sorted slots when it belongs there.
inline void offer(double v, std::int64_t r, std::int64_t k, double* vals, std::int64_t* rws) noexcept {
    if (!before(v, r, vals[k - 1], rws[k - 1])) return;
    std::int64_t i = k - 1;
    while (i > 0 && before(v, r, vals[i - 1], rws[i - 1])) {
        vals[i] = vals[i - 1];
        rws[i] = rws[i - 1];
        --i;
    }
    vals[i] = v;
    rws[i] = r;
}

}  // namespace

void top_k_per_column(const void* data, RawDtype dtype, std::int64_t rows, std::int64_t cols,
                      const std::int32_t* mask, const std::int64_t* columns, std::int64_t n_columns,
                      std::int64_t row_start, std::int64_t k, double* best_values, std::int64_t* best_rows,
                      int threads) noexcept {
    if (k <= 0 || rows <= 0 || n_columns <= 0) return;
    // Consecutive columns (a gathered sub-block, or all of them) are decoded a row segment at a time
    // by vstore::decode (F16C where the CPU has it); scattered ones value by value.
    bool consecutive = true;
    for (std::int64_t c = 1; c < n_columns && consecutive; ++c) consecutive = columns[c] == columns[0] + c;
    const std::int64_t itemsize = dtype == RawDtype::float32 ? 4 : 2;
    const std::int64_t tiles = (n_columns + kTile - 1) / kTile;
#ifdef _OPENMP
    const int nt = threads > 0 ? threads : omp_get_max_threads();
    const bool parallel = nt > 1 && tiles > 1 && rows * n_columns >= (std::int64_t{1} << 15);
#else
    (void)threads;
#endif
    VSTORE_TOPK_OMP(omp parallel for schedule(dynamic, 1) num_threads(nt) if (parallel))
    for (std::int64_t t = 0; t < tiles; ++t) {
        const std::int64_t c0 = t * kTile;
        const std::int64_t c1 = c0 + kTile < n_columns ? c0 + kTile : n_columns;
        float segment[kTile];
        for (std::int64_t r = 0; r < rows; ++r) {
            if (mask != nullptr && mask[r] < 0) continue;
            const std::int64_t base = r * cols;
            if (consecutive)
                decode(static_cast<const char*>(data) + (base + columns[c0]) * itemsize, dtype, c1 - c0, segment);
            for (std::int64_t c = c0; c < c1; ++c) {
                const double v = consecutive ? static_cast<double>(segment[c - c0])
                                             : decode_one(data, dtype, base + columns[c]);
                if (!std::isfinite(v)) continue;
                offer(v, row_start + r, k, best_values + c * k, best_rows + c * k);
            }
        }
    }
}

}  // namespace vstore
