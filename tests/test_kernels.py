"""Statistics kernels: every backend equals the NumPy reference bit for bit, and an independent oracle.

The oracle here is plain NumPy on float64 per group (counts, sums, sums of squares, > 0 counts), with
its own decoding; sums are compared within 1e-9 of the column's absolute sum (the oracle's summation
order differs; float16 within RUN_ROWS * 2**-24 more, the bound of its float32 runs), counts exactly.
:func:`documented_order` is a second, independent oracle of the float16 summation order itself
(kernels.hpp), which every backend must reproduce bit for bit. The C++ backend's tests skip when
``vstore._C`` is not built.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vstore import kernels
from vstore.errors import NativeExtensionError, StoreError, UsageError, VstoreError
from vstore.stats import Moments

DTYPES = ("float16", "float32", "bfloat16")
NATIVE_SKIP = pytest.mark.skipif(
    not kernels.native_available(),
    reason="native extension vstore._C not built (python setup.py build_ext --inplace)",
)
FAST_BACKENDS = [pytest.param("cpp", marks=NATIVE_SKIP, id="cpp"), pytest.param("numba", id="numba")]
ALL_BACKENDS = [*FAST_BACKENDS, pytest.param("numpy", id="numpy")]
AVAILABLE = [b for b in kernels.BACKENDS if b != "cpp" or kernels.native_available()]
FIELDS = ("count", "sum", "sumsq", "npos", "nonfinite")
HIST_BINS = 65536


# ------------------------------------------------------------------------------------------------
# Test data and the independent oracle.


def to_raw(values: np.ndarray, dtype: str) -> np.ndarray:
    """Raw block of ``dtype`` from float32 values (bfloat16 by truncation: any bits are valid)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return values.astype(np.float16)
    if dtype == "bfloat16":
        return (values.view(np.uint32) >> 16).astype(np.uint16)
    return values


