"""Throughput of the moments kernel alone, on in-memory float16 blocks, per backend and thread count.

Usage::

    python tools/bench_kernels.py [--rows 4096] [--neurons 8192] [--groups 12] [--repeats 5]
                                  [--backends cpp,numba,numpy] [--json FILE]

Prints a table and, with ``--json``, writes the figures to FILE. Importable: ``run_kernel_bench``
returns the same dict (used by tools/bench_rank.py).

JSON names
----------
``config``
    ``rows``, ``neurons``, ``groups``, ``repeats``, ``dtype`` (always ``"float16"``), ``bytes`` (float16
    input bytes per call: rows * neurons * 2), ``cpu_count`` (CPUs this process may run on).
``native``
    :func:`vstore.kernels.native_info` (``built``, ``version``, ``openmp_threads``, ``f16c``, ``error``).
``results``
    One entry per (backend, threads) run: ``backend``; ``threads`` (threads used); ``best_s`` and
    ``median_s`` (seconds per call over ``repeats`` timed calls, after one untimed warm-up call that
    also compiles Numba); ``gb_per_s`` (float16 input GB/s, 1 GB = 1e9 bytes, from ``best_s``);
    ``gb_per_s_per_core`` (``gb_per_s / threads``); ``best_cpu_s`` (least process CPU time of a call,
    all threads summed) and ``gb_per_cpu_s`` (bytes per CPU-second: per-core throughput that time
    spent descheduled on a busy machine does not dilute). NumPy is the single-threaded reference: one
    entry.
``read_probe``
    Single-core read bandwidth over the same in-memory block, measured in the same run: ``native_gb_per_s``
    (``vstore._C.read_probe``: AVX2 loads XOR-reduced, one thread; absent without the extension),
    ``numpy_gb_per_s`` (``np.bitwise_xor.reduce`` over the block's 64-bit words), ``gb_per_s`` (the
    larger: the probe the kernel is held to), best of ``repeats`` after a warm-up call.
``ratios``
    ``kernel_vs_read_probe``: the C++ kernel's one-thread ``gb_per_s`` (Numba's when not built) over
    ``read_probe.gb_per_s`` (target >= 0.7); ``numba_vs_cpp``: Numba one-thread GB/s over C++ one-thread
    GB/s (target >= 0.5: within 2x).
``targets``
    GB/s of float16 per core each backend should reach on one thread: ``{"cpp": 3.0, "numba": 1.0}``,
    and the ratios' targets (``kernel_vs_read_probe``: 0.7, ``numba_vs_cpp``: 0.5).
``meets_targets``
    backend or ratio -> whether it reaches its target.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vstore import kernels
from vstore.stats import Moments

TARGETS_GB_PER_S_PER_CORE = {"cpp": 3.0, "numba": 1.0}
TARGET_RATIOS = {"kernel_vs_read_probe": 0.7, "numba_vs_cpp": 0.5}


def read_probe(block: np.ndarray, repeats: int) -> dict[str, float]:
    """Single-core read bandwidth (GB/s) over ``block``: native AVX2 loads and a NumPy reduction."""
    words = block.reshape(-1).view(np.uint64) if block.nbytes % 8 == 0 else block.reshape(-1).view(np.uint8)
    probes: dict[str, Any] = {"numpy_gb_per_s": lambda: np.bitwise_xor.reduce(words)}
    if kernels.native_available():
        from vstore import _C  # type: ignore[attr-defined]

        probes["native_gb_per_s"] = lambda: _C.read_probe(block)
    out: dict[str, float] = {}
    for name, fn in probes.items():
        fn()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        out[name] = block.nbytes / best / 1e9
    out["gb_per_s"] = max(out.values())
    return out


def _all_threads(backend: str) -> int:
    if backend == "cpp":
        return int(kernels.native_info()["openmp_threads"])
    if backend == "numba":
        import numba

        return int(numba.config.NUMBA_NUM_THREADS)
    return 1


def _time_calls(
    block: np.ndarray, groups: np.ndarray, n_groups: int, backend: str, threads: int, repeats: int
) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of each of ``repeats`` calls."""
    acc = Moments.zeros(n_groups, block.shape[1])
    # One untimed call: compiles Numba, faults the pages in, starts the thread pools.
    kernels.accumulate_moments(block, groups, acc, dtype="float16", backend=backend, threads=threads)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        kernels.accumulate_moments(block, groups, acc, dtype="float16", backend=backend, threads=threads)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def run_kernel_bench(
    rows: int = 4096,
    neurons: int = 8192,
    groups: int = 12,
    repeats: int = 5,
    backends: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Times ``accumulate_moments`` on a random float16 block with each backend.

    Parameters
    ----------
    rows, neurons, groups : int
        Block shape ``(rows, neurons)`` and number of groups (rows spread over them at random).
    repeats : int
        Timed calls per (backend, threads), after one warm-up call.
    backends : tuple of str, optional
        Backends to run (default: every available one of ``kernels.BACKENDS``).

    Returns
    -------
    dict
        The figures described in the module docstring.
    """
    if backends is None:
        backends = tuple(b for b in kernels.BACKENDS if b != "cpp" or kernels.native_available())
    rng = np.random.default_rng(0)
    block = rng.standard_normal((rows, neurons), dtype=np.float32).astype(np.float16)
    group_of_row = rng.integers(0, groups, size=rows, dtype=np.int32)
    nbytes = block.nbytes
    results = []
    for backend in backends:
        all_threads = _all_threads(backend)
        thread_counts = [1] if backend == "numpy" else sorted({1, all_threads})
        for threads in thread_counts:
            wall, cpu = _time_calls(block, group_of_row, groups, backend, threads, repeats)
            best, best_cpu = min(wall), min(cpu)
            gbps = nbytes / best / 1e9
            results.append(
                {
                    "backend": backend,
                    "threads": threads,
                    "best_s": best,
                    "median_s": statistics.median(wall),
                    "gb_per_s": gbps,
                    "gb_per_s_per_core": gbps / threads,
                    "best_cpu_s": best_cpu,
                    "gb_per_cpu_s": nbytes / best_cpu / 1e9 if best_cpu > 0 else float("nan"),
                }
            )
    probe = read_probe(block, repeats)
    meets, one = {}, {}
    for backend, target in TARGETS_GB_PER_S_PER_CORE.items():
        found = [r["gb_per_s"] for r in results if r["backend"] == backend and r["threads"] == 1]
        if found:
            one[backend] = found[0]
            meets[backend] = found[0] >= target
    ratios = {}
    if one:
        ratios["kernel_vs_read_probe"] = one.get("cpp", one.get("numba", 0.0)) / probe["gb_per_s"]
    if "cpp" in one and "numba" in one:
        ratios["numba_vs_cpp"] = one["numba"] / one["cpp"]
    for name, value in ratios.items():
        meets[name] = value >= TARGET_RATIOS[name]
    return {
        "config": {
            "rows": rows,
            "neurons": neurons,
            "groups": groups,
            "repeats": repeats,
            "dtype": "float16",
            "bytes": nbytes,
            "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        },
        "native": kernels.native_info(),
        "results": results,
        "read_probe": probe,
        "ratios": ratios,
        "targets": {**TARGETS_GB_PER_S_PER_CORE, **TARGET_RATIOS},
        "meets_targets": meets,
    }


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg = report["config"]
    table = Table(
        title=f"accumulate_moments, float16 {cfg['rows']} x {cfg['neurons']}, {cfg['groups']} groups "
        f"({cfg['bytes'] / 1e6:.0f} MB), best of {cfg['repeats']}"
    )
    # GB/s: float16 input per wall second; /core: divided by threads; GB/CPU-s: per CPU second.
    for name in ("backend", "threads", "best ms", "med ms", "GB/s", "/core", "GB/CPU-s", "target/core"):
        table.add_column(name, justify="left" if name == "backend" else "right")
    for r in report["results"]:
        target = report["targets"].get(r["backend"])
        table.add_row(
            r["backend"],
            str(r["threads"]),
            f"{r['best_s'] * 1e3:.1f}",
            f"{r['median_s'] * 1e3:.1f}",
            f"{r['gb_per_s']:.2f}",
            f"{r['gb_per_s_per_core']:.2f}",
            f"{r['gb_per_cpu_s']:.2f}",
            "-" if target is None else f"{target:.1f}",
        )
    console = Console()
    console.print(table)
    native = report["native"]
    console.print(
        f"native: built={native['built']} f16c={native['f16c']} openmp_threads={native['openmp_threads']}; "
        f"meets targets (1 thread): {report['meets_targets']}"
    )
    probe = report["read_probe"]
    console.print("read probe (1 core): " + ", ".join(f"{k} {v:.2f}" for k, v in probe.items()))
    console.print("ratios: " + ", ".join(f"{k} {v:.2f} (target {report['targets'][k]})"
                                         for k, v in report["ratios"].items()))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: parse, run, print, optionally write JSON; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--neurons", type=int, default=8192)
    parser.add_argument("--groups", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", default=None, help="comma-separated subset of cpp,numba,numpy")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    args = parser.parse_args(argv)
    backends = tuple(args.backends.split(",")) if args.backends else None
    report = run_kernel_bench(args.rows, args.neurons, args.groups, args.repeats, backends)
    _print_table(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
