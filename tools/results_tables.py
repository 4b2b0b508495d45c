"""Print the markdown tables of docs/results.md from study run folders (every number read, none typed).

    python tools/results_tables.py RUN_DIR [RUN_DIR ...] > tables.md

Reads each folder's scorer.json (baseline with each scorer against chance), ablation.json and
ablation-exclusive.json (own-value change of each value's set beside its random controls, the graded
margin, the NLL side effect), compare.json (zh/en overlap against chance), neurons/vape.json
(specificity) and dose/dose.json (the dose-response).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vstore.report import load_run
from vstore.report._summary import effect_table


def _f(x: Any, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def _ci(ci: Any, spec: str = "+.3f") -> str:
    return "–" if not ci else f"[{format(ci[0], spec)}, {format(ci[1], spec)}]"


def _load(p: Path) -> dict[str, Any] | None:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def baselines(run: Path, name: str) -> list[str]:
    sc = _load(run / "scorer.json") or {}
    ab = _load(run / "ablation.json") or {}
    measured = dict(sc.get("measured") or {})
    if not measured and ab:  # scorer fixed in the config: the ablation's own baseline
        measured[ab.get("run", {}).get("scorer", "?")] = ab["baseline"]
    out = []
    for scorer, m in measured.items():
        for lang, row in (m.get("chance") or {}).get("by_lang", {}).items():
            chosen = " (chosen)" if scorer == sc.get("chosen") else ""
            out.append(f"| {name} | {scorer}{chosen} | {lang} | {row['n']} | {_f(row['value_consistency'])} | "
                       f"{_ci(row['ci95'], '.3f')} | {_f(row['p_chance'], '.2g')} | {'yes' if row['above_chance'] else 'no'} |")
    return out


def effects(run: Path, name: str, which: str) -> list[str]:
    r = load_run(run)
    if which != "ablation.json":
        r.ablation = _load(run / which)
    if not r.ablation:
        return []
    out = []
    for e in effect_table([r]):
        nll = " / ".join(f"{k} {v:+.3f}" for k, v in sorted(e["nll"].items())) if e["nll"] else "–"
        cn = " / ".join(f"{k} {v:+.3f}" for k, v in sorted(e["control_nll"].items())) if e["control_nll"] else "–"
        out.append(f"| {name} | {e['value']} | {e['n_neurons']} | {_f(e['delta'], '+.3f')} {_ci(e['ci95'])} | "
                   f"{_f(e['p_value'], '.2g')} | {_f(e['control_delta'], '+.3f')} ({e['controls']}) | "
                   f"{_f(e['p_empirical'], '.2g')} | {_f(e['margin'], '+.4f')} | {_f(e['control_margin'], '+.4f')} | "
                   f"{nll} | {cn} |")
    return out


def overlaps(run: Path, name: str) -> list[str]:
    cmp_ = _load(run / "compare.json") or {}
    out = []
    for o in cmp_.get("overlaps", []):
        if {o.get("a"), o.get("b")} == {"vape-zh", "vape-en"}:
            out.append(f"| {name} | {o['group']} | {o['n_a']} | {o['n_b']} | {o['shared']} | {_f(o['jaccard'])} | "
                       f"{_f(o['chance_jaccard'])} ± {_f(o.get('chance_sd'))} | {_f(o.get('p_value'), '.2g')} |")
    return out


def specificity(run: Path, name: str) -> list[str]:
    ns = _load(run / "neurons" / "vape.json") or {}
    sp = ns.get("specificity") or {}
    if not sp:
        return []
    return [f"| {name} | {sp['neurons']} | {sp['exclusive']} | {sp['shared']} ({_f(sp['shared_fraction'], '.0%')}) | "
            f"{_f(sp.get('mean_jaccard'))} | {_f(sp.get('chance_jaccard'), '.4f')} |"]


def dose(run: Path, name: str) -> list[str]:
    d = _load(run / "dose" / "dose.json") or {}
    return [f"| {name} | {s['label']} | {_f(s.get('n_neurons_mean'), '.0f')} | {_f(s.get('own_delta_mean'), '+.3f')} | "
            f"{_f(s.get('other_delta_mean'), '+.3f')} | {_f(s.get('control_own_delta_mean'), '+.3f')} | "
            f"{_f(s.get('margin_own_mean'), '+.4f')} | {_f(s.get('control_margin_own_mean'), '+.4f')} |"
            for s in d.get("sizes", [])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    a = ap.parse_args()
    names = {r: (_load(r / "study.json") or {}).get("config", {}).get("model", {}).get("name", r.name) for r in a.runs}
    sections = [
        ("Baseline value consistency against chance (0.5)",
         "| model | scorer | lang | items | VC | 95% CI | p vs 0.5 | above chance |\n|---|---|---|---|---|---|---|---|",
         lambda r: baselines(r, names[r])),
        ("Each value's VAPE set switched off: change of its own value consistency, beside random controls",
         "| model | value | neurons | Δ VC [95% CI] | McNemar p | controls Δ VC (n) | p vs controls | Δ margin | controls Δ margin | Δ NLL | controls Δ NLL |\n"
         "|---|---|---|---|---|---|---|---|---|---|---|",
         lambda r: effects(r, names[r], "ablation.json")),
        ("Exclusive sets (neurons of one value only) switched off",
         "| model | value | neurons | Δ VC [95% CI] | McNemar p | controls Δ VC (n) | p vs controls | Δ margin | controls Δ margin | Δ NLL | controls Δ NLL |\n"
         "|---|---|---|---|---|---|---|---|---|---|---|",
         lambda r: effects(r, names[r], "ablation-exclusive.json")),
        ("How specific are the VAPE sets",
         "| model | neurons | own (one value) | shared | mean pairwise Jaccard | chance |\n|---|---|---|---|---|---|",
         lambda r: specificity(r, names[r])),
        ("zh and en VAPE sets: overlap against chance",
         "| model | value | zh | en | shared | Jaccard | chance ± sd | p |\n|---|---|---|---|---|---|---|---|",
         lambda r: overlaps(r, names[r])),
        ("Dose-response (mean over the dose values)",
         "| model | top rate | neurons | own Δ VC | other values' Δ VC | controls own Δ VC | own Δ margin | controls Δ margin |\n"
         "|---|---|---|---|---|---|---|---|",
         lambda r: dose(r, names[r])),
    ]
    for title, head, rows in sections:
        body = [line for r in a.runs for line in rows(r)]
        if body:
            print(f"### {title}\n\n{head}")
            print("\n".join(body) + "\n")


if __name__ == "__main__":
    main()
