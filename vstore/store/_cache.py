"""The statistics cache of a store: ``stats/<key>/`` groups of plain arrays with one attribute.

An entry is identified by its key and must carry the same ``spec`` (grouping, filter, committed
rows) to be used; committing more rows changes the spec, and writing the new entry drops the stale
one of the same grouping and kind. Entries are written whole through :func:`vstore.atomic.atomic_path`
(a temporary group, then one rename), so a reader never sees half of one. Writing needs a store
opened ``"r+"``; a read-only store is never written through.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..atomic import PARTIAL_SUFFIX, atomic_path
from ..errors import StoreError
from ._chunks import chunks_digest
from ._store import Store

__all__ = ["CACHE_ATTR", "clear_cache", "read_cached", "store_digest", "write_cached"]

CACHE_ATTR = "vstore_stats"
_STALE_SECONDS = 24 * 3600


def store_digest(store: Store) -> str | None:
    """The digest of the stored checksums of every committed activation chunk (see :func:`chunks_digest`)."""
    return chunks_digest([(store.acts(p.name), p.committed_rows) for p in store.parts if store.has_acts(p.name)])


_NOW = "now"  # digest argument default: compute the store's digest for this one call


def read_cached(store: Store, key: str, spec: dict[str, Any], kind: str, *,
                digest: str | None = _NOW) -> dict[str, np.ndarray] | None:
    """The arrays of entry ``key`` when it is complete, of ``kind``, made for ``spec``, and computed from
    the chunks the store holds now (a chunk changed since makes the entry stale); else None.

    ``digest`` is :func:`store_digest` when the caller has it already (one per pass, not one per entry).
    """
    root: Any = store.group
    try:
        if "stats" not in root or key not in set(root["stats"].group_keys()):
            return None
        g: Any = root[f"stats/{key}"]
        attrs = dict(g.attrs.get(CACHE_ATTR, {}))
        if not attrs.get("complete") or attrs.get("kind") != kind or attrs.get("spec") != json.loads(json.dumps(spec)):
            return None
        now = store_digest(store) if digest == _NOW else digest
        if attrs.get("chunks_digest") is not None and attrs["chunks_digest"] != now:
            return None
        return {name: np.asarray(g[name][...]) for name in g.array_keys()}
    except (KeyError, OSError, ValueError):
        return None


def write_cached(store: Store, key: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any], *,
                 digest: str | None = _NOW) -> bool:
    """Write entry ``key`` whole, and drop stale entries of the same grouping and kind.

    Returns False (and leaves nothing behind) when the disk refuses the write.

    Raises
    ------
    StoreError
        The store is open read-only.
    """
    if store.mode != "r+":
        raise StoreError(f"{store.path} is open read-only; open it with mode 'r+' to cache statistics")
    if store.local is None:
        return _write_remote(store, key, arrays, attrs, digest=store_digest(store) if digest == _NOW else digest)
    base = store.path / "stats"
    if base.is_symlink() or (base.exists() and not base.resolve().is_relative_to(store.path.resolve())):
        raise StoreError(f"{base} leads outside the store; vstore writes statistics only inside it")
    try:
        _require_stats_group(store)
        with atomic_path(base / key, directory=True) as tmp:
            g: Any = zarr.open_group(str(tmp), mode="w")
            for name, arr in arrays.items():
                a = np.ascontiguousarray(arr)
                z = g.create_array(name, shape=a.shape, dtype=a.dtype, chunks=tuple(max(1, d) for d in a.shape),
                                   fill_value=0)
                if a.size:
                    z[...] = a
            g.attrs.update({CACHE_ATTR: {**attrs, "complete": True, "chunks_digest": store_digest(store) if digest == _NOW else digest,
                                         "created": time.strftime("%Y-%m-%dT%H:%M:%S")}})
        _drop_stale(base, key, attrs)
        return True
    except OSError:  # a full or read-only disk: rank without caching
        return False


def _write_remote(store: Store, key: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any], *,
                  digest: str | None) -> bool:
    """An entry of a remote store: arrays first, then the attribute that marks it complete (an object
    store has no rename; a reader ignores an entry without it)."""
    try:
        root: Any = store.group
        stats = root.require_group("stats")
        if key in set(stats.group_keys()):
            del stats[key]
        g = stats.create_group(key)
        for name, arr in arrays.items():
            a = np.ascontiguousarray(arr)
            z = g.create_array(name, shape=a.shape, dtype=a.dtype, chunks=tuple(max(1, d) for d in a.shape),
                               fill_value=0)
            if a.size:
                z[...] = a
        g.attrs.update({CACHE_ATTR: {**attrs, "complete": True, "chunks_digest": digest,
                                     "created": time.strftime("%Y-%m-%dT%H:%M:%S")}})
        return True
    except OSError:
        return False


def _require_stats_group(store: Store) -> None:
    """``stats/``, created if missing; another process creating it at the same moment is fine."""
    try:
        store.group.require_group("stats")
    except Exception:  # zarr's ContainsGroupError when a concurrent writer won the race
        if not (store.path / "stats" / "zarr.json").exists():
            raise


def _drop_stale(base: Path, key: str, attrs: dict[str, Any]) -> None:
    spec: Any = attrs.get("spec", {})
    for other in list(base.iterdir()):
        if not other.is_dir() or other.name == key:
            continue
        if other.name.startswith("."):  # a temporary: another writer's, or left by a killed one
            if other.name.endswith(PARTIAL_SUFFIX) and _older_than(other, _STALE_SECONDS):
                shutil.rmtree(other, ignore_errors=True)
            continue
        try:
            oattrs: Any = zarr.open_group(str(other), mode="r").attrs.get(CACHE_ATTR, {})
        except Exception:
            continue
        ospec = oattrs.get("spec", {})
        same_grouping = all(ospec.get(k) == spec.get(k) for k in ("by", "where", "contrast", "mask"))
        if same_grouping and oattrs.get("kind") == attrs.get("kind") and ospec.get("committed") != spec.get("committed"):
            shutil.rmtree(other, ignore_errors=True)


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def clear_cache(store: Store | str | Path) -> int:
    """Delete every cached statistic of a store; returns how many entries were removed."""
    st = store if isinstance(store, Store) else Store(store, mode="r+")
    if st.mode != "r+":
        raise StoreError(f"{st.path} is open read-only; open it with mode 'r+' to clear its cache")
    n = len(st.stats_keys())
    if "stats" in st.group:
        del st.group["stats"]
    d = st.path / "stats"
    if d.exists():
        shutil.rmtree(d, ignore_errors=True)
    return n
