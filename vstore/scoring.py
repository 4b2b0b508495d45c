"""Scoring methods: one score per (layer, target group, neuron), all from cached statistics.

This module holds the functions; :mod:`vstore.methods` holds the one table that names them, says
what each needs, and dispatches (``vstore.methods.score``).

Every method but ``auroc`` and ``random`` needs only the sufficient statistics of
:mod:`vstore.stats` (counts, sums, sums of squares, counts of activation > 0); ``auroc`` needs the
histogram pass (:func:`vstore.stats.compute_auroc`); ``random`` needs nothing but the shape.

Contrastive scores compare each group with the rest of the rows (every other group), or, with a
contrast, the group's first side with its second; they are signed so that larger means more active
in the group (first side). The methods:

``vape`` (alias ``lape``)
    Value Activation Probability Entropy, LAPE's procedure: the activation probability of each
    neuron in each group, normalised over the groups, and its entropy. Lower is better; the
    selection is :func:`vstore.select.select_vape`.
``prob-diff``
    P(act > 0 | group) - P(act > 0 | rest).
``mean``
    mean(group): the plain mean of each group's rows (with a contrast, of the first side). On an
    attribution site (``attr``) it is the mean estimated margin change of zeroing the neuron; the
    ``attribution`` method is this function on that site, most negative first.
``mean-diff``
    mean(group) - mean(rest).
``cohen-d``
    mean difference over the pooled standard deviation.
``welch-t``
    Welch's t statistic (unequal variances), with its degrees of freedom and two-sided p-value.
``auroc``
    Mann-Whitney AUROC of group vs rest (0.5: no difference); exact for float16/bfloat16 stores.
``probeless``
    NeuroX's probeless ranking for a tag: the sum over the other groups of the absolute difference
    of mean activations, ``sum_j |mean_g - mean_j|`` (with a contrast, ``|mean_a - mean_b|``); never
    negative.
``random``
    Uniform random scores from a seed: a control.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from . import kernels
from .errors import UsageError
from .stats import AurocResult, GroupStats, targets

__all__ = [
    "Deferred",
    "Scores",
    "activation_probability",
    "auroc_scores",
    "cohen_d",
    "group_mean",
    "lape_entropy",
    "mean_diff",
    "prob_diff",
    "probeless",
    "random_scores",
    "vape",
    "welch_t",
]

class Deferred:
    """A float64 array computed when first used whole (``np.asarray``, ``np.savez``, a slice); a
    single element ``a[i, j, k]`` is computed alone. Welch's p-values cost more than the rest of a
    rank together, and a neuron file needs only those of the selected neurons."""

    def __init__(self, shape: tuple[int, ...], full: Callable[[], np.ndarray],
                 one: Callable[[tuple[int, ...]], float]) -> None:
        self.shape, self.ndim, self.dtype = shape, len(shape), np.dtype(np.float64)
        self._full, self._one = full, one
        self._value: np.ndarray | None = None

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if self._value is None:
            self._value = np.asarray(self._full(), dtype=np.float64)
        if dtype is not None and np.dtype(dtype) != self._value.dtype:
            return self._value.astype(dtype)
        return self._value.copy() if copy else self._value

    def __getitem__(self, key: Any) -> Any:
        if self._value is None and isinstance(key, tuple) and len(key) == self.ndim \
                and all(isinstance(k, (int, np.integer)) for k in key):
            return self._one(tuple(int(k) for k in key))
        return np.asarray(self)[key]


@dataclass
class Scores:
    """Scores of one method.

    Attributes
    ----------
    method
        Canonical method name.
    targets
        Target group names (``T``): the base groups (label categories, or ``all``).
    layers
        Model layer index of each layer position (``L``).
    values
        float64 (L, T, N) scores (NaN: undefined, e.g. a group without rows; never selected).
    extra
        Further arrays for the ``.npz`` (e.g. ``p`` and ``df`` of welch-t, ``prob`` of vape); an
        entry may be a :class:`Deferred` (welch-t's ``p``), which ``np.asarray`` computes.
    lower_is_better
        True for vape's entropy.
    centre
        The "no effect" value (0, or 0.5 for AUROC); ``--abs`` ranks by ``|score - centre|``.
    """

    method: str
    targets: list[str]
    layers: list[int]
    values: npt.NDArray[np.float64]
    extra: dict[str, Any] = field(default_factory=dict)
    lower_is_better: bool = False
    centre: float = 0.0


# ---------------------------------------------------------------------------------------------------
def activation_probability(stats: GroupStats) -> npt.NDArray[np.float64]:
    """P(activation > 0) per (layer, group, neuron); 0 for a group without rows."""
    return stats.prob()


@dataclass
class _Pair:
    n1: np.ndarray
    s1: np.ndarray
    q1: np.ndarray
    p1: np.ndarray
    n0: np.ndarray
    s0: np.ndarray
    q0: np.ndarray
    p0: np.ndarray


def _pairs(stats: GroupStats) -> tuple[list[str], _Pair]:
    """Moments of both sides of every target: counts, sums, sumsq, npos (L, T, N), float64."""
    tg = targets(stats.base or stats.groups, stats.sides)
    n = stats.valid().astype(np.float64)  # rows with a finite value, per neuron
    x = (n, stats.sum, stats.sumsq, stats.npos.astype(np.float64))
    pos = [p[0] for _, p, _ in tg]  # every side is one group (vstore.stats.targets)
    side1 = list(x) if pos == list(range(x[0].shape[1])) else [v[:, pos] for v in x]
    if tg and tg[0][2] is not None:
        side0 = [v[:, [ng[0] for _, _, ng in tg]] for v in x]  # type: ignore[index]
    else:  # the rest: every row but the group's (NaN where a sum is not finite)
        with np.errstate(invalid="ignore"):
            side0 = [v.sum(axis=1, keepdims=True) - a for v, a in zip(x, side1, strict=True)]
    return [t[0] for t in tg], _Pair(*side1, *side0)


def _mean_var(n: np.ndarray, s: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(divide="ignore", invalid="ignore"):
        m = s / n
        v = np.maximum(q - s * m, 0.0) / (n - 1)
    return np.where(n > 0, m, np.nan), np.where(n > 1, v, np.nan)


def _scores(method: str, stats: GroupStats, names: list[str], values: np.ndarray, **kw: object) -> Scores:
    return Scores(method, names, list(stats.layers), values, **kw)  # type: ignore[arg-type]


def prob_diff(stats: GroupStats) -> Scores:
    """P(act > 0 | group) - P(act > 0 | rest)."""
    names, pr = _pairs(stats)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = pr.p1 / pr.n1 - pr.p0 / pr.n0
    return _scores("prob-diff", stats, names, np.where((pr.n1 > 0) & (pr.n0 > 0), d, np.nan))


def group_mean(stats: GroupStats) -> Scores:
    """mean(group) per (layer, group, neuron); NaN for a group without rows (with a contrast: side a)."""
    names, pr = _pairs(stats)
    m, _ = _mean_var(pr.n1, pr.s1, pr.q1)
    return _scores("mean", stats, names, m)


def mean_diff(stats: GroupStats) -> Scores:
    """mean(group) - mean(rest)."""
    names, pr = _pairs(stats)
    m1, _ = _mean_var(pr.n1, pr.s1, pr.q1)
    m0, _ = _mean_var(pr.n0, pr.s0, pr.q0)
    return _scores("mean-diff", stats, names, m1 - m0)


def cohen_d(stats: GroupStats) -> Scores:
    """Cohen's d: (mean(group) - mean(rest)) / pooled standard deviation (0 when both are constant and equal)."""
    names, pr = _pairs(stats)
    m1, v1 = _mean_var(pr.n1, pr.s1, pr.q1)
    m0, v0 = _mean_var(pr.n0, pr.s0, pr.q0)
    with np.errstate(divide="ignore", invalid="ignore"):
        sp = np.sqrt(((pr.n1 - 1) * v1 + (pr.n0 - 1) * v0) / (pr.n1 + pr.n0 - 2))
        d = (m1 - m0) / sp
    ok = (pr.n1 > 1) & (pr.n0 > 1)
    return _scores("cohen-d", stats, names, np.where(ok, np.nan_to_num(d), np.nan))


def _welch_numpy(stats: GroupStats) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    names, pr = _pairs(stats)
    m1, v1 = _mean_var(pr.n1, pr.s1, pr.q1)
    m0, v0 = _mean_var(pr.n0, pr.s0, pr.q0)
    with np.errstate(divide="ignore", invalid="ignore"):
        a, b = v1 / pr.n1, v0 / pr.n0
        se2 = a + b
        t = (m1 - m0) / np.sqrt(se2)
        df = se2 * se2 / (a * a / (pr.n1 - 1) + b * b / (pr.n0 - 1))
    ok = (pr.n1 > 1) & (pr.n0 > 1)
    return names, np.where(ok, np.nan_to_num(t), np.nan), t, np.where(ok, df, np.nan)


def _welch_native(stats: GroupStats) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    tg = targets(stats.base or stats.groups, stats.sides)
    pos = np.array([p[0] for _, p, _ in tg], dtype=np.int64)
    neg = np.array([-1 if ng is None else ng[0] for _, _, ng in tg], dtype=np.int64)
    c = [np.ascontiguousarray(x, dtype=d) for x, d in ((stats.count, np.int64), (stats.nonfinite, np.int64),
                                                       (stats.sum, np.float64), (stats.sumsq, np.float64))]
    t, raw_t, df = kernels._backend_module("cpp").welch_from_moments(*c, pos, neg)
    return [name for name, _, _ in tg], t, raw_t, df


def welch_t(stats: GroupStats, *, native: bool | None = None) -> Scores:
    """Welch's t (group vs rest), with ``df`` and two-sided ``p`` in ``extra``.

    Matches ``scipy.stats.ttest_ind(group, rest, equal_var=False)``; where the statistic is
    undefined (both sides constant) it is set as ``np.nan_to_num`` would (0, or +-max float).
    ``native`` (default: when ``vstore._C`` is built) computes t and df in one C++ pass, equal bit
    for bit to the NumPy path (``native=False``); ``p`` is a :class:`Deferred`.
    """
    from scipy import special

    use = kernels.native_available() if native is None else native
    names, t, raw_t, df = _welch_native(stats) if use else _welch_numpy(stats)

    def p_value(d: Any, tt: Any) -> Any:
        with np.errstate(invalid="ignore"):
            return 2.0 * special.stdtr(d, -np.abs(tt))  # NaN where df is

    p = Deferred(t.shape, lambda: p_value(df, raw_t), lambda i: float(p_value(df[i], raw_t[i])))
    return _scores("welch-t", stats, names, t, extra={"p": p, "df": df})


def probeless(stats: GroupStats) -> Scores:
    """NeuroX probeless, per tag: ``sum_j |mean_g - mean_j|`` over the other groups (with a contrast,
    ``|mean_a - mean_b|``)."""
    mean = stats.mean()
    if stats.sides:
        S = len(stats.sides)
        vals = np.abs(mean[:, 0::S] - mean[:, 1::S])
        return _scores("probeless", stats, list(stats.base), vals)
    G = mean.shape[1]
    out = np.full(mean.shape, np.nan)
    for g in range(G):
        others = [j for j in range(G) if j != g]
        diff = np.abs(mean[:, [g]] - mean[:, others])
        out[:, g] = np.nansum(diff, axis=1) if others else 0.0
        out[:, g][np.isnan(mean[:, g])] = np.nan
    return _scores("probeless", stats, list(stats.groups), out)


def auroc_scores(result: AurocResult) -> Scores:
    """Scores of ``auroc`` from :func:`vstore.stats.compute_auroc` (``error`` in ``extra``)."""
    return Scores("auroc", list(result.targets), list(result.layers), result.auroc,
                  extra={"auroc_error": result.error}, centre=0.5)


def random_scores(
    target_names: Sequence[str], layers: Sequence[int], n_neurons: int, seed: int
) -> Scores:
    """Uniform random scores in [0, 1) per (layer, target, neuron), from ``seed``."""
    rng = np.random.default_rng(seed)
    vals = rng.random((len(layers), len(target_names), int(n_neurons)))
    return Scores("random", list(target_names), list(layers), vals, centre=0.5)


def lape_entropy(prob: np.ndarray, names: Sequence[str]) -> npt.NDArray[np.float64]:
    """Entropy (L, N) of each neuron's activation probabilities normalised over the groups.

    ``prob`` is (L, G, N). Groups are taken in sorted name order (so the float result does not depend
    on label order); a neuron that never fires has entropy 0 (its normalised probabilities are all 0).
    """
    order = np.argsort(np.asarray(list(names), dtype=object), kind="stable")
    P = np.ascontiguousarray(prob.transpose(0, 2, 1)[:, :, order])  # (L, N, G)
    s = P.sum(-1, keepdims=True)
    norm = P / np.where(s == 0, 1, s)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(norm > 0, norm * np.log(norm), 0.0), axis=-1)
    return np.asarray(ent, dtype=np.float64)


def vape(stats: GroupStats) -> Scores:
    """VAPE/LAPE: entropy of the normalised activation probabilities (lower: more group-specific).

    ``values`` holds the entropy for every target (the same for each); ``extra["prob"]`` the
    probabilities (L, G, N) that assign a kept neuron to its groups.
    """
    if stats.sides:
        raise UsageError(
            "contrast: vape compares groups with one another, not the two sides of a contrast; "
            "rank one side with where, or use a contrastive method", "contrast", "where"
        )
    P = activation_probability(stats)
    ent = lape_entropy(P, stats.groups)
    vals = np.repeat(ent[:, None, :], len(stats.groups), axis=1)
    return Scores("vape", list(stats.groups), list(stats.layers), vals, extra={"prob": P, "entropy": ent},
                  lower_is_better=True)
