"""Statistical inference on paired outcomes: exact tests, bootstrap intervals, target vs controls.

Used by ablation (one neuron set against the unablated model) and by anything that compares results
afterwards; nothing here knows about models or stores.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "N_BOOT",
    "binomial_vs_chance",
    "bootstrap_interval",
    "clean",
    "detectable_drop",
    "json_safe",
    "mcnemar_exact",
    "mcnemar_power",
    "relative",
    "rng_for",
    "sign_test",
    "vs_controls",
    "wilson_interval",
]

#: Bootstrap resamples of :func:`bootstrap_interval`.
N_BOOT = 2000


def mcnemar_exact(before: np.ndarray, after: np.ndarray) -> tuple[float, int, int]:
    """Exact two-sided McNemar test of paired binary outcomes.

    Returns
    -------
    (p_value, b, c)
        ``b`` items won before and lost after, ``c`` the reverse; ``p = 1`` when ``b + c = 0``.
    """
    from scipy.stats import binomtest

    x, y = np.asarray(before, dtype=bool), np.asarray(after, dtype=bool)
    b, c = int((x & ~y).sum()), int((~x & y).sum())
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)
    return min(p, 1.0), b, c


def mcnemar_power(n: int, drop: float, *, flip_rate: float = 0.05, alpha: float = 0.05) -> float:
    """Power of the exact two-sided McNemar test (as :func:`mcnemar_exact`, rejecting at ``p < alpha``)
    to detect a drop of value consistency by ``drop`` over ``n`` paired items.

    The model: by chance, a share ``flip_rate`` of the items turn from won to lost and as many from
    lost to won (what a random control does); the ablation turns a further ``drop`` of the items from
    won to lost. So the discordant pairs are ``b ~ n (drop + flip_rate)`` and ``c ~ n flip_rate``,
    and the power is exact over their multinomial distribution.
    """
    from scipy.stats import binom

    pb, pc = drop + flip_rate, flip_rate
    psi = pb + pc
    if n <= 0 or psi <= 0 or pb > 1 or psi > 1:
        return 0.0
    m = np.arange(n + 1)
    # per number m of discordant pairs, the smallest b with a two-sided exact p < alpha (p = 2 P(X >= b))
    ks = np.arange(n + 2)
    power = 0.0
    pm = binom.pmf(m, n, psi)
    for mi in m[pm > 1e-15]:
        tail = 2.0 * binom.sf(ks[: mi + 1] - 1, mi, 0.5)
        hits = np.flatnonzero((tail < alpha) & (ks[: mi + 1] * 2 > mi))
        if hits.size:
            k = int(hits[0])
            q = pb / psi
            power += float(pm[mi]) * float(binom.sf(k - 1, mi, q) + binom.cdf(mi - k, mi, q))
    return min(power, 1.0)


def detectable_drop(n: int, baseline: float, *, flip_rate: float = 0.05, alpha: float = 0.05, power: float = 0.8,
                    step: float = 0.005) -> float | None:
    """The smallest drop of value consistency (absolute, on ``step``'s grid) that ``n`` paired items
    detect with the given ``power`` (:func:`mcnemar_power`); None when even the largest possible
    drop (``baseline - flip_rate``: only won items can be lost) is not detected."""
    grid = np.arange(step, baseline - flip_rate + 1e-12, step)

    def ok(i: int) -> bool:
        return mcnemar_power(n, float(grid[i]), flip_rate=flip_rate, alpha=alpha) >= power

    if not grid.size or not ok(grid.size - 1):
        return None
    lo, hi = -1, grid.size - 1  # power grows with the drop: bisect for the first grid point that is enough
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return round(float(grid[hi]), 6)


def sign_test(before: np.ndarray, after: np.ndarray) -> float:
    """Exact two-sided paired sign test (ties dropped); ``1`` when all pairs tie."""
    from scipy.stats import binomtest

    d = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    up, down = int((d > 0).sum()), int((d < 0).sum())
    return 1.0 if up + down == 0 else min(float(binomtest(up, up + down, 0.5).pvalue), 1.0)


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion ``k / n`` (NaN, NaN for ``n = 0``)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def binomial_vs_chance(k: int, n: int, chance: float = 0.5) -> float:
    """Exact two-sided binomial p-value of ``k`` successes in ``n`` against ``chance`` (1 for ``n = 0``)."""
    from scipy.stats import binomtest

    return 1.0 if n <= 0 else min(float(binomtest(k, n, chance).pvalue), 1.0)


def rng_for(*keys: Any) -> np.random.Generator:
    """A generator seeded from the names of what it is for (the same on every run and machine)."""
    words = [zlib.crc32(str(k).encode("utf-8")) for k in keys]
    return np.random.default_rng(words)


def bootstrap_interval(
    before: np.ndarray,
    after: np.ndarray,
    rng: np.random.Generator,
    *,
    weights: np.ndarray | None = None,
    n_boot: int = N_BOOT,
) -> tuple[float, float]:
    """Paired percentile bootstrap 95% interval of ``mean(after) - mean(before)``.

    Items are resampled with replacement (the same items for both). With ``weights`` the means are
    weighted (``sum(x) / sum(weights)`` with ``x`` already summed per item), as for NLL per token.
    """
    x = np.asarray(before, dtype=np.float64)
    y = np.asarray(after, dtype=np.float64)
    n = len(x)
    if n == 0:
        return float("nan"), float("nan")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    deltas = np.empty(n_boot, dtype=np.float64)
    step = max(1, (1 << 22) // n)  # resamples per chunk: bounds the (resamples, n) index buffer
    for s in range(0, n_boot, step):
        idx = rng.integers(0, n, size=(min(step, n_boot - s), n))
        ws = w[idx].sum(axis=1)
        ws[ws == 0] = np.nan
        deltas[s : s + len(idx)] = (y[idx].sum(axis=1) - x[idx].sum(axis=1)) / ws
    lo, hi = np.nanpercentile(deltas, [2.5, 97.5])
    return float(lo), float(hi)


def vs_controls(delta: float, control_deltas: Sequence[float], control_values: Sequence[float], *,
                field: str, lower_is_effect: bool) -> dict[str, Any]:
    """A target's change beside its random controls' changes.

    ``p_empirical`` is one-sided: how often a random set changes the measure at least as much
    (down when ``lower_is_effect``, as value consistency; up otherwise, as NLL), with the usual
    ``(1 + k) / (1 + n)`` correction.
    """
    arr = np.asarray(control_deltas, dtype=np.float64)
    extreme = (arr <= delta) if lower_is_effect else (arr >= delta)
    return {
        "n": len(arr), f"mean_{field}": float(np.mean(control_values)),
        "mean_delta": float(arr.mean()), "sd_delta": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
        "p_empirical": float((1 + extreme.sum()) / (1 + len(arr))),
    }


def relative(delta: float, base: float) -> float | None:
    """``delta / base``, or None when the base is 0 or not finite."""
    return None if not base or not math.isfinite(base) else delta / base


def clean(x: float | None) -> float | None:
    """``x`` as a float, or None when it is missing or not finite."""
    return None if x is None or not math.isfinite(x) else float(x)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj
