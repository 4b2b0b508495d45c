"""`vstore rank`: score every neuron of a store with one method and select a neuron set per group.

One public stage function, :func:`rank_store`: statistics (cached in the store) -> scores
(:mod:`vstore.scoring`) -> selection (:mod:`vstore.select`) -> a neuron-set JSON (format
``vstore-neurons`` version 1, see ``docs/neuron-set.md``) and the full score matrices in an ``.npz``
beside it. :func:`load_neuron_set` reads and validates such a file (used by ``vstore ablate``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .atomic import write_atomic
from .errors import NeuronSetError, VstoreError
from .neuronset import FORMAT, load_neuron_set
from .scoring import Scores, canonical_method, score
from .select import Item, Selection, lape_select, select_matching, select_neurons
from .stats import GroupStats, compute_auroc, compute_split_stats, compute_stats, make_grouping, split_halves
from .store import Store

__all__ = ["FORMAT", "NeuronSet", "jaccard", "load_neuron_set", "rank_store", "write_neuron_set"]



@dataclass
class NeuronSet:
    """A neuron set as written to JSON (``data``), with what produced it.

    Attributes
    ----------
    data
        The JSON document (see ``docs/neuron-set.md``).
    path
        Where it was written (None if not written).
    scores
        The full scores of the method.
    halves, jaccard
        With ``split_half``: the neuron sets of the two halves and their Jaccard index per group.
    """

    data: dict[str, Any]
    path: Path | None = None
    scores: Scores | None = None
    rows: dict[str, int] = field(default_factory=dict)
    nonfinite: dict[int, int] = field(default_factory=dict)
    from_cache: bool = False
    seconds: float = 0.0
    bytes_read: int = 0
    halves: tuple[NeuronSet, NeuronSet] | None = None
    jaccard: dict[str, float | None] | None = None

    @property
    def groups(self) -> dict[str, list[dict[str, Any]]]:
        return self.data["groups"]

    @property
    def layers(self) -> list[int]:
        """Model layer indices of the store the set was ranked on."""
        return list(self.data.get("layers", []))

    def per_layer(self) -> dict[str, dict[int, int]]:
        """Neurons per model layer, per group."""
        out: dict[str, dict[int, int]] = {}
        for g, items in self.groups.items():
            c: dict[int, int] = {}
            for it in items:
                c[int(it["layer"])] = c.get(int(it["layer"]), 0) + 1
            out[g] = c
        return out


def jaccard(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> float | None:
    """Jaccard index of two neuron lists by (layer, neuron); None when both are empty."""
    sa = {(int(x["layer"]), int(x["neuron"])) for x in a}
    sb = {(int(x["layer"]), int(x["neuron"])) for x in b}
    if not sa and not sb:
        return None
    return len(sa & sb) / len(sa | sb)


def write_neuron_set(ns: NeuronSet, out: str | Path, *, npz: bool = True) -> Path:
    """Write the JSON atomically, and the score matrices in ``<out>.npz`` (same stem)."""
    out = Path(out)
    write_atomic(out, lambda f: f.write(json.dumps(ns.data, ensure_ascii=False, indent=1).encode("utf-8")))
    if npz and ns.scores is not None:
        s = ns.scores
        arrays: dict[str, Any] = {
            "scores": s.values, "groups": np.asarray(s.targets, dtype=str), "layers": np.asarray(s.layers, np.int64),
            "method": np.asarray(s.method),
        }
        for k, v in s.extra.items():
            arrays[k] = v
        write_atomic(out.with_suffix(".npz"), lambda f: np.savez(f, **arrays))
    ns.path = out
    return out


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


def _parse_contrast(contrast: Any) -> tuple[str, list[str]] | None:
    if contrast is None:
        return None
    if isinstance(contrast, str):
        col, _, vals = contrast.partition("=")
        sides = [v.strip() for v in vals.split(",") if v.strip()]
        if not col or len(sides) != 2:
            raise VstoreError(f"--contrast: expected COLUMN=a,b, got {contrast!r}")
        return col.strip(), sides
    col, sides = contrast
    return str(col), [str(s) for s in sides]


def _store_json(st: Store) -> dict[str, Any]:
    return {"path": str(Path(st.path).resolve()), "committed": st.committed_key, "site": st.meta.get("site"),
            "dtype": st.dtype, "pooling": st.meta.get("pooling")}


def _target_rows(stats: GroupStats) -> dict[str, int]:
    """Rows per target group (both sides of a contrast together)."""
    per = stats.rows_per_group()
    if not stats.sides:
        return per
    return {b: sum(per[f"{b}|{s}"] for s in stats.sides) for b in stats.base}


def _reference_counts(ref: dict[str, Any], st: Store, path: str | Path) -> dict[str, dict[int, int]]:
    pos = {lyr: i for i, lyr in enumerate(st.layers)}
    out: dict[str, dict[int, int]] = {}
    for g, items in ref["groups"].items():
        c: dict[int, int] = {}
        for i, it in enumerate(items):
            if int(it["layer"]) not in pos:
                raise NeuronSetError(
                    f"{path}: groups.{g}[{i}].layer: layer {it['layer']} is not in the store (layers {st.layers})"
                )
            c[pos[int(it["layer"])]] = c.get(pos[int(it["layer"])], 0) + 1
        out[g] = c
    return out


def _rank_one(
    st: Store,
    method: str,
    stats: GroupStats | None,
    sel: Selection,
    *,
    grouping_targets: list[str],
    auroc_kw: dict[str, Any] | None,
    filter_rate: float,
    bar_ratio: float,
    seed: int,
    ref_counts: dict[str, dict[int, int]] | None,
    backend: str,
) -> tuple[Scores, dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Scores and per-group selections of one method on one set of statistics."""
    info: dict[str, Any] = {}
    if method == "random":
        names = list(ref_counts) if ref_counts is not None else grouping_targets
        sc = score("random", target_names=names, layers=st.layers, n_neurons=st.n_neurons, seed=seed)
    elif method == "auroc":
        res = compute_auroc(st, **(auroc_kw or {}))
        sc = score("auroc", auroc=res)
        info["auroc_exact"] = res.exact
        info["auroc_max_error"] = float(np.nanmax(res.error, initial=0.0))
        info["_rows"], info["_bytes"], info["_cached"] = res.rows, res.bytes_read, res.from_cache
        if res.exact:
            sc.extra.pop("auroc_error", None)
    else:
        sc = score(method, stats)
    groups: dict[str, list[dict[str, Any]]] = {}
    item_extra = {k: v for k, v in sc.extra.items() if k in ("p", "auroc_error")}
    if method == "vape":
        per_group, thr = lape_select(sc.extra["prob"], sc.extra["entropy"], top_rate=sel.top_rate if sel.top_rate
                                     is not None else 0.01, filter_rate=filter_rate, bar_ratio=bar_ratio,
                                     top_k=sel.top_k, backend=backend)
        info.update(thr)
        for t, name in enumerate(sc.targets):
            groups[name] = _items(per_group[t], sc.layers, {}, t)
    else:
        for t, name in enumerate(sc.targets):
            if ref_counts is not None:
                picked = select_matching(sc.values[:, t], ref_counts.get(name, {}), backend=backend)
            else:
                picked = select_neurons(sc.values[:, t], sel, centre=sc.centre, lower_is_better=sc.lower_is_better,
                                        backend=backend)
            groups[name] = _items(picked, sc.layers, item_extra, t)
    return sc, groups, info


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
    progress: bool = False,
    threads: int | None = None,
    dask: str | None = None,
    auroc_memory: int = 256 << 20,
    verify: bool = True,
) -> NeuronSet:
    """Rank the neurons of a store with one method and write a neuron set.

    Parameters
    ----------
    store
        Store folder.
    by
        Label column whose categories are the groups (None: one group ``all``).
    method
        ``vape`` (``lape``), ``prob-diff``, ``mean-diff``, ``cohen-d``, ``welch-t``, ``auroc``,
        ``probeless`` or ``random``.
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
        ``random``: a reference neuron set whose per-layer counts (per group) are matched.
    use_cache
        Use and fill the statistics cache in the store.
    progress
        Show progress bars.
    threads
        Kernel threads (default all).
    dask
        Reduce on a Dask cluster: ``ADDRESS`` of a scheduler or ``local:N``.
    auroc_memory
        Bytes of histogram per auroc pass.
    verify
        Check chunk checksums (crc32c) while reading.

    Returns
    -------
    NeuronSet

    Raises
    ------
    VstoreError
        Bad arguments, an unknown label column/value, a malformed reference set.
    """
    t0 = time.perf_counter()
    m = canonical_method(method)
    st = Store(store, mode="r")
    if st.n_rows == 0 and m != "random":
        raise VstoreError(f"{st.path}: the store has no committed rows to rank")
    where_n = {str(k): ([v] if isinstance(v, str) else [str(x) for x in v]) for k, v in (where or {}).items()}
    con = _parse_contrast(contrast)
    sel = Selection(top_k=top_k, per_layer_k=per_layer_k, top_rate=top_rate, threshold=threshold, by_abs=by_abs)
    sel.validate()
    if m == "vape":
        if per_layer_k is not None or threshold is not None or by_abs:
            raise VstoreError("vape selects by LAPE's procedure: use --top-rate or --top-k (not --per-layer-k, "
                              "--threshold or --abs)")
        if top_k is not None and top_rate is not None:
            raise VstoreError("vape: choose --top-rate or --top-k")
        if con is not None:
            raise VstoreError("vape compares groups with one another, not the two sides of a contrast; use "
                              "--where COLUMN=VALUE for one side, or a contrastive method")
    if neurons is not None and m != "random":
        raise VstoreError("--neurons is the reference set of --method random")
    if split_half and m == "random":
        raise VstoreError("--split-half needs a data-driven method, not random")
    ref_counts = None
    if m == "random" and neurons is not None:
        ref = load_neuron_set(neurons, n_neurons=st.n_neurons)
        ref_counts = _reference_counts(ref, st, neurons)
    from . import kernels

    used_backend = kernels.resolve_backend(backend)
    grouping = make_grouping(st, by, where=where_n, contrast=con)
    skw: dict[str, Any] = {"where": where_n, "contrast": con, "backend": backend, "use_cache": use_cache,
                           "progress": progress, "threads": threads, "verify": verify}
    halves_stats: tuple[GroupStats, GroupStats] | None = None
    stats: GroupStats | None = None
    if m not in ("random", "auroc"):
        if split_half:
            halves_stats = compute_split_stats(st, by, seed=seed, **skw)
            stats = GroupStats(
                halves_stats[0].groups, halves_stats[0].layers, grouping.key(st), halves_stats[0].count.copy(),
                halves_stats[0].sum.copy(), halves_stats[0].sumsq.copy(), halves_stats[0].npos.copy(),
                halves_stats[0].nonfinite.copy(), base=halves_stats[0].base, sides=halves_stats[0].sides,
                spec=grouping.spec(st),
            )
            stats.merge(halves_stats[1])
            stats.from_cache = all(h.from_cache for h in halves_stats)
            stats.bytes_read = halves_stats[0].bytes_read
        else:
            stats = compute_stats(st, by, dask=dask, **skw)
    auroc_kw = {"by": by, **skw, "memory": auroc_memory}
    common: dict[str, Any] = {"grouping_targets": list(grouping.base), "filter_rate": filter_rate, "bar_ratio": bar_ratio,
              "seed": seed, "ref_counts": ref_counts, "backend": backend}
    sc, groups, info = _rank_one(st, m, stats, sel, auroc_kw=auroc_kw, **common)
    auroc_rows, auroc_bytes, auroc_cached = info.pop("_rows", {}), info.pop("_bytes", 0), info.pop("_cached", False)

    params: dict[str, Any] = {"selection": sel.to_json(), "backend": used_backend}
    if m == "vape":
        params.update({"top_rate": top_rate if top_rate is not None else (None if top_k is not None else 0.01),
                       "top_k": top_k, "filter_rate": filter_rate, "bar_ratio": bar_ratio})
    if m == "random":
        params.update({"seed": seed, "neurons": str(Path(neurons).resolve()) if neurons else None})
    if split_half:
        params["split_half"] = {"seed": seed}
    params.update(info)
    rows = _target_rows(stats) if stats is not None else auroc_rows
    nonfinite = stats.nonfinite_per_layer() if stats is not None else {}
    data: dict[str, Any] = {
        "format": dict(FORMAT),
        "model": dict(st.meta["model"]),
        "store": _store_json(st),
        "method": m,
        "params": params,
        "by": by,
        "where": where_n,
        "contrast": {"column": con[0], "sides": con[1]} if con else None,
        "layers": st.layers,
        "n_neurons": st.n_neurons,
        "stats": {"key": stats.key if stats is not None else None, "rows": rows,
                  "nonfinite_rows": {str(k): v for k, v in nonfinite.items()}},
        "groups": groups,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "vstore_version": __version__,
    }
    ns = NeuronSet(data, None, sc, rows, nonfinite, bool(stats.from_cache) if stats is not None else auroc_cached,
                   0.0, stats.bytes_read if stats is not None else auroc_bytes)
    if split_half:
        used = grouping.codes >= 0
        masks = split_halves(st, seed=seed, by=by)
        halves: list[NeuronSet] = []
        for h in range(2):
            hs = halves_stats[h] if halves_stats is not None else None
            akw = {**auroc_kw, "example_mask": masks[h]}
            hsc, hgroups, hinfo = _rank_one(st, m, hs, sel, auroc_kw=akw, **common)
            h_rows = hinfo.pop("_rows", {})
            hinfo.pop("_bytes", None)
            hinfo.pop("_cached", None)
            hdata = {**data, "groups": hgroups, "params": {**params, **hinfo, "split_half": {"seed": seed, "half": h + 1}},
                     "stats": {"key": hs.key if hs is not None else None,
                               "rows": _target_rows(hs) if hs is not None else h_rows,
                               "nonfinite_rows": {str(k): v for k, v in (hs.nonfinite_per_layer() if hs else {}).items()}},
                     "examples": int((masks[h] & used).sum())}
            halves.append(NeuronSet(hdata, None, hsc, hdata["stats"]["rows"]))
        ns.halves = (halves[0], halves[1])
        ns.jaccard = {g: jaccard(halves[0].groups.get(g, []), halves[1].groups.get(g, [])) for g in groups}
        data["split_half"] = {"seed": seed, "jaccard": ns.jaccard,
                              "examples": [int((masks[0] & used).sum()), int((masks[1] & used).sum())]}
    if out is not None:
        out = Path(out)
        if ns.halves is not None:
            files = []
            for h, hn in enumerate(ns.halves):
                p = out.with_name(f"{out.stem}.half{h + 1}.json")
                write_neuron_set(hn, p)
                files.append(str(p))
            data["split_half"]["files"] = files
        write_neuron_set(ns, out)
    ns.seconds = time.perf_counter() - t0
    return ns
