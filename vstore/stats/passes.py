"""The statistics passes: one streaming pass over a store, reduced per group, cached in the store.

:func:`compute_stats` and :func:`compute_split_stats` share :func:`cached_pass`: look the grouping up
in the cache, else run the pass and cache its result. The pass itself (:func:`reduce_moments`)
reads every committed chunk once; with the C++ backend several workers each own a subset of the
layers (:func:`plan_workers`), each with its own prefetching reader.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import kernels
from ..errors import StoreError, UsageError
from ..progress import Progress, task
from ..store import ChunkReader, Store, read_cached, store_digest, write_cached
from .grouping import Grouping, make_grouping
from .halves import split_halves
from .moments import FIELDS, GroupStats
from .reading import Prefetch, tasks_for

__all__ = ["cached_pass", "compute_split_stats", "compute_stats", "cpu_count", "grouping_stats", "open_store",
           "plan_workers", "reduce_moments", "split_grouping_stats"]

Arrays = dict[str, np.ndarray]


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def plan_workers(n_layers: int, backend: str, threads: int | None, *, reader_thread: bool = True) -> tuple[int, int]:
    """(reading workers, kernel threads per call) for a pass over ``n_layers`` layers.

    With the C++ backend, each worker owns the layers ``w, w + W, ...`` and reads and reduces their
    chunks in row order (asking the OS for the next chunks ahead), so every layer is summed in the same
    order as one sequential pass: results are bit-identical whatever the worker count. Numba's
    default threading layer must not be entered from several threads, and NumPy is the reference:
    both run one worker whose kernel uses ``threads`` (default: every core, or all but one when
    ``reader_thread``: chunks that come through zarr are decoded by a reader thread beside it).
    """
    if threads is not None and not 1 <= int(threads) <= kernels.MAX_THREADS:
        raise UsageError(f"threads must be in 1..{kernels.MAX_THREADS}, got {threads}", "threads")
    explicit = threads is not None and int(threads) > 0
    cores = max(1, int(threads)) if explicit else cpu_count()  # type: ignore[arg-type]
    if kernels.resolve_backend(backend) != "cpp" or n_layers <= 1:
        return 1, cores if explicit or not reader_thread else max(1, cores - 1)
    workers = max(1, min(n_layers, cores))
    return workers, max(1, cores // workers)


def reads_in_place(store: Store) -> bool:
    """Whether a pass maps the store's chunk files in place (uncompressed, local), so no reader
    thread decodes chunks beside the kernel."""
    first = store.parts[0].name if store.parts else None
    return first is not None and store.has_acts(first) and ChunkReader(store.acts(first)).direct is not None


def open_store(store: Store | str | Path, *, write: bool) -> Store:
    """``store`` itself, or the store at that path opened ``"r+"`` when ``write`` else ``"r"``."""
    if isinstance(store, Store):
        return store
    return Store(store, mode="r+" if write else "r")


def activation_bytes(store: Store, ranges: Sequence[tuple[str, int, int]]) -> int:
    """Bytes of one layer's activations over ``ranges``."""
    if not store.parts:
        return 0
    itemsize = np.dtype(store.acts(store.parts[0].name).dtype).itemsize
    return sum(r1 - r0 for _, r0, r1 in ranges) * store.n_neurons * itemsize


def reduce_moments(
    store: Store,
    codes: npt.NDArray[np.int32],
    groups: Sequence[str],
    *,
    ranges: Sequence[tuple[str, int, int]] | None = None,
    backend: str = "auto",
    threads: int | None = None,
    progress: Progress | None = None,
    verify: bool = True,
    skip_damaged: bool = False,
) -> GroupStats:
    """One pass over ``ranges`` (default: the whole store): statistics of every layer per group.

    ``codes`` gives each example's group index (or -1); the result's ``chunks_read`` and
    ``bytes_read`` say what was read, and ``skipped`` which damaged chunks were left out
    (``skip_damaged``; otherwise a damaged chunk ends the pass with a ``StoreError``).
    """
    from concurrent.futures import ThreadPoolExecutor

    L = len(store.layers)
    ranges = store.chunk_ranges() if ranges is None else list(ranges)
    acc = GroupStats.for_groups(groups, store.layers, store.n_neurons)
    workers, per_call = plan_workers(L, backend, threads, reader_thread=not reads_in_place(store))
    stop = threading.Event()
    lock = threading.Lock()
    done = [[0, 0] for _ in range(workers)]

    with task(progress, "statistics", activation_bytes(store, ranges) * L, unit="bytes") as bar:
        def work(w: int) -> None:
            try:
                tasks = tasks_for(store, codes, ranges, range(w, L, workers))
                for t, block in Prefetch(store, tasks, verify=verify, skip_damaged=skip_damaged):
                    if stop.is_set():
                        return
                    if block is None:
                        with lock:
                            acc.skipped.append((t.part, t.layer, t.r0, t.r1))
                        continue
                    kernels.accumulate_moments(block, t.groups, acc.layer(t.layer), dtype=store.dtype,
                                               backend=backend, threads=per_call)
                    done[w][0] += 1
                    done[w][1] += block.nbytes
                    bar.advance(block.nbytes)
            except BaseException:
                stop.set()
                raise

        if workers == 1:
            work(0)
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="vstore-stats") as pool:
                for fut in [pool.submit(work, w) for w in range(workers)]:
                    fut.result()
    acc.chunks_read, acc.bytes_read = sum(d[0] for d in done), sum(d[1] for d in done)
    acc.skipped.sort()
    return acc


