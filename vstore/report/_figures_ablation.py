"""Figures of ablation results: own-value change beside random controls, NLL side effect, graded
margin, the cross-value matrix and the dose-response over set sizes."""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ._ablation import GroupEffects, cross_value, group_effects
from ._common import NotDrawn, value_label
from ._runs import LANGS, Run

__all__ = ["ablation_figure", "cross_value_figure", "dose_figure", "margin_figure", "side_effect_figure"]


def _effects(run: Run) -> list[GroupEffects]:
    if not run.ablation:
        raise NotDrawn("no ablation.json")
    eff = group_effects(run.ablation)
    if not eff:
        raise NotDrawn("ablation.json holds no value-consistency target sets")
    return eff


def _target_vs_controls(ax: Axes, eff: list[GroupEffects], attr: str, ci_attr: str) -> None:
    ys = np.arange(len(eff))
    for i, g in enumerate(eff):
        t, ci = getattr(g.target, attr), getattr(g.target, ci_attr)
        if ci:
            ax.plot(ci, [i - 0.12] * 2, color="C3", linewidth=2)
        if t is not None:
            ax.plot([t], [i - 0.12], "o", color="C3", label="value neurons (95% interval)" if i == 0 else None)
        cs = [getattr(c, attr) for c in g.controls if getattr(c, attr) is not None]
        if cs:
            ax.plot(cs, [i + 0.12] * len(cs), "x", color="grey",
                    label="random controls (same per-layer sizes)" if i == 0 else None)
            ax.plot([np.mean(cs)], [i + 0.12], "D", color="black", markersize=4,
                    label="control mean" if i == 0 else None)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(ys, [value_label(g.group) for g in eff])
    ax.invert_yaxis()


def ablation_figure(run: Run) -> Figure:
    """Own-value change of value consistency per value: target with its interval, beside the controls."""
    eff = _effects(run)
    if all(g.target.delta is None for g in eff):
        raise NotDrawn("ablation.json has no value-consistency deltas")
    fig = Figure(figsize=(8.5, 1.6 + 0.34 * len(eff)), layout="constrained")
    ax = fig.add_subplot()
    _target_vs_controls(ax, eff, "delta", "ci95")
    mode = (run.ablation or {}).get("run", {}) if isinstance((run.ablation or {}).get("run"), dict) else {}
    ax.set_xlabel("change of value consistency on the value's own items (ablated − baseline)")
    beat = sum(1 for g in eff if g.target.delta is not None and g.control_mean("delta") is not None
               and g.target.delta < (g.control_mean("delta") or 0))
    ax.set_title(f"{run.name}: ablating each value's neurons ({mode.get('mode', 'zero')}, scorer "
                 f"{mode.get('scorer', '?')})\ntarget below its controls in {beat} of {len(eff)} values")
    ax.legend(loc="lower left", fontsize=7)
    return fig


def margin_figure(run: Run) -> Figure:
    """The graded effect: change of the aligned − violating log-likelihood margin, target vs controls."""
    eff = _effects(run)
    if all(g.target.margin is None for g in eff):
        raise NotDrawn("ablation.json has no margin_delta (an older result)")
    fig = Figure(figsize=(8.5, 1.6 + 0.34 * len(eff)), layout="constrained")
    ax = fig.add_subplot()
    _target_vs_controls(ax, eff, "margin", "margin_ci95")
    ax.set_xlabel("mean change per item of the aligned − violating log-likelihood margin (per token)")
    ax.set_title(f"{run.name}: graded effect on the value's own items (bootstrap 95% interval)")
    ax.legend(loc="lower left", fontsize=7)
    return fig


def side_effect_figure(run: Run) -> Figure:
    """Specificity: own-value change against the NLL change on general text, per language."""
    eff = _effects(run)
    langs = [lang for lang in LANGS if any(lang in g.target.nll for g in eff)]
    langs += sorted({lang for g in eff for lang in g.target.nll} - set(langs))
    if not langs:
        raise NotDrawn("ablation.json has no side_effect.nll (per-token NLL on general text)")
    fig = Figure(figsize=(5.0 * len(langs) + 0.5, 4.6), layout="constrained")
    axes = fig.subplots(1, len(langs), squeeze=False, sharey=True)[0]
    for ax, lang in zip(axes, langs, strict=True):
        for i, g in enumerate(eff):
            cx = [c.nll[lang] for c in g.controls if lang in c.nll and c.delta is not None]
            cy = [c.delta for c in g.controls if lang in c.nll and c.delta is not None]
            ax.plot(cx, cy, "x", color="grey", label="random controls" if i == 0 else None)
            if lang in g.target.nll and g.target.delta is not None:
                ax.plot([g.target.nll[lang]], [g.target.delta], "o", color=_cmap(i % 20), label=value_label(g.group))
        ax.axhline(0, color="black", linewidth=0.7)
        ax.axvline(0, color="black", linewidth=0.7)
        ax.set_xlabel(f"Δ NLL per token on general {lang} text")
        ax.set_title(f"general text: {lang}")
    axes[0].set_ylabel("Δ value consistency, own items")
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7)
    fig.suptitle(f"{run.name}: value change against the language side effect\n"
                 "(down-left of the controls: value change without language damage)")
    return fig


