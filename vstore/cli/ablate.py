"""``vstore ablate``: value consistency (or per-token NLL) with neuron sets switched off."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from ..ablate import run_ablation
from ..evaluate import SCORERS
from .common import add_common_model_args, console, console_err, delta_matrix
from .progress import make_progress


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "ablate",
        help="switch neuron sets off and measure value consistency (or per-token NLL)",
        description=(
            "Measure the unablated model once, then each neuron set of --neurons switched off through\n"
            "scoped hooks, beside --controls random sets with the same per-layer counts. Per set: value\n"
            "consistency per value and language, its change, a bootstrap 95% interval and an exact\n"
            "McNemar test; the cross-value matrix comes from the same run. The result JSON is written\n"
            "after each finished set; running the same command again resumes it.\n"
            "Result format: docs/ablate-result.md."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--neurons", required=True, help="neuron-set JSON written by `vstore rank`")
    p.add_argument("--data", required=True, help="evaluation stories (JSONL file/folder); .txt also for --metric nll")
    p.add_argument("--out", required=True, help="result JSON to write (resumed when it holds the same run)")
    p.add_argument("--split", default="evaluation", help="stories of this split (default evaluation; 'all' keeps every split)")
    p.add_argument("--groups", default=None, help="comma-separated group names; a+b ablates a union (default: each group in turn)")
    p.add_argument("--mode", default="zero", help="zero (default), mean (needs --store) or scale:F")
    p.add_argument("--scorer", choices=SCORERS, default="ll", help="ll: action log-likelihood (default); choice: A/B options in both orders")
    p.add_argument("--metric", choices=("vc", "nll"), default="vc", help="vc: value consistency (default); nll: per-token NLL per language")
    p.add_argument("--controls", type=int, default=3, help="random neuron sets per group, same per-layer counts (default 3; 0 allowed)")
    p.add_argument("--seed", type=int, default=0, help="first control seed (default 0)")
    p.add_argument("--store", default=None, help="activation store whose statistics give the means of --mode mean")
    p.add_argument("--batch-size", type=int, default=8, help="stories per forward (default 8)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    p.add_argument("--overwrite", action="store_true", help="start again even if --out holds another run's result")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common_model_args(p)
    p.set_defaults(handler=cmd_ablate)


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _p(x: Any) -> str:
    return "-" if x is None else (f"{x:.2g}" if x < 0.001 else f"{x:.3f}")


def cmd_ablate(a: argparse.Namespace) -> int:
    res = run_ablation(
        a.model, a.neurons, a.data, a.out, split=None if a.split == "all" else a.split, groups=a.groups,
        mode=a.mode, scorer=a.scorer, controls=a.controls, seed=a.seed, metric=a.metric, store=a.store,
        batch_size=a.batch_size, device=a.device, limit=a.limit, overwrite=a.overwrite,
        trust_remote_code=a.trust_remote_code, progress=make_progress(not a.no_progress),
        on_note=lambda m: console_err.print(f"[yellow]{m}[/]", highlight=False),
    )
    print_summary(res)
    console_err.print(f"[green]wrote[/] {a.out}", highlight=False)
    return 0


def print_summary(res: dict[str, Any]) -> None:
    """A rich table of the baseline and every ablated set (controls summarised per group)."""
    field = "value_consistency" if res["metric"] == "vc" else "nll"
    label = "VC" if field == "value_consistency" else "NLL/token"
    base = res["baseline"]
    t = Table(title=f"ablation ({res['run']['mode']}, {res['run']['scorer'] if field != 'nll' else 'nll'}); "
                    f"baseline {label} {_fmt(base[field])} over {base['n_items']} items")
    for col in ("group", "kind", "neurons", label, "Δ", "rel.", "95% CI of Δ", "p", "vs controls"):
        t.add_column(col, justify="left" if col in ("group", "kind") else "right")
    for e in res["ablations"]:
        if e["kind"] != "target":
            continue
        vs = e.get("vs_controls")
        vs_txt = f"Δ {vs['mean_delta']:+.3f} (n={vs['n']}), p={_p(vs['p_empirical'])}" if vs else "-"
        lo, hi = e["ci95"]
        t.add_row(e["group"], "target", str(e["n_neurons"]), _fmt(e[field]), _fmt(e["delta"], "+.3f"),
                  _fmt(e["relative_change"], "+.1%"), f"[{_fmt(lo, '+.3f')}, {_fmt(hi, '+.3f')}]",
                  _p(e["p_value"]), vs_txt)
    console.print(t)
    cv = res.get("cross_value")
    if cv and len(cv["groups"]) > 1:
        console.print(delta_matrix("cross-value matrix: Δ VC of value (column) when the group (row) is ablated",
                                   cv["groups"], cv["values"], cv["matrix"], "+.2f"))
    cl = res.get("cross_lang")
    if cl and cl["groups"]:
        console.print(delta_matrix("Δ NLL per token per language when the group (row) is ablated",
                                   cl["groups"], cl["langs"], cl["matrix"], "+.3f"))
