"""The device statistics path: vstore.cuda_stats's PyTorch reference against the NumPy oracle (on CPU,
always), the CUDA kernel against both (on a GPU, when there is one), the lazy import, and setup.py's
decision to build or skip vstore._cuda.

The oracle is :func:`vstore.kernels.accumulate_moments` (NumPy backend, with its per-neuron NaN/Inf
pass) on the same raw values. Summation orders differ, so sums are compared within 1e-12 of the
column's absolute sum; counts exactly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vstore import cuda_stats
from vstore.errors import StoreError, VstoreError
from vstore.stats import Moments

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FIELDS = ("count", "sum", "sumsq", "npos", "nonfinite")
CUDA = cuda_stats.available()


def make_block(rows: int, n: int, n_groups: int, dtype: str, seed: int, special: float = 0.05,
               skip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations with zeros, negatives, NaN and +-Inf, and group ids in runs (some -1)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 3.0, (rows, n)).astype(np.float32)
    x[rng.random((rows, n)) < 0.1] = 0.0
    kinds = rng.random((rows, n))
    x[kinds < special / 3] = np.nan
    x[(kinds >= special / 3) & (kinds < 2 * special / 3)] = np.inf
    x[(kinds >= 2 * special / 3) & (kinds < special)] = -np.inf
    run = np.repeat(rng.integers(0, max(n_groups, 1), max(rows // 3 + 1, 1)), 3)[:rows]
    groups = np.where(rng.random(rows) < skip, -1, run if n_groups else -1).astype(np.int32)
    acts = torch.from_numpy(x).to(DTYPES[dtype])
    return acts.contiguous(), torch.from_numpy(groups)


def raw_of(acts: torch.Tensor) -> tuple[np.ndarray, str]:
    """The raw NumPy block and logical dtype the CPU kernels take for a tensor."""
    t = acts.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), "bfloat16"
    return t.numpy(), str(t.dtype).removeprefix("torch.")


def oracle(acts: torch.Tensor, groups: torch.Tensor, n_groups: int) -> Moments:
    """Exact float64 statistics by NumPy (no summation order to share: the sums compare to rounding).

    The CPU kernels sum float16 in float32 runs (docs/rank.md); this oracle does not, so both the
    device kernel and the PyTorch path are held to float64 rounding of the exact sums.
    """
    x = acts.detach().cpu().to(torch.float64).numpy()
    g = groups.cpu().numpy()
    acc = Moments.zeros(n_groups, acts.shape[1])
    for k in range(n_groups):
        rows = x[g == k]
        fin = np.isfinite(rows)
        v = np.where(fin, rows, 0.0)
        acc.count[k] = len(rows)
        acc.sum[k] = v.sum(axis=0)
        acc.sumsq[k] = (v * v).sum(axis=0)
        acc.npos[k] = (fin & (rows > 0)).sum(axis=0)
        acc.nonfinite[k] = (~fin).sum(axis=0)
    return acc


def zeros(n_groups: int, n: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    i64, f64 = torch.int64, torch.float64
    return {"count": torch.zeros(n_groups, dtype=i64, device=device),
            "sum": torch.zeros(n_groups, n, dtype=f64, device=device),
            "sumsq": torch.zeros(n_groups, n, dtype=f64, device=device),
            "npos": torch.zeros(n_groups, n, dtype=i64, device=device),
            "nonfinite": torch.zeros(n_groups, n, dtype=i64, device=device)}


def assert_equal_stats(got: dict[str, torch.Tensor], want: Moments) -> None:
    for k in ("count", "npos", "nonfinite"):
        np.testing.assert_array_equal(got[k].cpu().numpy(), getattr(want, k), err_msg=k)
    scale = np.abs(want.sum).sum(axis=0, keepdims=True) + np.abs(want.sumsq).sum(axis=0, keepdims=True) + 1.0
    for k in ("sum", "sumsq"):
        g = got[k].cpu().numpy()
        assert np.isfinite(g).all(), k
        assert (np.abs(g - getattr(want, k)) <= 1e-12 * scale).all(), k


CASES = {  # name -> rows, neurons, groups
    "block": (97, 24, 3),
    "one-row": (1, 8, 2),
    "no-rows": (0, 8, 2),
    "empty-groups": (30, 5, 9),
    "one-neuron": (40, 1, 2),
    "no-neurons": (12, 0, 2),
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_torch_reference_equals_the_numpy_oracle(dtype: str, case: str) -> None:
    rows, n, n_groups = CASES[case]
    acts, groups = make_block(rows, n, n_groups, dtype, seed=len(case))
    acc = zeros(n_groups, n)
    cuda_stats.update_moments_torch(acts, groups, **acc)
    want = oracle(acts, groups, n_groups)
    assert_equal_stats(acc, want)
    if case == "block":
        assert want.nonfinite.sum() > 0 and want.count.sum() < rows  # the case holds NaN/Inf and -1 rows
    if case == "empty-groups":
        assert (want.count == 0).any()


def test_torch_reference_accumulates_in_steps_and_across_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_stats, "_TORCH_STEP_VALUES", 7 * 16)  # 7 rows a step: many steps, a short last one
    acc = zeros(4, 16)
    want = Moments.zeros(4, 16)
    for seed in range(3):
        acts, groups = make_block(50, 16, 4, "bfloat16", seed=seed)
        cuda_stats.update_moments_torch(acts, groups, **acc)
        want.merge(oracle(acts, groups, 4))
    assert_equal_stats(acc, want)


def test_all_skipped_rows_and_no_groups_add_nothing() -> None:
    acts, _ = make_block(10, 4, 2, "float16", seed=1)
    acc = zeros(2, 4)
    cuda_stats.update_moments_torch(acts, torch.full((10,), -1, dtype=torch.int32), **acc)
    assert all(int(t.abs().sum()) == 0 for t in acc.values())
    none = zeros(0, 4)
    cuda_stats.update_moments_torch(acts, torch.full((10,), -1, dtype=torch.int32), **none)
    assert none["sum"].shape == (0, 4)


def test_nonfinite_values_are_left_out_per_neuron() -> None:
    acts = torch.tensor([[1.0, float("nan"), -2.0], [float("inf"), 3.0, 0.0], [4.0, 5.0, float("-inf")]],
                        dtype=torch.float16)
    groups = torch.tensor([0, 0, 1], dtype=torch.int32)
    acc = zeros(2, 3)
    cuda_stats.update_moments_torch(acts, groups, **acc)
    assert acc["count"].tolist() == [2, 1]
    assert acc["nonfinite"].tolist() == [[1, 1, 0], [0, 0, 1]]
    assert acc["sum"].tolist() == [[1.0, 3.0, -2.0], [4.0, 5.0, 0.0]]
    assert acc["sumsq"].tolist() == [[1.0, 9.0, 4.0], [16.0, 25.0, 0.0]]
    assert acc["npos"].tolist() == [[1, 1, 0], [1, 1, 0]]
    assert_equal_stats(acc, oracle(acts, groups, 2))


def test_bad_arguments_are_named() -> None:
    acts, groups = make_block(6, 4, 2, "float16", seed=0)
    acc = zeros(2, 4)
    bad = [
        ({"acts": acts.to(torch.int16)}, "acts"),
        ({"acts": acts.t()}, "acts"),
        ({"acts": acts[:, None]}, "acts"),
        ({"group_ids": groups.to(torch.int64)}, "group_ids"),
        ({"group_ids": groups[:5]}, "group_ids"),
        ({"group_ids": groups.to("meta")}, "group_ids"),
        ({"count": acc["count"].to(torch.int32)}, "count"),
        ({"sum": acc["sum"].to(torch.float32)}, "sum"),
        ({"sumsq": acc["sumsq"][:, :3]}, "sumsq"),
        ({"npos": acc["npos"].t().contiguous().t()}, "npos"),
        ({"nonfinite": acc["nonfinite"][:1]}, "nonfinite"),
        ({"group_ids": torch.tensor([0, 1, 2, 0, 0, 0], dtype=torch.int32)}, "group_ids"),
        ({"group_ids": torch.tensor([0, -2, 1, 0, 0, 0], dtype=torch.int32)}, "group_ids"),
    ]
    for change, name in bad:
        args = {"acts": acts, "group_ids": groups, **acc, **change}
        with pytest.raises(StoreError, match=rf"^{name}: expected"):
            cuda_stats.update_moments_torch(**args)
    assert all(int(t.abs().sum()) == 0 for t in acc.values())  # nothing was written on the way


def test_unchecked_out_of_range_ids_are_skipped() -> None:
    acts, _ = make_block(4, 3, 2, "float32", seed=2, special=0.0)
    ids = torch.tensor([0, 2, 7, 1], dtype=torch.int32)
    acc = zeros(2, 3)
    cuda_stats.update_moments_torch(acts, ids, **acc, check_groups=False)
    assert_equal_stats(acc, oracle(acts, torch.tensor([0, -1, -1, 1], dtype=torch.int32), 2))


def test_update_moments_wants_cuda_tensors() -> None:
    acts, groups = make_block(6, 4, 2, "float16", seed=0)
    with pytest.raises(VstoreError, match=r"CUDA|vstore\._cuda"):
        cuda_stats.update_moments(acts, groups, **zeros(2, 4))


def test_importing_never_fails_without_the_extension() -> None:
    code = (
        "import sys; sys.modules['vstore._cuda'] = None\n"  # makes `from . import _cuda` raise ImportError
        "import vstore, vstore.cuda_stats as c, torch\n"
        "assert c.available() is False and c.info()['built'] is False, c.info()\n"
        "acts = torch.zeros(2, 2, dtype=torch.float16); g = torch.zeros(2, dtype=torch.int32)\n"
        "acc = [torch.zeros(1, dtype=torch.int64)] + [torch.zeros(1, 2, dtype=t) for t in\n"
        "       (torch.float64, torch.float64, torch.int64, torch.int64)]\n"
        "try:\n    c.update_moments(acts, g, *acc)\nexcept vstore.errors.NativeExtensionError as e:\n"
        "    print('refused:', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "refused: the CUDA extension vstore._cuda is not available" in res.stdout


@pytest.mark.skipif(cuda_stats.info()["built"] is False, reason="vstore._cuda not built (needs nvcc)")
def test_built_extension_imports_without_a_gpu_and_reports_launch_errors() -> None:
    info = cuda_stats.info()
    assert info["built"] and info["runtime_version"] > 0
    if info["driver_version"] == 0:  # no driver: a launch fails with a CUDA error, never a crash
        from vstore import _cuda  # type: ignore[attr-defined]

        assert info["device_count"] == 0 and not cuda_stats.available()
        with pytest.raises(RuntimeError, match="CUDA error"):
            _cuda.accumulate_moments(256, 0, 1, 8, 256, 1, 256, 256, 256, 256, 256, 0, 0)
        with pytest.raises(ValueError, match="dtype"):
            _cuda.accumulate_moments(256, 5, 1, 8, 256, 1, 256, 256, 256, 256, 256, 0, 0)


# ------------------------------------------------------------------------------------------------
# The kernel's own code on the host: vstore._cuda.emulate_moments runs the exact grid of a launch
# (column blocks x row chunks x threads, vector widths, runs, flushes) thread by thread on host memory.

BUILT = pytest.mark.skipif(cuda_stats.info()["built"] is False, reason="vstore._cuda not built (needs nvcc)")
EMULATED = {  # name -> rows, neurons, groups; widths for 16-bit / float32 in the comments
    "width-8": (1000, 264, 5),     # 8 / 4, one column block
    "width-2": (333, 130, 3),      # 2 / 2
    "width-1": (77, 7, 2),         # 1 / 1
    "blocks": (150, 2056, 4),      # 8 / 4, several column blocks, a partly idle last one
    "unaligned": (301, 16, 3),     # odd element offset: 1 / 1
    "no-neurons": (40, 0, 2),
    "one-row": (1, 8, 2),
}


@BUILT
@pytest.mark.parametrize("sms", [1, 132])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(EMULATED))
def test_kernel_grid_emulated_on_the_host_equals_the_oracle(case: str, dtype: str, sms: int) -> None:
    from vstore import _cuda  # type: ignore[attr-defined]

    rows, n, n_groups = EMULATED[case]
    acts, groups = make_block(rows, n, n_groups, dtype, seed=rows + n)
    raw, _ = raw_of(acts)
    if case == "unaligned":
        buf = np.empty(raw.size + 1, dtype=raw.dtype)
        buf[1:] = raw.ravel()
        raw = buf[1:].reshape(raw.shape)
    ids = groups.numpy()
    acc = Moments.zeros(n_groups, n)
    a = acc.arrays()
    for _ in range(2):  # twice: the kernel adds into what is there
        _cuda.emulate_moments(raw.ctypes.data, cuda_stats.DTYPE_CODES[dtype], rows, n, ids.ctypes.data, n_groups,
                              *(a[k].ctypes.data for k in FIELDS), sms)
    want = oracle(acts, groups, n_groups)
    want.merge(oracle(acts, groups, n_groups))
    assert_equal_stats({k: torch.from_numpy(v) for k, v in a.items()}, want)
    expected = {"width-8": 8, "width-2": 2, "width-1": 1, "blocks": 8, "unaligned": 1, "no-neurons": 8,
                "one-row": 8}[case]
    width = _cuda.vector_width(raw.ctypes.data, cuda_stats.DTYPE_CODES[dtype], n)
    assert width == (min(expected, 4) if dtype == "float32" else expected)


@BUILT
def test_kernel_grid_skips_out_of_range_ids_on_the_host() -> None:
    from vstore import _cuda  # type: ignore[attr-defined]

    acts, _ = make_block(9, 8, 2, "float16", seed=5, special=0.0)
    raw, _ = raw_of(acts)
    ids = np.array([0, 2, -3, 1, 1, 7, 0, -1, 1], dtype=np.int32)
    acc = Moments.zeros(2, 8)
    a = acc.arrays()
    _cuda.emulate_moments(raw.ctypes.data, 0, 9, 8, ids.ctypes.data, 2, *(a[k].ctypes.data for k in FIELDS), 4)
    kept = torch.from_numpy(np.where((ids >= 0) & (ids < 2), ids, -1).astype(np.int32))
    assert_equal_stats({k: torch.from_numpy(v) for k, v in a.items()}, oracle(acts, kept, 2))


# ------------------------------------------------------------------------------------------------
# setup.py: builds vstore._cuda only with nvcc and a toolkit, and says why it skips it.


def _setup_lines(env_changes: dict[str, str], drop: tuple[str, ...] = ("CUDA_HOME", "CUDA_PATH")) -> str:
    pytest.importorskip("pybind11")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_changes)
    res = subprocess.run([sys.executable, "setup.py", "--version"], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return "\n".join(line for line in res.stdout.splitlines() if line.startswith("vstore:"))


def test_setup_skips_cuda_without_nvcc(tmp_path: Path) -> None:
    assert _setup_lines({"PATH": str(tmp_path)}) == (
        "vstore: skipping vstore._cuda (the optional CUDA kernel): nvcc not found on PATH (set CUDA_HOME)")
    assert _setup_lines({"VSTORE_NO_CUDA": "1"}).endswith("VSTORE_NO_CUDA is set")
    fake = tmp_path / "cuda" / "bin"
    fake.mkdir(parents=True)
    (fake / "nvcc").write_text("#!/bin/sh\nexit 0\n")
    (fake / "nvcc").chmod(0o755)
    assert "no CUDA headers" in _setup_lines({"CUDA_HOME": str(tmp_path / "cuda")})


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
def test_setup_builds_cuda_with_nvcc() -> None:
    line = _setup_lines({})
    assert line.startswith("vstore: building vstore._cuda with "), line


# ------------------------------------------------------------------------------------------------
# The CUDA kernel (only on a machine with a GPU and the extension built).


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA and vstore._cuda")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", [*CASES, "large", "unaligned"])
def test_cuda_kernel_equals_torch_and_cpu_kernels(dtype: str, case: str) -> None:
    rows, n, n_groups = CASES.get(case, (5000, 264, 7))
    acts, groups = make_block(rows, n, n_groups, dtype, seed=11 + len(case))
    dev = torch.device("cuda")
    if case == "unaligned":  # a contiguous block at an odd element offset: the kernel's scalar path
        flat = torch.empty(rows * n + 1, dtype=acts.dtype, device=dev)
        a = flat[1:].view(rows, n)
        a.copy_(acts)
    else:
        a = acts.to(dev)
    g = groups.to(dev)
    got, ref = zeros(n_groups, n, dev), zeros(n_groups, n, dev)
    for _ in range(2):  # twice: the kernel adds into what is there
        cuda_stats.update_moments(a, g, **got)
        cuda_stats.update_moments_torch(a, g, **ref)
    torch.cuda.synchronize()
    want = oracle(acts, groups, n_groups)
    want.merge(oracle(acts, groups, n_groups))
    assert_equal_stats(got, want)
    assert_equal_stats(ref, want)
