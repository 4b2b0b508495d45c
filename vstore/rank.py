"""`vstore rank`: score every neuron of a store with one method and select a neuron set per group.

One public stage function, :func:`rank_store`: statistics (cached in the store) -> scores
(:mod:`vstore.methods`) -> selection (:mod:`vstore.select`) -> a :class:`~vstore.neuronset.NeuronSet`
(format ``vstore-neurons`` version 1, see ``docs/neuron-set.md``) and the full score matrices in an
``.npz`` beside it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, kernels
from .atomic import write_atomic
from .errors import NeuronSetError, UsageError, VstoreError
from .methods import Method, get_method, score
from .neuronset import FORMAT, LayerNeurons, NeuronSet, jaccard
from .scoring import Scores
from .select import Item, Selection, control_set, lape_select, select_neurons
from .sites import site_extra, site_for
from .specificity import annotate_rank, check_exclusive
from .stats import Grouping, GroupStats, grouping_auroc, grouping_stats, make_grouping, split_grouping_stats
from .stats.grouping import normalise_contrast, normalise_where
from .store import Store

__all__ = ["RankRequest", "RankResult", "rank_store", "write_rank_result"]


@dataclass(frozen=True)
class RankRequest:
    """What to rank, validated: the method, the selection and their parameters."""

    method: Method
    sel: Selection
    filter_rate: float = 0.95
    bar_ratio: float = 0.95
    seed: int = 0
    reference: NeuronSet | None = None
    backend: str = "auto"

    def params(self) -> dict[str, Any]:
        """The ``params`` of the neuron-set JSON."""
        out: dict[str, Any] = {"selection": self.sel.to_json(), "backend": kernels.resolve_backend(self.backend)}
        if self.method.name == "vape":
            top_rate = self.sel.top_rate if self.sel.top_rate is not None else (None if self.sel.top_k is not None
                                                                                else 0.01)
            out.update({"top_rate": top_rate, "top_k": self.sel.top_k, "filter_rate": self.filter_rate,
                        "bar_ratio": self.bar_ratio})
        if self.method.name == "random":
            ref = self.reference.path if self.reference is not None else None
            out.update({"seed": self.seed, "neurons": str(Path(ref).resolve()) if ref else None})
        return out


@dataclass
class RankResult:
    """A ranked neuron set and what produced it.

    Attributes
    ----------
    neurons
        The neuron set (written to ``out`` when one was given).
    scores
        The full scores of the method.
    rows
        Rows per target group.
    nonfinite
        Rows left out for NaN/Inf, per model layer.
    from_cache, bytes_read, seconds
        Whether the statistics came from the store's cache, what was read, how long it took.
    halves, jaccard
        With ``split_half``: the results of the two halves and the Jaccard index of their sets per group.
    skipped
        Damaged chunks left out with ``skip_damaged``: ``(part, layer position, first row, end row)``.
    """

    neurons: NeuronSet
    scores: Scores | None = None
    rows: dict[str, int] = field(default_factory=dict)
    nonfinite: dict[int, int] = field(default_factory=dict)
    from_cache: bool = False
    bytes_read: int = 0
    seconds: float = 0.0
    halves: tuple[RankResult, RankResult] | None = None
    jaccard: dict[str, float | None] | None = None
    skipped: list[tuple[str, int, int, int]] = field(default_factory=list)

    @property
    def data(self) -> dict[str, Any]:
        return self.neurons.data

    @property
    def path(self) -> Path | None:
        return self.neurons.path

    @property
    def groups(self) -> dict[str, list[dict[str, Any]]]:
        return self.neurons.groups

    @property
    def layers(self) -> list[int]:
        return self.neurons.layers

    def per_layer(self) -> dict[str, dict[int, int]]:
        return self.neurons.per_layer()


def write_rank_result(res: RankResult, out: str | Path, *, npz: bool = True) -> Path:
    """Write the neuron set atomically, and the score matrices in ``<out>.npz`` (same stem)."""
    out = Path(out)
    res.neurons.save(out)
    if npz and res.scores is not None:
        s = res.scores
        arrays: dict[str, Any] = {"scores": s.values, "groups": np.asarray(s.targets, dtype=str),
                                  "layers": np.asarray(s.layers, np.int64), "method": np.asarray(s.method), **s.extra}
        write_atomic(out.with_suffix(".npz"), lambda f: np.savez(f, **arrays))
    return out


def _request(method: str, sel: Selection, *, contrast: Any, neurons: str | Path | None, split_half: bool,
             **kw: Any) -> RankRequest:
    m = get_method(method)
    sel.validate()
    if m.name == "vape" and (sel.per_layer_k is not None or sel.threshold is not None or sel.by_abs):
        raise UsageError("vape selects by LAPE's procedure: use top_rate or top_k (not per_layer_k, threshold "
                         "or by_abs)", "top_rate", "top_k", "per_layer_k", "threshold", "by_abs")
    if contrast is not None and not m.contrast:
        raise UsageError(f"contrast: {m.name} compares groups with one another, not the two sides of a contrast; "
                         "rank one side with where, or use a contrastive method", "contrast", "where")
    if neurons is not None and m.name != "random":
        raise UsageError("neurons is the reference set of method random", "neurons")
    if split_half and m.needs == "none":
        raise UsageError("split_half needs a data-driven method, not random", "split_half")
    if kw.get("seed", 0) < 0:
        raise UsageError(f"seed must be >= 0, got {kw['seed']}", "seed")
    reference = NeuronSet.load(neurons) if neurons is not None else None
    return RankRequest(m, sel, reference=reference, **kw)


def _items(sel: list[Item], layers: Sequence[int], extra: Mapping[str, np.ndarray], t: int) -> list[dict[str, Any]]:
    out = []
    for li, n, s in sel:
        it: dict[str, Any] = {"layer": int(layers[li]), "neuron": int(n), "score": float(s)}
        for name, arr in extra.items():
            v = float(arr[li, t, n])
            if np.isfinite(v):
                it[name] = v
        out.append(it)
    return out


def _controls(st: Store, req: RankRequest) -> dict[str, LayerNeurons]:
    """The random control of every group of the reference set, in the store's layers."""
    assert req.reference is not None
    ref = req.reference.validate(n_neurons=st.n_neurons)
    out = {}
    for g, items in ref.groups.items():
        for i, it in enumerate(items):
            if int(it["layer"]) not in st.layers:
                raise NeuronSetError(f"{ref.path}: groups.{g}[{i}].layer: layer {it['layer']} is not in the store "
                                     f"(layers {st.layers})")
        out[g] = control_set(ref.layer_neurons(g), st.n_neurons, req.seed, g)
    return out