def cache_attrs(grouping: Grouping, spec: dict[str, Any], kind: str, store: Store) -> dict[str, Any]:
    """The attribute of a cache entry."""
    return {"kind": kind, "spec": spec, "groups": grouping.names, "base": grouping.base, "sides": grouping.sides,
            "layers": store.layers}


def cached_pass(
    store: Store, groupings: Sequence[Grouping], kind: str, compute: Callable[[], list[Arrays]], *,
    use_cache: bool, suffix: str = "", cacheable: Callable[[], bool] = lambda: True,
) -> tuple[list[Arrays], bool]:
    """The arrays of every grouping, from the cache when it holds them all, else from ``compute()``.

    Computed arrays are cached (one entry per grouping, key ``grouping.key + suffix``) when
    ``use_cache`` is set and the store is open ``"r+"``. Returns the arrays and whether they came
    from the cache. ``cacheable()`` is asked after the pass (statistics that skipped damaged chunks
    are never cached).
    """
    specs = [g.spec(store) for g in groupings]
    keys = [g.key(store) + suffix for g in groupings]
    digest = store_digest(store) if use_cache else None  # the chunks as the pass finds them, read once
    if use_cache:
        hits = [read_cached(store, k, s, kind, digest=digest) for k, s in zip(keys, specs, strict=True)]
        if all(h is not None for h in hits):
            return [h for h in hits if h is not None], True
    if not store.keeps_activations:
        raise _no_activations(store, groupings, kind)
    arrays = compute()
    if use_cache and store.mode == "r+" and cacheable():
        for g, k, s, a in zip(groupings, keys, specs, arrays, strict=True):
            write_cached(store, k, a, cache_attrs(g, s, kind, store), digest=digest)
    return arrays, False


def _no_activations(store: Store, groupings: Sequence[Grouping], kind: str) -> StoreError:
    """Why a pass cannot run on a store built ``--keep stats|pooled``, and what it can rank instead."""
    keep = store.meta.get("keep") or next((store.part_entry(p.name).get("keep") for p in store.parts
                                           if not store.has_acts(p.name)), "stats")
    what = "AUROC histograms" if kind == "auroc" else "moments"
    want = ", ".join(f"by={g.by}" + (f" where={g.where}" if g.where else "") + (" (a split half)" if g.mask_digest
                     else "") + (f" contrast={g.contrast}" if g.contrast else "") for g in groupings)
    cached = sorted(set(store.meta.get("stats_by", [])))
    have = f"its build-time statistics cover --by {', --by '.join(cached)} (no filter, contrast or split)" \
        if cached else "it holds no build-time statistics"
    return StoreError(f"{store.path} was built with --keep {keep}: it holds no token activations, and the {what} "
                      f"of {want} are not in its statistics cache; {have}. Methods and groupings beyond those "
                      "(auroc, --split-half, --where, --contrast, other columns) need a store built with "
                      "--keep all" + (" or --stats-by for that column" if kind == "moments" else "")
                      + (" (or rank its pooled rows: --rows mean|last)" if keep == "pooled" else ""))


def labelled(arrays: Mapping[str, np.ndarray], grouping: Grouping, store: Store, from_cache: bool) -> GroupStats:
    """:class:`GroupStats` of ``arrays`` labelled with ``grouping``."""
    a = {k: np.ascontiguousarray(arrays[k]) for k in FIELDS}
    return GroupStats(a["count"], a["sum"], a["sumsq"], a["npos"], a["nonfinite"], groups=list(grouping.names),
                      layers=store.layers, key=grouping.key(store), base=list(grouping.base),
                      sides=list(grouping.sides) if grouping.sides else None, spec=grouping.spec(store),
                      from_cache=from_cache)


