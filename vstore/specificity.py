"""How specific the groups of a neuron set are, and what overlap chance alone would give.

* :func:`specificity`: per group, its own neurons (in no other group) and its shared ones, the
  Jaccard index of every pair of groups (:func:`vstore.neuronset.jaccard`, the one Jaccard), how
  many groups each neuron is assigned to, and whether most of the set is shared;
* :func:`keep_exclusive`: the groups restricted to neurons assigned to at most ``n`` groups
  (``vstore rank --exclusive N``);
* :func:`chance_jaccard`: the Jaccard index of two random sets with the same per-layer sizes —
  exact (a sum of independent hypergeometric counts, one per layer), or simulated
  (:func:`simulate_jaccard`) — with its spread and the p-value of an observed overlap.

Used by ``vstore rank`` (the ``specificity`` block of a neuron set) and ``vstore compare``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .neuronset import jaccard, neuron_keys

__all__ = ["ChanceLevel", "annotate_rank", "annotate_set", "chance_jaccard", "check_exclusive", "keep_exclusive", "layer_sizes", "simulate_jaccard", "specificity"]

Items = Sequence[Mapping[str, Any]]

#: A set counts as mostly shared when more than this fraction of its neurons is in two or more groups.
MOSTLY_SHARED = 0.5


@dataclass(frozen=True)
class ChanceLevel:
    """The Jaccard index of random sets: its mean, standard deviation, and P(overlap >= observed)."""

    mean: float | None
    sd: float | None
    p_value: float | None
    method: str  # "exact" or "simulated"

    def to_json(self) -> dict[str, Any]:
        return {"chance_jaccard": self.mean, "chance_sd": self.sd, "p_value": self.p_value, "chance_method": self.method}


def layer_sizes(items: Items | set[tuple[int, int]]) -> dict[int, int]:
    """Neurons per model layer of a neuron list (duplicates counted once)."""
    out: dict[int, int] = {}
    for layer, _ in neuron_keys(items):
        out[layer] = out.get(layer, 0) + 1
    return dict(sorted(out.items()))


@functools.lru_cache(maxsize=4096)
def _hypergeom_pmf(n_neurons: int, a: int, b: int) -> np.ndarray:
    """P(X = x), x = 0..min(a, b), for the overlap X of two uniform random subsets of sizes a and b of n_neurons."""
    from scipy.special import gammaln

    x = np.arange(0, min(a, b) + 1, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        logp = (gammaln(a + 1) - gammaln(x + 1) - gammaln(a - x + 1)
                + gammaln(n_neurons - a + 1) - gammaln(b - x + 1) - gammaln(n_neurons - a - b + x + 1)
                - gammaln(n_neurons + 1) + gammaln(b + 1) + gammaln(n_neurons - b + 1))
    p = np.where(x >= a + b - n_neurons, np.exp(logp), 0.0)  # below max(0, a + b - N) the overlap is impossible
    out = np.asarray(p / p.sum())
    out.flags.writeable = False  # shared by every caller (cached)
    return out


def _shared_pmf(sizes_a: Mapping[int, int], sizes_b: Mapping[int, int], n_neurons: int) -> np.ndarray:
    """P(X = x) for X, the neurons two random sets share: per layer hypergeometric, summed over layers."""
    pmf = np.ones(1)
    for layer in sorted(set(sizes_a) & set(sizes_b)):
        a, b = int(sizes_a[layer]), int(sizes_b[layer])
        if a == 0 or b == 0:
            continue
        pmf = np.convolve(pmf, _hypergeom_pmf(n_neurons, a, b))
    return pmf


def chance_jaccard(sizes_a: Mapping[int, int], sizes_b: Mapping[int, int], n_neurons: int,
                   observed_shared: int | None = None) -> ChanceLevel:
    """The exact chance level of the Jaccard index of two neuron sets of one model.

    Random sets are drawn independently, uniformly within each layer, with the sets' per-layer sizes;
    the neurons they share in a layer are hypergeometric, and the Jaccard index ``X / (a + b - X)``
    is a function of their sum ``X`` over layers, whose distribution is the convolution of the layers'.

    Parameters
    ----------
    sizes_a, sizes_b
        Neurons per model layer of each set.
    n_neurons
        Neurons per layer of the model.
    observed_shared
        Neurons the two real sets share: the p-value is ``P(X >= observed_shared)``.

    Returns
    -------
    ChanceLevel
        Mean and standard deviation of the random Jaccard index (None when both sets are empty).
    """
    a, b = sum(sizes_a.values()), sum(sizes_b.values())
    if a + b == 0:
        return ChanceLevel(None, None, None, "exact")
    pmf = _shared_pmf(sizes_a, sizes_b, n_neurons)
    x = np.arange(pmf.size, dtype=np.float64)
    j = x / (a + b - x)
    mean = float((pmf * j).sum())
    sd = math.sqrt(max(0.0, float((pmf * j * j).sum()) - mean * mean))
    p = None if observed_shared is None else float(min(1.0, pmf[int(observed_shared):].sum()))
    return ChanceLevel(mean, sd, p, "exact")


def simulate_jaccard(sizes_a: Mapping[int, int], sizes_b: Mapping[int, int], n_neurons: int, *,
                     observed_shared: int | None = None, n_sim: int = 2000, seed: int = 0) -> ChanceLevel:
    """:func:`chance_jaccard` by drawing ``n_sim`` pairs of random sets (p-value ``(1 + hits) / (1 + n_sim)``)."""
    rng = np.random.default_rng(seed)
    a, b = sum(sizes_a.values()), sum(sizes_b.values())
    if a + b == 0:
        return ChanceLevel(None, None, None, "simulated")
    shared = np.zeros(n_sim, dtype=np.int64)
    for layer in set(sizes_a) & set(sizes_b):
        ka, kb = int(sizes_a[layer]), int(sizes_b[layer])
        for s in range(n_sim):
            ra = rng.choice(n_neurons, ka, replace=False)
            rb = rng.choice(n_neurons, kb, replace=False)
            shared[s] += np.intersect1d(ra, rb, assume_unique=True).size
    j = shared / (a + b - shared)
    p = None if observed_shared is None else float((1 + (shared >= observed_shared).sum()) / (1 + n_sim))
    return ChanceLevel(float(j.mean()), float(j.std(ddof=1)) if n_sim > 1 else 0.0, p, "simulated")


def _assigned(keys: Mapping[str, set[tuple[int, int]]]) -> dict[tuple[int, int], int]:
    """How many groups each neuron is assigned to."""
    count: dict[tuple[int, int], int] = {}
    for ks in keys.values():
        for k in ks:
            count[k] = count.get(k, 0) + 1
    return count


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def specificity(groups: Mapping[str, Items | set[tuple[int, int]]], n_neurons: int | None = None) -> dict[str, Any]:
    """How many of each group's neurons are its own, and how much the groups overlap.

    Parameters
    ----------
    groups
        Group name -> neuron list (or set of ``(layer, neuron)`` pairs).
    n_neurons
        Neurons per layer of the model: adds the exact chance level of every pair's Jaccard index
        (random sets with the pair's per-layer sizes).

    Returns
    -------
    dict
        ``neurons`` (distinct neurons in the set), ``exclusive`` (in one group) and ``shared`` (in
        two or more), ``shared_fraction``, ``mostly_shared`` (``shared_fraction > 0.5``),
        ``assigned`` (``{groups a neuron is in: neurons}``), ``mean_jaccard`` (over pairs of
        groups), ``chance_jaccard`` (its chance level, with ``n_neurons``), ``groups`` (per group:
        ``neurons``, ``own``, ``shared``, ``shared_fraction``, ``mean_jaccard``), and ``jaccard``
        (``names`` and the pairwise ``matrix``; ``chance`` with ``n_neurons``). See docs/neuron-set.md.
    """
    names = list(groups)
    keys = {g: neuron_keys(groups[g]) for g in names}
    count = _assigned(keys)
    union = len(count)
    exclusive = sum(1 for c in count.values() if c == 1)
    matrix = [[jaccard(keys[a], keys[b]) for b in names] for a in names]
    chance: list[list[float | None]] | None = None
    if n_neurons is not None:
        sizes = {g: layer_sizes(keys[g]) for g in names}
        chance = [[None] * len(names) for _ in names]
        for i, a in enumerate(names):
            for j in range(i + 1, len(names)):  # symmetric
                chance[i][j] = chance[j][i] = chance_jaccard(sizes[a], sizes[names[j]], n_neurons).mean
    full = [i for i, g in enumerate(names) if keys[g]]  # pairs with an empty group say nothing
    pairs = [(i, j) for i in full for j in full if j > i]
    per_group = {}
    for i, g in enumerate(names):
        own = sum(1 for k in keys[g] if count[k] == 1)
        n = len(keys[g])
        per_group[g] = {"neurons": n, "own": own, "shared": n - own, "shared_fraction": (n - own) / n if n else None,
                        "mean_jaccard": _mean([matrix[i][j] for j in full if j != i]) if n else None}
    fraction = (union - exclusive) / union if union else 0.0
    assigned: dict[str, int] = {}
    for c in sorted(count.values()):
        assigned[str(c)] = assigned.get(str(c), 0) + 1
    out: dict[str, Any] = {
        "neurons": union, "exclusive": exclusive, "shared": union - exclusive, "shared_fraction": fraction,
        "mostly_shared": fraction > MOSTLY_SHARED, "assigned": assigned,
        "mean_jaccard": _mean([matrix[i][j] for i, j in pairs]),
        "chance_jaccard": _mean([chance[i][j] for i, j in pairs]) if chance is not None else None,
        "groups": per_group, "jaccard": {"names": names, "matrix": matrix},
    }
    if chance is not None:
        out["jaccard"]["chance"] = chance
    return out


def keep_exclusive(groups: Mapping[str, list[dict[str, Any]]], n: int) -> tuple[dict[str, list[dict[str, Any]]],
                                                                                dict[str, int]]:
    """The groups with only the neurons assigned to at most ``n`` groups, and how many each lost.

    Order within a group is kept (the rank order of the selection).
    """
    check_exclusive(n)
    count = _assigned({g: neuron_keys(items) for g, items in groups.items()})
    kept = {g: [it for it in items if count[(int(it["layer"]), int(it["neuron"]))] <= n] for g, items in groups.items()}
    return kept, {g: len(groups[g]) - len(kept[g]) for g in groups}


def check_exclusive(n: int | None) -> None:
    """Raise ``UsageError`` unless ``n`` is None or an integer >= 1."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        from .errors import UsageError

        raise UsageError(f"exclusive must be an integer >= 1 (groups a neuron may be in), got {n!r}", "exclusive")


def annotate_set(doc: dict[str, Any], *, exclusive: int | None = None) -> dict[str, Any]:
    """Add the ``specificity`` block to a neuron-set document, after keeping only neurons assigned to at most
    ``exclusive`` groups (recorded as ``params.selection.exclusive`` and ``params.exclusive_dropped``).

    Returns the block (see :func:`specificity`; with ``exclusive`` it also has ``before_exclusive``).
    """
    check_exclusive(exclusive)
    before = None
    if exclusive is not None:
        before = specificity(doc["groups"])
        doc["groups"], dropped = keep_exclusive(doc["groups"], exclusive)
        params = doc.setdefault("params", {})
        params.setdefault("selection", {})["exclusive"] = exclusive
        params["exclusive_dropped"] = dropped
    n = doc.get("n_neurons") or (doc.get("model") or {}).get("n_neurons")
    block = specificity(doc["groups"], int(n) if n else None)
    if before is not None:
        block["before_exclusive"] = {k: before[k] for k in ("neurons", "exclusive", "shared", "shared_fraction",
                                                             "mean_jaccard")}
    doc["specificity"] = block
    return block


def annotate_rank(result: Any, exclusive: int | None) -> None:
    """:func:`annotate_set` on a :class:`vstore.rank.RankResult` and its split halves (whose per-group
    Jaccard index is then recomputed on the exclusive sets)."""
    for r in (result, *(result.halves or ())):
        annotate_set(r.data, exclusive=exclusive)
    if result.halves is not None and exclusive is not None:
        h1, h2 = result.halves
        result.jaccard = {g: jaccard(h1.groups.get(g, []), h2.groups.get(g, [])) for g in result.groups}
        result.data["split_half"]["jaccard"] = result.jaccard
