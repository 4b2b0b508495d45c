"""Numba kernels of the float16 moments in float32 runs (the order of csrc/vstore/kernels.hpp).

Part of the Numba backend (:mod:`vstore._numba_kernels` drives them). Each group's valid rows are
cut, in row order, into runs of :data:`RUN_ROWS`; a run sums in float32, and its sums are widened and
added to float64 block partials. Where the host CPU has F16C, LLVM converts float16 itself
(:func:`moments_f16_f16c`, vectorised to ``vcvtph2ps``); elsewhere integer bit operations decode the
values (:func:`moments_f16`).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

__all__ = ["HOST_F16C", "RUN_ROWS", "f16_runs", "moments_f16", "moments_f16_f16c"]

RUN_ROWS = 32  # float16 rows per float32 run, as vstore._numpy_kernels.RUN_ROWS
ROW_VALID = 1
TWO_POW_M24 = 2.0**-24


@njit(cache=True)
def f16_runs(groups, status, n_groups, run_rows):  # pragma: no cover - compiled
    """Each group's valid rows cut, in row order, into runs of ``run_rows``: (rows, begin, group)."""
    n = groups.shape[0]
    rows = np.empty(n, dtype=np.int64)
    begin = np.empty(n + n_groups + 1, dtype=np.int64)
    grp = np.empty(n + n_groups, dtype=np.int64)
    pending = np.empty((n_groups, run_rows), dtype=np.int64)
    fill = np.zeros(n_groups, dtype=np.int64)
    m = 0
    nr = 0
    for r in range(n + n_groups):
        if r < n:
            g = groups[r]
            if g < 0 or status[r] != ROW_VALID:
                continue
            pending[g, fill[g]] = r
            fill[g] += 1
            if fill[g] < run_rows:
                continue
        else:  # the unfinished runs, after the last row
            g = r - n
            if fill[g] == 0:
                continue
        begin[nr] = m
        grp[nr] = g
        nr += 1
        for k in range(fill[g]):
            rows[m] = pending[g, k]
            m += 1
        fill[g] = 0
    begin[nr] = m
    return rows[:m], begin[: nr + 1], grp[:nr]


def _host_has_f16c() -> bool:
    """Whether LLVM may convert float16 with F16C here (else it would call a runtime helper)."""
    try:
        import llvmlite.binding as llvm

        return bool(llvm.get_host_cpu_features().get("f16c", False))
    except Exception:  # pragma: no cover - llvmlite without the query
        return False


#: LLVM's half -> float conversion (vcvtph2ps) for finite values, when the host has F16C.
HOST_F16C = _host_has_f16c()


@intrinsic
def _half_bits_as_float32(typingctx, bits):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """float32 value of float16 bits (exact): LLVM fpext, vectorised to vcvtph2ps."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 16:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


@njit(cache=True)
def moments_f16_tile_f16c(words, rows, begin, grp, c0, w, ls, lq, lp):  # pragma: no cover - compiled
    """moments_f16_tile with LLVM's float16 conversion; block partials into ls/lq/lp[:, c0:c0+w].
    Returns False when some run's float32 sum is non-finite (the block holds NaN/Inf)."""
    s = np.empty(w, dtype=np.float32)
    q = np.empty(w, dtype=np.float32)
    p = np.empty(w, dtype=np.int32)
    ok = True
    for i in range(grp.shape[0]):
        s[:] = 0.0
        q[:] = 0.0
        p[:] = 0
        for k in range(begin[i], begin[i + 1]):
            src = words[rows[k], c0 : c0 + w]
            for j in range(w):
                x = _half_bits_as_float32(src[j])
                s[j] += x
                q[j] += x * x
                p[j] += np.int32(x > np.float32(0.0))
        g = grp[i]
        bad = np.float32(0.0)
        for j in range(w):
            bad += s[j] - s[j]  # NaN exactly when some s[j] is non-finite
            ls[g, c0 + j] += np.float64(s[j])
            lq[g, c0 + j] += np.float64(q[j])
            lp[g, c0 + j] += p[j]
        if bad != 0.0 or bad != bad:
            ok = False
    return ok


@njit(cache=True, parallel=True)
def moments_f16_f16c(words, rows, begin, grp, tile, ls, lq, lp):  # pragma: no cover - compiled
    """float16 block partials in runs, one column tile per task; False when NaN/Inf were met."""
    n = ls.shape[1]
    n_tiles = (n + tile - 1) // tile
    oks = np.ones(n_tiles, dtype=np.bool_)
    for t in prange(n_tiles):
        c0 = t * tile
        oks[t] = moments_f16_tile_f16c(words, rows, begin, grp, c0, min(tile, n - c0), ls, lq, lp)
    return oks.all()


@njit(cache=True)
def _decode_half32(src, u, f, xs):  # pragma: no cover - compiled
    """xs[j] = float32 value of the (finite) float16 bits src[j]; u/f are one uint32 scratch."""
    w = xs.shape[0]
    for j in range(w):
        h = np.uint32(src[j])
        u[j] = (((h & np.uint32(0x7FFF)) << np.uint32(13)) + np.uint32(0x38000000)) | (
            (h & np.uint32(0x8000)) << np.uint32(16))
    for j in range(w):
        h = src[j]
        v = f[j]
        if (h & 0x7C00) == 0:  # subnormal or zero: m * 2**-24, exact in float32
            v = np.float32(h & 0x3FF) * np.float32(TWO_POW_M24)
            if (h & 0x8000) != 0:
                v = -v
        xs[j] = v


@njit(cache=True)
def moments_f16_tile(words, rows, begin, grp, present, c0, w, sum_, sumsq, npos):  # pragma: no cover
    """float16 columns [c0, c0 + w): float32 run partials into float64 block partials, then the output."""
    n_groups = sum_.shape[0]
    ls = np.zeros((n_groups, w))
    lq = np.zeros((n_groups, w))
    lp = np.zeros((n_groups, w), dtype=np.int64)
    u = np.empty(w, dtype=np.uint32)
    f = u.view(np.float32)
    xs = np.empty(w, dtype=np.float32)
    s = np.empty(w, dtype=np.float32)
    q = np.empty(w, dtype=np.float32)
    p = np.empty(w, dtype=np.int64)
    for i in range(grp.shape[0]):
        s[:] = 0.0
        q[:] = 0.0
        p[:] = 0
        for k in range(begin[i], begin[i + 1]):
            _decode_half32(words[rows[k], c0 : c0 + w], u, f, xs)
            for j in range(w):
                x = xs[j]
                s[j] += x
                q[j] += x * x
                p[j] += np.int64(x > np.float32(0.0))
        g = grp[i]
        for j in range(w):
            ls[g, j] += np.float64(s[j])
            lq[g, j] += np.float64(q[j])
            lp[g, j] += p[j]
    for g in range(n_groups):
        if present[g]:
            for j in range(w):
                sum_[g, c0 + j] += ls[g, j]
                sumsq[g, c0 + j] += lq[g, j]
                npos[g, c0 + j] += lp[g, j]


@njit(cache=True, parallel=True)
def moments_f16(words, rows, begin, grp, present, tile, sum_, sumsq, npos):  # pragma: no cover
    """float16 moments in runs, one column tile per task."""
    n = sum_.shape[1]
    n_tiles = (n + tile - 1) // tile
    for t in prange(n_tiles):
        c0 = t * tile
        moments_f16_tile(words, rows, begin, grp, present, c0, min(tile, n - c0), sum_, sumsq, npos)
