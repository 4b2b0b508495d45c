"""``vstore show STORE --neurons FILE``: neuron cards (top-activating tokens in context, distribution per group)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.table import Table
from rich.text import Text

from ..atomic import write_json_atomic
from ..cards import neuron_cards
from ..kernels import BACKENDS
from .common import console_err, say, table_console
from .progress import make_progress


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "show",
        help="neuron cards: the top-activating tokens of a neuron set's neurons, in context",
        description=(
            "For each selected neuron of a neuron set (per group, in rank order), its top-activating\n"
            "tokens with context either side, found by a streaming top-k over the store's chunks, and its\n"
            "activation distribution per group (n, mean, std, p50, p90, fraction > 0). See docs/show-compare.md."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("store", help="store folder")
    p.add_argument("--neurons", required=True, metavar="FILE", help="neuron-set JSON (vstore rank --out)")
    p.add_argument("--group", default=None, metavar="G[,G]", help="only these groups (default: every group)")
    p.add_argument("--top", type=int, default=10, metavar="N", help="top-activating tokens per neuron (default 10)")
    p.add_argument("--context", type=int, default=8, metavar="K", help="tokens of context either side (default 8)")
    p.add_argument("--top-neurons", type=int, default=5, metavar="M", help="neurons per group, best first (default 5)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer folder (default: found from the store's model)")
    p.add_argument("--json", action="store_true", help="print the cards as JSON (vstore-cards v1)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the JSON to FILE")
    p.add_argument("--backend", default="auto", choices=("auto", *BACKENDS), help="kernels (auto: C++ when built)")
    p.add_argument("--no-verify", action="store_true", help="skip the chunk checksums")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_show)


def _fmt(x: Any, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def _flat(s: str) -> str:
    return s.replace("\r", "").replace("\n", "⏎")


def card_tables(card: dict[str, Any], *, mark: bool = False) -> tuple[Table, Table]:
    """The top-activating tokens of one card, and its distribution per group, as rich tables (the token is in
    reverse video, and with ``mark`` also between « », for output that is not a terminal)."""
    title = (f"{card['group']} #{card['rank'] + 1}: layer {card['layer']} neuron {card['neuron']} "
             f"(score {card['score']:.4g})")
    top = Table(title=title, title_justify="left")
    top.add_column("act", justify="right")
    top.add_column("example")
    top.add_column("pos", justify="right")
    top.add_column("token in context")
    for h in card["top"]:
        token = _flat(h["token"]) or "∅"
        ctx = Text.assemble(_flat(h["left"]), (f"«{token}»" if mark else token, "bold reverse"), _flat(h["right"]))
        top.add_row(f"{h['activation']:.4g}", h["example"], str(h["position"]), ctx)
    dist = Table(title=f"activation of layer {card['layer']} neuron {card['neuron']} per group", title_justify="left")
    for c in ("group", "n", "mean", "std", "p50", "p90", "frac > 0"):
        dist.add_column(c, justify="left" if c == "group" else "right")
    for g, d in card["by_group"].items():
        style = "bold" if g == card["group"] else None
        dist.add_row(g, f"{d['n']:,}", _fmt(d["mean"]), _fmt(d["std"]), _fmt(d["p50"]), _fmt(d["p90"]),
                     _fmt(d["frac_pos"], ".2f"), style=style)
    return top, dist


def cmd_show(a: argparse.Namespace) -> int:
    doc = neuron_cards(a.store, a.neurons, group=a.group, top=a.top, context=a.context, top_neurons=a.top_neurons,
                       tokenizer=a.tokenizer, backend=a.backend, verify=not a.no_verify,
                       progress=make_progress(not a.no_progress), on_note=say)
    if a.out:
        write_json_atomic(a.out, doc)
        console_err.print(f"[green]wrote[/] {a.out}", highlight=False)
    out = table_console()
    if a.json:
        print(json.dumps(doc, ensure_ascii=False, indent=1))
        return 0
    if not doc["cards"]:
        console_err.print("no neurons to show: the selected groups are empty")
    for card in doc["cards"]:
        for t in card_tables(card, mark=not out.is_terminal):
            out.print(t)
    return 0
