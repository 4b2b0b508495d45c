"""Per-column streaming top-k without the C++ core: the NumPy reference and the Numba kernel.

The contract is that of ``csrc/vstore/topk.hpp`` (validated by :mod:`vstore.topk`): a column's
state is ``k`` slots sorted by value (largest first), then by global row (lowest first); an empty
slot has row -1 and value -inf; NaN and +-Inf are never selected; rows whose mask is < 0 are skipped.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._numpy_kernels import decode

__all__ = ["numba_top_k_per_column", "numpy_top_k_per_column"]


def numpy_top_k_per_column(block: np.ndarray, dtype: str, mask: np.ndarray, columns: np.ndarray, row_start: int,
                           best_values: np.ndarray, best_rows: np.ndarray) -> None:
    """The reference: every candidate of a column (its slots and the block's finite values) sorted at once."""
    k = best_values.shape[1]
    keep = mask >= 0
    rows = np.flatnonzero(keep).astype(np.int64) + int(row_start)
    values = decode(block[keep][:, columns], dtype).astype(np.float64) if columns.size else np.zeros((0, 0))
    for c in range(columns.shape[0]):
        filled = best_rows[c] >= 0
        v = np.concatenate([best_values[c][filled], values[:, c]])
        r = np.concatenate([best_rows[c][filled], rows])
        ok = np.isfinite(v)
        v, r = v[ok], r[ok]
        order = np.lexsort((r, -v))[:k]
        best_values[c] = -np.inf
        best_rows[c] = -1
        best_values[c, : order.size] = v[order]
        best_rows[c, : order.size] = r[order]


@njit(cache=True, inline="always")
def _before(v, r, w, s):  # pragma: no cover - compiled
    return s < 0 or v > w or (v == w and r < s)


@njit(cache=True, parallel=True)
def _top_k_columns(values, mask, row_start, best_values, best_rows):  # pragma: no cover - compiled
    """values: (rows, C) float64 already decoded."""
    n_rows, n_cols = values.shape
    k = best_values.shape[1]
    for c in prange(n_cols):
        bv = best_values[c]
        br = best_rows[c]
        for r in range(n_rows):
            if mask[r] < 0:
                continue
            v = values[r, c]
            if not np.isfinite(v):
                continue
            g = row_start + r
            if not _before(v, g, bv[k - 1], br[k - 1]):
                continue
            i = k - 1
            while i > 0 and _before(v, g, bv[i - 1], br[i - 1]):
                bv[i] = bv[i - 1]
                br[i] = br[i - 1]
                i -= 1
            bv[i] = v
            br[i] = g


def numba_top_k_per_column(block: np.ndarray, dtype: str, mask: np.ndarray, columns: np.ndarray, row_start: int,
                           best_values: np.ndarray, best_rows: np.ndarray) -> None:
    """The Numba backend: the selected columns are decoded (exactly) by NumPy, then merged in parallel."""
    if best_values.shape[1] == 0 or columns.size == 0 or block.shape[0] == 0:
        return
    values = np.ascontiguousarray(decode(block[:, columns], dtype), dtype=np.float64)
    _top_k_columns(values, mask, np.int64(row_start), best_values, best_rows)
