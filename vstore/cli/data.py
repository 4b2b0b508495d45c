"""``vstore data validate|stats|import``."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from ..data import parse_labels
from ..datatools import import_stories, parse_mapping, story_stats, subset_stories, validate_stories
from ..errors import UsageError
from .common import console, console_err


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("data", help="validate, summarise or import story files (the C-voice schema)")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    v = dsub.add_parser("validate", help="check every line of a story file; exit 2 on errors")
    v.add_argument("file", help="story .jsonl file or folder")
    v.set_defaults(handler=cmd_validate)
    s = dsub.add_parser(
        "stats", help="items, settings and lengths per value x language, and what the evaluation split can detect",
        description=(
            "Per value and language: items per split, the spread of settings, mean lengths (characters\n"
            "in zh, words otherwise), and a power table: the smallest drop of value consistency from\n"
            "--baseline that the evaluation items detect with an exact McNemar test at alpha 0.05 and\n"
            "80% power, when --flip-rate of the items also flip each way by chance (as under a random\n"
            "control). Measure your model's baseline with `vstore ablate` and pass it here."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("file", help="story .jsonl file or folder")
    s.add_argument("--baseline", type=float, default=0.6, help="value consistency before ablation (default 0.6)")
    s.add_argument("--flip-rate", type=float, default=0.05,
                   help="share of items flipping each way by chance (default 0.05)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(handler=cmd_stats)
    i = dsub.add_parser("import", help="convert a JSONL/CSV file into the story schema")
    i.add_argument("src", help=".jsonl, .csv or .tsv file")
    i.add_argument("--map", required=True, help="FIELD=COLUMN,... e.g. story=text,aligned=good,violating=bad,value=label")
    i.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="constant field for every item")
    i.add_argument("--out", required=True, help="output .jsonl")
    i.set_defaults(handler=cmd_import)
    u = dsub.add_parser("subset", help="the first N items of each value x language of each split",
                        description="Keep the first N items (file order) of every value x language, per split,\n"
                                    "e.g. --per-group activation=50 --per-group evaluation=25.",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    u.add_argument("file", help="story .jsonl file or folder")
    u.add_argument("--per-group", action="append", required=True, metavar="SPLIT=N",
                   help="items per value x language kept from SPLIT (repeatable; splits not named are dropped)")
    u.add_argument("--out", required=True, help="output .jsonl")
    u.set_defaults(handler=cmd_subset)


def cmd_validate(a: argparse.Namespace) -> int:
    items = validate_stories(a.file)
    console_err.print(f"[green]ok[/] {a.file}: {len(items)} valid items", highlight=False)
    return 0


def cmd_stats(a: argparse.Namespace) -> int:
    st = story_stats(a.file, baseline=a.baseline, flip_rate=a.flip_rate)
    if a.json:
        print(json.dumps(st, ensure_ascii=False, indent=1))
        return 0
    t = Table(title=f"{a.file}: {st['items']} items")
    short = {"activation": "act.", "evaluation": "eval."}
    for col in ("value", "lang", *(short.get(sp, sp) for sp in st["splits"]), "settings", "length s/a/v"):
        t.add_column(col, justify="left" if col in ("value", "lang", "settings") else "right")
    for c in st["cells"]:
        tags = c["settings"]
        top, n_top = next(iter(tags.items()))
        spread = "untagged" if list(tags) == ["-"] else f"{len(tags)} tags, top {top} {n_top}"
        t.add_row(c["value"], c["lang"], *[str(c.get(sp, 0)) for sp in st["splits"]], spread,
                  f"{c['mean_story']:.0f}/{c['mean_aligned']:.0f}/{c['mean_violating']:.0f}")
    console.print(t)
    console.print("length s/a/v: mean story / aligned / violating length, characters (zh) or words (others); "
                  f"aligned action longer than violating in {st['aligned_longer_share']:.0%} of items", highlight=False)
    pw = st["power"]
    p = Table(title=f"smallest detectable drop of value consistency from a baseline of {pw['baseline']:.2f} "
                    f"(exact McNemar, alpha {pw['alpha']}, power {pw['power']:.0%}, chance flips {pw['flip_rate']:.0%} "
                    "each way)")
    for col in ("value", "lang", "evaluation items", "detectable drop"):
        p.add_column(col, justify="right" if col in ("evaluation items", "detectable drop") else "left")
    for r in pw["rows"]:
        d = r["detectable_drop"]
        p.add_row(r["value"], r["lang"], str(r["n"]), "not detectable" if d is None else f"{d * 100:.1f} points")
    console.print(p)
    return 0


def cmd_import(a: argparse.Namespace) -> int:
    n = import_stories(a.src, a.out, parse_mapping(a.map), parse_labels(a.label))
    console_err.print(f"[green]wrote[/] {n} items to {a.out}", highlight=False)
    return 0


def cmd_subset(a: argparse.Namespace) -> int:
    per: dict[str, int] = {}
    for spec in a.per_group:
        split, _, n = spec.partition("=")
        if not n.strip().isdigit():
            raise UsageError(f"--per-group {spec!r}: expected SPLIT=N, e.g. activation=50")
        per[split.strip()] = int(n)
    written = subset_stories(a.file, a.out, per)
    console_err.print(f"wrote {a.out}: " + ", ".join(f"{n} {sp}" for sp, n in written.items()), highlight=False)
    return 0
