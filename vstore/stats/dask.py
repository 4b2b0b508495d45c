"""Statistics on a Dask distributed cluster: chunk row ranges (moments) or layer blocks (AUROC histograms)
mapped over workers, the partial results merged in a fixed order.

Workers open the store by its location (``Store.location``: the absolute path of a local store, or
its URL), so it must be reachable from them under the same name: a shared file system, or any
fsspec URL zarr can open (``s3://…`` with the credentials and endpoint in the workers' environment).
Counts are exact integers; sums are float64 merged in range order, so they equal the single-process
ones to float64 rounding (the chunks are summed in the same order inside each range).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ..errors import UsageError, VstoreError
from ..store import Store
from .moments import GroupStats
from .passes import reduce_moments

__all__ = ["auroc_on_dask", "dask_client", "reduce_on_dask", "reduce_slice"]


def reduce_slice(
    store_path: str, codes: np.ndarray, groups: Sequence[str], ranges: list[tuple[str, int, int]],
    backend: str = "auto", threads: int | None = None, site: str | None = None,
) -> GroupStats:
    """Statistics of some chunk row ranges of a store at ``site`` (what one Dask task computes)."""
    st = Store(store_path, mode="r", site=site)
    return reduce_moments(st, np.asarray(codes, dtype=np.int32), groups, ranges=ranges, backend=backend,
                          threads=threads)


def _auroc_task(store_path: str, codes: np.ndarray, n_groups: int, pairs: list[tuple[list[int], list[int] | None]],
                job: tuple[int, int, int], backend: str, threads: int | None, verify: bool,
                site: str | None = None) -> dict[str, Any]:
    """One histogram pass (a layer and a block of neurons) over the whole store, on a worker."""
    from .auroc import block_auroc

    st = Store(store_path, mode="r", site=site)
    return block_auroc(st, np.asarray(codes, dtype=np.int32), n_groups, pairs, job, st.chunk_ranges(),
                       backend=backend, threads=threads, verify=verify)


@contextlib.contextmanager
def dask_client(address: str) -> Iterator[Any]:
    """A ``distributed.Client`` of scheduler ``address`` (``tcp://host:8786``) or of ``local:N`` (a
    LocalCluster of N worker processes, one thread each, closed afterwards)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as e:  # pragma: no cover - a dependency
        raise VstoreError("dask needs dask.distributed (pip install 'dask[distributed]')") from e
    cluster = None
    if not address.startswith("local:"):
        try:
            client = Client(address, timeout=10)
        except (OSError, TimeoutError) as e:  # unreachable or refused: say so, without a traceback
            raise VstoreError(f"dask: cannot reach the scheduler at {address!r} within 10 s ({e})") from None
    else:
        try:
            n = int(address.split(":", 1)[1])
        except ValueError:
            raise UsageError(f"dask: expected local:N (N workers), got {address!r}", "dask") from None
        if n < 1:
            raise UsageError(f"dask: expected local:N with N >= 1, got {address!r}", "dask")
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0")
        client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def reduce_on_dask(
    address: str, store: Store, codes: np.ndarray, groups: Sequence[str], *, backend: str = "auto",
    threads: int | None = None, tasks_per_worker: int = 4,
) -> GroupStats:
    """Map chunk row ranges over a Dask cluster and merge the partial statistics.

    ``address`` is a scheduler address or ``local:N`` (see :func:`dask_client`). Partials are merged
    in range order, so the result does not depend on which task finishes first.
    """
    with dask_client(address) as client:
        ranges = store.chunk_ranges()
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        n_tasks = max(1, min(len(ranges), n_workers * tasks_per_worker))
        batches = [list(b) for b in np.array_split(np.arange(len(ranges)), n_tasks) if len(b)]
        codes_f = client.scatter(np.asarray(codes, dtype=np.int32), broadcast=True)
        futures = [client.submit(reduce_slice, store.location, codes_f, list(groups), [ranges[i] for i in b],
                                 backend, threads, store.site, pure=False) for b in batches]
        total = GroupStats.for_groups(groups, store.layers, store.n_neurons)
        for fut in futures:
            total.merge(fut.result())
        return total


def auroc_on_dask(
    address: str, store: Store, codes: np.ndarray, n_groups: int, pairs: Sequence[tuple[list[int], list[int] | None]],
    jobs: Sequence[tuple[int, int, int]], *, backend: str = "auto", threads: int | None = None, verify: bool = True,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """The histogram passes ``jobs`` ((layer position, first neuron, neurons)) as tasks on a Dask cluster;
    results in the order of ``jobs`` (see :func:`vstore.stats.auroc.block_auroc`)."""
    with dask_client(address) as client:
        codes_f = client.scatter(np.asarray(codes, dtype=np.int32), broadcast=True)
        futures = [client.submit(_auroc_task, store.location, codes_f, int(n_groups), [list(p) for p in pairs],
                                 tuple(j), backend, threads, verify, store.site, pure=False) for j in jobs]
        out = []
        for fut in futures:
            r = fut.result()
            if on_done is not None:
                on_done(r)
            out.append(r)
        return out