def oracle_values(raw: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values of a raw block, decoded independently of vstore."""
    with np.errstate(invalid="ignore"):  # signalling NaNs
        if dtype == "bfloat16":
            return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return raw.astype(np.float64)


def oracle_moments(raw: np.ndarray, dtype: str, groups: np.ndarray, n_groups: int) -> dict[str, np.ndarray]:
    """Per group: rows, and per neuron the sums over finite values and the count of NaN/Inf values."""
    x = oracle_values(raw, dtype)
    finite = np.isfinite(x)
    n = x.shape[1]
    out = {
        "count": np.zeros(n_groups, np.int64),
        "sum": np.zeros((n_groups, n)),
        "sumsq": np.zeros((n_groups, n)),
        "npos": np.zeros((n_groups, n), np.int64),
        "nonfinite": np.zeros((n_groups, n), np.int64),
        "abs_sum": np.zeros((n_groups, n)),
    }
    for g in range(n_groups):
        in_group = groups == g
        rows = np.where(finite[in_group], x[in_group], 0.0)
        out["count"][g] = rows.shape[0]
        out["nonfinite"][g] = (~finite[in_group]).sum(axis=0)
        out["sum"][g] = rows.sum(axis=0)
        out["sumsq"][g] = (rows**2).sum(axis=0)
        out["npos"][g] = (rows > 0).sum(axis=0)
        out["abs_sum"][g] = np.abs(rows).sum(axis=0)
    return out


def oracle_key(raw: np.ndarray, dtype: str) -> np.ndarray:
    """The documented key: float32 -> float16 first, -0 -> +0, then the sign-dependent bit flip."""
    if dtype == "float32":
        with np.errstate(over="ignore"):
            raw = raw.astype(np.float16)
    bits = raw.view(np.uint16).astype(np.int64)
    bits[bits == 0x8000] = 0
    return np.where(bits >= 0x8000, 0xFFFF - bits, bits + 0x8000).astype(np.uint16)


def run_moments(raw, groups, n_groups, dtype, backend, threads=None) -> Moments:
    acc = Moments.zeros(n_groups, raw.shape[1])
    kernels.accumulate_moments(raw, groups, acc, dtype=dtype, backend=backend, threads=threads)
    return acc


def assert_same_moments(a: Moments, b: Moments) -> None:
    for field in FIELDS:
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


RUN_ROWS = 32  # float16 rows per float32 run (kF16RunRows in csrc/vstore/kernels.hpp)


def assert_matches_oracle(acc: Moments, raw, dtype, groups) -> None:
    want = oracle_moments(raw, dtype, groups, acc.n_groups)
    for field in ("count", "npos", "nonfinite"):
        np.testing.assert_array_equal(getattr(acc, field), want[field], err_msg=field)
    rel = 1e-9 + (RUN_ROWS * 2.0**-24 if dtype == "float16" else 0.0)
    for field, scale in (("sum", want["abs_sum"]), ("sumsq", want["sumsq"])):
        err = np.abs(getattr(acc, field) - want[field])
        assert np.all(err <= rel * scale), (field, err.max())


def documented_order(raw: np.ndarray, groups: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums and sums of squares of a finite float16 block in the documented order, value by value:
    per group, runs of RUN_ROWS of its rows in row order summed in float32, each run widened and
    added to a float64 block partial."""
    rows_, n = raw.shape
    s = np.zeros((n_groups, n))
    q = np.zeros((n_groups, n))
    for g in range(n_groups):
        rows = [r for r in range(rows_) if groups[r] == g]
        for j in range(n):
            part_s = part_q = 0.0
            for start in range(0, len(rows), RUN_ROWS):
                run_s = run_q = np.float32(0.0)
                for r in rows[start : start + RUN_ROWS]:
                    x = np.float32(raw[r, j])
                    run_s = np.float32(run_s + x)
                    run_q = np.float32(run_q + np.float32(x * x))
                part_s += float(run_s)
                part_q += float(run_q)
            s[g, j] += part_s
            q[g, j] += part_q
    return s, q


def degenerate_case(name: str, dtype: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """(float32 values, groups, n_groups) of a named case."""
    if name == "random":
        x = rng.standard_normal((67, 45)).astype(np.float32) * 3
        return x, rng.integers(-1, 3, 67).astype(np.int32), 3
    if name == "empty_block":
        return np.zeros((0, 5), np.float32), np.zeros(0, np.int32), 2
    if name == "one_row":
        return rng.standard_normal((1, 7)).astype(np.float32), np.zeros(1, np.int32), 1
    if name == "one_neuron_one_group":
        return rng.standard_normal((40, 1)).astype(np.float32), np.zeros(40, np.int32), 1
    if name == "no_neurons":
        return np.zeros((6, 0), np.float32), np.array([0, 1, -1, 1, 1, 0], np.int32), 2
    if name == "empty_groups":
        x = rng.standard_normal((30, 9)).astype(np.float32)
        return x, rng.choice(np.array([0, 2], np.int32), 30), 4  # groups 1 and 3 get no rows
    if name == "all_skipped":
        return rng.standard_normal((12, 8)).astype(np.float32), np.full(12, -1, np.int32), 3
    if name == "constant_columns":
        x = np.tile(np.array([[0.0, -0.0, 1.5, -2.25, 7.0]], np.float32), (50, 1))
        return x, rng.integers(0, 2, 50).astype(np.int32), 2
    if name == "nonfinite_rows":
        x = rng.standard_normal((40, 6)).astype(np.float32)
        x[3, 0] = np.nan
        x[7, 5] = np.inf
        x[8, 2] = -np.inf
        x[9, :] = np.nan
        groups = rng.integers(0, 2, 40).astype(np.int32)
        groups[8] = -1  # a non-finite row of group -1 is not counted anywhere
        return x, groups, 2
    if name == "extremes":
        if dtype == "float16":
            special = [65504.0, -65504.0, 2.0**-24, -(2.0**-24), 2.0**-14 - 2.0**-24, 2.0**-14, 0.0, -0.0]
        elif dtype == "bfloat16":
            big = float(np.array([0x7F7F0000], np.uint32).view(np.float32)[0])
            tiny = float(np.array([0x00010000], np.uint32).view(np.float32)[0])
            special = [big, -big, tiny, -tiny, 0.0, -0.0, 1.0, -1.0]
        else:
            fmax = float(np.finfo(np.float32).max)
            tiny = float(np.finfo(np.float32).smallest_subnormal)
            special = [fmax, -fmax, tiny, -tiny, 0.0, -0.0, 1e-30, -1e30]
        x = np.array(special, np.float32)[rng.integers(0, len(special), (64, 8))]
        return x, rng.integers(0, 3, 64).astype(np.int32), 3
    raise AssertionError(name)


CASES = (
    "random",
    "empty_block",
    "one_row",
    "one_neuron_one_group",
    "no_neurons",
    "empty_groups",
    "all_skipped",
    "constant_columns",
    "nonfinite_rows",
    "extremes",
)


# ------------------------------------------------------------------------------------------------
# Moments.


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_moments_equal_reference_and_oracle(case: str, dtype: str, backend: str) -> None:
    rng = np.random.default_rng(sum(map(ord, case + dtype)))
    x, groups, n_groups = degenerate_case(case, dtype, rng)
    raw = to_raw(x, dtype)
    acc = run_moments(raw, groups, n_groups, dtype, backend)
    assert_matches_oracle(acc, raw, dtype, groups)
    assert_same_moments(acc, run_moments(raw, groups, n_groups, dtype, "numpy"))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(300, 517), (1000, 70), (9, 4099)])
