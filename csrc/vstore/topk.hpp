// Streaming per-column top-k of raw activation blocks (the neuron cards of `vstore show`).
//
// Plain C++17 in namespace vstore: nothing here knows about Python (csrc/bindings.cpp validates the
// arrays). The Numba and NumPy backends (vstore/_topk_kernels.py) give the same results:
//   * values are decoded to float32 (bfloat16 bits b -> b << 16) and widened to float64;
//   * NaN and +-Inf are never selected; rows whose mask entry is < 0 are skipped;
//   * the order is a strict total order: larger value first, then lower global row index;
//   * the state of a column is `k` slots sorted in that order; an empty slot has row -1 and
//     value -Inf and sorts after every filled one. Blocks may come in any order.
#pragma once

#include <cstdint>

#include "vstore/kernels.hpp"

namespace vstore {

/// Merges the values of `columns` of a raw (rows, cols) block into the per-column top-k state.
/// `mask` (may be null) holds one int32 per row: rows with a negative entry are skipped. Row r of
/// the block has the global index row_start + r. `best_values` (double) and `best_rows` (int64) are
/// C order (n_columns, k). `threads` <= 0: all.
void top_k_per_column(const void* data, RawDtype dtype, std::int64_t rows, std::int64_t cols,
                      const std::int32_t* mask, const std::int64_t* columns, std::int64_t n_columns,
                      std::int64_t row_start, std::int64_t k, double* best_values, std::int64_t* best_rows,
                      int threads) noexcept;

}  // namespace vstore
