"""`vstore show --neurons`: neuron cards, the top-activating tokens of chosen neurons in context.

One public function, :func:`neuron_cards`. For each selected neuron of a neuron set (per group, in
rank order) it finds the ``top`` rows of largest activation with one streaming pass over the
layers that hold selected neurons (:func:`vstore.topk.top_k_per_column`, out of core, one chunk at a
time), decodes each row's token with ``context`` tokens either side (``rows/example``,
``rows/position``, ``rows/token`` and the model's tokenizer), and reports the neuron's activation
distribution per group of the set's grouping: ``n``, ``mean``, ``std`` and ``frac_pos`` from
moments (:func:`vstore.kernels.accumulate_moments`), ``p50`` / ``p90`` from 16-bit-key histograms
(:func:`vstore.kernels.accumulate_histogram`, the AUROC machinery). The JSON is ``vstore-cards``
version 1 (``docs/show-compare.md``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import kernels
from .errors import ModelError, NeuronSetError, UsageError
from .inference import json_safe
from .models import cache_dir
from .neuronset import NeuronSet
from .progress import Note, Progress, task
from .stats import Moments, make_grouping
from .stats.reading import Prefetch, tasks_for
from .store import Store
from .topk import ColumnTopK, top_k_per_column

__all__ = ["CARDS_FORMAT", "load_tokenizer", "neuron_cards"]

CARDS_FORMAT = {"name": "vstore-cards", "version": 1}
_HIST_MEMORY = 256 << 20  # bytes of histogram per pass over a layer


@dataclass
class _LayerPass:
    """What one pass over a layer's chunks gathers for its selected neurons."""

    columns: np.ndarray
    top: ColumnTopK
    moments: Moments
    hist: np.ndarray


@dataclass
class _Cards:
    specs: list[dict[str, Any]]
    by_layer: dict[int, list[int]] = field(default_factory=dict)  # layer position -> neurons


def load_tokenizer(model: dict[str, Any], tokenizer: str | Path | None = None) -> Any:
    """The tokenizer of a store's model (only the tokenizer is loaded, never the weights).

    Parameters
    ----------
    model
        The store's model identity (``name``, ``source``).
    tokenizer
        A folder (or hub id in the local cache) to load instead.

    Raises
    ------
    ModelError
        Naming where it looked, and the ``tokenizer`` parameter that overrides it.
    """
    from transformers import AutoTokenizer

    source = str(model.get("source", ""))
    kind, _, rest = source.partition(":")
    where: list[str] = [str(tokenizer)] if tokenizer is not None else []
    if tokenizer is None and kind == "local":
        where.append(rest)
    elif tokenizer is None and kind in ("alias", "gguf"):
        gguf = rest.rsplit("(", 1)[-1].rstrip(")") if kind == "alias" else rest
        folders = sorted(cache_dir().glob(f"{model.get('name', '')}-*/vstore-model.json"))
        exact = [m.parent for m in folders if json.loads(m.read_text()).get("gguf") == gguf]
        where += [str(p) for p in exact or [m.parent for m in folders]]
    elif tokenizer is None and kind == "hub":
        where.append(rest)
    for w in where:
        try:
            return AutoTokenizer.from_pretrained(w, local_files_only=True)
        except Exception:  # transformers raises many kinds; try the next place
            continue
    raise ModelError(f"cannot find the tokenizer of model {model.get('name')!r} (source {source!r}; looked in "
                     f"{', '.join(where) or 'nowhere'}); give its folder with --tokenizer")


def _select(ns: NeuronSet, group: str | Sequence[str] | None, top_neurons: int) -> list[dict[str, Any]]:
    if group is None:
        names = list(ns.groups)
    else:
        names = [g.strip() for g in (group.split(",") if isinstance(group, str) else group) if g.strip()]
    for g in names:
        if g not in ns.groups:
            raise NeuronSetError(f"{ns.path or 'neuron set'}: groups: has no group {g!r}; it has: "
                                 f"{', '.join(ns.groups)}")
    return [{"group": g, "layer": int(it["layer"]), "neuron": int(it["neuron"]), "rank": r,
             "score": float(it["score"])} for g in names for r, it in enumerate(ns.groups[g][:top_neurons])]


