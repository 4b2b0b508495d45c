"""Figures of neuron sets and comparisons: where the value neurons are, and how they overlap.

Each function takes run folders (:class:`~vstore.report._runs.Run`) and returns a matplotlib
``Figure`` (drawn without pyplot, so no global state or display is touched), or raises
:class:`NotDrawn` naming the missing input.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ._common import NotDrawn, order_values, value_label
from ._runs import LANGS, Run, fnum, set_lang

__all__ = [
    "baseline_figure",
    "baseline_models_figure",
    "depth_figure",
    "heatmap_figure",
    "overlap_figure",
    "similarity_figure",
]

CHANCE = 0.5


def heatmap_figure(run: Run) -> Figure:
    """Layer x value heatmap of the main neuron set's counts."""
    main = run.main_set
    if main is None:
        raise NotDrawn("no neuron set (neurons/*.json)")
    label, ns = main
    groups = order_values(ns.groups)
    per = ns.per_layer()
    n_layers = run.n_layers or 1 + max((lay for g in per.values() for lay in g), default=0)
    counts = np.zeros((len(groups), n_layers), dtype=np.int64)
    for i, g in enumerate(groups):
        for lay, n in per.get(g, {}).items():
            if 0 <= lay < n_layers:
                counts[i, lay] = n
    if not counts.any():
        raise NotDrawn(f"neurons/{label}.json holds no neurons")
    fig = Figure(figsize=(max(6.0, 2.5 + 0.32 * n_layers), 1.2 + 0.34 * len(groups)), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(groups)), [value_label(g) for g in groups])
    ax.set_xticks(range(n_layers), [str(i) for i in range(n_layers)])
    ax.set_xlabel("layer")
    total = {g: len(ns.groups.get(g, [])) for g in groups}
    what = label if label == ns.method else f"{label}, {ns.method}"
    ax.set_title(f"{run.name}: value neurons per layer ({what}; {sum(total.values())} entries "
                 f"in {len(groups)} values)")
    fig.colorbar(im, ax=ax, label="neurons in the layer")
    return fig


