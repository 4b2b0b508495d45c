"""``vstore build``, ``vstore info``, ``vstore verify`` and ``vstore models``."""

from __future__ import annotations

import argparse
import json

from rich.markup import escape
from rich.table import Table

from ..build import KEEPS, POOLINGS, build_store
from ..data import parse_labels
from ..models import ALIASES, DEFAULT_MODEL, SITES, cache_dir, cached_models
from ..store import DTYPES, Store
from .common import add_common_model_args, bytes_on_disk, console, console_err, human_bytes, say
from .progress import make_progress


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "build",
        help="run a model over stories and store every FFN neuron's activations",
        description=(
            "Stream the FFN activations of a model over a dataset into a chunked Zarr v3 store.\n"
            "Without --model/--data it uses the packaged Gemma 3 270M and the bundled benchmark.\n"
            "An incomplete store at --out is resumed automatically.\n\n"
            "Scale out (docs/store-format.md):\n"
            "  --stats-by COLUMN   accumulate the statistics of that grouping while building (repeatable),\n"
            "                      written to the statistics cache: `vstore rank --by COLUMN` reads no activation\n"
            "  --keep stats        write the examples, row table and statistics only (no activations);\n"
            "  --keep pooled       ... plus a mean and a last row per example\n"
            "  --shard I/N         build the I-th of N contiguous ranges of the examples as part I; run the\n"
            "                      N shards concurrently; each resumes alone; `vstore info` shows their state\n"
            "  --out may be an fsspec URL zarr can open (memory://, s3://bucket/path, file://...)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", default=None, help="story JSONL file/folder or .txt (default: the bundled benchmark)")
    p.add_argument("--out", required=True, help="store folder to write")
    p.add_argument("--split", default="activation", help="stories of this split (default activation; 'all' keeps every split)")
    p.add_argument("--texts", default=None, help="aligned,violating: each item once per action, labelled polarity")
    p.add_argument("--pool", choices=POOLINGS, default="token", help="rows: token (default), mean or last per example")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float16", help="stored dtype (default float16)")
    p.add_argument("--layers", default=None, help="model layers: all (default), '0,3,5', '4-8', '-1'")
    p.add_argument("--site", default="act", metavar="SITE[,SITE...]",
                   help=f"capture site(s), one forward for all: {', '.join(SITES)} (act: act_fn(gate_proj(x)), the "
                        "default; down_in: down_proj input; resid: the decoder layer's output)")
    p.add_argument("--attribution", choices=("choice", "ll"), default=None,
                   help="also store the site attr: -act x d(margin)/d(act) of the first site's neurons, margin = "
                        "aligned - violating score under this scorer (docs/attribution.md)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward (default 8)")
    p.add_argument("--max-length", type=int, default=512, help="truncate texts to this many tokens (default 512)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N items")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="set a label on every item (repeatable)")
    p.add_argument("--compressor", default="none", help="none (default) or zstd-N (e.g. zstd-1 for sparse sites)")
    p.add_argument("--stats-by", action="append", default=[], metavar="COLUMN",
                   help="accumulate the statistics by this label column during the build (repeatable)")
    p.add_argument("--keep", choices=KEEPS, default="all",
                   help="all: token activations (default); pooled: mean/last rows per example + statistics; "
                        "stats: statistics only (needs --stats-by)")
    p.add_argument("--shard", default=None, metavar="I/N", help="build shard I of N (0-based) of one store")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--append", action="store_true", help="add the data as a new part of a complete store")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing store")
    mode.add_argument("--resume", action="store_true", help="insist on resuming an incomplete store")
    p.add_argument("--commit-every", type=float, default=30.0, metavar="SECONDS",
                   help="commit a partial chunk at least this often (default 30): the most a killed build loses")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common_model_args(p)
    p.set_defaults(handler=cmd_build)

    p = sub.add_parser("info", help="summarise a store (model, layers, parts, labels, cache)")
    p.add_argument("store", help="store folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=cmd_info)

    p = sub.add_parser(
        "verify", help="read every chunk of a store and check it; exit 1 when anything is damaged",
        description=(
            "Read every committed chunk of every part (present, of the right size, its crc32c checksum),\n"
            "the row table, the example columns and the statistics cache, and check the attributes\n"
            "against the arrays. Lists *.partial files left by a killed writer (--fix-partial removes\n"
            "them). Exit 0: the store is whole; 1: damage found (each item named); 2: not a store."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("store", help="store folder")
    p.add_argument("--fix-partial", action="store_true", help="remove stale *.partial files")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_verify)

    p = sub.add_parser("models", help="list the packaged model aliases and the dequantized cache")
    p.set_defaults(handler=cmd_models)


def cmd_build(a: argparse.Namespace) -> int:
    res = build_store(
        a.out, model=a.model, data=a.data, split=None if a.split == "all" else a.split,
        texts=[t.strip() for t in a.texts.split(",")] if a.texts else None, pool=a.pool, dtype=a.dtype,
        layers=a.layers, site=a.site, batch_size=a.batch_size, max_length=a.max_length, limit=a.limit,
        device=a.device, labels=parse_labels(a.label), append=a.append, overwrite=a.overwrite, resume=a.resume,
        compressor=a.compressor, commit_every=a.commit_every, trust_remote_code=a.trust_remote_code,
        progress=make_progress(not a.no_progress), on_note=say, stats_by=a.stats_by, keep=a.keep, shard=a.shard,
        attribution=a.attribution,
    )
    if a.shard and not res.examples and not res.rows and res.resumed_from:
        console_err.print(f"[green]shard {a.shard}[/] of {res.path} is already complete "
                          f"(store {'complete' if res.complete else 'waiting for other shards'})", highlight=False)
        return 0
    what = f"resumed at example {res.resumed_from}; " if res.resumed_from else ""
    disk = bytes_on_disk(res.path)
    console_err.print(
        f"[green]built[/] {res.path} part {res.part}: {what}{res.examples} examples, {res.rows:,} rows, "
        f"{res.tokens:,} tokens in {res.seconds:.1f} s; the store is {disk:,} bytes on disk ({human_bytes(disk)})",
        highlight=False,
    )
    if res.stats_written:
        console_err.print(f"statistics by {', '.join(res.stats_written)} cached in the store", highlight=False)
    if a.shard and not res.complete:
        console_err.print("the store completes when every shard has finished (`vstore info` shows them)",
                          highlight=False)
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    info = Store(a.store).info()
    if a.json:
        print(json.dumps(info, ensure_ascii=False, indent=1))
        return 0
    m = info["model"]
    t = Table(title=f"vstore store {info['path']}", show_header=False)
    t.add_row("state", info["state"])
    t.add_row("model", f"{m['name']} ({m['architecture']}, {m['n_layers']} layers x {m['n_neurons']} neurons)")
    t.add_row("source", f"{m['source']}  sha256 {m['sha256'][:12]}")
    t.add_row("site / pooling / dtype", f"{info['site']} / {info['pooling']} / {info['dtype']} ({info['compressor']})")
    if len(info["sites"]) > 1:
        t.add_row("sites", ", ".join(f"{e['name']} ({e['n_neurons']} x {e['dtype']})" for e in info["sites"]))
    t.add_row("layers", ",".join(map(str, info["layers"])))
    t.add_row("examples / rows", f"{info['examples']:,} / {info['rows']:,} ({human_bytes(info['activation_bytes'])})")
    if info["keep"] != "all" or info["stats_by"]:
        t.add_row("keep / build-time statistics", f"{info['keep']} / {', '.join(info['stats_by']) or '-'}")
    for p in info["parts"]:
        label = f"shard {p['shard'][0]}/{p['shard'][1]}" if p.get("shard") else f"part {p['name']}"
        t.add_row(label, f"{p['state']}: {p['committed_examples']}/{p['n_examples']} examples, {p['committed_rows']:,} rows"
                  + (f" (part {p['name']})" if p.get("shard") else ""))
    for col, cats in info["label_columns"].items():
        t.add_row(f"label {col}", ", ".join(cats))
    if info["overflow"]:
        t.add_row("float16 overflow", json.dumps(info["overflow"]))
    if info["nonfinite"]:
        t.add_row("NaN/Inf from the model", json.dumps(info["nonfinite"]))
    t.add_row("stats cache", "\n".join(info["stats_cache"]) or "(empty)")
    console.print(t)
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from ..verify import verify_store

    rep = verify_store(a.store, fix_partial=a.fix_partial, progress=make_progress(not a.no_progress))
    if a.json:
        print(json.dumps(rep.to_json(), ensure_ascii=False, indent=1))
        return 0 if rep.ok else 1
    for d in rep.damage:
        console.print(f"[red]damaged[/] {escape(str(d))}", highlight=False, soft_wrap=True)
    for f in rep.partial_files:
        what = "removed" if f in rep.removed else "stale (remove with --fix-partial)"
        console.print(f"[yellow]partial file[/] {escape(f)}: {what}", highlight=False, soft_wrap=True)
    verdict = "[green]whole[/]" if rep.ok else f"[red]{len(rep.damage)} problem(s)[/]"
    console_err.print(f"{verdict}: {rep.path}, {rep.chunks} chunks, {human_bytes(rep.bytes)} checked", highlight=False)
    return 0 if rep.ok else 1


def cmd_models(a: argparse.Namespace) -> int:
    t = Table(title="packaged model aliases")
    for col in ("alias", "model", "install"):
        t.add_column(col)
    for al in ALIASES.values():
        t.add_row(al.name + (" (default)" if al.name == DEFAULT_MODEL else ""), al.description, al.install)
    console.print(t)
    cached = cached_models()
    c = Table(title=f"dequantized cache ({cache_dir()})")
    for col in ("name", "folder", "size"):
        c.add_column(col)
    for m in cached:
        c.add_row(str(m["name"]), m["folder"], human_bytes(m["bytes"]))
    if not cached:
        c.add_row("(empty)", "", "")
    console.print(c)
    return 0
