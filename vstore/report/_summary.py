"""The report's key numbers (the same in the page's tables and the terminal's)."""

from __future__ import annotations

from typing import Any

from ._ablation import group_effects
from ._figures import _baseline_rows, interval
from ._runs import LANGS, Run, fnum

__all__ = ["baseline_table", "effect_table"]


def baseline_table(runs: list[Run]) -> list[dict[str, Any]]:
    """Per model and language (and ``*``): unablated VC, its 95% interval, p against chance, and how
    many values are not above chance."""
    out = []
    for r in runs:
        rows = _baseline_rows(r)
        langs = [lang for lang in LANGS if any(x.get("lang") == lang for x in rows)]
        langs += [*sorted({str(x.get("lang")) for x in rows} - set(langs) - {"*"}), "*"]
        for lang in langs:
            row = next((x for x in rows if x.get("value") == "*" and x.get("lang") == lang), None)
            if row is None or fnum(row.get("value_consistency")) is None:
                continue
            per_value = [x for x in rows if x.get("value") != "*" and x.get("lang") == lang]
            ci = interval(row)
            not_above = [str(x.get("value")) for x in per_value if x.get("above_chance") is False
                         or (x.get("above_chance") is None and (interval(x) or (1.0, 1.0))[0] <= 0.5)]
            out.append({"model": r.name, "lang": lang, "n": row.get("n"), "vc": float(row["value_consistency"]),
                        "ci95": ci, "p_chance": _p_chance(row),
                        "above_chance": row.get("above_chance", ci[0] > 0.5 if ci else None),
                        "values_not_above": not_above, "n_values": len(per_value)})
    return out


def _p_chance(row: dict[str, Any]) -> float | None:
    """The row's ``p_chance``, or (older results) the exact two-sided binomial test of VC against 0.5."""
    p = fnum(row.get("p_chance"))
    vc, n = fnum(row.get("value_consistency")), row.get("n")
    if p is not None or vc is None or not isinstance(n, int) or n <= 0:
        return p
    from scipy.stats import binomtest

    return float(binomtest(round(vc * n), n, 0.5).pvalue)


def effect_table(runs: list[Run]) -> list[dict[str, Any]]:
    """Per model and value: the target's own-value change beside its controls' (VC, margin, NLL)."""
    out = []
    for r in runs:
        for g in group_effects(r.ablation):
            t = g.target
            nll_c = {lang: [c.nll[lang] for c in g.controls if lang in c.nll] for lang in t.nll}
            out.append({"model": r.name, "value": g.group, "n_neurons": t.n_neurons, "delta": t.delta,
                        "ci95": t.ci95, "p_value": t.p_value, "controls": len(g.controls),
                        "control_delta": g.control_mean("delta"), "p_empirical": g.p_empirical,
                        "margin": t.margin, "control_margin": g.control_mean("margin"),
                        "nll": dict(t.nll),
                        "control_nll": {k: sum(v) / len(v) for k, v in nll_c.items() if v}})
    return out
