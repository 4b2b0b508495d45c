"""`vstore build`: stream a model's FFN activations into a chunked Zarr store.

:func:`build_store` decides what to do with ``out`` (create, resume, append, refuse) before the slow
model load, opens the part to write, and hands the streaming to :func:`vstore.capture.stream_part`.
The store's counters advance after the data, at example boundaries, so a killed build resumes where
it stopped and ends identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .capture import POOLINGS, estimate_rows, stream_part
from .data import Example, file_sha256, load_examples
from .errors import DiskSpaceError, OutputError, StoreError, StoreExistsError, UsageError, disk_full
from .lm import fit_length
from .models import DEFAULT_MODEL, LoadedModel, load_model, site_width
from .progress import Note, Progress, note_to_stderr, task
from .shards import KEEPS, build_lock, check_same, check_scale, open_shard, parse_shard
from .sites import ATTRIBUTION_SITE, parse_sites, site_entries_for, stories_of
from .store import (
    DTYPES,
    ITEMSIZE,
    PartWriter,
    Store,
    chunk_rows_for,
    codecs_for,
    dtype_spec,
    is_store,
    is_url,
)

__all__ = ["ATTRIBUTION_SITE", "KEEPS", "POOLINGS", "BuildResult", "build_store", "parse_layers", "parse_shard",
           "parse_sites"]


ROW_TABLE_BYTES = 16  # rows/example (int64) + rows/position + rows/token (int32) per row


@dataclass
class BuildResult:
    """What a build did."""

    path: Path
    part: str
    examples: int
    rows: int
    tokens: int
    seconds: float
    bytes_written: int
    resumed_from: int
    overflow: dict[str, int] = field(default_factory=dict)
    nonfinite: dict[str, int] = field(default_factory=dict)
    stats_written: list[str] = field(default_factory=list)
    complete: bool = True


def parse_layers(spec: str | None, n_layers: int) -> list[int] | None:
    """Parse a layer list (``all``, ``0,3,5``, ``4-8``, ``-1``) into sorted model layer indices (None: all)."""
    if spec is None or spec.strip() in ("", "all"):
        return None
    out: set[int] = set()
    for item in spec.split(","):
        item = item.strip()
        try:
            if "-" in item[1:]:
                neg = item.startswith("-")
                a, b = item[int(neg):].split("-", 1)
                lo, hi = int(("-" if neg else "") + a) % n_layers, int(b) % n_layers
                out.update(range(lo, hi + 1))
            else:
                out.add(int(item))
        except ValueError as e:
            raise UsageError(f"layers: cannot parse {item!r} (use e.g. 'all', '0,3,5', '4-8', '-1')", "layers") from e
    bad = sorted(i for i in out if not -n_layers <= i < n_layers)
    if bad:
        raise UsageError(f"layers: {bad} out of range; the model has {n_layers} layers (0..{n_layers - 1})", "layers")
    return sorted({i % n_layers for i in out})


def _versions() -> dict[str, str]:
    import numpy
    import torch
    import transformers
    import zarr

    return {
        "vstore": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "zarr": zarr.__version__, "numpy": numpy.__version__, "python": sys.version.split()[0],
    }


def _check_disk(path: Path, rows: int, n_layers: int, n_neurons: int, dtype: str, chunk_rows: int,
                sites: Sequence[dict[str, Any]] = ()) -> None:
    """Refuse a build whose activations and row table would not fit in 95% of the free space.

    Chunk files are whole chunks (the last one of a part padded), so rows count up to whole chunks;
    and a chunk is rewritten through a temporary beside it, so one more chunk must fit on top.
    """
    padded = -(-rows // max(1, chunk_rows)) * max(1, chunk_rows)
    row_bytes = sum(int(e["n_neurons"]) * ITEMSIZE[e["dtype"]] for e in sites) or n_neurons * ITEMSIZE[dtype]
    chunk = max(1, chunk_rows) * row_bytes
    need = padded * n_layers * row_bytes + chunk + rows * ROW_TABLE_BYTES
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free * 0.95:
        raise DiskSpaceError(
            f"the store needs about {need / 1e9:.2f} GB but {probe} has {free / 1e9:.2f} GB free; "
            "free space, capture fewer layers, store float16/bfloat16, or pool mean|last"
        )


def _check_arguments(pool: str, dtype: str, site: str | Sequence[str], batch_size: int, max_length: int,
                     limit: int | None, compressor: str, append: bool, overwrite: bool,
                     attribution: str | None = None, keep: str = "all") -> None:
    if pool not in POOLINGS:
        raise UsageError(f"pool must be one of {list(POOLINGS)}, got {pool!r}", "pool")
    dtype_spec(dtype)
    parse_sites(site)
    if attribution is not None and attribution not in ("choice", "ll"):
        raise UsageError(f"attribution: expected choice or ll (the scorers of vstore ablate), got {attribution!r}",
                         "attribution")
    if attribution is not None and keep != "all":
        raise UsageError(f"attribution is stored as the site attr beside the activations: it needs keep all, not "
                         f"{keep!r}", "attribution", "keep")
    if batch_size < 1 or max_length < 1:
        raise UsageError("batch_size and max_length must be positive", "batch_size", "max_length")
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be >= 1 (None: every item), got {limit}", "limit")
    codecs_for(compressor)  # before anything is written: a bad compressor must not leave a store behind
    if append and overwrite:
        raise UsageError("append and overwrite cannot be combined", "append", "overwrite")


def _existing(out: Path | str, *, append: bool, overwrite: bool, resume: bool) -> Store | None:
    """The store at ``out`` to resume or append to (None: create one), or a refusal; before any model load."""
    if isinstance(out, Path) and out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder; a store is a folder (choose another out)")
    existing = Store(out, mode="r+") if is_store(out) else None
    if existing is None and isinstance(out, Path) and out.exists() and out.is_dir() and any(out.iterdir()) \
            and not overwrite:
        raise StoreExistsError(f"{out} exists and is not a vstore store; choose another out")
    if existing is None and (append or resume):
        raise StoreError(f"{'append' if append else 'resume'}: no store at {out}")
    if existing is None or overwrite:
        return None
    if append and existing.state != "complete":
        raise StoreError(f"{out} is incomplete; resume it (run the same build again) before appending")
    if not append and existing.state == "complete":
        if resume:
            raise StoreError(f"resume: {out} is already complete")
        raise StoreExistsError(f"{out} is a complete store; pass overwrite to rebuild it or append to add data")
    return existing


@dataclass(frozen=True)
class _Plan:
    """What this build writes: its examples, layers and the store attributes they imply."""

    examples: list[Example]
    layers: list[int]
    meta: dict[str, Any]
    part_extra: dict[str, Any]


def _open_part(out: Path | str, existing: Store | None, plan: _Plan, lm: LoadedModel, *, append: bool, overwrite: bool,
               compressor: str, pool: str, max_length: int) -> tuple[Store, str, int, list[Example]]:
    """The store and part to write, the global index of the part's first example, and its examples."""
    ident, examples = lm.identity, plan.examples
    if existing is not None and existing.meta.get("shards"):
        raise StoreError(f"{out} is a sharded build ({existing.meta['shards']} shards): run each unfinished "
                         "shard again with its --shard I/N")
    if existing is not None and not append and not existing.meta["parts"]:
        existing = None  # created, then killed before its first part: it holds nothing, start it again
        overwrite = True
    if existing is not None and not append:  # resume
        last = existing.meta["parts"][-1] if existing.meta["parts"] else None
        check_same(existing, plan.meta, ident)
        ds, want = (last or {}).get("dataset", {}), plan.part_extra["dataset"]
        if last is None or last.get("build") != plan.part_extra["build"] or ds.get("sha256") != want["sha256"] \
                or ds.get("examples") != len(examples):
            raise StoreError(f"{out} is an incomplete build of other data or arguments; rerun it with the same ones, "
                             "or pass overwrite")
        existing.trim_examples()
        return existing, last["name"], int(last["example_start"]), examples
    if isinstance(out, Path):
        rows_est = estimate_rows(lm.tokenizer, examples, pool, max_length)
        _check_disk(out, rows_est, len(plan.layers) if plan.meta["keep"] == "all" else 0, ident.n_neurons,
                    plan.meta["dtype"], int(plan.meta["chunk_rows"]), plan.meta.get("sites", ()))
    if existing is not None:  # append
        check_same(existing, plan.meta, ident)
        store = existing
    else:
        store = Store.create(out, plan.meta, overwrite=overwrite)
    store.trim_examples()
    start = store.add_examples([e.id for e in examples], [e.text for e in examples], [e.labels for e in examples])
    part = store.start_part(len(examples), start, plan.part_extra, compressor=compressor, keep=plan.meta["keep"])
    return store, part, start, examples


