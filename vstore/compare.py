"""`vstore compare`: overlaps of neuron sets against chance, relative depth across models, value geometry.

One public function, :func:`compare_sets`, over neuron-set files (``vstore-neurons`` v1). For every
pair of sets it reports, per common group and for the union of all groups (group ``"*"``):

* sets of the **same model** (same architecture, layer and neuron counts, name): neurons shared by
  ``(layer, neuron)``, the Jaccard index, and its chance level — random sets of the same per-layer
  sizes, exact (:func:`vstore.specificity.chance_jaccard`) — with its spread and a p-value;
* sets of **different models**: overlap by relative depth (``layer / n_layers``, in ``bins`` bins):
  ``shared = sum over bins of min(count_a, count_b)``, the same Jaccard form, a simulated chance
  level (random sets drawn uniformly from each model's layers); and the 1-Wasserstein distance of
  the relative-depth distributions with its chance level (a random set of B's size from B's model).

Within every set, its groups against each other (:func:`vstore.specificity.specificity`); split
halves recorded by ``rank --split-half`` against each other. With ``similarity`` stores, the value
similarity matrices and their agreement (:mod:`vstore.similarity`). The JSON is ``vstore-compare``
version 1 (``docs/show-compare.md``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError
from .inference import json_safe, rng_for
from .neuronset import NeuronSet, neuron_keys, overlap
from .progress import Note, Progress
from .similarity import similarity_agreement, similarity_matrices
from .specificity import chance_jaccard, layer_sizes, specificity

__all__ = ["COMPARE_FORMAT", "compare_sets"]

COMPARE_FORMAT = {"name": "vstore-compare", "version": 1}
UNION = "*"


def _labels(sets: Sequence[NeuronSet], labels: Sequence[str] | None) -> list[str]:
    if labels is not None:
        if len(labels) != len(sets) or len(set(labels)) != len(labels):
            raise UsageError(f"labels: expected {len(sets)} different labels, got {list(labels)}", "labels")
        return list(labels)
    stems = [ns.path.stem if ns.path else f"set{i}" for i, ns in enumerate(sets)]
    out = []
    for i, (s, ns) in enumerate(zip(stems, sets, strict=True)):
        dup = stems.count(s) > 1
        out.append(f"{ns.path.parent.name}/{s}" if dup and ns.path else (f"{s}#{i}" if dup else s))
    return out


def _model_key(ns: NeuronSet) -> tuple[Any, ...]:
    m = ns.model
    return (m.get("name"), m.get("architecture"), m.get("n_layers"), m.get("n_neurons"))


def _n_layers(ns: NeuronSet) -> int:
    n = ns.model.get("n_layers")
    if n:
        return int(n)
    if ns.layers:
        return max(ns.layers) + 1
    return max((int(it["layer"]) for items in ns.groups.values() for it in items), default=0) + 1


def _n_neurons(ns: NeuronSet) -> int:
    n = ns.model.get("n_neurons") or ns.data.get("n_neurons")
    if not n:
        raise UsageError(f"{ns.path}: model.n_neurons is missing; compare needs it for the chance level", "sets")
    return int(n)


def _groups(ns: NeuronSet) -> dict[str, set[tuple[int, int]]]:
    """Every group's neurons, and their union as group ``*``."""
    out = {g: neuron_keys(items) for g, items in ns.groups.items()}
    out[UNION] = set().union(*out.values()) if out else set()
    return out


def _set_info(label: str, ns: NeuronSet) -> dict[str, Any]:
    return {"label": label, "path": str(ns.path) if ns.path else None, "model": ns.model.get("name"),
            "n_layers": _n_layers(ns), "n_neurons": _n_neurons(ns), "method": ns.method, "by": ns.data.get("by"),
            "where": ns.data.get("where") or {}, "layers": ns.layers or None,
            "groups": {g: len(neuron_keys(items)) for g, items in ns.groups.items()}}


def _kind(a: NeuronSet, b: NeuronSet) -> str:
    """What differs between two sets: model, method, where (language), or nothing."""
    diffs = []
    if _model_key(a) != _model_key(b):
        diffs.append("model")
    if a.method != b.method:
        diffs.append("method")
    wa, wb = a.data.get("where") or {}, b.data.get("where") or {}
    if wa != wb:
        diffs.append("language" if set(wa) | set(wb) == {"lang"} else "where")
    return "+".join(diffs) or "same"


