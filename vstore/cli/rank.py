"""``vstore rank`` (score neurons, select a neuron set per group) and ``vstore cache`` (the stats cache)."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from ..errors import UsageError
from ..kernels import BACKENDS
from ..methods import METHODS, method_choices
from ..rank import RankResult, rank_store
from ..store import Store, clear_cache
from .common import console, console_err, human_bytes, table_console
from .progress import make_progress


def _kv(text: str, flag: str) -> tuple[str, list[str]]:
    key, sep, vals = text.partition("=")
    values = [v.strip() for v in vals.split(",") if v.strip()]
    if not sep or not key.strip() or not values:
        raise UsageError(f"{flag}: expected COLUMN=VALUE[,VALUE...], got {text!r}")
    return key.strip(), values


def _size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(float(t))
    except ValueError:
        raise UsageError(f"--auroc-memory: expected a size such as 512MB or 2GB, got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "rank",
        help="score every neuron of a store and select a neuron set per group",
        description=(
            "Score every (layer, neuron) of a store per group of a label column with one method, from\n"
            "sufficient statistics cached in the store, and write a neuron-set JSON (docs/neuron-set.md)\n"
            "plus the full score matrices in an .npz beside it.\n\n"
            "methods:\n" + "\n".join(f"  {m.name:<10} {m.summary}" for m in METHODS.values())
            + "\n  (lape is an alias of vape; random --neurons FILE draws each group's control: the same\n"
            "  count per layer, other neurons)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("store", help="store folder")
    p.add_argument("--by", default=None, help="label column whose values are the groups (default: one group 'all')")
    p.add_argument("--method", default="vape", choices=method_choices(), metavar="M",
                   help=f"scoring method: {', '.join(METHODS)} (default vape)")
    p.add_argument("--out", required=True, help="neuron-set JSON to write (scores go to the same name .npz)")
    p.add_argument("--where", action="append", default=[], metavar="COL=V[,V]",
                   help="rank only examples with these labels (repeatable)")
    p.add_argument("--contrast", default=None, metavar="COL=a,b", help="compare side a with side b within each group")
    p.add_argument("--site", default=None, metavar="SITE",
                   help="the store's site to rank: act, down_in, resid or attr (default: the store's first site; "
                        "attr for --method attribution)")
    sel = p.add_argument_group("selection (per group; default --top-rate 0.01)")
    sel.add_argument("--top-k", type=int, default=None, help="the K best neurons over all layers")
    sel.add_argument("--per-layer-k", type=int, default=None, help="the K best neurons of every layer")
    sel.add_argument("--top-rate", type=float, default=None, help="the best fraction R of all neurons")
    sel.add_argument("--threshold", type=float, default=None, help="neurons whose score is >= T")
    sel.add_argument("--abs", action="store_true", help="rank by magnitude (|score|; |AUROC - 0.5|)")
    sel.add_argument("--filter-rate", type=float, default=0.95, help="vape: probability quantile to pass (0.95)")
    sel.add_argument("--bar-ratio", type=float, default=0.95, help="vape: probability quantile to join a group (0.95)")
    sel.add_argument("--exclusive", type=int, default=None, metavar="N",
                     help="keep only neurons assigned to at most N groups (after selection)")
    p.add_argument("--split-half", action="store_true", help="also rank two halves of the items; report Jaccard")
    p.add_argument("--seed", type=int, default=0, help="seed of random and of --split-half (default 0)")
    p.add_argument("--neurons", default=None, metavar="FILE", help="random: draw the control of each group of this set")
    p.add_argument("--backend", default="auto", choices=("auto", *BACKENDS),
                   help="statistics kernels (auto: the C++ extension when built)")
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    p.add_argument("--dask", default=None, metavar="ADDRESS|local:N",
                   help="reduce chunk ranges on a Dask cluster (scheduler address, or N local worker processes)")
    p.add_argument("--rows", default="token", choices=("token", "mean", "last"),
                   help="token rows (default), or the mean/last rows of a store built --keep pooled")
    p.add_argument("--auroc-memory", default="256MB", metavar="SIZE",
                   help="auroc: histogram memory per pass (default 256MB; more memory, fewer passes)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the statistics cache")
    p.add_argument("--no-verify", action="store_true", help="skip the chunk checksums (faster; trusts the disk)")
    p.add_argument("--skip-damaged", action="store_true",
                   help="leave out chunks that cannot be read instead of failing; the rows left out are reported")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_rank)

    c = sub.add_parser("cache", help="the statistics cache of a store")
    csub = c.add_subparsers(dest="cache_command", metavar="ACTION")
    cl = csub.add_parser("clear", help="delete every cached statistic of a store")
    cl.add_argument("store", help="store folder")
    cl.set_defaults(handler=cmd_cache_clear)
    ls = csub.add_parser("list", help="list the cached statistics of a store")
    ls.add_argument("store", help="store folder")
    ls.set_defaults(handler=cmd_cache_list)
    c.set_defaults(handler=lambda a: (c.print_help(), 0)[1])


def cmd_rank(a: argparse.Namespace) -> int:
    where: dict[str, list[str]] = {}
    for w in a.where:
        k, vals = _kv(w, "--where")
        where.setdefault(k, []).extend(v for v in vals if v not in where.get(k, []))
    contrast = _kv(a.contrast, "--contrast") if a.contrast else None
    ns = rank_store(
        a.store, a.by, a.method, out=a.out, where=where, contrast=contrast, top_k=a.top_k, per_layer_k=a.per_layer_k,
        top_rate=a.top_rate, threshold=a.threshold, by_abs=a.abs, filter_rate=a.filter_rate, bar_ratio=a.bar_ratio,
        backend=a.backend, split_half=a.split_half, seed=a.seed, neurons=a.neurons, use_cache=not a.no_cache,
        progress=make_progress(not a.no_progress), threads=a.threads, dask=a.dask, auroc_memory=_size(a.auroc_memory),
        verify=not a.no_verify, skip_damaged=a.skip_damaged, exclusive=a.exclusive, rows=a.rows, site=a.site,
    )
    out = table_console()
    out.print(summary_table(ns))
    if ns.data.get("specificity"):
        out.print(specificity_line(ns.data["specificity"]), highlight=False, soft_wrap=True)
    shared_warning(ns.data.get("specificity"))
    source = "statistics from the cache" if ns.from_cache else f"read {human_bytes(ns.bytes_read)}"
    if ns.data["method"] == "random":
        source = "no statistics needed"
    if ns.skipped:
        rows = "; ".join(f"part {p} layer position {li} rows {r0}:{r1}" for p, li, r0, r1 in ns.skipped)
        console_err.print(f"[yellow]skipped {len(ns.skipped)} damaged chunk(s)[/] (not cached): {rows}",
                          highlight=False, soft_wrap=True)
    if ns.nonfinite:
        console_err.print(f"[yellow]left out[/] NaN/Inf values (neuron by neuron), per layer: {ns.nonfinite}",
                          highlight=False)
    extra = ""
    params = ns.data["params"]
    if "auroc_exact" in params and not params["auroc_exact"]:
        extra = f"; AUROC binned at float16 precision, error <= {params['auroc_max_error']:.2g}"
    console_err.print(f"[green]wrote[/] {ns.path} (+ .npz) — {ns.data['method']}, {source}, {ns.seconds:.2f} s{extra}",
                      highlight=False)
    return 0


def summary_table(ns: RankResult) -> Table:
    """Neurons per group and per layer (and split-half Jaccard), as a rich table."""
    d = ns.data
    layers: list[int] = list(d.get("layers", []))
    per = ns.per_layer()
    used = sorted({lyr for c in per.values() for lyr in c})
    show = layers if len(layers) <= 24 else used[:24]
    title = f"{d['method']} neurons by {d['by'] or 'all'}"
    if d.get("where"):
        title += " where " + " ".join(f"{k}={','.join(v)}" for k, v in d["where"].items())
    if d.get("contrast"):
        title += f" ({d['contrast']['column']}: {' vs '.join(d['contrast']['sides'])})"
    t = Table(title=title)
    t.add_column("group")
    t.add_column("rows", justify="right")
    t.add_column("neurons", justify="right")
    spec = d.get("specificity") or {}
    if spec:
        t.add_column("own", justify="right")
        t.add_column("shared", justify="right")
        t.add_column("mean J", justify="right")
    if ns.jaccard is not None:
        t.add_column("split-half J", justify="right")
    for lyr in show:
        t.add_column(f"L{lyr}", justify="right")
    if len(show) < len(used):
        t.add_column("more", justify="right")
    for g, items in d["groups"].items():
        row: list[Any] = [g, f"{ns.rows[g]:,}" if g in ns.rows else "-", str(len(items))]
        if spec:
            sg = spec["groups"].get(g, {})
            row += [str(sg.get("own", "-")), str(sg.get("shared", "-")),
                    "-" if sg.get("mean_jaccard") is None else f"{sg['mean_jaccard']:.2f}"]
        if ns.jaccard is not None:
            j = ns.jaccard.get(g)
            row.append("-" if j is None else f"{j:.2f}")
        row += [str(per[g].get(lyr, "")) for lyr in show]
        if len(show) < len(used):
            row.append(str(sum(v for k, v in per[g].items() if k not in show)))
        t.add_row(*row)
    return t


def specificity_line(spec: dict[str, Any]) -> str:
    """One line on how specific a set's groups are (the ``specificity`` block of a neuron set)."""
    mj, cj = spec.get("mean_jaccard"), spec.get("chance_jaccard")
    line = (f"{spec['exclusive']} of {spec['neurons']} neurons belong to one group, {spec['shared']} are shared; "
            f"mean pairwise Jaccard {'-' if mj is None else f'{mj:.3f}'}"
            f" (chance {'-' if cj is None else f'{cj:.4f}'})")
    if "before_exclusive" in spec:
        line += f"; before --exclusive: {spec['before_exclusive']['neurons']} neurons"
    return line


