"""Exact Mann-Whitney AUROC per (layer, target, neuron) from order-preserving histograms.

AUROC needs more than moments: :func:`compute_auroc` builds a 65,536-bin histogram per (group,
neuron) over blocks of neurons (more passes, bounded memory) and turns it into the exact AUROC, ties
counted one half. float16/bfloat16 values have one bin per bit pattern; float32 values are binned at
float16 precision and the result reports its error bound.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import kernels
from ..progress import Progress, task
from ..store import Store
from .grouping import Grouping, make_grouping
from .moments import targets
from .passes import activation_bytes, cached_pass, open_store, plan_workers, reads_in_place
from .reading import Prefetch, tasks_for

__all__ = ["DEFAULT_HIST_BYTES", "HIST_BINS", "AurocResult", "auroc_from_histograms", "block_auroc", "compute_auroc",
           "grouping_auroc"]

HIST_BINS = kernels.HISTOGRAM_BINS
DEFAULT_HIST_BYTES = 256 << 20


@dataclass
class AurocResult:
    """Mann-Whitney AUROC per (layer, target, neuron) and its error bound.

    ``error`` is 0 where the AUROC is exact (float16/bfloat16 stores: one bin per bit pattern). For
    float32 stores values are binned at float16 precision; pairs that share a bin count one half,
    so the true AUROC lies within ``auroc +- error``.
    """

    targets: list[str]
    layers: list[int]
    auroc: npt.NDArray[np.float64]
    error: npt.NDArray[np.float64]
    key: str
    exact: bool
    from_cache: bool = False
    passes: int = 0
    chunks_read: int = 0
    bytes_read: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, int, int, int]] = field(default_factory=list)
    nonfinite: dict[int, int] = field(default_factory=dict)


def auroc_from_histograms(
    hist: np.ndarray, pairs: Sequence[tuple[list[int], list[int] | None]]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """AUROC (and the half-weight of within-bin pairs) of each pair from order-preserving histograms.

    Parameters
    ----------
    hist
        (G, M, B) counts per group, neuron and bin (bins in value order).
    pairs
        Per target: positive groups and negative groups (None: every other group).

    Returns
    -------
    auroc, tie_weight
        (T, M) each: P(pos > neg) + P(pos == neg) / 2, and P(same bin) / 2 (NaN without rows).
    """
    _G, M, _ = hist.shape
    T = len(pairs)
    auc = np.full((T, M), np.nan)
    ties = np.full((T, M), np.nan)
    step = max(1, (1 << 22) // hist.shape[2])  # neurons per slice: bounded temporaries
    for m0 in range(0, M, step):
        used = np.flatnonzero(hist[:, m0 : m0 + step].any(axis=(0, 1)))  # empty bins change nothing
        h = hist[:, m0 : m0 + step][:, :, used].astype(np.int64)
        total = h.sum(axis=0)
        for t, (pos, neg) in enumerate(pairs):
            hp = h[pos].sum(axis=0)
            hn = total - hp if neg is None else h[neg].sum(axis=0)
            n1, n0 = hp.sum(axis=1), hn.sum(axis=1)
            d = n1.astype(np.float64) * n0
            if float(d.max(initial=0)) < 2.0**61:  # 2U and the tie count are exact int64 sums
                below = np.cumsum(hn, axis=1) - hn
                u2 = (hp * (2 * below + hn)).sum(axis=1)
                tie = (hp * hn).sum(axis=1)
            else:  # beyond int64: float64 (relative error ~1e-16)
                hpf, hnf = hp.astype(np.float64), hn.astype(np.float64)
                below = np.cumsum(hnf, axis=1) - hnf
                u2 = (hpf * (2 * below + hnf)).sum(axis=1)
                tie = (hpf * hnf).sum(axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                # one correctly rounded division of exact integers: the nearest float64 to the AUROC
                auc[t, m0 : m0 + step] = np.where(d > 0, u2 / (2.0 * d), np.nan)
                ties[t, m0 : m0 + step] = np.where(d > 0, tie / (2.0 * d), np.nan)
    return auc, ties


def compute_auroc(
    store: Store | str | Path,
    by: str | None,
    *,
    where: Mapping[str, Sequence[str] | str] | None = None,
    contrast: tuple[str, Sequence[str]] | str | None = None,
    example_mask: np.ndarray | None = None,
    backend: str = "auto",
    use_cache: bool = True,
    progress: Progress | None = None,
    threads: int | None = None,
    verify: bool = True,
    memory: int = DEFAULT_HIST_BYTES,
    skip_damaged: bool = False,
    dask: str | None = None,
) -> AurocResult:
    """Exact Mann-Whitney AUROC of every target (group vs rest, or the two sides of a contrast).

    Each pass histograms a block of neurons of one layer (``memory`` bytes of uint32 counts at most:
    ``groups x neurons x 65,536 x 4``), so a layer takes ``ceil(N / block)`` passes over its chunks.
    The store (or path) and the other parameters are those of :func:`vstore.stats.compute_stats`
    (``dask``: one task per layer and block of neurons on the cluster).
    """
    st = open_store(store, write=use_cache)
    grouping = make_grouping(st, by, where=where, contrast=contrast, example_mask=example_mask)
    return grouping_auroc(st, grouping, backend=backend, use_cache=use_cache, progress=progress, threads=threads,
                          verify=verify, memory=memory, skip_damaged=skip_damaged, dask=dask)


def grouping_auroc(
    st: Store, grouping: Grouping, *, backend: str = "auto", use_cache: bool = True, progress: Progress | None = None,
    threads: int | None = None, verify: bool = True, memory: int = DEFAULT_HIST_BYTES, skip_damaged: bool = False,
    dask: str | None = None,
) -> AurocResult:
    """:func:`compute_auroc` of a grouping already made."""
    tg = targets(grouping.base, grouping.sides)
    names = [t[0] for t in tg]
    counters = {"passes": 0, "chunks": 0, "bytes": 0}
    skipped: set[tuple[str, int, int, int]] = set()

    def compute() -> list[dict[str, np.ndarray]]:
        return [_histogram_passes(st, grouping.codes, len(grouping.names), tg, counters, backend=backend,
                                  threads=threads, progress=progress, verify=verify, memory=memory,
                                  skipped=skipped if skip_damaged else None, dask=dask)]

    arrays, hit = cached_pass(st, [grouping], "auroc", compute, use_cache=use_cache, suffix=".auroc",
                              cacheable=lambda: not skipped)
    a = arrays[0]
    rows = {t: int(a["rows"][i]) for i, t in enumerate(names)} if "rows" in a else {}
    nonfinite = {lyr: int(n) for lyr, n in zip(st.layers, a.get("nonfinite", []), strict=False) if n}
    return AurocResult(names, st.layers, a["auroc"], a["error"], grouping.key(st) + ".auroc",
                       st.dtype in ("float16", "bfloat16"), from_cache=hit, passes=counters["passes"],
                       chunks_read=counters["chunks"], bytes_read=counters["bytes"], rows=rows, skipped=sorted(skipped),
                       nonfinite=nonfinite)


def _histogram_passes(
    st: Store, codes: np.ndarray, n_groups: int, tg: list[tuple[str, list[int], list[int] | None]],
    counters: dict[str, int], *, backend: str, threads: int | None, progress: Progress | None, verify: bool,
    memory: int, skipped: set[tuple[str, int, int, int]] | None = None, dask: str | None = None,
) -> dict[str, np.ndarray]:
    """AUROC, error bound, rows per target and NaN/Inf values per layer, one histogram pass per block of
    neurons of each layer (a value missing from its neuron's histogram was non-finite). With ``dask``,
    each (layer, block of neurons) is one task on the cluster; the histograms are integer counts, so the
    result is the same bits whatever runs it."""
    L, N, G = len(st.layers), st.n_neurons, n_groups
    block = max(1, min(N, int(memory) // max(1, G * HIST_BINS * 4)))
    auc = np.full((L, len(tg), N), np.nan)
    err = np.zeros((L, len(tg), N))
    ranges = st.chunk_ranges()
    group_rows = np.zeros(G, dtype=np.int64)  # rows per group (the same in every layer)
    nonfinite = np.zeros(L, dtype=np.int64)
    pairs = [(p, n) for _, p, n in tg]
    exact = st.dtype in ("float16", "bfloat16")
    jobs = [(li, n0, min(block, N - n0)) for li in range(L) for n0 in range(0, N, block)]
    total = activation_bytes(st, ranges) * L * ((N + block - 1) // block)
    with task(progress, "auroc", total, unit="bytes") as bar:
        results: Iterable[dict[str, Any]]
        if dask:
            from .dask import auroc_on_dask

            results = auroc_on_dask(dask, st, codes, G, pairs, jobs, backend=backend, threads=threads, verify=verify,
                                    on_done=lambda r: bar.advance(r["bytes"]))
        else:
            hist = np.zeros((G, block, HIST_BINS), dtype=np.uint32)
            results = (block_auroc(st, codes, G, pairs, j, ranges, backend=backend, threads=threads, verify=verify,
                                   skip_damaged=skipped is not None, hist=hist, on_block=bar.advance) for j in jobs)
        for (li, n0, m), r in zip(jobs, results, strict=True):
            counters["passes"] += 1
            counters["chunks"] += r["chunks"]
            counters["bytes"] += r["bytes"]
            if skipped is not None:
                skipped.update(r["skipped"])
            if li == 0 and n0 == 0:
                group_rows = r["group_rows"]
            auc[li, :, n0 : n0 + m] = r["auc"]
            nonfinite[li] += int((group_rows[:, None] - r["hist_rows"]).sum())
            if not exact:
                err[li, :, n0 : n0 + m] = r["ties"]
    target_rows = np.array([group_rows[p].sum() + (group_rows[n].sum() if n else 0) for _, p, n in tg], dtype=np.int64)
    return {"auroc": auc, "error": err, "rows": target_rows, "nonfinite": nonfinite}


def block_auroc(
    st: Store, codes: np.ndarray, n_groups: int, pairs: Sequence[tuple[list[int], list[int] | None]],
    job: tuple[int, int, int], ranges: Sequence[tuple[str, int, int]], *, backend: str, threads: int | None,
    verify: bool, skip_damaged: bool = False, hist: np.ndarray | None = None, on_block: Any = None,
) -> dict[str, Any]:
    """One histogram pass: neurons ``n0:n0+m`` of layer position ``li`` (``job``) over ``ranges``.

    Returns the AUROC and tie weight of every pair ``(T, m)``, the rows per group, the histogram's rows
    per (group, neuron) (the rest were non-finite), and what was read and skipped.
    """
    li, n0, m = job
    G = n_groups
    _, per_call = plan_workers(1, backend, threads, reader_thread=not reads_in_place(st))
    h = hist if hist is not None and hist.shape[1] == m else np.zeros((G, m, HIST_BINS), dtype=np.uint32)
    h[...] = 0
    group_rows = np.zeros(G, dtype=np.int64)
    out: dict[str, Any] = {"chunks": 0, "bytes": 0, "skipped": []}
    for t, blk in Prefetch(st, tasks_for(st, codes, ranges, [li]), verify=verify, skip_damaged=skip_damaged):
        if blk is None:
            out["skipped"].append((t.part, t.layer, t.r0, t.r1))
            continue
        kernels.accumulate_histogram(blk, t.groups, h, dtype=st.dtype, neuron_start=n0, backend=backend,
                                     threads=per_call)
        group_rows += np.bincount(t.groups[t.groups >= 0], minlength=G)
        out["chunks"] += 1
        out["bytes"] += blk.nbytes
        if on_block is not None:
            on_block(blk.nbytes)
    out["auc"], out["ties"] = auroc_from_histograms(h, pairs)
    out["group_rows"] = group_rows
    out["hist_rows"] = h.sum(axis=-1, dtype=np.int64)
    return out
