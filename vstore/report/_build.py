"""`write_report`: run folders -> one self-contained HTML page plus the PNG files of its figures."""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, cast

from .._version import __version__
from ..atomic import write_atomic
from ..errors import UsageError
from ..progress import Note
from . import _figures as F
from . import _figures_ablation as A
from ._common import NotDrawn, value_label
from ._fonts import cjk_font, font_face_css, rc_params
from ._html import card_section, esc, figure_html, fmt, fmt_ci, page, table_html
from ._runs import Run, load_run
from ._summary import baseline_table, effect_table

__all__ = ["Report", "build_report", "write_report"]

_CHANCE = "chance is 0.5 (two actions)"
#: (file key, title, caption, function of one run)
MODEL_FIGURES: list[tuple[str, str, str, Callable[[Run], Any]]] = [
    ("baseline", "Baseline against chance", "Unablated value consistency per value and language with its 95% "
     f"interval; {_CHANCE}. A value whose interval does not clear chance cannot show a loss.", F.baseline_figure),
    ("heatmap", "Value neurons per layer", "Number of each value's neurons in each layer of the main set.",
     F.heatmap_figure),
    ("overlap", "zh/en overlap per value", "Jaccard of the sets ranked on Chinese and on English stories, beside "
     "the Jaccard expected of random sets of the same per-layer sizes (± 2 sd).", F.overlap_figure),
    ("ablation", "Value-consistency change under ablation", "Each value's neurons switched off: change on its "
     "own items with the bootstrap 95% interval, beside random control sets of the same per-layer sizes.",
     A.ablation_figure),
    ("side-effect", "NLL side effect", "Own-value change against the change of per-token NLL on general text "
     "(a set that changes values without hurting language sits down-left of its controls).", A.side_effect_figure),
    ("margin", "Graded margin change", "Mean change per item of the aligned − violating log-likelihood margin: "
     "a graded effect that the binary value consistency can hide.", A.margin_figure),
    ("cross-value", "Cross-value ablation matrix", "Change of value consistency on each value's items (columns) "
     "when each value's set (rows) is ablated; a value-specific set hurts its own column most.",
     A.cross_value_figure),
    ("dose", "Dose–response", "Effect against set size, beside matched random controls at every size, and "
     "own-value against other values' items.", A.dose_figure),
    ("similarity", "Value-similarity matrices", "Correlation between the values' mean activation profiles over "
     "the value neurons, per language, with their agreement (Spearman, permutation p).", F.similarity_figure),
]
CROSS_FIGURES: list[tuple[str, str, str, Callable[[list[Run]], Any]]] = [
    ("depth", "Relative depth per model", "Where the value neurons sit, as layer / number of layers, so models of "
     "different depth compare.", F.depth_figure),
    ("baseline-models", "Baseline per model", f"Unablated value consistency per model and language; {_CHANCE}.",
     F.baseline_models_figure),
]


@dataclass
class Report:
    """What :func:`build_report` wrote."""

    path: Path
    figures: list[Path] = field(default_factory=list)
    not_drawn: list[tuple[str, str]] = field(default_factory=list)  # (figure, why)
    problems: list[str] = field(default_factory=list)
    baseline: list[dict[str, Any]] = field(default_factory=list)
    effects: list[dict[str, Any]] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"


def _render(draw: Callable[[], Any]) -> tuple[bytes, list[str]]:
    """Draw and encode a figure as PNG; returns the bytes and any missing-glyph warnings."""
    import matplotlib

    with matplotlib.rc_context(cast(Any, rc_params())), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = draw()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    glyphs = sorted({str(w.message) for w in caught if "missing from" in str(w.message)})
    return buf.getvalue(), glyphs


def _tables(rep: Report) -> str:
    b = [[r["model"], r["lang"], r["n"], fmt(r["vc"]), fmt_ci(r["ci95"]), fmt(r["p_chance"], ".2g"),
          ("html", '<span class="good">yes</span>' if r["above_chance"] else '<span class="bad">no</span>'),
          f"{len(r['values_not_above'])} of {r['n_values']}" if r["n_values"] else "–"] for r in rep.baseline]
    out = ""
    if b:
        out += "<h3>Baseline against chance</h3>" + table_html(
            ["model", "language", "items", "value consistency", "95% interval", "p vs 0.5", "above chance",
             "values not above chance"], b, left=2)
    e = [[r["model"], value_label(r["value"]), r["n_neurons"] or "–", fmt(r["delta"], "+.3f"), fmt_ci(r["ci95"], "+.3f"),
          fmt(r["control_delta"], "+.3f"), r["controls"], fmt(r["p_empirical"], ".2g"), fmt(r["margin"], "+.3f"),
          fmt(r["control_margin"], "+.3f"),
          " ".join(f"{k} {v:+.3f}" for k, v in r["nll"].items()) or "–",
          " ".join(f"{k} {v:+.3f}" for k, v in r["control_nll"].items()) or "–"] for r in rep.effects]
    if e:
        out += "<h3>Own-value change: value neurons against random controls</h3>" + table_html(
            ["model", "value", "neurons", "Δ VC", "95% interval", "controls Δ VC", "controls", "p (controls)",
             "Δ margin", "controls Δ margin", "Δ NLL", "controls Δ NLL"], e, left=2)
    return out