def shared_warning(spec: dict[str, Any] | None) -> None:
    """Warn (on standard error) when most of a set's neurons are in two or more groups."""
    if not spec or not spec.get("mostly_shared"):
        return
    worst = sorted(((g, d) for g, d in spec["groups"].items() if d["neurons"] and (d["shared_fraction"] or 0) > 0.5),
                   key=lambda x: -(x[1]["shared_fraction"] or 0))
    names = ", ".join(f"{g} ({d['own']} own of {d['neurons']})" for g, d in worst[:6])
    console_err.print(f"[yellow]warning:[/] most of this set is shared: {spec['shared']} of {spec['neurons']} neurons "
                      f"({spec['shared_fraction']:.0%}) belong to two or more groups, so the groups are not "
                      f"value-specific; mostly shared: {names or '-'}; see --exclusive N", highlight=False,
                      soft_wrap=True)


def cmd_cache_clear(a: argparse.Namespace) -> int:
    n = clear_cache(a.store)
    console_err.print(f"[green]cleared[/] {n} cached statistic(s) of {a.store}", highlight=False)
    return 0


def cmd_cache_list(a: argparse.Namespace) -> int:
    keys = Store(a.store).stats_keys()
    for k in keys:
        console.print(k, highlight=False)
    if not keys:
        console_err.print("(empty)")
    return 0
