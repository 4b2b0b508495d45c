"""``vstore data validate|stats|import``."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from ..data import parse_labels
from ..datatools import import_stories, parse_mapping, story_stats, validate_stories
from .common import console, console_err


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("data", help="validate, summarise or import story files (the C-voice schema)")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    v = dsub.add_parser("validate", help="check every line of a story file; exit 2 on errors")
    v.add_argument("file", help="story .jsonl file or folder")
    v.set_defaults(handler=cmd_validate)
    s = dsub.add_parser("stats", help="items per value x language x split, story lengths")
    s.add_argument("file", help="story .jsonl file or folder")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(handler=cmd_stats)
    i = dsub.add_parser("import", help="convert a JSONL/CSV file into the story schema")
    i.add_argument("src", help=".jsonl, .csv or .tsv file")
    i.add_argument("--map", required=True, help="FIELD=COLUMN,... e.g. story=text,aligned=good,violating=bad,value=label")
    i.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="constant field for every item")
    i.add_argument("--out", required=True, help="output .jsonl")
    i.set_defaults(handler=cmd_import)


def cmd_validate(a: argparse.Namespace) -> int:
    items = validate_stories(a.file)
    console_err.print(f"[green]ok[/] {a.file}: {len(items)} valid items", highlight=False)
    return 0


def cmd_stats(a: argparse.Namespace) -> int:
    st = story_stats(a.file)
    if a.json:
        print(json.dumps(st, ensure_ascii=False, indent=1))
        return 0
    t = Table(title=f"{a.file}: {st['items']} items")
    t.add_column("value")
    cols = [(lang, sp) for sp in st["splits"] for lang in st["langs"]]
    for lang, sp in cols:
        t.add_column(f"{sp}\n{lang}", justify="right")
    cell = {(c["value"], c["lang"], c["split"]): c["n"] for c in st["counts"]}
    for v in st["values"]:
        t.add_row(v, *[str(cell.get((v, lang, sp), 0)) for lang, sp in cols])
    t.add_row("[bold]total", *[str(sum(cell.get((v, lang, sp), 0) for v in st["values"])) for lang, sp in cols])
    console.print(t)
    lt = Table(title="story length")
    for c in ("lang", "unit", "min", "median", "mean", "max"):
        lt.add_column(c)
    for lang, d in st["story_length"].items():
        lt.add_row(lang, d["unit"], str(d["min"]), f"{d['median']:.0f}", f"{d['mean']:.1f}", str(d["max"]))
    console.print(lt)
    console.print(f"aligned action longer than violating in {st['aligned_longer_share']:.0%} of items")
    return 0


def cmd_import(a: argparse.Namespace) -> int:
    n = import_stories(a.src, a.out, parse_mapping(a.map), parse_labels(a.label))
    console_err.print(f"[green]wrote[/] {n} items to {a.out}", highlight=False)
    return 0
