// float16 moments in runs of rows (internal to the kernels; the summation order is in kernels.hpp).
#pragma once

#include <cstdint>

#include "vstore/kernels.hpp"

namespace vstore {
namespace detail {

/// Adds the moments of a float16 block to `acc` in the run order of kernels.hpp (kF16RunRows).
/// `simd`: take the AVX2/F16C/FMA path. Rows holding NaN/Inf are found without a separate pass:
/// a run's float32 sum is non-finite exactly when one of its values is (finite float16 values
/// cannot overflow it), and only then is the block redone with the rows' status.
void accumulate_moments_f16(const BlockRef& block, const MomentsRef& acc, int threads, bool simd) noexcept;

}  // namespace detail
}  // namespace vstore