def cross_value_figure(run: Run) -> Figure:
    """The cross-value matrix: Δ VC of each value's items when each value's set is ablated."""
    cv = cross_value(run.ablation)
    if cv is None:
        raise NotDrawn("ablation.json has no cross_value matrix")
    groups, values, m = cv
    if not np.isfinite(m).any():
        raise NotDrawn("the cross_value matrix is empty")
    lim = float(np.nanmax(np.abs(m))) or 1e-3
    fig = Figure(figsize=(1.8 + 0.55 * len(values), 1.8 + 0.42 * len(groups)), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="RdBu", norm=TwoSlopeNorm(0, -lim, lim), interpolation="nearest")
    for i, g in enumerate(groups):
        if g in values:
            ax.add_patch(_box(values.index(g), i))
    ax.set_xticks(range(len(values)), [value_label(v) for v in values], fontsize=7, rotation=60,
                  ha="right", rotation_mode="anchor")
    ax.set_yticks(range(len(groups)), [value_label(g) for g in groups], fontsize=7)
    ax.set_xlabel("items of value (all languages)")
    ax.set_ylabel("neurons ablated")
    diag = [m[i, values.index(g)] for i, g in enumerate(groups) if g in values]
    off = m[np.array([[values[j] != g for j in range(len(values))] for g in groups])]
    ax.set_title(f"{run.name}: cross-value ablation (outlined: own value)\nmean own {np.nanmean(diag):+.3f}, "
                 f"mean other {np.nanmean(off):+.3f}" if diag and off.size else f"{run.name}: cross-value ablation")
    fig.colorbar(im, ax=ax, label="Δ value consistency (red: lower)")
    return fig


def _box(x: int, y: int) -> Rectangle:
    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.4)


def dose_figure(run: Run) -> Figure:
    """Effect against set size: targets and matched controls, and own-vs-other items of the cross matrix."""
    if not run.dose:
        raise NotDrawn("no dose/*.json (ablations at several set sizes)")
    sizes = sorted(run.dose)
    per = {s: group_effects(run.dose[s]) for s in sizes}
    sizes = [s for s in sizes if per[s]]
    if not sizes:
        raise NotDrawn("the dose/*.json files hold no value-consistency target sets")
    x = np.array(sizes) * 100
    panels = [("delta", "Δ value consistency, own items"), ("margin", "Δ aligned − violating margin, own items")]
    panels = [p for p in panels if any(g.target.__dict__[p[0]] is not None for s in sizes for g in per[s])]
    cvs = {s: cross_value(run.dose[s]) for s in sizes}
    fig = Figure(figsize=(4.3 * (len(panels) + 1), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels) + 1, squeeze=False)[0]
    for ax, (attr, label) in zip(axes, panels, strict=False):
        groups = sorted({g.group for s in sizes for g in per[s]})
        for g in groups:
            ys = [next((getattr(e.target, attr) for e in per[s] if e.group == g), None) for s in sizes]
            ax.plot(x, [np.nan if y is None else y for y in ys], color="C3", alpha=0.25, linewidth=0.8)
        mean_t = [_mean([getattr(e.target, attr) for e in per[s]]) for s in sizes]
        mean_c = [_mean([e.control_mean(attr) for e in per[s]]) for s in sizes]
        ax.plot(x, mean_t, "o-", color="C3", linewidth=2, label="value neurons (mean; thin: each value)")
        ax.plot(x, mean_c, "s--", color="black", label="matched random controls (mean)")
        ax.axhline(0, color="grey", linewidth=0.7)
        _size_axis(ax, x)
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    ax = axes[-1]
    own, other = [], []
    for s in sizes:
        cv = cvs[s]
        if cv is None:
            own.append(np.nan)
            other.append(np.nan)
            continue
        groups, values, m = cv
        mask = np.array([[values[j] == g for j in range(len(values))] for g in groups])
        own.append(float(np.nanmean(m[mask])) if mask.any() else np.nan)
        other.append(float(np.nanmean(m[~mask])) if (~mask).any() else np.nan)
    ax.plot(x, own, "o-", color="C0", label="own value's items (diagonal)")
    ax.plot(x, other, "^--", color="C1", label="other values' items (off-diagonal)")
    ax.axhline(0, color="grey", linewidth=0.7)
    _size_axis(ax, x)
    ax.set_ylabel("mean Δ value consistency (cross-value matrix)")
    ax.set_title("specific or shared?")
    ax.legend(fontsize=7)
    fig.suptitle(f"{run.name}: dose-response over set sizes {', '.join(f'{s:g}' for s in sizes)}")
    return fig


def _mean(xs: list[float | None]) -> float:
    v = [x for x in xs if x is not None]
    return float(np.mean(v)) if v else float("nan")


def _cmap(i: int) -> object:
    from matplotlib import colormaps

    return colormaps["tab20"](i)


def _size_axis(ax: Axes, x: np.ndarray) -> None:
    from matplotlib.ticker import NullFormatter, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(list(x), [f"{v:g}%" for v in x])
    ax.set_xlabel("set size (% of the model's neurons)")
