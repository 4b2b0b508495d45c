"""Statistics while building: the moments of every ``--stats-by`` grouping, accumulated on the device.

The build hands each batch of rows, as cast to the store's dtype, to :meth:`LiveStats.batch`, which
reduces it per group with PyTorch ops on whatever device the rows are on (through the optional
``vstore.cuda_stats`` kernel on a GPU when it is built) and returns the batch's statistics on the
host. The writer folds them into the part's running statistics when the batch's examples commit and
saves those beside the part (``parts/NNNN/live/``, before the counters advance), so a killed build
resumes with them. When the store is complete, :func:`write_build_stats` merges the parts into the
statistics cache exactly as a ``vstore rank`` pass would write it: ranking that grouping afterwards
reads no activation.

Semantics are those of :class:`vstore.stats.moments.Moments`: ``count`` counts every row of a group,
``sum``/``sumsq``/``npos`` its finite values, ``nonfinite`` the NaN/Inf values per neuron.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import StoreError
from ..store import Store, write_cached
from .grouping import Grouping, make_grouping
from .moments import FIELDS, GroupStats
from .passes import cache_attrs, reduce_moments

__all__ = ["LiveStats", "accumulate_torch", "write_build_stats"]

LIVE_ATTR = "vstore_live"


def _cuda_kernel() -> Any:
    """The optional ``vstore.cuda_stats`` module when it is built and a GPU is usable, else None."""
    try:
        import importlib

        mod: Any = importlib.import_module("vstore.cuda_stats")  # optional, built with the CUDA kernel
        return mod if mod.available() else None
    except ImportError:
        return None


def _columns(x: Any) -> tuple[Any, bool]:
    """``[x, x^2, x > 0 (, NaN/Inf)]`` stacked ``(k, rows, N)`` in float64, NaN/Inf as 0 (and whether any was
    met)."""
    import torch

    R, N = x.shape
    out = torch.empty((4, R, N), dtype=torch.float64, device=x.device)
    v = out[0]
    v.copy_(x)  # the stored values, exactly, in float64 (half-precision math is slow on CPUs)
    any_nonfinite = not bool(torch.isfinite(v.sum()))  # one reduction: NaN/Inf propagate, float64 cannot overflow
    if any_nonfinite:
        finite = torch.isfinite(v)
        out[3].copy_(~finite)
        v.masked_fill_(~finite, 0.0)
    torch.mul(v, v, out=out[1])
    torch.gt(v, 0, out=out[2])
    return (out if any_nonfinite else out[:3]), any_nonfinite


def _add_columns(cols: Any, nonfinite_col: bool, groups: Any, count: Any, sum_: Any, sumsq: Any, npos: Any,
                 nonfinite: Any) -> None:
    """Add the rows of ``cols`` (see :func:`_columns`) to their groups' accumulators (one ``index_add``)."""
    import torch

    keep = groups >= 0
    if not bool(keep.all()):
        cols, groups = cols[:, keep], groups[keep]
    if groups.numel() == 0:
        return
    g = groups.to(torch.int64)
    part = torch.zeros((cols.shape[0], count.shape[0], cols.shape[2]), dtype=torch.float64, device=cols.device)
    part.index_add_(1, g, cols)
    count += torch.bincount(g, minlength=count.shape[0])
    sum_ += part[0]
    sumsq += part[1]
    npos += part[2].to(torch.int64)  # counts in float64: exact below 2**53 rows
    if nonfinite_col:
        nonfinite += part[3].to(torch.int64)


def accumulate_torch(x: Any, groups: Any, count: Any, sum_: Any, sumsq: Any, npos: Any, nonfinite: Any) -> None:
    """Add the per-group moments of rows ``x`` ``(rows, N)`` (any float dtype) to torch accumulators.

    ``groups`` is ``(rows,)`` integer, -1 = no group; ``count`` is int64 ``(G,)``; ``sum``/``sumsq``
    float64 and ``npos``/``nonfinite`` int64 ``(G, N)``, on the device of ``x``. On CUDA the
    ``vstore.cuda_stats`` kernel is used when it is importable and available.
    """
    import torch

    kernel = _cuda_kernel() if x.is_cuda else None
    if kernel is not None:
        kernel.update_moments(x.contiguous(), groups.to(torch.int32).contiguous(), count, sum_, sumsq, npos,
                              nonfinite)
        return
    if x.shape[0] == 0:
        return
    cols, nf = _columns(x)
    _add_columns(cols, nf, groups, count, sum_, sumsq, npos, nonfinite)