def depth_figure(runs: list[Run]) -> Figure:
    """Relative-depth distribution (layer / number of layers) of each model's main set."""
    rows = []
    for r in runs:
        main = r.main_set
        if main is None or not r.n_layers:
            continue
        items = {(it["layer"], it["neuron"]) for its in main[1].groups.values() for it in its}
        if items:
            rows.append((r, main[0], np.array([(lay + 0.5) / r.n_layers for lay, _ in items])))
    if not rows:
        raise NotDrawn("no neuron set with a known number of layers")
    fig = Figure(figsize=(7.5, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for r, label, depth in rows:
        ax.hist(depth, bins=20, range=(0.0, 1.0), density=True, histtype="step", linewidth=1.8,
                label=f"{r.name} ({label}, {len(depth)} neurons, {r.n_layers} layers; median {np.median(depth):.2f})")
    ax.set_xlim(0, 1)
    ax.set_xlabel("relative depth (layer + 0.5) / number of layers")
    ax.set_ylabel("density")
    ax.set_title("Relative depth of the value neurons per model (union of all values)")
    ax.legend(loc="upper left")
    return fig


def _baseline_rows(run: Run) -> list[dict[str, Any]]:
    base = (run.ablation or {}).get("baseline")
    rows = base.get("breakdown") if isinstance(base, dict) else None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def wilson(p: float, n: int) -> tuple[float, float]:
    """Wilson 95% interval of a proportion (used when a result predates the stored ``ci95``)."""
    z = 1.959963984540054
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return float(c - h), float(c + h)


def interval(row: dict[str, Any], key: str = "value_consistency") -> tuple[float, float] | None:
    """A row's ``ci95`` (or the Wilson interval from ``n``), None when neither is there."""
    ci = row.get("ci95")
    if isinstance(ci, list | tuple) and len(ci) == 2 and fnum(ci[0]) is not None and fnum(ci[1]) is not None:
        return float(ci[0]), float(ci[1])
    v, n = fnum(row.get(key)), row.get("n")
    return wilson(v, n) if v is not None and isinstance(n, int) and n > 0 else None


def baseline_figure(run: Run) -> Figure:
    """Unablated value consistency per value and language with 95% intervals against chance."""
    rows = [r for r in _baseline_rows(run) if r.get("value") != "*" and fnum(r.get("value_consistency")) is not None]
    if not rows:
        raise NotDrawn("no baseline breakdown in ablation.json")
    values = order_values({r["value"] for r in rows})
    langs = [lang for lang in LANGS if any(r.get("lang") == lang for r in rows)] or sorted({str(r.get("lang")) for r in rows})
    fig = Figure(figsize=(8.5, 1.4 + 0.3 * len(values)), layout="constrained")
    ax = fig.add_subplot()
    for j, lang in enumerate(langs):
        for i, v in enumerate(values):
            r = next((x for x in rows if x["value"] == v and x.get("lang") == lang), None)
            if r is None:
                continue
            y, vc, ci = i + (j - (len(langs) - 1) / 2) * 0.3, float(r["value_consistency"]), interval(r)
            above = r.get("above_chance", ci[0] > CHANCE if ci else None)
            colour = f"C{j}"
            if ci:
                ax.plot(ci, [y, y], color=colour, linewidth=1.5)
            ax.plot([vc], [y], "o", color=colour, markerfacecolor=colour if above else "white",
                    label=lang if i == 0 else None)
    ax.axvline(CHANCE, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(values)), [value_label(v) for v in values])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("value consistency (share of items where the aligned action wins), 95% interval; dashed: chance")
    over = [f"{r.get('lang')} {float(r['value_consistency']):.3f}" for r in _baseline_rows(run)
            if r.get("value") == "*" and r.get("lang") != "*" and fnum(r.get("value_consistency")) is not None]
    ax.set_title(f"{run.name}: unablated baseline ({', '.join(over) or 'per value'})\nhollow = not above chance")
    ax.legend(title="language", loc="lower right")
    return fig


def baseline_models_figure(runs: list[Run]) -> Figure:
    """Every model's unablated value consistency per language, with intervals, against chance."""
    pts = []
    for r in runs:
        for row in _baseline_rows(r):
            if row.get("value") == "*" and row.get("lang") != "*" and fnum(row.get("value_consistency")) is not None:
                pts.append((r.name, str(row.get("lang")), float(row["value_consistency"]), interval(row)))
    names = list(dict.fromkeys(p[0] for p in pts))
    if len(names) < 2:
        raise NotDrawn("fewer than two runs with a per-language baseline in ablation.json")
    langs = [lang for lang in LANGS if any(p[1] == lang for p in pts)] + sorted({p[1] for p in pts} - set(LANGS))
    fig = Figure(figsize=(7.5, 1.5 + 0.45 * len(names)), layout="constrained")
    ax = fig.add_subplot()
    for name, lang, vc, ci in pts:
        y = names.index(name) + (langs.index(lang) - (len(langs) - 1) / 2) * 0.25
        c = f"C{langs.index(lang)}"
        if ci:
            ax.plot(ci, [y, y], color=c, linewidth=2)
        ax.plot([vc], [y], "o", color=c, label=lang if name == names[0] else None)
    ax.axvline(CHANCE, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0.3, 1)
    ax.set_xlabel("unablated value consistency over all values, 95% interval; dashed: chance (0.5)")
    ax.set_title("Baseline against chance, per model and language")
    ax.legend(title="language")
    return fig


def _zh_en_pairs(compare: dict[str, Any]) -> list[dict[str, Any]]:
    langs = {s.get("label"): set_lang(str(s.get("label")), s.get("where"))
             for s in compare.get("sets", []) if isinstance(s, dict)}
    out = []
    for o in compare.get("overlaps", []):
        if not isinstance(o, dict) or o.get("group") in (None, "*") or fnum(o.get("jaccard")) is None:
            continue
        la = langs.get(o.get("a")) or set_lang(str(o.get("a")), None)
        lb = langs.get(o.get("b")) or set_lang(str(o.get("b")), None)
        if {la, lb} == {"zh", "en"}:
            out.append(o)
    return out


def overlap_figure(run: Run) -> Figure:
    """zh/en overlap (Jaccard) per value beside the chance level of random sets of the same sizes."""
    if not run.compare:
        raise NotDrawn("no compare.json")
    rows = _zh_en_pairs(run.compare)
    if not rows:
        raise NotDrawn("compare.json has no zh-vs-en overlap rows (sets ranked on lang=zh and lang=en)")
    pair = (rows[0]["a"], rows[0]["b"])
    rows = [o for o in rows if (o["a"], o["b"]) == pair]
    values = order_values([o["group"] for o in rows])
    by = {o["group"]: o for o in rows}
    fig = Figure(figsize=(8.5, 3.8), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(values))
    jac = [float(by[v]["jaccard"]) for v in values]
    ax.bar(x, jac, color="C0", label="observed Jaccard")
    ch = [fnum(by[v].get("chance_jaccard")) for v in values]
    sd = [fnum(by[v].get("chance_sd")) or 0.0 for v in values]
    if any(c is not None for c in ch):
        ax.errorbar(x, [c if c is not None else np.nan for c in ch], yerr=[2 * s for s in sd], fmt="_",
                    color="black", markersize=14, capsize=3, label="chance (random sets, same per-layer sizes) ± 2 sd")
    for xi, v in enumerate(values):
        p = fnum(by[v].get("p_value"))
        ax.text(float(xi), jac[xi] + 0.005, f"{by[v].get('shared', '?')}" + (f"\np={p:.2g}" if p is not None else ""),
                ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [value_label(v, "\n") for v in values])
    ax.set_ylabel("Jaccard of the zh and en sets")
    ax.set_ylim(0, max(jac + [c or 0 for c in ch]) * 1.35 + 1e-3)
    ax.set_title(f"{run.name}: overlap of {pair[0]} and {pair[1]} per value\n(shared neurons and p above the bars)")
    ax.legend(loc="upper right")
    return fig


def similarity_figure(run: Run) -> Figure:
    """The value-similarity matrices of this model, one per language."""
    sims = [s for s in (run.compare or {}).get("similarity", []) if isinstance(s, dict)
            and isinstance(s.get("matrix"), list) and isinstance(s.get("groups"), list) and s["groups"]]
    if not sims:
        raise NotDrawn("no value-similarity matrix in compare.json")
    sims = sorted(sims, key=lambda s: (LANGS.index(s["lang"]) if s.get("lang") in LANGS else 9, str(s.get("lang"))))
    fig = Figure(figsize=(5.2 * len(sims) + 1, 5.4), layout="constrained")
    axes = fig.subplots(1, len(sims), squeeze=False)[0]
    im = None
    for ax, s in zip(axes, sims, strict=True):
        m = np.array([[np.nan if fnum(x) is None else float(x) for x in row] for row in s["matrix"]], dtype=float)
        groups = [str(g) for g in s["groups"]]
        if m.shape != (len(groups), len(groups)):
            raise NotDrawn(f"similarity matrix of {s.get('lang')} is {m.shape}, not {len(groups)} x {len(groups)}")
        im = ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_xticks(range(len(groups)), [value_label(g) for g in groups], fontsize=7, rotation=60,
                      ha="right", rotation_mode="anchor")
        ax.set_yticks(range(len(groups)), [value_label(g) for g in groups], fontsize=7)
        ax.set_title(f"lang = {s.get('lang', '?')}")
    agree = [a for a in (run.compare or {}).get("similarity_agreement", []) if isinstance(a, dict)
             and fnum(a.get("spearman")) is not None]
    sub = "; ".join(f"{a.get('a')} vs {a.get('b')}: Spearman {float(a['spearman']):.2f}"
                    + (f", p = {float(a['p_value']):.2g}" if fnum(a.get("p_value")) is not None else "") for a in agree[:2])
    fig.suptitle(f"{run.name}: value similarity (correlation of mean activation profiles over the value neurons)"
                 + (f"\n{sub}" if sub else ""))
    if im is not None:
        fig.colorbar(im, ax=list(axes), label="correlation", shrink=0.8)
    return fig