@dataclass
class _Ranked:
    scores: Scores
    groups: dict[str, list[dict[str, Any]]]
    params: dict[str, Any]
    rows: dict[str, int]


def _rank_random(st: Store, req: RankRequest, grouping: Grouping) -> _Ranked:
    if req.reference is None:
        sc = score("random", target_names=grouping.base, layers=st.layers, n_neurons=st.n_neurons, seed=req.seed)
        return _Ranked(sc, _select(sc, req), {}, {})
    controls = _controls(st, req)
    sc = score("random", target_names=list(controls), layers=st.layers, n_neurons=st.n_neurons, seed=req.seed)
    pos = {lyr: i for i, lyr in enumerate(st.layers)}
    groups = {g: _items([(pos[lay], int(n), float(sc.values[pos[lay], t, n])) for lay, idx in sel.items() for n in idx],
                        st.layers, {}, t) for t, (g, sel) in enumerate(controls.items())}
    return _Ranked(sc, groups, {}, {})


def _select(sc: Scores, req: RankRequest) -> dict[str, list[dict[str, Any]]]:
    item_extra = {k: v for k, v in sc.extra.items() if k in ("p", "auroc_error")}
    return {name: _items(select_neurons(sc.values[:, t], req.sel, centre=sc.centre, lower_is_better=sc.lower_is_better,
                                        backend=req.backend), sc.layers, item_extra, t)
            for t, name in enumerate(sc.targets)}


