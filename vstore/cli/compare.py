"""``vstore compare A.json B.json ...``: overlaps of neuron sets against chance, depth, value similarity."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.table import Table

from ..atomic import write_json_atomic
from ..compare import compare_sets
from ..errors import UsageError
from ..kernels import BACKENDS
from .common import console_err, say, table_console
from .progress import make_progress


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "compare",
        help="overlap of neuron sets (groups, languages, methods, halves, models) against chance",
        description=(
            "Compare neuron sets: the overlap (shared neurons, Jaccard) of every pair of sets per group and\n"
            "for their union, each beside its chance level (random sets of the same per-layer sizes: mean,\n"
            "sd, p-value); the groups of each set against each other (own / shared); split halves; sets of\n"
            "different models by relative depth (layer / n_layers) with the 1-Wasserstein distance. With\n"
            "--similarity STORE, the value-similarity matrix per language from the statistics cache and the\n"
            "agreement of the matrices (Spearman, permutation p-value). See docs/show-compare.md."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sets", nargs="*", metavar="SET.json", help="neuron-set files (vstore rank --out)")
    p.add_argument("--label", action="append", default=None, metavar="NAME",
                   help="a label per set, in order (default: file names)")
    p.add_argument("--similarity", nargs="+", default=[], metavar="STORE",
                   help="stores whose statistics give value-similarity matrices")
    p.add_argument("--where", action="append", default=[], metavar="COL=V[,V]",
                   help="similarity: only these examples; lang=... picks the languages (default: each)")
    p.add_argument("--by", default=None, help="similarity: label column of the groups (default: the sets' or value)")
    p.add_argument("--bins", type=int, default=10, help="relative-depth bins (default 10)")
    p.add_argument("--simulations", type=int, default=1000, help="draws of a simulated chance level (default 1000)")
    p.add_argument("--permutations", type=int, default=10000, help="permutations of the agreement p (default 10000)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON (vstore-compare v1)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the JSON to FILE")
    p.add_argument("--backend", default="auto", choices=("auto", *BACKENDS), help="statistics kernels")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_compare)


def _where(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for text in items:
        key, sep, vals = text.partition("=")
        values = [v.strip() for v in vals.split(",") if v.strip()]
        if not sep or not key.strip() or not values:
            raise UsageError(f"--where: expected COLUMN=VALUE[,VALUE...], got {text!r}")
        out.setdefault(key.strip(), []).extend(values)
    return out


def _f(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _p(x: Any) -> str:
    return "-" if x is None else (f"{x:.2g}" if x < 0.01 else f"{x:.3f}")


def overlap_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="overlap of neuron sets (chance: random sets of the same per-layer sizes)", title_justify="left")
    for c in ("a", "b", "differ", "by", "group", "n a", "n b", "shared", "Jaccard", "chance J", "± sd", "p"):
        t.add_column(c, justify="right" if c in ("n a", "n b", "shared", "Jaccard", "chance J", "± sd", "p") else "left")
    for r in rows:
        t.add_row(r["a"], r["b"], r["kind"], r["by"], r["group"], str(r["n_a"]), str(r["n_b"]), str(r["shared"]),
                  _f(r["jaccard"]), _f(r["chance_jaccard"]), _f(r["chance_sd"]), _p(r["p_value"]))
    return t


def within_table(w: dict[str, Any]) -> Table:
    t = Table(title=f"{w['set']}: groups against each other", title_justify="left")
    for c in ("group", "neurons", "own", "shared", "mean J", "chance J"):
        t.add_column(c, justify="left" if c == "group" else "right")
    for i, g in enumerate(w["groups"]):
        js = [x for k, x in enumerate(w["jaccard"][i]) if k != i and x is not None and w["own"][w["groups"][k]]
              + w["shared"][w["groups"][k]]]
        cs = [x for k, x in enumerate((w.get("chance") or [[]] * len(w["groups"]))[i]) if k != i and x is not None]
        n = w["own"][g] + w["shared"][g]
        t.add_row(g, str(n), str(w["own"][g]), str(w["shared"][g]), _f(sum(js) / len(js) if js and n else None),
                  _f(sum(cs) / len(cs) if cs and n else None, ".4f"))
    return t


def depth_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="relative depth across models: 1-Wasserstein distance (chance: a random set of b's size from b's "
              "model)", title_justify="left")
    for c in ("a", "b", "group", "W1", "chance W1", "± sd", "p (as close)"):
        t.add_column(c, justify="left" if c in ("a", "b", "group") else "right")
    for r in rows:
        t.add_row(r["a"], r["b"], r["group"], _f(r["wasserstein"]), _f(r["chance_wasserstein"]), _f(r["chance_sd"]),
                  _p(r["p_value"]))
    return t


def similarity_table(m: dict[str, Any]) -> Table:
    t = Table(title=f"value similarity, {m['model']} lang={m['lang']} (Pearson of neuron-centred mean profiles over "
              f"{m['n_profile']} neurons: {m['neurons']})", title_justify="left")
    t.add_column("")
    for g in m["groups"]:
        t.add_column(g[:6], justify="right")
    for g, row in zip(m["groups"], m["matrix"], strict=True):
        t.add_row(g, *(_f(x, ".2f") for x in row))
    return t


def agreement_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(title="agreement of value-similarity matrices (Spearman of upper triangles; chance: permuted groups)",
              title_justify="left")
    for c in ("a", "b", "groups", "Spearman", "p", "permutations"):
        t.add_column(c, justify="left" if c in ("a", "b") else "right")
    for r in rows:
        t.add_row(r["a"], r["b"], str(len(r["groups"])), _f(r["spearman"]), _p(r["p_value"]), str(r["permutations"]))
    return t


def cmd_compare(a: argparse.Namespace) -> int:
    doc = compare_sets(a.sets, labels=a.label, similarity=a.similarity, where=_where(a.where), by=a.by, bins=a.bins,
                       simulations=a.simulations, permutations=a.permutations, backend=a.backend,
                       progress=make_progress(not a.no_progress), on_note=say)
    if a.out:
        write_json_atomic(a.out, doc)
        console_err.print(f"[green]wrote[/] {a.out}", highlight=False)
    if a.json:
        print(json.dumps(doc, ensure_ascii=False, indent=1))
        return 0
    out = table_console()
    if doc["overlaps"]:
        out.print(overlap_table(doc["overlaps"]))
    for w in doc["within"]:
        out.print(within_table(w))
        out.print(f"{w['set']}: {w['exclusive']} of {w['neurons']} neurons in one group; mean pairwise Jaccard "
                  f"{_f(w['mean_jaccard'])} (chance {_f(w['chance_jaccard'], '.4f')})", highlight=False, soft_wrap=True)
    if doc["depth"]:
        out.print(depth_table(doc["depth"]))
    for m in doc["similarity"]:
        out.print(similarity_table(m))
    if doc["similarity_agreement"]:
        out.print(agreement_table(doc["similarity_agreement"]))
    return 0
