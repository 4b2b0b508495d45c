"""The ablation result (JSON format ``vstore-ablation`` version 1): what one measured set adds to it.

Per set: value consistency (or NLL per token) in every cell — per value x language, per value, per
language and overall (``*``) — its change against the baseline, a paired bootstrap 95% interval
and an exact test; then, over the finished sets, the target-vs-controls summaries and the
cross-value (or cross-language) matrix. The format is documented in ``docs/ablate-result.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .data import Story
from .evaluate import value_consistency
from .inference import (
    binomial_vs_chance,
    bootstrap_interval,
    clean,
    mcnemar_exact,
    relative,
    rng_for,
    sign_test,
    vs_controls,
    wilson_interval,
)

__all__ = ["ALL", "RESULT_FORMAT", "EvalItems", "baseline_nll", "baseline_vc", "cells", "chance_summary", "compare_nll",
           "compare_vc", "dose_summary", "neuron_list", "nll_items", "refresh_baseline", "set_key", "side_effect", "summaries",
           "vc_items"]

RESULT_FORMAT = {"name": "vstore-ablation", "version": 1}
ALL = "*"  # the value/lang of an aggregated breakdown row
LayerNeurons = dict[int, np.ndarray]


@dataclass(frozen=True)
class EvalItems:
    """The evaluation items of an ablation run, in input order."""

    ids: list[str]
    values: list[str]  # "" for texts without a value
    langs: list[str]
    stories: list[Story] | None  # vc
    texts: list[str] | None  # nll


def cells(items: EvalItems) -> list[tuple[str, str, np.ndarray]]:
    """(value, lang, item indices): per value x lang, per value, per lang, and overall (``*``)."""
    v, lang = np.asarray(items.values, dtype=object), np.asarray(items.langs, dtype=object)
    values = sorted(set(items.values))
    langs = sorted(set(items.langs))
    out = []
    for val in values:
        for lg in langs:
            idx = np.flatnonzero((v == val) & (lang == lg))
            if len(idx):
                out.append((val, lg, idx))
        if len(langs) > 1:
            out.append((val, ALL, np.flatnonzero(v == val)))
    if len(values) > 1:
        for lg in langs:
            out.append((ALL, lg, np.flatnonzero(lang == lg)))
    out.append((ALL, ALL, np.arange(len(items.ids))))
    return out


def vc_items(items: EvalItems, won: np.ndarray, aligned: np.ndarray, violating: np.ndarray) -> list[dict[str, Any]]:
    return [
        {"id": items.ids[i], "value": items.values[i], "lang": items.langs[i], "aligned_won": bool(won[i]),
         "score_aligned": float(aligned[i]), "score_violating": float(violating[i])}
        for i in range(len(items.ids))
    ]


def nll_items(items: EvalItems, nll: np.ndarray, count: np.ndarray) -> list[dict[str, Any]]:
    return [
        {"id": items.ids[i], "value": items.values[i] or None, "lang": items.langs[i],
         "nll": float(nll[i] / count[i]) if count[i] else None, "nll_sum": float(nll[i]), "n_tokens": int(count[i])}
        for i in range(len(items.ids))
    ]


def _chance(won: np.ndarray) -> dict[str, Any]:
    k, n = int(np.count_nonzero(won)), len(won)
    lo, hi = wilson_interval(k, n)
    p = binomial_vs_chance(k, n)
    return {"ci95": [lo, hi], "p_chance": p, "above_chance": bool(n and k / n > 0.5 and p < 0.05)}


def baseline_vc(items: EvalItems, won: np.ndarray, aligned: np.ndarray, violating: np.ndarray) -> dict[str, Any]:
    won = np.asarray(won, dtype=bool)
    rows = [{"value": val, "lang": lg, "n": len(idx), "value_consistency": value_consistency(won[idx]),
             **_chance(won[idx])} for val, lg, idx in cells(items)]
    out = {"value_consistency": value_consistency(won), "n_items": len(won), "breakdown": rows,
           "items": vc_items(items, won, aligned, violating)}
    out["chance"] = chance_summary(rows)
    return out


def refresh_baseline(base: dict[str, Any], items: EvalItems, metric: str) -> dict[str, Any]:
    """A baseline read from an earlier result, with the fields added since recomputed from its items."""
    if metric != "vc" or "chance" in base:
        return base
    it = base["items"]
    won = np.asarray([x["aligned_won"] for x in it], dtype=bool)
    new = baseline_vc(items, won, np.asarray([x["score_aligned"] for x in it]), np.asarray([x["score_violating"] for x in it]))
    return {**base, "breakdown": new["breakdown"], "chance": new["chance"]}


def chance_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per language (and ``*``) the baseline against chance, and the value x language cells not above it."""
    by_lang = {r["lang"]: {k: r[k] for k in ("n", "value_consistency", "ci95", "p_chance", "above_chance")}
               for r in rows if r["value"] == ALL}
    if not by_lang:  # a single value: its per-language rows are the language rows
        by_lang = {r["lang"]: {k: r[k] for k in ("n", "value_consistency", "ci95", "p_chance", "above_chance")}
                   for r in rows}
    return {"level": 0.5, "test": "exact two-sided binomial; interval: Wilson 95%", "by_lang": by_lang,
            "not_above_chance": [f"{r['value']}/{r['lang']}" for r in rows
                                 if r["value"] != ALL and r["lang"] != ALL and not r["above_chance"]]}