def _pass_layer(st: Store, li: int, columns: np.ndarray, codes: np.ndarray, n_groups: int, top: int,
                offsets: dict[str, int], backend: str, verify: bool, bar: Any) -> _LayerPass:
    """One pass over layer position ``li``: top-k, moments and histograms of ``columns``."""
    lp = _LayerPass(columns, ColumnTopK(columns.size, top), Moments.zeros(n_groups, columns.size),
                    np.zeros((n_groups, columns.size, kernels.HISTOGRAM_BINS), dtype=np.uint32))
    for t, blk in Prefetch(st, tasks_for(st, codes, st.chunk_ranges(), [li]), verify=verify):
        assert blk is not None  # damaged chunks end the pass (no skip_damaged)
        sub = np.ascontiguousarray(blk[:, columns])
        top_k_per_column(sub, dtype=st.dtype, state=lp.top, row_start=offsets[t.part] + t.r0, mask=t.groups,
                         backend=backend)
        kernels.accumulate_moments(sub, t.groups, lp.moments, dtype=st.dtype, backend=backend)
        kernels.accumulate_histogram(sub, t.groups, lp.hist, dtype=st.dtype, neuron_start=0, backend=backend)
        bar.advance(blk.nbytes)
    return lp


def _key_values(dtype: str) -> np.ndarray:
    """The value of each 16-bit histogram key (float32 stores are binned at float16 precision)."""
    keys = np.arange(kernels.HISTOGRAM_BINS, dtype=np.uint32)
    bits = np.where(keys & 0x8000, keys ^ 0x8000, keys ^ 0xFFFF).astype(np.uint16)
    with np.errstate(invalid="ignore"):  # the NaN patterns (never counted) convert quietly
        if dtype == "bfloat16":
            return kernels.decode(bits, "bfloat16").astype(np.float64)
        return bits.view(np.float16).astype(np.float64)


def _quantile(hist: np.ndarray, values: np.ndarray, q: float) -> float | None:
    """The inverted-CDF quantile: the smallest value with at least ``q * n`` values at or below it."""
    n = int(hist.sum())
    if n == 0:
        return None
    need = max(1, int(np.ceil(q * n)))
    return float(values[int(np.searchsorted(np.cumsum(hist, dtype=np.int64), need))])


