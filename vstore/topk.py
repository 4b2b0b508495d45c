"""Streaming per-column top-k over raw activation blocks: the top-activating rows of chosen neurons.

One validating, dispatching wrapper, :func:`top_k_per_column`, over three backends that give the
same results (``"cpp"``: ``vstore._C``, ``"numba"`` and the NumPy reference ``"numpy"``, in
:mod:`vstore._topk_kernels`), picked as in :mod:`vstore.kernels` (``"auto"``: the C++ core when
built). A :class:`ColumnTopK` holds the state, so a store is read one chunk at a time, out of core:

>>> state = ColumnTopK(n_columns=2, k=3)
>>> top_k_per_column(block, dtype="float16", columns=np.array([5, 9]), row_start=0, state=state)

Order: larger value first, ties to the lower global row index; NaN and +-Inf are never selected
(a column with fewer than ``k`` finite values keeps empty slots: row -1, value -inf).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .errors import StoreError
from .kernels import _check_raw, _check_threads, describe_array, resolve_backend

__all__ = ["ColumnTopK", "top_k_per_column"]


@dataclass
class ColumnTopK:
    """The top-``k`` (value, global row) of each of ``n_columns`` columns, best first.

    Attributes
    ----------
    values : numpy.ndarray
        float64 ``(n_columns, k)``; -inf in an empty slot.
    rows : numpy.ndarray
        int64 ``(n_columns, k)``; -1 in an empty slot.
    """

    values: npt.NDArray[np.float64]
    rows: npt.NDArray[np.int64]

    def __init__(self, n_columns: int, k: int) -> None:
        if n_columns < 0 or k < 0:
            raise StoreError(f"ColumnTopK: expected n_columns, k >= 0, got ({n_columns}, {k})")
        self.values = np.full((n_columns, k), -np.inf)
        self.rows = np.full((n_columns, k), -1, dtype=np.int64)

    @property
    def k(self) -> int:
        return int(self.values.shape[1])

    def column(self, c: int) -> list[tuple[float, int]]:
        """The filled slots of column ``c``: ``(value, row)``, best first."""
        return [(float(v), int(r)) for v, r in zip(self.values[c], self.rows[c], strict=True) if r >= 0]


def top_k_per_column(
    block: np.ndarray,
    *,
    dtype: str,
    state: ColumnTopK,
    columns: np.ndarray | None = None,
    row_start: int = 0,
    mask: np.ndarray | None = None,
    backend: str = "auto",
    threads: int | None = None,
) -> ColumnTopK:
    """Merge one block's values into the per-column top-k ``state`` (in place; also returned).

    Parameters
    ----------
    block : numpy.ndarray
        Raw values ``(rows, N)``, C-contiguous (float16, float32, or uint16 bfloat16 bits).
    dtype : str
        Logical dtype: ``"float16"``, ``"float32"`` or ``"bfloat16"``.
    state : ColumnTopK
        The state, one row per selected column.
    columns : numpy.ndarray, optional
        int64 block columns of the state's rows (default: every column, then ``state`` has N rows).
    row_start : int
        Global index of the block's first row (ties go to the lower global row).
    mask : numpy.ndarray, optional
        int32 ``(rows,)``: rows with a negative entry are skipped (e.g. a group code of -1).
    backend : str
        ``"auto"``, ``"cpp"``, ``"numba"`` or ``"numpy"``.
    threads : int, optional
        Kernel threads (``None``: all); the NumPy reference uses one.

    Raises
    ------
    StoreError
        A malformed argument, naming what was expected and what was got.
    """
    block = _check_raw(block, dtype, "block", ndim=2)
    R, N = block.shape
    cols = np.arange(N, dtype=np.int64) if columns is None else columns
    if not isinstance(cols, np.ndarray) or cols.dtype != np.int64 or cols.ndim != 1:
        raise StoreError(f"columns: expected a 1-D int64 array, got {describe_array(cols)}")
    cols = np.ascontiguousarray(cols)
    if cols.size and (int(cols.min()) < 0 or int(cols.max()) >= N):
        raise StoreError(f"columns: expected values in [0, {N}) (the block has shape {block.shape}), "
                         f"got [{int(cols.min())}, {int(cols.max())}]")
    if not isinstance(state, ColumnTopK) or state.values.shape != (cols.size, state.k) \
            or state.rows.shape != state.values.shape:
        raise StoreError(f"state: expected a ColumnTopK of {cols.size} columns, got "
                         f"{describe_array(getattr(state, 'values', state))}")
    if mask is None:
        m = np.zeros(R, dtype=np.int32)
    elif not isinstance(mask, np.ndarray) or mask.dtype != np.int32 or mask.shape != (R,):
        raise StoreError(f"mask: expected an int32 array of shape ({R},), got {describe_array(mask)}")
    else:
        m = np.ascontiguousarray(mask)
    if isinstance(row_start, bool) or not isinstance(row_start, int | np.integer) or row_start < 0:
        raise StoreError(f"row_start: expected an int >= 0, got {row_start!r}")
    n_threads = _check_threads(threads)
    name = resolve_backend(backend)
    if name == "cpp":
        from . import _C  # type: ignore[attr-defined]

        _C.top_k_per_column(block, dtype, m, cols, int(row_start), state.values, state.rows, n_threads)
        return state
    from . import _topk_kernels

    if name == "numba":
        _topk_kernels.numba_top_k_per_column(block, dtype, m, cols, int(row_start), state.values, state.rows)
    else:
        _topk_kernels.numpy_top_k_per_column(block, dtype, m, cols, int(row_start), state.values, state.rows)
    return state