def baseline_nll(items: EvalItems, nll: np.ndarray, count: np.ndarray) -> dict[str, Any]:
    def mean(idx: np.ndarray) -> float | None:
        c = count[idx].sum()
        return float(nll[idx].sum() / c) if c else None

    rows = [{"value": val, "lang": lg, "n": len(idx), "n_tokens": int(count[idx].sum()), "nll": mean(idx)}
            for val, lg, idx in cells(items)]
    return {"nll": mean(np.arange(len(nll))), "n_items": len(nll), "n_tokens": int(count.sum()), "breakdown": rows,
            "items": nll_items(items, nll, count)}


def compare_vc(items: EvalItems, base: np.ndarray, won: np.ndarray, key: str,
               margins: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Per cell: VC ablated vs baseline; with ``margins`` (baseline, ablated aligned - violating score
    per item) also the mean change of the margin and its paired bootstrap interval."""
    rows = []
    for val, lg, idx in cells(items):
        b, a = base[idx], won[idx]
        vb, va = value_consistency(b), value_consistency(a)
        lo, hi = bootstrap_interval(b.astype(float), a.astype(float), rng_for(key, val, lg))
        p, nb, nc = mcnemar_exact(b, a)
        row = {"value": val, "lang": lg, "n": len(idx), "baseline": vb, "value_consistency": va,
               "delta": va - vb, "relative_change": relative(va - vb, vb), "ci95": [lo, hi],
               "p_value": p, "won_to_lost": nb, "lost_to_won": nc}
        if margins is not None:
            mb, ma = margins[0][idx], margins[1][idx]
            row["margin_delta"] = float(np.mean(ma - mb)) if len(idx) else float("nan")
            row["margin_ci95"] = list(bootstrap_interval(mb, ma, rng_for(key, val, lg, "margin")))
        rows.append(row)
    return {"breakdown": rows, "overall": rows[-1]}


def side_effect(general: EvalItems, base: dict[str, Any], nll: np.ndarray, key: str) -> dict[str, Any]:
    """The NLL side effect of one set on the general texts: per-token NLL overall and per language,
    its change against the unablated ``base`` (``baseline.side_effect``), bootstrap interval, sign test."""
    b = np.asarray([it["nll_sum"] for it in base["items"]], dtype=np.float64)
    count = np.asarray([it["n_tokens"] for it in base["items"]], dtype=np.int64)
    cmp = compare_nll(general, b, nll, count, f"{key}|side")
    o = cmp["overall"]
    return {"metric": "nll", "nll": o["nll"], "delta": o["delta"], "ci95": o["ci95"], "p_value": o["p_value"],
            "by_lang": {r["lang"]: {k: r[k] for k in ("n", "nll", "delta", "ci95", "p_value")}
                        for r in cmp["breakdown"] if r["value"] in (ALL, "")}}


def compare_nll(items: EvalItems, base: np.ndarray, nll: np.ndarray, count: np.ndarray, key: str) -> dict[str, Any]:
    rows = []
    per_b = np.where(count > 0, base / np.maximum(count, 1), 0.0)
    per_a = np.where(count > 0, nll / np.maximum(count, 1), 0.0)
    for val, lg, idx in cells(items):
        c = count[idx].sum()
        if not c:
            continue
        vb, va = float(base[idx].sum() / c), float(nll[idx].sum() / c)
        lo, hi = bootstrap_interval(base[idx], nll[idx], rng_for(key, val, lg), weights=count[idx])
        keep = idx[count[idx] > 0]
        rows.append({"value": val, "lang": lg, "n": len(idx), "n_tokens": int(c), "baseline": vb, "nll": va,
                     "delta": va - vb, "relative_change": relative(va - vb, vb), "ci95": [lo, hi],
                     "p_value": sign_test(per_b[keep], per_a[keep])})
    return {"breakdown": rows, "overall": rows[-1]}


def set_key(group: str, kind: str, seed: int | None) -> str:
    return f"{kind}|{group}|{seed}"


def neuron_list(sel: LayerNeurons) -> list[list[int]]:
    return [[int(lay), int(n)] for lay, idx in sorted(sel.items()) for n in idx]


def summaries(result: dict[str, Any], metric: str, values: list[str], langs: list[str]) -> None:
    """Recompute the cross-value matrix and the target-vs-control summaries from the finished sets."""
    field = "value_consistency" if metric == "vc" else "nll"
    targets = [a for a in result["ablations"] if a["kind"] == "target"]
    for t in targets:
        ctl = [a for a in result["ablations"] if a["kind"] == "control" and a["group"] == t["group"]]
        if ctl:
            t["vs_controls"] = _vs_controls(t, ctl, result["baseline"], metric, field)
        else:
            t.pop("vs_controls", None)
        if t.get("side_effect") and metric == "vc":
            own = _own_delta(t)
            d = t["side_effect"]["delta"]
            t["side_effect"]["value_change_per_nll"] = own / d if own is not None and d else None

    def cell(a: dict[str, Any], val: str, lg: str) -> float | None:
        for r in a["breakdown"]:
            if r["value"] == val and r["lang"] == lg:
                return clean(r["delta"])
        return None

    if metric == "vc":
        result["cross_value"] = {
            "groups": [t["group"] for t in targets], "values": values, "langs": langs,
            "matrix": [[cell(t, v, ALL) if len(langs) > 1 else cell(t, v, langs[0]) for v in values] for t in targets],
            "by_lang": {lg: [[cell(t, v, lg) for v in values] for t in targets] for lg in langs},
        }
    else:
        result["cross_lang"] = {
            "groups": [t["group"] for t in targets], "langs": langs,
            "matrix": [[cell(t, ALL, lg) if len(values) > 1 else cell(t, values[0], lg) for lg in langs]
                       for t in targets],
        }


def _on_items(entry: dict[str, Any], base: dict[str, Any], ids: set[str], metric: str) -> tuple[float, float | None]:
    """(delta, margin delta) of ``entry`` restricted to the items ``ids`` (its own items must include them)."""
    b = {it["id"]: it for it in base["items"]}
    mine = [it for it in entry["items"] if it["id"] in ids]
    if metric == "vc":
        d = float(np.mean([it["aligned_won"] for it in mine]) - np.mean([b[it["id"]]["aligned_won"] for it in mine]))
        m = float(np.mean([(it["score_aligned"] - it["score_violating"])
                           - (b[it["id"]]["score_aligned"] - b[it["id"]]["score_violating"]) for it in mine]))
        return d, m
    tok = sum(it["n_tokens"] for it in mine)
    return (sum(it["nll_sum"] - b[it["id"]]["nll_sum"] for it in mine) / tok if tok else float("nan")), None


def _vs_controls(t: dict[str, Any], ctl: list[dict[str, Any]], base: dict[str, Any], metric: str,
                 field: str) -> dict[str, Any]:
    """The target beside its controls, on the items the controls were measured on (all, or the group's own)."""
    ids = {it["id"] for it in ctl[0]["items"]}
    same = all({it["id"] for it in c["items"]} == ids for c in ctl)
    whole = ids == {it["id"] for it in t["items"]}
    if whole or not same:
        delta, margin = t["delta"], t.get("margin_delta")
    else:
        delta, margin = _on_items(t, base, ids, metric)
    out = vs_controls(delta, [a["delta"] for a in ctl], [a[field] for a in ctl], field=field,
                      lower_is_effect=metric == "vc")
    out["items_on"] = "all" if whole else ctl[0].get("items_on", "own")
    out["n_items"] = len(ids)
    out["target_delta"] = delta
    if margin is not None and all(c.get("margin_delta") is not None for c in ctl):
        out["target_margin_delta"] = margin
        out["mean_margin_delta"] = float(np.mean([c["margin_delta"] for c in ctl]))
    sides = [c["side_effect"]["delta"] for c in ctl if c.get("side_effect")]
    if t.get("side_effect") and sides:
        out["mean_nll_delta"] = float(np.mean(sides))
    return out


def _own_delta(t: dict[str, Any]) -> float | None:
    """The change of the target group's own value (all languages), or the overall change when the
    group is no value of the items."""
    rows = [r for r in t["breakdown"] if r["value"] == t["group"]]
    row = next((r for r in rows if r["lang"] == ALL), rows[0] if len(rows) == 1 else None)
    return clean(row["delta"]) if row is not None else clean(t["delta"])


def _mean(xs: Sequence[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return float(np.mean(v)) if v else None


def dose_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The dose-response reading of one ablation result (one size): own vs other values, vs controls.

    Returns ``n_neurons_mean``; ``own_delta_mean`` (mean diagonal of the cross-value matrix: a
    value's set on its own items), ``other_delta_mean`` (mean off-diagonal), ``own_minus_other``;
    ``control_own_delta_mean`` (the controls on their group's items); the same for the margin
    (``margin_own_mean``, ``control_margin_own_mean``) and the NLL side effect (``nll_delta_mean``,
    ``control_nll_delta_mean``) when the result has them.
    """
    cv = result.get("cross_value") or {}
    groups, values = cv.get("groups", []), cv.get("values", [])
    mat = np.asarray([[np.nan if x is None else x for x in row] for row in cv.get("matrix", [])], dtype=np.float64)
    own: list[float] = []
    other: list[float] = []
    for i, g in enumerate(groups):
        for j, v in enumerate(values):
            if mat.size and np.isfinite(mat[i, j]):
                (own if g == v else other).append(float(mat[i, j]))
    targets = [a for a in result["ablations"] if a["kind"] == "target"]
    vs = [t.get("vs_controls") or {} for t in targets]
    own_m = _mean(own)
    other_m = _mean(other)
    return {
        "n_neurons_mean": _mean([t["n_neurons"] for t in targets]),
        "own_delta_mean": own_m, "other_delta_mean": other_m,
        "own_minus_other": None if own_m is None or other_m is None else own_m - other_m,
        "control_own_delta_mean": _mean([v.get("mean_delta") for v in vs]),
        "target_own_delta_mean": _mean([v.get("target_delta") for v in vs]),
        "margin_own_mean": _mean([v.get("target_margin_delta") for v in vs]),
        "control_margin_own_mean": _mean([v.get("mean_margin_delta") for v in vs]),
        "nll_delta_mean": _mean([clean((t.get("side_effect") or {}).get("delta")) for t in targets]),
        "control_nll_delta_mean": _mean([v.get("mean_nll_delta") for v in vs]),
        "cross_value": cv,
    }
