"""Numba kernels: the statistics kernels of :mod:`vstore.kernels` without a C++ compiler.

Small ``@njit(cache=True)`` functions on arrays and scalars, listed by name in :data:`KERNELS`, plus
thin drivers with the same signatures as the NumPy reference (:mod:`vstore._numpy_kernels`) and the
native module. Inputs are validated by :mod:`vstore.kernels`.

Every kernel takes the block as 16-bit words (float32 as two little-endian words per value), so each
is compiled once, not once per raw dtype: compilation dominates a cold start. Numba has no float16
arithmetic, so raw values are decoded with bit operations into a float64 row segment (float16:
exponent rebias, subnormals as m * 2**-24; bfloat16 and float32: the float32 bits), a form LLVM
vectorises. Histogram keys of 16-bit patterns come from a 65,536-entry table; float32 is rounded to
float16 with integer bit operations (round to nearest even, overflow to +-Inf) first.

Work is split over column tiles with ``prange``: each tile owns its columns, so threads never write
the same element. The summation order is the reference's: per group, a float64 block partial from
+0.0; float16 adds float32 runs of ``RUN_ROWS`` valid rows of the group (:func:`f16_runs`), the other
dtypes add the valid rows in row order.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numba
import numpy as np
import numpy.typing as npt
from numba import njit, prange

from ._numba_f16 import HOST_F16C, RUN_ROWS, commit_partials, f16_runs, moments_f16, moments_f16_f16c

__all__ = [
    "KERNELS",
    "accumulate_histogram",
    "accumulate_moments",
    "select_top_k",
]

ROW_SKIPPED = 0
ROW_VALID = 1
ROW_NONFINITE = 2

KIND_FLOAT16 = 0
KIND_BFLOAT16 = 1
KIND_FLOAT32 = 2
_KIND = {"float16": KIND_FLOAT16, "bfloat16": KIND_BFLOAT16, "float32": KIND_FLOAT32}
TWO_POW_M24 = 2.0**-24

_ALL_BITS = np.arange(65536, dtype=np.uint32)


def _order_keys() -> npt.NDArray[np.uint16]:
    bits = np.where(_ALL_BITS == 0x8000, 0, _ALL_BITS)
    return np.where(bits & 0x8000, bits ^ 0xFFFF, bits | 0x8000).astype(np.uint16)


#: 16-bit pattern (float16 or bfloat16) -> order-preserving key (-0 shares +0's key).
ORDER_KEY = _order_keys()

#: Per kind: (first word, word step, lowest non-finite |word|) of the words holding the exponent.
#: A float32's exponent lies in its high word (the second, little-endian), laid out as bfloat16's.
_NONFINITE = {KIND_FLOAT16: (0, 1, 0x7C00), KIND_BFLOAT16: (0, 1, 0x7F80), KIND_FLOAT32: (1, 2, 0x7F80)}

if sys.byteorder != "little":  # pragma: no cover - every platform Numba supports today is little-endian
    raise ImportError("vstore._numba_kernels reads float32 as two little-endian 16-bit words")


@njit(cache=True, parallel=True)
def row_status(words, start, step, exp_bits, groups, status):  # pragma: no cover - compiled
    """status[r] = skipped (group -1), non-finite (some |words[r, start::step]| >= exp_bits), or valid."""
    rows, n = words.shape
    for r in prange(rows):
        if groups[r] < 0:
            status[r] = ROW_SKIPPED
            continue
        m = 0
        for j in range(start, n, step):
            m = max(m, words[r, j] & 0x7FFF)
        status[r] = ROW_VALID if m < exp_bits else ROW_NONFINITE


@njit(cache=True)
def count_rows(groups, status, count, nonfinite, present):  # pragma: no cover - compiled
    """Adds valid and non-finite rows per group; marks the groups with a valid row."""
    for r in range(groups.shape[0]):
        g = groups[r]
        if status[r] == ROW_VALID:
            count[g] += 1
            present[g] = True
        elif status[r] == ROW_NONFINITE:
            nonfinite[g] += 1


@njit(cache=True)
def _decode_row(kind, src, u, f, xs):  # pragma: no cover - compiled
    """xs[j] = float64 value of the raw bits src[j]; u/f are one uint32 scratch seen two ways."""
    w = xs.shape[0]
    if kind == KIND_FLOAT16:
        # Normal halves: rebias the exponent in the bits. Subnormals (exponent 0): m * 2**-24.
        # Both exact, and no float32 subnormal is formed (immune to flush-to-zero modes).
        for j in range(w):
            u[j] = ((np.uint32(src[j]) & np.uint32(0x7FFF)) << np.uint32(13)) + np.uint32(0x38000000)
        for j in range(w):
            h = src[j]
            mag = np.float64(f[j])
            if (h & 0x7C00) == 0:
                mag = np.float64(h & 0x3FF) * TWO_POW_M24
            xs[j] = -mag if (h & 0x8000) != 0 else mag
    elif kind == KIND_BFLOAT16:
        for j in range(w):
            u[j] = np.uint32(src[j]) << np.uint32(16)
        for j in range(w):
            xs[j] = np.float64(f[j])
    else:  # float32: two little-endian words per value
        for j in range(w):
            u[j] = np.uint32(src[2 * j]) | (np.uint32(src[2 * j + 1]) << np.uint32(16))
        for j in range(w):
            xs[j] = np.float64(f[j])


@njit(cache=True)
def moments_tile(words, kind, groups, status, present, c0, w, sum_, sumsq, npos):  # pragma: no cover
    """Columns [c0, c0 + w): per-group partials over the valid rows, then added to the output."""
    n_groups = sum_.shape[0]
    vw = 2 if kind == KIND_FLOAT32 else 1  # words per value
    ls = np.zeros((n_groups, w))
    lq = np.zeros((n_groups, w))
    lp = np.zeros((n_groups, w), dtype=np.int64)
    u = np.empty(w, dtype=np.uint32)
    f = u.view(np.float32)
    xs = np.empty(w, dtype=np.float64)
    for r in range(words.shape[0]):
        if status[r] != ROW_VALID:
            continue
        _decode_row(kind, words[r, c0 * vw : (c0 + w) * vw], u, f, xs)
        g = groups[r]
        s = ls[g]
        q = lq[g]
        p = lp[g]
        for j in range(w):
            x = xs[j]
            s[j] += x
            q[j] += x * x
            p[j] += np.int64(x > 0.0)
    for g in range(n_groups):
        if present[g]:
            for j in range(w):
                sum_[g, c0 + j] += ls[g, j]
                sumsq[g, c0 + j] += lq[g, j]
                npos[g, c0 + j] += lp[g, j]


@njit(cache=True, parallel=True)
def moments_words(words, kind, groups, status, present, tile, sum_, sumsq, npos):  # pragma: no cover
    """Moments of a block given as 16-bit words, one column tile per task (tiles own their columns)."""
    n = sum_.shape[1]
    n_tiles = (n + tile - 1) // tile
    for t in prange(n_tiles):
        c0 = t * tile
        moments_tile(words, kind, groups, status, present, c0, min(tile, n - c0), sum_, sumsq, npos)


@njit(cache=True)
def float_bits_to_half_bits(u):  # pragma: no cover - compiled
    """float32 bits -> float16 bits: round to nearest even, overflow to +-Inf, NaN stays NaN."""
    x = np.int64(u)
    sign = (x >> 16) & 0x8000
    ax = x & 0x7FFFFFFF
    if ax >= 0x7F800000:
        if ax == 0x7F800000:
            return sign | 0x7C00
        return sign | 0x7E00 | ((ax >> 13) & 0x3FF)
    if ax >= 0x477FF000:  # >= 65520 rounds to Inf
        return sign | 0x7C00
    if ax < 0x38800000:  # below 2**-14: a subnormal half (or zero)
        if ax <= 0x33000000:  # <= 2**-25 rounds to zero
            return sign
        m = (ax & 0x7FFFFF) | 0x800000
        shift = 126 - (ax >> 23)
        h = m >> shift
        rem = m & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        if rem > half or (rem == half and (h & 1) == 1):
            h += 1
        return sign | h
    h = (ax - 0x38000000) >> 13
    rem = ax & 0x1FFF
    if rem > 0x1000 or (rem == 0x1000 and (h & 1) == 1):
        h += 1
    return sign | h


@njit(cache=True, parallel=True)
def histogram_words(words, kind, keys, groups, status, neuron_start, tile, hist):  # pragma: no cover
    """hist[g, j, key of value (r, neuron_start + j)] += 1 per valid row r, one neuron tile per task.

    16-bit kinds look their key up in ``keys``; float32 values are rounded to float16 bits first.
    """
    rows = words.shape[0]
    m = hist.shape[1]
    n_tiles = (m + tile - 1) // tile
    for t in prange(n_tiles):
        j0 = t * tile
        j1 = min(m, j0 + tile)
        for r in range(rows):
            if status[r] != ROW_VALID:
                continue
            g = groups[r]
            if kind == KIND_FLOAT32:
                for j in range(j0, j1):
                    c = 2 * (neuron_start + j)
                    value = np.uint32(words[r, c]) | (np.uint32(words[r, c + 1]) << np.uint32(16))
                    hist[g, j, keys[float_bits_to_half_bits(value)]] += 1
            else:
                for j in range(j0, j1):
                    hist[g, j, keys[words[r, neuron_start + j]]] += 1


@njit(cache=True, inline="always")
def _before(scores, a, b):  # pragma: no cover - compiled
    """The selection order: larger score first, then lower index (a strict total order)."""
    return scores[a] > scores[b] or (scores[a] == scores[b] and a < b)


@njit(cache=True)
def top_k(scores, k):  # pragma: no cover - compiled
    """Indices of the k largest finite scores, best first, ties by the lower index.

    A bottom-up merge sort of the finite indices (Numba's own sorts take seconds to compile).
    """
    n = scores.shape[0]
    src = np.empty(n, dtype=np.int64)
    m = 0
    for i in range(n):
        if np.isfinite(scores[i]):
            src[m] = i
            m += 1
    dst = np.empty(n, dtype=np.int64)
    width = 1
    while width < m:
        for lo in range(0, m, 2 * width):
            mid = min(lo + width, m)
            hi = min(lo + 2 * width, m)
            i, j, o = lo, mid, lo
            while i < mid and j < hi:
                if _before(scores, src[j], src[i]):
                    dst[o] = src[j]
                    j += 1
                else:
                    dst[o] = src[i]
                    i += 1
                o += 1
            while i < mid:
                dst[o] = src[i]
                i += 1
                o += 1
            while j < hi:
                dst[o] = src[j]
                j += 1
                o += 1
        src, dst = dst, src
        width *= 2
    return src[: min(k, m)].copy()


#: Name -> compiled kernel (the drivers below pick from here).
KERNELS: dict[str, Callable[..., Any]] = {
    "row_status": row_status,
    "count_rows": count_rows,
    "moments_tile": moments_tile,
    "moments_words": moments_words,
    "f16_runs": f16_runs,
    "moments_f16": moments_f16,
    "moments_f16_f16c": moments_f16_f16c,
    "commit_partials": commit_partials,
    "histogram_words": histogram_words,
    "float_bits_to_half_bits": float_bits_to_half_bits,
    "top_k": top_k,
}


@contextmanager
def _threads(threads: int) -> Iterator[None]:
    """Runs the body with ``threads`` Numba threads (0: all), restoring the previous setting."""
    most = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    before = numba.get_num_threads()
    numba.set_num_threads(threads if 0 < threads <= most else most)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def _tile(width: int, widest: int, narrowest: int) -> int:
    """Tile width giving every thread a few tiles (as the C++ core does)."""
    tile = widest
    threads = numba.get_num_threads()
    while tile > narrowest and -(-width // tile) < 2 * threads:
        tile //= 2
    return max(1, min(tile, width))


def _words(block: np.ndarray) -> np.ndarray:
    """The block as 16-bit words, (rows, N) or (rows, 2N) for float32 (a view, no copy)."""
    return block.view(np.uint16)


def _status(words: np.ndarray, kind: int, groups: np.ndarray) -> npt.NDArray[np.uint8]:
    status = np.empty(words.shape[0], dtype=np.uint8)
    start, step, exp_bits = _NONFINITE[kind]
    KERNELS["row_status"](words, start, step, exp_bits, groups, status)
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
    rows, n = block.shape
    if rows == 0:
        return
    kind, words = _KIND[dtype], _words(block)
    with _threads(threads):
        if kind == KIND_FLOAT16 and HOST_F16C and n > 0:
            bad = _moments_f16_optimistic(words, groups, count, sum_, sumsq, npos)
            if not bad.any():
                return
            groups = np.where(bad[np.maximum(groups, 0)], groups, -1).astype(np.int32)  # the bad groups only
        status = _status(words, kind, groups)
        present = np.zeros(count.shape[0], dtype=np.bool_)
        KERNELS["count_rows"](groups, status, count, nonfinite, present)
        if n == 0 or not present.any():
            return
        # Wide tiles (long contiguous row segments) with the partials of all groups within ~1 MiB.
        widest = 2048
        while widest > 16 and count.shape[0] * widest * 24 > 1 << 20:
            widest //= 2
        tile = _tile(n, widest, min(256, widest))
        if kind == KIND_FLOAT16:
            rows, begin, grp = KERNELS["f16_runs"](groups, status, count.shape[0], RUN_ROWS)
            KERNELS["moments_f16"](words, rows, begin, grp, present, tile, sum_, sumsq, npos)
            return
        KERNELS["moments_words"](words, kind, groups, status, present, tile, sum_, sumsq, npos)


_STAGING = threading.local()


_STAGING_KEPT = 64 << 20  # bytes of block-partial buffers a thread keeps between calls, at most


def _staging(n_groups: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This thread's block-partial buffers, at least (n_groups, n), reused from call to call (a fresh
    buffer costs a page fault per page on every block); larger than :data:`_STAGING_KEPT`, they are
    made for this call only."""
    have = getattr(_STAGING, "buffers", None)
    if have is None or have[0].shape[0] < n_groups or have[0].shape[1] < n:
        shape = (max(n_groups, have[0].shape[0] if have else 0), max(n, have[0].shape[1] if have else 0))
        if shape[0] * shape[1] * 24 > _STAGING_KEPT:
            shape = (n_groups, n)
        fresh = (np.empty(shape), np.empty(shape), np.empty(shape, dtype=np.int64))
        if shape[0] * shape[1] * 24 > _STAGING_KEPT:
            return fresh  # too big to keep
        have = _STAGING.buffers = fresh
    return have[0][:n_groups, :n], have[1][:n_groups, :n], have[2][:n_groups, :n]


def _moments_f16_optimistic(words: np.ndarray, groups: np.ndarray, count: np.ndarray, sum_: np.ndarray,
                            sumsq: np.ndarray, npos: np.ndarray) -> npt.NDArray[np.bool_]:
    """float16 moments without a row-status pass, taking every row of a group as valid. The groups
    none of whose runs met NaN/Inf are added; returns the others (a mask over groups), for the
    caller to redo with the rows' status."""
    n_groups, n = sum_.shape
    status = np.where(groups >= 0, ROW_VALID, ROW_SKIPPED).astype(np.uint8)
    rows, begin, grp = KERNELS["f16_runs"](groups, status, n_groups, RUN_ROWS)
    ls, lq, lp = _staging(n_groups, n)
    width = _column_range(n)
    n_tasks = -(-n // width)
    flags = np.zeros((n_groups, n_tasks), dtype=np.bool_)
    KERNELS["moments_f16_f16c"](words, rows, begin, grp, width, ls, lq, lp, flags)
    bad: npt.NDArray[np.bool_] = np.asarray(flags.any(axis=1))
    counted = np.bincount(groups[groups >= 0], minlength=n_groups)
    take = (counted > 0) & ~bad
    np.add(count, counted, out=count, where=take)
    KERNELS["commit_partials"](ls, lq, lp, take, width, sum_, sumsq, npos)
    return bad


def _column_range(width: int) -> int:
    """Columns per task of the float16 kernel: one contiguous range per thread (a multiple of 16)."""
    per_thread = -(-width // numba.get_num_threads())
    return max(16, -(-per_thread // 16) * 16)


def accumulate_histogram(
    block: np.ndarray,
    dtype: str,
    groups: np.ndarray,
    hist: np.ndarray,
    neuron_start: int,
    threads: int = 0,
) -> None:
    """Adds one count per valid row to ``hist[g, j, key(block[row, neuron_start + j])]``, in place."""
    if block.shape[0] == 0 or hist.shape[1] == 0:
        return
    kind, words = _KIND[dtype], _words(block)
    with _threads(threads):
        status = _status(words, kind, groups)
        tile = _tile(hist.shape[1], 64, 8)
        KERNELS["histogram_words"](words, kind, ORDER_KEY, groups, status, neuron_start, tile, hist)


def select_top_k(scores: npt.NDArray[np.float64], k: int) -> npt.NDArray[np.int64]:
    """Indices of the ``k`` largest finite scores, best first, ties broken by the lower index."""
    return KERNELS["top_k"](scores, k)  # type: ignore[no-any-return]
