"""Write a synthetic vstore store with known ("planted") value neurons, of any size.

Every activation is ``baseline[layer, neuron] + noise`` with noise ~ N(0, 1) and per-neuron baselines
in [-1.5, -0.5] (so a neuron fires, activation > 0, on roughly 7-30% of rows). Each group gets
``planted`` neurons of its own (distinct across groups, anywhere in any layer) whose activation is
raised by ``effect`` (in noise standard deviations) on the rows of that group's examples, which
raises both their mean and their activation probability there. Every scoring method should
recover them at a clear effect (precision@k = 1).

Examples carry the label columns ``value`` (the group), ``lang`` (en/zh: each item once per
language, sharing an id stem ``<group>-<item>``) and, with ``polarity=True``, ``polarity``
(aligned/violating: each item once per polarity, ids ``<stem>-<lang>:<polarity>``; the planted
shift is then applied on aligned rows only).

Usage::

    python tools/make_synthetic_store.py OUT [--layers 4] [--neurons 512] [--examples 240] [--rows 32]
        [--groups 4] [--planted 5] [--effect 3] [--dtype float16] [--seed 0] [--size 1.6GB]
        [--compressor none] [--chunk-rows R] [--polarity] [--overwrite]

``--size`` overrides ``--examples`` to reach about that many activation bytes. The planted neurons
are printed as JSON and stored in the store's ``vstore`` attributes under ``synthetic``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vstore.store import ITEMSIZE, STORAGE_DTYPES, PartWriter, Store, chunk_rows_for, is_store

__all__ = ["make_synthetic_store", "to_storage"]


def to_storage(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values in the store's raw dtype (bfloat16: uint16 bits, rounded to nearest even)."""
    if dtype == "float32":
        return np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "float16":
        return values.astype(np.float16)
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        return rounded.astype(np.uint16)
    raise ValueError(f"dtype must be one of {list(STORAGE_DTYPES)}, got {dtype!r}")