def test_moments_threads_agree(shape: tuple[int, int], dtype: str, backend: str) -> None:
    """Large enough for the parallel paths; results do not depend on the thread count."""
    rng = np.random.default_rng(shape[0])
    x = rng.standard_normal(shape).astype(np.float32)
    x[5, 3] = np.nan
    raw = to_raw(x, dtype)
    groups = rng.integers(-1, 12, shape[0]).astype(np.int32)
    one = run_moments(raw, groups, 12, dtype, backend, threads=1)
    assert_same_moments(one, run_moments(raw, groups, 12, dtype, backend, threads=None))
    assert_same_moments(one, run_moments(raw, groups, 12, dtype, "numpy"))
    assert_matches_oracle(one, raw, dtype, groups)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("layout", ["interleaved", "contiguous", "one_group"])
def test_float16_documented_summation_order(layout: str, backend: str) -> None:
    """Wide-range values (float32 runs round differently from float64 sums), > RUN_ROWS rows per
    group, neuron counts with every SIMD tail (64-, 32-, 8-wide and scalar)."""
    rng = np.random.default_rng(len(layout))
    rows, n, n_groups = 150, 107, 3
    x = rng.standard_normal((rows, n)).astype(np.float32) * rng.choice([1e-3, 1.0, 900.0], (rows, 1))
    raw = x.astype(np.float16)
    if layout == "interleaved":
        groups = rng.integers(-1, n_groups, rows).astype(np.int32)
    elif layout == "contiguous":
        groups = (np.arange(rows) * n_groups // rows).astype(np.int32)
    else:
        groups = np.zeros(rows, np.int32)
    acc = run_moments(raw, groups, n_groups, "float16", backend)
    s, q = documented_order(raw, groups, n_groups)
    np.testing.assert_array_equal(acc.sum, s)
    np.testing.assert_array_equal(acc.sumsq, q)
    in64 = oracle_moments(raw, "float16", groups, n_groups)
    assert not np.array_equal(acc.sumsq, in64["sumsq"])  # the order matters for these values


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_float16_overflow_stays_finite(backend: str) -> None:
    """Sums far beyond float16's range (65504) stay finite: float32 runs, float64 block sums. The
    sums (and the squares of 61440 = 15 * 2**12) have few significant bits, so they are exact."""
    raw = np.full((100, 70), 65504.0, np.float16)
    raw[:, 1::2] = -61440.0
    acc = run_moments(raw, np.zeros(100, np.int32), 1, "float16", backend)
    np.testing.assert_array_equal(acc.sum[0, ::2], np.full(35, 100 * 65504.0))
    np.testing.assert_array_equal(acc.sum[0, 1::2], np.full(35, -100 * 61440.0))
    np.testing.assert_array_equal(acc.sumsq[0, 1::2], np.full(35, 100 * 61440.0**2))
    np.testing.assert_allclose(acc.sumsq[0, ::2], 100 * 65504.0**2, rtol=RUN_ROWS * 2.0**-24)
    np.testing.assert_array_equal(acc.npos[0], np.tile([100, 0], 35))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("n", [1, 8, 31, 32, 33, 63, 64, 65, 130, 2049, 4163])
def test_float16_widths_and_nonfinite_positions(n: int, backend: str) -> None:
    """Every column tail and tile boundary; NaN/Inf first, last, in a tail column and in a long run."""
    rng = np.random.default_rng(n)
    rows = 70
    raw = (rng.standard_normal((rows, n)).astype(np.float32) * 5).astype(np.float16)
    groups = rng.integers(-1, 2, rows).astype(np.int32)
    groups[:40] = 1
    reference = run_moments(raw, groups, 2, "float16", "numpy")
    for threads in (1, None):
        assert_same_moments(run_moments(raw, groups, 2, "float16", backend, threads=threads), reference)
    for r, c, v in ((0, 0, np.nan), (rows - 1, n - 1, np.inf), (35, n // 2, -np.inf)):
        raw[r, c] = v
    reference = run_moments(raw, groups, 2, "float16", "numpy")
    assert_matches_oracle(reference, raw, "float16", groups)
    for threads in (1, None):
        assert_same_moments(run_moments(raw, groups, 2, "float16", backend, threads=threads), reference)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_float16_one_bad_group_among_good_ones_accumulates(backend: str) -> None:
    """A NaN in one row of one group, in the last thread's columns: the other groups are added by the
    optimistic sweep, that group alone is redone over its finite rows, and both add to what an
    earlier block left in the accumulator."""
    rng = np.random.default_rng(7)
    rows, n, n_groups = 300, 1000, 5  # wide enough for every thread to own columns
    first = (rng.standard_normal((rows, n)) * 3).astype(np.float16)
    second = (rng.standard_normal((rows, n)) * 3).astype(np.float16)
    groups = rng.integers(-1, n_groups, rows).astype(np.int32)
    bad_row = int(np.flatnonzero(groups == 2)[5])
    second[bad_row, n - 3] = np.nan
    for threads in (1, None):
        want = Moments.zeros(n_groups, n)
        got = Moments.zeros(n_groups, n)
        for block in (first, second):
            kernels.accumulate_moments(block, groups, want, dtype="float16", backend="numpy")
            kernels.accumulate_moments(block, groups, got, dtype="float16", backend=backend, threads=threads)
        assert_same_moments(got, want)
        assert np.flatnonzero(got.nonfinite.any(axis=1)).tolist() == [2]
        assert got.nonfinite.sum() == 1 and got.count[2] == 2 * np.sum(groups == 2)


raw_blocks = st.tuples(
    st.sampled_from(DTYPES),
    st.integers(0, 24),
    st.integers(0, 12),
    st.integers(1, 4),
    st.integers(0, 2**32 - 1),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_blocks)
def test_moments_property_random_bits(params: tuple[str, int, int, int, int]) -> None:
    """Random bit patterns (NaN, Inf, subnormals, huge values included), shapes and groups."""
    dtype, rows, n, n_groups, seed = params
    rng = np.random.default_rng(seed)
    if dtype == "float32":
        raw = rng.integers(0, 2**32, (rows, n), dtype=np.uint32).view(np.float32)
    else:
        raw = rng.integers(0, 2**16, (rows, n), dtype=np.uint16)
        raw = raw.view(np.float16) if dtype == "float16" else raw
    groups = rng.integers(-1, n_groups, rows).astype(np.int32)
    reference = run_moments(raw, groups, n_groups, dtype, "numpy")
    assert_matches_oracle(reference, raw, dtype, groups)
    for backend in AVAILABLE:
        assert_same_moments(run_moments(raw, groups, n_groups, dtype, backend), reference)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_of_halves_is_exact(dtype: str, backend: str) -> None:
    rng = np.random.default_rng(7)
    # Multiples of 1/8 in [-16, 16]: every sum and sum of squares is exact in float64, so even a
    # single pass over the whole block must equal the merged halves bit for bit.
    x = (rng.integers(-128, 129, (200, 33)) / 8).astype(np.float32)
    x[17, 4] = np.nan
    raw = to_raw(x, dtype)
    groups = rng.integers(-1, 5, 200).astype(np.int32)
    first, second = (
        run_moments(raw[:90], groups[:90], 5, dtype, backend),
        run_moments(raw[90:], groups[90:], 5, dtype, backend),
    )
    first.merge(second)
    assert_same_moments(first, run_moments(raw, groups, 5, dtype, backend))

    # In general (inexact sums), merging equals accumulating the two blocks one after the other.
    y = to_raw(rng.standard_normal((200, 33)).astype(np.float32) * 1e3, dtype)
    merged = run_moments(y[:90], groups[:90], 5, dtype, backend)
    merged.merge(run_moments(y[90:], groups[90:], 5, dtype, backend))
    sequential = Moments.zeros(5, 33)
    for part in (slice(0, 90), slice(90, 200)):
        kernels.accumulate_moments(y[part], groups[part], sequential, dtype=dtype, backend=backend)
    assert_same_moments(merged, sequential)
    assert_matches_oracle(merged, y, dtype, groups)


def test_merge_rejects_other_shape() -> None:
    with pytest.raises(StoreError, match=r"expected \(groups, neurons\) = \(2, 3\), got \(2, 4\)"):
        Moments.zeros(2, 3).merge(Moments.zeros(2, 4))


# ------------------------------------------------------------------------------------------------
# Histograms.


def oracle_histogram_check(hist, raw, dtype, groups, neuron_start) -> None:
    """Counts per key equal an np.unique count of the oracle keys of the finite values."""
    finite = np.isfinite(oracle_values(raw, dtype))
    keys = oracle_key(raw, dtype)
    total = 0
    for g in range(hist.shape[0]):
        for j in range(hist.shape[1]):
            rows = (groups == g) & finite[:, neuron_start + j]
            uniq, counts = np.unique(keys[rows, neuron_start + j], return_counts=True)
            np.testing.assert_array_equal(np.flatnonzero(hist[g, j]), uniq)
            np.testing.assert_array_equal(hist[g, j, uniq], counts)
            total += counts.sum()
    assert hist.sum() == total


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "case",
    [
        "random",
        "one_row",
        "empty_block",
        "empty_groups",
        "all_skipped",
        "constant_columns",
        "nonfinite_rows",
        "extremes",
    ],
)
def test_histogram_equals_unique_oracle(case: str, dtype: str, backend: str) -> None:
    rng = np.random.default_rng(sum(map(ord, case)))
    x, groups, n_groups = degenerate_case(case, dtype, rng)
    raw = to_raw(x, dtype)
    neuron_start = min(1, raw.shape[1] - 1)
    n_hist = min(4, raw.shape[1] - neuron_start)
    hist = np.zeros((n_groups, n_hist, HIST_BINS), np.uint32)
    kernels.accumulate_histogram(raw, groups, hist, dtype=dtype, neuron_start=neuron_start, backend=backend)
    oracle_histogram_check(hist, raw, dtype, groups, neuron_start)
    reference = np.zeros_like(hist)
    kernels.accumulate_histogram(
        raw, groups, reference, dtype=dtype, neuron_start=neuron_start, backend="numpy"
    )
    np.testing.assert_array_equal(hist, reference)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_histogram_threads_and_accumulation(dtype: str, backend: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((700, 120)).astype(np.float32)
    x[10, 119] = np.inf  # outside the histogrammed neurons: the row is still left out
    raw = to_raw(x, dtype)
    groups = rng.integers(-1, 2, 700).astype(np.int32)
    one = np.zeros((2, 20, HIST_BINS), np.uint32)
    kernels.accumulate_histogram(raw, groups, one, dtype=dtype, neuron_start=30, backend=backend, threads=1)
    many = np.zeros_like(one)
    for part in (slice(0, 300), slice(300, 700)):  # histograms accumulate across blocks
        kernels.accumulate_histogram(
            raw[part], groups[part], many, dtype=dtype, neuron_start=30, backend=backend
        )
    np.testing.assert_array_equal(one, many)
    oracle_histogram_check(one, raw, dtype, groups, 30)


def test_key_order_equals_value_order_over_all_float16() -> None:
    bits = np.arange(HIST_BINS, dtype=np.uint32).astype(np.uint16)
    values = bits.view(np.float16)
    finite = np.isfinite(values)
    keys = kernels.histogram_key(values, "float16")[finite].astype(np.int64)
    v = values[finite].astype(np.float64)
    order = np.argsort(v, kind="stable")
    dv, dk = np.diff(v[order]), np.diff(keys[order])
    assert np.all(dk[dv > 0] > 0)  # strictly larger value, strictly larger key
    assert np.all(dk[dv == 0] == 0)  # equal values (+0 and -0) share a key
    np.testing.assert_array_equal(keys, oracle_key(bits.view(np.float16)[finite], "float16"))
    assert kernels.histogram_key(np.array([0.0, -0.0], np.float16), "float16").tolist() == [0x8000, 0x8000]


def test_key_order_over_all_bfloat16() -> None:
    bits = np.arange(HIST_BINS, dtype=np.uint32).astype(np.uint16)
    v = oracle_values(bits, "bfloat16")
    finite = np.isfinite(v)
    keys = kernels.histogram_key(bits, "bfloat16")[finite].astype(np.int64)
    order = np.argsort(v[finite], kind="stable")
    dv, dk = np.diff(v[finite][order]), np.diff(keys[order])
    assert np.all(dk[dv > 0] > 0) and np.all(dk[dv == 0] == 0)


def float32_edge_values() -> np.ndarray:
    """float32 values around every float16 rounding decision (ties, overflow, subnormal limits)."""
    halves = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)  # finite >= +0
    mids = ((halves[:-1].astype(np.float64) + halves[1:]) / 2).astype(np.float32)  # exact ties
    around = np.concatenate([mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(0))])
    special = np.array(
        [65504, 65519.996, 65520, 65536, 1e30, np.inf, 2.0**-25, 2.0**-26, 1e-45, 0.0], np.float32
    )
    positive = np.concatenate([halves, around, special, np.nextafter(special, np.float32(0))])
    return np.concatenate([positive, -positive]).astype(np.float32)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_float32_keys_round_like_numpy(backend: str) -> None:
    """float32 -> float16 rounding (to nearest even, overflow to Inf) in each backend's histogram."""
    values = float32_edge_values()
    values = values[np.isfinite(values)]
    raw = np.concatenate([values, np.zeros((-len(values)) % 64, np.float32)]).reshape(-1, 64)
    groups = np.zeros(raw.shape[0], np.int32)
    hist = np.zeros((1, raw.shape[1], HIST_BINS), np.uint32)
    kernels.accumulate_histogram(raw, groups, hist, dtype="float32", neuron_start=0, backend=backend)
    oracle_histogram_check(hist, raw, "float32", groups, 0)


@NATIVE_SKIP
def test_native_histogram_keys_and_decode() -> None:
    from vstore import _C  # type: ignore[attr-defined]

    values = float32_edge_values()
    values = values[np.isfinite(values)]
    np.testing.assert_array_equal(_C.histogram_keys(values, "float32"), oracle_key(values, "float32"))
    bits = np.arange(HIST_BINS, dtype=np.uint32).astype(np.uint16)
    f16 = bits.view(np.float16)
    np.testing.assert_array_equal(_C.histogram_keys(f16, "float16"), kernels.histogram_key(f16, "float16"))
    with np.errstate(invalid="ignore"):
        want = f16.astype(np.float32)
    got = _C.decode(f16, "float16")
    np.testing.assert_array_equal(got, want)  # NaN where NaN (the payload may be quieted)
    number = ~np.isnan(want)
    np.testing.assert_array_equal(got[number].view(np.uint32), want[number].view(np.uint32))  # -0 too
    np.testing.assert_array_equal(_C.decode(bits, "bfloat16"), kernels.decode(bits, "bfloat16"))


@NATIVE_SKIP
@pytest.mark.parametrize("switch", ["VSTORE_NO_F16C", "VSTORE_NO_AVX512"])
def test_native_portable_path_matches_reference(switch: str) -> None:
    """The non-F16C path (taken on CPUs without F16C) forced with VSTORE_NO_F16C=1, and the AVX2 path
    (CPUs without AVX-512) with VSTORE_NO_AVX512=1, in a subprocess."""
    script = textwrap.dedent(
        """
        import numpy as np
        from vstore import kernels, _C
        from vstore.stats import Moments
        import os
        assert kernels.native_info()["f16c"] == ("VSTORE_NO_F16C" not in os.environ)
        rng = np.random.default_rng(0)
        bits = rng.integers(0, 2**16, (257, 300), dtype=np.uint16)
        groups = rng.integers(-1, 3, 257).astype(np.int32)
        half = (rng.standard_normal((257, 300)) * 50).astype(np.float16)
        for dtype, raw in (("float16", bits.view(np.float16)), ("float16", half), ("bfloat16", bits),
                           ("float32", rng.standard_normal((257, 300)).astype(np.float32))):
            for backend in ("cpp", "numpy"):
                acc = Moments.zeros(3, 300)
                kernels.accumulate_moments(raw, groups, acc, dtype=dtype, backend=backend)
                hist = np.zeros((3, 5, 65536), np.uint32)
                kernels.accumulate_histogram(raw, groups, hist, dtype=dtype, neuron_start=7, backend=backend)
                if backend == "cpp":
                    got = acc, hist
            for f in ("count", "sum", "sumsq", "npos", "nonfinite"):
                assert np.array_equal(getattr(got[0], f), getattr(acc, f)), (dtype, f)
            assert np.array_equal(got[1], hist), dtype
        all16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
        with np.errstate(invalid="ignore"):
            want = all16.astype(np.float32)
        assert np.array_equal(_C.decode(all16, "float16"), want, equal_nan=True)
        number = ~np.isnan(want)
        assert np.array_equal(_C.decode(all16, "float16")[number].view(np.uint32), want[number].view(np.uint32))
        edges = np.array([65519.996, 65520, 2.0**-25, 3 * 2.0**-26, 2.0**-14 - 2.0**-25, 1.0009765625 + 2**-11], np.float32)
        edges = np.concatenate([edges, -edges, rng.standard_normal(1000).astype(np.float32) * 100])
        assert np.array_equal(_C.histogram_keys(edges, "float32"), kernels.histogram_key(edges, "float32"))
        from vstore.scoring import welch_t
        st = Moments.zeros(5, 1037)  # a tile and a ragged tail; groups of 0, 1 and many rows
        x = rng.standard_normal((600, 1037)).astype(np.float32)
        y = rng.integers(0, 3, 600).astype(np.int32)
        y[:1] = 3
        x[:, 5] = 0.25
        kernels.accumulate_moments(x, y, st, dtype="float32", backend="numpy")
        from vstore.stats import GroupStats
        gs = GroupStats.for_groups(["a", "b", "c", "d", "e"], [0], 1037)
        for f in ("count", "sum", "sumsq", "npos", "nonfinite"):
            getattr(gs, f)[0] = getattr(st, f)
        gs.sum[0, 1, 9] = np.inf
        gs.sumsq[0, 2, 11] = np.nan
        a, b = welch_t(gs, native=True), welch_t(gs, native=False)
        for u, v in ((a.values, b.values), (a.extra["df"], b.extra["df"])):
            assert np.array_equal(u, v, equal_nan=True) and np.array_equal(np.signbit(u), np.signbit(v))
        print("ok")
        """
    )
    if switch == "VSTORE_NO_F16C" and not kernels.native_info()["f16c"]:
        pytest.skip("this CPU takes the portable path anyway")
    env = {**os.environ, switch: "1"}
    root = str(Path(kernels.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# ------------------------------------------------------------------------------------------------
# Top-k.


def oracle_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    finite = np.flatnonzero(np.isfinite(scores))
    return finite[np.argsort(-scores[finite], kind="stable")[:k]]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("n", [0, 1, 7, 1000, 100_003])
def test_top_k_matches_stable_argsort(n: int, backend: str) -> None:
    rng = np.random.default_rng(n)
    scores = rng.integers(-3, 4, n).astype(np.float64)  # many ties
    scores[rng.random(n) < 0.1] = np.nan
    scores[rng.random(n) < 0.01] = np.inf
    scores[rng.random(n) < 0.01] = -np.inf
    scores[rng.random(n) < 0.05] = -0.0
    n_finite = int(np.isfinite(scores).sum())
    for k in sorted({0, 1, 3, n_finite, n_finite + 5, n // 2, 50, 64, 65}):  # 1..64: the one-pass path
        got = kernels.select_top_k(scores, k, backend=backend)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, oracle_top_k(scores, k))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_top_k_other_dtypes_and_all_nan(backend: str) -> None:
    scores = np.array([0.5, 2.0, 2.0, -1.0], np.float32)
    assert kernels.select_top_k(scores, 2, backend=backend).tolist() == [1, 2]
    assert kernels.select_top_k(np.array([3, 9, 9, 1]), 3, backend=backend).tolist() == [1, 2, 0]
    assert kernels.select_top_k(np.full(5, np.nan), 3, backend=backend).tolist() == []


# ------------------------------------------------------------------------------------------------
# The wrapper: validation, dispatch, decode.


def test_decode_values() -> None:
    f16 = np.array([[1.5, -0.0, 65504]], np.float16)
    assert kernels.decode(f16, "float16").tolist() == [[1.5, -0.0, 65504.0]]
    assert kernels.decode(np.array([0x3FC0, 0xC000], np.uint16), "bfloat16").tolist() == [1.5, -2.0]
    f32 = np.array([1.0, 2.0], np.float32)
    out = kernels.decode(f32, "float32")
    assert out.dtype == np.float32 and not np.shares_memory(out, f32)


def test_resolve_backend() -> None:
    assert kernels.resolve_backend("auto") == ("cpp" if kernels.native_available() else "numba")
    assert kernels.resolve_backend("numpy") == "numpy"
    with pytest.raises(UsageError, match="backend: expected 'auto' or one of"):  # a bad argument, not a bad store
        kernels.resolve_backend("cuda")


def test_cpp_backend_without_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_C", None)
    assert not kernels.native_available()
    assert kernels.native_info()["built"] is False
    assert kernels.resolve_backend("auto") == "numba"
    with pytest.raises(NativeExtensionError, match="not built"):
        kernels.resolve_backend("cpp")
    with pytest.raises(ImportError):  # NativeExtensionError is an ImportError too
        kernels.select_top_k(np.ones(3), 1, backend="cpp")


@NATIVE_SKIP
def test_native_info() -> None:
    info = kernels.native_info()
    assert info["built"] and info["openmp_threads"] >= 1 and isinstance(info["f16c"], bool)
    assert info["version"]


def _good() -> tuple[np.ndarray, np.ndarray, Moments]:
    return np.zeros((4, 3), np.float16), np.zeros(4, np.int32), Moments.zeros(2, 3)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda b, g, a: (b.astype(np.float32), g, a),
            r"expected raw dtype float16 for dtype='float16', got float32",
        ),
        (lambda b, g, a: (b[:, ::2], g, Moments.zeros(2, 2)), "expected a C-contiguous array"),
        (lambda b, g, a: (b[0], g, a), r"expected a 2-D array, got shape \(3,\)"),
        (lambda b, g, a: (b, g.astype(np.int64), a), r"int32 array of shape \(4,\), got int64"),
        (lambda b, g, a: (b, g[:3], a), r"shape \(4,\), got int32 array of shape \(3,\)"),
        (lambda b, g, a: (b, g + 2, a), r"values in \[-1, 2\), got values in \[2, 2\]"),
        (lambda b, g, a: (b, g - 2, a), r"values in \[-1, 2\), got values in \[-2, -2\]"),
        (lambda b, g, a: (b, g, Moments.zeros(2, 4)), r"expected 4 neurons .* got shape \(4, 3\)"),
        (
            lambda b, g, a: (
                b,
                g,
                Moments(a.count, a.sum, a.sumsq, a.npos.astype(np.int32), a.nonfinite),
            ),
            r"Moments.npos: expected a writable C-contiguous int64 array of shape \(2, 3\), got int32",
        ),
    ],
)
def test_moments_validation(mutate, message: str) -> None:
    block, groups, acc = mutate(*_good())
    with pytest.raises(StoreError, match=message):
        kernels.accumulate_moments(block, groups, acc, dtype="float16", backend="numpy")


def test_validation_of_dtype_threads_and_read_only() -> None:
    block, groups, acc = _good()
    with pytest.raises(StoreError, match="dtype: expected one of"):
        kernels.accumulate_moments(block, groups, acc, dtype="float64")
    with pytest.raises(StoreError, match="threads: expected None"):
        kernels.accumulate_moments(block, groups, acc, dtype="float16", threads=0)
    acc.sum.flags.writeable = False
    with pytest.raises(StoreError, match="read-only"):
        kernels.accumulate_moments(block, groups, acc, dtype="float16")
    with pytest.raises(VstoreError):
        Moments.zeros(-1, 3)


def test_histogram_validation() -> None:
    block, groups, _ = _good()
    hist = np.zeros((2, 2, HIST_BINS), np.uint32)
    with pytest.raises(StoreError, match=r"neurons \[2, 4\) within the block's \[0, 3\)"):
        kernels.accumulate_histogram(block, groups, hist, dtype="float16", neuron_start=2)
    with pytest.raises(StoreError, match=r"uint32 array of shape \(groups, neurons, 65536\), got int32"):
        kernels.accumulate_histogram(block, groups, hist.astype(np.int32), dtype="float16", neuron_start=0)
    with pytest.raises(StoreError, match=r"values in \[-1, 2\)"):
        kernels.accumulate_histogram(block, groups + 5, hist, dtype="float16", neuron_start=0)


def test_top_k_validation() -> None:
    with pytest.raises(StoreError, match="expected a 1-D real array"):
        kernels.select_top_k(np.ones((2, 2)), 1)
    with pytest.raises(StoreError, match="k: expected an int >= 0, got -1"):
        kernels.select_top_k(np.ones(3), -1)


@NATIVE_SKIP
def test_bindings_check_their_own_input() -> None:
    """The bindings refuse input that could make a kernel read or write out of bounds."""
    from vstore import _C  # type: ignore[attr-defined]

    block, groups, acc = _good()
    arrays = (acc.count, acc.sum, acc.sumsq, acc.npos, acc.nonfinite)
    with pytest.raises(ValueError, match=r"groups: expected values in \[-1, 2\), got 7 at row 0"):
        _C.accumulate_moments(block, "float16", groups + 7, *arrays, 0)
    with pytest.raises(ValueError, match=r"sum: expected shape \(2, 3\), got \(2, 4\)"):
        _C.accumulate_moments(block, "float16", groups, acc.count, np.zeros((2, 4)), *arrays[2:], 0)
    with pytest.raises(ValueError, match="expected raw dtype uint16"):
        _C.accumulate_moments(block, "bfloat16", groups, *arrays, 0)
    with pytest.raises(TypeError):  # no silent conversion of a float32 accumulator
        _C.accumulate_moments(block, "float16", groups, acc.count, acc.sum.astype(np.float32), *arrays[2:], 0)


def test_numba_staging_buffers_are_kept_only_up_to_their_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Block partials are reused between calls when small; a block whose groups x neurons exceed the
    cap gets buffers for that call only (nothing that large stays behind), with the same result."""
    import threading

    from vstore import _numba_kernels as nk

    monkeypatch.setattr(nk, "_STAGING_KEPT", 24 * 4 * 64)  # room for 4 groups x 64 neurons
    rng = np.random.default_rng(3)
    seen: dict = {}
    errors: list[BaseException] = []

    def run() -> None:
        try:
            check()
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)

    def check() -> None:
        for n_groups, n in ((3, 64), (8, 200), (2, 40)):
            raw = (rng.standard_normal((50, n)) * 4).astype(np.float16)
            groups = rng.integers(-1, n_groups, 50).astype(np.int32)
            assert_same_moments(run_moments(raw, groups, n_groups, "float16", "numba"),
                                run_moments(raw, groups, n_groups, "float16", "numpy"))
            kept = getattr(nk._STAGING, "buffers", None)
            seen[(n_groups, n)] = None if kept is None else kept[0].shape

    t = threading.Thread(target=run)  # a fresh thread: its own (empty) staging
    t.start()
    t.join()
    if errors:
        raise errors[0]
    if not nk.HOST_F16C:
        pytest.skip("this CPU takes Numba's portable float16 path (no staging)")
    assert seen == {(3, 64): (3, 64), (8, 200): (3, 64), (2, 40): (3, 64)}


@NATIVE_SKIP
def test_native_moments_right_when_openmp_gives_fewer_threads_than_asked() -> None:
    """OMP_THREAD_LIMIT=1: the kernel asks for 2 threads and gets 1, which must then sweep every column."""
    script = textwrap.dedent(
        """
        import numpy as np
        from vstore import kernels
        from vstore.stats import Moments
        rng = np.random.default_rng(0)
        raw = (rng.standard_normal((300, 1000)) * 3).astype(np.float16)
        raw[7, 900] = np.nan
        groups = rng.integers(-1, 4, 300).astype(np.int32)
        got, want = Moments.zeros(4, 1000), Moments.zeros(4, 1000)
        kernels.accumulate_moments(raw, groups, got, dtype="float16", backend="cpp", threads=2)
        kernels.accumulate_moments(raw, groups, want, dtype="float16", backend="numpy")
        for f in ("count", "sum", "sumsq", "npos", "nonfinite"):
            assert np.array_equal(getattr(got, f), getattr(want, f)), f
        print("ok")
        """
    )
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    root = str(Path(kernels.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
