"""Reading ablation results (docs/ablate-result.md) for the report: own-value effects, target vs controls.

A target set is scored on every value's items and a control on its own group's items, so the
own-value effect of either is its breakdown row ``(value = group, lang = *)``, falling back to the
top-level numbers of older files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._common import order_values
from ._runs import fnum

__all__ = ["Effect", "GroupEffects", "cross_value", "group_effects"]


@dataclass
class Effect:
    """One ablated set's effect on its own value's items."""

    delta: float | None
    ci95: tuple[float, float] | None
    margin: float | None
    margin_ci95: tuple[float, float] | None
    nll: dict[str, float] = field(default_factory=dict)  # language -> delta NLL per token
    n_neurons: int | None = None
    p_value: float | None = None


@dataclass
class GroupEffects:
    """A group's target and its controls."""

    group: str
    target: Effect
    controls: list[Effect]
    p_empirical: float | None = None

    def control_mean(self, attr: str) -> float | None:
        xs = [getattr(c, attr) for c in self.controls if getattr(c, attr) is not None]
        return float(np.mean(xs)) if xs else None


def _pair(x: Any) -> tuple[float, float] | None:
    if isinstance(x, list | tuple) and len(x) == 2 and fnum(x[0]) is not None and fnum(x[1]) is not None:
        return float(x[0]), float(x[1])
    return None


def _effect(e: dict[str, Any], group: str) -> Effect:
    raw = e.get("breakdown")
    rows: list[Any] = raw if isinstance(raw, list) else []
    own = next((r for r in rows if isinstance(r, dict) and r.get("value") == group and r.get("lang") == "*"), None)
    src = own if own is not None and fnum(own.get("delta")) is not None else e
    margin_src = own if own is not None and fnum(own.get("margin_delta")) is not None else e
    nll = {}
    side = e.get("side_effect")
    # vstore ablate writes {"nll": mean, "delta": ..., "by_lang": {lang: {"nll", "delta", ...}}};
    # the older contract had {"nll": {lang: {"baseline", "ablated", "delta"}}}: both are read
    per_lang = side.get("by_lang") if isinstance(side, dict) and isinstance(side.get("by_lang"), dict) else \
        side.get("nll") if isinstance(side, dict) else None
    if isinstance(per_lang, dict):
        for lang, d in per_lang.items():
            v = fnum(d.get("delta")) if isinstance(d, dict) else None
            if v is None and isinstance(d, dict) and fnum(d.get("ablated")) is not None and fnum(d.get("baseline")) is not None:
                v = float(d["ablated"]) - float(d["baseline"])
            if v is not None:
                nll[str(lang)] = v
    n = e.get("n_neurons")
    return Effect(fnum(src.get("delta")), _pair(src.get("ci95")), fnum(margin_src.get("margin_delta")),
                  _pair(margin_src.get("margin_ci95")), nll, n if isinstance(n, int) else None, fnum(src.get("p_value")))


def group_effects(result: dict[str, Any] | None) -> list[GroupEffects]:
    """Per group (benchmark order), the target's own-value effect and its controls' (vc results only)."""
    if not isinstance(result, dict) or result.get("metric", "vc") != "vc":
        return []
    abl = [e for e in result.get("ablations", []) if isinstance(e, dict) and isinstance(e.get("group"), str)]
    out = []
    for g in order_values({e["group"] for e in abl}):
        targets = [e for e in abl if e["group"] == g and e.get("kind") == "target"]
        if not targets:
            continue
        vs = targets[0].get("vs_controls")
        out.append(GroupEffects(g, _effect(targets[0], g),
                                [_effect(e, g) for e in abl if e["group"] == g and e.get("kind") == "control"],
                                fnum(vs.get("p_empirical")) if isinstance(vs, dict) else None))
    return out


def cross_value(result: dict[str, Any] | None) -> tuple[list[str], list[str], np.ndarray] | None:
    """(ablated groups, evaluated values, delta-VC matrix) of a result, or None when it has none."""
    cv = (result or {}).get("cross_value")
    if not isinstance(cv, dict):
        return None
    groups, values, matrix = cv.get("groups"), cv.get("values"), cv.get("matrix")
    if not (isinstance(groups, list) and isinstance(values, list) and isinstance(matrix, list)) or not groups:
        return None
    try:
        m = np.array([[np.nan if fnum(x) is None else float(x) for x in row] for row in matrix], dtype=float)
    except TypeError:
        return None
    if m.shape != (len(groups), len(values)):
        return None
    return [str(g) for g in groups], [str(v) for v in values], m