def make_synthetic_store(
    path: str | Path,
    n_layers: int = 4,
    n_neurons: int = 512,
    n_examples: int = 240,
    rows_per_example: int | tuple[int, int] = 32,
    groups: int | Sequence[str] = 4,
    planted: int = 5,
    effect: float = 3.0,
    dtype: str = "float16",
    seed: int = 0,
    *,
    layers: Sequence[int] | None = None,
    polarity: bool = False,
    compressor: str = "none",
    chunk_rows: int | None = None,
    overwrite: bool = True,
    append: bool = False,
    nonfinite_rows: int = 0,
) -> dict[str, Any]:
    """Write a synthetic store with planted value neurons.

    Parameters
    ----------
    path
        Store folder (replaced when ``overwrite``).
    n_layers, n_neurons
        Captured layers and neurons per layer.
    n_examples
        Examples (rounded up to whole items: 2 languages, x2 with ``polarity``), dealt round-robin
        over the groups.
    rows_per_example
        Rows (tokens) per example, or ``(low, high)`` for a uniform random count in [low, high].
    groups
        Number of groups (named ``g00``, ``g01``, ...) or their names.
    planted
        Planted neurons per group.
    effect
        Shift of a planted neuron on its group's rows, in noise standard deviations.
    dtype
        ``float16``, ``bfloat16`` or ``float32``.
    seed
        Seed of everything random.
    layers
        Model layer index of each captured layer (default ``0..n_layers-1``); the model then has
        ``max(layers) + 1`` layers.
    polarity
        Each item once per polarity (aligned/violating); the shift applies to aligned rows only.
    compressor
        ``none`` or ``zstd-N``.
    chunk_rows
        Rows per chunk (default: about 8 MiB per layer chunk, as ``vstore build``).
    overwrite
        Replace an existing store at ``path``.
    append
        Add the examples as a new part of an existing synthetic store (same shape) instead.
    nonfinite_rows
        Rows whose first neuron is set to NaN (every layer), spread over the store.

    Returns
    -------
    dict
        ``path``, ``planted`` ({group: [[layer, neuron], ...]} with model layer indices),
        ``rows``, ``examples``, ``bytes`` (activation bytes written), ``nonfinite_rows``.
    """
    rng = np.random.default_rng(seed)
    names = [f"g{i:02d}" for i in range(groups)] if isinstance(groups, int) else [str(g) for g in groups]
    G = len(names)
    layer_idx = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    if len(layer_idx) != n_layers:
        raise ValueError(f"layers: expected {n_layers} indices, got {layer_idx}")
    L, N = n_layers, n_neurons
    if planted * G > L * N:
        raise ValueError(f"cannot plant {planted} neurons in each of {G} groups among {L * N} neurons")
    flat = rng.choice(L * N, size=planted * G, replace=False)
    plant = {g: sorted((int(f // N), int(f % N)) for f in flat[i * planted : (i + 1) * planted]) for i, g in enumerate(names)}
    base_rng = np.random.default_rng(12345)  # the same baselines in every part of a store
    baseline = base_rng.uniform(-1.5, -0.5, size=(L, 1, N)).astype(np.float32)
    shift = np.zeros((G, L, N), dtype=np.float32)
    for gi, g in enumerate(names):
        for li, n in plant[g]:
            shift[gi, li, n] = effect

    kinds = ("aligned", "violating") if polarity else (None,)
    per_item = 2 * len(kinds)
    n_items = max(1, -(-n_examples // per_item))
    ids, texts, labels, ex_group, ex_shifted = [], [], [], [], []
    item_start = 0
    store: Store
    if append:
        store = Store(path, mode="r+")
        old = store.meta.get("synthetic", {})
        item_start = int(old.get("items", 0))
        plant = {g: [tuple(x) for x in v] for g, v in old.get("planted", plant).items()}
        names = list(plant)
        G = len(names)
        shift = np.zeros((G, L, N), dtype=np.float32)
        pos_of = {lyr: i for i, lyr in enumerate(store.layers)}
        for gi, g in enumerate(names):
            for lyr, n in plant[g]:
                shift[gi, pos_of[lyr], n] = float(old.get("effect", effect))
    for it in range(item_start, item_start + n_items):
        gi = it % G
        for lang in ("en", "zh"):
            for kind in kinds:
                stem = f"{names[gi]}-{it:05d}"
                ids.append(f"{stem}-{lang}" + (f":{kind}" if kind else ""))
                texts.append(f"synthetic item {it} of {names[gi]} ({lang}{', ' + kind if kind else ''})")
                lab = {"value": names[gi], "lang": lang}
                if kind:
                    lab["polarity"] = kind
                labels.append(lab)
                ex_group.append(gi)
                ex_shifted.append(kind != "violating")
    n_ex = len(ids)
    if isinstance(rows_per_example, tuple):
        counts = rng.integers(rows_per_example[0], rows_per_example[1] + 1, size=n_ex)
    else:
        counts = np.full(n_ex, int(rows_per_example))
    total_rows = int(counts.sum())

    if not append:
        if is_store(path) and not overwrite:
            raise FileExistsError(f"{path} exists")
        meta = {
            "model": {"name": "synthetic", "source": "tools/make_synthetic_store.py", "sha256": f"synthetic-{seed}",
                      "architecture": "synthetic", "n_layers": max(layer_idx) + 1, "n_neurons": N},
            "site": "act", "layers": layer_idx, "dtype": dtype, "pooling": "token",
            "storage_dtype": STORAGE_DTYPES[dtype], "compressor": compressor,
            "chunk_rows": int(chunk_rows or chunk_rows_for(N, dtype)), "versions": {},
        }
        store = Store.create(path, meta, overwrite=overwrite)
    start = store.add_examples(ids, texts, labels)
    part = store.start_part(n_ex, start, {"dataset": {"synthetic": True, "seed": seed}, "build": {}},
                            compressor=compressor)
    writer = PartWriter(store, part)
    bad_rows = set(rng.choice(total_rows, size=min(nonfinite_rows, total_rows), replace=False).tolist()) \
        if nonfinite_rows else set()
    target = max(int(store.meta["chunk_rows"]), 256)
    e0, row0 = 0, 0
    nbytes = 0
    while e0 < n_ex:
        e1, rows = e0, 0
        while e1 < n_ex and (rows < target or e1 == e0):
            rows += int(counts[e1])
            e1 += 1
        grp = np.repeat(np.asarray(ex_group[e0:e1]), counts[e0:e1])
        on = np.repeat(np.asarray(ex_shifted[e0:e1]), counts[e0:e1])
        acts = rng.standard_normal((L, rows, N), dtype=np.float32)
        acts += baseline
        acts += np.where(on[None, :, None], shift[grp].transpose(1, 0, 2), np.float32(0))
        for r in [r - row0 for r in bad_rows if row0 <= r < row0 + rows]:
            acts[:, r, 0] = np.nan
        raw = to_storage(acts, dtype)
        example = np.repeat(np.arange(start + e0, start + e1, dtype=np.int64), counts[e0:e1])
        position = np.concatenate([np.arange(c, dtype=np.int32) for c in counts[e0:e1]])
        writer.add(raw, example, position, np.zeros(rows, np.int32), e1)
        nbytes += raw.nbytes
        row0 += rows
        e0 = e1
    writer.flush()
    store.commit(part, n_ex, writer.written)
    store.finish_part(part)
    planted_json = {g: [[int(store.layers[li]), int(n)] for li, n in v] for g, v in plant.items()} if not append else \
        {g: [list(x) for x in v] for g, v in plant.items()}
    syn = dict(store.meta.get("synthetic", {}))
    syn.update({"planted": planted_json, "effect": float(syn.get("effect", effect)), "seed": seed,
                "items": item_start + n_items})
    store.update_meta(synthetic=syn)
    return {"path": str(path), "planted": planted_json, "rows": store.n_rows, "examples": store.n_examples,
            "bytes": nbytes, "nonfinite_rows": len(bad_rows)}


def _parse_size(text: str) -> int:
    t = text.strip().upper().replace("IB", "B")
    for unit, mult in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(float(t))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--neurons", type=int, default=512)
    p.add_argument("--examples", type=int, default=240)
    p.add_argument("--rows", type=int, default=32, help="rows per example")
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--planted", type=int, default=5)
    p.add_argument("--effect", type=float, default=3.0)
    p.add_argument("--dtype", default="float16", choices=list(STORAGE_DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default=None, help="about this many activation bytes (e.g. 1.6GB); overrides --examples")
    p.add_argument("--compressor", default="none")
    p.add_argument("--chunk-rows", type=int, default=None)
    p.add_argument("--polarity", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    n_ex = a.examples
    if a.size:
        n_ex = max(1, _parse_size(a.size) // (a.rows * a.layers * a.neurons * ITEMSIZE[a.dtype]))
    res = make_synthetic_store(a.out, a.layers, a.neurons, n_ex, a.rows, a.groups, a.planted, a.effect, a.dtype,
                               a.seed, polarity=a.polarity, compressor=a.compressor, chunk_rows=a.chunk_rows,
                               overwrite=a.overwrite)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
