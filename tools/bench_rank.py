"""Throughput of `vstore rank` on a synthetic store, against the I/O floor and what users reach for.

Usage::

    python tools/bench_rank.py [--store DIR] [--size 1.6GB] [--layers 8] [--neurons 4096] [--groups 12]
                               [--rows 64] [--repeats 2] [--skip xarray,numpy-backend,disk,...]
                               [--threads N] [--json FILE]

One run measures, on the same uncompressed float16 store (written by tools/make_synthetic_store.py
when ``--store`` does not hold one of the requested shape):

* ``raw``: sequential read of every activation chunk file (8 MiB ``readinto``), page-cached: the I/O floor;
* ``rank_<backend>``: ``rank_store(..., method="welch-t", use_cache=False)`` end to end, per backend
  (``cpp``, ``numba``, ``numpy``), checksums verified; ``cpp_noverify``: the same with ``verify=False``;
* ``numpy_loop``: a plain NumPy chunk loop through zarr (per chunk: float32, per-group sum, sum of
  squares and count > 0) -- what one writes by hand;
* ``xarray``: ``xr.open_zarr`` + dask (+ flox) ``groupby(value).mean()`` and ``.var()`` computed together;
* ``kernel``: the moments kernel alone on in-memory blocks, per backend and core
  (``tools/bench_kernels.run_kernel_bench``);
* ``disk``: after evicting the chunk files from the page cache (``posix_fadvise(DONTNEED)``), the raw
  read again (the disk's sequential speed through the page cache: the baseline of the pinned ratio),
  a direct read (``disk_direct``: each file with ``O_DIRECT`` into one reused buffer of huge pages,
  one after another: the device's own speed in large requests, the way `rank` reads a chunk that is
  not cached), and `rank` in a child process (its peak RSS), evicting before each; the three
  alternate ``--repeats`` times and each keeps its best.

Every figure is activation bytes of the store / seconds (GB = 1e9 bytes); best of ``--repeats``.

JSON names (``--json FILE``)
----------------------------
``config``: store path, ``bytes`` (activation bytes), layers, neurons, groups, rows, dtype, ``cpu_count``,
``native`` (kernels.native_info()), ``threads`` (None: all).
``results``: name -> {``seconds``, ``gb_per_s``} for ``raw``, ``rank_cpp``, ``cpp_noverify``, ``rank_numba``,
``rank_numpy``, ``numpy_loop``, ``xarray``, ``disk_raw``, ``disk_direct``, ``disk_rank`` (the latter also
``peak_rss_bytes``); a skipped or failed step is absent (failures in ``errors``).
``kernel``: the dict of ``run_kernel_bench`` (see tools/bench_kernels.py).
``ratios``: ``rank_vs_raw`` (best ``rank_*`` backend, checksums verified / raw), ``rank_vs_numpy_loop``, ``rank_vs_xarray``,
``disk_rank_vs_disk_raw``, ``disk_rank_vs_disk_direct`` (no target: how close `rank` comes to the device); and the pinned keys of issue 12: ``rank_vs_raw_cached`` (= ``rank_vs_raw``:
page-cached, all cores) and ``rank_vs_raw_disk`` (= ``disk_rank_vs_disk_raw``: after eviction).
``targets``: the issue's targets, and ``meets``: name -> bool for those measured:
``kernel_cpp_per_core`` >= 3 GB/s, ``kernel_numba_per_core`` >= 1 GB/s, ``rank_vs_raw`` >= 0.6,
``rank_vs_numpy_loop`` >= 4, ``rank_vs_xarray`` >= 20, ``disk_rank_vs_disk_raw`` >= 0.9,
``disk_rank_peak_rss`` < 2 GB.
``errors``: step -> message.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_kernels import run_kernel_bench  # noqa: E402
from make_synthetic_store import _parse_size, make_synthetic_store  # noqa: E402

from vstore import kernels  # noqa: E402
from vstore.store import ITEMSIZE, Store, is_store  # noqa: E402

TARGETS = {
    "kernel_cpp_per_core": 3.0, "kernel_numba_per_core": 1.0, "rank_vs_raw": 0.6, "rank_vs_numpy_loop": 4.0,
    "rank_vs_xarray": 20.0, "disk_rank_vs_disk_raw": 0.9, "disk_rank_peak_rss": 2e9,
    "rank_vs_raw_cached": 0.5, "rank_vs_raw_disk": 0.95,
}


def chunk_files(store: Path) -> list[Path]:
    """Every activation chunk file of a store, in part / layer / row order."""
    out = []
    for part in sorted((store / "parts").iterdir()):
        c = part / "acts" / "c"
        if c.is_dir():
            out.extend(sorted((p for p in c.rglob("*") if p.is_file()),
                              key=lambda p: tuple(int(x) for x in p.relative_to(c).parts)))
    return out


def raw_read(files: list[Path]) -> float:
    """Seconds to read every file sequentially (8 MiB readinto into one reused buffer)."""
    buf = bytearray(8 << 20)
    mv = memoryview(buf)
    t = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(mv):
                pass
    return time.perf_counter() - t


def direct_read(files: list[Path]) -> float:
    """Seconds to read every file with ``O_DIRECT`` into one reused, huge-page-aligned buffer."""
    from vstore.store._chunks import DIRECT_ALIGN, aligned_zeros

    size = max(f.stat().st_size for f in files)
    buf = aligned_zeros((-(-size // DIRECT_ALIGN) * DIRECT_ALIGN,), np.uint8)
    buf[:] = 0  # fault the pages in before the clock starts
    mv = memoryview(buf.data)
    t = time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
        try:
            done = 0
            while n := os.preadv(fd, [mv[done:]], done):
                done += n
        finally:
            os.close(fd)
    return time.perf_counter() - t


def evict(files: list[Path]) -> None:
    """Drop the files from the page cache (posix_fadvise DONTNEED)."""
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def numpy_loop(store: Path) -> None:
    """The hand-written route: zarr slices, float32, per-group sums with NumPy."""
    st = Store(store)
    codes, cats = st.labels("value")
    G, N = len(cats), st.n_neurons
    for p in st.parts:
        arr = st.acts(p.name)
        ex = st.rows(p.name, "example")
        grp = codes[ex]
        step = arr.chunks[1]
        s = np.zeros((len(st.layers), G, N))
        q = np.zeros_like(s)
        c = np.zeros((len(st.layers), G, N), np.int64)
        for li in range(len(st.layers)):
            for r0 in range(0, p.committed_rows, step):
                x = np.asarray(arr[li, r0 : r0 + step]).astype(np.float32)
                g = grp[r0 : r0 + step]
                for gi in range(G):
                    xs = x[g == gi]
                    s[li, gi] += xs.sum(axis=0, dtype=np.float64)
                    q[li, gi] += (xs.astype(np.float64) ** 2).sum(axis=0)
                    c[li, gi] += (xs > 0).sum(axis=0)


def xarray_route(store: Path) -> None:
    """xarray + dask (+ flox): groupby(value).mean() and .var() on the acts of every part."""
    import dask
    import xarray as xr
    import zarr

    g = zarr.open_group(str(store), mode="r")
    codes = np.asarray(g["examples/value"][:])
    cats = list(g["examples/value"].attrs["categories"])
    outs = []
    for part in sorted(g["parts"].group_keys()):
        ds = xr.open_zarr(str(store), group=f"parts/{part}", consolidated=False)
        ex = np.asarray(g[f"parts/{part}/rows/example"][:])
        acts = ds["acts"].assign_coords(value=("row", np.asarray(cats, dtype=object)[codes[ex]].astype(str)))
        gb = acts.groupby("value")
        outs += [gb.mean(), gb.var()]
    dask.compute(*outs)


def rank_once(store: Path, backend: str, threads: int | None, verify: bool = True) -> float:
    from vstore.rank import rank_store

    t = time.perf_counter()
    rank_store(store, "value", "welch-t", backend=backend, use_cache=False, top_k=10, threads=threads, verify=verify)
    return time.perf_counter() - t


def best_of(fn: Any, repeats: int) -> float:
    return min(fn() for _ in range(max(1, repeats)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default="/tmp/vstore-bench-rank")
    p.add_argument("--size", default="1.6GB")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--neurons", type=int, default=4096)
    p.add_argument("--groups", type=int, default=12)
    p.add_argument("--rows", type=int, default=64, help="rows per example")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    p.add_argument("--skip", default="", help="comma-separated steps to skip: raw,cpp,numba,numpy-backend,"
                   "numpy-loop,xarray,kernel,disk")
    p.add_argument("--json", default=None, help="write the figures here")
    a = p.parse_args(argv)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    store = Path(a.store)
    want = {"layers": a.layers, "neurons": a.neurons, "groups": a.groups, "size": a.size, "rows": a.rows}
    stamp = store / "bench.json"
    if not (is_store(store) and stamp.exists() and json.loads(stamp.read_text()) == want):
        n_ex = max(1, _parse_size(a.size) // (a.rows * a.layers * a.neurons * ITEMSIZE["float16"]))
        print(f"writing a {a.size} synthetic store at {store} ...", flush=True)
        make_synthetic_store(store, a.layers, a.neurons, n_ex, a.rows, a.groups, 3, 1.0, "float16", 0, overwrite=True)
        stamp.write_text(json.dumps(want))
    st = Store(store)
    nbytes = st.n_rows * len(st.layers) * st.n_neurons * ITEMSIZE[st.dtype]
    files = chunk_files(store)
    report: dict[str, Any] = {
        "config": {"store": str(store), "bytes": nbytes, "layers": len(st.layers), "neurons": st.n_neurons,
                   "groups": a.groups, "rows": st.n_rows, "dtype": st.dtype, "cpu_count": os.cpu_count(),
                   "native": kernels.native_info(), "threads": a.threads},
        "results": {}, "errors": {},
    }
    res = report["results"]

    def record(name: str, seconds: float, **extra: Any) -> None:
        res[name] = {"seconds": seconds, "gb_per_s": nbytes / seconds / 1e9, **extra}
        print(f"{name:>14}: {nbytes / seconds / 1e9:7.3f} GB/s  ({seconds:.2f} s)", flush=True)

    def step(name: str, fn: Any) -> None:
        try:
            fn()
        except Exception as e:  # a missing optional package must not end the run
            report["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"{name:>14}: failed: {e}", flush=True)

    raw_read(files)  # warm the page cache
    if "raw" not in skip:
        step("raw", lambda: record("raw", best_of(lambda: raw_read(files), a.repeats + 1)))
    for b in ("cpp", "numba", "numpy"):
        key = "numpy-backend" if b == "numpy" else b
        if key in skip or (b == "cpp" and not kernels.native_available()):
            continue
        reps = 1 if b == "numpy" else a.repeats
        if b == "numba":
            rank_once(store, b, a.threads)  # compile
        step(f"rank_{b}", lambda b=b, reps=reps: record(f"rank_{b}", best_of(lambda: rank_once(store, b, a.threads), reps)))
        if b == "cpp":
            step("cpp_noverify", lambda: record("cpp_noverify", best_of(
                lambda: rank_once(store, "cpp", a.threads, verify=False), a.repeats)))
    if "numpy-loop" not in skip:
        step("numpy_loop", lambda: record("numpy_loop", best_of(lambda: _timed(numpy_loop, store), 1)))
    if "xarray" not in skip:
        step("xarray", lambda: record("xarray", best_of(lambda: _timed(xarray_route, store), 1)))
    if "kernel" not in skip:
        def kern() -> None:
            report["kernel"] = run_kernel_bench(rows=4096, neurons=8192, groups=a.groups, repeats=5)
            for r in report["kernel"]["results"]:
                print(f"   kernel {r['backend']:>5} x{r['threads']:<2}: {r['gb_per_s']:7.3f} GB/s "
                      f"({r['gb_per_s_per_core']:.3f} per core)", flush=True)
        step("kernel", kern)
    if "disk" not in skip:
        def disk() -> None:
            # imports first (not timed); VmHWM, not ru_maxrss, which keeps the forking parent's peak
            code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import zarr, scipy.special; "
                    "import vstore.kernels, vstore.stats, vstore.scoring; from vstore.rank import rank_store; "
                    "t = time.perf_counter(); rank_store(sys.argv[2], 'value', 'welch-t', use_cache=False, top_k=10); "
                    "dt = time.perf_counter() - t; "
                    "hwm = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024; print(dt, hwm)")
            raws, directs, ranks = [], [], []
            for _ in range(max(1, a.repeats)):  # alternated: a virtual disk's speed drifts from minute to minute
                evict(files)
                raws.append(raw_read(files))
                if hasattr(os, "O_DIRECT"):
                    evict(files)
                    try:
                        directs.append(direct_read(files))
                    except OSError as e:  # a file system that refuses O_DIRECT
                        report["errors"]["disk_direct"] = f"{type(e).__name__}: {e}"
                evict(files)
                out = subprocess.run([sys.executable, "-c", code, str(ROOT), str(store)], check=True,
                                     capture_output=True, text=True).stdout.split()
                ranks.append((float(out[0]), int(out[1])))
            record("disk_raw", min(raws))
            if directs:
                record("disk_direct", min(directs))
            best = min(ranks)
            record("disk_rank", best[0], peak_rss_bytes=max(r[1] for r in ranks))
        step("disk", disk)

    def gbps(name: str) -> float | None:
        return res[name]["gb_per_s"] if name in res else None

    ranks = [v["gb_per_s"] for k, v in res.items() if k.startswith("rank_")]
    best = max(ranks) if ranks else None
    ratios: dict[str, float] = {}
    for name, base in (("rank_vs_raw", "raw"), ("rank_vs_numpy_loop", "numpy_loop"), ("rank_vs_xarray", "xarray")):
        if best is not None and gbps(base):
            ratios[name] = best / gbps(base)  # type: ignore[operator]
    if gbps("disk_rank") and gbps("disk_raw"):
        ratios["disk_rank_vs_disk_raw"] = gbps("disk_rank") / gbps("disk_raw")  # type: ignore[operator]
    if gbps("disk_rank") and gbps("disk_direct"):
        ratios["disk_rank_vs_disk_direct"] = gbps("disk_rank") / gbps("disk_direct")  # type: ignore[operator]
    # The pinned names of issue 12 (later runs compare these).
    if "rank_vs_raw" in ratios:
        ratios["rank_vs_raw_cached"] = ratios["rank_vs_raw"]
    if "disk_rank_vs_disk_raw" in ratios:
        ratios["rank_vs_raw_disk"] = ratios["disk_rank_vs_disk_raw"]
    report["ratios"] = ratios
    meets: dict[str, bool] = {k: v >= TARGETS[k] for k, v in ratios.items() if k in TARGETS}
    for r in report.get("kernel", {}).get("results", []):
        if r["threads"] == 1 and r["backend"] in ("cpp", "numba"):
            meets[f"kernel_{r['backend']}_per_core"] = r["gb_per_s"] >= TARGETS[f"kernel_{r['backend']}_per_core"]
    if "disk_rank" in res:
        meets["disk_rank_peak_rss"] = res["disk_rank"]["peak_rss_bytes"] < TARGETS["disk_rank_peak_rss"]
    report["targets"], report["meets"] = TARGETS, meets
    for k, v in ratios.items():
        print(f"{k:>24}: {v:8.2f}  " + (f"(target {TARGETS[k]})" if k in TARGETS else "(no target)"), flush=True)
    print("meets: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in meets.items()), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 0


def _timed(fn: Any, *args: Any) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


if __name__ == "__main__":
    sys.exit(main())
