"""Per-group moments of activation blocks that live on the device: the CUDA kernel and its PyTorch twin.

Both functions add one block's statistics to accumulator tensors, in place, with the semantics of
:class:`vstore.stats.Moments` after :func:`vstore.kernels.accumulate_moments` (the CPU kernels plus
their per-neuron NaN/Inf pass):

* a row whose group id is -1 is skipped; every other row adds 1 to ``count[g]``;
* per neuron, a finite value ``x`` adds ``x`` to ``sum[g, n]``, ``x * x`` to ``sumsq[g, n]`` (float64)
  and 1 to ``npos[g, n]`` if ``x > 0``; a NaN or +-Inf adds 1 to ``nonfinite[g, n]`` and nothing else.

:func:`update_moments` runs the fused kernel of the private extension ``vstore._cuda`` (built by
``setup.py`` when nvcc is found): it reads the block once, on the tensors' stream, without a
synchronisation. :func:`update_moments_torch` does the same with device-agnostic PyTorch ops (CPU
or GPU). Their summation order differs from the CPU kernels' (and, through float64 atomics, from run
to run), so sums agree with them to float64 rounding; counts agree exactly.

The extension is imported lazily: importing this module never fails, and :func:`available` says
whether the kernel can run (built, importable, and a CUDA device visible to PyTorch).
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .errors import NativeExtensionError, StoreError

if TYPE_CHECKING:
    import torch

__all__ = ["available", "info", "update_moments", "update_moments_torch"]

#: Activation dtype name -> the dtype code of vstore._cuda (float16 0, bfloat16 1, float32 2).
DTYPE_CODES = {"float16": 0, "bfloat16": 1, "float32": 2}

#: Rows of one step of the PyTorch path are capped so that its float64 temporaries stay near this many values.
_TORCH_STEP_VALUES = 1 << 22


@functools.cache
def _extension() -> tuple[ModuleType | None, str | None]:
    """(vstore._cuda, None), or (None, why it cannot be imported)."""
    try:
        from . import _cuda  # type: ignore[attr-defined]
    except (ImportError, OSError) as e:  # not built, or no CUDA runtime / driver on this machine
        return None, f"{type(e).__name__}: {e}"
    return _cuda, None


def available() -> bool:
    """Whether :func:`update_moments` can run: ``vstore._cuda`` imports and PyTorch sees a CUDA device.

    Returns
    -------
    bool
        False (never an exception) on a machine without the extension, a CUDA driver or a GPU.
    """
    if _extension()[0] is None:
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a torch without CUDA support, or a broken driver
        return False


def info() -> dict[str, Any]:
    """What the CUDA extension offers on this machine.

    Returns
    -------
    dict
        ``built`` (bool: ``vstore._cuda`` imports), ``error`` (why not, or None), ``runtime_version``
        and ``driver_version`` (ints like 13000; 0 when unknown or no driver), ``device_count``
        (devices the extension's runtime sees) and ``available`` (:func:`available`).
    """
    module, error = _extension()
    if module is None:
        return {"built": False, "error": error, "runtime_version": 0, "driver_version": 0, "device_count": 0,
                "available": False}
    return {"built": True, "error": None, "runtime_version": int(module.runtime_version()),
            "driver_version": int(module.driver_version()), "device_count": int(module.device_count()),
            "available": available()}


def _describe(t: object) -> str:
    import torch

    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    layout = "contiguous" if t.is_contiguous() else "non-contiguous"
    return f"{str(t.dtype).removeprefix('torch.')} tensor of shape {tuple(t.shape)} on {t.device} ({layout})"


def _validate(acts: torch.Tensor, group_ids: torch.Tensor, acc: dict[str, torch.Tensor], *, cuda: bool) -> str:
    """Checks every tensor once; returns the activation dtype name."""
    import torch

    want = "a CUDA" if cuda else "a"
    if (not isinstance(acts, torch.Tensor) or acts.ndim != 2 or not acts.is_contiguous()
            or acts.dtype not in (torch.float16, torch.bfloat16, torch.float32) or (cuda and not acts.is_cuda)):
        raise StoreError(f"acts: expected {want} contiguous float16/bfloat16/float32 tensor (rows, neurons), "
                         f"got {_describe(acts)}")
    rows, n = acts.shape
    device = acts.device
    if (not isinstance(group_ids, torch.Tensor) or group_ids.dtype != torch.int32
            or tuple(group_ids.shape) != (rows,) or not group_ids.is_contiguous() or group_ids.device != device):
        raise StoreError(f"group_ids: expected a contiguous int32 tensor of shape ({rows},) on {device}, "
                         f"got {_describe(group_ids)}")
    count = acc["count"]
    if (not isinstance(count, torch.Tensor) or count.dtype != torch.int64 or count.ndim != 1
            or not count.is_contiguous() or count.device != device):
        raise StoreError(f"count: expected a contiguous int64 tensor (groups,) on {device}, got {_describe(count)}")
    shape = (int(count.shape[0]), int(n))
    for name, dtype in (("sum", torch.float64), ("sumsq", torch.float64), ("npos", torch.int64),
                        ("nonfinite", torch.int64)):
        t = acc[name]
        if (not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape
                or not t.is_contiguous() or t.device != device):
            raise StoreError(f"{name}: expected a contiguous {str(dtype).removeprefix('torch.')} tensor of shape "
                             f"{shape} (groups, neurons) on {device}, got {_describe(t)}")
    return str(acts.dtype).removeprefix("torch.")


def _check_group_range(group_ids: torch.Tensor, n_groups: int) -> None:
    """Raises unless every id is in [-1, n_groups) (one small device synchronisation)."""
    import torch

    if group_ids.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(group_ids))
    if low < -1 or high >= n_groups:
        raise StoreError(f"group_ids: expected values in [-1, {n_groups}), got values in [{low}, {high}]")


def update_moments(
    acts: torch.Tensor,
    group_ids: torch.Tensor,
    count: torch.Tensor,
    sum: torch.Tensor,
    sumsq: torch.Tensor,
    npos: torch.Tensor,
    nonfinite: torch.Tensor,
    *,
    check_groups: bool = True,
) -> None:
    """Adds the per-group statistics of one device block to the accumulators with the CUDA kernel.

    The kernel is enqueued on the current CUDA stream of ``acts``' device and returns at once.

    Parameters
    ----------
    acts : torch.Tensor
        ``(rows, N)`` float16 or bfloat16 (float32 also works) on a CUDA device, contiguous.
    group_ids : torch.Tensor
        int32 ``(rows,)`` on the same device, in ``[-1, G)``; rows with -1 are skipped.
    count : torch.Tensor
        int64 ``(G,)``: rows per group.
    sum, sumsq : torch.Tensor
        float64 ``(G, N)``: sums and sums of squares of the finite values.
    npos, nonfinite : torch.Tensor
        int64 ``(G, N)``: values > 0, and NaN/Inf values left out.
    check_groups : bool
        Check the ids' range first (one small synchronisation). With False the caller vouches for
        them; the kernel then skips ids outside ``[-1, G)`` and never writes out of bounds.

    Raises
    ------
    StoreError
        A tensor of the wrong dtype, shape, layout or device, or a group id out of range.
    NativeExtensionError
        ``vstore._cuda`` is not built or cannot be imported, or the kernel launch failed.
    """
    module, error = _extension()
    if module is None:
        raise NativeExtensionError(f"the CUDA extension vstore._cuda is not available ({error}); build it with "
                                   "nvcc present (python setup.py build_ext --inplace), or use update_moments_torch")
    dtype = _validate(acts, group_ids, {"count": count, "sum": sum, "sumsq": sumsq, "npos": npos,
                                        "nonfinite": nonfinite}, cuda=True)
    if check_groups:
        _check_group_range(group_ids, int(count.shape[0]))
    import torch

    stream = torch.cuda.current_stream(acts.device).cuda_stream
    try:
        module.accumulate_moments(acts.data_ptr(), DTYPE_CODES[dtype], int(acts.shape[0]), int(acts.shape[1]),
                                  group_ids.data_ptr(), int(count.shape[0]), count.data_ptr(), sum.data_ptr(),
                                  sumsq.data_ptr(), npos.data_ptr(), nonfinite.data_ptr(),
                                  int(acts.device.index or 0), int(stream))
    except (RuntimeError, ValueError) as e:
        raise NativeExtensionError(f"the CUDA moments kernel failed on {acts.device}: {e}") from e


def update_moments_torch(
    acts: torch.Tensor,
    group_ids: torch.Tensor,
    count: torch.Tensor,
    sum: torch.Tensor,
    sumsq: torch.Tensor,
    npos: torch.Tensor,
    nonfinite: torch.Tensor,
    *,
    check_groups: bool = True,
) -> None:
    """Adds the per-group statistics of one block to the accumulators with plain PyTorch ops.

    Same arguments, semantics and errors as :func:`update_moments` (bar the extension), on any
    device: the reference the CUDA kernel is tested against, and the path used without it. Rows are
    taken in steps of about four million values, so the float64 temporaries stay small.
    """
    _validate(acts, group_ids, {"count": count, "sum": sum, "sumsq": sumsq, "npos": npos, "nonfinite": nonfinite},
              cuda=False)
    n_groups = int(count.shape[0])
    if check_groups:
        _check_group_range(group_ids, n_groups)
    import torch

    rows, n = acts.shape
    if rows == 0 or n_groups == 0:
        return
    step = max(1, _TORCH_STEP_VALUES // max(int(n), 1))
    for start in range(0, rows, step):
        g = group_ids[start : start + step]
        keep = (g >= 0) & (g < n_groups)  # ids outside are skipped, like the kernel
        index = torch.where(keep, g, 0).to(torch.int64)
        # index_put_(accumulate=True), not index_add_: sorted and deterministic on CUDA, and on CPU
        # it does not stall on an oversubscribed machine as index_add_'s parallel scatter does
        count.index_put_((index,), keep.to(torch.int64), accumulate=True)
        if n == 0:
            continue
        x = acts[start : start + step].to(torch.float64)  # exact for every 16/32-bit float
        finite = torch.isfinite(x)
        counted = keep[:, None]
        w = torch.where(finite & counted, x, 0.0)
        sum.index_put_((index,), w, accumulate=True)
        sumsq.index_put_((index,), w * w, accumulate=True)
        npos.index_put_((index,), (w > 0).to(torch.int64), accumulate=True)
        nonfinite.index_put_((index,), (~finite & counted).to(torch.int64), accumulate=True)
