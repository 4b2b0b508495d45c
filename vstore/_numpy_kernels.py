"""NumPy reference kernels: the oracle the C++ and Numba backends must reproduce bit for bit.

Written to be obviously correct rather than fast. Inputs are validated by :mod:`vstore.kernels`;
these functions assume well-formed arrays (see that module for the contracts).

The summation order every backend follows: for each group, a float64 block partial starts at +0.0
and is added once to the accumulator at the end. float16 blocks: the group's valid rows, in row
order, are cut into runs of :data:`RUN_ROWS` rows (the last one shorter); each run sums its rows in
row order in float32 from +0.0 (``s += x``, ``q += x * x``: the square of a float16 value is exact
in float32), and the run partials are widened and added to the block partial run after run.
bfloat16 and float32 blocks: the block partial adds the group's valid rows in row order in float64
(squares of float32 values are exact in float64). So the order is the only freedom, and every
backend takes this one.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = [
    "accumulate_histogram",
    "accumulate_moments",
    "decode",
    "histogram_key",
    "row_status",
    "select_top_k",
]

#: float16 rows per float32 run (``kF16RunRows`` in csrc/vstore/kernels.hpp).
RUN_ROWS = 32

ROW_SKIPPED = 0
ROW_VALID = 1
ROW_NONFINITE = 2


def decode(values: np.ndarray, dtype: str) -> npt.NDArray[np.float32]:
    """Float32 values of raw ``values`` (float16, float32, or bfloat16 bits as uint16); a new array."""
    if dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    with np.errstate(invalid="ignore"):  # signalling NaNs convert quietly
        return values.astype(np.float32, copy=True)


def histogram_key(values: np.ndarray, dtype: str) -> npt.NDArray[np.uint16]:
    """Order-preserving 16-bit key of each raw value (float32 is first rounded to float16)."""
    if dtype == "float32":
        with np.errstate(over="ignore", invalid="ignore"):
            bits = values.astype(np.float16).view(np.uint16)
    elif dtype == "float16":
        bits = values.view(np.uint16)
    else:
        bits = values
    bits = np.where(bits == 0x8000, np.uint16(0), bits)  # -0 -> +0: equal values share a key
    negative = (bits & 0x8000) != 0
    return np.where(negative, bits ^ 0xFFFF, bits | 0x8000).astype(np.uint16)


def row_status(block: np.ndarray, dtype: str, groups: np.ndarray) -> npt.NDArray[np.uint8]:
    """Per row: ROW_SKIPPED (group -1), ROW_NONFINITE (any NaN/Inf), or ROW_VALID."""
    finite = np.isfinite(decode(block, dtype)).all(axis=1)
    status = np.where(finite, ROW_VALID, ROW_NONFINITE).astype(np.uint8)
    status[groups < 0] = ROW_SKIPPED
    return status


def accumulate_moments(
    block: np.ndarray,
    dtype: str,
    groups: np.ndarray,
    count: np.ndarray,
    sum_: np.ndarray,
    sumsq: np.ndarray,
    npos: np.ndarray,
    nonfinite: np.ndarray,
    threads: int = 0,
) -> None:
    """Adds the per-group moments of ``block`` to the accumulator arrays, in place."""
    del threads  # single-threaded reference
    values = decode(block, dtype)
    status = row_status(block, dtype, groups)
    for g in range(count.shape[0]):
        in_group = groups == g
        nonfinite[g] += np.count_nonzero(in_group & (status == ROW_NONFINITE))
        rows = np.flatnonzero(in_group & (status == ROW_VALID))
        if rows.size == 0:
            continue
        count[g] += rows.size
        part_sum, part_sumsq = (_float16_partials if dtype == "float16" else _row_partials)(values, rows)
        sum_[g] += part_sum
        sumsq[g] += part_sumsq
        npos[g] += np.count_nonzero(values[rows] > 0, axis=0)


def _row_partials(values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 block partials over ``rows`` in row order (bfloat16 and float32)."""
    part_sum = np.zeros(values.shape[1], dtype=np.float64)
    part_sumsq = np.zeros(values.shape[1], dtype=np.float64)
    for r in rows:
        x = values[r].astype(np.float64)
        part_sum += x
        part_sumsq += x * x
    return part_sum, part_sumsq


