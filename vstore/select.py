"""Selection of neurons from score matrices: global top-k, per-layer top-k, top-rate, threshold,
LAPE's selection for vape, and the one random-control sampler (:func:`control_set`).

Selections return ``(layer position, neuron, score)`` triples, best first. The top-k itself runs in
native code (:func:`vstore.kernels.select_top_k`: k largest finite keys, ties to the lower index), so
selecting from hundreds of thousands of neurons per group stays fast.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .errors import UsageError

__all__ = ["Selection", "control_set", "lape_select", "rank_keys", "select_neurons"]

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
        """Raise UsageError for contradictory or out-of-range settings."""
        names = ("top_k", "per_layer_k", "top_rate")
        given = [n for n, v in zip(names, (self.top_k, self.per_layer_k, self.top_rate), strict=True) if v is not None]
        if len(given) > 1:
            raise UsageError(f"choose one of top_k, per_layer_k, top_rate (got {', '.join(given)})", *names)
        for name, v in (("top_k", self.top_k), ("per_layer_k", self.per_layer_k)):
            if v is not None and v < 0:
                raise UsageError(f"{name} must be >= 0, got {v}", name)
        if self.top_rate is not None and not 0 <= self.top_rate <= 1:
            raise UsageError(f"top_rate must be within [0, 1], got {self.top_rate}", "top_rate")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise UsageError(f"threshold must be a finite number, got {self.threshold}", "threshold")

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
    values = scores.reshape(-1)  # a copy when scores is a strided view: taken once
    return [(int(i // N), int(i % N), float(values[i])) for i in idx]


def control_set(reference: Mapping[int, np.ndarray], n_neurons: int, seed: int, group: str) -> dict[int, np.ndarray]:
    """The random control of a neuron set: as many neurons in each layer as ``reference`` has there.

    This is the one random-control sampler of vstore (``rank --method random --neurons`` and the
    controls of ``ablate``). In each layer, ``k`` neurons are drawn uniformly without replacement
    from the neurons of the layer outside the reference (from the whole layer when the reference
    fills more than half of it). The draw depends only on ``seed``, the group name and the layer,
    so it is the same on every run and every machine.

    Parameters
    ----------
    reference
        Model layer index -> the reference's neuron indices in that layer.
    n_neurons
        Neurons per layer.
    seed, group
        Where the draw comes from.

    Returns
    -------
    dict
        Model layer index -> sorted int64 neuron indices.

    Raises
    ------
    UsageError
        A layer of the reference holds more neurons than the layer has.
    """
    out: dict[int, np.ndarray] = {}
    for layer, idx in sorted(reference.items()):
        k = len(idx)
        if k > n_neurons:
            raise UsageError(f"reference: cannot draw {k} neurons from a layer of {n_neurons}", "reference")
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(group.encode("utf-8")), int(layer)])
        pool = np.setdiff1d(np.arange(n_neurons, dtype=np.int64), idx) if 2 * k <= n_neurons else np.arange(n_neurons)
        out[int(layer)] = np.sort(rng.choice(pool, size=k, replace=False)).astype(np.int64)
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
    for name, v in (("filter_rate", filter_rate), ("bar_ratio", bar_ratio), ("top_rate", top_rate)):
        if not 0 <= v <= 1:
            raise UsageError(f"{name} must be within [0, 1], got {v}", name)
    if top_k is not None and top_k < 0:
        raise UsageError(f"top_k must be >= 0, got {top_k}", "top_k")
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
