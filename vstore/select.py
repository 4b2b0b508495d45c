"""Selection of neurons from score matrices: global top-k, per-layer top-k, top-rate, threshold,
LAPE's selection for vape, and per-layer counts matched to a reference set (the random control).

Selections return ``(layer position, neuron, score)`` triples, best first. The top-k itself runs in
native code (:func:`vstore.kernels.select_top_k`: k largest finite keys, ties to the lower index), so
selecting from hundreds of thousands of neurons per group stays fast.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .errors import VstoreError

__all__ = ["Selection", "lape_select", "rank_keys", "select_matching", "select_neurons"]

Item = tuple[int, int, float]


@dataclass(frozen=True)
class Selection:
    """How to select neurons per group (exactly one of ``top_k``, ``per_layer_k``, ``top_rate`` or
    none, optionally with ``threshold``)."""

    top_k: int | None = None
    per_layer_k: int | None = None
    top_rate: float | None = None
    threshold: float | None = None
    by_abs: bool = False

    def validate(self) -> None:
        """Raise VstoreError for contradictory or out-of-range settings."""
        given = [n for n, v in (("--top-k", self.top_k), ("--per-layer-k", self.per_layer_k),
                                ("--top-rate", self.top_rate)) if v is not None]
        if len(given) > 1:
            raise VstoreError(f"choose one of --top-k, --per-layer-k, --top-rate (got {', '.join(given)})")
        for name, v in (("--top-k", self.top_k), ("--per-layer-k", self.per_layer_k)):
            if v is not None and v < 0:
                raise VstoreError(f"{name} must be >= 0, got {v}")
        if self.top_rate is not None and not 0 <= self.top_rate <= 1:
            raise VstoreError(f"--top-rate must be within [0, 1], got {self.top_rate}")

    def to_json(self) -> dict[str, object]:
        return {"top_k": self.top_k, "per_layer_k": self.per_layer_k, "top_rate": self.top_rate,
                "threshold": self.threshold, "abs": self.by_abs}


def rank_keys(scores: np.ndarray, *, by_abs: bool = False, centre: float = 0.0,
              lower_is_better: bool = False) -> npt.NDArray[np.float64]:
    """Keys where larger is better: the score, ``|score - centre|`` with ``by_abs``, or ``-score``."""
    s = np.asarray(scores, dtype=np.float64)
    if by_abs:
        return np.abs(s - centre)
    return -s if lower_is_better else s.copy()


def _top(keys: np.ndarray, k: int, backend: str) -> npt.NDArray[np.int64]:
    from . import kernels

    if k <= 0 or keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    return kernels.select_top_k(np.ascontiguousarray(keys, dtype=np.float64), int(k), backend=backend)


def _order(keys_flat: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``idx`` sorted by key, largest first, ties to the lower index."""
    idx = np.sort(idx)
    return idx[np.argsort(-keys_flat[idx], kind="stable")]


