"""``vstore ablate``: value consistency (or per-token NLL) with neuron sets switched off."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from ..ablate import run_ablation
from ..ablation_run import ITEMS_ON
from ..evaluate import PROMPTS, SCORERS
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
    p.add_argument("--prompt", choices=PROMPTS, default="raw", help="choice scorer: raw text (default) or chat (the tokenizer's chat template)")
    p.add_argument("--controls-on", choices=ITEMS_ON, default="own", help="controls measured on their group's own items (default) or all items")
    p.add_argument("--targets-on", choices=ITEMS_ON, default="all", help="targets measured on all items (default; the cross-value matrix) or own")
    p.add_argument("--side-effect", choices=("nll",), default=None, help="nll: also per-token NLL on general text under each set")
    p.add_argument("--general-text", default=None, help="default (packaged zh/en text, see docs) or zh=FILE,en=FILE (one text per line)")
    p.add_argument("--prefix-mb", type=float, default=1024.0, help="memory for the shared unablated prefix (default 1024; 0 disables)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores not kept busy by other processes)")
    p.add_argument("--sets-per-forward", type=int, default=1, help="neuron sets measured in one batched forward (default 1; pays on GPU)")
    p.add_argument("--overwrite", action="store_true", help="start again even if --out holds another run's result")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common_model_args(p)
    p.set_defaults(handler=cmd_ablate)
    register_dose(sub)


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _p(x: Any) -> str:
    return "-" if x is None else (f"{x:.2g}" if x < 0.001 else f"{x:.3f}")


def cmd_ablate(a: argparse.Namespace) -> int:
    res = run_ablation(
        a.model, a.neurons, a.data, a.out, split=None if a.split == "all" else a.split, groups=a.groups,
        mode=a.mode, scorer=a.scorer, controls=a.controls, seed=a.seed, metric=a.metric, store=a.store,
        batch_size=a.batch_size, device=a.device, limit=a.limit, overwrite=a.overwrite,
        trust_remote_code=a.trust_remote_code, progress=make_progress(not a.no_progress), prompt=a.prompt,
        controls_on=a.controls_on, targets_on=a.targets_on, side_effect=a.side_effect,
        general_text="default" if a.side_effect and a.general_text is None else a.general_text,
        prefix_mb=a.prefix_mb, threads=a.threads, sets_per_forward=a.sets_per_forward,
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
    ch = base.get("chance")
    if ch:
        console.print("baseline vs chance (0.5): " + "; ".join(
            f"{lg} {c['value_consistency']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] p={_p(c['p_chance'])}"
            f"{'' if c['above_chance'] else ' NOT above chance'}" for lg, c in ch["by_lang"].items()), highlight=False)
    for col in ("group", "kind", "neurons", label, "Δ", "rel.", "95% CI of Δ", "p", "vs controls", "Δ margin", "Δ NLL gen."):
        t.add_column(col, justify="left" if col in ("group", "kind") else "right")
    for e in res["ablations"]:
        if e["kind"] != "target":
            continue
        vs = e.get("vs_controls")
        vs_txt = (f"Δ {vs['mean_delta']:+.3f} vs {vs.get('target_delta', e['delta']):+.3f} (n={vs['n']}, "
                  f"{vs.get('items_on', 'all')} items), p={_p(vs['p_empirical'])}") if vs else "-"
        md = e.get("margin_delta")
        md_txt = "-" if md is None else f"{md:+.3f}" + (f" ({vs['mean_margin_delta']:+.3f})" if vs and "mean_margin_delta" in vs else "")
        se = e.get("side_effect")
        se_txt = "-" if not se else f"{se['delta']:+.4f}" + (f" ({vs['mean_nll_delta']:+.4f})" if vs and "mean_nll_delta" in vs else "")
        lo, hi = e["ci95"]
        t.add_row(e["group"], "target", str(e["n_neurons"]), _fmt(e[field]), _fmt(e["delta"], "+.3f"),
                  _fmt(e["relative_change"], "+.1%"), f"[{_fmt(lo, '+.3f')}, {_fmt(hi, '+.3f')}]",
                  _p(e["p_value"]), vs_txt, md_txt, se_txt)
    console.print(t)
    cv = res.get("cross_value")
    if cv and len(cv["groups"]) > 1:
        console.print(delta_matrix("cross-value matrix: Δ VC of value (column) when the group (row) is ablated",
                                   cv["groups"], cv["values"], cv["matrix"], "+.2f"))
    cl = res.get("cross_lang")
    if cl and cl["groups"]:
        console.print(delta_matrix("Δ NLL per token per language when the group (row) is ablated",
                                   cl["groups"], cl["langs"], cl["matrix"], "+.3f"))


def register_dose(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "dose",
        help="dose-response: ablate neuron sets of several sizes, each beside matched random controls",
        description=(
            "Ablate the groups of each neuron-set file (one per size) beside --controls random sets of\n"
            "the same per-layer counts, and print per size the own-value vs other-value change (the\n"
            "cross-value matrix) beside the controls. Writes OUT/size-<label>.json per size and\n"
            "OUT/dose.json. Format: docs/ablate-result.md (Dose-response)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--neurons", required=True, help="comma-separated neuron-set files, one per size")
    p.add_argument("--labels", default=None, help="comma-separated size labels (default: file stems)")
    p.add_argument("--data", required=True, help="evaluation stories")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--groups", default=None, help="comma-separated group names (default: every group)")
    p.add_argument("--controls", type=int, default=3, help="random sets per group and size (default 3)")
    p.add_argument("--seed", type=int, default=0, help="first control seed (default 0)")
    p.add_argument("--scorer", choices=SCORERS, default="ll", help="ll (default) or choice")
    p.add_argument("--prompt", choices=PROMPTS, default="raw", help="choice scorer: raw (default) or chat")
    p.add_argument("--mode", default="zero", help="zero (default) or scale:F")
    p.add_argument("--side-effect", choices=("nll",), default=None, help="nll: per-token NLL on general text too")
    p.add_argument("--general-text", default=None, help="default or zh=FILE,en=FILE")
    p.add_argument("--batch-size", type=int, default=8, help="stories per forward (default 8)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    p.add_argument("--overwrite", action="store_true", help="start each size's result again")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common_model_args(p)
    p.set_defaults(handler=cmd_dose)


def cmd_dose(a: argparse.Namespace) -> int:
    from ..dose import run_dose

    doc = run_dose(
        a.model, [x for x in a.neurons.split(",") if x], a.data, a.out,
        labels=a.labels.split(",") if a.labels else None, groups=a.groups, controls=a.controls, seed=a.seed,
        scorer=a.scorer, prompt=a.prompt, mode=a.mode, batch_size=a.batch_size, device=a.device, limit=a.limit,
        side_effect=a.side_effect, general_text="default" if a.side_effect and a.general_text is None else a.general_text,
        overwrite=a.overwrite, progress=make_progress(not a.no_progress),
        on_note=lambda m: console_err.print(f"[yellow]{m}[/]", highlight=False),
    )
    t = Table(title="dose-response: mean change of value consistency (own value vs other values)")
    for col in ("size", "neurons", "own Δ", "other Δ", "own−other", "controls own Δ", "own Δ margin",
                "controls Δ margin", "Δ NLL gen."):
        t.add_column(col, justify="right")
    for s in doc["sizes"]:
        t.add_row(s["label"], _fmt(s["n_neurons_mean"], ".0f"), _fmt(s["own_delta_mean"], "+.3f"),
                  _fmt(s["other_delta_mean"], "+.3f"), _fmt(s["own_minus_other"], "+.3f"),
                  _fmt(s["control_own_delta_mean"], "+.3f"), _fmt(s["margin_own_mean"], "+.3f"),
                  _fmt(s["control_margin_own_mean"], "+.3f"), _fmt(s["nll_delta_mean"], "+.4f"))
    console.print(t)
    console_err.print(f"[green]wrote[/] {a.out}/dose.json", highlight=False)
    return 0