def build_store(
    out: str | Path,
    *,
    model: str | LoadedModel = DEFAULT_MODEL,
    data: str | Path | None = None,
    split: str | None = "activation",
    texts: Sequence[str] | None = None,
    pool: str = "token",
    dtype: str = "float16",
    layers: str | Sequence[int] | None = None,
    site: str | Sequence[str] = "act",
    batch_size: int = 8,
    max_length: int = 512,
    limit: int | None = None,
    device: str = "cpu",
    labels: dict[str, str] | None = None,
    append: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    compressor: str = "none",
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    on_note: Note | None = None,
    queue_depth: int = 2,
    commit_every: float = 30.0,
    stats_by: Sequence[str] = (),
    keep: str = "all",
    shard: str | tuple[int, int] | None = None,
    attribution: str | None = None,
) -> BuildResult:
    """Run the model over a dataset and write its activations into a store.

    Parameters
    ----------
    out
        Store folder, or an fsspec URL zarr can open (``memory://``, ``s3://``, ...).
    model
        Alias, ``.gguf``, folder or hub id (see :func:`vstore.models.load_model`), or a loaded model.
    data
        Story file/folder or ``.txt``; default: the bundled benchmark.
    split
        Stories of this split only (plain text is never filtered).
    texts
        ``("aligned", "violating")`` to write each item once per action, labelled ``polarity``.
    pool
        ``token`` (one row per real token), ``mean`` or ``last`` (one row per example).
    dtype
        Stored dtype: a key of :data:`vstore.store.DTYPES` (``float16``, ``bfloat16``, ``float32``).
    layers
        Model layer indices (or a string for :func:`parse_layers`); default all.
    site
        ``act`` (activation-function output), ``down_in`` (down-projection input), ``resid`` (the
        decoder layer's output, hidden size wide), or several (``"act,down_in,resid"`` or a list):
        all captured in one forward, the first in ``parts/NNNN/acts``, the others under
        ``parts/NNNN/sites/<site>`` (see ``docs/store-format.md``).
    append
        Add the data as a new part of an existing complete store (same model, site, dtype, pooling).
    overwrite
        Replace an existing store.
    resume
        Insist on resuming an incomplete store (an incomplete store is resumed anyway).
    progress
        A :class:`vstore.progress.Progress` reporter (None: report nothing).
    on_note
        Receives notes and warnings (model loading, float16 overflow); default: standard error.
    commit_every
        Seconds between commits of a partial chunk (whole chunks commit as they fill): the most
        work a killed build can lose.
    stats_by
        Label columns: accumulate the moments of each grouping on the device while streaming (from the
        values as stored) and write them into the statistics cache, as ``vstore rank --by COLUMN``
        would, so that ranking them reads no activation.
    keep
        ``all`` (token activations), ``pooled`` (a mean and a last row per example instead, with
        ``pool="token"``) or ``stats`` (the row table and the ``stats_by`` statistics only).
    shard
        ``"I/N"``: this process builds the I-th of N contiguous ranges of the examples, in file order,
        as part I of the store; run the N shards concurrently (same arguments). The store is complete
        when every part is; a killed shard is resumed by running it again.
    attribution
        ``choice`` or ``ll``: also store, as the site ``attr`` (float32), the attribution
        ``-act * d(margin)/d(act)`` of every neuron of the first site at each row, the margin being the
        aligned - violating score of the example's item under that scorer (:mod:`vstore.attribution`;
        story tokens carry it, every other row is 0). Needs a story file with both actions per item.

    Raises
    ------
    UsageError, DataError, ModelError, StoreExistsError, StoreError, DiskSpaceError
    """
    from .data import bundled_stories

    t_start = time.perf_counter()
    out_s = str(out)
    out = Path(out_s[len("file://"):]) if out_s.startswith("file://") else Path(out_s)
    note = on_note or note_to_stderr
    shard_t = parse_shard(shard)
    stats_by = list(dict.fromkeys(stats_by))
    _check_arguments(pool, dtype, site, batch_size, max_length, limit, compressor, append, overwrite, attribution,
                     keep)
    check_scale(keep, stats_by, pool, shard_t, append, overwrite, out_s)
    data_path = Path(data) if data is not None else bundled_stories()
    examples = load_examples(data_path, split=split, texts=texts, labels=labels, limit=limit)
    stories = stories_of(examples, data_path, split, limit, texts) if attribution is not None else []
    target: Any = out_s if is_url(out_s) else out
    with build_lock(target, shard_t), _disk_full_is_clear(out):  # one writer per store (or shard) at a time
        existing = None if shard_t else _existing(target, append=append, overwrite=overwrite, resume=resume)
        lm = model if isinstance(model, LoadedModel) else load_model(
            model, device=device, trust_remote_code=trust_remote_code, progress=note)
        plan = _plan(lm, examples, data_path, layers=layers, split=split, texts=texts, labels=labels, limit=limit,
                     site=site, dtype=dtype, pool=pool, compressor=compressor, batch_size=batch_size,
                     max_length=max_length, device=device, stats_by=stats_by, keep=keep, attribution=attribution)
        fit = fit_length(lm.model, max_length)  # never past the model's position limit (GPT-2: 1024)
        if shard_t is not None:
            store, part, example_start, todo = open_shard(out, plan, lm, shard_t, compressor=compressor)
        else:
            store, part, example_start, todo = _open_part(target, existing, plan, lm, append=append,
                                                          overwrite=overwrite, compressor=compressor, pool=pool,
                                                          max_length=fit)
        if store.part_info(part).complete:  # a shard run again after it finished
            return BuildResult(out, part, 0, 0, 0, time.perf_counter() - t_start, 0, len(todo),
                               complete=store.state == "complete")
        live = None
        if stats_by:
            from .stats.live import LiveStats

            live = LiveStats(store, part, stats_by, device)
        writer = PartWriter(store, part, on_commit=live.on_commit if live is not None else None)
        resumed_from = writer.committed_examples
        sites = parse_sites(site)
        extra = {}
        if attribution is not None:  # the stories of this part's examples (a shard: its range of them)
            from .attribution import Attributor

            local = example_start - int(store.meta["parts"][0]["example_start"]) if shard_t else 0
            extra[ATTRIBUTION_SITE] = Attributor(lm.model, lm.tokenizer, stories[local : local + len(todo)],
                                                 attribution, site=sites[0], layers=plan.layers)
        with task(progress, "build", len(todo), unit="examples", done=resumed_from) as bar:
            res = stream_part(lm, todo, writer, layers=plan.layers, site=sites, pool=pool, dtype=dtype,
                              batch_size=batch_size, max_length=fit, device=device, example_start=example_start,
                              queue_depth=queue_depth, commit_every=commit_every, bar=bar, live=live, extra=extra)
        written = _finish(store, part, len(todo), writer, res, stats_by, note)
        return BuildResult(out, part, len(todo) - resumed_from, writer.written, res.tokens,
                           time.perf_counter() - t_start, writer.bytes_written, resumed_from, res.overflow,
                           res.nonfinite, written, store.state == "complete")


