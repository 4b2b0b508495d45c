"""Writing a store: examples, parts (one per build, append or shard), committed counters.

The functions behind the writing methods of :class:`~vstore.store.Store` (which delegate here), so
that the reading side stays one screen. Every change of the attributes goes through
``Store._update`` (a fresh read under the store's lock: shards commit concurrently).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _format
from ._format import DTYPES, codecs_for

if TYPE_CHECKING:
    from ._store import Store

__all__ = ["POOLED_CHUNK", "add_examples", "commit", "finish_part", "start_parts", "trim_examples"]

#: Rows per chunk of the ``pooled/*`` arrays (one row per example).
POOLED_CHUNK = 256


def add_examples(self: Store, ids: Sequence[str], texts: Sequence[str], labels: Sequence[Mapping[str, str]]) -> int:
    """Append examples (ids, texts, label columns); returns the global index of the first one.

    The examples count in the attributes is only advanced by :meth:`start_part`, so a crash
    between the two leaves arrays that are trimmed back on the next call.
    """
    self.check_writable()
    start = int(self.meta["n_examples"])
    n = len(ids)
    ex = self.subgroup("examples")
    for name, values in (("id", ids), ("text", texts)):
        if name not in ex:
            ex.create_array(name, shape=(0,), chunks=(_format.EXAMPLES_CHUNK,), dtype=str, dimension_names=("example",))
        arr = self.array(f"examples/{name}")
        arr.resize((start + n,))
        if n:
            arr[start : start + n] = np.asarray(list(values), dtype=object).astype(str)
    columns = sorted({k for lab in labels for k in lab} | set(self.label_columns()))
    for col in columns:
        if col not in ex:
            ex.create_array(
                col, shape=(0,), chunks=(_format.EXAMPLES_CHUNK,), dtype="int32", fill_value=-1,
                dimension_names=("example",), attributes={"categories": []},
            )
        arr = self.array(f"examples/{col}")
        cats = [str(c) for c in arr.attrs.get("categories", [])]  # type: ignore[union-attr]
        index = {c: i for i, c in enumerate(cats)}
        codes = np.full(n, -1, dtype=np.int32)
        for i, lab in enumerate(labels):
            v = lab.get(col)
            if v is None:
                continue
            if v not in index:
                index[v] = len(cats)
                cats.append(v)
            codes[i] = index[v]
        if arr.shape[0] < start:  # a column new in this part: earlier examples are missing
            arr.resize((start,))
            arr[:] = -1
        arr.resize((start + n,))
        if n:
            arr[start : start + n] = codes
        arr.attrs.update({"categories": cats})
    return start

def start_parts(self: Store, specs: Sequence[tuple[int, int, Mapping[str, Any]]], *, compressor: str,
                keep: str = "all") -> list[str]:
    """Create one part per ``(n_examples, example_start, extra)``, in order (the shards of a build)."""
    self.check_writable()
    names = []
    for k in range(len(specs)):
        name = f"{len(self.meta['parts']) + k:04d}"
        _create_part_arrays(self, name, compressor, keep)
        names.append(name)

    def change(meta: dict[str, Any]) -> None:
        for name, (n_examples, example_start, extra) in zip(names, specs, strict=True):
            meta["parts"].append({"name": name, "state": "building", "example_start": example_start,
                                  "n_examples": n_examples, "committed_examples": 0, "committed_rows": 0,
                                  **({"keep": keep} if keep != "all" else {}), **extra})
            meta["n_examples"] = max(int(meta["n_examples"]), example_start + n_examples)
        meta["state"] = "building"

    self._update(change)
    return names

def _create_part_arrays(self: Store, name: str, compressor: str, keep: str) -> None:
    base = f"parts/{name}"
    if base in self.group:  # left over by a crash before the counters were written
        del self.group[base]
    L, N = len(self.layers), self.n_neurons
    chunk = int(self.meta["chunk_rows"])
    heads = {"all": ["acts"], "pooled": ["pooled/mean", "pooled/last"], "stats": []}[keep]
    arrays: list[tuple[str, int, int, str, dict[str, str]]] = [
        (h, N, chunk if h == "acts" else min(chunk, POOLED_CHUNK), self.dtype, {}) for h in heads]  # pooled: small
    if keep == "all" and "sites" in self.meta:  # one array per site: the first at acts, the others under sites/
        arrays = [(str(e["path"]), int(e["n_neurons"]), int(e["chunk_rows"]), str(e["dtype"]), {"site": s})
                  for s in self.sites for e in [self.site_info(s)]]
    for head, width, rows, dt, attrs in arrays:
        self.group.create_array(
            f"{base}/{head}", shape=(L, 0, width), chunks=(1, rows, width), dtype=DTYPES[dt].storage,
            fill_value=0, compressors=codecs_for(compressor), config={"write_empty_chunks": True},
            dimension_names=("layer", "row", "neuron"), attributes={"logical_dtype": dt, **attrs},
        )
    columns = [("example", "int64"), ("position", "int32"), ("token", "int32")]
    if keep == "pooled":
        columns.append(("pooled/example", "int64"))
    for col, dt in columns:
        self.group.create_array(
            f"{base}/rows/{col}", shape=(0,), chunks=(_format.ROWS_CHUNK,), dtype=dt, fill_value=-1,
            compressors=codecs_for("none"), dimension_names=("row",),
        )

def trim_examples(self: Store) -> None:
    """Cut example arrays back to the count in the attributes (after a crash mid-append)."""
    self.check_writable()
    n = int(self.meta["n_examples"])
    for key in self.subgroup("examples").array_keys():
        arr = self.array(f"examples/{key}")
        if arr.shape[0] != n:
            arr.resize((n,))

def commit(self: Store, part: str, examples: int, rows: int, *, overflow: Mapping[str, int] | None = None,
           **fields: Any) -> None:
    """Advance a part's committed counters (after its rows are written); ``fields`` go to its entry.

    A shard's float16 overflow is kept in its own entry and the store's ``overflow`` is the sum
    over the shards (they commit concurrently).
    """
    def change(meta: dict[str, Any]) -> None:
        entry = None
        for p in meta["parts"]:
            if p["name"] == part:
                p["committed_examples"] = int(examples)
                p["committed_rows"] = int(rows)
                p.update(fields)
                entry = p
        if overflow and entry is not None and "shard" in entry:
            entry["overflow"] = {k: int(v) for k, v in overflow.items()}
            total: dict[str, int] = {}
            for p in meta["parts"]:
                for k, v in p.get("overflow", {}).items():
                    total[k] = total.get(k, 0) + int(v)
            meta["overflow"] = total
        elif overflow:
            meta["overflow"] = {k: int(v) for k, v in overflow.items()}

    self._update(change)

def finish_part(self: Store, part: str) -> bool:
    """Mark a part complete, and the store when every part is; returns whether the store is complete."""
    def change(meta: dict[str, Any]) -> None:
        for p in meta["parts"]:
            if p["name"] == part:
                p["state"] = "complete"
        if all(p["state"] == "complete" for p in meta["parts"]):
            meta["state"] = "complete"

    self._update(change)
    return self.state == "complete"