def _distribution(lp: _LayerPass, j: int, groups: Sequence[str], values: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {}
    valid = lp.moments.valid()
    mean, std = lp.moments.mean(), np.sqrt(lp.moments.var(ddof=1))
    for g, name in enumerate(groups):
        n = int(valid[g, j])
        out[name] = {"n": n, "mean": float(mean[g, j]) if n else None,
                     "std": float(std[g, j]) if n > 1 else None,
                     "p50": _quantile(lp.hist[g, j], values, 0.5), "p90": _quantile(lp.hist[g, j], values, 0.9),
                     "frac_pos": float(lp.moments.npos[g, j] / n) if n else None}
    return out


class _Rows:
    """The row columns of every part, and each example's rows in position order, read once."""

    def __init__(self, st: Store) -> None:
        self.st = st
        self.offsets: dict[str, int] = {}
        self.cols: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        total = 0
        for p in st.parts:
            self.offsets[p.name] = total
            total += p.committed_rows

    def part_of(self, global_row: int) -> tuple[str, int]:
        for name, off in reversed(self.offsets.items()):
            if global_row >= off:
                return name, global_row - off
        raise IndexError(global_row)

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(example, position, token) of every row, the rows ordered by (example, position), and their examples."""
        if name not in self.cols:
            ex, pos = self.st.rows(name, "example"), self.st.rows(name, "position")
            order = np.lexsort((pos, ex))
            self.cols[name] = (ex, pos, self.st.rows(name, "token"), order, ex[order])
        return self.cols[name]

    def context(self, part: str, row: int, k: int) -> tuple[int, int, int, list[int], list[int]]:
        """(example, position, token id, ids before, ids after) of a row: ``k`` rows of its example either side."""
        ex, pos, tok, order, sorted_ex = self.part(part)
        e = int(ex[row])
        lo, hi = np.searchsorted(sorted_ex, e, "left"), np.searchsorted(sorted_ex, e, "right")
        mine = order[lo:hi]
        i = int(np.flatnonzero(mine == row)[0])
        before = [int(tok[r]) for r in mine[max(0, i - k) : i]]
        after = [int(tok[r]) for r in mine[i + 1 : i + 1 + k]]
        return e, int(pos[row]), int(tok[row]), before, after


def _spans(tok: Any, text: str, position: int, token_id: int, context: int) -> tuple[str, str, str] | None:
    """(left, token, right) cut from the example's own text by the tokenizer's character offsets, when
    re-tokenizing it gives the recorded token id at ``position`` (a fast tokenizer); else None."""
    try:
        enc = tok(text, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):  # a slow tokenizer has no offsets
        return None
    ids, offs = list(enc["input_ids"]), list(enc["offset_mapping"])
    if not 0 <= position < len(ids) or ids[position] != token_id:
        return None
    a, b = (int(x) for x in offs[position])
    lo = min((int(o[0]) for o in offs[max(0, position - context) : position] if o[1] > o[0]), default=a)
    hi = max((int(o[1]) for o in offs[position + 1 : position + 1 + context] if o[1] > o[0]), default=b)
    return text[lo:a], text[a:b], text[b:hi]


def _hit(rows: _Rows, tok: Any, texts: list[str], ids: list[str], value: float, grow: int,
         context: int) -> dict[str, Any]:
    part, row = rows.part_of(grow)
    e, position, token_id, before, after = rows.context(part, row, context)
    hit: dict[str, Any] = {"activation": value, "example": ids[e], "part": part, "row": row, "position": position,
                           "token_id": token_id}
    spans = _spans(tok, texts[e], position, token_id, context) if token_id >= 0 else None
    if token_id < 0:  # a pooled row: the example, not a token
        hit.update(token="", left=texts[e][:200], right="")
    elif spans is not None:
        hit.update(left=spans[0], token=spans[1], right=spans[2])
    else:  # no offsets: decode the recorded ids
        hit.update(token=tok.decode([token_id]), left=tok.decode(before), right=tok.decode(after))
    return hit


def _check_tokenizer(rows: _Rows, tok: Any, texts: list[str], on_note: Note | None) -> None:
    """Note when re-tokenizing the first example does not give the token ids the store recorded."""
    if not rows.st.parts or rows.st.parts[0].committed_rows == 0:
        return
    ex, pos, tid, _, _ = rows.part(rows.st.parts[0].name)
    e = int(ex[0])
    mine = np.flatnonzero(ex == e)
    if tid[mine[0]] < 0:
        return
    enc = list(tok(texts[e])["input_ids"])
    ok = all(0 <= pos[r] < len(enc) and enc[pos[r]] == tid[r] for r in mine)
    if not ok and on_note is not None:
        on_note("note: the tokenizer does not reproduce the token ids the store recorded for its first example; "
                "the decoded tokens may be wrong (give the model's tokenizer with --tokenizer)")


def neuron_cards(
    store: str | Path,
    neurons: str | Path | NeuronSet,
    *,
    group: str | Sequence[str] | None = None,
    top: int = 10,
    context: int = 8,
    top_neurons: int = 5,
    tokenizer: str | Path | None = None,
    backend: str = "auto",
    verify: bool = True,
    progress: Progress | None = None,
    on_note: Note | None = None,
) -> dict[str, Any]:
    """Neuron cards of a neuron set: top-activating tokens in context and the distribution per group.

    Parameters
    ----------
    store
        The store folder the set was ranked on (or any store of the same model and layers).
    neurons
        A neuron-set file (``vstore-neurons`` v1) or set.
    group
        Group name(s) (a comma-separated string or a list); default every group of the set.
    top
        Top-activating rows per neuron.
    context
        Tokens of the same example shown either side.
    top_neurons
        Neurons per group, the first in the set's rank order.
    tokenizer
        Tokenizer folder (default: found from the store's model source; see :func:`load_tokenizer`).
    backend
        Kernel backend (``auto``, ``cpp``, ``numba``, ``numpy``).
    verify
        Check chunk checksums while reading.
    progress, on_note
        Progress reporter and note callback.

    Returns
    -------
    dict
        The ``vstore-cards`` v1 document (``docs/show-compare.md``).

    Raises
    ------
    UsageError
        ``top``, ``context`` or ``top_neurons`` out of range.
    NeuronSetError, StoreError, ModelError
        A set that does not fit the store, an unknown group, a tokenizer that cannot be found.
    """
    for name, v, low in (("top", top, 1), ("context", context, 0), ("top_neurons", top_neurons, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise UsageError(f"{name} must be an integer >= {low}, got {v!r}", name)
    st = Store(store, mode="r")
    ns = neurons if isinstance(neurons, NeuronSet) else NeuronSet.load(neurons)
    ns.validate(n_neurons=st.n_neurons, layers=st.layers)
    specs = _select(ns, group, top_neurons)
    tok = load_tokenizer(dict(st.meta["model"]), tokenizer)
    grouping = make_grouping(st, ns.data.get("by"), where=ns.data.get("where") or None)
    rows, texts, ids = _Rows(st), st.texts(), st.ids()
    _check_tokenizer(rows, tok, texts, on_note)
    pos = {lyr: i for i, lyr in enumerate(st.layers)}
    wanted: dict[int, list[int]] = {}
    for s in specs:
        wanted.setdefault(pos[s["layer"]], []).append(s["neuron"])
    found: dict[tuple[int, int], tuple[_LayerPass, int]] = {}
    G = len(grouping.names)
    per_pass = max(1, _HIST_MEMORY // (max(G, 1) * kernels.HISTOGRAM_BINS * 4))
    itemsize = np.dtype(kernels.RAW_DTYPES[st.dtype]).itemsize
    batches = [(li, np.asarray(sorted(set(nn))[b : b + per_pass], np.int64))
               for li, nn in sorted(wanted.items()) for b in range(0, len(set(nn)), per_pass)]
    with task(progress, "neuron cards", len(batches) * st.n_rows * st.n_neurons * itemsize, unit="bytes") as bar:
        for li, cols in batches:
            lp = _pass_layer(st, li, cols, grouping.codes, G, top, rows.offsets, backend, verify, bar)
            for j, n in enumerate(cols):
                found[(li, int(n))] = (lp, j)
    values = _key_values(st.dtype)
    cards = []
    for s in specs:
        lp, j = found[(pos[s["layer"]], s["neuron"])]
        hits = [_hit(rows, tok, texts, ids, v, r, context) for v, r in lp.top.column(j)]
        cards.append({**s, "top": hits, "by_group": _distribution(lp, j, grouping.names, values)})
    return json_safe({"format": dict(CARDS_FORMAT), "store": str(Path(st.path).resolve()),
            "neurons_file": str(ns.path) if ns.path else None, "model": dict(st.meta["model"]), "method": ns.method,
            "by": ns.data.get("by"), "where": ns.data.get("where") or {}, "context": context, "top": top,
            "quantiles": "exact" if st.dtype != "float32" else "float16 bins", "cards": cards})  # type: ignore[no-any-return]