def _safe(by: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", by)


def _snapshots(store: Store, part: str, b: str) -> dict[int, Any]:
    """Complete saved statistics of part ``part`` by column ``b``, by their committed examples."""
    root: Any = store.group
    base = f"parts/{part}/live"
    if base not in root:
        return {}
    out = {}
    for name in root[base].group_keys():
        g = root[f"{base}/{name}"]
        a = dict(g.attrs.get(LIVE_ATTR, {}))
        if a.get("complete") and a.get("by") == b:
            out[int(a["examples"])] = g
    return out


class LiveStats:
    """The build-time statistics of one part, for each ``--stats-by`` column.

    Parameters
    ----------
    store
        The store (open ``"r+"``), with this part's examples already added.
    part
        The part being written.
    by
        Label columns to group by.
    device
        Where the rows of :meth:`batch` are (``cpu``, ``cuda``, ...).
    """

    def __init__(self, store: Store, part: str, by: Sequence[str], device: str = "cpu") -> None:
        import torch

        self.store, self.part, self.device = store, part, device
        self.groupings: dict[str, Grouping] = {b: make_grouping(store, b) for b in by}
        self.codes = {b: torch.from_numpy(np.asarray(g.codes, dtype=np.int64)).to(device)
                      for b, g in self.groupings.items()}
        self.L, self.N = len(store.layers), store.n_neurons
        self.committed = {b: self._load(b) for b in self.groupings}

    def _zeros(self, b: str) -> dict[str, np.ndarray]:
        return GroupStats.for_groups(self.groupings[b].names, self.store.layers, self.N).arrays()

    def _load(self, b: str) -> dict[str, np.ndarray]:
        """The statistics of the committed examples (a resumed build), or zeros."""
        done = self.store.part_info(self.part).committed_examples
        if done == 0:
            return self._zeros(b)
        snap = _snapshots(self.store, self.part, b).get(done)
        names = self.groupings[b].names
        if snap is not None and list(snap.attrs[LIVE_ATTR].get("groups", [])) == names:
            return {k: np.asarray(snap[k][...]) for k in FIELDS}
        if not self.store.has_acts(self.part):
            raise StoreError(f"{self.store.path}: part {self.part} has no saved statistics of its {done} committed "
                             f"example(s) by {b!r} and keeps no activations; rebuild it (overwrite)")
        ranges = [r for r in self.store.chunk_ranges() if r[0] == self.part]
        return reduce_moments(self.store, self.groupings[b].codes, names, ranges=ranges).arrays()

    def batch(self, acts: Any, example: Any) -> dict[str, dict[str, Any]]:
        """The statistics of one batch: ``acts`` ``(L, rows, N)`` as stored, ``example`` the global example
        index of each row; returned per column as host tensors (copied without blocking on CUDA: wait on
        an event recorded after this call before reading them)."""
        import torch

        on_cuda = str(self.device).startswith("cuda")
        view = acts.view(torch.bfloat16) if acts.dtype == torch.int16 else acts
        kernel = _cuda_kernel() if view.is_cuda else None
        dev: dict[str, dict[str, Any]] = {}
        rows = {}
        for b, g in self.groupings.items():
            G, shape = len(g.names), (self.L, len(g.names), self.N)
            dev[b] = {"count": torch.zeros((self.L, G), dtype=torch.int64, device=acts.device),
                      "sum": torch.zeros(shape, dtype=torch.float64, device=acts.device),
                      "sumsq": torch.zeros(shape, dtype=torch.float64, device=acts.device),
                      "npos": torch.zeros(shape, dtype=torch.int64, device=acts.device),
                      "nonfinite": torch.zeros(shape, dtype=torch.int64, device=acts.device)}
            rows[b] = self.codes[b][example]
        for li in range(self.L):
            if kernel is not None:
                for b in self.groupings:
                    accumulate_torch(view[li], rows[b], *(dev[b][k][li] for k in FIELDS))
                continue
            if view.shape[1] == 0:
                continue
            cols, nf = _columns(view[li])  # once per layer, whatever the number of groupings
            for b in self.groupings:
                _add_columns(cols, nf, rows[b], *(dev[b][k][li] for k in FIELDS))
        if not on_cuda:
            return dev
        out: dict[str, dict[str, Any]] = {}
        for b, arrays in dev.items():
            out[b] = {}
            for k, t in arrays.items():
                h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                h.copy_(t, non_blocking=True)
                out[b][k] = h
        return out

    def on_commit(self, payloads: list[Any], examples: int) -> None:
        """Fold the batches about to be committed into the part's statistics and save them (the writer's
        ``on_commit``: before the counters advance to ``examples``)."""
        for p in payloads:
            if p is None:
                continue
            for b, arrays in p.items():
                for k in FIELDS:
                    self.committed[b][k] += arrays[k].numpy()
        previous = self.store.part_info(self.part).committed_examples
        for b in self.groupings:
            self._save(b, examples)
            self._drop_older(b, previous)

    def _save(self, b: str, examples: int) -> None:
        root: Any = self.store.group
        name = f"{_safe(b)}-e{examples}"
        live = root.require_group(f"parts/{self.part}/live")
        if name in set(live.group_keys()):
            del live[name]
        g = live.create_group(name)
        for k, a in self.committed[b].items():
            z = g.create_array(k, shape=a.shape, dtype=a.dtype, chunks=tuple(max(1, d) for d in a.shape),
                               fill_value=0)
            if a.size:
                z[...] = a
        g.attrs.update({LIVE_ATTR: {"by": b, "examples": int(examples), "groups": self.groupings[b].names,
                                    "complete": True}})

    def _drop_older(self, b: str, keep_from: int) -> None:
        """Snapshots older than the committed one (which stays until the new counters are saved)."""
        root: Any = self.store.group
        live = root[f"parts/{self.part}/live"]
        for e in [e for e in _snapshots(self.store, self.part, b) if e < keep_from]:
            del live[f"{_safe(b)}-e{e}"]


def _part_arrays(store: Store, part: str, b: str, grouping: Grouping) -> dict[str, np.ndarray] | None:
    """One part's final statistics by ``b`` in ``grouping``'s groups (None: not saved, not readable)."""
    info = store.part_info(part)
    want = GroupStats.for_groups(grouping.names, store.layers, store.n_neurons).arrays()
    if info.committed_examples == 0:
        return want
    snap = _snapshots(store, part, b).get(info.committed_examples)
    if snap is None:
        if not store.has_acts(part):
            return None
        ranges = [r for r in store.chunk_ranges() if r[0] == part]
        return reduce_moments(store, grouping.codes, grouping.names, ranges=ranges).arrays()
    index = {n: i for i, n in enumerate(grouping.names)}
    have = [str(x) for x in snap.attrs[LIVE_ATTR].get("groups", [])]
    for k in FIELDS:
        a = np.asarray(snap[k][...])
        for i, name in enumerate(have):
            if name in index:
                want[k][:, index[name]] += a[:, i]
    return want


def write_build_stats(store: Store, by: Sequence[str]) -> list[str]:
    """Merge the parts' build-time statistics of each column into the statistics cache (a complete store).

    A part without them (an earlier append) is reduced from its activations; where it keeps none, the
    column is left out. Returns the columns written.
    """
    written = []
    for b in by:
        grouping = make_grouping(store, b)
        total = GroupStats.for_groups(grouping.names, store.layers, store.n_neurons).arrays()
        ok = True
        for p in store.parts:
            arrays = _part_arrays(store, p.name, b, grouping)
            if arrays is None:
                ok = False
                break
            for k in FIELDS:
                total[k] += arrays[k]
        if ok and write_cached(store, grouping.key(store), total,
                               cache_attrs(grouping, grouping.spec(store), "moments", store)):
            written.append(b)
    return written
