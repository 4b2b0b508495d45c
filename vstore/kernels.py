"""Statistics kernels over activation blocks: per-group moments, 16-bit-key histograms, top-k.

The one public, validating, dispatching wrapper over three backends that give bit-identical results:

``"cpp"``
    the native extension ``vstore._C`` (OpenMP over column tiles, F16C float16 decoding and the
    AVX-512 or AVX2 float16 sweep picked at run time; the environment variable ``VSTORE_NO_F16C=1``
    forces the portable path, ``VSTORE_NO_AVX512=1`` the AVX2 one); available when built
    (``python setup.py build_ext --inplace``).
``"numba"``
    :mod:`vstore._numba_kernels`, JIT-compiled on first use (cached on disk).
``"numpy"``
    :mod:`vstore._numpy_kernels`, the slow, obviously correct reference every backend is tested against.

``backend="auto"`` picks ``"cpp"`` when it is built, else ``"numba"``.

Blocks
------
A block holds one layer's activations for some rows: a 2-D C-contiguous array ``(rows, neurons)``
whose raw dtype follows the logical ``dtype``: ``"float16"`` -> float16, ``"float32"`` -> float32,
``"bfloat16"`` -> uint16 bit patterns. ``groups`` (int32, one per row, in ``[-1, n_groups)``) says
which group each row adds to; rows with -1 are skipped entirely. NaN and +-Inf are left out neuron
by neuron: a row counts in ``count[group]``, its finite values are summed and histogrammed, and each
non-finite value is counted in ``nonfinite[group, neuron]`` (the native and Numba kernels skip such
rows whole, and this wrapper adds them back value by value, with the same NumPy code for every
backend).

Exactness
---------
Values are decoded to float32 (exact). For every group, a block's float64 partial sums start at +0.0
and are added once to the accumulator; the rows holding NaN/Inf are then added one by one. float16:
the group's valid rows, in row order, are cut into runs of 32, each run summed in float32 and added
to the partial run after run (see ``csrc/vstore/kernels.hpp``); bfloat16 and float32: the valid
rows are added to the partial in row order in float64. All backends follow this order,
so they agree bit for bit, and (for blocks without NaN/Inf) accumulating two blocks one after the
other equals accumulating each into its own :class:`vstore.stats.Moments` and merging them.

Histogram keys
--------------
A float16 or bfloat16 bit pattern ``b`` has the key ``b ^ 0xFFFF`` if its sign bit is set, else
``b | 0x8000``, after mapping -0 to +0; so keys sort as the values do and equal values share a key.
float32 values are first rounded to float16 (round to nearest even, overflow to +-Inf): coarse bins,
whose error the scoring layer must account for. The keys of NaN are unspecified (NaN rows are never
histogrammed).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .errors import NativeExtensionError, StoreError, UsageError
from .store._format import DTYPES


class MomentsLike(Protocol):
    """What :func:`accumulate_moments` adds into: :class:`vstore.stats.Moments` (this module sits
    below the statistics package and does not import it)."""

    count: np.ndarray
    sum: np.ndarray
    sumsq: np.ndarray
    npos: np.ndarray
    nonfinite: np.ndarray

    @property
    def n_groups(self) -> int: ...

    @property
    def n_neurons(self) -> int: ...

    def validate(self) -> None: ...

try:
    from . import _C  # type: ignore[attr-defined]

    _NATIVE_ERROR: str | None = None
except ImportError as _error:  # pragma: no cover - depends on the build
    _C = None
    _NATIVE_ERROR = str(_error)

__all__ = [
    "BACKENDS",
    "HISTOGRAM_BINS",
    "RAW_DTYPES",
    "accumulate_histogram",
    "accumulate_moments",
    "decode",
    "histogram_key",
    "native_available",
    "native_info",
    "resolve_backend",
    "select_top_k",
]

#: Backend names, fastest first.
BACKENDS: tuple[str, ...] = ("cpp", "numba", "numpy")

#: Logical dtype -> raw NumPy dtype of a block (from the store's one dtype table).
RAW_DTYPES: dict[str, np.dtype[Any]] = {k: v.raw for k, v in DTYPES.items()}

#: The most kernel threads one call may ask for (OpenMP aborts the process far above the cores there are).
MAX_THREADS = 1024

#: Bins per neuron of a histogram: one per 16-bit key.
HISTOGRAM_BINS = 65536


def native_available() -> bool:
    """Whether the native extension ``vstore._C`` is built and importable.

    Returns
    -------
    bool
        True when backend ``"cpp"`` can be used.
    """
    return _C is not None


def native_info() -> dict[str, Any]:
    """What the native extension offers.

    Returns
    -------
    dict
        ``built`` (bool), ``version`` (str or None), ``openmp_threads`` (int: threads an OpenMP region
        uses, 0 when not built), ``f16c`` (bool: the F16C/AVX2 float16 path is used), and ``error``
        (why the import failed, or None).
    """
    if _C is None:
        return {"built": False, "version": None, "openmp_threads": 0, "f16c": False, "error": _NATIVE_ERROR}
    return {
        "built": True,
        "version": str(_C.version()),
        "openmp_threads": int(_C.openmp_threads()),
        "f16c": bool(_C.has_f16c()),
        "error": None,
    }


def resolve_backend(name: str) -> str:
    """The concrete backend for ``name``.

    Parameters
    ----------
    name : str
        ``"auto"`` or one of :data:`BACKENDS`.

    Returns
    -------
    str
        ``"cpp"`` if ``name`` is ``"auto"`` and the extension is built, ``"numba"`` if it is not;
        otherwise ``name`` itself.

    Raises
    ------
    NativeExtensionError
        ``name`` is ``"cpp"`` but the extension is not built.
    UsageError
        ``name`` is not a backend.
    """
    if name == "auto":
        return "cpp" if _C is not None else "numba"
    if name not in BACKENDS:
        raise UsageError(f"backend: expected 'auto' or one of {BACKENDS}, got {name!r}", "backend")
    if name == "cpp" and _C is None:
        raise NativeExtensionError(
            f"backend 'cpp' needs the native extension vstore._C, which is not built ({_NATIVE_ERROR}); "
            "build it with `python setup.py build_ext --inplace`, or use backend='numba'"
        )
    return name


def _backend_module(name: str) -> Any:
    """The module implementing backend ``name`` (imported on first use: Numba is slow to import)."""
    backend = resolve_backend(name)
    if backend == "cpp":
        return _C
    module: ModuleType = importlib.import_module(f"vstore._{backend}_kernels")
    return module


def describe_array(array: object) -> str:
    """How an argument looks, for error messages: dtype, shape, layout, writability."""
    if not isinstance(array, np.ndarray):
        return type(array).__name__
    layout = "C-contiguous" if array.flags.c_contiguous else "non-contiguous"
    writable = "" if array.flags.writeable else ", read-only"
    return f"{array.dtype} array of shape {array.shape} ({layout}{writable})"



def _check_dtype(dtype: str) -> np.dtype[Any]:
    if dtype not in RAW_DTYPES:
        raise StoreError(f"dtype: expected one of {tuple(RAW_DTYPES)}, got {dtype!r}")
    return RAW_DTYPES[dtype]


def _check_raw(values: object, dtype: str, what: str, ndim: int | None) -> np.ndarray:
    raw = _check_dtype(dtype)
    if not isinstance(values, np.ndarray):
        raise StoreError(
            f"{what}: expected a numpy array of raw dtype {raw} (dtype={dtype!r}), got {describe_array(values)}"
        )
    if ndim is not None and values.ndim != ndim:
        raise StoreError(f"{what}: expected a {ndim}-D array, got shape {values.shape}")
    if values.dtype != raw:
        raise StoreError(f"{what}: expected raw dtype {raw} for dtype={dtype!r}, got {values.dtype}")
    if not values.flags.c_contiguous:
        raise StoreError(
            f"{what}: expected a C-contiguous array, got {describe_array(values)} (use np.ascontiguousarray)"
        )
    return values


def _check_groups(groups: object, rows: int, n_groups: int) -> np.ndarray:
    if (
        not isinstance(groups, np.ndarray)
        or groups.dtype != np.int32
        or groups.shape != (rows,)
        or not groups.flags.c_contiguous
    ):
        raise StoreError(
            f"groups: expected a C-contiguous int32 array of shape ({rows},), got {describe_array(groups)}"
        )
    if rows:
        low, high = int(groups.min()), int(groups.max())
        if low < -1 or high >= n_groups:
            raise StoreError(f"groups: expected values in [-1, {n_groups}), got values in [{low}, {high}]")
    return groups


def _check_threads(threads: int | None) -> int:
    if threads is None:
        return 0
    if isinstance(threads, bool) or not isinstance(threads, int | np.integer) or not 1 <= threads <= MAX_THREADS:
        raise StoreError(f"threads: expected None (all) or an int in 1..{MAX_THREADS}, got {threads!r}")
    return int(threads)


def accumulate_moments(
    block: np.ndarray,
    groups: np.ndarray,
    acc: MomentsLike,
    *,
    dtype: str,
    backend: str = "auto",
    threads: int | None = None,
) -> None:
    """Adds the per-group statistics of one block to ``acc``, in place.

    Parameters
    ----------
    block : numpy.ndarray
        Raw values ``(rows, N)``, C-contiguous; raw dtype float16, float32, or uint16 (bfloat16 bits).
    groups : numpy.ndarray
        int32 ``(rows,)`` in ``[-1, G)``; rows with -1 are skipped.
    acc : vstore.stats.Moments
        Statistics of shape ``(G, N)`` to add to (e.g. ``GroupStats.layer(i)``, a view of one layer).
    dtype : str
        Logical dtype: ``"float16"``, ``"float32"`` or ``"bfloat16"``.
    backend : str
        ``"auto"``, ``"cpp"``, ``"numba"`` or ``"numpy"``.
    threads : int, optional
        Threads to use (``None``: all); ignored by ``"numpy"``.

    Raises
    ------
    StoreError
        A malformed argument; the message names what was expected and what was got.
    NativeExtensionError
        ``backend="cpp"`` and the extension is not built.
    """
    block = _check_raw(block, dtype, "block", ndim=2)
    if not all(hasattr(acc, k) for k in ("count", "sum", "sumsq", "npos", "nonfinite", "validate")):
        raise StoreError(f"acc: expected Moments, got {type(acc).__name__}")
    acc.validate()
    if acc.n_neurons != block.shape[1]:
        raise StoreError(
            f"block: expected {acc.n_neurons} neurons (columns) like acc, got shape {block.shape}"
        )
    groups = _check_groups(groups, block.shape[0], acc.n_groups)
    n_threads = _check_threads(threads)
    kernels = _backend_module(backend)
    skipped = np.zeros(acc.n_groups, dtype=np.int64)  # rows the kernel left out whole: they hold NaN/Inf
    kernels.accumulate_moments(block, dtype, groups, acc.count, acc.sum, acc.sumsq, acc.npos, skipped, n_threads)
    if skipped.any():
        from . import _numpy_kernels

        rows = _numpy_kernels.nonfinite_rows(block, dtype, groups)
        _numpy_kernels.add_nonfinite_rows(block, dtype, groups, rows, acc.count, acc.sum, acc.sumsq, acc.npos,
                                          acc.nonfinite)


def accumulate_histogram(
    block: np.ndarray,
    groups: np.ndarray,
    hist: np.ndarray,
    *,
    dtype: str,
    neuron_start: int,
    backend: str = "auto",
    threads: int | None = None,
) -> None:
    """Counts each value's 16-bit key into per-group, per-neuron histograms, in place.

    For ``j`` in ``[0, M)`` with ``M = hist.shape[1]``, every row ``r`` whose group is not -1 adds
    one to ``hist[groups[r], j, key(block[r, neuron_start + j])]`` where that value is finite.

    Parameters
    ----------
    block : numpy.ndarray
        Raw values ``(rows, N)``, as for :func:`accumulate_moments`.
    groups : numpy.ndarray
        int32 ``(rows,)`` in ``[-1, G)``.
    hist : numpy.ndarray
        uint32 ``(G, M, 65536)``, C-contiguous and writable.
    dtype : str
        Logical dtype: ``"float16"``, ``"float32"`` or ``"bfloat16"``.
    neuron_start : int
        First block column histogrammed; ``neuron_start + M <= N``.
    backend : str
        ``"auto"``, ``"cpp"``, ``"numba"`` or ``"numpy"``.
    threads : int, optional
        Threads to use (``None``: all).

    Raises
    ------
    StoreError
        A malformed argument.
    NativeExtensionError
        ``backend="cpp"`` and the extension is not built.
    """
    block = _check_raw(block, dtype, "block", ndim=2)
    if (
        not isinstance(hist, np.ndarray)
        or hist.dtype != np.uint32
        or hist.ndim != 3
        or hist.shape[2] != HISTOGRAM_BINS
        or not hist.flags.c_contiguous
        or not hist.flags.writeable
    ):
        raise StoreError(
            f"hist: expected a writable C-contiguous uint32 array of shape (groups, neurons, {HISTOGRAM_BINS}), "
            f"got {describe_array(hist)}"
        )
    n_hist = hist.shape[1]
    if isinstance(neuron_start, bool) or not isinstance(neuron_start, int | np.integer):
        raise StoreError(f"neuron_start: expected an int, got {neuron_start!r}")
    if neuron_start < 0 or neuron_start + n_hist > block.shape[1]:
        raise StoreError(
            f"neuron_start: expected neurons [{neuron_start}, {neuron_start + n_hist}) within the block's "
            f"[0, {block.shape[1]}), got block shape {block.shape} and hist shape {hist.shape}"
        )
    groups = _check_groups(groups, block.shape[0], hist.shape[0])
    n_threads = _check_threads(threads)
    kernels = _backend_module(backend)
    kernels.accumulate_histogram(block, dtype, groups, hist, int(neuron_start), n_threads)
    from . import _numpy_kernels

    rows = _numpy_kernels.nonfinite_rows(block, dtype, groups)
    if rows.size:  # the kernel skipped these rows whole: add their finite values neuron by neuron
        _numpy_kernels.add_nonfinite_histogram(block, dtype, groups, rows, hist, int(neuron_start))


def histogram_key(values: np.ndarray, dtype: str) -> npt.NDArray[np.uint16]:
    """The order-preserving 16-bit histogram key of each raw value.

    Parameters
    ----------
    values : numpy.ndarray
        Raw values of any shape; raw dtype as for a block.
    dtype : str
        Logical dtype: ``"float16"``, ``"float32"`` (rounded to float16 first) or ``"bfloat16"``.

    Returns
    -------
    numpy.ndarray
        uint16 keys, same shape; key order equals value order, -0 and +0 share a key.
    """
    raw = _check_dtype(dtype)
    if not isinstance(values, np.ndarray) or values.dtype != raw:
        raise StoreError(
            f"values: expected a numpy array of raw dtype {raw} for dtype={dtype!r}, got {describe_array(values)}"
        )
    from . import _numpy_kernels

    return _numpy_kernels.histogram_key(values, dtype)


def select_top_k(scores: np.ndarray, k: int, *, backend: str = "auto") -> npt.NDArray[np.int64]:
    """Indices of the ``k`` largest finite scores, best first.

    Ties are broken by the lower index; NaN and +-Inf are never selected, so fewer than ``k``
    indices come back when fewer than ``k`` scores are finite.

    Parameters
    ----------
    scores : numpy.ndarray
        1-D real scores (converted to float64; integers beyond 2**53 may tie).
    k : int
        How many to select, >= 0.
    backend : str
        ``"auto"``, ``"cpp"``, ``"numba"`` or ``"numpy"``.

    Returns
    -------
    numpy.ndarray
        int64 indices, ``min(k, number of finite scores)`` of them.
    """
    if not isinstance(scores, np.ndarray) or scores.ndim != 1 or scores.dtype.kind not in "fiu":
        raise StoreError(f"scores: expected a 1-D real array, got {describe_array(scores)}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise StoreError(f"k: expected an int >= 0, got {k!r}")
    values = np.ascontiguousarray(scores, dtype=np.float64)
    kernels = _backend_module(backend)
    return np.asarray(kernels.select_top_k(values, int(k)), dtype=np.int64)


def decode(block: np.ndarray, dtype: str) -> npt.NDArray[np.float32]:
    """Float32 values of a raw block (bfloat16 bits ``b`` become the float32 bits ``b << 16``).

    Parameters
    ----------
    block : numpy.ndarray
        Raw values of any shape; raw dtype as for a block.
    dtype : str
        Logical dtype: ``"float16"``, ``"float32"`` or ``"bfloat16"``.

    Returns
    -------
    numpy.ndarray
        A new float32 array of the same shape (exact: every raw value is a float32).
    """
    raw = _check_dtype(dtype)
    if not isinstance(block, np.ndarray) or block.dtype != raw:
        raise StoreError(
            f"block: expected a numpy array of raw dtype {raw} for dtype={dtype!r}, got {describe_array(block)}"
        )
    from . import _numpy_kernels

    return _numpy_kernels.decode(block, dtype)
