// Statistics kernels of vstore: per-group moments, per-neuron 16-bit-key histograms, top-k selection.
//
// Plain C++17 in namespace vstore: nothing here knows about Python. The bindings (csrc/bindings.cpp)
// validate every array before calling in, so the kernels assume well-formed input (shapes, group range).
//
// Conventions shared with the Numba and NumPy backends (vstore/_numba_kernels.py,
// vstore/_numpy_kernels.py), which must give bit-identical results:
//   * A block is a C-contiguous (rows, cols) array of raw values: float16 or bfloat16 bit patterns
//     (uint16) or float32. Each value is decoded to float32, then widened to float64 (both exact).
//   * A row whose group is -1 is skipped entirely. A row holding any NaN or +-Inf (anywhere in the row,
//     not only in the columns being histogrammed) is skipped and counted in nonfinite[group].
//   * Summation order (float16): per block and per group, the group's valid rows are taken in row
//     order and cut into runs of kF16RunRows (32) rows, the last one shorter. A run's partials are
//     float32, start at +0.0 and add the run's rows in row order (s += x, q += x*x; x*x is exact in
//     float32 for a float16 x, so fused multiply-add gives the same result). Each run's partials are
//     widened to float64 and added, run after run, to the group's block partial (float64, from +0.0),
//     which is then added once to the accumulator. A run's float32 sum is within 31 * 2^-24 of its
//     exact value relative to sum |x|, far below float16's own rounding (2^-11).
//   * Summation order (bfloat16, float32): the block partial is float64, starts at +0.0 and adds the
//     group's valid rows in row order; it is then added once to the accumulator. Squares x*x are
//     exact in float64, so fused multiply-add cannot change a result.
#pragma once

#include <cstdint>

namespace vstore {

/// Raw storage type of a block.
enum class RawDtype : int { float16 = 0, bfloat16 = 1, float32 = 2 };

/// A raw block: `rows` x `cols` values, C order, with one group index per row (in [-1, n_groups)).
struct BlockRef {
    const void* data;
    RawDtype dtype;
    std::int64_t rows;
    std::int64_t cols;
    const std::int32_t* groups;
};

/// Per-group sufficient statistics, all C order: count/nonfinite (G,), sum/sumsq/npos (G, N).
struct MomentsRef {
    std::int64_t n_groups;
    std::int64_t n_neurons;
    std::int64_t* count;
    double* sum;
    double* sumsq;
    std::int64_t* npos;
    std::int64_t* nonfinite;
};

/// Rows per float32 run of the float16 moments (see the summation order above).
inline constexpr std::int64_t kF16RunRows = 32;

/// Number of histogram bins per neuron (one per 16-bit key).
inline constexpr std::int64_t kHistogramBins = 65536;

/// True when this CPU has F16C, AVX2 and FMA (checked once, at run time).
bool has_f16c() noexcept;

/// Threads an OpenMP parallel region would use by default (1 without OpenMP).
int openmp_threads() noexcept;

/// IEEE binary16 bits -> float32 (exact; NaN payloads kept).
float half_to_float(std::uint16_t bits) noexcept;

/// float32 -> IEEE binary16 bits, round to nearest even; overflow gives +-Inf, NaN stays NaN.
std::uint16_t float_to_half(float value) noexcept;

/// Order-preserving key of float16 or bfloat16 bits: -0 is first mapped to +0, then negative
/// values get (b ^ 0xFFFF) and non-negative ones (b | 0x8000), so key order equals value order.
inline std::uint16_t order_key16(std::uint16_t bits) noexcept {
    if (bits == 0x8000u) bits = 0;
    return (bits & 0x8000u) ? static_cast<std::uint16_t>(bits ^ 0xFFFFu)
                            : static_cast<std::uint16_t>(bits | 0x8000u);
}

/// Decodes `count` raw values to float32 (bfloat16 bits b -> b << 16).
void decode(const void* data, RawDtype dtype, std::int64_t count, float* out) noexcept;

/// Histogram keys of `count` raw values (float32 is first rounded to float16).
void histogram_keys(const void* data, RawDtype dtype, std::int64_t count, std::uint16_t* out) noexcept;

/// Adds the statistics of `block` to `acc` (block.cols == acc.n_neurons). `threads` <= 0: all.
void accumulate_moments(const BlockRef& block, const MomentsRef& acc, int threads) noexcept;

/// Adds one count per (valid row, neuron) to hist[g, j, key(block[row, neuron_start + j])] for
/// j in [0, n_hist_neurons). `hist` is uint32 C order (n_groups, n_hist_neurons, 65536).
void accumulate_histogram(const BlockRef& block, std::int64_t n_groups, std::int64_t neuron_start,
                          std::int64_t n_hist_neurons, std::uint32_t* hist, int threads) noexcept;

/// XOR of the 64-bit words of `bytes` bytes at `data` (any tail bytes zero-padded): a single-core
/// read-bandwidth probe for the benchmarks (AVX2 loads where the CPU has them).
std::uint64_t read_probe(const void* data, std::int64_t bytes) noexcept;

/// Writes the indices of the min(k, #finite) largest finite scores to `out`, best first, ties
/// broken by the lower index; NaN and +-Inf are never selected. Returns how many were written.
/// `out` must hold min(k, n) entries.
std::int64_t select_top_k(const double* scores, std::int64_t n, std::int64_t k, std::int64_t* out);

}  // namespace vstore
