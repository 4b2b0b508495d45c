"""``vstore report``: study run folders -> one self-contained HTML page, its PNG figures, key numbers."""

from __future__ import annotations

import argparse
from typing import Any

from rich.markup import escape
from rich.table import Table

from ..report import Report, build_report
from .common import console, console_err


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "report",
        help="write an HTML report (embedded PNG figures) of study run folders",
        description=(
            "Read study run folders (neurons/*.json, cards.json, compare.json, ablation.json, dose/*.json;\n"
            "every file optional) and write one self-contained HTML page (figures embedded as PNG data,\n"
            "no external links, scripts or fonts) plus the PNG files. Several folders (models) go in one\n"
            "page with a section each and cross-model figures. Prints the key numbers.\n"
            "Figures and fields: docs/report.md."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="study run folder(s), one per model")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--figures-dir", default=None, help="folder for the PNG files (default: figures/ beside --out)")
    p.set_defaults(handler=cmd_report)


def _f(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _ci(ci: Any, spec: str = ".3f") -> str:
    return "-" if not ci else f"[{format(ci[0], spec)}, {format(ci[1], spec)}]"


def print_key_numbers(rep: Report) -> None:
    """The report's key numbers as rich tables: baseline vs chance, target vs controls per value."""
    if rep.baseline:
        t = Table(title="baseline value consistency against chance (0.5)")
        for c in ("model", "lang", "items", "VC", "95% CI", "p vs 0.5", "above chance", "values not above"):
            t.add_column(c, justify="left" if c in ("model", "lang") else "right")
        for r in rep.baseline:
            above = "[green]yes[/]" if r["above_chance"] else "[red]no[/]"
            t.add_row(escape(r["model"]), r["lang"], str(r["n"]), _f(r["vc"]), _ci(r["ci95"]), _f(r["p_chance"], ".2g"),
                      above, f"{len(r['values_not_above'])}/{r['n_values']}" if r["n_values"] else "-")
        console.print(t)
    if rep.effects:
        t = Table(title="own-value change: value neurons vs random controls")
        for c in ("model", "value", "neurons", "Δ VC", "95% CI", "controls Δ VC", "p (controls)", "Δ margin",
                  "controls Δ margin", "Δ NLL", "controls Δ NLL"):
            t.add_column(c, justify="left" if c in ("model", "value") else "right")
        for r in rep.effects:
            t.add_row(escape(r["model"]), r["value"], _f(r["n_neurons"], "d"), _f(r["delta"], "+.3f"),
                      _ci(r["ci95"], "+.3f"), _f(r["control_delta"], "+.3f"), _f(r["p_empirical"], ".2g"),
                      _f(r["margin"], "+.3f"), _f(r["control_margin"], "+.3f"),
                      " ".join(f"{k} {v:+.3f}" for k, v in r["nll"].items()) or "-",
                      " ".join(f"{k} {v:+.3f}" for k, v in r["control_nll"].items()) or "-")
        console.print(t)


def cmd_report(a: argparse.Namespace) -> int:
    rep = build_report(a.run_dirs, a.out, figures_dir=a.figures_dir)
    print_key_numbers(rep)
    for what, why in rep.not_drawn:
        console_err.print(f"[yellow]not drawn[/] {escape(what)}: {escape(why)}", highlight=False, soft_wrap=True)
    for p in rep.problems:
        console_err.print(f"[yellow]warning[/] {escape(p)}", highlight=False, soft_wrap=True)
    where = rep.figures[0].parent if rep.figures else "-"
    console_err.print(f"[green]wrote[/] {escape(str(rep.path))} with {len(rep.figures)} figures "
                      f"(PNG files in {escape(str(where))})", highlight=False, soft_wrap=True)
    return 0