def _neuron_rows(la: str, lb: str, a: NeuronSet, b: NeuronSet, kind: str) -> list[dict[str, Any]]:
    ga, gb = _groups(a), _groups(b)
    n_neurons = _n_neurons(a)
    rows = []
    for g in [x for x in ga if x in gb]:
        shared, union = overlap(ga[g], gb[g])
        ch = chance_jaccard(layer_sizes(ga[g]), layer_sizes(gb[g]), n_neurons, observed_shared=shared)
        rows.append({"a": la, "b": lb, "group": g, "kind": kind, "by": "neuron", "n_a": len(ga[g]), "n_b": len(gb[g]),
                     "shared": shared, "jaccard": shared / union if union else None, **ch.to_json()})
    return rows


def _depths(keys: set[tuple[int, int]], n_layers: int) -> np.ndarray:
    return np.asarray(sorted(layer / n_layers for layer, _ in keys), dtype=np.float64)


def _bin_counts(depths: np.ndarray, bins: int) -> np.ndarray:
    return np.bincount(np.minimum((depths * bins).astype(np.int64), bins - 1), minlength=bins)


def _random_depths(rng: np.random.Generator, size: int, layers: Sequence[int], n_layers: int,
                   n_neurons: int, n_sim: int) -> list[np.ndarray]:
    """Relative depths of ``n_sim`` random sets of ``size`` neurons drawn from ``layers``."""
    lay = np.asarray(layers, dtype=np.int64)
    size = min(size, lay.size * n_neurons)
    out = []
    for _ in range(n_sim):
        flat = rng.choice(lay.size * n_neurons, size, replace=False)
        out.append(np.sort(lay[flat // n_neurons] / n_layers))
    return out


def _depth_rows(la: str, lb: str, a: NeuronSet, b: NeuronSet, kind: str, bins: int, n_sim: int
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Overlap by relative-depth bins and the 1-Wasserstein distance, per common group, with chance."""
    from scipy.stats import wasserstein_distance

    ga, gb = _groups(a), _groups(b)
    La, Lb = _n_layers(a), _n_layers(b)
    layers_a, layers_b = a.layers or list(range(La)), b.layers or list(range(Lb))
    rows, dist = [], []
    for g in [x for x in ga if x in gb]:
        da, db = _depths(ga[g], La), _depths(gb[g], Lb)
        rng = rng_for("compare-depth", la, lb, g)
        ca, cb = _bin_counts(da, bins), _bin_counts(db, bins)
        shared = int(np.minimum(ca, cb).sum())
        union = da.size + db.size - shared
        ra = _random_depths(rng, da.size, layers_a, La, _n_neurons(a), n_sim)
        rb = _random_depths(rng, db.size, layers_b, Lb, _n_neurons(b), n_sim)
        sims = np.asarray([np.minimum(_bin_counts(x, bins), _bin_counts(y, bins)).sum() for x, y in zip(ra, rb,
                                                                                                        strict=True)])
        j = sims / np.maximum(da.size + db.size - sims, 1)
        rows.append({"a": la, "b": lb, "group": g, "kind": kind, "by": "depth", "n_a": int(da.size),
                     "n_b": int(db.size), "shared": shared, "jaccard": shared / union if union else None,
                     "chance_jaccard": float(j.mean()) if union else None, "chance_sd": float(j.std(ddof=1)),
                     "p_value": float((1 + (sims >= shared).sum()) / (1 + n_sim)), "chance_method": "simulated",
                     "bins": bins})
        if da.size and db.size:
            w = float(wasserstein_distance(da, db))
            wr = np.asarray([wasserstein_distance(da, y) for y in rb if y.size])
            dist.append({"a": la, "b": lb, "group": g, "wasserstein": w, "chance_wasserstein": float(wr.mean()),
                         "chance_sd": float(wr.std(ddof=1)), "p_value": float((1 + (wr <= w).sum()) / (1 + wr.size)),
                         "simulations": n_sim})
    return rows, dist


def _within(label: str, ns: NeuronSet) -> dict[str, Any]:
    sp = specificity(ns.groups, _n_neurons(ns))
    return {"set": label, "groups": sp["jaccard"]["names"], "jaccard": sp["jaccard"]["matrix"],
            "chance": sp["jaccard"].get("chance"), "own": {g: d["own"] for g, d in sp["groups"].items()},
            "shared": {g: d["shared"] for g, d in sp["groups"].items()}, "mean_jaccard": sp["mean_jaccard"],
            "chance_jaccard": sp["chance_jaccard"], "neurons": sp["neurons"], "exclusive": sp["exclusive"],
            "shared_fraction": sp["shared_fraction"], "mostly_shared": sp["mostly_shared"]}


def _halves(label: str, ns: NeuronSet, on_note: Note | None) -> list[dict[str, Any]]:
    """The two split halves a set records (``rank --split-half``), against each other."""
    files = (ns.data.get("split_half") or {}).get("files") or []
    if len(files) != 2:
        return []
    try:
        h = [NeuronSet.load(f) for f in files]
    except Exception as e:  # a moved or deleted half: say so, compare the rest
        if on_note is not None:
            on_note(f"note: {label}: split halves not compared ({e})")
        return []
    return _neuron_rows(f"{label}.half1", f"{label}.half2", h[0], h[1], "split-half")


def _depth_hist(label: str, ns: NeuronSet, bins: int) -> dict[str, Any]:
    g = _groups(ns)
    L = _n_layers(ns)
    return {"set": label, "model": ns.model.get("name"), "n_layers": L,
            "bins": [i / bins for i in range(bins + 1)],
            "counts": _bin_counts(_depths(g[UNION], L), bins).tolist(),
            "groups": {k: _bin_counts(_depths(v, L), bins).tolist() for k, v in g.items() if k != UNION},
            "layers": {str(k): v for k, v in layer_sizes(g[UNION]).items()}}


def compare_sets(
    sets: Sequence[str | Path | NeuronSet],
    *,
    labels: Sequence[str] | None = None,
    similarity: Sequence[str | Path] = (),
    where: Mapping[str, Sequence[str] | str] | None = None,
    by: str | None = None,
    bins: int = 10,
    simulations: int = 1000,
    permutations: int = 10000,
    backend: str = "auto",
    progress: Progress | None = None,
    on_note: Note | None = None,
) -> dict[str, Any]:
    """Compare neuron sets: overlaps against chance, within-set specificity, depth, value similarity.

    Parameters
    ----------
    sets
        Neuron-set files (or sets); one is enough for the within-set comparison.
    labels
        A label per set (default: the file stems, made unique).
    similarity
        Stores whose statistics give value-similarity matrices (per language of the ``lang`` column).
    where
        For the similarity matrices: ``{column: values}``; the values of ``lang`` are the languages
        (default every language of the store; a store without ``lang`` has one matrix, ``"all"``).
    by
        Label column of the similarity's groups (default the sets' ``by``, else ``value``).
    bins
        Relative-depth bins of the cross-model overlap and of ``depth_hist``.
    simulations
        Random draws of the simulated chance levels (cross-model).
    permutations
        Permutations of the similarity agreement's p-value.
    backend, progress, on_note
        Statistics kernels, progress reporter, note callback.

    Returns
    -------
    dict
        The ``vstore-compare`` v1 document (``docs/show-compare.md``).
    """
    if not sets and not similarity:
        raise UsageError("give at least one neuron set (or a similarity store) to compare", "sets")
    for name, v in (("bins", bins), ("simulations", simulations), ("permutations", permutations)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 2:
            raise UsageError(f"{name} must be an integer >= 2, got {v!r}", name)
    loaded = [s if isinstance(s, NeuronSet) else NeuronSet.load(s) for s in sets]
    names = _labels(loaded, labels)
    overlaps: list[dict[str, Any]] = []
    depth: list[dict[str, Any]] = []
    for i in range(len(loaded)):
        for j in range(i + 1, len(loaded)):
            a, b = loaded[i], loaded[j]
            kind = _kind(a, b)
            if _model_key(a) == _model_key(b):
                overlaps += _neuron_rows(names[i], names[j], a, b, kind)
            else:
                rows, dist = _depth_rows(names[i], names[j], a, b, kind, bins, simulations)
                overlaps += rows
                depth += dist
    for label, ns in zip(names, loaded, strict=True):
        overlaps += _halves(label, ns, on_note)
    by_col = by or next((ns.data.get("by") for ns in loaded if ns.data.get("by")), None) or "value"
    matrices = similarity_matrices(similarity, loaded, by=by_col, where=where, backend=backend, progress=progress,
                                   on_note=on_note)
    doc = {"format": dict(COMPARE_FORMAT),
           "sets": [_set_info(n, ns) for n, ns in zip(names, loaded, strict=True)],
           "overlaps": overlaps,
           "within": [_within(n, ns) for n, ns in zip(names, loaded, strict=True)],
           "depth": depth,
           "depth_hist": [_depth_hist(n, ns, bins) for n, ns in zip(names, loaded, strict=True)],
           "similarity": matrices,
           "similarity_agreement": similarity_agreement(matrices, permutations=permutations)}
    return json_safe(doc)  # type: ignore[no-any-return]
