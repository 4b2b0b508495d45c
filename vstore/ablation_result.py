"""The ablation result (JSON format ``vstore-ablation`` version 1): what one measured set adds to it.

Per set: value consistency (or NLL per token) in every cell — per value x language, per value, per
language and overall (``*``) — its change against the baseline, a paired bootstrap 95% interval
and an exact test; then, over the finished sets, the target-vs-controls summaries and the
cross-value (or cross-language) matrix. The format is documented in ``docs/ablate-result.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .data import Story
from .evaluate import value_consistency
from .inference import bootstrap_interval, clean, mcnemar_exact, relative, rng_for, sign_test, vs_controls

__all__ = ["ALL", "RESULT_FORMAT", "EvalItems", "baseline_nll", "baseline_vc", "cells", "compare_nll", "compare_vc",
           "neuron_list", "nll_items", "set_key", "summaries", "vc_items"]

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


def baseline_vc(items: EvalItems, won: np.ndarray, aligned: np.ndarray, violating: np.ndarray) -> dict[str, Any]:
    rows = [{"value": val, "lang": lg, "n": len(idx), "value_consistency": value_consistency(won[idx])}
            for val, lg, idx in cells(items)]
    return {"value_consistency": value_consistency(won), "n_items": len(won), "breakdown": rows,
            "items": vc_items(items, won, aligned, violating)}


def baseline_nll(items: EvalItems, nll: np.ndarray, count: np.ndarray) -> dict[str, Any]:
    def mean(idx: np.ndarray) -> float | None:
        c = count[idx].sum()
        return float(nll[idx].sum() / c) if c else None

    rows = [{"value": val, "lang": lg, "n": len(idx), "n_tokens": int(count[idx].sum()), "nll": mean(idx)}
            for val, lg, idx in cells(items)]
    return {"nll": mean(np.arange(len(nll))), "n_items": len(nll), "n_tokens": int(count.sum()), "breakdown": rows,
            "items": nll_items(items, nll, count)}


def compare_vc(items: EvalItems, base: np.ndarray, won: np.ndarray, key: str) -> dict[str, Any]:
    rows = []
    for val, lg, idx in cells(items):
        b, a = base[idx], won[idx]
        vb, va = value_consistency(b), value_consistency(a)
        lo, hi = bootstrap_interval(b.astype(float), a.astype(float), rng_for(key, val, lg))
        p, nb, nc = mcnemar_exact(b, a)
        rows.append({"value": val, "lang": lg, "n": len(idx), "baseline": vb, "value_consistency": va,
                     "delta": va - vb, "relative_change": relative(va - vb, vb), "ci95": [lo, hi],
                     "p_value": p, "won_to_lost": nb, "lost_to_won": nc})
    return {"breakdown": rows, "overall": rows[-1]}


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
            t["vs_controls"] = vs_controls(t["delta"], [a["delta"] for a in ctl], [a[field] for a in ctl], field=field,
                                           lower_is_effect=metric == "vc")
        else:
            t.pop("vs_controls", None)

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