def _rank_stats(stats: GroupStats, req: RankRequest) -> _Ranked:
    sc = score(req.method.name, stats)
    if req.method.name != "vape":
        return _Ranked(sc, _select(sc, req), {}, stats.target_rows())
    top_rate = req.sel.top_rate if req.sel.top_rate is not None else 0.01
    per_group, thresholds = lape_select(sc.extra["prob"], sc.extra["entropy"], top_rate=top_rate,
                                        filter_rate=req.filter_rate, bar_ratio=req.bar_ratio, top_k=req.sel.top_k,
                                        backend=req.backend)
    groups = {name: _items(per_group[t], sc.layers, {}, t) for t, name in enumerate(sc.targets)}
    return _Ranked(sc, groups, thresholds, stats.target_rows())


def _document(st: Store, req: RankRequest, grouping: Grouping, ranked: _Ranked, nonfinite: Mapping[int, int],
              stats_key: str | None, extra_params: Mapping[str, Any]) -> dict[str, Any]:
    con = grouping.contrast
    return {
        "format": dict(FORMAT),
        "model": dict(st.meta["model"]),
        "store": {"path": st.location, "committed": st.committed_key, "site": st.site,
                  "dtype": st.dtype, "pooling": st.meta.get("pooling") if st.view == "token" else st.view,
                  **site_extra(st)},
        "method": req.method.name,
        "params": {**req.params(), **extra_params, **ranked.params},
        "by": grouping.by,
        "where": grouping.where,
        "contrast": {"column": con[0], "sides": con[1]} if con else None,
        "layers": st.layers,
        "n_neurons": st.n_neurons,
        "stats": {"key": stats_key, "rows": ranked.rows,
                  "nonfinite_values": {str(k): v for k, v in nonfinite.items()}},
        "groups": ranked.groups,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "vstore_version": __version__,
    }


@dataclass(frozen=True)
class _PassOptions:
    backend: str
    use_cache: bool
    progress: Any
    threads: int | None
    verify: bool
    dask: str | None
    auroc_memory: int
    skip_damaged: bool = False


def _rank_grouping(st: Store, req: RankRequest, grouping: Grouping, opts: _PassOptions,
                   stats: GroupStats | None, extra_params: Mapping[str, Any]) -> RankResult:
    """Rank one grouping (the whole data, or one split half) from its statistics."""
    from_cache, nbytes = bool(stats.from_cache) if stats is not None else False, stats.bytes_read if stats else 0
    skipped = list(stats.skipped) if stats is not None else []
    auroc_nonfinite: dict[int, int] = {}
    if req.method.needs == "none":
        ranked = _rank_random(st, req, grouping)
    elif req.method.needs == "histogram":
        res = grouping_auroc(st, grouping, backend=opts.backend, use_cache=opts.use_cache, progress=opts.progress,
                             threads=opts.threads, verify=opts.verify, memory=opts.auroc_memory,
                             skip_damaged=opts.skip_damaged, dask=opts.dask)
        skipped, auroc_nonfinite = res.skipped, res.nonfinite
        sc = score("auroc", auroc=res)
        if res.exact:
            sc.extra.pop("auroc_error", None)
        ranked = _Ranked(sc, _select(sc, req), {"auroc_exact": res.exact,
                                                "auroc_max_error": float(np.nanmax(res.error, initial=0.0))}, res.rows)
        from_cache, nbytes = res.from_cache, res.bytes_read
    else:
        assert stats is not None
        ranked = _rank_stats(stats, req)
    if skipped:  # the set rests on part of the data: say which rows were left out, in the file too
        extra_params = {**extra_params, "skipped_damaged": [
            {"part": p, "layer": st.layers[li], "rows": [r0, r1]} for p, li, r0, r1 in skipped]}
    nonfinite = stats.nonfinite_per_layer() if stats is not None else auroc_nonfinite
    doc = _document(st, req, grouping, ranked, nonfinite, stats.key if stats is not None else None, extra_params)
    return RankResult(NeuronSet.from_dict(doc, source="rank"), ranked.scores, ranked.rows, nonfinite, from_cache,
                      nbytes, skipped=skipped)