def _plan(lm: LoadedModel, examples: list[Example], data_path: Path, *, layers: str | Sequence[int] | None,
          split: str | None, texts: Sequence[str] | None, labels: dict[str, str] | None, limit: int | None,
          site: str | Sequence[str], dtype: str, pool: str, compressor: str, batch_size: int, max_length: int,
          device: str, stats_by: list[str], keep: str, attribution: str | None = None) -> _Plan:
    ident = lm.identity
    layer_list = parse_layers(layers, ident.n_layers) if isinstance(layers, str) or layers is None else sorted(
        {int(i) % ident.n_layers for i in layers})
    layer_list = layer_list if layer_list is not None else list(range(ident.n_layers))
    if not layer_list:
        raise UsageError(f"layers {layers!r} selects no layer of the model's {ident.n_layers}", "layers")
    lm.tokenizer.padding_side = "right"
    dataset = {"paths": [str(data_path.resolve())], "sha256": file_sha256(data_path), "examples": len(examples),
               "split": split, "texts": list(texts) if texts else None, "labels": labels or {}, "limit": limit}
    sites = parse_sites(site)
    meta = {"model": ident.to_json(), "site": sites[0], "layers": layer_list, "dtype": dtype, "pooling": pool,
            "storage_dtype": DTYPES[dtype].storage, "compressor": compressor, "keep": keep,
            "chunk_rows": chunk_rows_for(site_width(lm.model, sites[0]), dtype), "versions": _versions()}
    # one MLP-wide site stays a version-1 store exactly as before; anything else lists its sites
    if len(sites) > 1 or attribution is not None or site_width(lm.model, sites[0]) != ident.n_neurons:
        meta["sites"] = site_entries_for(lm.model, sites, dtype, attribution)
    build = {"batch_size": batch_size, "max_length": max_length, "device": device, "pool": pool}
    if stats_by or keep != "all":
        build.update({"stats_by": stats_by, "keep": keep})
    return _Plan(examples, layer_list, meta, {"dataset": dataset, "build": build})


