"""The activation store: a Zarr v3 group (format version 1, see ``docs/store-format.md``).

Layout::

    zarr.json                      attributes["vstore"]: format, model, site, layers, dtype, pooling,
                                   state, parts (committed rows/examples per part), ...
    examples/text, examples/id     one entry per example (string arrays)
    examples/<label>               int32 codes, attribute "categories" (names), -1 = missing
    parts/NNNN/acts                (captured layers, rows, neurons), chunked (1, chunk_rows, neurons)
    parts/NNNN/sites/<site>        the same for every further site (``sites`` attribute; e.g. resid, attr)
    parts/NNNN/rows/example        int64 global example index per row
    parts/NNNN/rows/position       int32 token index in the example's own tokenization (-1 for mean pool)
    parts/NNNN/rows/token          int32 token id (-1 for mean pool)
    stats/<key>/...                cached sufficient statistics (written by ``vstore rank``)

Writes are append-only; rows are written first and the committed counters in the group attributes
after them, at example boundaries. Readers trust only the counters.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .._faults import fault_point
from ..errors import StoreError, StoreExistsError, StoreNotFoundError
from . import _writes
from ._format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ITEMSIZE,
    check_attributes,
    check_format_version,
)
from ._meta import meta_lock, read_meta_file
from ._sites import SiteView

__all__ = ["VIEWS", "PartInfo", "Store", "is_store", "is_url"]

#: The rows a :class:`Store` can be read as: token rows, or a ``--keep pooled`` store's pooled rows.
VIEWS = ("token", "mean", "last")


def is_url(path: str | Path) -> bool:
    """Whether ``path`` is an fsspec URL of a non-local file system (``memory://``, ``s3://``, ...)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def local_path(path: str | Path) -> Path:
    """A local store path, ``file://`` URLs included."""
    text = str(path)
    return Path(text[len("file://"):]) if text.startswith("file://") else Path(path)


def _remove_dead_temporaries(p: Path) -> None:
    """Removes the creation folders of ``p`` (see :meth:`Store.create`) left by processes that died."""
    for t in p.parent.glob(f".{p.name}.creating-*"):
        pid = t.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(t, ignore_errors=True)
        except OSError:  # alive, another user's: leave it
            pass


def is_store(path: str | Path) -> bool:
    """Whether ``path`` holds a vstore store (a Zarr group with ``vstore`` attributes)."""
    if is_url(path):
        try:
            return FORMAT_NAME in zarr.open_group(str(path), mode="r").attrs
        except Exception:  # nothing there, or not a group
            return False
    meta = local_path(path) / "zarr.json"
    if not meta.exists():
        return False
    try:
        return FORMAT_NAME in json.loads(meta.read_text()).get("attributes", {})
    except (json.JSONDecodeError, OSError):
        return False


@dataclass(frozen=True)
class PartInfo:
    """One part of a store as its committed counters describe it."""

    name: str
    state: str
    example_start: int
    n_examples: int
    committed_examples: int
    committed_rows: int

    @property
    def complete(self) -> bool:
        return self.state == "complete"


class Store(SiteView):
    """A vstore store opened for reading (and, by the build, for writing).

    Parameters
    ----------
    path
        The store folder (or any zarr store URL).
    mode
        ``"r"`` (read only) or ``"r+"``.
    site
        The site that :meth:`acts`, :attr:`n_neurons`, :attr:`dtype` and every reader see (default:
        the store's first site); :meth:`with_site` gives the same store seen at another site.
    view
        Which rows the reading side sees: ``token`` (the ``acts`` of every part, default), or ``mean``
        / ``last``: the pooled rows of a store built ``--keep pooled`` (``pooled/<view>``, the first
        site only).
    """

    def __init__(self, path: str | Path, mode: str = "r", site: str | None = None, *, view: str = "token") -> None:
        if mode not in ("r", "r+"):
            raise StoreError(f"mode must be 'r' or 'r+', got {mode!r}")
        if view not in VIEWS:
            raise StoreError(f"view must be one of {', '.join(VIEWS)}, got {view!r}")
        self.view = view
        #: the store's URL for a remote store (zarr reads it through fsspec), else None
        self.url: str | None = str(path) if is_url(path) else None
        self.path = Path(str(path)) if self.url else local_path(path)
        if self.url is not None:
            if not is_store(self.url):
                raise StoreNotFoundError(f"no vstore store at {self.url}")
        elif not is_store(self.path):
            meta_file = self.path / "zarr.json"
            if meta_file.exists():
                try:
                    json.loads(meta_file.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise StoreError(f"{meta_file}: damaged group metadata, not valid JSON ({e})") from None
                raise StoreError(f"{self.path} is a Zarr group but not a vstore store (no 'vstore' attributes)")
            raise StoreNotFoundError(f"no vstore store at {self.path}")
        self.mode = mode
        self.group = zarr.open_group(self.url or str(self.path), mode="r" if mode == "r" else "r+")
        self.meta: dict[str, Any] = dict(self.group.attrs[FORMAT_NAME])  # type: ignore[arg-type]
        check_format_version(self.meta.get("format_version"), str(self.path))
        check_attributes(self.meta, f"{self.path}: attributes.vstore")
        self._check_inside()
        if view != "token" and not any(p.get("keep") == "pooled" for p in self.meta["parts"]):
            raise StoreError(f"{self.path}: rows {view!r} are the pooled rows of a store built with --keep pooled; "
                             "this store has none")
        self.site = self._resolve_site(site)

    @property
    def location(self) -> str:
        """The URL of a remote store, or the absolute path of a local one (what other processes open)."""
        return self.url if self.url is not None else str(self.path.resolve())

    @property
    def local(self) -> Path | None:
        """The store folder on a local file system (None: a remote store)."""
        return None if self.url is not None else self.path

    def _check_inside(self) -> None:
        """Refuse a store whose folders lead outside it (a symbolic link): nothing is read or written there."""
        if self.url is not None:
            return
        root = self.path.resolve()
        parts = self.path / "parts"
        folders = [self.path / "examples", parts, self.path / "stats"]
        if parts.is_dir():
            folders += [p for p in parts.iterdir() if p.is_dir()]
        for f in folders:
            if (f.exists() or f.is_symlink()) and not f.resolve().is_relative_to(root):
                raise StoreError(f"{f} leads outside the store (to {f.resolve()}); vstore reads and writes only "
                                 "inside a store")

    # -- creation ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, meta: Mapping[str, Any], *, overwrite: bool = False) -> Store:
        """Create an empty store with the given ``vstore`` attributes (state ``building``)."""

        if is_url(path):
            if is_store(path) and not overwrite:
                raise StoreExistsError(f"{path} exists; pass overwrite to replace it")
            full_r = {"format_version": FORMAT_VERSION, "state": "building", "parts": [], "n_examples": 0, **meta}
            gr = zarr.open_group(str(path), mode="w")
            gr.create_group("examples")
            gr.create_group("parts")
            gr.attrs.update({FORMAT_NAME: full_r})
            return cls(path, mode="r+")
        p = local_path(path)
        if p.exists() and any(p.iterdir()):
            if not overwrite:
                raise StoreExistsError(f"{p} exists; pass overwrite to replace it")
            if not is_store(p):
                raise StoreError(f"{p} exists and is not a vstore store; refusing to delete it")
            shutil.rmtree(p)
        full = {"format_version": FORMAT_VERSION, "state": "building", "parts": [], "n_examples": 0, **meta}
        # Made in a sibling folder and renamed into place: a failure part way (a full disk) leaves no
        # half-made folder at `p` that a rerun would refuse as "not a vstore store".
        _remove_dead_temporaries(p)
        tmp = p.parent / f".{p.name}.creating-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            g = zarr.open_group(str(tmp), mode="w")
            g.create_group("examples")
            g.create_group("parts")
            g.attrs.update({FORMAT_NAME: full})
            if p.exists():  # an empty folder (a full one was refused or removed above)
                p.rmdir()
            os.rename(tmp, p)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(p, mode="r+")

    def array(self, path: str) -> zarr.Array:
        """The zarr array at ``path`` inside the store (``StoreError`` when it is missing or a group).

        In a pooled view, a part's ``rows/example`` is that of its pooled rows."""
        if self.view != "token" and path.startswith("parts/") and path.endswith("/rows/example"):
            path = path.replace("/rows/example", "/rows/pooled/example")
        try:
            node = self.group.get(path)
        except Exception as e:  # zarr raises JSON, key and value errors on damaged array metadata
            raise StoreError(f"{self.path}/{path}: damaged array metadata ({type(e).__name__}: {e})") from None
        if not isinstance(node, zarr.Array):
            raise StoreError(f"{self.path}: no array {path!r}")
        return node

    def subgroup(self, path: str) -> zarr.Group:
        """The zarr group at ``path`` inside the store."""
        node = self.group.get(path)
        if not isinstance(node, zarr.Group):
            raise StoreError(f"{self.path}: no group {path!r}")
        return node

    def check_writable(self) -> None:
        """Raise ``StoreError`` unless the store is open ``"r+"``."""
        if self.mode == "r":
            raise StoreError(f"{self.path} is open read-only")

    def _save_meta(self) -> None:
        self.check_writable()
        fault_point("before-attrs")
        self.group.attrs.update({FORMAT_NAME: self.meta})
        fault_point("after-attrs")

    def _update(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Apply ``change`` to the attributes as they are on disk now and save them, under the store's lock
        (shards of one build update the same attributes concurrently)."""
        self.check_writable()
        with meta_lock(self.local):
            fresh = read_meta_file(self.local, FORMAT_NAME)
            if fresh is not None:
                self.meta = fresh
            change(self.meta)
            self._save_meta()

    def reload(self) -> None:
        """Re-read the attributes from disk (another process may have committed)."""
        fresh = read_meta_file(self.local, FORMAT_NAME)
        if fresh is not None:
            self.meta = fresh

    def part_info(self, name: str) -> PartInfo:
        """The committed description of one part (``StoreError`` when there is no such part)."""
        for p in self.parts:
            if p.name == name:
                return p
        raise StoreError(f"{self.path}: no part {name!r}; parts: {', '.join(p.name for p in self.parts) or '(none)'}")

    # -- description --------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        return str(self.meta.get("state", "building"))

    @property
    def layers(self) -> list[int]:
        """Model layer index of each position of the acts' first axis."""
        return [int(x) for x in self.meta["layers"]]

    @property
    def parts(self) -> list[PartInfo]:
        return [
            PartInfo(
                p["name"], p["state"], int(p["example_start"]), int(p["n_examples"]),
                int(p["committed_examples"]),
                int(p["committed_rows"] if self.view == "token" else p.get("pooled_rows", 0)),
            )
            for p in self.meta["parts"]
        ]

    @property
    def n_examples(self) -> int:
        """Examples with committed rows (over all parts)."""
        return sum(p.committed_examples for p in self.parts)

    @property
    def n_rows(self) -> int:
        return sum(p.committed_rows for p in self.parts)

    @property
    def committed_key(self) -> str:
        """A string that changes whenever rows are committed (for stats caching)."""
        key = ";".join(f"{p.name}:{p.committed_rows}" for p in self.parts)
        return key if self.view == "token" else f"{key};rows={self.view}"

    def acts(self, part: str, site: str | None = None) -> Any:
        """The raw array of a part at the selected site, or ``site`` (storage dtype; bfloat16 is uint16 bits)."""
        if not self.has_acts(part):
            keep = self.part_entry(part).get("keep")
            raise StoreError(f"{self.path}: part {part} holds no token activations (built with --keep {keep})")
        info = self.site_info(site)
        path = f"parts/{part}/{info['path']}" if self.view == "token" else f"parts/{part}/pooled/{self.view}"
        arr = self.array(path)
        if arr.ndim != 3 or arr.shape[0] != len(self.layers) or arr.shape[2] != int(info["n_neurons"]):
            raise StoreError(f"{self.path}/{path}: shape {arr.shape} does not match the attributes "
                             f"({len(self.layers)} layers, {info['n_neurons']} neurons at site {info['name']!r})")
        return arr

    def rows(self, part: str, column: str) -> np.ndarray:
        """A committed row column (``example``, ``position``, ``token``) of a part."""
        info = self.part_info(part)
        return np.asarray(self.array(f"parts/{part}/rows/{column}")[: info.committed_rows])

    def iter_blocks(self, layer_pos: int, *, part: str | None = None) -> Iterator[tuple[str, int, np.ndarray]]:
        """Committed row blocks of one layer, one chunk at a time: (part, first row, block)."""
        for p in self.parts:
            if part is not None and p.name != part:
                continue
            arr = self.acts(p.name)
            step = int(arr.chunks[1])
            for r0 in range(0, p.committed_rows, step):
                r1 = min(p.committed_rows, r0 + step)
                yield p.name, r0, np.asarray(arr[layer_pos, r0:r1])

    def chunk_ranges(self) -> list[tuple[str, int, int]]:
        """Every committed chunk row range of every part: ``(part, first row, end row)``."""
        out: list[tuple[str, int, int]] = []
        for p in self.parts:
            if not self.has_acts(p.name):
                continue
            step = int(self.acts(p.name).chunks[1])
            out.extend((p.name, r0, min(p.committed_rows, r0 + step)) for r0 in range(0, p.committed_rows, step))
        return out

    def label_columns(self) -> list[str]:
        """Names of the label columns in ``examples/``."""
        return sorted(k for k in self.subgroup("examples").array_keys() if k not in ("text", "id"))

    def labels(self, column: str) -> tuple[np.ndarray, list[str]]:
        """Codes (int32, -1 = missing) and category names of a label column, for every example."""
        key = f"examples/{column}"
        if column not in self.label_columns():
            raise StoreError(
                f"{self.path}: no label column {column!r}; columns: {', '.join(self.label_columns()) or '(none)'}"
            )
        arr = self.array(key)
        n = int(self.meta["n_examples"])
        return np.asarray(arr[:n]), [str(c) for c in arr.attrs.get("categories", [])]  # type: ignore[union-attr]

    def texts(self) -> list[str]:
        n = int(self.meta["n_examples"])
        return [str(x) for x in np.asarray(self.array("examples/text")[:n])]

    def ids(self) -> list[str]:
        n = int(self.meta["n_examples"])
        return [str(x) for x in np.asarray(self.array("examples/id")[:n])]

    def info(self) -> dict[str, Any]:
        """A JSON-able summary of the store."""
        sites = [self.site_info(n) for n in self.sites]
        nbytes = sum(p.committed_rows for p in self.parts if self.has_acts(p.name)) * len(self.layers) * sum(
            int(e["n_neurons"]) * ITEMSIZE[str(e["dtype"])] for e in sites)
        return {
            "path": str(self.path),
            "format_version": self.meta["format_version"],
            "state": self.state,
            "model": self.meta["model"],
            "site": self.meta.get("site"),
            "sites": [{k: v for k, v in e.items() if k != "chunk_rows"} for e in sites],
            "layers": self.layers,
            "dtype": self.dtype,
            "pooling": self.meta.get("pooling"),
            "compressor": self.meta.get("compressor", "none"),
            "parts": [{**p.__dict__, "keep": self.part_entry(p.name).get("keep", "all"),
                       "shard": self.part_entry(p.name).get("shard")} for p in self.parts],
            "keep": self.meta.get("keep", "all"),
            "stats_by": self.meta.get("stats_by", []),
            "examples": self.n_examples,
            "rows": self.n_rows,
            "activation_bytes": nbytes,
            "label_columns": {c: self.labels(c)[1] for c in self.label_columns()},
            "overflow": self.meta.get("overflow", {}),
            "nonfinite": self.meta.get("nonfinite", {}),
            "dataset": [p.get("dataset") for p in self.meta["parts"]],
            "stats_cache": self.stats_keys(),
        }

    def stats_keys(self) -> list[str]:
        """Keys of the cached statistics under ``stats/``."""
        if "stats" not in self.group:
            return []
        return sorted(k for k in self.subgroup("stats").group_keys() if not k.startswith("."))

    def part_entry(self, name: str) -> dict[str, Any]:
        """The raw attribute entry of one part."""
        for p in self.meta["parts"]:
            if p["name"] == name:
                return dict(p)
        raise StoreError(f"{self.path}: no part {name!r}")

    def has_acts(self, part: str) -> bool:
        """Whether a part holds token activations (``acts``); ``--keep stats|pooled`` parts do not."""
        return str(self.part_entry(part).get("keep", "all")) == ("all" if self.view == "token" else "pooled")

    @property
    def keeps_activations(self) -> bool:
        """Whether every part holds token activations (a statistics pass can read the store)."""
        return all(self.has_acts(p.name) for p in self.parts)

    # -- writing (see _writes) -------------------------------------------------------------------------
    def add_examples(self, ids: Sequence[str], texts: Sequence[str], labels: Sequence[Mapping[str, str]]) -> int:
        """Append examples (ids, texts, label columns); returns the global index of the first one.

        The examples count in the attributes is only advanced by :meth:`start_part`, so a crash
        between the two leaves arrays that are trimmed back on the next call.
        """
        return _writes.add_examples(self, ids, texts, labels)

    def start_part(self, n_examples: int, example_start: int, extra: Mapping[str, Any], *, compressor: str,
                   keep: str = "all") -> str:
        """Create ``parts/NNNN`` for ``n_examples`` examples starting at ``example_start``.

        ``keep`` is ``all`` (an ``acts`` array), ``pooled`` (``pooled/{mean,last}`` arrays instead)
        or ``stats`` (the row table only; the statistics go to the part's ``live/`` entries).
        """
        return _writes.start_parts(self, [(n_examples, example_start, dict(extra))], compressor=compressor,
                                   keep=keep)[0]

    def start_parts(self, specs: Sequence[tuple[int, int, Mapping[str, Any]]], *, compressor: str,
                    keep: str = "all") -> list[str]:
        """Create one part per ``(n_examples, example_start, extra)``, in order (the shards of a build)."""
        return _writes.start_parts(self, specs, compressor=compressor, keep=keep)

    def trim_examples(self) -> None:
        """Cut example arrays back to the count in the attributes (after a crash mid-append)."""
        _writes.trim_examples(self)

    def commit(self, part: str, examples: int, rows: int, *, overflow: Mapping[str, int] | None = None,
               **fields: Any) -> None:
        """Advance a part's committed counters (after its rows are written); ``fields`` go to its entry."""
        _writes.commit(self, part, examples, rows, overflow=overflow, **fields)

    def finish_part(self, part: str) -> bool:
        """Mark a part complete, and the store when every part is; returns whether the store is complete."""
        return _writes.finish_part(self, part)

    def update_meta(self, **fields: Any) -> None:
        """Set top-level ``vstore`` attributes."""
        self._update(lambda meta: meta.update(fields))