def _open(store: str | Path, write: bool, view: str = "token") -> Store:
    if write:
        try:
            return Store(store, mode="r+", view=view)
        except PermissionError:  # a read-only store: rank without caching
            pass
    return Store(store, mode="r", view=view)


def rank_store(
    store: str | Path,
    by: str | None,
    method: str = "vape",
    *,
    out: str | Path | None = None,
    where: Mapping[str, Sequence[str] | str] | None = None,
    contrast: tuple[str, Sequence[str]] | str | None = None,
    top_k: int | None = None,
    per_layer_k: int | None = None,
    top_rate: float | None = None,
    threshold: float | None = None,
    by_abs: bool = False,
    filter_rate: float = 0.95,
    bar_ratio: float = 0.95,
    backend: str = "auto",
    split_half: bool = False,
    seed: int = 0,
    neurons: str | Path | None = None,
    use_cache: bool = True,
    progress: Any = None,
    threads: int | None = None,
    dask: str | None = None,
    auroc_memory: int = 256 << 20,
    verify: bool = True,
    skip_damaged: bool = False,
    exclusive: int | None = None,
    rows: str = "token",
    site: str | None = None,
) -> RankResult:
    """Rank the neurons of a store with one method and write a neuron set.

    Parameters
    ----------
    store
        Store folder.
    by
        Label column whose categories are the groups (None: one group ``all``).
    method
        A method of :data:`vstore.methods.METHODS` (or an alias such as ``lape``).
    out
        The neuron-set JSON to write (and ``<out>.npz`` with the full scores); None: write nothing.
    where
        ``{column: values}``: rank on the examples with these labels only.
    contrast
        ``(column, [a, b])`` or ``"column=a,b"``: compare side a with side b within each group.
    top_k, per_layer_k, top_rate, threshold, by_abs
        Selection per group (see :class:`vstore.select.Selection`); for vape, ``top_k`` replaces
        ``top_rate`` (default 0.01) as the number of kept neurons.
    filter_rate, bar_ratio
        vape's probability quantiles (LAPE's defaults 0.95).
    backend
        Kernel backend: ``auto``, ``cpp``, ``numba`` or ``numpy``.
    split_half
        Also rank the two halves of the items (:func:`vstore.stats.split_halves`) and report the
        Jaccard index of their sets per group; the halves go to ``<out stem>.half1.json`` / ``.half2.json``.
    seed
        Seed of ``random`` and of the split.
    neurons
        ``random``: a reference neuron set; each group gets its random control
        (:func:`vstore.select.control_set`: the same count per layer, other neurons).
    use_cache
        Use and fill the statistics cache in the store (opened for writing only then).
    progress, threads
        A :class:`vstore.progress.Progress` reporter (None: report nothing); kernel threads (default all).
    dask, auroc_memory
        Reduce on a Dask cluster (``ADDRESS`` of a scheduler or ``local:N``); bytes of histogram per auroc pass.
    verify
        Check chunk checksums (crc32c) while reading.
    skip_damaged
        Leave out chunks that cannot be read (missing, truncated, bad checksum) instead of failing;
        the rows left out are in ``RankResult.skipped`` and the JSON's ``params.skipped_damaged``.
    exclusive
        Keep only neurons of at most this many groups (after selection; ``params.selection.exclusive``).
    rows
        ``token`` (default), or ``mean`` / ``last``: rank the pooled rows of a store built with
        ``keep="pooled"`` (one row per example; the neuron set records them as its ``pooling``).
    site
        The store's site to rank (``act``, ``down_in``, ``resid``, ``attr``; default: the store's
        first site, or ``attr`` for the ``attribution`` method). Recorded as ``store.site``.

    Raises
    ------
    UsageError
        Contradictory or out-of-range arguments.
    VstoreError
        An unknown label column/value, a malformed reference set, a store without rows.
    """
    t0 = time.perf_counter()
    if out is not None and Path(out).suffix.lower() == ".npz":
        raise UsageError(f"out: {out} would be overwritten by the scores (<out>.npz); use a .json name", "out")
    check_exclusive(exclusive)
    con = normalise_contrast(contrast)
    sel = Selection(top_k=top_k, per_layer_k=per_layer_k, top_rate=top_rate, threshold=threshold, by_abs=by_abs)
    req = _request(method, sel, contrast=con, neurons=neurons, split_half=split_half, filter_rate=filter_rate,
                   bar_ratio=bar_ratio, seed=seed, backend=backend)
    if rows not in ("token", "mean", "last"):
        raise UsageError(f"rows must be token, mean or last, got {rows!r}", "rows")
    st = _open(store, write=use_cache and req.method.needs != "none", view=rows)
    st = st.with_site(site_for(st, req.method.name, req.method.site, site))
    if st.n_rows == 0 and req.method.needs != "none":
        raise VstoreError(f"{st.path}: the store has no committed rows to rank")
    grouping = make_grouping(st, by, where=normalise_where(where), contrast=con)
    if con is None and req.method.needs != "none" and len(grouping.base) < 2:
        what = f"column {by!r} has the single group {grouping.base[0]!r}" if by and grouping.base else (
            f"column {by!r} has no group" if by else "without a column, every example is in one group")
        raise UsageError(f"by: {what}; every method compares a group with the others, so it needs two or more "
                         "groups (or a contrast)", "by", "contrast")
    opts = _PassOptions(backend, use_cache, progress, threads, verify, dask, auroc_memory, skip_damaged)
    halves: tuple[GroupStats, GroupStats] | None = None
    stats: GroupStats | None = None
    if req.method.needs == "moments":
        if split_half:
            halves = split_grouping_stats(st, grouping, seed=seed, backend=backend, use_cache=use_cache,
                                          progress=progress, threads=threads, verify=verify, skip_damaged=skip_damaged,
                                          dask=dask)
            stats = halves[0].copy()
            stats.merge(halves[1])
            stats.key, stats.spec = grouping.key(st), grouping.spec(st)
            stats.from_cache, stats.bytes_read = all(h.from_cache for h in halves), halves[0].bytes_read
        else:
            stats = grouping_stats(st, grouping, backend=backend, use_cache=use_cache, progress=progress,
                                   threads=threads, verify=verify, dask=dask, skip_damaged=skip_damaged)
    extra = {"split_half": {"seed": seed}} if split_half else {}
    result = _rank_grouping(st, req, grouping, opts, stats, extra)
    if split_half:
        _rank_halves(st, req, grouping, opts, halves, result)
    annotate_rank(result, exclusive)
    if out is not None:
        _write(result, Path(out))
    result.seconds = time.perf_counter() - t0
    return result