def grouping_stats(
    st: Store, grouping: Grouping, *, backend: str = "auto", use_cache: bool = True,
    progress: Progress | None = None, threads: int | None = None, verify: bool = True, dask: str | None = None,
    skip_damaged: bool = False,
) -> GroupStats:
    """:func:`compute_stats` of a grouping already made."""
    t0 = time.perf_counter()
    read: list[GroupStats] = []

    def compute() -> list[Arrays]:
        if dask:
            from .dask import reduce_on_dask

            read.append(reduce_on_dask(dask, st, grouping.codes, grouping.names, backend=backend, threads=threads))
        else:
            read.append(reduce_moments(st, grouping.codes, grouping.names, backend=backend, threads=threads,
                                       progress=progress, verify=verify, skip_damaged=skip_damaged))
        return [read[0].arrays()]

    arrays, hit = cached_pass(st, [grouping], "moments", compute, use_cache=use_cache,
                              cacheable=lambda: not read[0].skipped)
    out = labelled(arrays[0], grouping, st, hit)
    if read:
        out.chunks_read, out.bytes_read, out.seconds = read[0].chunks_read, read[0].bytes_read, time.perf_counter() - t0
        out.skipped = read[0].skipped
    return out


def split_grouping_stats(
    st: Store, grouping: Grouping, *, seed: int = 0, backend: str = "auto", use_cache: bool = True,
    progress: Progress | None = None, threads: int | None = None, verify: bool = True, skip_damaged: bool = False,
    dask: str | None = None,
) -> tuple[GroupStats, GroupStats]:
    """:func:`compute_split_stats` of a grouping already made."""
    halves = [grouping.with_mask(st, m) for m in split_halves(st, seed=seed, by=grouping.by)]
    t0 = time.perf_counter()
    read: list[GroupStats] = []

    def compute() -> list[Arrays]:
        c0, c1 = halves[0].codes, halves[1].codes
        both = np.where(c0 >= 0, c0 * 2, np.where(c1 >= 0, c1 * 2 + 1, -1)).astype(np.int32)
        names = [f"{g}#{h}" for g in halves[0].names for h in (0, 1)]
        if dask:
            from .dask import reduce_on_dask

            read.append(reduce_on_dask(dask, st, both, names, backend=backend, threads=threads))
        else:
            read.append(reduce_moments(st, both, names, backend=backend, threads=threads, progress=progress,
                                       verify=verify, skip_damaged=skip_damaged))
        return [{k: np.ascontiguousarray(v[:, h::2]) for k, v in read[0].arrays().items()} for h in (0, 1)]

    arrays, hit = cached_pass(st, halves, "moments", compute, use_cache=use_cache,
                              cacheable=lambda: not read[0].skipped)
    out = [labelled(a, g, st, hit) for a, g in zip(arrays, halves, strict=True)]
    for s in out:
        if read:
            s.chunks_read, s.bytes_read, s.seconds = read[0].chunks_read, read[0].bytes_read, time.perf_counter() - t0
            s.skipped = read[0].skipped
    return out[0], out[1]


def compute_stats(
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
    dask: str | None = None,
    skip_damaged: bool = False,
) -> GroupStats:
    """Sufficient statistics of a grouping of a store, from its cache or from one pass.

    Parameters
    ----------
    store
        The store, or its path (then opened ``"r+"`` when ``use_cache``, so the result is cached).
    by, where, contrast, example_mask
        The grouping (see :func:`vstore.stats.grouping.make_grouping`).
    backend
        ``auto`` (the C++ extension when built), ``cpp``, ``numba`` or ``numpy``.
    use_cache
        Read the cache when it holds this grouping, and write it after a pass (stores open ``"r+"``).
    progress
        Receives a task over the bytes read.
    threads
        Kernel threads (default: all cores).
    verify
        Check the crc32c checksum of every chunk read from its file (zarr checks the others).
    dask
        ``ADDRESS`` of a Dask scheduler or ``local:N`` (a local cluster of N worker processes):
        reduce chunk ranges on the cluster and merge the partial statistics.
    skip_damaged
        Leave out chunks that cannot be read (missing, truncated, bad checksum) and list them in
        the result's ``skipped``, instead of failing; such statistics are never cached.
    """
    st = open_store(store, write=use_cache)
    grouping = make_grouping(st, by, where=where, contrast=contrast, example_mask=example_mask)
    return grouping_stats(st, grouping, backend=backend, use_cache=use_cache, progress=progress, threads=threads,
                          verify=verify, dask=dask, skip_damaged=skip_damaged)


def compute_split_stats(
    store: Store | str | Path,
    by: str | None,
    *,
    where: Mapping[str, Sequence[str] | str] | None = None,
    contrast: tuple[str, Sequence[str]] | str | None = None,
    seed: int = 0,
    backend: str = "auto",
    use_cache: bool = True,
    progress: Progress | None = None,
    threads: int | None = None,
    verify: bool = True,
    dask: str | None = None,
) -> tuple[GroupStats, GroupStats]:
    """Statistics of the two halves of :func:`vstore.stats.halves.split_halves`, in one pass (each cached).

    The parameters are those of :func:`compute_stats`. The statistics of all the data are
    ``a.merge(b)`` of the two (on a copy).
    """
    st = open_store(store, write=use_cache)
    grouping = make_grouping(st, by, where=where, contrast=contrast)
    return split_grouping_stats(st, grouping, seed=seed, backend=backend, use_cache=use_cache, progress=progress,
                                threads=threads, verify=verify, dask=dask)
