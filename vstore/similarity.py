"""Value similarity from the statistics cache: one G x G matrix per store and language, and agreement.

:func:`similarity_matrices`: for each store and language, the statistics of the grouping ``by``
(default ``value``) on that language's examples (:func:`vstore.stats.compute_stats`, cached in the
store). Each group's **profile** is its mean activation over a list of neurons: the union of the
given neuron sets of the store's model (or every neuron of the store when no set is of that model).
Profiles are first centred per neuron (the mean over groups subtracted), so that a neuron's common
level, shared by every group, does not make all groups look alike; the matrix is the Pearson
correlation between the centred profiles of every pair of groups.

:func:`similarity_agreement`: for every pair of matrices, the Spearman correlation of their upper
triangles (over the groups both have), and a one-sided permutation p-value (a Mantel test: the
groups of the second matrix relabelled at random, rows and columns together;
``p = (1 + #{rho_perm >= rho}) / (1 + permutations)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .inference import rng_for
from .neuronset import NeuronSet, neuron_keys
from .progress import Note, Progress
from .stats import compute_stats, normalise_where
from .store import Store

__all__ = ["similarity_agreement", "similarity_matrices", "value_similarity"]


def _model_of(model: Mapping[str, Any]) -> tuple[Any, ...]:
    return (model.get("name"), model.get("architecture"), model.get("n_layers"), model.get("n_neurons"))


def value_similarity(means: np.ndarray) -> np.ndarray:
    """Pearson correlation between the rows of ``means`` (groups x neurons) after centring each neuron.

    A row that is constant after centring has NaN correlations.
    """
    p = np.asarray(means, dtype=np.float64)
    c = p - p.mean(axis=0, keepdims=True)
    c = c - c.mean(axis=1, keepdims=True)
    norm = np.sqrt((c * c).sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (c @ c.T) / np.outer(norm, norm)
    return np.clip(r, -1.0, 1.0)


def _open(path: str | Path) -> Store:
    try:
        return Store(path, mode="r+")  # so the statistics are cached for the next time
    except PermissionError:
        return Store(path, mode="r")


def _languages(st: Store, where: dict[str, list[str]]) -> list[str | None]:
    if "lang" in where:
        return list(where.pop("lang"))
    if "lang" in st.label_columns():
        codes, cats = st.labels("lang")
        return [c for i, c in enumerate(cats) if (codes == i).any()]
    return [None]


def _neurons(st: Store, sets: Sequence[NeuronSet]) -> tuple[list[tuple[int, int]], str]:
    """(layer position, neuron) of the union of the sets of this store's model, or every neuron."""
    pos = {lyr: i for i, lyr in enumerate(st.layers)}
    mine = _model_of(st.meta["model"])
    keys: set[tuple[int, int]] = set()
    for ns in sets:
        if _model_of(ns.model) == mine:
            for items in ns.groups.values():
                keys |= neuron_keys(items)
    chosen = sorted((pos[lay], n) for lay, n in keys if lay in pos)
    if chosen:
        return chosen, "sets"
    return [(li, n) for li in range(len(st.layers)) for n in range(st.n_neurons)], "all"


def similarity_matrices(
    stores: Sequence[str | Path], sets: Sequence[NeuronSet] = (), *, by: str = "value",
    where: Mapping[str, Sequence[str] | str] | None = None, backend: str = "auto",
    progress: Progress | None = None, on_note: Note | None = None,
) -> list[dict[str, Any]]:
    """The value-similarity matrix of every store and language (see the module docstring).

    Returns
    -------
    list of dict
        ``store``, ``model``, ``lang``, ``where``, ``groups`` (with rows), ``matrix`` (G x G),
        ``neurons`` (``"sets"`` or ``"all"``), ``n_profile`` (neurons in the profiles), ``rows`` per group.
    """
    out = []
    for path in stores:
        st = _open(path)
        w = normalise_where(where)
        chosen, source = _neurons(st, sets)
        li = np.asarray([c[0] for c in chosen], dtype=np.int64)
        ni = np.asarray([c[1] for c in chosen], dtype=np.int64)
        for lang in _languages(st, w):
            here = {**w, "lang": [lang]} if lang is not None else dict(w)
            stats = compute_stats(st, by, where=here, backend=backend, progress=progress)
            means = stats.mean()[li, :, ni].T  # (groups, neurons)
            rows = stats.rows_per_group()
            keep = [g for g, name in enumerate(stats.groups) if np.isfinite(means[g]).all() and rows[name] > 0]
            if len(keep) < len(stats.groups) and on_note is not None:
                left = [stats.groups[g] for g in range(len(stats.groups)) if g not in keep]
                on_note(f"note: {st.path} lang={lang}: groups without rows left out of the similarity: {left}")
            m = value_similarity(means[keep])
            out.append({"store": str(Path(st.path).resolve()), "model": st.meta["model"].get("name"),
                        "lang": lang if lang is not None else "all", "where": here,
                        "groups": [stats.groups[g] for g in keep], "matrix": m.tolist(), "neurons": source,
                        "n_profile": len(chosen), "rows": {stats.groups[g]: rows[stats.groups[g]] for g in keep}})
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return np.asarray(rankdata(x), dtype=np.float64)


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of ``x`` (n,) with every row of ``y`` (P, n)."""
    xc = x - x.mean()
    yc = y - y.mean(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray((yc @ xc) / (np.sqrt((yc * yc).sum(axis=1)) * np.sqrt((xc * xc).sum())))


def similarity_agreement(matrices: Sequence[Mapping[str, Any]], *, permutations: int = 10000) -> list[dict[str, Any]]:
    """Spearman correlation between the upper triangles of every pair of matrices, with a permutation p-value."""
    out = []
    for i in range(len(matrices)):
        for j in range(i + 1, len(matrices)):
            a, b = matrices[i], matrices[j]
            common = [g for g in a["groups"] if g in b["groups"]]
            label_a, label_b = f"{a['model']}/{a['lang']}", f"{b['model']}/{b['lang']}"
            row: dict[str, Any] = {"a": label_a, "b": label_b, "store_a": a["store"], "store_b": b["store"],
                                   "groups": common, "spearman": None, "p_value": None, "permutations": permutations}
            if len(common) >= 3:
                ia = [a["groups"].index(g) for g in common]
                ib = [b["groups"].index(g) for g in common]
                ma = np.asarray(a["matrix"])[np.ix_(ia, ia)]
                mb = np.asarray(b["matrix"])[np.ix_(ib, ib)]
                iu = np.triu_indices(len(common), 1)
                ra, rb = _ranks(ma[iu]), _ranks(mb[iu])
                rho = float(_pearson_rows(ra, rb[None])[0])
                rng = rng_for("similarity-agreement", label_a, label_b)
                perm = np.argsort(rng.random((permutations, len(common))), axis=1)
                rank_b = np.zeros_like(mb)
                rank_b[iu] = rb
                rank_b = rank_b + rank_b.T  # ranks of b's entries, symmetric (a permutation keeps the multiset)
                permuted = rank_b[perm[:, iu[0]], perm[:, iu[1]]]
                null = _pearson_rows(ra, permuted)
                row.update(spearman=rho, p_value=float((1 + (null >= rho - 1e-12).sum()) / (1 + permutations)))
            out.append(row)
    return out