def _float16_partials(values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 block partials of float32 runs of RUN_ROWS rows (float16)."""
    part_sum = np.zeros(values.shape[1], dtype=np.float64)
    part_sumsq = np.zeros(values.shape[1], dtype=np.float64)
    for start in range(0, rows.size, RUN_ROWS):
        run_sum = np.zeros(values.shape[1], dtype=np.float32)
        run_sumsq = np.zeros(values.shape[1], dtype=np.float32)
        for r in rows[start : start + RUN_ROWS]:
            x = values[r]
            run_sum += x
            run_sumsq += x * x
        part_sum += run_sum.astype(np.float64)
        part_sumsq += run_sumsq.astype(np.float64)
    return part_sum, part_sumsq


def accumulate_histogram(
    block: np.ndarray,
    dtype: str,
    groups: np.ndarray,
    hist: np.ndarray,
    neuron_start: int,
    threads: int = 0,
) -> None:
    """Adds one count per valid row to ``hist[g, j, key(block[row, neuron_start + j])]``, in place."""
    del threads
    n_hist = hist.shape[1]
    status = row_status(block, dtype, groups)
    keys = histogram_key(block[:, neuron_start : neuron_start + n_hist], dtype)
    neurons = np.arange(n_hist)
    for r in np.flatnonzero(status == ROW_VALID):
        hist[groups[r], neurons, keys[r]] += 1  # (neuron, key) pairs of one row are distinct


def select_top_k(scores: npt.NDArray[np.float64], k: int) -> npt.NDArray[np.int64]:
    """Indices of the ``k`` largest finite scores, best first, ties broken by the lower index."""
    finite = np.flatnonzero(np.isfinite(scores))
    order = np.argsort(-scores[finite], kind="stable")
    return finite[order[:k]].astype(np.int64)


def nonfinite_rows(block: np.ndarray, dtype: str, groups: np.ndarray) -> np.ndarray:
    """Indices of the rows in a group (``groups >= 0``) that hold any NaN or +-Inf."""
    if dtype == "bfloat16":
        bad = ((block & 0x7F80) == 0x7F80).any(axis=1)
    else:
        bad = ~np.isfinite(block).all(axis=1)
    return np.flatnonzero(bad & (groups >= 0))


def add_nonfinite_rows(
    block: np.ndarray, dtype: str, groups: np.ndarray, rows: np.ndarray, count: np.ndarray, sum_: np.ndarray,
    sumsq: np.ndarray, npos: np.ndarray, nonfinite: np.ndarray,
) -> None:
    """Adds the rows the kernels skipped (they hold NaN/Inf) neuron by neuron: each row counts, its
    finite values are summed, and each non-finite value is counted in ``nonfinite[g, neuron]``.

    Shared by every backend, after its kernel, so the backends still agree bit for bit.
    """
    for r in rows:
        g = int(groups[r])
        with np.errstate(invalid="ignore"):  # NaN payloads cast quietly
            v = decode(block[r : r + 1], dtype)[0].astype(np.float64)
        fin = np.isfinite(v)
        w = np.where(fin, v, 0.0)
        count[g] += 1
        sum_[g] += w
        sumsq[g] += w * w
        npos[g] += w > 0
        nonfinite[g] += ~fin


def add_nonfinite_histogram(
    block: np.ndarray, dtype: str, groups: np.ndarray, rows: np.ndarray, hist: np.ndarray, neuron_start: int,
) -> None:
    """Adds the finite values of the rows the histogram kernels skipped (they hold NaN/Inf)."""
    n_hist = hist.shape[1]
    for r in rows:
        raw = block[r, neuron_start : neuron_start + n_hist]
        with np.errstate(invalid="ignore"):
            fin = np.isfinite(decode(raw[None, :], dtype)[0])
        cols = np.flatnonzero(fin)
        np.add.at(hist[int(groups[r])], (cols, histogram_key(raw[cols], dtype).astype(np.int64)), 1)