def _rank_halves(st: Store, req: RankRequest, grouping: Grouping, opts: _PassOptions,
                 halves: tuple[GroupStats, GroupStats] | None, result: RankResult) -> None:
    """Rank both split halves; record them and their per-group Jaccard index in ``result``."""
    from .stats import split_halves

    masks = split_halves(st, seed=req.seed, by=grouping.by)
    used = grouping.codes >= 0
    parts = []
    for h in range(2):
        sub = grouping.with_mask(st, masks[h])
        r = _rank_grouping(st, req, sub, opts, halves[h] if halves is not None else None,
                           {"split_half": {"seed": req.seed, "half": h + 1}})
        r.data["examples"] = int((masks[h] & used).sum())
        parts.append(r)
    result.halves = (parts[0], parts[1])
    result.jaccard = {g: jaccard(parts[0].groups.get(g, []), parts[1].groups.get(g, [])) for g in result.groups}
    result.data["split_half"] = {"seed": req.seed, "jaccard": result.jaccard,
                                 "examples": [int((m & used).sum()) for m in masks]}


def _write(result: RankResult, out: Path) -> None:
    if result.halves is not None:
        files = []
        for h, half in enumerate(result.halves):
            p = out.with_name(f"{out.stem}.half{h + 1}.json")
            write_rank_result(half, p)
            files.append(str(p))
        result.data["split_half"]["files"] = files
    write_rank_result(result, out)
