"""Statistics on a Dask distributed cluster: chunk row ranges mapped over workers, partials merged.

Workers open the store by its path, so it must be reachable from them under the same path (a
shared file system, or any fsspec URL zarr can open).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import UsageError, VstoreError
from ..store import Store
from .moments import GroupStats
from .passes import reduce_moments

__all__ = ["reduce_on_dask", "reduce_slice"]


def reduce_slice(
    store_path: str, codes: np.ndarray, groups: Sequence[str], ranges: list[tuple[str, int, int]],
    backend: str = "auto", threads: int | None = None, site: str | None = None,
) -> GroupStats:
    """Statistics of some chunk row ranges of a store at ``site`` (what one Dask task computes)."""
    st = Store(store_path, mode="r", site=site)
    return reduce_moments(st, np.asarray(codes, dtype=np.int32), groups, ranges=ranges, backend=backend,
                          threads=threads)


def _client(address: str) -> tuple[object, object | None]:
    try:
        from distributed import Client, LocalCluster
    except ImportError as e:  # pragma: no cover - optional dependency
        raise VstoreError("dask needs dask.distributed (pip install 'dask[distributed]')") from e
    if not address.startswith("local:"):
        try:
            return Client(address, timeout=10), None
        except (OSError, TimeoutError) as e:  # unreachable or refused: say so, without a traceback
            raise VstoreError(f"dask: cannot reach the scheduler at {address!r} within 10 s ({e})") from None
    try:
        n = int(address.split(":", 1)[1])
    except ValueError:
        raise UsageError(f"dask: expected local:N (N workers), got {address!r}", "dask") from None
    if n < 1:
        raise UsageError(f"dask: expected local:N with N >= 1, got {address!r}", "dask")
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(cluster), cluster


def reduce_on_dask(
    address: str, store: Store, codes: np.ndarray, groups: Sequence[str], *, backend: str = "auto",
    threads: int | None = None, tasks_per_worker: int = 4,
) -> GroupStats:
    """Map chunk row ranges over a Dask cluster and merge the partial statistics.

    ``address`` is a scheduler address (``tcp://host:8786``) or ``local:N`` (a LocalCluster of N
    worker processes, one thread each, closed afterwards). Partials are merged in range order, so
    the result does not depend on which task finishes first.
    """
    client, cluster = _client(address)
    try:
        ranges = store.chunk_ranges()
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))  # type: ignore[attr-defined]
        n_tasks = max(1, min(len(ranges), n_workers * tasks_per_worker))
        batches = [list(b) for b in np.array_split(np.arange(len(ranges)), n_tasks) if len(b)]
        codes_f = client.scatter(np.asarray(codes, dtype=np.int32), broadcast=True)  # type: ignore[attr-defined]
        futures = [client.submit(reduce_slice, str(store.path.resolve()), codes_f, list(groups),  # type: ignore[attr-defined]
                                 [ranges[i] for i in b], backend, threads, store.site, pure=False) for b in batches]
        total = GroupStats.for_groups(groups, store.layers, store.n_neurons)
        for fut in futures:
            total.merge(fut.result())
        return total
    finally:
        client.close()  # type: ignore[attr-defined]
        if cluster is not None:
            cluster.close()  # type: ignore[attr-defined]
