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

__all__ = ["HOST_F16C", "RUN_ROWS", "commit_partials", "f16_runs", "moments_f16", "moments_f16_f16c"]

RUN_ROWS = 32  # float16 rows per float32 run, as vstore._numpy_kernels.RUN_ROWS
ROW_VALID = 1
TWO_POW_M24 = 2.0**-24


@njit(cache=True)
def f16_runs(groups, status, n_groups, run_rows):  # pragma: no cover - compiled
    """Each group's valid rows cut, in row order, into runs of ``run_rows``: (rows, begin, group).

    The runs of one group are consecutive, groups in the order their first row appears (the sums do
    not depend on this order: each group adds its own runs in row order).
    """
    n = groups.shape[0]
    size = np.zeros(n_groups, dtype=np.int64)
    order = np.empty(n_groups, dtype=np.int64)
    n_present = 0
    for r in range(n):
        g = groups[r]
        if g < 0 or status[r] != ROW_VALID:
            continue
        if size[g] == 0:
            order[n_present] = g
            n_present += 1
        size[g] += 1
    start = np.zeros(n_groups, dtype=np.int64)
    total = 0
    n_runs = 0
    for i in range(n_present):
        g = order[i]
        start[g] = total
        total += size[g]
        n_runs += (size[g] + run_rows - 1) // run_rows
    rows = np.empty(total, dtype=np.int64)
    for r in range(n):
        g = groups[r]
        if g < 0 or status[r] != ROW_VALID:
            continue
        rows[start[g]] = r
        start[g] += 1
    begin = np.empty(n_runs + 1, dtype=np.int64)
    grp = np.empty(n_runs, dtype=np.int64)
    at = 0
    u = 0
    for i in range(n_present):
        g = order[i]
        for k in range(0, size[g], run_rows):
            begin[u] = at + k
            grp[u] = g
            u += 1
        at += size[g]
    begin[n_runs] = total
    return rows, begin, grp


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


@intrinsic
def _fma32(typingctx, a, b, c):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """a * b + c with one rounding (llvm.fma.f32, vectorised to vfmadd)."""
    if not all(isinstance(t, types.Float) and t.bitwidth == 32 for t in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fn, args)

    return types.float32(a, b, c), codegen


@njit(cache=True)
def moments_f16_tile_f16c(words, rows, begin, grp, c0, w, ls, lq, lp, task, bad):  # pragma: no cover
    """moments_f16_tile with LLVM's float16 conversion: each present group's block partials over the
    columns [c0, c0 + w) into ls/lq/lp[g, c0:c0+w] (overwritten); bad[g, task] = True where a run of
    group g held NaN/Inf in these columns.

    Eight rows of a run (the rest one by one) are added in one sweep over the columns, in row order
    ((s + x0) + x1) + ..., so the run partials are read and written once per eight rows; the sums
    are those of adding the rows one by one (no reassociation: LLVM runs without fast-math).
    """
    s = np.empty(w, dtype=np.float32)
    q = np.empty(w, dtype=np.float32)
    p = np.empty(w, dtype=np.int32)
    zero = np.float32(0.0)
    for i in range(grp.shape[0]):
        g = grp[i]
        if i == 0 or grp[i - 1] != g:  # a group's first run: its partials start at +0.0
            ls[g, c0 : c0 + w] = 0.0
            lq[g, c0 : c0 + w] = 0.0
            lp[g, c0 : c0 + w] = 0
        s[:] = 0.0
        q[:] = 0.0
        p[:] = 0
        k = begin[i]
        end = begin[i + 1]
        while k + 8 <= end:
            a0 = words[rows[k], c0 : c0 + w]
            a1 = words[rows[k + 1], c0 : c0 + w]
            a2 = words[rows[k + 2], c0 : c0 + w]
            a3 = words[rows[k + 3], c0 : c0 + w]
            a4 = words[rows[k + 4], c0 : c0 + w]
            a5 = words[rows[k + 5], c0 : c0 + w]
            a6 = words[rows[k + 6], c0 : c0 + w]
            a7 = words[rows[k + 7], c0 : c0 + w]
            for j in range(w):
                x0 = _half_bits_as_float32(a0[j])
                x1 = _half_bits_as_float32(a1[j])
                x2 = _half_bits_as_float32(a2[j])
                x3 = _half_bits_as_float32(a3[j])
                x4 = _half_bits_as_float32(a4[j])
                x5 = _half_bits_as_float32(a5[j])
                x6 = _half_bits_as_float32(a6[j])
                x7 = _half_bits_as_float32(a7[j])
                s[j] = (((((((s[j] + x0) + x1) + x2) + x3) + x4) + x5) + x6) + x7
                q[j] = _fma32(x7, x7, _fma32(x6, x6, _fma32(x5, x5, _fma32(x4, x4, _fma32(
                    x3, x3, _fma32(x2, x2, _fma32(x1, x1, _fma32(x0, x0, q[j]))))))))
                p[j] += ((np.int32(x0 > zero) + np.int32(x1 > zero)) + (np.int32(x2 > zero) + np.int32(x3 > zero))
                         + (np.int32(x4 > zero) + np.int32(x5 > zero)) + (np.int32(x6 > zero) + np.int32(x7 > zero)))
            k += 8
        while k < end:
            src = words[rows[k], c0 : c0 + w]
            for j in range(w):
                x = _half_bits_as_float32(src[j])
                s[j] += x
                q[j] = _fma32(x, x, q[j])
                p[j] += np.int32(x > zero)
            k += 1
        nan = np.float32(0.0)
        for j in range(w):
            nan += s[j] - s[j]  # NaN exactly when some s[j] is non-finite
            ls[g, c0 + j] += np.float64(s[j])
            lq[g, c0 + j] += np.float64(q[j])
            lp[g, c0 + j] += p[j]
        if nan != 0.0 or nan != nan:
            bad[g, task] = True


@njit(cache=True, parallel=True)
def moments_f16_f16c(words, rows, begin, grp, width, ls, lq, lp, bad):  # pragma: no cover - compiled
    """float16 block partials in runs, one range of ``width`` columns per task (bad: see the tile)."""
    n = ls.shape[1]
    n_tasks = (n + width - 1) // width
    for t in prange(n_tasks):
        c0 = t * width
        moments_f16_tile_f16c(words, rows, begin, grp, c0, min(width, n - c0), ls, lq, lp, t, bad)


@njit(cache=True, parallel=True)
def commit_partials(ls, lq, lp, take, width, sum_, sumsq, npos):  # pragma: no cover - compiled
    """Adds the block partials of the groups with ``take[g]`` to the accumulator, by column ranges."""
    n_groups, n = sum_.shape
    n_tasks = (n + width - 1) // width
    for t in prange(n_tasks):
        c0 = t * width
        c1 = min(n, c0 + width)
        for g in range(n_groups):
            if take[g]:
                for j in range(c0, c1):
                    sum_[g, j] += ls[g, j]
                    sumsq[g, j] += lq[g, j]
                    npos[g, j] += lp[g, j]


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