def select_neurons(
    scores: np.ndarray,
    sel: Selection,
    *,
    centre: float = 0.0,
    lower_is_better: bool = False,
    backend: str = "auto",
) -> list[Item]:
    """Select neurons of one group from its (L, N) scores.

    Parameters
    ----------
    scores
        (L, N) scores of one group (NaN/Inf are never selected).
    sel
        The selection. Without any of top-k/per-layer-k/top-rate, every neuron passing the
        threshold is kept (and without a threshold, 1% of all neurons: ``top_rate=0.01``).
    centre, lower_is_better
        How keys are formed (see :func:`rank_keys`); a threshold applies to the key.
    backend
        Kernel backend of the top-k.

    Returns
    -------
    list of (layer position, neuron, score), best first.
    """
    sel.validate()
    L, N = scores.shape
    keys = rank_keys(scores, by_abs=sel.by_abs, centre=centre, lower_is_better=lower_is_better)
    if sel.threshold is not None:
        t = -sel.threshold if (lower_is_better and not sel.by_abs) else sel.threshold
        keys = np.where(keys >= t, keys, np.nan)
    flat = keys.reshape(-1)
    if sel.per_layer_k is not None:
        picked = [li * N + _top(keys[li], sel.per_layer_k, backend) for li in range(L)]
        idx = np.concatenate(picked) if picked else np.zeros(0, np.int64)
        idx = _order(flat, idx)
    else:
        if sel.top_k is not None:
            k = sel.top_k
        elif sel.top_rate is not None:
            k = round(L * N * sel.top_rate)
        elif sel.threshold is not None:
            k = L * N
        else:
            k = round(L * N * 0.01)
        idx = _top(flat, k, backend)
    return [(int(i // N), int(i % N), float(scores.reshape(-1)[i])) for i in idx]


def select_matching(scores: np.ndarray, counts: Mapping[int, int], *, backend: str = "auto") -> list[Item]:
    """The ``counts[layer position]`` best neurons of each layer (largest scores), best first per layer.

    Used by the random control: with random scores this is a uniform draw of the same per-layer
    sizes as a reference set.
    """
    L, N = scores.shape
    out: list[Item] = []
    for li in range(L):
        k = int(counts.get(li, 0))
        if k > N:
            raise VstoreError(f"cannot draw {k} neurons from a layer of {N}")
        for n in _top(scores[li], k, backend):
            out.append((li, int(n), float(scores[li, n])))
    return out


def lape_select(
    prob: np.ndarray,
    entropy: np.ndarray,
    *,
    top_rate: float = 0.01,
    filter_rate: float = 0.95,
    bar_ratio: float = 0.95,
    top_k: int | None = None,
    backend: str = "auto",
) -> tuple[list[list[Item]], dict[str, float]]:
    """LAPE's selection (Tang et al. 2024, ``identify.py``) on activation probabilities.

    1. ``top_prob``: the ``filter_rate`` quantile of all probabilities (``sorted[round(n * rate) - 1]``);
       a neuron whose largest probability is not above it is dropped (entropy set to inf).
    2. The ``round(L * N * top_rate)`` (or ``top_k``) lowest finite entropies are kept (ties to the
       lower flat index, as a stable argsort).
    3. ``bar``: the ``bar_ratio`` quantile of all probabilities; a kept neuron goes to every group
       whose probability exceeds it.

    Parameters
    ----------
    prob
        (L, G, N) activation probabilities.
    entropy
        (L, N) entropies (:func:`vstore.scoring.lape_entropy`).

    Returns
    -------
    per-group lists of (layer position, neuron, entropy), lowest entropy first, and the
    thresholds ``{"top_prob", "bar", "kept"}``.
    """
    L, G, N = prob.shape
    for name, v in (("--filter-rate", filter_rate), ("--bar-ratio", bar_ratio), ("--top-rate", top_rate)):
        if not 0 <= v <= 1:
            raise VstoreError(f"{name} must be within [0, 1], got {v}")
    if top_k is not None and top_k < 0:
        raise VstoreError(f"--top-k must be >= 0, got {top_k}")
    flat = np.sort(prob.reshape(-1))
    if flat.size == 0:
        return [[] for _ in range(G)], {"top_prob": float("nan"), "bar": float("nan"), "kept": 0}
    i_top = round(len(flat) * filter_rate) - 1
    i_bar = round(len(flat) * bar_ratio) - 1
    top_prob = float(flat[max(i_top, 0)]) if i_top >= 0 else -np.inf
    bar = float(flat[max(i_bar, 0)]) if i_bar >= 0 else -np.inf
    ent = np.where(prob.max(axis=1) > top_prob, entropy, np.inf)
    k = int(top_k) if top_k is not None else round(L * N * top_rate)
    kept = _top(-ent.reshape(-1), k, backend)  # lowest finite entropies, ties to the lower index
    out: list[list[Item]] = [[] for _ in range(G)]
    for i in kept:
        li, n = int(i // N), int(i % N)
        for g in np.flatnonzero(prob[li, :, n] > bar):
            out[int(g)].append((li, n, float(entropy[li, n])))
    return out, {"top_prob": top_prob, "bar": bar, "kept": len(kept)}


def per_layer_counts(items: Sequence[Item], n_layers: int) -> list[int]:
    """How many items fall in each layer position."""
    c = [0] * n_layers
    for li, _, _ in items:
        c[li] += 1
    return c
