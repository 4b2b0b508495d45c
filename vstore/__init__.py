"""vstore: an out-of-core activation store and neuron-analysis toolkit for language models.

Stages (each a library function; the ``vstore`` CLI is a thin layer over them):
``build_store`` (model + stories -> Zarr store), ``rank`` (scores and neuron sets from the store),
``ablate`` (value consistency under neuron ablation).
"""

from ._version import __version__

__all__ = ["__version__", "native_status"]


def native_status() -> str:
    """One line saying whether the C++ extension ``vstore._C`` is built, and what it offers."""
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as e:
        return f"native extension vstore._C not built ({e}); using Numba/NumPy kernels"
    threads = getattr(_C, "openmp_threads", lambda: 1)()
    f16c = getattr(_C, "has_f16c", lambda: False)()
    return f"native extension vstore._C {getattr(_C, '__version__', '')} built; OpenMP threads {threads}; F16C {f16c}"
