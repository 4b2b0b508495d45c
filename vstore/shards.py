"""Scale-out pieces of `vstore build`: ``--shard I/N`` (one store written by N processes), the lock of one
writer (or one shard), and the checks of ``--keep`` / ``--stats-by`` / ``--shard`` arguments.

The first shard to arrive creates the store, all examples and every shard's part under a lock on
the folder above it, so the parts lie in file order whichever shard starts first; each shard then
writes only its part, and the attributes they share are updated under the store's own lock (see
:mod:`vstore.store._meta`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .data import Example
from .errors import StoreError, StoreExistsError, UsageError
from .models import LoadedModel, ModelIdentity
from .store import Store, is_store, meta_lock

__all__ = ["KEEPS", "build_lock", "check_same", "check_scale", "open_shard", "parse_shard"]

#: What a build keeps: token activations (``all``), pooled rows and statistics, or statistics only.
KEEPS = ("all", "pooled", "stats")


def parse_shard(spec: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"I/N"`` (or ``(I, N)``) as ``(I, N)`` with ``0 <= I < N`` (None: not sharded)."""
    if spec is None:
        return None
    try:
        i, n = (int(x) for x in spec.split("/")) if isinstance(spec, str) else (int(spec[0]), int(spec[1]))
    except (ValueError, TypeError, IndexError):
        raise UsageError(f"shard: expected I/N (e.g. 0/4), got {spec!r}", "shard") from None
    if not 0 <= i < n:
        raise UsageError(f"shard: expected 0 <= I < N, got {i}/{n}", "shard")
    return i, n


def check_scale(keep: str, stats_by: Sequence[str], pool: str, shard: tuple[int, int] | None, append: bool,
                 overwrite: bool, out: str | Path) -> None:
    """The scale-out arguments of a build, checked before anything is loaded or written."""
    if keep not in KEEPS:
        raise UsageError(f"keep must be one of {list(KEEPS)}, got {keep!r}", "keep")
    if keep == "stats" and not stats_by:
        raise UsageError("keep stats writes no activations: name the groupings to keep with stats_by "
                         "(--stats-by COLUMN)", "keep", "stats_by")
    if keep == "pooled" and pool != "token":
        raise UsageError("keep pooled pools the token rows itself: use it with pool token", "keep", "pool")
    if shard is not None and (append or overwrite):
        raise UsageError("shard builds one new store (its shards resume alone): no append or overwrite",
                         "shard", "append", "overwrite")
    if shard is not None and "://" in str(out) and not str(out).startswith("file://"):
        raise UsageError("shard needs a store on a local or shared POSIX file system (the shards lock its "
                         "attributes)", "shard", "out")


def check_same(store: Store, meta: dict[str, Any], ident: ModelIdentity) -> None:
    """Refuse a build whose model, site, dtype, pooling, layers or keep differ from the store's."""
    have = store.meta
    problems = [f"{key}: store has {have.get(key)!r}, this build {meta.get(key)!r}"
                for key in ("site", "dtype", "pooling", "layers", "sites") if have.get(key) != meta.get(key)]
    if have.get("keep", "all") != meta.get("keep", "all"):
        problems.append(f"keep: store has {have.get('keep', 'all')!r}, this build {meta.get('keep', 'all')!r}")
    hm = have.get("model", {})
    problems += [f"model {key}: store has {hm.get(key)!r}, this build {getattr(ident, key)!r}"
                 for key in ("architecture", "n_layers", "n_neurons", "sha256") if hm.get(key) != getattr(ident, key)]
    if problems:
        raise StoreError(f"{store.path}: this build does not match the store: " + "; ".join(problems))


def open_shard(out: Path, plan: Any, lm: LoadedModel, shard: tuple[int, int], *,
               compressor: str) -> tuple[Store, str, int, list[Example]]:
    """Shard ``I`` of ``N``: the first shard to come creates the store, every example and all N parts (so
    the parts lie in file order whichever shard starts first); each then writes its own part."""
    i, n = shard
    examples = plan.examples
    out.mkdir(parents=True, exist_ok=True)
    with meta_lock(out.resolve().parent):  # one shard creates the store; the others wait for it
        if not is_store(out):
            if any(out.iterdir()):
                raise StoreExistsError(f"{out} exists and is not a vstore store; choose another out")
            store = Store.create(out, {**plan.meta, "shards": n})
            start = store.add_examples([e.id for e in examples], [e.text for e in examples],
                                       [e.labels for e in examples])
            bounds = [len(examples) * k // n for k in range(n + 1)]
            store.start_parts([(bounds[k + 1] - bounds[k], start + bounds[k], {**plan.part_extra, "shard": [k, n]})
                               for k in range(n)], compressor=compressor, keep=plan.meta["keep"])
        store = Store(out, mode="r+")
    if store.meta.get("shards") != n:
        raise StoreError(f"{out} is not a build of {n} shards (it has {store.meta.get('shards') or 'no'} shards); "
                         "use its own I/N, another out, or remove it")
    check_same(store, plan.meta, lm.identity)
    entry = store.meta["parts"][i]
    ds = entry.get("dataset", {})
    if entry.get("build") != plan.part_extra["build"] or ds.get("sha256") != plan.part_extra["dataset"]["sha256"]:
        raise StoreError(f"{out}: shard {i}/{n} was started with other data or arguments; rerun it with the same ones")
    local = int(entry["example_start"]) - int(store.meta["parts"][0]["example_start"])
    return store, entry["name"], int(entry["example_start"]), examples[local : local + int(entry["n_examples"])]


@contextlib.contextmanager
def build_lock(out: Path | str, shard: tuple[int, int] | None = None) -> Iterator[None]:
    """An advisory lock beside the store for the duration of a build (of one shard): a second writer is
    refused. A remote store (a URL) has no lock: one writer at a time is up to the user."""
    import fcntl

    if isinstance(out, str):
        yield
        return
    tag = f".shard{shard[0]}" if shard is not None else ""
    lock = out.with_name(f".{out.name}{tag}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            what = f"shard {shard[0]}/{shard[1]} of {out}" if shard is not None else str(out)
            raise StoreError(f"{what} is being written by another build (lock {lock}); wait for it to end") from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
    finally:
        os.close(fd)