def _finish(store: Store, part: str, n_examples: int, writer: PartWriter, res: Any, stats_by: list[str],
            note: Note) -> list[str]:
    """Commit and close the part; when that completes the store, write the build-time statistics."""
    store.commit(part, n_examples, writer.written, overflow=res.overflow)
    if res.nonfinite:
        store.update_meta(nonfinite={k: int(store.meta.get("nonfinite", {}).get(k, 0)) + v
                                     for k, v in res.nonfinite.items()})
    written: list[str] = []
    if store.finish_part(part) and stats_by:
        from .stats.live import write_build_stats

        written = write_build_stats(store, stats_by)
        store.update_meta(stats_by=sorted(set(store.meta.get("stats_by", [])) | set(written)))
        missed = [b for b in stats_by if b not in written]
        if missed:
            note(f"note: build-time statistics by {missed} were not written (an earlier part keeps neither them nor "
                 "activations, or the disk refused them); `vstore rank` computes them where activations are kept")
    elif stats_by:
        note(f"note: part {part} is complete; the build-time statistics are written by the shard that completes "
             "the store")
    if res.overflow:
        note(f"warning: {sum(res.overflow.values())} activation value(s) beyond ±65504 became ±inf in float16 "
             f"(per layer: {res.overflow}); store bfloat16 or float32 instead")
    if res.nonfinite:
        note(f"warning: the model produced {sum(res.nonfinite.values())} NaN/Inf activation value(s) (per layer: "
             f"{res.nonfinite}); they are stored as they are and left out of the statistics neuron by neuron")
    return written


@contextlib.contextmanager
def _disk_full_is_clear(out: Path) -> Iterator[None]:
    """A full disk anywhere in the build (examples, attributes, chunks) as one :class:`DiskSpaceError`."""
    try:
        yield
    except OSError as e:
        err = disk_full(e, str(out), "what is committed is kept: free space and run the same build again to resume")
        if err is None:
            raise
        raise err from e