def _cross_tables(runs: list[Run]) -> str:
    depth, agree = [], []
    for r in runs:
        for d in (r.compare or {}).get("depth", []):
            if isinstance(d, dict):
                depth.append([d.get("a"), d.get("b"), d.get("group", "*"), fmt(d.get("wasserstein")),
                              fmt(d.get("chance_wasserstein")), fmt(d.get("chance_sd"))])
        for a in (r.compare or {}).get("similarity_agreement", []):
            if isinstance(a, dict):
                agree.append([a.get("a"), a.get("b"), fmt(a.get("spearman")), fmt(a.get("p_value"), ".2g"),
                              a.get("permutations", "–")])
    out = ""
    if depth:
        out += "<h3>Relative-depth distance between sets (1-Wasserstein)</h3>" + table_html(
            ["set a", "set b", "group", "W1", "chance W1", "chance sd"], depth, left=3)
    if agree:
        out += "<h3>Agreement of value-similarity matrices</h3>" + table_html(
            ["a", "b", "Spearman", "p (permutation)", "permutations"], agree, left=2)
    return out


def build_report(run_dirs: Sequence[str | Path], out: str | Path, *, figures_dir: str | Path | None = None,
                 on_note: Note | None = None) -> Report:
    """Write the HTML report of study run folders and the PNG files of its figures.

    Parameters
    ----------
    run_dirs
        Run folders (docs/report.md): one per model; every file in them is optional.
    out
        The HTML file to write.
    figures_dir
        Where the PNG files go (default ``figures/`` beside ``out``).
    on_note
        Receives notes (a figure that could not be drawn, a file that could not be read).

    Returns
    -------
    Report
        The page's path, the figure files, what was not drawn and why, and the key numbers.
    """
    if not run_dirs:
        raise UsageError("no run folder given", "run_dirs")
    out = Path(out)
    fig_dir = Path(figures_dir) if figures_dir is not None else out.parent / "figures"
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    for r in runs:  # two runs of one model: tell them apart by folder
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({r.path.name})"
    rep = Report(out, runs=runs, baseline=baseline_table(runs), effects=effect_table(runs))
    rep.problems += [f"{r.path}: {p}" for r in runs for p in r.problems]
    fig_dir.mkdir(parents=True, exist_ok=True)

    def emit(key: str, title: str, caption: str, draw: Callable[[], Any], who: str) -> str:
        try:
            png, glyphs = _render(draw)
        except NotDrawn as e:
            rep.not_drawn.append((f"{who}: {title}", str(e)))
            return ""
        rep.problems += [f"{who}: {title}: {g}" for g in glyphs]
        path = fig_dir / f"{_slug(who)}-{key}.png"
        write_atomic(path, lambda f: f.write(png))
        rep.figures.append(path)
        return figure_html(png, f"{who}: {title}", caption, f"{fig_dir.name}/{path.name}")

    cross = "".join(emit(k, t, c, partial(fn, runs), "all models") for k, t, c, fn in CROSS_FIGURES)
    sections = "".join(_model_section(r, rep, lambda k, t, c, fn, r=r: emit(k, t, c, partial(fn, r), r.name))
                       for r in runs)
    body = _body(rep, cross, sections)
    doc = page(f"vstore report: {', '.join(r.name for r in runs)}", font_face_css(body), body)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda f: f.write(doc.encode("utf-8")))
    for what, why in rep.not_drawn:
        (on_note or _quiet)(f"not drawn: {what}: {why}")
    for p in rep.problems:
        (on_note or _quiet)(p)
    return rep


def _quiet(message: str) -> None:
    pass


def _model_section(r: Run, rep: Report, emit: Callable[..., str]) -> str:
    figs = "".join(emit(k, t, c, fn) for k, t, c, fn in MODEL_FIGURES)
    cards = card_section(r) if r.cards and r.cards.get("cards") else ""
    if not cards:
        rep.not_drawn.append((f"{r.name}: neuron cards", "no cards.json (vstore show --json)"))
    sets = ", ".join(f"{esc(k)} ({esc(ns.method)})" for k, ns in r.sets.items()) or "none"
    return (f"<h2>{esc(r.name)}</h2><p class=\"muted\">run folder {esc(r.path)}; "
            f"{esc(r.n_layers or '?')} layers × {esc(r.n_neurons or '?')} neurons; neuron sets: {sets}</p>"
            + figs + (f"<h3>Neuron cards</h3>{cards}" if cards else ""))


def _body(rep: Report, cross: str, sections: str) -> str:
    names = ", ".join(r.name for r in rep.runs)
    cross_tables = _cross_tables(rep.runs)
    body = (f"<h1>vstore report: {esc(names)}</h1><p class=\"muted\">written {datetime.now(UTC):%Y-%m-%d %H:%M} "
            f"UTC by vstore {esc(__version__)}; values named in English and Chinese "
            f"({esc(' · '.join(value_label(k) for k in ('harmony', 'justice')))} …).</p>"
            + ("<p class=\"bad\">No font with Chinese glyphs was found: Chinese text may show as boxes.</p>"
               if cjk_font() is None else "")
            + "<h2>Key numbers</h2>" + (_tables(rep) or "<p>No ablation result in the run folders.</p>")
            + (f"<h2>Across models</h2>{cross}{cross_tables}" if cross or cross_tables else "")
            + sections)
    nd = "".join(f"<li><b>{esc(w)}</b>: {esc(y)}</li>" for w, y in rep.not_drawn)
    pr = "".join(f"<li>{esc(p)}</li>" for p in rep.problems)
    return body + (f"<h2>Not drawn</h2><ul class=\"notdrawn\">{nd}</ul>" if nd else "") + (
        f"<h2>Problems reading the run folders</h2><ul>{pr}</ul>" if pr else "")


def write_report(run_dirs: Sequence[str | Path], out: str | Path, *, figures_dir: str | Path | None = None,
                 on_note: Note | None = None) -> Path:
    """:func:`build_report`, returning only the page's path (what ``vstore study`` calls)."""
    return build_report(run_dirs, out, figures_dir=figures_dir, on_note=on_note).path
